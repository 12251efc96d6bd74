"""The chunk-parallel (WY / UT-transform) form of self-modifying Titans' writes and its backward.

Paper: §8.1, Eq. (88), arXiv 2512.24695v1 (DGD: §4.5, Eqs. (56)-(57); momentum: Titans Eqs. (16)-(18)).
SPEC: SPEC.md#selfmod ("Chunk-parallel form (in progress)"). Derivation, cost and what is stored:
docs/selfmod-chunk.md (the forward §§1-5, the backward ``write_chunk_ut_backward`` §7). In progress:
the layer (reference/selfmod.py) does not use this yet; the oracles are ``selfmod_memory.write_tokens``
and ``write_chunk`` (forward) and ``write_tokens_backward`` (backward).

The writes of one weight over a chunk of n tokens (1-based t; ``selfmod_memory.write``):

    S_t = beta S_{t-1} - eta'_t G_t                    (no momentum: S_t = -eta'_t G_t)
    P_t = P_{t-1} (alpha_t I - eta'_t k_t k_t^T) + S_t   key side;   P_t = alpha_t P_{t-1} + S_t otherwise

With the scalar decay D[t, s] = alpha_{s+1} ... alpha_t (``memory._decay_matrix``) and the key
reads w_t = P_{t-1} k_t, the key side is a scalar-decay recurrence with an extra rank-1 input:

    P_t = D[t, 0] P_0 + c_t S_0 - sum_{m<=t} E[t, m] eta'_m G_m - sum_{i<=t} D[t, i] eta'_i w_i k_i^T

    E[t, m] = sum_{i=m}^{t} D[t, i] beta^(i-m)     c_t = sum_{i=1}^{t} D[t, i] beta^i
    (no momentum: E[t, m] = D[t, m], c_t = 0)

and the w_t solve one unit lower-triangular n x n system (the UT transform), (I + L) w = r:

    L[t, i] = D[t-1, i] eta'_i (k_t . k_i)   (i < t)
    r_t     = D[t-1, 0] P_0 k_t + c_{t-1} S_0 k_t - sum_{m<t} E[t-1, m] eta'_m G_m k_t

Symbols (per head; B batch, H heads, n tokens, (a, b) one weight's shape, b = dh on the key side):

| paper                | code        | shape                  |
| -------------------- | ----------- | ---------------------- |
| P_0, S_0             | ``Pw, S``   | (B, H, a, b)           |
| G_t, k_t             | ``G, k``    | (B, H, n, a, b), (B, H, n, dh) |
| eta'_t, alpha_t      | ``ep, alpha`` | (B, H, n)            |
| beta                 | ``beta``    | (H,) or None           |
| D[t, s]              | ``D``       | (B, H, n+1, n+1)       |
| E[t, m], c_t         | ``E, c``    | (B, H, n+1, n), (B, H, n+1) |
| L, r, w              | ``L, r, w`` | (B, H, n, n), (B, H, n, a) x 2 |

CuPy-safe in the sense of SPEC.md#backends: NumPy imported once as ``np``.
"""

from __future__ import annotations

import numpy as np

from .memory import _decay_matrix, _decay_matrix_backward, _solve_unit_lower, _solve_unit_upper_transposed


def _momentum_decays(beta, n, dtype):
    """The momentum's decay matrix B_beta[i, m] = beta^(i-m) (i >= m) (H, n, n) and the powers
    beta^i, i = 1..n (H, n) (docs/selfmod-chunk.md §2; selfmod_memory._momenta's matrix)."""
    lag = np.arange(n)[:, None] - np.arange(n)[None, :]  # (n, n)   i - m
    Bb = np.where(lag >= 0, beta[:, None, None] ** np.maximum(lag, 0), 0).astype(dtype)  # (H, n, n)
    return Bb, (beta[:, None] ** np.arange(1, n + 1)).astype(dtype)


