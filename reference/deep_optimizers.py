"""The paper's new optimizers as associative memories: preconditioned, delta and deep momentum,
Muon (momentum through Newton-Schulz) and M3 (multi-scale momentum Muon).

Paper: §4.2-§4.3 and §7.2, Eqs. (42)-(50), (75), Algorithm 1, arXiv 2512.24695v1.
SPEC: SPEC.md#optimizers.

Part of ``reference/optimizers.py`` (its docstring has the interface, the symbols and the
decisions; ``optimizers.make`` is the way in, and every name here is re-exported there). The
input checks, the flat-state helpers and the classic optimizers (Muon's AdamW for parameters
with fewer than 2 dims) come from reference/classic_optimizers.py.

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

import zlib

import numpy as np

from .classic_optimizers import (
    _adam_update,
    _arrays,
    _check_grads,
    _check_params,
    _check_state,
    _pack,
    _slots,
    _zeros,
    as_matrix,
    dot_inner_grad,
)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The Muon quintic (a, b, c): X <- a X + b (X X^T) X + c (X X^T)^2 X (SPEC.md#optimizers)."""


def newton_schulz(G: np.ndarray, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7) -> np.ndarray:
    """Approximate orthogonalisation ``U V^T`` of ``G = U S V^T`` by the Muon quintic.

    Paper: Eq. (42)-(44) name the map; the coefficients are Muon's (SPEC.md#optimizers).
    ``X = G / max(||G||_F, eps)`` (transposed when tall, so ``X X^T`` is the small Gram matrix),
    then ``steps`` times ``X <- a X + (b A + c A A) X`` with ``A = X X^T``. Computes in G's dtype;
    ``newton_schulz(0) = 0``; odd in G and invariant to G's scale (up to eps).
    """
    if G.ndim != 2:
        raise ValueError(f"newton_schulz: G must be a matrix (d_out, d_in), got shape {G.shape}")
    a, b, c = coefficients
    tall = G.shape[0] > G.shape[1]
    X = G.T if tall else G
    X = X / max(float(np.linalg.norm(X)), eps)  # Frobenius norm, so the spectral norm is <= 1
    for _ in range(steps):
        A = X @ X.T  # (n, n), n = min(d_out, d_in)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


# ---------------------------------------------------------------------------------------------
# Inner objectives of the delta and deep momentum memories and their gradients (the pieces of a
# forward that are themselves gradient steps; each is gradient-checked in reference/cases/optimizers.py).
# ---------------------------------------------------------------------------------------------


def delta_inner_loss(m, G, PG, c):
    """L2-regression objective of delta momentum (Eq. 48), matrix views: ``1/2 ||m G^T + c P||^2``
    written through its gradient-relevant part, ``1/2 ||m G^T||^2 + c <m, P G>`` (the two differ by
    a constant in m). Its GD step with step ``zeta`` and ``c = eta / zeta`` is Eq. (49)."""
    mG = m @ G.T  # (d_out, d_out)
    return 0.5 * np.sum(mG * mG) + c * np.sum(m * PG)


def delta_inner_grad(m, G, PG, c):
    """``d/dm [1/2 ||m G^T||^2 + c <m, P G>] = (m G^T) G + c P G``."""
    return (m @ G.T) @ G + c * PG


def _tanh(x):
    return np.tanh(x)


def _dtanh(x):
    t = np.tanh(x)
    return 1 - t * t


def deep_memory_read(M, W1, W2):
    """The deep momentum memory ``m(x) = M x + W1 tanh(W2 x)`` read at the unit keys ``e_j``:
    ``Delta W[:, j] = m(e_j)``, i.e. ``Delta W = M + W1 tanh(W2)`` (SPEC.md#optimizers). For a
    linear memory (no hidden units) this is M itself, the momentum of Eq. (33)."""
    if W1 is None:
        return M
    return M + W1 @ _tanh(W2)  # (d_out, d_in)


