"""One memory of self-modifying Titans: its read, its self-generated target, its inner gradient and its
DGD write (one token, and a segment in closed form), each beside its backward.

Paper: §8.1, Eqs. (84)-(88), (93), arXiv 2512.24695v1 (DGD: §4.5, Eqs. (56)-(57); the closed form:
Titans Eqs. (16)-(18), generalised to DGD's matrix decay). SPEC: SPEC.md#selfmod. The layer that
runs six of these memories is reference/selfmod.py; it re-exports every public name here.

    v_hat_t = M(v_t)                                              read at the chunk-start state, Eq. (84)
    G_t = grad_W ||M(k_t) - v_hat_t||^2  (v_hat constant)          Eqs. (85)-(86), (93)
    S_t = beta S_{t-1} - eta'_t G_t                                momentum (pinned, SPEC.md#selfmod)
    W_t = W_{t-1} A_t + S_t,  A_t = alpha_t I - eta'_t k_t k_t^T    key-side weight, Eq. (88)
    W_t = alpha_t W_{t-1} + S_t                                    every other weight, Eq. (88)

Symbols (per head; B batch, H heads, n the tokens of one segment, dh the head width, (a, b) the shape
of one weight: (dh, dh) for the matrix M, (dh, Hm) for W1, (Hm, dh) for W2):

| paper              | code       | shape                      |
| ------------------ | ---------- | -------------------------- |
| W (one weight)     | ``Pw``     | (B, H, a, b)               |
| momentum S         | ``S``      | (B, H, a, b)               |
| G_t                | ``G``      | (B, H, n, a, b)            |
| k_t                | ``k``      | (B, H, n, dh)              |
| eta'_t, alpha_t    | ``ep, alpha`` | (B, H, n)               |
| beta               | ``beta``   | (H,) or None (no momentum) |
| A_t                | ``A``      | (B, H, n, dh, dh)          |
| A_{j+1} ... A_n    | ``R``      | (B, H, n, dh, dh), or (B, H, n) for the scalar alpha |

Decisions (SPEC.md#selfmod): the key-side weight (the matrix M, or W2 of the MLP: the one that
multiplies the key) gets Eq. (88)'s ``k k^T`` shrink, W1 plain retention; ``single_shrink`` (matrix
only) writes along the delta rule's direction ``G = -v_hat k^T``; the inner loss has the factor 2.

CuPy-safe (SPEC.md#backends): the GPU port executes this source with ``np`` rebound to CuPy, so NumPy
is imported once, as ``np``, and every array function is called through it.

Contract: ``weights``, ``keyside``, ``init_key``, the reads, inner gradients and writes are used by
the ports (fast/cpu/selfmod.py); the four scans are overridden by name in the GPU port
(fast/gpu/scans.py through fast/gpu/namespace.py), so they keep their names and signatures.
"""

from __future__ import annotations

import numpy as np

from . import mlp_memory as MM


def weights(cfg) -> tuple[str, ...]:
    """The fast weights of one memory; the first is the key-side weight that gets the DGD shrink.

    Part of the contract the ports use (SPEC.md#backends)."""
    return ("M",) if cfg.memory == "matrix" else ("W2", "W1")


def keyside(w: str) -> bool:
    """Whether weight ``w`` multiplies the key (Eq. 88's right factor). Part of the ports' contract."""
    return w in ("M", "W2")


def shrinks(cfg, w: str) -> bool:
    """Whether weight ``w``'s write has Eq. (88)'s ``- eta' W k k^T`` term: the key side, unless the
    layer writes without DGD (``cfg.dgd`` False, Table 6 "w/o DGD": every weight ``alpha W + S``).
    Part of the ports' contract."""
    return keyside(w) and cfg.dgd


def init_key(m: str, w: str) -> str:
    """The parameter key of memory ``m``'s meta-learned initial weight ``w`` (``k.M0``, ``k.W1_0``).

    Part of the contract the ports use."""
    return f"{m}.M0" if w == "M" else f"{m}.{w}_0"


# ---------------------------------------------------------------------------------------------
# Read (Eqs. 83-84, 89) and inner gradient (Eqs. 85-86, 93)
# ---------------------------------------------------------------------------------------------