def _decays(ep, alpha, beta):
    """D (B, H, n+1, n+1), E (B, H, n+1, n) and c (B, H, n+1) of the chunk (docs/selfmod-chunk.md §2)."""
    B, H, n = alpha.shape
    D = _decay_matrix(alpha.reshape(B * H, n)).reshape(B, H, n + 1, n + 1)  # D[t, s] = alpha_{s+1}..alpha_t
    Dw = D[..., 1:]  # (B, H, n+1, n)   D[t, i], i = 1..n (column i-1)
    if beta is None:
        return D, Dw, np.zeros(D.shape[:-1], dtype=D.dtype)
    Bb, pw = _momentum_decays(beta, n, D.dtype)
    E = np.einsum("bhti,hin->bhtn", Dw, Bb)  # E[t, m] = sum_i D[t, i] beta^(i-m)   (the momentum's decay)
    c = np.einsum("bhti,hi->bht", Dw, pw)  # c_t = sum_i D[t, i] beta^i
    return D, E, c


def _decays_backward(dD, dE, dc, D, beta):
    """VJP of ``_decays`` (docs/selfmod-chunk.md §7.5): the adjoints of D, E, c -> (dalpha (B, H, n),
    dbeta (H,) or None). E = D[:, 1:] B_beta and c = D[:, 1:] beta^(1..n) send their adjoints to D
    and to beta (through beta^(i-m) and beta^i); D to alpha by ``memory._decay_matrix_backward``."""
    B, H, n1, _ = D.shape
    n = n1 - 1
    dD = dD.copy()
    if beta is None:  # E = D[:, 1:], c = 0
        dD[..., 1:] += dE
        dbeta = None
    else:
        Bb, pw = _momentum_decays(beta, n, D.dtype)
        Dw = D[..., 1:]
        dD[..., 1:] += np.einsum("bhtm,him->bhti", dE, Bb) + np.einsum("bht,hi->bhti", dc, pw)
        dBb = np.einsum("bhti,bhtm->him", Dw, dE)  # (H, n, n)
        dpw = np.einsum("bhti,bht->hi", Dw, dc)  # (H, n)
        lag = np.arange(n)[:, None] - np.arange(n)[None, :]  # i - m
        slope = np.where(lag >= 1, lag * beta[:, None, None] ** np.maximum(lag - 1, 0), 0)  # d beta^lag
        i = np.arange(1, n + 1)
        dbeta = np.einsum("him,him->h", dBb, slope) + np.einsum("hi,hi->h", dpw, i * beta[:, None] ** (i - 1))
        dbeta = dbeta.astype(D.dtype)
    dalpha = _decay_matrix_backward(dD.reshape(B * H, n1, n1), D.reshape(B * H, n1, n1)).reshape(B, H, n)
    return dalpha, dbeta


def _gram_backward(dKK, k):
    """VJP of KK[t, i] = k_t . k_i: k appears on both sides, so dk = (dKK + dKK^T) k."""
    return np.einsum("bhti,bhik->bhtk", dKK + np.swapaxes(dKK, -1, -2), k)