def deep_inner_loss(M, W1, W2, G):
    """Eq. (50)'s inner objective ``<m(G^T), I> = sum_r <m(g_r), e_r>``: the memory maps each
    gradient row g_r (key) towards the unit vector e_r (value 1); matrix views."""
    out = G @ M.T  # (d_out rows r, d_out outputs): row r is m_lin(g_r)
    if W1 is not None:
        out = out + _tanh(G @ W2.T) @ W1.T  # (d_out, h) @ (h, d_out)
    return np.trace(out)


def deep_inner_grad(M, W1, W2, G):
    """Hand-written gradient of ``deep_inner_loss`` w.r.t. (M, W1, W2), with ``Z = G W2^T``:
    ``dM = G``, ``dW1 = tanh(Z)``, ``dW2 = (tanh'(Z) * W1)^T G``. Returns (dM, dW1, dW2)."""
    dM = G  # (d_out, d_in)
    if W1 is None:
        return dM, None, None
    Z = G @ W2.T  # (d_out, h)
    dW1 = _tanh(Z)  # (d_out, h)
    dW2 = (_dtanh(Z) * W1).T @ G  # (h, d_in)
    return dM, dW1, dW2


# ---------------------------------------------------------------------------------------------
# preconditioned_momentum, delta_momentum, deep_momentum.
# ---------------------------------------------------------------------------------------------


def _precondition(hp, g, v, t):
    """The value ``P_i G_i`` of Eqs. (46)-(49) and the new second-moment memory.

    ``identity``: P = I. ``rms``: the diagonal ``P = diag(1 / (sqrt(v_hat) + eps))`` acting on vec(G),
    ``v <- beta2 v + (1 - beta2) G^2``, ``v_hat = v / (1 - beta2^t)`` (SPEC.md#optimizers).
    """
    if hp["preconditioner"] == "identity":
        return g, v
    v = hp["beta2"] * v + (1 - hp["beta2"]) * g * g
    v_hat = v / (1 - hp["beta2"] ** t)
    return g / (np.sqrt(v_hat) + hp["eps"]), v


def _precond_momentum_init(hp, params):
    _check_params(params)
    return _pack(0, m=_zeros(params), v=_zeros(params))


def _precond_momentum_update(hp, params, grads, state):
    """Preconditioned momentum (Eqs. 46-47; retention as the text says)::

        m <- alpha m - eta d/dm <m G^T, P> = alpha m - eta P G     # Eq. (47)
        W <- W + m

    State slots ``m`` and ``v`` (the rms preconditioner's memory; zeros for ``identity``).
    """
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {"m": params, "v": params})
    t = state["step"] + 1
    new, m_new, v_new = {}, {}, {}
    for k, W in params.items():
        PG, v_new[k] = _precondition(hp, grads[k], state[f"v/{k}"], t)
        m = hp["momentum"] * state[f"m/{k}"] - hp["lr"] * dot_inner_grad(state[f"m/{k}"], grads[k], PG)  # Eq. (47)
        m_new[k] = m
        new[k] = W + m
    return _arrays(new, params), _pack(t, m=m_new, v=v_new)


def _delta_momentum_init(hp, params):
    _check_params(params)
    return _pack(0, m=_zeros(params), v=_zeros(params))