def read_forward(cfg, st, z):
    """y = M(z) for every token at the state ``st`` ({w: (B, H, ., .)}); z (B, H, n, dh)."""
    if cfg.memory == "matrix":
        return MM.matrix_memory_forward(st["M"], z)  # Eq. (83)   M z
    return MM.mlp_memory_forward(st["W1"], st["W2"], z, act=cfg.act, layernorm=cfg.layernorm)  # Eq. (89)


def read_backward(cfg, dy, cache):
    """-> ({w: dW}, dz)."""
    if cfg.memory == "matrix":
        dM, dz = MM.matrix_memory_backward(dy, cache)
        return {"M": dM}, dz
    dW1, dW2, dz = MM.mlp_memory_backward(dy, cache)
    return {"W1": dW1, "W2": dW2}, dz


def inner_grad(cfg, st, k, vhat):
    """Per-token gradients G[w] (B, H, n, ., .) of ||M(k_n) - vhat_n||^2 at ``st``, vhat constant (Eq. 93).

    With ``single_shrink`` (matrix only) the direction is the delta rule's onto vhat: G = -vhat k^T.
    """
    if cfg.memory == "matrix":
        if cfg.single_shrink:
            u, c = -vhat, None  # (B, H, n, dh)   the write becomes + eta' vhat k^T
        else:
            u, c = MM.matrix_inner_grad(st["M"], k, vhat)  # Eq. (93)   u = 2 (M k - vhat)
        G = {"M": np.einsum("bhnv,bhnk->bhnvk", u, k)}  # (B, H, n, dh, dh)   u k^T
        return G, (k, u, c)
    u1, a, u2, c = MM.inner_grad(st["W1"], st["W2"], k, vhat, act=cfg.act, layernorm=cfg.layernorm)
    G = {
        "W1": np.einsum("bhnd,bhnm->bhndm", u1, a),  # (B, H, n, dh, Hm)   u1 a^T
        "W2": np.einsum("bhnm,bhnd->bhnmd", u2, k),  # (B, H, n, Hm, dh)   u2 k^T
    }
    return G, (k, u1, a, u2, c)


def inner_grad_backward(cfg, dG, cache):
    """VJP of (st, k, vhat) -> G: -> ({w: dW}, dk, dvhat), through the second-order terms."""
    if cfg.memory == "matrix":
        k, u, c = cache
        du = np.einsum("bhnvk,bhnk->bhnv", dG["M"], k)  # (B, H, n, dh)
        dk = np.einsum("bhnvk,bhnv->bhnk", dG["M"], u)  # (B, H, n, dh)   the explicit k of u k^T
        if cfg.single_shrink:
            return {"M": None}, dk, -du
        dM, dk2, dvhat = MM.matrix_inner_grad_backward(du, c)
        return {"M": dM}, dk + dk2, dvhat
    k, u1, a, u2, c = cache
    du1 = np.einsum("bhndm,bhnm->bhnd", dG["W1"], a)  # (B, H, n, dh)
    da = np.einsum("bhndm,bhnd->bhnm", dG["W1"], u1)  # (B, H, n, Hm)
    du2 = np.einsum("bhnmd,bhnd->bhnm", dG["W2"], k)  # (B, H, n, Hm)
    dk = np.einsum("bhnmd,bhnm->bhnd", dG["W2"], u2)  # (B, H, n, dh)   the explicit k of u2 k^T
    dW1, dW2, dk2, dvhat = MM.inner_grad_backward(du1, da, du2, c)
    return {"W1": dW1, "W2": dW2}, dk + dk2, dvhat


# ---------------------------------------------------------------------------------------------
# The curvature-normalised step (``step_norm``, not in the paper: SPEC.md#hope-stability)
# ---------------------------------------------------------------------------------------------


def step_scale(cfg, st, k, eta, chunk):
    """s_t = 1 / (1 + eta_t C lambda_t) (B, H, n): the factor ``step_norm`` puts on G_t.

    lambda_t bounds the Gauss-Newton curvature of token t's inner loss at the chunk-start state ``st``
    (a trace bound, |s'| <= 1 taken): ||k_t||^2 for the matrix memory, ||a_t||^2 + ||k_t||^2 ||W1||_F^2
    with a_t = s(W2 k_t) for the MLP memory (the curvature along W1, and along W2 through W1). C (the
    memory's chunk size) is the number of gradients a chunk sums at one state, so eta_t C lambda_t
    bounds the chunk's summed step; with the factor the step along any direction stays below 1
    however large the weights grow. -> (s, cache)."""
    kk = np.sum(k * k, axis=-1)  # (B, H, n)
    if cfg.memory == "matrix":
        lam, parts = kk, None
    else:
        W1, W2 = st["W1"], st["W2"]
        h = np.einsum("...hd,...nd->...nh", W2, k)  # (B, H, n, Hm)   W2 k
        f, df, _ = MM.check_activation(cfg.act)
        a, sp = np.asarray(f(h)).astype(h.dtype, copy=False), np.asarray(df(h)).astype(h.dtype, copy=False)
        w1 = np.einsum("...dh,...dh->...", W1, W1)  # (B, H)   ||W1||_F^2
        lam = np.sum(a * a, axis=-1) + kk * w1[..., None]
        parts = (W1, W2, a, sp, w1)
    s = 1.0 / (1.0 + eta * chunk * lam)
    return s, (k, kk, eta, chunk, lam, s, parts)


