"""The residual two-layer MLP memory, its read, and its per-token inner gradient with second-order pieces.

Paper: §8.1-8.2, Eqs. (86)-(93), arXiv 2512.24695v1 (the memory of Eqs. 89 and 91); the LayerNorm
variant is Titans §3.3 / MIRAS §5.4. SPEC: SPEC.md#mlp-memory.

The memory is ``M(z) = z + W1 s(W2 z)`` (Eqs. 89, 91), or with the Titans/MIRAS LayerNorm on the
branch ``M(z) = z + LN(W1 s(W2 z))`` (LN without affine parameters). Its inner loss for a key ``k``
and a target ``v_hat`` is ``l = ||M(k) - v_hat||^2`` (Eq. 86; factor 2 in the gradient, no 1/2).
The inner gradient is returned as rank-1 factors per token (NL Eqs. 29-31 applied to the memory):

    dl_n/dW1 = u1_n a_n^T,   u1 = J_LN^T 2 r   (without LN: u1 = 2 r),   r = M(k) - v_hat
    dl_n/dW2 = u2_n k_n^T,   u2 = s'(W2 k) * (W1^T u1),                  a = s(W2 k)

``inner_grad_backward`` is the vector-Jacobian product of the map (W1, W2, k, v_hat) -> (u1, a, u2):
the second-order pieces the outer backward needs to differentiate through the writes
(SPEC.md#outer-gradient). The matrix memory ``M k`` gets the same interface (``matrix_*``).

Symbols (leading dims ``...`` are per sequence / per head; every argument carries the same ones):

| paper             | code      | shape           |
| ----------------- | --------- | --------------- |
| z, k (key)        | z, k      | (..., N, D)     |
| v̂ (target)        | v_hat     | (..., N, D)     |
| W_1               | W1        | (..., D, Hm)    |
| W_2               | W2        | (..., Hm, D)    |
| W_2 z             | h         | (..., N, Hm)    |
| σ(W_2 z)          | a         | (..., N, Hm)    |
| W_1 σ(W_2 z)      | b         | (..., N, D)     |
| LN(b) (or b)      | c         | (..., N, D)     |
| M(z)              | y         | (..., N, D)     |
| M(k) - v̂          | r         | (..., N, D)     |
| ∂l/∂W_1 factors   | u1, a     | (..., N, D), (..., N, Hm) |
| ∂l/∂W_2 factors   | u2, k     | (..., N, Hm), (..., N, D) |
| matrix memory M   | M         | (..., Dv, Dk)   |

Decisions where the paper is open (each recorded in SPEC.md#mlp-memory):
- The loss is ``||.||^2`` (factor 2 in every gradient), the paper's convention (semantics.md §4).
- ``v_hat`` is a constant inside the inner-gradient formula, but an ordinary input of the factor
  map, so ``inner_grad_backward`` returns ``dv_hat`` (SPEC.md#outer-gradient).
- LayerNorm (option ``layernorm=True``): over the last axis D, no affine parameters, eps inside
  the square root, biased variance (Titans/MIRAS ``x + LN(W1 s(W2 x))``).
  LN is degenerate for D <= 2 (constant +-1 branch) and Hm = 1 (invariant to s(W2 z)).
- No biases, no broadcasting of weights over tokens' leading dims: weights are per sequence/head.
- ``act`` names an ``ACTIVATIONS`` triple, ``gelu`` by default (Titans/MIRAS/ATLAS; NL is silent).
- One dtype per call (float32 or float64; complex128 for the complex-step check); results in it.
- ``inner_grad_backward`` differentiates only the returned factors; the direct dependence of
  ``u2 k^T`` on ``k`` is the caller's (SPEC.md#mlp-memory).

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

import numpy as np

from .primitives import ACTIVATIONS

# ---------------------------------------------------------------------------------------------
# Input validation.
# ---------------------------------------------------------------------------------------------


def check_array(name: str, x, expected: str) -> np.ndarray:
    """``x`` if it is a float (or complex) ndarray, else ValueError. Public: the CPU port uses it."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a NumPy array of shape {expected}, got {type(x).__name__}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.complexfloating)):
        raise ValueError(f"{name}: expected a float32/float64 array of shape {expected}, got dtype {x.dtype}")
    return x