def _delta_momentum_update(hp, params, grads, state):
    """Delta momentum: momentum with the L2-regression objective (Eqs. 48-49), matrix views::

        zeta = delta / (||G||_F^2 + eps)     (normalize=True; printed form: zeta = delta)
        m <- m (alpha I - zeta G^T G) - eta P G                      # Eq. (49)
        W <- W + m

    This is ``alpha m - zeta * delta_inner_grad(m, G, P G, c)`` with ``c = eta / zeta``: one GD step
    of size zeta on Eq. (48)'s ``1/2 ||m G^T + c P||^2`` plus the retention of Eq. (33). With
    ``delta = 0`` it is ``momentum`` (``preconditioned_momentum`` for another P). The decay
    ``zeta G^T G`` removes the part of the momentum along the current gradient's row space.
    State slots ``m`` and ``v`` (as preconditioned_momentum).
    """
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {"m": params, "v": params})
    t = state["step"] + 1
    alpha, eta, delta = hp["momentum"], hp["lr"], hp["delta"]
    new, m_new, v_new = {}, {}, {}
    for k, W in params.items():
        PG, v_new[k] = _precondition(hp, grads[k], state[f"v/{k}"], t)
        m = as_matrix(state[f"m/{k}"])  # (d_out, d_in)
        G = as_matrix(grads[k])  # (d_out, d_in)
        zeta = delta / (float(np.sum(G * G)) + hp["eps"]) if hp["normalize"] else delta
        decay = (m @ G.T) @ G  # m G^T G, (d_out, d_in)
        m = alpha * m - zeta * decay - eta * as_matrix(PG)  # Eq. (49)
        m_new[k] = m.reshape(W.shape)
        new[k] = W + m_new[k]
    return _arrays(new, params), _pack(t, m=m_new, v=v_new)


def _deep_momentum_init(hp, params):
    """Memory per parameter: M = 0 (d_out, d_in), W1 = 0 (d_out, h) (so the first read is 0, as
    momentum's), W2 ~ N(0, init_scale^2 / h) (h, d_in) drawn from seed and the parameter's name."""
    _check_params(params)
    Ms, W1s, W2s = {}, {}, {}
    h = hp["hidden"]
    for k, p in params.items():
        d_out, d_in = as_matrix(p).shape
        Ms[k] = np.zeros((d_out, d_in), dtype=p.dtype)
        if h:
            rng = np.random.default_rng([hp["seed"], zlib.crc32(k.encode())])
            W1s[k] = np.zeros((d_out, h), dtype=p.dtype)
            W2s[k] = (rng.standard_normal((h, d_in)) * (hp["init_scale"] / np.sqrt(h))).astype(p.dtype)
    if h:
        return _pack(0, M=Ms, W1=W1s, W2=W2s)
    return _pack(0, M=Ms)


def _deep_momentum_update(hp, params, grads, state):
    """Deep momentum gradient descent, DMGD (Eq. 50), on the matrix view of each parameter::

        m(x) = M x + W1 tanh(W2 x)                         memory (R^d_in -> R^d_out), shared by rows
        L2(m; G) = sum_r <m(g_r), e_r>                     inner objective (Eq. 50: <m(u^T), 1>)
        (M, W1, W2) <- alpha (M, W1, W2) - eta grad L2     # Eq. (50), deep_inner_grad
        W <- W + [m(e_1) ... m(e_d_in)] = W + M + W1 tanh(W2)

    With ``hidden = 0`` (a linear memory) this is ``momentum``: ``M <- alpha M - eta G``, W + M.
    State slots ``M``, ``W1``, ``W2`` (the last two only when hidden > 0).
    """
    _check_params(params)
    _check_grads(params, grads)
    h = hp["hidden"]
    slots = {"M": params, "W1": params, "W2": params} if h else {"M": params}
    for key in params:
        if f"M/{key}" in state and state[f"M/{key}"].shape != as_matrix(params[key]).shape:
            raise ValueError(f"state['M/{key}'] has shape {state[f'M/{key}'].shape}, expected {as_matrix(params[key]).shape}")
    _check_state(state, params, slots)
    alpha, eta = hp["momentum"], hp["lr"]
    new, Ms, W1s, W2s = {}, {}, {}, {}
    for k, W in params.items():
        G = as_matrix(grads[k])  # (d_out, d_in)
        M = state[f"M/{k}"]
        W1 = state[f"W1/{k}"] if h else None
        W2 = state[f"W2/{k}"] if h else None
        dM, dW1, dW2 = deep_inner_grad(M, W1, W2, G)
        Ms[k] = alpha * M - eta * dM  # Eq. (50)
        if h:
            W1s[k] = alpha * W1 - eta * dW1  # Eq. (50)
            W2s[k] = alpha * W2 - eta * dW2  # Eq. (50)
        read = deep_memory_read(Ms[k], W1s.get(k), W2s.get(k))  # m_{i+1} at the unit keys
        new[k] = W + read.reshape(W.shape)  # Eq. (50)
    if h:
        return _arrays(new, params), _pack(state["step"] + 1, M=Ms, W1=W1s, W2=W2s)
    return _arrays(new, params), _pack(state["step"] + 1, M=Ms)