def step_scale_backward(cfg, ds, cache):
    """VJP of ``step_scale``: ds (B, H, n) -> ({w: dW or None}, dk, deta)."""
    k, kk, eta, chunk, lam, s, parts = cache
    dlam = -ds * eta * chunk * s**2  # (B, H, n)
    deta = -ds * chunk * lam * s**2
    if parts is None:
        return {"M": None}, 2 * dlam[..., None] * k, deta
    W1, W2, a, sp, w1 = parts
    dh = 2 * dlam[..., None] * a * sp  # (B, H, n, Hm)   through a = s(W2 k)
    dW2 = np.einsum("...nh,...nd->...hd", dh, k)
    dk = 2 * (dlam * w1[..., None])[..., None] * k + np.einsum("...hd,...nh->...nd", W2, dh)
    dW1 = 2 * np.sum(dlam * kk, axis=-1)[..., None, None] * W1
    return {"W1": dW1, "W2": dW2}, dk, deta


# ---------------------------------------------------------------------------------------------
# The write of one token (Eq. 88 with momentum) and its backward
# ---------------------------------------------------------------------------------------------


def write(Pw, S, G, k, ep, alpha, beta, keyside):
    """One token's DGD step with retention and momentum for one weight (Eq. 88, momentum pinned).

    Pw, S, G (B, H, a, b); k (B, H, dh); ep, alpha (B, H); beta (H,) or None (no momentum).
    Returns (P_new, S_new, cache)."""
    e = ep[..., None, None]
    S_new = -e * G if beta is None else beta[:, None, None] * S - e * G  # momentum (SPEC.md#selfmod)
    P_new = alpha[..., None, None] * Pw + S_new  # Eq. (88)   alpha W - eta' grad (+ momentum)
    if keyside:
        P_new = P_new - e * np.einsum("bhak,bhk,bhl->bhal", Pw, k, k)  # Eq. (88)   - eta' W k k^T
    return P_new, S_new, (Pw, S, G, k, ep, alpha, beta, keyside)


def write_backward(dP_new, dS_new, cache):
    """VJP of ``write``: -> (dPw, dS, dG, dk, dep, dalpha, dbeta); dS and dbeta (H,) are None without
    momentum (dS_new is then ignored); dk is zero off the key side. dbeta is d/d beta (not b_beta)."""
    Pw, S, G, k, ep, alpha, beta, keyside = cache
    e = ep[..., None, None]
    dSt = dP_new + (dS_new if beta is not None else 0)  # the adjoint of S_new (P_new = ... + S_new)
    dG = -e * dSt
    dep = -np.einsum("bhuv,bhuv->bh", dSt, G)  # S_new = ... - eta' G
    dbeta = None if beta is None else np.einsum("bhuv,bhuv->h", dSt, S)  # S_new = beta S - ...
    dalpha = np.einsum("bhuv,bhuv->bh", dP_new, Pw)  # P_new = alpha W + ...
    dPw = alpha[..., None, None] * dP_new
    dk = np.zeros_like(k)
    if keyside:  # P_new = ... - eta' (W k) k^T
        Pk = np.einsum("bhak,bhk->bha", Pw, k)  # (B, H, a)
        dPk = np.einsum("bhak,bhk->bha", dP_new, k)  # (B, H, a)
        dep = dep - np.einsum("bha,bha->bh", dPk, Pk)
        dk = -ep[..., None] * (np.einsum("bhak,bha->bhk", Pw, dPk) + np.einsum("bhak,bha->bhk", dP_new, Pk))
        dPw = dPw - e * np.einsum("bha,bhk->bhak", dPk, k)
    dS = None if beta is None else beta[:, None, None] * dSt
    return dPw, dS, dG, dk, dep, dalpha, dbeta