def check_activation(act: str):
    """(s, s', s'') of a known activation name, else ValueError. Public: the CPU port uses it."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act: expected one of {sorted(ACTIVATIONS)}, got {act!r}")
    return ACTIVATIONS[act]


def check_mlp(W1, W2, **tokens) -> tuple[int, int]:
    """Validate W1 (..., D, Hm), W2 (..., Hm, D) and token arrays (..., N, D); return (D, Hm).
    Public: the CPU port uses it (fast/cpu/mlp_memory.py).
    """
    check_array("W1", W1, "(..., D, Hm)")
    check_array("W2", W2, "(..., Hm, D)")
    if W1.ndim < 2:
        raise ValueError(f"W1: expected shape (..., D, Hm), got {W1.shape}")
    D, Hm = W1.shape[-2:]
    lead = W1.shape[:-2]
    if W2.shape != (*lead, Hm, D):
        raise ValueError(
            f"W2: expected shape (..., Hm, D) = {(*lead, Hm, D)} to match W1 {W1.shape}, got {W2.shape}"
        )
    if W2.dtype != W1.dtype:
        raise ValueError(f"W2: expected dtype {W1.dtype} (that of W1), got {W2.dtype}")
    check_tokens(lead, D, W1.dtype, "W1", **tokens)
    return D, Hm


def check_tokens(lead, D, dtype, ref: str, **tokens) -> None:
    """Token arrays (..., N, D) with W's leading dims, one N and ``ref``'s dtype, else ValueError.
    Public: the CPU port uses it (fast/cpu/mlp_memory.py)."""
    N = None
    first = None
    for name, x in tokens.items():
        check_array(name, x, f"(..., N, {D})")
        if x.ndim != len(lead) + 2 or x.shape[:-2] != tuple(lead) or x.shape[-1] != D:
            raise ValueError(
                f"{name}: expected shape (..., N, D) = {(*lead, 'N', D)} (leading dims and D from {ref}), got {x.shape}"
            )
        if N is None:
            N, first = x.shape[-2], name
        elif x.shape[-2] != N:
            raise ValueError(f"{name}: expected shape {(*lead, N, D)} (N from {first}), got {x.shape}")
        if x.dtype != dtype:
            raise ValueError(f"{name}: expected dtype {dtype} (that of {ref}), got {x.dtype}")


def _act(act: str, h: np.ndarray):
    """(s(h), s'(h), s''(h)) in h's dtype (the primitives may promote float32 through constants)."""
    f, df, d2f = check_activation(act)
    return (
        np.asarray(f(h)).astype(h.dtype, copy=False),
        np.asarray(df(h)).astype(h.dtype, copy=False),
        np.asarray(d2f(h)).astype(h.dtype, copy=False),
    )


# ---------------------------------------------------------------------------------------------
# LayerNorm without affine parameters over the last axis, and its Jacobian (symmetric).
# ---------------------------------------------------------------------------------------------


def _layernorm(b: np.ndarray, eps: float):
    """c = (b - mean b) / sqrt(var b + eps), biased variance over the last axis; returns (c, rstd)."""
    xc = b - np.mean(b, axis=-1, keepdims=True)  # (..., N, D)
    var = np.mean(xc * xc, axis=-1, keepdims=True)  # (..., N, 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (..., N, 1)
    return xc * rstd, rstd


def _layernorm_jvp(g: np.ndarray, c: np.ndarray, rstd: np.ndarray) -> np.ndarray:
    """J g with J = dLN/db = rstd (I - 1 1^T / D - c c^T / D); J is symmetric, so this is also J^T g."""
    gbar = np.mean(g, axis=-1, keepdims=True)  # (..., N, 1)
    gc = np.mean(g * c, axis=-1, keepdims=True)  # (..., N, 1)
    return rstd * (g - gbar - c * gc)  # (..., N, D)


# ---------------------------------------------------------------------------------------------
# The read M(z) and its backward.
# ---------------------------------------------------------------------------------------------


def _read(W1, W2, z, act, layernorm, eps):
    h = np.einsum("...hd,...nd->...nh", W2, z)  # (..., N, Hm)   W2 z
    a, sp, spp = _act(act, h)  # (..., N, Hm)   s(W2 z), s', s''
    b = np.einsum("...dh,...nh->...nd", W1, a)  # (..., N, D)    W1 s(W2 z)
    if layernorm:
        c, rstd = _layernorm(b, eps)  # (..., N, D), (..., N, 1)
    else:
        c, rstd = b, None
    y = z + c  # Eq. (89)      M(z) = z + W1 s(W2 z)  [or z + LN(.)]
    return y, h, a, sp, spp, c, rstd


def mlp_memory_forward(W1, W2, z, act="gelu", layernorm=False, eps=1e-5):
    """The read ``y = M(z) = z + W1 s(W2 z)`` (or ``z + LN(W1 s(W2 z))``) for every token.

    W1 (..., D, Hm), W2 (..., Hm, D), z (..., N, D) with the same leading dims -> y (..., N, D).
    """
    check_mlp(W1, W2, z=z)
    y, h, a, sp, _, c, rstd = _read(W1, W2, z, act, layernorm, eps)
    cache = {"W1": W1, "W2": W2, "z": z, "a": a, "sp": sp, "c": c, "rstd": rstd, "layernorm": layernorm}
    return y, cache


def mlp_memory_backward(dy, cache):
    """VJP of the read: ``dy`` (..., N, D) -> (dW1, dW2, dz), shaped like (W1, W2, z)."""
    W1, W2, z, a, sp = cache["W1"], cache["W2"], cache["z"], cache["a"], cache["sp"]
    check_tokens(W1.shape[:-2], W1.shape[-2], W1.dtype, "the cached W1", dy=dy)
    if dy.shape != z.shape:
        raise ValueError(f"dy: expected shape {z.shape} (that of z), got {dy.shape}")
    db = _layernorm_jvp(dy, cache["c"], cache["rstd"]) if cache["layernorm"] else dy  # (..., N, D)
    dW1 = np.einsum("...nd,...nh->...dh", db, a)  # (..., D, Hm)
    dh = np.einsum("...dh,...nd->...nh", W1, db) * sp  # (..., N, Hm)
    dW2 = np.einsum("...nh,...nd->...hd", dh, z)  # (..., Hm, D)
    dz = dy + np.einsum("...hd,...nh->...nd", W2, dh)  # (..., N, D)
    return dW1, dW2, dz


# ---------------------------------------------------------------------------------------------
# The inner loss and its per-token gradient as rank-1 factors.
# ---------------------------------------------------------------------------------------------


def inner_loss(W1, W2, k, v_hat, act="gelu", layernorm=False, eps=1e-5):
    """Per-token inner loss ``l_n = ||M(k_n) - v_hat_n||^2`` (Eq. 86), shape (..., N)."""
    check_mlp(W1, W2, k=k, v_hat=v_hat)
    y = _read(W1, W2, k, act, layernorm, eps)[0]  # (..., N, D)
    r = y - v_hat  # (..., N, D)
    return np.einsum("...nd,...nd->...n", r, r)  # Eq. (86)   ||M(k) - v_hat||^2


def inner_grad(W1, W2, k, v_hat, act="gelu", layernorm=False, eps=1e-5):
    """Per-token gradient of ``l_n = ||M(k_n) - v_hat_n||^2`` w.r.t. (W1, W2) as rank-1 factors.

    Returns ``(u1, a, u2, cache)`` with ``dl_n/dW1 = u1_n a_n^T`` and ``dl_n/dW2 = u2_n k_n^T``;
    u1 (..., N, D), a (..., N, Hm), u2 (..., N, Hm). ``v_hat`` is a constant inside this formula.
    """
    check_mlp(W1, W2, k=k, v_hat=v_hat)
    y, h, a, sp, spp, c, rstd = _read(W1, W2, k, act, layernorm, eps)
    g = 2 * (y - v_hat)  # (..., N, D)    dl/dM(k) = 2 r
    u1 = _layernorm_jvp(g, c, rstd) if layernorm else g  # (..., N, D)    J_LN^T 2 r
    w = np.einsum("...dh,...nd->...nh", W1, u1)  # (..., N, Hm)   W1^T u1
    u2 = sp * w  # (..., N, Hm)   s'(W2 k) * W1^T u1
    cache = {
        "W1": W1, "W2": W2, "k": k, "a": a, "sp": sp, "spp": spp, "c": c, "rstd": rstd,
        "g": g, "u1": u1, "w": w, "layernorm": layernorm,
    }  # fmt: skip
    return u1, a, u2, cache


def inner_grad_dense(W1, W2, k, v_hat, act="gelu", layernorm=False, eps=1e-5):
    """The per-token gradient matrices ``G1 = u1 a^T`` (..., N, D, Hm), ``G2 = u2 k^T`` (..., N, Hm, D)."""
    u1, a, u2, _ = inner_grad(W1, W2, k, v_hat, act=act, layernorm=layernorm, eps=eps)
    G1 = np.einsum("...nd,...nh->...ndh", u1, a)  # (..., N, D, Hm)   dl_n/dW1
    G2 = np.einsum("...nh,...ne->...nhe", u2, k)  # (..., N, Hm, D)   dl_n/dW2
    return G1, G2


def inner_grad_backward(du1, da, du2, cache):
    """VJP of the factor map (W1, W2, k, v_hat) -> (u1, a, u2) of ``inner_grad``.

    du1 (..., N, D), da (..., N, Hm), du2 (..., N, Hm) -> (dW1, dW2, dk, dv_hat). Goes through
    s'' and, with LayerNorm, through the derivative of LN's Jacobian. Only the returned factors
    are differentiated: the explicit ``k`` in ``dl/dW2 = u2 k^T`` is the caller's.
    """
    W1, W2, k = cache["W1"], cache["W2"], cache["k"]
    a, sp, spp, c, rstd = cache["a"], cache["sp"], cache["spp"], cache["c"], cache["rstd"]
    g, u1, w = cache["g"], cache["u1"], cache["w"]
    lead, D, Hm, N = W1.shape[:-2], W1.shape[-2], W1.shape[-1], k.shape[-2]
    for name, x, shape in (
        ("du1", du1, (*lead, N, D)),
        ("da", da, (*lead, N, Hm)),
        ("du2", du2, (*lead, N, Hm)),
    ):
        check_array(name, x, str(shape))
        if x.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    # u2 = s'(h) * w,  w = W1^T u1
    dw = du2 * sp  # (..., N, Hm)
    dh = du2 * w * spp  # (..., N, Hm)   through s''(h)
    dW1 = np.einsum("...nd,...nh->...dh", u1, dw)  # (..., D, Hm)
    p = du1 + np.einsum("...dh,...nh->...nd", W1, dw)  # (..., N, D)    total cotangent of u1
    # u1 = J(b)^T g  (or u1 = g without LN)
    if cache["layernorm"]:
        dg = _layernorm_jvp(p, c, rstd)  # (..., N, D)    J p (J symmetric)
        # derivative of <p, J(b) g> w.r.t. b: J depends on b through (c, rstd)
        Dn = c.shape[-1]
        S = np.sum(p * u1, axis=-1, keepdims=True)  # (..., N, 1)    <p, u1>
        P = np.sum(p * c, axis=-1, keepdims=True)  # (..., N, 1)    <p, c>
        G = np.sum(g * c, axis=-1, keepdims=True)  # (..., N, 1)    <g, c>
        db = -rstd * S * c / Dn + _layernorm_jvp(-(rstd / Dn) * (G * p + P * g), c, rstd)  # (..., N, D)
    else:
        dg = p  # (..., N, D)
        db = np.zeros_like(p)  # (..., N, D)
    # g = 2 r,  r = k + c - v_hat,  c = LN(b) (or b)
    dr = 2 * dg  # (..., N, D)
    dv_hat = -dr  # (..., N, D)
    db = db + (_layernorm_jvp(dr, c, rstd) if cache["layernorm"] else dr)  # (..., N, D)
    # b = W1 a,  a = s(h),  h = W2 k
    dW1 = dW1 + np.einsum("...nd,...nh->...dh", db, a)  # (..., D, Hm)
    da_tot = da + np.einsum("...dh,...nd->...nh", W1, db)  # (..., N, Hm)
    dh = dh + da_tot * sp  # (..., N, Hm)
    dW2 = np.einsum("...nh,...nd->...hd", dh, k)  # (..., Hm, D)
    dk = dr + np.einsum("...hd,...nh->...nd", W2, dh)  # (..., N, D)
    return dW1, dW2, dk, dv_hat


# ---------------------------------------------------------------------------------------------
# The matrix memory M k with the same interface.
# ---------------------------------------------------------------------------------------------


def check_matrix(M, k, **values) -> None:
    """Validate a matrix memory M (..., Dv, Dk), keys k (..., N, Dk) and value arrays (..., N, Dv).
    Public: the CPU port uses it (fast/cpu/mlp_memory.py)."""
    check_array("M", M, "(..., Dv, Dk)")
    if M.ndim < 2:
        raise ValueError(f"M: expected shape (..., Dv, Dk), got {M.shape}")
    lead, Dv, Dk = M.shape[:-2], M.shape[-2], M.shape[-1]
    check_tokens(lead, Dk, M.dtype, "M", k=k)
    if values:
        N = k.shape[-2]
        for name, x in values.items():
            check_array(name, x, f"(..., N, {Dv})")
            if x.shape != (*lead, N, Dv):
                raise ValueError(f"{name}: expected shape (..., N, Dv) = {(*lead, N, Dv)}, got {x.shape}")
            if x.dtype != M.dtype:
                raise ValueError(f"{name}: expected dtype {M.dtype} (that of M), got {x.dtype}")


def matrix_memory_forward(M, k):
    """The read ``y = M k`` for every token: M (..., Dv, Dk), k (..., N, Dk) -> y (..., N, Dv)."""
    check_matrix(M, k)
    y = np.einsum("...vk,...nk->...nv", M, k)  # Eq. (15)   y = M k
    return y, {"M": M, "k": k}


def matrix_memory_backward(dy, cache):
    """VJP of the matrix read: dy (..., N, Dv) -> (dM, dk)."""
    M, k = cache["M"], cache["k"]
    check_matrix(M, k, dy=dy)
    dM = np.einsum("...nv,...nk->...vk", dy, k)  # (..., Dv, Dk)
    dk = np.einsum("...vk,...nv->...nk", M, dy)  # (..., N, Dk)
    return dM, dk


def matrix_inner_loss(M, k, v_hat):
    """Per-token ``l_n = ||M k_n - v_hat_n||^2``, shape (..., N)."""
    check_matrix(M, k, v_hat=v_hat)
    r = np.einsum("...vk,...nk->...nv", M, k) - v_hat  # (..., N, Dv)
    return np.einsum("...nv,...nv->...n", r, r)  # Eq. (86)


def matrix_inner_grad(M, k, v_hat):
    """``dl_n/dM = u_n k_n^T`` with ``u = 2 (M k - v_hat)`` (..., N, Dv); returns (u, cache)."""
    check_matrix(M, k, v_hat=v_hat)
    u = 2 * (np.einsum("...vk,...nk->...nv", M, k) - v_hat)  # Eq. (93)   2 (M k - v_hat)
    return u, {"M": M, "k": k}


def matrix_inner_grad_dense(M, k, v_hat):
    """Per-token gradient matrices ``G = u k^T`` (..., N, Dv, Dk)."""
    u, _ = matrix_inner_grad(M, k, v_hat)
    return np.einsum("...nv,...nk->...nvk", u, k)  # (..., N, Dv, Dk)


def matrix_inner_grad_backward(du, cache):
    """VJP of (M, k, v_hat) -> u = 2 (M k - v_hat): du (..., N, Dv) -> (dM, dk, dv_hat)."""
    M, k = cache["M"], cache["k"]
    check_matrix(M, k, du=du)
    dM = 2 * np.einsum("...nv,...nk->...vk", du, k)  # (..., Dv, Dk)
    dk = 2 * np.einsum("...vk,...nv->...nk", M, du)  # (..., N, Dk)
    dv_hat = -2 * du  # (..., N, Dv)
    return dM, dk, dv_hat