# ---------------------------------------------------------------------------------------------
# muon and m3.
# ---------------------------------------------------------------------------------------------


def _muon_adjust_lr(lr, fn, shape):
    """torch.optim.Muon's learning-rate adjustment; ``None`` leaves lr as it is (the paper's)."""
    A, B = shape[0], int(np.prod(shape[1:]))
    if fn == "original":
        return lr * float(np.sqrt(max(1.0, A / B)))
    if fn == "match_rms_adamw":
        return lr * 0.2 * float(np.sqrt(max(A, B)))
    return lr


def _muon_init(hp, params):
    _check_params(params)
    mats = [k for k, p in params.items() if p.ndim >= 2]
    rest = [k for k, p in params.items() if p.ndim < 2]
    return _pack(0, m=_zeros(params), v=_zeros(params, rest)) if rest else _pack(0, m=_zeros(params, mats))


def _muon_update(hp, params, grads, state):
    """Muon (Eq. 42): momentum followed by Newton-Schulz, for parameters with >= 2 dims::

        B <- momentum B + G           (ema=True: B <- momentum B + (1 - momentum) G, torch's lerp)
        U  = B                        (nesterov=True: G + momentum B; ema: (1-momentum) G + momentum B)
        W <- W (1 - lr weight_decay) - adjust(lr) NewtonSchulz_k(U)       # Eq. (42)

    The paper's ``m = -lr B`` (Eq. 42 puts lr inside NS, where NS's scale invariance cancels it).
    Parameters with fewer than 2 dims (biases, gains) follow the usual Muon convention: AdamW with
    ``adamw_lr`` (default ``lr``), ``adamw_betas``, ``adamw_eps`` and the same ``weight_decay``.
    State slots ``m`` (B, or Adam's M~ for the AdamW parameters) and ``v`` (AdamW parameters only).
    """
    _check_params(params)
    _check_grads(params, grads)
    mats = {k: p for k, p in params.items() if p.ndim >= 2}
    rest = {k: p for k, p in params.items() if p.ndim < 2}
    _check_state(state, params, {"m": params, "v": rest})
    mu, lr, wd = hp["momentum"], hp["lr"], hp["weight_decay"]
    t = state["step"] + 1
    new, m_new, v_new = {}, {}, {}
    for k, W in mats.items():
        g = grads[k]
        B = state[f"m/{k}"]
        B = B + (1 - mu) * (g - B) if hp["ema"] else mu * B + g  # momentum memory, Eq. (42)
        if hp["nesterov"]:
            U = g + mu * (B - g) if hp["ema"] else g + mu * B
        else:
            U = B
        O = newton_schulz(as_matrix(U), hp["ns_steps"], hp["ns_coefficients"], hp["eps"]).reshape(W.shape)
        W = W * (1 - lr * wd) if wd else W
        new[k] = W - _muon_adjust_lr(lr, hp["adjust_lr_fn"], W.shape) * O  # Eq. (42)
        m_new[k] = B
    if rest:
        adam_hp = {"lr": lr if hp["adamw_lr"] is None else hp["adamw_lr"], "betas": hp["adamw_betas"],
                   "eps": hp["adamw_eps"], "weight_decay": wd, "form": "standard", "bias_correction": True}
        sub_state = _pack(state["step"], m=_slots(state, "m", rest), v=_slots(state, "v", rest))
        sub_new, sub_state = _adam_update(adam_hp, rest, {k: grads[k] for k in rest}, sub_state, decoupled=True)
        new.update(sub_new)
        m_new.update(_slots(sub_state, "m", rest))
        v_new.update(_slots(sub_state, "v", rest))
    new = {k: new[k] for k in params}  # keep the caller's key order
    return _arrays(new, params), _pack(t, m=m_new, v=v_new)