def write_tokens(Pw, S, G, k, ep, alpha, beta, keyside):
    """The n writes of a segment one token at a time (``write`` in a loop: the oracle of
    ``write_chunk``, same arguments). -> (P_new, S_new, cache: every token's ``write`` cache)."""
    caches = []
    for j in range(G.shape[2]):
        Pw, S, c = write(Pw, S, G[:, :, j], k[:, :, j], ep[:, :, j], alpha[:, :, j], beta, keyside)
        caches.append(c)
    return Pw, S, caches


def write_tokens_cache(Pw, S, G, k, ep, alpha, beta, keyside):
    """The cache of ``write_tokens`` (what ``write_tokens_backward`` takes). Each token's write reads
    the state the previous one wrote, so the recursion itself is the cache: ``write_tokens``'s."""
    return write_tokens(Pw, S, G, k, ep, alpha, beta, keyside)[2]


def write_tokens_backward(dP_new, dS_new, cache):
    """VJP of ``write_tokens``: ``write_backward`` from the last token to the first. -> (dPw, dS, dG,
    dk, dep, dalpha, dbeta) as ``write_chunk_backward`` (dbeta summed over the tokens)."""
    G0, k0, beta = cache[0][2], cache[0][3], cache[0][6]  # (B, H, a, b), (B, H, dh), (H,) or None
    B, H, n = G0.shape[0], G0.shape[1], len(cache)
    dG = np.zeros((B, H, n) + G0.shape[2:], dtype=G0.dtype)  # (B, H, n, a, b)
    dk = np.zeros((B, H, n, k0.shape[-1]), dtype=G0.dtype)  # (B, H, n, dh)
    dep, dalpha = np.zeros((B, H, n), dtype=G0.dtype), np.zeros((B, H, n), dtype=G0.dtype)
    dbeta = None if beta is None else np.zeros_like(beta)
    for j in range(len(cache) - 1, -1, -1):
        dP_new, dS_j, dG[:, :, j], dk[:, :, j], dep[:, :, j], dalpha[:, :, j], db = write_backward(
            dP_new, dS_new, cache[j]
        )
        if beta is not None:
            dS_new, dbeta = dS_j, dbeta + db
    return dP_new, (None if beta is None else dS_new), dG, dk, dep, dalpha, dbeta


# ---------------------------------------------------------------------------------------------
# The writes of a segment in closed form (Titans Eqs. 16-18 generalised to DGD) and their backward
# ---------------------------------------------------------------------------------------------


def _lags(n):
    idx = np.arange(n)
    return idx, idx[:, None] - idx[None, :]  # (n,), (n, n)   j - i


def _momenta(S, G, ep, beta):
    """All n momenta of a segment: S_j = beta^(j+1) S_0 - sum_{i<=j} beta^(j-i) eta'_i G_i, one
    decay-masked matrix product (Titans Eq. 18). -> (S_all (B, H, n, a, b), (step, decay, powers))."""
    idx, lag = _lags(G.shape[2])
    step = -ep[..., None, None] * G  # (B, H, n, a, b)   - eta'_i G_i
    if beta is None:
        return step, (step, None, None)
    decay = np.where(lag >= 0, beta[:, None, None] ** np.maximum(lag, 0), 0).astype(G.dtype)  # (H, n, n)
    powers = (beta[:, None] ** (idx + 1)).astype(G.dtype)  # (H, n)   beta^(j+1)
    S_all = np.einsum("hji,bhiuv->bhjuv", decay, step) + np.einsum(
        "hj,bhuv->bhjuv", powers, S
    )  # (B, H, n, a, b)   Titans Eq. (18)
    return S_all, (step, decay, powers)


def _momenta_backward(dS_all, dS_new, S, beta, c):
    """VJP of ``_momenta`` given the adjoint of every S_j (and of S_new = S_{n-1}): -> (dstep, dS, dbeta)."""
    step, decay, powers = c
    if beta is None:
        return dS_all, None, None
    if dS_new is not None:
        dS_all[:, :, -1] += dS_new
    idx, lag = _lags(step.shape[2])
    dstep = np.einsum("hji,bhjuv->bhiuv", decay, dS_all)
    dS = np.einsum("hj,bhjuv->bhuv", powers, dS_all)
    ddecay = np.einsum("bhjuv,bhiuv->hji", dS_all, step)  # (H, n, n)
    dpowers = np.einsum("bhjuv,bhuv->hj", dS_all, S)  # (H, n)
    slope = np.where(lag >= 1, lag * beta[:, None, None] ** np.maximum(lag - 1, 0), 0)  # d beta^lag
    dbeta = np.einsum("hji,hji->h", ddecay, slope) + np.einsum("hj,hj->h", dpowers, (idx + 1) * beta[:, None] ** idx)
    return dstep, dS, dbeta.astype(step.dtype)


