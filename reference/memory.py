"""Matrix associative memories over a sequence: Hebbian, delta, DGD, Oja and Omega learning rules.

Paper: §5 (with §2 and §4.5), Eqs. (14)-(18), (56)-(57), (64)-(68), arXiv 2512.24695v1;
Omega's window and chunk-parallel form: ATLAS Eqs. 9, 15-16. SPEC: SPEC.md#memory.

Each rule writes a matrix memory token by token and reads it after the write (linear attention's
read, Eq. 15: ``y_t = M_t q_t``). Every rule comes as a forward/backward pair in its token-by-token
form; Hebbian, delta and DGD also come in their chunk-wise form (an exact rewrite of the
recurrence: cumulative decays, and for delta/DGD the UT transform), and Omega in its ATLAS
chunk-parallel form (gradients at the chunk-start state: the chunk size is part of its
definition, so its oracle is ``omega_forward(..., chunk_size=C)``).

Symbols (b = batch, t = token, i/s = tokens inside a chunk, v = value feature, k = key feature):

| paper                  | code            | shape            |
| ---------------------- | --------------- | ---------------- |
| q_t, k_t (phi(k_t))    | q, k            | (B, T, d_k)      |
| v_t                    | v               | (B, T, d_v)      |
| eta_t (learning rate)  | eta             | (B, T)           |
| eta'_t (DGD step)      | eta_prox        | (B, T)           |
| alpha_t (retention)    | alpha           | (B, T); None = 1 |
| gamma_i (Omega gates)  | gamma           | (B, T)           |
| c (Omega window)       | window          | int >= 1         |
| M_0, M_t               | M0, M           | (B, d_v, d_k)    |
| y_t = M_t q_t          | y               | (B, T, d_v)      |
| C (chunk size)         | chunk_size      | int >= 1         |

Decisions where the paper is open (all in SPEC.md#memory):
- Inner losses: dot product ``-<M k, v>`` (Hebbian) and ``1/2 ||M k - v||^2`` (delta, DGD, Omega),
  so the gradient has factor 1 everywhere: ``grad = (M k - v) k^T`` (SPEC.md#memory).
- The delta rule's decay acts on the key side, ``M (alpha I - eta k k^T)`` (SPEC.md#memory).
- DGD uses the exact proximal step ``eta' = eta / (1 + eta ||k||^2)`` for any key norm (SPEC.md#memory).
- Oja, Eq. (67) read as ``M_t = alpha M + eta v (k - M^T v)^T`` (SPEC.md#memory).
- Omega: one gate ``gamma_i`` per token (ATLAS's ``gamma_i^(t)`` does not depend on t here), the
  window is truncated at the sequence start, and the gradient inside a chunk is taken at the
  previous chunk's final state (SPEC.md#memory, SPEC.md#chunks).
- Read after write, ``y_t = M_t q_t`` (SPEC.md#chunks).

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# ---------------------------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------------------------


def check_inputs(q, k, v, eta, alpha, M0, gamma=None, need_gamma=False):
    """Validate shapes and dtypes; return (q, k, v, eta, alpha, M0, gamma) as arrays.

    ``alpha=None`` becomes ones (no retention decay). All arrays share one float dtype (float32 or
    float64; complex128 is accepted so that the complex-step gradient check can run the forward).
    Raises ValueError naming the argument and the expected shape.
    Public: the CPU port's rules check their inputs with it (fast/cpu/memory.py).
    """
    arrays = {"q": q, "k": k, "v": v, "eta": eta, "M0": M0}
    if alpha is not None:
        arrays["alpha"] = alpha
    if need_gamma:
        if gamma is None:
            raise ValueError("gamma: expected an array of shape (B, T), got None")
        arrays["gamma"] = gamma
    arrays = {name: np.asarray(x) for name, x in arrays.items()}
    ranks = {"q": 3, "k": 3, "v": 3, "eta": 2, "alpha": 2, "gamma": 2, "M0": 3}
    names = {"q": "(B, T, d_k)", "k": "(B, T, d_k)", "v": "(B, T, d_v)", "eta": "(B, T)",
             "alpha": "(B, T)", "gamma": "(B, T)", "M0": "(B, d_v, d_k)"}
    for name, x in arrays.items():
        if x.ndim != ranks[name]:
            raise ValueError(f"{name}: expected shape {names[name]}, got rank {x.ndim} shape {x.shape}")
        if not np.issubdtype(x.dtype, np.inexact):
            raise ValueError(f"{name}: expected a float32/float64 array of shape {names[name]}, got dtype {x.dtype}")
    k_arr = arrays["k"]
    B, T, d_k = k_arr.shape
    d_v = arrays["v"].shape[2]
    expected = {"q": (B, T, d_k), "k": (B, T, d_k), "v": (B, T, d_v), "eta": (B, T), "alpha": (B, T),
                "gamma": (B, T), "M0": (B, d_v, d_k)}
    for name, x in arrays.items():
        if x.shape != expected[name]:
            raise ValueError(f"{name}: expected shape {names[name]} = {expected[name]}, got {x.shape}")
    dtype = k_arr.dtype
    for name, x in arrays.items():
        if x.dtype != dtype:
            raise ValueError(f"{name}: expected dtype {dtype} (the dtype of k), shape {names[name]}, got {x.dtype}")
    alpha_arr = arrays["alpha"] if alpha is not None else np.ones((B, T), dtype=dtype)
    return (arrays["q"], k_arr, arrays["v"], arrays["eta"], alpha_arr, arrays["M0"], arrays.get("gamma"))


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def _chunks(T, chunk_size):
    """[(start, end), ...]: consecutive chunks of ``chunk_size`` tokens; the last may be shorter."""
    return [(s, min(s + chunk_size, T)) for s in range(0, T, chunk_size)]


def state_grad(dM_T, cache):
    """The upstream gradient w.r.t. M_T, zeros when None.
    Public: the CPU port uses it (fast/cpu/memory.py).
    """
    if dM_T is None:
        return np.zeros_like(cache["M0"])
    dM_T = np.asarray(dM_T)
    if dM_T.shape != cache["M0"].shape:
        raise ValueError(f"dM_T: expected shape (B, d_v, d_k) = {cache['M0'].shape}, got {dM_T.shape}")
    return dM_T


def check_dy(dy, cache):
    """dy as an array of forward's output shape (B, T, d_v), else ValueError. Public: the CPU port uses it."""
    dy = np.asarray(dy)
    if dy.shape != cache["v"].shape:
        raise ValueError(f"dy: expected shape (B, T, d_v) = {cache['v'].shape}, got {dy.shape}")
    return dy