def write_chunk_ut(Pw, S, G, k, ep, alpha, beta, keyside):
    """n token writes of one weight in the UT form. -> (P_new, S_new, cache), as ``write_chunk``.

    Arguments and the new state as ``selfmod_memory.write_chunk`` (SPEC.md#selfmod): Pw, S (B, H, a, b);
    G (B, H, n, a, b); k (B, H, n, dh); ep, alpha (B, H, n); beta (H,) or None (no momentum; S is
    then ignored and S_new = -eta'_n G_n). The cache is this form's own (not ``write_chunk``'s; what
    ``write_chunk_ut_backward`` takes): a dict of the inputs and D, E, c, and on the key side L and w
    (the key reads w_t = P_{t-1} k_t), from which ``token_states_ut`` rebuilds every P_t. The reads
    of the layer are all at the chunk-start state, so the forward needs no per-token state."""
    n = G.shape[2]
    D, E, c = _decays(ep, alpha, beta)
    S0 = np.zeros_like(Pw) if beta is None else S  # no momentum: no S_0 (c = 0 anyway)
    step = -ep[..., None, None] * G  # (B, H, n, a, b)   Delta_m = -eta'_m G_m
    # The plain part: P_n = D[n, 0] P_0 + c_n S_0 + sum_m E[n, m] Delta_m (Titans Eqs. 16-18).
    P_new = (
        D[..., n, 0, None, None] * Pw
        + c[..., n, None, None] * S0
        + np.einsum("bhm,bhmuv->bhuv", E[..., n, :], step)
    )
    if beta is None:
        S_new = step[:, :, -1]
    else:  # S_n = beta^n S_0 + sum_m beta^(n-m) Delta_m
        pw = (beta[:, None] ** (n - 1 - np.arange(n))).astype(G.dtype)  # (H, n)   beta^(n-m)
        S_new = (beta**n)[:, None, None].astype(G.dtype) * S0 + np.einsum("hm,bhmuv->bhuv", pw, step)
    cache = {"inputs": (Pw, S0, G, k, ep, alpha, beta, keyside), "D": D, "E": E, "c": c, "L": None, "w": None}
    if not keyside:
        return P_new, S_new, cache
    # The key side: the UT system for the key reads w_t = P_{t-1} k_t (docs/selfmod-chunk.md §3).
    KK = np.einsum("bhtk,bhik->bhti", k, k)  # (B, H, n, n)   k_t . k_i
    L = D[..., :-1, 1:] * ep[:, :, None, :] * KK  # L[t, i] = D[t-1, i] eta'_i (k_t . k_i), strictly lower
    GK = np.einsum("bhmuv,bhtv->bhtmu", step, k)  # (B, H, n, n, a)   Delta_m k_t (factored: l_m (k_m . k_t))
    r = (
        D[..., :-1, 0, None] * np.einsum("bhuv,bhtv->bhtu", Pw, k)  # D[t-1, 0] P_0 k_t
        + c[..., :-1, None] * np.einsum("bhuv,bhtv->bhtu", S0, k)  # c_{t-1} S_0 k_t
        + np.einsum("bhtm,bhtmu->bhtu", E[..., :-1, :], GK)  # sum_{m<t} E[t-1, m] Delta_m k_t
    )  # (B, H, n, a)
    flat = (-1,) + r.shape[2:]  # (B H, n, a): memory.py's solve takes one batch axis
    w = _solve_unit_lower(L.reshape((-1, n, n)), r.reshape(flat)).reshape(r.shape)  # (I + L) w = r
    P_new = P_new - np.einsum("bhi,bhiu,bhiv->bhuv", D[..., n, 1:] * ep, w, k)  # - D[n, i] eta'_i w_i k_i^T
    cache["L"], cache["w"] = L, w
    return P_new, S_new, cache


def token_states_ut(cache):
    """Every state P_t (t = 1..n) of the chunk from ``write_chunk_ut``'s cache: (B, H, n, a, b).

    P_t = D[t, 0] P_0 + c_t S_0 + sum_{m<=t} E[t, m] Delta_m - [key side] sum_{i<=t} D[t, i] eta'_i w_i k_i^T
    (docs/selfmod-chunk.md §4): what a read at a per-token state would need; this layer reads at the
    chunk start only, so this is for the tests and a future per-token read."""
    Pw, S0, G, k, ep, alpha, beta, keyside = cache["inputs"]
    D, E, c = cache["D"], cache["E"], cache["c"]
    step = -ep[..., None, None] * G
    P = (
        D[..., 1:, 0, None, None] * Pw[:, :, None]
        + c[..., 1:, None, None] * S0[:, :, None]
        + np.einsum("bhtm,bhmuv->bhtuv", E[..., 1:, :], step)
    )
    if keyside:
        P = P - np.einsum("bhti,bhiu,bhiv->bhtuv", D[..., 1:, 1:] * ep[:, :, None, :], cache["w"], k)
    return P