def write_chunk_cache(Pw, S, G, k, ep, alpha, beta, keyside):
    """What ``write_chunk`` and ``write_chunk_backward`` share, without the new state: the cache.

    G (B, H, n, a, b), k (B, H, n, dh), ep, alpha (B, H, n). The momenta from ``_momenta`` (Titans
    Eq. 18); A_j = alpha_j I - eta'_j k_j k_j^T on the key side (Eq. 88), else the scalar alpha_j;
    the suffix products R_j = A_{j+1}..A_n (a scan) and full = A_1..A_n (Titans Eqs. 16-17). The
    layer's backward recomputes a segment's writes with this alone (it never needs W_n)."""
    S_all, c_mom = _momenta(S, G, ep, beta)
    if keyside:
        eye = np.eye(k.shape[-1], dtype=G.dtype)
        A = alpha[..., None, None] * eye - ep[..., None, None] * np.einsum("bhnk,bhnl->bhnkl", k, k)
        R = suffix_products(A)  # (B, H, n, dh, dh)   R_j = A_{j+1} ... A_{n-1}
        full = A[:, :, 0] @ R[:, :, 0]  # (B, H, dh, dh)
    else:
        A = None
        R = scalar_suffix_products(alpha)  # (B, H, n)   prod_{i>j} alpha_i
        full = alpha[..., 0] * R[..., 0]  # (B, H)   prod_i alpha_i
    return (Pw, S, G, k, ep, alpha, beta, keyside, S_all, c_mom, A, R, full)


def write_chunk(Pw, S, G, k, ep, alpha, beta, keyside):
    """n token writes in closed form (the chunk-parallel form of ``write``). -> (P_new, S_new, cache).

    Arguments as ``write_chunk_cache``, whose cache this returns. The state (Titans Eqs. 16-17,
    Eq. 88 over the segment): W_n = W_0 A_1..A_n + sum_j S_j A_{j+1}..A_n on the key side,
    W_n = (prod_j alpha_j) W_0 + sum_j (prod_{i>j} alpha_i) S_j elsewhere."""
    cache = write_chunk_cache(Pw, S, G, k, ep, alpha, beta, keyside)
    S_all, _, _, R, full = cache[8:]  # the momenta, the suffix products, full
    if keyside:
        P_new = Pw @ full + np.einsum("bhjak,bhjkl->bhal", S_all, R)  # Eq. (88) over the segment
    else:
        P_new = full[..., None, None] * Pw + np.einsum("bhj,bhjuv->bhuv", R, S_all)  # Eq. (88)
    return P_new, S_all[:, :, -1], cache


def write_chunk_backward(dP_new, dS_new, cache):
    """VJP of ``write_chunk`` from its cache: -> (dPw, dS, dG, dk, dep, dalpha, dbeta), as
    ``write_backward``. dP_new, dS_new (B, H, a, b) the adjoints of the returned state and momentum
    (dS_new None or ignored without momentum). The suffix-product scan reversed as a prefix scan of
    adjoints, the momentum's decay matrix transposed, beta's derivative through beta^(j-i)."""
    Pw, S, G, k, ep, alpha, beta, keyside, S_all, c_mom, A, R, full = cache
    if keyside:  # P_new = P0 full + sum_j S_j R_j
        dS_all = np.einsum("bhuw,bhjvw->bhjuv", dP_new, R)  # (B, H, n, a, b)   dP R_j^T
        dPw = np.einsum("bhuw,bhvw->bhuv", dP_new, full)  # dP full^T
        dfull = np.einsum("bhuk,bhul->bhkl", Pw, dP_new)  # P0^T dP
        dR = np.einsum("bhjuk,bhul->bhjkl", S_all, dP_new)  # S_j^T dP
        dA = suffix_products_backward(A, R, dR, dfull)
        dalpha = np.einsum("bhnkk->bhn", dA)  # A = alpha I - ...
        dep = -np.einsum("bhnk,bhnkl,bhnl->bhn", k, dA, k)
        dk = -ep[..., None] * (np.einsum("bhnkl,bhnl->bhnk", dA, k) + np.einsum("bhnlk,bhnl->bhnk", dA, k))
    else:  # P_new = full P0 + sum_j R_j S_j
        dS_all = R[..., None, None] * dP_new[:, :, None]  # (B, H, n, a, b)
        dPw = full[..., None, None] * dP_new
        dfull = np.einsum("bhuv,bhuv->bh", Pw, dP_new)
        dR = np.einsum("bhjuv,bhuv->bhj", S_all, dP_new)
        dalpha = scalar_suffix_products_backward(alpha, R, dR, dfull)
        dep = np.zeros_like(ep)
        dk = np.zeros_like(k)
    dstep, dS, dbeta = _momenta_backward(dS_all, dS_new, S, beta, c_mom)
    dG = -ep[..., None, None] * dstep  # step = - eta' G
    dep = dep - np.einsum("bhnuv,bhnuv->bhn", dstep, G)
    return dPw, dS, dG, dk, dep, dalpha, dbeta