def input_grads(cache, **grads):
    """The gradient dict, keyed like forward's inputs; no alpha gradient when alpha was None.
    Public: the CPU port uses it (fast/cpu/memory.py).
    """
    if not cache["has_alpha"]:
        grads.pop("alpha")
    return grads


# ---------------------------------------------------------------------------------------------
# Hebbian / linear attention: M_t = alpha_t M_{t-1} + eta_t v_t k_t^T, y_t = M_t q_t.
# ---------------------------------------------------------------------------------------------


def hebbian_forward(q, k, v, eta, alpha, M0):
    """Hebbian rule with retention (Eq. 64); alpha = eta = 1 is linear attention (Eqs. 14-18).

    Returns (y (B, T, d_v), M_T (B, d_v, d_k), cache).
    """
    has_alpha = alpha is not None
    q, k, v, eta, alpha, M0, _ = check_inputs(q, k, v, eta, alpha, M0)
    B, T, _ = k.shape
    states = np.empty((B, T + 1) + M0.shape[1:], dtype=M0.dtype)  # (B, T+1, d_v, d_k)
    states[:, 0] = M0
    y = np.empty_like(v)  # (B, T, d_v)
    for t in range(T):
        write = np.einsum("b,bv,bk->bvk", eta[:, t], v[:, t], k[:, t])  # eta v k^T: minus the inner gradient
        states[:, t + 1] = alpha[:, t, None, None] * states[:, t] + write  # Eq. (64)
        y[:, t] = np.einsum("bvk,bk->bv", states[:, t + 1], q[:, t])  # Eq. (15)
    cache = {"q": q, "k": k, "v": v, "eta": eta, "alpha": alpha, "M0": M0, "states": states,
             "has_alpha": has_alpha}
    return y, states[:, T].copy(), cache


def hebbian_backward(dy, dM_T, cache):
    """Gradients of hebbian_forward w.r.t. q, k, v, eta, alpha (if given) and M0."""
    dy = check_dy(dy, cache)
    q, k, v, eta, alpha, states = (cache[n] for n in ("q", "k", "v", "eta", "alpha", "states"))
    T = k.shape[1]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    deta, dalpha = np.zeros_like(eta), np.zeros_like(alpha)
    dM = np.array(state_grad(dM_T, cache), dtype=k.dtype)  # gradient w.r.t. M_t
    for t in reversed(range(T)):
        dM = dM + np.einsum("bv,bk->bvk", dy[:, t], q[:, t])
        dq[:, t] = np.einsum("bvk,bv->bk", states[:, t + 1], dy[:, t])
        dalpha[:, t] = np.einsum("bvk,bvk->b", dM, states[:, t])
        deta[:, t] = np.einsum("bv,bvk,bk->b", v[:, t], dM, k[:, t])
        dv[:, t] = eta[:, t, None] * np.einsum("bvk,bk->bv", dM, k[:, t])
        dk[:, t] = eta[:, t, None] * np.einsum("bvk,bv->bk", dM, v[:, t])
        dM = alpha[:, t, None, None] * dM
    return input_grads(cache, q=dq, k=dk, v=dv, eta=deta, alpha=dalpha, M0=dM)


# ---------------------------------------------------------------------------------------------
# Chunk-wise building blocks: the decay matrix and the chunk's read/write with matmuls.
# ---------------------------------------------------------------------------------------------


def _decay_matrix(a):
    """D[b, t, s] = prod_{j=s+1}^{t} a[b, j-1] for 0 <= s <= t <= n, else 0.

    Index 0 is the chunk-start state, index t >= 1 the state after the chunk's t-th token, so
    D[:, t, 0] decays the chunk-start state and D[:, t, s] a write made at token s. Products,
    no division, so alpha may be 0. a: (B, n) -> D: (B, n+1, n+1).
    """
    B, n = a.shape
    a_aug = np.concatenate([np.ones((B, 1), dtype=a.dtype), a], axis=1)  # (B, n+1), a_aug[j] = alpha_j
    idx = np.arange(n + 1)
    t_, s_, j_ = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    factor_in = (s_ < j_) & (j_ <= t_)  # (n+1, n+1, n+1): alpha_j enters D[t, s]
    D = np.prod(np.where(factor_in[None], a_aug[:, None, None, :], 1), axis=-1)  # (B, n+1, n+1)
    return D * (s_[..., 0] <= t_[..., 0])[None]