def write_chunk_ut_backward(dP_new, dS_new, cache):
    """VJP of ``write_chunk_ut`` from its cache: -> (dPw, dS, dG, dk, dep, dalpha, dbeta), as
    ``selfmod_memory.write_chunk_backward`` / ``write_tokens_backward`` (SPEC.md#selfmod).

    dP_new, dS_new (B, H, a, b): the adjoints of the returned P_n and S_n (dS_new None: zero; ignored
    without momentum, where S is no state and dS, dbeta are None). dk is zero off the key side;
    dbeta (H,) is d/d beta (not b_beta), summed over the batch. Derivation, line by line:
    docs/selfmod-chunk.md §7. Step by step (1-based t, i, m; dX the adjoint of X, dP = dP_new):

    7.1  P_n and S_n:     dP_0 = D[n, 0] dP, dS_0 = c_n dP + beta^n dS, dDelta_m = E[n, m] dP
                          + beta^(n-m) dS; dD[n, 0], dc_n, dE[n, m], dbeta from the inner products
    7.2  the reads' term  - sum_i D[n, i] eta'_i w_i k_i^T:  dw_i = -D[n, i] eta'_i dP k_i,
                          dk_i -= D[n, i] eta'_i dP^T w_i, and dD[n, i], deta'_i from -w_i^T dP k_i
    7.3  the solve (I + L) w = r:   dr = (I + L)^(-T) dw (back substitution), dL = -dr w^T (strictly lower)
    7.4  L[t, i] = D[t-1, i] eta'_i (k_t . k_i) and r_t = D[t-1, 0] P_0 k_t + c_{t-1} S_0 k_t
                          + sum_m E[t-1, m] Delta_m k_t, into D, eta', k (twice through the Gram),
                          P_0, S_0, Delta and E
    7.5  Delta_m = -eta'_m G_m, then E, c, D into beta and alpha (``_decays_backward``)

    The outer gradient goes through the writes: the reads w_t depend on every earlier write (the
    solve's L and r), so dk, deta', dalpha, dbeta and dDelta collect the terms of the token loop's
    backward (write_backward's P_{t-1}^T (dP k) + dP^T (P_{t-1} k), carried here by dr and dL). The
    inner gradients' own second-order terms (G_m as a function of the chunk-start state, k and the
    targets) follow from dG by ``selfmod_memory.inner_grad_backward``, unchanged by this form.
    No condition on the inputs: I + L is unit lower triangular, det = 1, so both substitutions exist
    for every input (alpha = 0, eta' = 0, beta in {0, 1}, unnormalised keys); only adjoints of the
    wrong shape raise ValueError. Accuracy (§7.6): dPw and dS are sums of terms of size D[n, 0] |dP|
    (c_n |dP| + beta^n |dS|), so their rounding error is relative to that scale, not to their own
    size, which is far smaller when the shrinks contract faster than the retention (few key
    directions over a long chunk); the forward's P_0 part likewise."""
    Pw, S0, G, k, ep, alpha, beta, keyside = cache["inputs"]
    D, E, c = cache["D"], cache["E"], cache["c"]
    n = G.shape[2]
    if getattr(dP_new, "shape", None) != Pw.shape:
        raise ValueError(
            f"dP_new: expected shape {Pw.shape} (the state's), got {getattr(dP_new, 'shape', None)}"
        )
    momentum = beta is not None
    if not momentum or dS_new is None:
        dS_new = np.zeros_like(Pw)
    elif getattr(dS_new, "shape", None) != Pw.shape:
        raise ValueError(f"dS_new: expected shape {Pw.shape} (the momentum's), got {dS_new.shape}")
    step = -ep[..., None, None] * G  # (B, H, n, a, b)   Delta_m
    dD, dE, dc = np.zeros_like(D), np.zeros_like(E), np.zeros_like(c)
    # 7.1  P_n = D[n, 0] P_0 + c_n S_0 + sum_m E[n, m] Delta_m (- the reads' term, 7.2)
    dPw = D[..., n, 0, None, None] * dP_new
    dS0 = c[..., n, None, None] * dP_new
    dD[..., n, 0] = np.einsum("bhuv,bhuv->bh", dP_new, Pw)
    dc[..., n] = np.einsum("bhuv,bhuv->bh", dP_new, S0)
    dE[..., n, :] = np.einsum("bhuv,bhmuv->bhm", dP_new, step)
    dstep = E[..., n, :, None, None] * dP_new[:, :, None]  # (B, H, n, a, b)
    dbeta = None
    if momentum:  # S_n = beta^n S_0 + sum_m beta^(n-m) Delta_m
        m = np.arange(1, n + 1)
        pw = (beta[:, None] ** (n - m)).astype(G.dtype)  # (H, n)   beta^(n-m)
        dS0 = dS0 + (beta**n)[:, None, None].astype(G.dtype) * dS_new
        dstep = dstep + pw[None, :, :, None, None] * dS_new[:, :, None]
        slope = np.where(m < n, (n - m) * beta[:, None] ** np.maximum(n - m - 1, 0), 0)  # d beta^(n-m)
        dbeta = n * beta ** (n - 1) * np.einsum("bhuv,bhuv->h", dS_new, S0) + np.einsum(
            "hm,bhuv,bhmuv->h", slope, dS_new, step
        )
    dep = np.zeros_like(ep)
    dk = np.zeros_like(k)
    if keyside:
        w, L = cache["w"], cache["L"]
        # 7.2  - sum_i u_i w_i k_i^T, u_i = D[n, i] eta'_i
        u = D[..., n, 1:] * ep  # (B, H, n)
        dPk = np.einsum("bhuv,bhiv->bhiu", dP_new, k)  # (B, H, n, a)   dP k_i
        dw = -u[..., None] * dPk
        dk = dk - u[..., None] * np.einsum("bhuv,bhiu->bhiv", dP_new, w)  # - u_i dP^T w_i
        du = -np.einsum("bhiu,bhiu->bhi", w, dPk)  # - w_i^T dP k_i
        dD[..., n, 1:] += du * ep
        dep = dep + du * D[..., n, 1:]
        # 7.3  (I + L) w = r:  dr = (I + L)^(-T) dw, dL = -dr w^T on the strict lower triangle
        flat = (-1,) + dw.shape[2:]
        dr = _solve_unit_upper_transposed(L.reshape((-1, n, n)), dw.reshape(flat)).reshape(dw.shape)
        dL = -np.einsum("bhtu,bhiu->bhti", dr, w) * np.tri(n, n, -1, dtype=bool)
        # 7.4a  L[t, i] = D[t-1, i] eta'_i (k_t . k_i)
        KK = np.einsum("bhtk,bhik->bhti", k, k)
        Dl = D[..., :-1, 1:]  # (B, H, n, n)   D[t-1, i]
        dD[..., :-1, 1:] += dL * ep[:, :, None, :] * KK
        dep = dep + np.einsum("bhti,bhti->bhi", dL, Dl * KK)
        dk = dk + _gram_backward(dL * Dl * ep[:, :, None, :], k)
        # 7.4b  r_t = D[t-1, 0] P_0 k_t + c_{t-1} S_0 k_t + sum_m E[t-1, m] Delta_m k_t
        dD[..., :-1, 0] += np.einsum("bhtu,bhuv,bhtv->bht", dr, Pw, k)
        dc[..., :-1] += np.einsum("bhtu,bhuv,bhtv->bht", dr, S0, k)
        X = D[..., :-1, 0, None] * dr  # the adjoint of P_0 k_t
        Y = c[..., :-1, None] * dr  # the adjoint of S_0 k_t
        dPw = dPw + np.einsum("bhtu,bhtv->bhuv", X, k)
        dS0 = dS0 + np.einsum("bhtu,bhtv->bhuv", Y, k)
        dk = dk + np.einsum("bhuv,bhtu->bhtv", Pw, X) + np.einsum("bhuv,bhtu->bhtv", S0, Y)
        Er = E[..., :-1, :]  # (B, H, n, n)   E[t-1, m]
        dE[..., :-1, :] += np.einsum("bhtu,bhmuv,bhtv->bhtm", dr, step, k)
        dstep = dstep + np.einsum("bhtm,bhtu,bhtv->bhmuv", Er, dr, k)
        dk = dk + np.einsum("bhtm,bhmuv,bhtu->bhtv", Er, step, dr)
    # 7.5  Delta_m = -eta'_m G_m, then the decays
    dG = -ep[..., None, None] * dstep
    dep = dep - np.einsum("bhmuv,bhmuv->bhm", dstep, G)
    dalpha, dbeta_dec = _decays_backward(dD, dE, dc, D, beta)
    if momentum:
        dbeta = (dbeta + dbeta_dec).astype(G.dtype)
        return dPw, dS0, dG, dk, dep, dalpha, dbeta
    return dPw, None, dG, dk, dep, dalpha, None
