"""The chunk-parallel (WY / UT-transform) form of self-modifying Titans' writes: the forward only.

Paper: §8.1, Eq. (88), arXiv 2512.24695v1 (DGD: §4.5, Eqs. (56)-(57); momentum: Titans Eqs. (16)-(18)).
SPEC: SPEC.md#selfmod ("Chunk-parallel form (in progress)"). Derivation, cost and what is stored:
docs/selfmod-chunk.md. In progress: the layer (reference/selfmod.py) does not use this yet, and
its backward is not derived; the oracles are ``selfmod_memory.write_tokens`` and ``write_chunk``.

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

from .memory import _decay_matrix, _solve_unit_lower


def _decays(ep, alpha, beta):
    """D (B, H, n+1, n+1), E (B, H, n+1, n) and c (B, H, n+1) of the chunk (docs/selfmod-chunk.md §2)."""
    B, H, n = alpha.shape
    D = _decay_matrix(alpha.reshape(B * H, n)).reshape(B, H, n + 1, n + 1)  # D[t, s] = alpha_{s+1}..alpha_t
    Dw = D[..., 1:]  # (B, H, n+1, n)   D[t, i], i = 1..n (column i-1)
    if beta is None:
        return D, Dw, np.zeros(D.shape[:-1], dtype=D.dtype)
    lag = np.arange(n)[:, None] - np.arange(n)[None, :]  # (n, n)   i - m
    Bb = np.where(lag >= 0, beta[:, None, None] ** np.maximum(lag, 0), 0).astype(D.dtype)  # (H, n, n)
    E = np.einsum("bhti,hin->bhtn", Dw, Bb)  # E[t, m] = sum_i D[t, i] beta^(i-m)   (the momentum's decay)
    c = np.einsum("bhti,hi->bht", Dw, (beta[:, None] ** np.arange(1, n + 1)).astype(D.dtype))  # beta^i
    return D, E, c


def write_chunk_ut(Pw, S, G, k, ep, alpha, beta, keyside):
    """n token writes of one weight in the UT form. -> (P_new, S_new, cache), as ``write_chunk``.

    Arguments and the new state as ``selfmod_memory.write_chunk`` (SPEC.md#selfmod): Pw, S (B, H, a, b);
    G (B, H, n, a, b); k (B, H, n, dh); ep, alpha (B, H, n); beta (H,) or None (no momentum; S is
    then ignored and S_new = -eta'_n G_n). The cache is this form's own (not ``write_chunk``'s; no
    backward takes it yet): a dict of the inputs and D, E, c, and on the key side L and w (the key
    reads w_t = P_{t-1} k_t), from which ``token_states_ut`` rebuilds every P_t. The reads of the
    layer are all at the chunk-start state, so the forward needs no per-token state."""
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