def _decay_matrix_backward(dD, D):
    """da[b, j-1] = sum_{t,s} D[t, j] dD[t, s] D[j-1, s] (the product rule on D[t, s]; j = 1..n)."""
    X = np.einsum("btj,bts->bjs", D, dD)  # (B, n+1, n+1)
    return np.einsum("bjs,bjs->bj", X[:, 1:, :], D[:, :-1, :])  # (B, n)


def _chunk_read_write(Mb, q, k, u, P, d0):
    """One chunk's reads and final state, given its writes as a weighted sum of u_i k_i^T.

    State after token t: M_t = d0[t] Mb + sum_i P[t, i] u_i k_i^T, so
      y_t   = d0[t] Mb q_t + sum_i P[t, i] (q_t . k_i) u_i       (a masked linear attention)
      M_end = d0[-1] Mb + sum_i P[-1, i] u_i k_i^T.
    Mb (B, d_v, d_k); q (B, n, d_k); k (B, m, d_k); u (B, m, d_v); P (B, n, m); d0 (B, n).
    """
    A = np.einsum("btk,bik->bti", q, k)  # (B, n, m)
    y = d0[:, :, None] * np.einsum("bvk,btk->btv", Mb, q) + np.einsum("bti,biv->btv", P * A, u)
    M_end = d0[:, -1, None, None] * Mb + np.einsum("bi,biv,bik->bvk", P[:, -1], u, k)
    return y, M_end


def _chunk_read_write_backward(dy, dM_end, Mb, q, k, u, P, d0):
    """Gradients of _chunk_read_write w.r.t. (Mb, q, k, u, P, d0)."""
    A = np.einsum("btk,bik->bti", q, k)  # (B, n, m)
    dS = np.einsum("btv,biv->bti", dy, u)  # gradient w.r.t. S = P * A
    dA, dP = dS * P, dS * A
    dP[:, -1] += np.einsum("biv,bvk,bik->bi", u, dM_end, k)
    dd0 = np.einsum("btv,bvk,btk->bt", dy, Mb, q)
    dd0[:, -1] += np.einsum("bvk,bvk->b", dM_end, Mb)
    dMb = np.einsum("bt,btv,btk->bvk", d0, dy, q) + d0[:, -1, None, None] * dM_end
    dq = d0[:, :, None] * np.einsum("btv,bvk->btk", dy, Mb) + np.einsum("bti,bik->btk", dA, k)
    dk = np.einsum("bti,btk->bik", dA, q) + np.einsum("bi,bvk,biv->bik", P[:, -1], dM_end, u)
    du = np.einsum("bti,btv->biv", P * A, dy) + np.einsum("bi,bvk,bik->biv", P[:, -1], dM_end, k)
    return dMb, dq, dk, du, dP, dd0


def hebbian_chunked_forward(q, k, v, eta, alpha, M0, chunk_size):
    """hebbian_forward computed chunk by chunk with matmuls (an exact rewrite, any chunk_size).

    Inside a chunk: M_t = D[t, 0] Mb + sum_{s<=t} D[t, s] eta_s v_s k_s^T (cumulative decays).
    """
    has_alpha = alpha is not None
    q, k, v, eta, alpha, M0, _ = check_inputs(q, k, v, eta, alpha, M0)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    y = np.empty_like(v)  # (B, T, d_v)
    M = M0
    starts = []
    for s0, e0 in _chunks(k.shape[1], chunk_size):
        starts.append(M)
        D = _decay_matrix(alpha[:, s0:e0])  # (B, n+1, n+1)
        P = D[:, 1:, 1:] * eta[:, None, s0:e0]  # (B, n, n): P[t, s] = D[t, s] eta_s, Eq. (64) unrolled
        y[:, s0:e0], M = _chunk_read_write(M, q[:, s0:e0], k[:, s0:e0], v[:, s0:e0], P, D[:, 1:, 0])
    cache = {"q": q, "k": k, "v": v, "eta": eta, "alpha": alpha, "M0": M0, "starts": starts,
             "chunk_size": chunk_size, "has_alpha": has_alpha}
    return y, M, cache


def hebbian_chunked_backward(dy, dM_T, cache):
    """Gradients of hebbian_chunked_forward (its own chunk-wise backward)."""
    dy = check_dy(dy, cache)
    q, k, v, eta, alpha = (cache[n] for n in ("q", "k", "v", "eta", "alpha"))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    deta, dalpha = np.zeros_like(eta), np.zeros_like(alpha)
    dM = np.array(state_grad(dM_T, cache), dtype=k.dtype)
    chunks = _chunks(k.shape[1], cache["chunk_size"])
    for (s0, e0), Mb in zip(reversed(chunks), reversed(cache["starts"]), strict=True):
        D = _decay_matrix(alpha[:, s0:e0])
        P = D[:, 1:, 1:] * eta[:, None, s0:e0]
        dM, dq[:, s0:e0], dk[:, s0:e0], dv[:, s0:e0], dP, dd0 = _chunk_read_write_backward(
            dy[:, s0:e0], dM, Mb, q[:, s0:e0], k[:, s0:e0], v[:, s0:e0], P, D[:, 1:, 0])
        deta[:, s0:e0] = np.einsum("bts,bts->bs", dP, D[:, 1:, 1:])
        dD = np.zeros_like(D)
        dD[:, 1:, 1:] = dP * eta[:, None, s0:e0]
        dD[:, 1:, 0] = dd0
        dalpha[:, s0:e0] = _decay_matrix_backward(dD, D)
    return input_grads(cache, q=dq, k=dk, v=dv, eta=deta, alpha=dalpha, M0=dM)


