"""Numba/BLAS port of the residual MLP memory, its read and its per-token inner gradient (with the VJP).

Paper: §8.1-8.2, Eqs. (86)-(93), arXiv 2512.24695v1. Specification: reference/mlp_memory.py and
SPEC.md#mlp-memory; this module computes the same functions with the same signatures, return
structures and dtypes.

Symbols (as in the reference; leading dims ``...`` are per sequence / per head):

| paper          | code        | shape          |
| -------------- | ----------- | -------------- |
| z, k           | z, k        | (..., N, D)    |
| v̂              | v_hat       | (..., N, D)    |
| W_1, W_2       | W1, W2      | (..., D, Hm), (..., Hm, D) |
| W_2 z, σ(W_2 z)| h, a        | (..., N, Hm)   |
| M(z)           | y           | (..., N, D)    |
| factors        | u1, a, u2   | (..., N, D), (..., N, Hm), (..., N, Hm) |
| matrix M       | M           | (..., Dv, Dk)  |

How it is fast: every einsum of the reference becomes a stacked matrix product (``np.matmul``, BLAS)
and the activation triple (s, s', s'') is one compiled element-wise pass, so the GELU's erf is
evaluated once per element instead of three times through SciPy. In float32 that pass is
fast/cpu/vmath.py's vectorised one (NumPy's SIMD exp, then a branch-free float32 loop; a few ulps
from the exact function, SPEC.md#fast-cpu); float64 and softplus keep ``_act_kernel``'s scalar
libm calls. Measured for the hope-small shape (4, 4, 16, 128), GELU with s'': see ``_act``.

Decisions (the reference's, SPEC.md#mlp-memory); port-specific ones:
- complex inputs (the reference's complex-step path) fall back to the reference explicitly
  (``_fallback``); the caches carry ``"fast": True`` so each backward knows which forward made them;
- validation is the reference's own checks, so bad input raises the same ``ValueError``;
- ``blas_single_thread()``: the layers (fast.cpu.titans, fast.cpu.selfmod) run their many small
  products with one BLAS thread. Measured on the 2-core machine under load (other processes
  running): a (1024, 128) x (128, 128) float32 product took 0.2-8 ms with OpenBLAS's 2 threads
  (spinning threads descheduled) and the Titans layer 0.59 s vs 0.16 s with 1 thread.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ...reference import mlp_memory as R
from . import blas, vmath

_ACT_CODES = {"sigmoid": vmath.SIGMOID, "silu": vmath.SILU, "gelu": vmath.GELU, "softplus": 3}
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# Compiled kernels.
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _sigmoid_scalar(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    ex = math.exp(x)
    return ex / (1.0 + ex)


@njit(cache=True, nogil=True)
def _act_kernel(h, code, second, f, df, d2f):
    """(s(h), s'(h), s''(h)) element-wise over flat arrays; d2f is filled only when ``second``."""
    for i in range(h.size):
        x = h[i]
        if code == 2:  # gelu: x Phi(x)
            cdf = 0.5 * (1.0 + math.erf(x * _INV_SQRT2))
            pdf = _INV_SQRT_2PI * math.exp(-0.5 * x * x)
            f[i] = x * cdf
            df[i] = cdf + x * pdf
            if second:
                d2f[i] = pdf * (2.0 - x * x)
        else:
            s = _sigmoid_scalar(x)
            ds = s * (1.0 - s)
            if code == 0:  # sigmoid
                f[i] = s
                df[i] = ds
                if second:
                    d2f[i] = ds * (1.0 - 2.0 * s)
            elif code == 1:  # silu
                f[i] = x * s
                df[i] = s * (1.0 + x * (1.0 - s))
                if second:
                    d2f[i] = 2.0 * ds + x * ds * (1.0 - 2.0 * s)
            else:  # softplus: log(1 + e^x), stable
                f[i] = max(x, 0.0) + math.log1p(math.exp(-abs(x)))
                df[i] = s
                if second:
                    d2f[i] = ds


def _act(act: str, h: np.ndarray, second: bool = True):
    """(s(h), s'(h), s''(h) or None) in h's dtype, one compiled pass (float32 sigmoid / silu / gelu:
    ``vmath.activation``, the codes are the same)."""
    R.check_activation(act)
    flat = np.ascontiguousarray(h).reshape(-1)
    if flat.dtype == np.float32 and act != "softplus":
        f, df, d2f = vmath.activation(_ACT_CODES[act], vmath.F_DF_D2F if second else vmath.F_DF, flat)
        return f.reshape(h.shape), df.reshape(h.shape), (d2f.reshape(h.shape) if second else None)
    f, df = np.empty_like(flat), np.empty_like(flat)
    d2f = np.empty_like(flat) if second else np.empty(0, dtype=flat.dtype)
    _act_kernel(flat, _ACT_CODES[act], second, f, df, d2f)
    return f.reshape(h.shape), df.reshape(h.shape), (d2f.reshape(h.shape) if second else None)


def blas_single_thread():
    """Context manager limiting BLAS to one thread (``fast.cpu.blas.limited``: re-entrant, so the
    model's worker threads do not restore each other's limits; inside an outer limit it changes
    nothing)."""
    return blas.limited(1)


def _T(a):
    return np.swapaxes(a, -1, -2)


def _fallback(*arrays) -> bool:
    """True when the reference must run this call (complex input: the complex-step path)."""
    return any(isinstance(a, np.ndarray) and np.iscomplexobj(a) for a in arrays)


# ---------------------------------------------------------------------------------------------
# LayerNorm without affine parameters (same definition as the reference).
# ---------------------------------------------------------------------------------------------


def _layernorm(b, eps):
    xc = b - np.mean(b, axis=-1, keepdims=True)  # (..., N, D)
    var = np.mean(xc * xc, axis=-1, keepdims=True)  # (..., N, 1)
    rstd = (1.0 / np.sqrt(var + eps)).astype(b.dtype, copy=False)  # (..., N, 1)
    return xc * rstd, rstd


def _layernorm_jvp(g, c, rstd):
    gbar = np.mean(g, axis=-1, keepdims=True)
    gc = np.mean(g * c, axis=-1, keepdims=True)
    return rstd * (g - gbar - c * gc)  # (..., N, D)


# ---------------------------------------------------------------------------------------------
# The read and its backward.
# ---------------------------------------------------------------------------------------------


def _read(W1, W2, z, act, layernorm, eps, second):
    h = z @ _T(W2)  # (..., N, Hm)   W2 z
    a, sp, spp = _act(act, h, second)  # (..., N, Hm)
    b = a @ _T(W1)  # (..., N, D)    W1 s(W2 z)
    if layernorm:
        c, rstd = _layernorm(b, eps)
    else:
        c, rstd = b, None
    y = z + c  # Eq. (89)
    return y, h, a, sp, spp, c, rstd


def mlp_memory_forward(W1, W2, z, act="gelu", layernorm=False, eps=1e-5, *, check=True):
    """Same as ``reference.mlp_memory.mlp_memory_forward``: y = M(z), (y, cache).

    ``check=False``: the caller has checked the arrays (real, matching shapes and dtypes) once for
    many calls, as ``fast.cpu.selfmod`` does per layer call; this call then neither checks them nor
    looks for the complex-step fallback (a hope-small-online-cms step 0.95x / 0.90x at 1 / 2 x 128,
    paired in one process, docs/performance.md#cpu-small-periods-2)."""
    if check and _fallback(W1, W2, z):
        return R.mlp_memory_forward(W1, W2, z, act=act, layernorm=layernorm, eps=eps)
    if check:
        R.check_mlp(W1, W2, z=z)
    y, h, a, sp, _, c, rstd = _read(W1, W2, z, act, layernorm, eps, second=False)
    cache = {"W1": W1, "W2": W2, "z": z, "a": a, "sp": sp, "c": c, "rstd": rstd, "layernorm": layernorm,
             "fast": True}  # fmt: skip
    return y, cache


def mlp_memory_backward(dy, cache, *, check=True):
    """Same as ``reference.mlp_memory.mlp_memory_backward``: (dW1, dW2, dz). ``check``: see
    ``mlp_memory_forward`` (dy then has z's shape and dtype by the caller's construction)."""
    if not cache.get("fast"):
        return R.mlp_memory_backward(dy, cache)
    W1, W2, z, a, sp = cache["W1"], cache["W2"], cache["z"], cache["a"], cache["sp"]
    if check:
        R.check_tokens(W1.shape[:-2], W1.shape[-2], W1.dtype, "the cached W1", dy=dy)
        if dy.shape != z.shape:
            raise ValueError(f"dy: expected shape {z.shape} (that of z), got {dy.shape}")
    db = _layernorm_jvp(dy, cache["c"], cache["rstd"]) if cache["layernorm"] else dy  # (..., N, D)
    dW1 = _T(db) @ a  # (..., D, Hm)
    dh = (db @ W1) * sp  # (..., N, Hm)
    dW2 = _T(dh) @ z  # (..., Hm, D)
    dz = dy + dh @ W2  # (..., N, D)
    return dW1, dW2, dz


# ---------------------------------------------------------------------------------------------
# Inner loss, inner gradient (rank-1 factors) and its VJP.
# ---------------------------------------------------------------------------------------------


def inner_loss(W1, W2, k, v_hat, act="gelu", layernorm=False, eps=1e-5):
    """Same as the reference: l_n = ||M(k_n) - v_hat_n||^2, (..., N)."""
    if _fallback(W1, W2, k, v_hat):
        return R.inner_loss(W1, W2, k, v_hat, act=act, layernorm=layernorm, eps=eps)
    R.check_mlp(W1, W2, k=k, v_hat=v_hat)
    r = _read(W1, W2, k, act, layernorm, eps, second=False)[0] - v_hat  # (..., N, D)
    return np.sum(r * r, axis=-1)  # Eq. (86)


def inner_grad(W1, W2, k, v_hat, act="gelu", layernorm=False, eps=1e-5, *, check=True):
    """Same as the reference: (u1, a, u2, cache) with dl_n/dW1 = u1_n a_n^T, dl_n/dW2 = u2_n k_n^T.
    ``check``: see ``mlp_memory_forward``."""
    if check and _fallback(W1, W2, k, v_hat):
        return R.inner_grad(W1, W2, k, v_hat, act=act, layernorm=layernorm, eps=eps)
    if check:
        R.check_mlp(W1, W2, k=k, v_hat=v_hat)
    y, h, a, sp, spp, c, rstd = _read(W1, W2, k, act, layernorm, eps, second=True)
    g = 2 * (y - v_hat)  # (..., N, D)   Eq. (93)
    u1 = _layernorm_jvp(g, c, rstd) if layernorm else g  # (..., N, D)
    w = u1 @ W1  # (..., N, Hm)   W1^T u1
    u2 = sp * w  # (..., N, Hm)
    cache = {"W1": W1, "W2": W2, "k": k, "a": a, "sp": sp, "spp": spp, "c": c, "rstd": rstd,
             "g": g, "u1": u1, "w": w, "layernorm": layernorm, "fast": True}  # fmt: skip
    return u1, a, u2, cache


def inner_grad_dense(W1, W2, k, v_hat, act="gelu", layernorm=False, eps=1e-5):
    """Same as the reference: (G1 (..., N, D, Hm), G2 (..., N, Hm, D))."""
    u1, a, u2, _ = inner_grad(W1, W2, k, v_hat, act=act, layernorm=layernorm, eps=eps)
    return u1[..., :, None] * a[..., None, :], u2[..., :, None] * k[..., None, :]


def inner_grad_backward(du1, da, du2, cache):
    """Same as the reference: VJP of (W1, W2, k, v_hat) -> (u1, a, u2); (dW1, dW2, dk, dv_hat)."""
    if not cache.get("fast"):
        return R.inner_grad_backward(du1, da, du2, cache)
    W1, W2, k = cache["W1"], cache["W2"], cache["k"]
    a, sp, spp, c, rstd = cache["a"], cache["sp"], cache["spp"], cache["c"], cache["rstd"]
    g, u1, w = cache["g"], cache["u1"], cache["w"]
    lead, D, Hm, N = W1.shape[:-2], W1.shape[-2], W1.shape[-1], k.shape[-2]
    for name, x, shape in (("du1", du1, (*lead, N, D)), ("da", da, (*lead, N, Hm)), ("du2", du2, (*lead, N, Hm))):
        R.check_array(name, x, str(shape))
        if x.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    dw = du2 * sp  # (..., N, Hm)
    dh = du2 * w * spp  # (..., N, Hm)
    p = du1 + dw @ _T(W1)  # (..., N, D)
    if cache["layernorm"]:
        dg = _layernorm_jvp(p, c, rstd)
        Dn = c.shape[-1]
        S = np.sum(p * u1, axis=-1, keepdims=True)
        Pc = np.sum(p * c, axis=-1, keepdims=True)
        G = np.sum(g * c, axis=-1, keepdims=True)
        db = -rstd * S * c / Dn + _layernorm_jvp(-(rstd / Dn) * (G * p + Pc * g), c, rstd)
        dr = 2 * dg
        db = db + _layernorm_jvp(dr, c, rstd)
    else:
        dr = 2 * p
        db = dr
    dv_hat = -dr  # (..., N, D)
    # dW1 = sum_n u1 dw^T + sum_n db a^T  in one product: [u1 | db]^T [dw ; a]
    dW1 = _T(u1) @ dw + _T(db) @ a  # (..., D, Hm)
    dh = dh + (da + db @ W1) * sp  # (..., N, Hm)
    dW2 = _T(dh) @ k  # (..., Hm, D)
    dk = dr + dh @ W2  # (..., N, D)
    return dW1, dW2, dk, dv_hat


# ---------------------------------------------------------------------------------------------
# The matrix memory.
# ---------------------------------------------------------------------------------------------


def matrix_memory_forward(M, k):
    """Same as the reference: y = M k, (y, cache)."""
    if _fallback(M, k):
        return R.matrix_memory_forward(M, k)
    R.check_matrix(M, k)
    return k @ _T(M), {"M": M, "k": k, "fast": True}  # Eq. (15)


def matrix_memory_backward(dy, cache):
    """Same as the reference: (dM, dk)."""
    if not cache.get("fast"):
        return R.matrix_memory_backward(dy, cache)
    M, k = cache["M"], cache["k"]
    R.check_matrix(M, k, dy=dy)
    return _T(dy) @ k, dy @ M


def matrix_inner_loss(M, k, v_hat):
    """Same as the reference: l_n = ||M k_n - v_hat_n||^2."""
    if _fallback(M, k, v_hat):
        return R.matrix_inner_loss(M, k, v_hat)
    R.check_matrix(M, k, v_hat=v_hat)
    r = k @ _T(M) - v_hat
    return np.sum(r * r, axis=-1)  # Eq. (86)


def matrix_inner_grad(M, k, v_hat):
    """Same as the reference: u = 2 (M k - v_hat), (u, cache)."""
    if _fallback(M, k, v_hat):
        return R.matrix_inner_grad(M, k, v_hat)
    R.check_matrix(M, k, v_hat=v_hat)
    return 2 * (k @ _T(M) - v_hat), {"M": M, "k": k, "fast": True}  # Eq. (93)


def matrix_inner_grad_dense(M, k, v_hat):
    """Same as the reference: G = u k^T (..., N, Dv, Dk)."""
    u, _ = matrix_inner_grad(M, k, v_hat)
    return u[..., :, None] * k[..., None, :]


def matrix_inner_grad_backward(du, cache):
    """Same as the reference: (dM, dk, dv_hat)."""
    if not cache.get("fast"):
        return R.matrix_inner_grad_backward(du, cache)
    M, k = cache["M"], cache["k"]
    R.check_matrix(M, k, du=du)
    return 2 * (_T(du) @ k), 2 * (du @ M), -2 * du