def _m3_init(hp, params):
    _check_params(params)
    return _pack(0, m1=_zeros(params), m2=_zeros(params), v=_zeros(params), gsum=_zeros(params), o2=_zeros(params))


def _m3_orthogonalise(hp, X):
    """Newton-Schulz on the matrix view of every parameter (SPEC.md#optimizers): for a vector,
    the (1, n) row, whose NS is its direction (up to the quintic's ~[0.7, 1.2] gain); an identity
    here would let sum(G) / sqrt(sum(G^2)) grow like sqrt(t), and M3 diverges on a quadratic."""
    return newton_schulz(as_matrix(X), hp["ns_steps"], NS_COEFFICIENTS, 1e-7).reshape(X.shape)


def _m3_update(hp, params, grads, state):
    """Multi-scale Momentum Muon, M3 (Algorithm 1; Eq. 75), per parameter, step t = 1, 2, ...::

        M1 <- M1 + beta1 G;  V <- V + beta2 G^2                   # Alg. 1 lines 7-8 (ema: EMAs)
        O1 = NS(M1)                                               # line 9
        W <- W - lr (O1 + alpha O2) / (sqrt(V) + eps)             # line 10
        if t % f == 0:  M2 <- M2 + beta3 sum_{s=t-f+1}^{t} G_s;  O2 = NS(M2)   # lines 3-4

    so steps ``kf+1 .. (k+1)f`` use the slow memory built from chunks ``0 .. k-1`` (O2 = 0 in the
    first chunk). ``ema=True``: ``M1 <- b1 M1 + (1-b1) G``, ``V <- b2 V + (1-b2) G^2``,
    ``M2 <- b3 M2 + (1-b3) sum``. NS (the Muon quintic) acts on every parameter's matrix view (a
    vector is a (1, n) row). Decoupled weight decay ``W (1 - lr weight_decay)`` first (0 default).
    State slots ``m1``, ``m2``, ``v``, ``gsum`` (this chunk's gradient sum) and ``o2`` (NS(M2)).
    """
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {s: params for s in ("m1", "m2", "v", "gsum", "o2")})
    b1, b2, b3 = hp["betas"]
    lr, alpha, eps, wd = hp["lr"], hp["alpha"], hp["eps"], hp["weight_decay"]
    t = state["step"] + 1
    out = {s: {} for s in ("m1", "m2", "v", "gsum", "o2")}
    new = {}
    for k, W in params.items():
        g = grads[k]
        gsum = state[f"gsum/{k}"] + g
        if hp["ema"]:
            M1 = b1 * state[f"m1/{k}"] + (1 - b1) * g
            V = b2 * state[f"v/{k}"] + (1 - b2) * g * g
        else:
            M1 = state[f"m1/{k}"] + b1 * g  # Alg. 1 line 7 (Eq. 75, first level)
            V = state[f"v/{k}"] + b2 * g * g  # Alg. 1 line 8
        O1 = _m3_orthogonalise(hp, M1)  # Alg. 1 line 9
        O2 = state[f"o2/{k}"]
        W = W * (1 - lr * wd) if wd else W
        new[k] = W - lr * (O1 + alpha * O2) / (np.sqrt(V) + eps)  # Alg. 1 line 10 (Eq. 75 aggregation)
        M2 = state[f"m2/{k}"]
        if t % hp["f"] == 0:
            M2 = b3 * M2 + (1 - b3) * gsum if hp["ema"] else M2 + b3 * gsum  # Alg. 1 line 3 (Eq. 75)
            O2 = _m3_orthogonalise(hp, M2)  # Alg. 1 line 4
            gsum = np.zeros_like(gsum)
        for s, a in (("m1", M1), ("m2", M2), ("v", V), ("gsum", gsum), ("o2", O2)):
            out[s][k] = a
    return _arrays(new, params), _pack(t, **out)