# ---------------------------------------------------------------------------------------------
# Delta rule: M_t = M_{t-1} (alpha_t I - eta_t k_t k_t^T) + eta_t v_t k_t^T.
# ---------------------------------------------------------------------------------------------


def delta_forward(q, k, v, eta, alpha, M0):
    """Delta rule (Eq. 65, decay on the key side; alpha = None means 1): one GD step with rate
    eta on 1/2 ||M k - v||^2 plus retention. Returns (y, M_T, cache)."""
    has_alpha = alpha is not None
    q, k, v, eta, alpha, M0, _ = check_inputs(q, k, v, eta, alpha, M0)
    B, T, _ = k.shape
    states = np.empty((B, T + 1) + M0.shape[1:], dtype=M0.dtype)  # (B, T+1, d_v, d_k)
    states[:, 0] = M0
    y = np.empty_like(v)
    for t in range(T):
        M = states[:, t]
        residual = v[:, t] - np.einsum("bvk,bk->bv", M, k[:, t])  # v - M k = -inner_grad / k^T
        write = np.einsum("b,bv,bk->bvk", eta[:, t], residual, k[:, t])
        states[:, t + 1] = alpha[:, t, None, None] * M + write  # Eq. (65): M (alpha I - eta k k^T) + eta v k^T
        y[:, t] = np.einsum("bvk,bk->bv", states[:, t + 1], q[:, t])  # Eq. (15)
    cache = {"q": q, "k": k, "v": v, "eta": eta, "alpha": alpha, "M0": M0, "states": states,
             "has_alpha": has_alpha}
    return y, states[:, T].copy(), cache


def delta_backward(dy, dM_T, cache):
    """Gradients of delta_forward w.r.t. q, k, v, eta, alpha (if given) and M0."""
    dy = check_dy(dy, cache)
    q, k, v, eta, alpha, states = (cache[n] for n in ("q", "k", "v", "eta", "alpha", "states"))
    T = k.shape[1]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    deta, dalpha = np.zeros_like(eta), np.zeros_like(alpha)
    dM = np.array(state_grad(dM_T, cache), dtype=k.dtype)
    for t in reversed(range(T)):
        M = states[:, t]
        dM = dM + np.einsum("bv,bk->bvk", dy[:, t], q[:, t])
        dq[:, t] = np.einsum("bvk,bv->bk", states[:, t + 1], dy[:, t])
        residual = v[:, t] - np.einsum("bvk,bk->bv", M, k[:, t])  # r = v - M k
        dMk = np.einsum("bvk,bk->bv", dM, k[:, t])  # (B, d_v)
        dalpha[:, t] = np.einsum("bvk,bvk->b", dM, M)
        deta[:, t] = np.einsum("bv,bv->b", residual, dMk)
        dres = eta[:, t, None] * dMk  # gradient w.r.t. r
        dv[:, t] = dres
        dk[:, t] = eta[:, t, None] * np.einsum("bvk,bv->bk", dM, residual) - np.einsum("bvk,bv->bk", M, dres)
        dM = alpha[:, t, None, None] * dM - np.einsum("bv,bk->bvk", dres, k[:, t])
    return input_grads(cache, q=dq, k=dk, v=dv, eta=deta, alpha=dalpha, M0=dM)


def _solve_unit_lower(L, R):
    """X with (I + L) X = R, L strictly lower triangular (B, n, n), R (B, n, d): forward substitution."""
    X = np.empty_like(R)
    for t in range(R.shape[1]):
        X[:, t] = R[:, t] - np.einsum("bs,bsd->bd", L[:, t, :t], X[:, :t])
    return X


def _solve_unit_upper_transposed(L, R):
    """X with (I + L)^T X = R, L strictly lower triangular: back substitution."""
    X = np.empty_like(R)
    n = R.shape[1]
    for t in reversed(range(n)):
        X[:, t] = R[:, t] - np.einsum("bs,bsd->bd", L[:, t + 1:, t], X[:, t + 1:])
    return X


def _delta_chunk_system(Mb, k, v, beta, D):
    """The UT-transform system of one chunk: (I + L) W = R, returning (L, R, W).

    With W_t = beta_t (v_t - M_{t-1} k_t) the chunk's writes, M_{t-1} = D[t, 0] Mb
    + sum_{s<t} D[t, s+1] W_s k_s^T, so
      W_t + beta_t sum_{s<t} D[t, s+1] (k_t . k_s) W_s = beta_t (v_t - D[t, 0] Mb k_t).
    """
    E = D[:, :-1, 1:]  # (B, n, n): E[t, s] = D[t, s+1], strictly lower
    L = beta[:, :, None] * E * np.einsum("btk,bsk->bts", k, k)  # (B, n, n)
    R = beta[:, :, None] * (v - D[:, :-1, 0, None] * np.einsum("bvk,btk->btv", Mb, k))  # (B, n, d_v)
    return L, R, _solve_unit_lower(L, R)