# ---------------------------------------------------------------------------------------------
# The scans of the closed form (overridden by name in the GPU port: fast/gpu/scans.py)
# ---------------------------------------------------------------------------------------------


def suffix_products(A):
    """The suffix-product scan of the key-side writes: R_j = A_{j+1} ... A_{n-1} (R_{n-1} = I).

    A (B, H, n, d, d) -> R (B, H, n, d, d). One matrix product per token, in sequence (the GPU
    port runs this scan as one kernel: SPEC.md#fast-gpu)."""
    n = A.shape[2]
    R = np.empty_like(A)
    R[:, :, n - 1] = np.eye(A.shape[-1], dtype=A.dtype)
    for j in range(n - 2, -1, -1):
        R[:, :, j] = A[:, :, j + 1] @ R[:, :, j + 1]  # suffix-product scan
    return R


def suffix_products_backward(A, R, dR, dfull):
    """VJP of A -> (R = suffix_products(A), full = A_0 R_0): dA (B, H, n, d, d).

    dR (B, H, n, d, d) is the adjoint reaching each R_j (updated in place: on return it holds each
    R_j's whole adjoint), dfull (B, H, d, d) the adjoint of full. The scan reversed: a prefix scan
    of adjoints, dR_{j+1} += A_{j+1}^T dR_j, and dA_{j+1} = dR_j R_{j+1}^T."""
    n = A.shape[2]
    At, Rt = np.swapaxes(A, -1, -2), np.swapaxes(R, -1, -2)  # (B, H, n, d, d)   views: A_j^T, R_j^T
    dA = np.zeros_like(A)
    dA[:, :, 0] = dfull @ Rt[:, :, 0]
    dR[:, :, 0] += At[:, :, 0] @ dfull
    for j in range(n - 1):  # R_j = A_{j+1} R_{j+1}, reversed
        dA[:, :, j + 1] += dR[:, :, j] @ Rt[:, :, j + 1]
        dR[:, :, j + 1] += At[:, :, j + 1] @ dR[:, :, j]
    return dA


def scalar_suffix_products(alpha):
    """The scalar retention's suffix products: R_j = alpha_{j+1} ... alpha_{n-1} (R_{n-1} = 1).

    alpha (B, H, n) -> R (B, H, n)."""
    n = alpha.shape[-1]
    R = np.empty_like(alpha)
    R[..., n - 1] = 1
    for j in range(n - 2, -1, -1):
        R[..., j] = alpha[..., j + 1] * R[..., j + 1]
    return R


def scalar_suffix_products_backward(alpha, R, dR, dfull):
    """VJP of alpha -> (R = scalar_suffix_products(alpha), full = alpha_0 R_0): dalpha (B, H, n).

    dR (B, H, n) the adjoint of each R_j (updated in place), dfull (B, H) that of full."""
    n = alpha.shape[-1]
    dalpha = np.zeros_like(alpha)
    dalpha[..., 0] = dfull * R[..., 0]
    dR[..., 0] += alpha[..., 0] * dfull
    for j in range(n - 1):
        dalpha[..., j + 1] += dR[..., j] * R[..., j + 1]
        dR[..., j + 1] += alpha[..., j + 1] * dR[..., j]
    return dalpha