def delta_chunked_forward(q, k, v, eta, alpha, M0, chunk_size):
    """delta_forward computed chunk by chunk: the WY / UT-transform form (exact, any chunk_size).

    Per chunk: solve the unit lower-triangular system (I + L) W = R for the writes W, then read
    and write with matmuls as for Hebbian with values W and weights D[t, s].
    """
    has_alpha = alpha is not None
    q, k, v, eta, alpha, M0, _ = check_inputs(q, k, v, eta, alpha, M0)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    y = np.empty_like(v)
    M = M0
    starts = []
    for s0, e0 in _chunks(k.shape[1], chunk_size):
        starts.append(M)
        D = _decay_matrix(alpha[:, s0:e0])  # (B, n+1, n+1)
        _, _, W = _delta_chunk_system(M, k[:, s0:e0], v[:, s0:e0], eta[:, s0:e0], D)  # (B, n, d_v)
        y[:, s0:e0], M = _chunk_read_write(M, q[:, s0:e0], k[:, s0:e0], W, D[:, 1:, 1:], D[:, 1:, 0])
    cache = {"q": q, "k": k, "v": v, "eta": eta, "alpha": alpha, "M0": M0, "starts": starts,
             "chunk_size": chunk_size, "has_alpha": has_alpha}
    return y, M, cache


def delta_chunked_backward(dy, dM_T, cache):
    """Gradients of delta_chunked_forward (its own chunk-wise backward, through the UT solve)."""
    dy = check_dy(dy, cache)
    q, k, v, eta, alpha = (cache[n] for n in ("q", "k", "v", "eta", "alpha"))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    deta, dalpha = np.zeros_like(eta), np.zeros_like(alpha)
    dM = np.array(state_grad(dM_T, cache), dtype=k.dtype)
    chunks = _chunks(k.shape[1], cache["chunk_size"])
    for (s0, e0), Mb in zip(reversed(chunks), reversed(cache["starts"]), strict=True):
        qc, kc, vc, beta = q[:, s0:e0], k[:, s0:e0], v[:, s0:e0], eta[:, s0:e0]
        D = _decay_matrix(alpha[:, s0:e0])
        L, R, W = _delta_chunk_system(Mb, kc, vc, beta, D)
        dMb, dqc, dkc, dW, dDtok, dd0 = _chunk_read_write_backward(
            dy[:, s0:e0], dM, Mb, qc, kc, W, D[:, 1:, 1:], D[:, 1:, 0])
        # Through (I + L) W = R: dR = (I + L)^{-T} dW, dL = -dR W^T (strictly lower part).
        dR = _solve_unit_upper_transposed(L, dW)
        n = kc.shape[1]
        dL = -np.einsum("btv,bsv->bts", dR, W) * np.tri(n, n, -1, dtype=bool)[None]
        # L = beta_t E[t, s] (k_t . k_s)
        E = D[:, :-1, 1:]
        KK = np.einsum("btk,bsk->bts", kc, kc)
        dbeta = np.einsum("bts,bts,bts->bt", dL, E, KK)
        dE = dL * beta[:, :, None] * KK
        dKK = dL * beta[:, :, None] * E
        dkc = dkc + np.einsum("bts,bsk->btk", dKK + np.swapaxes(dKK, 1, 2), kc)
        # R = beta_t (v_t - c_t Mb k_t), c_t = D[t, 0] (decay of Mb before token t)
        c = D[:, :-1, 0]  # (B, n)
        Mbk = np.einsum("bvk,btk->btv", Mb, kc)  # (B, n, d_v)
        dbeta += np.einsum("btv,btv->bt", dR, vc - c[:, :, None] * Mbk)
        dX = -beta[:, :, None] * dR  # gradient w.r.t. X_t = c_t Mb k_t
        dv[:, s0:e0] = beta[:, :, None] * dR
        dc = np.einsum("btv,btv->bt", dX, Mbk)
        dkc = dkc + c[:, :, None] * np.einsum("btv,bvk->btk", dX, Mb)
        dMb = dMb + np.einsum("bt,btv,btk->bvk", c, dX, kc)
        # Collect the decay matrix's gradient and send it to alpha.
        dD = np.zeros_like(D)
        dD[:, 1:, 1:] += dDtok
        dD[:, 1:, 0] += dd0
        dD[:, :-1, 1:] += dE
        dD[:, :-1, 0] += dc
        dalpha[:, s0:e0] = _decay_matrix_backward(dD, D)
        dq[:, s0:e0], dk[:, s0:e0], deta[:, s0:e0] = dqc, dkc, dbeta
        dM = dMb
    return input_grads(cache, q=dq, k=dk, v=dv, eta=deta, alpha=dalpha, M0=dM)


# ---------------------------------------------------------------------------------------------
# Delta Gradient Descent: the delta rule with the exact proximal step eta' = eta / (1 + eta ||k||^2).
# ---------------------------------------------------------------------------------------------


def prox_step_size(eta, k):
    """eta'_t = eta_t / (1 + eta_t ||k_t||^2): the Sherman-Morrison step of Eqs. (56)-(57). (B, T) (any
    leading axes: the self-modifying layer's are (B, H, T))."""
    return eta / (1 + eta * np.einsum("...k,...k->...", k, k))  # Eq. (57), any key norm


def prox_step_size_backward(deta_prox, eta, k):
    """(deta, dk) from the gradient w.r.t. eta' (d eta'/d eta = (eta'/eta)^2, d eta'/dk = -2 eta'^2 k).
    Public: the CPU port's DGD and reference/selfmod.py use it.
    """
    denom = 1 + eta * np.einsum("...k,...k->...", k, k)
    eta_prox = eta / denom
    return deta_prox / denom**2, -2 * (deta_prox * eta_prox**2)[..., None] * k




def dgd_forward(q, k, v, eta, alpha, M0):
    """Delta Gradient Descent (Eqs. 56-57): M_t = M_{t-1}(alpha_t I - eta'_t k k^T) + eta'_t v k^T.

    With alpha = 1, M_t is the exact minimiser of 1/2 ||M k_t - v_t||^2 + 1/(2 eta_t) ||M - M_{t-1}||^2.
    """
    q, k, v, eta, _, M0, _ = check_inputs(q, k, v, eta, alpha, M0)
    y, M_T, cache = delta_forward(q, k, v, prox_step_size(eta, k), alpha, M0)
    cache["eta_raw"] = eta
    return y, M_T, cache


def dgd_backward(dy, dM_T, cache):
    """Gradients of dgd_forward: delta_backward, then through eta' = eta / (1 + eta ||k||^2)."""
    grads = delta_backward(dy, dM_T, cache)
    deta, dk_prox = prox_step_size_backward(grads["eta"], cache["eta_raw"], cache["k"])
    grads["eta"], grads["k"] = deta, grads["k"] + dk_prox
    return grads


def dgd_chunked_forward(q, k, v, eta, alpha, M0, chunk_size):
    """dgd_forward in the UT-transform chunk form (exact, any chunk_size)."""
    q, k, v, eta, _, M0, _ = check_inputs(q, k, v, eta, alpha, M0)
    y, M_T, cache = delta_chunked_forward(q, k, v, prox_step_size(eta, k), alpha, M0, chunk_size)
    cache["eta_raw"] = eta
    return y, M_T, cache


def dgd_chunked_backward(dy, dM_T, cache):
    """Gradients of dgd_chunked_forward: delta_chunked_backward, then through eta'."""
    grads = delta_chunked_backward(dy, dM_T, cache)
    deta, dk_prox = prox_step_size_backward(grads["eta"], cache["eta_raw"], cache["k"])
    grads["eta"], grads["k"] = deta, grads["k"] + dk_prox
    return grads


# ---------------------------------------------------------------------------------------------
# Oja's rule: M_t = alpha_t M_{t-1} + eta_t v_t (k_t - M_{t-1}^T v_t)^T (token loop only).
# ---------------------------------------------------------------------------------------------


def oja_forward(q, k, v, eta, alpha, M0):
    """Oja's rule (Eqs. 66-67) read as M_t = alpha M + eta v (k - M^T v)^T. Returns (y, M_T, cache)."""
    has_alpha = alpha is not None
    q, k, v, eta, alpha, M0, _ = check_inputs(q, k, v, eta, alpha, M0)
    B, T, _ = k.shape
    states = np.empty((B, T + 1) + M0.shape[1:], dtype=M0.dtype)
    states[:, 0] = M0
    y = np.empty_like(v)
    for t in range(T):
        M = states[:, t]
        back = np.einsum("bvk,bv->bk", M, v[:, t])  # M^T v, (B, d_k)
        write = np.einsum("b,bv,bk->bvk", eta[:, t], v[:, t], k[:, t] - back)
        states[:, t + 1] = alpha[:, t, None, None] * M + write  # Eq. (67)
        y[:, t] = np.einsum("bvk,bk->bv", states[:, t + 1], q[:, t])  # Eq. (15)
    cache = {"q": q, "k": k, "v": v, "eta": eta, "alpha": alpha, "M0": M0, "states": states,
             "has_alpha": has_alpha}
    return y, states[:, T].copy(), cache


def oja_backward(dy, dM_T, cache):
    """Gradients of oja_forward w.r.t. q, k, v, eta, alpha (if given) and M0."""
    dy = check_dy(dy, cache)
    q, k, v, eta, alpha, states = (cache[n] for n in ("q", "k", "v", "eta", "alpha", "states"))
    T = k.shape[1]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    deta, dalpha = np.zeros_like(eta), np.zeros_like(alpha)
    dM = np.array(state_grad(dM_T, cache), dtype=k.dtype)
    for t in reversed(range(T)):
        M, vt, et = states[:, t], v[:, t], eta[:, t]
        dM = dM + np.einsum("bv,bk->bvk", dy[:, t], q[:, t])
        dq[:, t] = np.einsum("bvk,bv->bk", states[:, t + 1], dy[:, t])
        diff = k[:, t] - np.einsum("bvk,bv->bk", M, vt)  # k - M^T v
        dMv = np.einsum("bvk,bv->bk", dM, vt)  # dM^T v, (B, d_k)
        dalpha[:, t] = np.einsum("bvk,bvk->b", dM, M)
        deta[:, t] = np.einsum("bk,bk->b", dMv, diff)
        dk[:, t] = et[:, None] * dMv
        dback = -et[:, None] * dMv  # gradient w.r.t. M^T v
        dv[:, t] = et[:, None] * np.einsum("bvk,bk->bv", dM, diff) + np.einsum("bvk,bk->bv", M, dback)
        dM = alpha[:, t, None, None] * dM + np.einsum("bv,bk->bvk", vt, dback)
    return input_grads(cache, q=dq, k=dk, v=dv, eta=deta, alpha=dalpha, M0=dM)


# ---------------------------------------------------------------------------------------------
# Omega rule: M_t = alpha_t M_{t-1} - eta_t sum_{i=t-c+1}^{t} gamma_i (M_b k_i - v_i) k_i^T,
# with M_b the state at the end of the previous chunk (M_b = M_{t-1} when chunk_size = 1).
# ---------------------------------------------------------------------------------------------


def _window(t, window):
    return max(0, t - window + 1), t + 1


def omega_inner_grad(Mb, k, v, gamma):
    """sum_i gamma_i grad_M 1/2 ||M k_i - v_i||^2 at M = Mb, over the given tokens. (B, d_v, d_k)."""
    residual = np.einsum("bvk,bik->biv", Mb, k) - v  # (B, w, d_v)
    return np.einsum("bi,biv,bik->bvk", gamma, residual, k)


def omega_forward(q, k, v, eta, alpha, gamma, M0, window, chunk_size=1):
    """Omega rule (Eq. 68, ATLAS Eq. 9) with window c = ``window``, token by token.

    ``chunk_size = C`` applies ATLAS's chunk definition (every inner gradient in a chunk at the
    previous chunk's final state) one token at a time: the oracle for omega_chunked_forward.
    C = 1 is the fully recurrent rule. Returns (y, M_T, cache).
    """
    has_alpha = alpha is not None
    q, k, v, eta, alpha, M0, gamma = check_inputs(q, k, v, eta, alpha, M0, gamma, need_gamma=True)
    window = _check_positive_int("window", window)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    B, T, _ = k.shape
    states = np.empty((B, T + 1) + M0.shape[1:], dtype=M0.dtype)
    states[:, 0] = M0
    y = np.empty_like(v)
    for s0, e0 in _chunks(T, chunk_size):
        Mb = states[:, s0]
        for t in range(s0, e0):
            lo, hi = _window(t, window)
            grad = omega_inner_grad(Mb, k[:, lo:hi], v[:, lo:hi], gamma[:, lo:hi])
            states[:, t + 1] = alpha[:, t, None, None] * states[:, t] - eta[:, t, None, None] * grad  # Eq. (68)
            y[:, t] = np.einsum("bvk,bk->bv", states[:, t + 1], q[:, t])  # Eq. (15)
    cache = {"q": q, "k": k, "v": v, "eta": eta, "alpha": alpha, "gamma": gamma, "M0": M0,
             "states": states, "window": window, "chunk_size": chunk_size, "has_alpha": has_alpha}
    return y, states[:, T].copy(), cache


def omega_backward(dy, dM_T, cache):
    """Gradients of omega_forward w.r.t. q, k, v, eta, alpha (if given), gamma and M0."""
    dy = check_dy(dy, cache)
    q, k, v, eta, alpha, gamma, states = (cache[n] for n in ("q", "k", "v", "eta", "alpha", "gamma", "states"))
    window = cache["window"]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    deta, dalpha, dgamma = np.zeros_like(eta), np.zeros_like(alpha), np.zeros_like(gamma)
    dM = np.array(state_grad(dM_T, cache), dtype=k.dtype)
    for s0, e0 in reversed(_chunks(k.shape[1], cache["chunk_size"])):
        Mb = states[:, s0]
        dMb = np.zeros_like(dM)
        for t in reversed(range(s0, e0)):
            lo, hi = _window(t, window)
            kw, vw, gw = k[:, lo:hi], v[:, lo:hi], gamma[:, lo:hi]
            dM = dM + np.einsum("bv,bk->bvk", dy[:, t], q[:, t])
            dq[:, t] = np.einsum("bvk,bv->bk", states[:, t + 1], dy[:, t])
            residual = np.einsum("bvk,bik->biv", Mb, kw) - vw  # (B, w, d_v)
            grad = np.einsum("bi,biv,bik->bvk", gw, residual, kw)
            dalpha[:, t] = np.einsum("bvk,bvk->b", dM, states[:, t])
            deta[:, t] = -np.einsum("bvk,bvk->b", dM, grad)
            dgrad = -eta[:, t, None, None] * dM
            dgamma[:, lo:hi] += np.einsum("biv,bvk,bik->bi", residual, dgrad, kw)
            dres = gw[:, :, None] * np.einsum("bvk,bik->biv", dgrad, kw)
            dk[:, lo:hi] += gw[:, :, None] * np.einsum("bvk,biv->bik", dgrad, residual)
            dk[:, lo:hi] += np.einsum("bvk,biv->bik", Mb, dres)
            dv[:, lo:hi] -= dres
            dMb += np.einsum("biv,bik->bvk", dres, kw)
            dM = alpha[:, t, None, None] * dM
        dM = dM + dMb
    return input_grads(cache, q=dq, k=dk, v=dv, eta=deta, alpha=dalpha, gamma=dgamma, M0=dM)


def _omega_chunk_weights(D, eta, n, lo, s0, window):
    """P[t, i] = sum_s D[t, s] eta_s Win[s, i]: weight of u_i k_i^T in the state after token t.

    Win[s, i] = 1 when token lo + i lies in token s0 + s's window (ATLAS Eq. 16's sliding mask).
    Returns (P (B, n, m), Win (n, m)), m = s0 + n - lo tokens from lo.
    """
    tok = s0 + np.arange(n)[:, None]
    src = lo + np.arange(s0 + n - lo)[None, :]
    win = (src <= tok) & (src > tok - window)  # (n, m)
    P = np.einsum("bts,bs,si->bti", D[:, 1:, 1:], eta, win.astype(D.dtype))
    return P, win.astype(D.dtype)


def omega_chunked_forward(q, k, v, eta, alpha, gamma, M0, window, chunk_size):
    """The chunk-parallel Omega rule (ATLAS Eqs. 15-16): per chunk, the inner gradients of every
    window token at the chunk-start state Mb in one matmul, then decayed, windowed sums.

    Same function as omega_forward(..., window, chunk_size). Inside a chunk, with
    u_i = -gamma_i (Mb k_i - v_i): M_t = D[t, 0] Mb + sum_i P[t, i] u_i k_i^T.
    """
    has_alpha = alpha is not None
    q, k, v, eta, alpha, M0, gamma = check_inputs(q, k, v, eta, alpha, M0, gamma, need_gamma=True)
    window = _check_positive_int("window", window)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    y = np.empty_like(v)
    M = M0
    starts = []
    for s0, e0 in _chunks(k.shape[1], chunk_size):
        starts.append(M)
        lo = max(0, s0 - window + 1)  # the window reaches back into earlier chunks
        D = _decay_matrix(alpha[:, s0:e0])
        P, _ = _omega_chunk_weights(D, eta[:, s0:e0], e0 - s0, lo, s0, window)
        residual = np.einsum("bvk,bik->biv", M, k[:, lo:e0]) - v[:, lo:e0]  # (B, m, d_v), at Mb
        u = -gamma[:, lo:e0, None] * residual  # minus the gated inner gradient's value side
        y[:, s0:e0], M = _chunk_read_write(M, q[:, s0:e0], k[:, lo:e0], u, P, D[:, 1:, 0])  # Eq. (68)
    cache = {"q": q, "k": k, "v": v, "eta": eta, "alpha": alpha, "gamma": gamma, "M0": M0,
             "starts": starts, "window": window, "chunk_size": chunk_size, "has_alpha": has_alpha}
    return y, M, cache


def omega_chunked_backward(dy, dM_T, cache):
    """Gradients of omega_chunked_forward (its own chunk-wise backward)."""
    dy = check_dy(dy, cache)
    q, k, v, eta, alpha, gamma = (cache[n] for n in ("q", "k", "v", "eta", "alpha", "gamma"))
    window = cache["window"]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    deta, dalpha, dgamma = np.zeros_like(eta), np.zeros_like(alpha), np.zeros_like(gamma)
    dM = np.array(state_grad(dM_T, cache), dtype=k.dtype)
    chunks = _chunks(k.shape[1], cache["chunk_size"])
    for (s0, e0), Mb in zip(reversed(chunks), reversed(cache["starts"]), strict=True):
        lo = max(0, s0 - window + 1)
        D = _decay_matrix(alpha[:, s0:e0])
        P, win = _omega_chunk_weights(D, eta[:, s0:e0], e0 - s0, lo, s0, window)
        kw, gw = k[:, lo:e0], gamma[:, lo:e0]
        residual = np.einsum("bvk,bik->biv", Mb, kw) - v[:, lo:e0]
        u = -gw[:, :, None] * residual
        dMb, dqc, dkw, du, dP, dd0 = _chunk_read_write_backward(
            dy[:, s0:e0], dM, Mb, q[:, s0:e0], kw, u, P, D[:, 1:, 0])
        dq[:, s0:e0] = dqc
        # P = Dtok diag(eta) Win
        dPW = np.einsum("bti,si->bts", dP, win)  # (B, n, n)
        deta[:, s0:e0] += np.einsum("bts,bts->bs", dPW, D[:, 1:, 1:])
        dD = np.zeros_like(D)
        dD[:, 1:, 1:] = dPW * eta[:, None, s0:e0]
        dD[:, 1:, 0] = dd0
        dalpha[:, s0:e0] += _decay_matrix_backward(dD, D)
        # u = -gamma (Mb k - v)
        dgamma[:, lo:e0] -= np.einsum("biv,biv->bi", du, residual)
        dres = -gw[:, :, None] * du
        dk[:, lo:e0] += dkw + np.einsum("biv,bvk->bik", dres, Mb)
        dv[:, lo:e0] -= dres
        dM = dMb + np.einsum("biv,bik->bvk", dres, kw)
    return input_grads(cache, q=dq, k=dk, v=dv, eta=deta, alpha=dalpha, gamma=dgamma, M0=dM)


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------

RULES: dict[str, tuple[Callable, Callable]] = {
    "hebbian": (hebbian_forward, hebbian_backward),
    "hebbian_chunked": (hebbian_chunked_forward, hebbian_chunked_backward),
    "delta": (delta_forward, delta_backward),
    "delta_chunked": (delta_chunked_forward, delta_chunked_backward),
    "dgd": (dgd_forward, dgd_backward),
    "dgd_chunked": (dgd_chunked_forward, dgd_chunked_backward),
    "oja": (oja_forward, oja_backward),
    "omega": (omega_forward, omega_backward),
    "omega_chunked": (omega_chunked_forward, omega_chunked_backward),
}
"""name -> (forward, backward). Chunked forms take ``chunk_size``; Omega takes ``gamma`` (after
alpha) and ``window`` (and ``chunk_size``, default 1, for its token loop)."""
