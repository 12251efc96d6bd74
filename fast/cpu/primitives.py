"""Primitive layers, compiled for the CPU: the reference's forward/backward pairs on Numba + BLAS.

Paper: §5, Eqs. (62)-(63), arXiv 2512.24695v1 (softmax attention); the other ops are the Llama
building blocks of NL §8.3 / Titans §4.4. SPEC: SPEC.md#primitives (the definitions),
SPEC.md#fast-cpu (how the port is built and checked).

This module computes the SAME functions as ``reference/primitives.py`` with the same names,
signatures, return structures, caches and dtypes; the reference is the specification. Matrix
products are plain NumPy matmuls on 2-D / stacked views (BLAS, instead of the reference's
``np.einsum``); row-wise and element-wise work (norms, activations, softmax, cross-entropy, RoPE,
conv, the embedding scatter) runs in ``@njit(cache=True, nogil=True)`` kernels at module level.

Symbols (paper symbol -> code name, shape): as in reference/primitives.py.

    x            x          (..., D)           an input, features last (kernels see it as (N, D))
    W            W          (D_out, D_in)      linear convention y = x W^T
    E            E          (V, D)             embedding table
    g            g          (D,)               norm gain
    q, k, v      q, k, v    (B, H, T, d_h)     attention
    p            p          (B, H, T_q, T_k)   attention weights, Eq. (63)

Decisions (SPEC.md#fast-cpu):
    - the caches have the reference's layout, so a fast backward accepts a reference cache and
      the reverse: the equivalence tests use that to test each backward on its own;
    - complex input (the reference's complex-step path) and ops not on the training path
      (layernorm, softplus, the generic softmax) are NOT compiled: those calls fall back to the
      reference explicitly (``_reference_fallback``), visible and counted in ``FALLBACKS``;
    - float32 activations (silu, gelu, sigmoid, their derivatives, the SwiGLU gate) take the
      vectorised path of fast/cpu/vmath.py (NumPy's SIMD exp + branch-free float32 loops, a few
      ulps from the exact function); float64 keeps the scalar libm kernels below (the
      verification path);
    - kernels store in the input dtype but accumulate row sums in float64 scalars; no fastmath, no ``prange``:
      every row is reduced by one thread in a fixed order, so results do not depend on the thread
      count (BLAS's own threading is the only parallelism);
    - the summation order differs from NumPy's pairwise sums, so results agree with the reference
      to rounding, within the ("float32" | "float64", "port") rows of tests/tolerances.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numba import njit

from ...reference import primitives as R
from ...reference.primitives import (  # element-wise triples and the argument checks are shared
    ACTIVATIONS,
    check_shape,
    d2gelu,
    d2sigmoid,
    d2silu,
    d2softplus,
    dsigmoid,
    dsoftplus,
    float_array,
    int_array,
    sigmoid,
    softplus,
)
from . import vmath

FALLBACKS: dict[str, int] = {}
"""op name -> how many calls fell back to the reference (the equivalence tests assert 0)."""


def _reference_fallback(name: str) -> Callable:
    """The reference's op of that name; counted, so a test can prove its inputs stayed compiled."""
    FALLBACKS[name] = FALLBACKS.get(name, 0) + 1
    return getattr(R, name)


def _is_complex(*arrays) -> bool:
    return any(a is not None and np.iscomplexobj(a) for a in arrays)


def _rows(a: np.ndarray) -> np.ndarray:
    """(..., D) -> a C-contiguous (N, D) view or copy."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


# ---------------------------------------------------------------------------------------------
# Kernels: element-wise activations
# ---------------------------------------------------------------------------------------------

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(cache=True, nogil=True)
def _sigmoid_scalar(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@njit(cache=True, nogil=True)
def _act_kernel(x, kind, order):
    """f (order 0) or f' (order 1) of silu (kind 0) / gelu (kind 1) / sigmoid (kind 2), element-wise
    over a 1-D array, in its dtype: the float64 path (float32 takes ``vmath``), ~9-10 ns per element
    (scalar libm erf/exp and a branch per element: LLVM cannot vectorise it)."""
    out = np.empty_like(x)
    for i in range(x.size):
        v = x[i]
        if kind == 0:
            s = _sigmoid_scalar(v)
            out[i] = v * s if order == 0 else s * (1.0 + v * (1.0 - s))
        elif kind == 1:
            cdf = 0.5 * (1.0 + math.erf(v * _SQRT_HALF))
            out[i] = v * cdf if order == 0 else cdf + v * _INV_SQRT_2PI * math.exp(-0.5 * v * v)
        else:
            s = _sigmoid_scalar(v)
            out[i] = s if order == 0 else s * (1.0 - s)
    return out


@njit(cache=True, nogil=True)
def _act_pair_kernel(x, kind):
    """(f, f') of silu (kind 0) / gelu (kind 1) in one pass (one sigmoid or erf per element), the
    same expressions as ``_act_kernel``'s two orders."""
    f = np.empty_like(x)
    df = np.empty_like(x)
    for i in range(x.size):
        v = x[i]
        if kind == 0:
            s = _sigmoid_scalar(v)
            f[i] = v * s
            df[i] = s * (1.0 + v * (1.0 - s))
        else:
            cdf = 0.5 * (1.0 + math.erf(v * _SQRT_HALF))
            f[i] = v * cdf
            df[i] = cdf + v * _INV_SQRT_2PI * math.exp(-0.5 * v * v)
    return f, df


_KIND = {"silu": 0, "gelu": 1, "sigmoid": 2}
_VKIND = {"silu": vmath.SILU, "gelu": vmath.GELU, "sigmoid": vmath.SIGMOID}


def act_and_grad(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f(x), f'(x)) of a compiled activation (silu, gelu) in one pass; other activations and
    complex or non-float input take ``FAST_ACTIVATIONS``' two calls."""
    x = np.asarray(x)
    if name not in ("silu", "gelu") or _is_complex(x) or x.dtype.kind != "f":
        f, df, _ = FAST_ACTIVATIONS[name]
        return f(x), df(x)
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.float32:
        f, df, _ = vmath.activation(_VKIND[name], vmath.F_DF, flat)
    else:
        f, df = _act_pair_kernel(flat, _KIND[name])
    return f.reshape(x.shape), df.reshape(x.shape)


def _act(name: str, order: int, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if _is_complex(x) or x.dtype.kind != "f":
        f = {("silu", 0): R.silu, ("silu", 1): R.dsilu, ("gelu", 0): R.gelu, ("gelu", 1): R.dgelu,
             ("sigmoid", 0): R.sigmoid, ("sigmoid", 1): R.dsigmoid}[(name, order)]
        FALLBACKS[name] = FALLBACKS.get(name, 0) + 1
        return f(x)
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.float32:
        return vmath.activation(_VKIND[name], (vmath.F, vmath.DF)[order], flat)[order].reshape(x.shape)
    return _act_kernel(flat, _KIND[name], order).reshape(x.shape)


def silu(x):
    """silu(x) = x sigmoid(x) (compiled)."""
    return _act("silu", 0, x)


def dsilu(x):
    return _act("silu", 1, x)


def gelu(x):
    """Exact GELU x Phi(x) (compiled, erf)."""
    return _act("gelu", 0, x)


def dgelu(x):
    return _act("gelu", 1, x)


FAST_ACTIVATIONS = {"silu": (silu, dsilu, d2silu), "gelu": (gelu, dgelu, d2gelu),
                    "sigmoid": (sigmoid, dsigmoid, d2sigmoid), "softplus": (softplus, dsoftplus, d2softplus)}
"""name -> (f, f', f''): f and f' compiled for silu and gelu; the rest are the reference's."""


def silu_forward(x):
    """y = x sigmoid(x) element-wise. Returns (y, cache)."""
    x = float_array("x", x, "(...)")
    return silu(x), ("silu", x)


def silu_backward(dy, cache):
    name, x = cache
    dy = float_array("dy", dy, "(...) like x", like=x)
    check_shape("dy", dy, x.shape, "x.shape")
    return dy * _act(name, 1, x)


def gelu_forward(x):
    """y = x Phi(x) element-wise. Returns (y, cache)."""
    x = float_array("x", x, "(...)")
    return gelu(x), ("gelu", x)


gelu_backward = silu_backward  # the cache names the activation


def sigmoid_forward(x):
    x = float_array("x", x, "(...)")
    return _act("sigmoid", 0, x), ("sigmoid", x)


sigmoid_backward = silu_backward


def softplus_forward(x):
    return _reference_fallback("softplus_forward")(x)


def softplus_backward(dy, cache):
    return _reference_fallback("softplus_backward")(dy, cache)


# ---------------------------------------------------------------------------------------------
# Linear layer and embedding (BLAS; a compiled scatter-add)
# ---------------------------------------------------------------------------------------------


def linear_forward(x, W, b=None):
    """y = x W^T + b over the last axis: x (..., D_in), W (D_out, D_in), b (D_out,) or None."""
    x = float_array("x", x, "(..., D_in)", min_ndim=1)
    W = float_array("W", W, "(D_out, D_in)", ndim=2, like=x)
    if W.shape[1] != x.shape[-1]:
        raise ValueError(f"W must have shape (D_out, D_in) with D_in = {x.shape[-1]}, got shape {W.shape}")
    if b is not None:
        b = float_array("b", b, "(D_out,)", ndim=1, like=x)
        check_shape("b", b, (W.shape[0],), "(D_out,)")
    y = (_rows(x) @ W.T).reshape(x.shape[:-1] + (W.shape[0],))  # (..., D_out)
    if b is not None:
        y = y + b
    return y, (x, W, b is not None)


def linear_backward(dy, cache):
    """Returns (dx, dW, db); db is None when the forward had no bias."""
    x, W, has_b = cache
    dy = float_array("dy", dy, "(..., D_out)", like=x)
    check_shape("dy", dy, x.shape[:-1] + (W.shape[0],), "(..., D_out)")
    dy2 = _rows(dy)  # (N, D_out)
    dx = (dy2 @ W).reshape(x.shape)  # (..., D_in)
    dW = dy2.T @ _rows(x)  # (D_out, D_in)
    db = dy2.sum(axis=0) if has_b else None
    return dx, dW, db


@njit(cache=True, nogil=True)
def _scatter_rows(dE, tokens, dy):
    """dE[tokens[n]] += dy[n], in token order."""
    for n in range(tokens.size):
        dE[tokens[n]] += dy[n]


def embedding_forward(tokens, E):
    """y = E[tokens]: tokens int (...) in [0, V), E (V, D) -> y (..., D)."""
    E = float_array("E", E, "(V, D)", ndim=2)
    tokens = int_array("tokens", tokens, "(...)", upper=E.shape[0])
    return E[tokens], (tokens, E.shape, E.dtype)


def embedding_backward(dy, cache):
    """dE[v] = sum of dy over the positions whose token is v (compiled scatter-add)."""
    tokens, shape, dtype = cache
    dy = np.asarray(dy)
    if dy.shape != tokens.shape + (shape[1],):
        raise ValueError(f"dy must have shape (..., D) = {tokens.shape + (shape[1],)}, got shape {dy.shape}")
    if _is_complex(dy):
        return _reference_fallback("embedding_backward")(dy, cache)
    dE = np.zeros(shape, dtype=np.result_type(dtype, dy.dtype))  # (V, D)
    _scatter_rows(dE, np.ascontiguousarray(tokens.reshape(-1), dtype=np.int64), _rows(dy).astype(dE.dtype))
    return dE


# ---------------------------------------------------------------------------------------------
# Normalisations (one compiled pass per row)
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _rmsnorm_fwd_kernel(x, g, eps):
    N, D = x.shape
    y = np.empty_like(x)
    xhat = np.empty_like(x)
    r = np.empty((N, 1), dtype=x.dtype)
    for n in range(N):
        s = 0.0
        for d in range(D):
            s += x[n, d] * x[n, d]
        rn = 1.0 / math.sqrt(s / D + eps)
        r[n, 0] = rn
        for d in range(D):
            xhat[n, d] = x[n, d] * rn
            y[n, d] = xhat[n, d] * g[d]
    return y, xhat, r


@njit(cache=True, nogil=True)
def _rmsnorm_bwd_kernel(dy, xhat, r, g):
    N, D = dy.shape
    dx = np.empty_like(dy)
    dg = np.zeros(D, dtype=dy.dtype)
    for n in range(N):
        m = 0.0
        for d in range(D):
            m += dy[n, d] * g[d] * xhat[n, d]
            dg[d] += dy[n, d] * xhat[n, d]
        m = m / D
        for d in range(D):
            dx[n, d] = r[n, 0] * (dy[n, d] * g[d] - xhat[n, d] * m)
    return dx, dg


def rmsnorm_forward(x, g, eps=1e-6):
    """y = x / sqrt(mean(x^2) + eps) * g over the last axis; x (..., D), g (D,)."""
    x = float_array("x", x, "(..., D)", min_ndim=1)
    g = float_array("g", g, "(D,)", ndim=1, like=x)
    check_shape("g", g, x.shape[-1:], "(D,)")
    if _is_complex(x, g) or x.dtype != g.dtype:
        return _reference_fallback("rmsnorm_forward")(x, g, eps)
    y, xhat, r = _rmsnorm_fwd_kernel(_rows(x), np.ascontiguousarray(g), x.dtype.type(eps))
    return y.reshape(x.shape), (xhat.reshape(x.shape), r.reshape(x.shape[:-1] + (1,)), g)


def rmsnorm_backward(dy, cache):
    """dx = r (dxhat - xhat mean(dxhat xhat)), dxhat = dy g; dg = sum dy xhat. Returns (dx, dg)."""
    xhat, r, g = cache
    dy = float_array("dy", dy, "(..., D)", like=xhat)
    check_shape("dy", dy, xhat.shape, "(..., D)")
    if _is_complex(dy, xhat, g) or dy.dtype != xhat.dtype:
        return _reference_fallback("rmsnorm_backward")(dy, cache)
    dx, dg = _rmsnorm_bwd_kernel(_rows(dy), _rows(xhat), _rows(r), np.ascontiguousarray(g))
    return dx.reshape(dy.shape), dg


@njit(cache=True, nogil=True)
def _l2norm_fwd_kernel(x, eps):
    N, D = x.shape
    y = np.empty_like(x)
    nrm = np.empty((N, 1), dtype=x.dtype)
    for i in range(N):
        s = 0.0
        for d in range(D):
            s += x[i, d] * x[i, d]
        nrm[i, 0] = math.sqrt(s + eps)
        for d in range(D):
            y[i, d] = x[i, d] / nrm[i, 0]
    return y, nrm


@njit(cache=True, nogil=True)
def _l2norm_bwd_kernel(dy, y, nrm):
    N, D = dy.shape
    dx = np.empty_like(dy)
    for i in range(N):
        s = 0.0
        for d in range(D):
            s += dy[i, d] * y[i, d]
        for d in range(D):
            dx[i, d] = (dy[i, d] - y[i, d] * s) / nrm[i, 0]
    return dx


def l2norm_forward(x, eps=1e-6):
    """y = x / sqrt(sum(x^2) + eps) over the last axis."""
    x = float_array("x", x, "(..., D)", min_ndim=1)
    if _is_complex(x):
        return _reference_fallback("l2norm_forward")(x, eps)
    y, nrm = _l2norm_fwd_kernel(_rows(x), x.dtype.type(eps))
    return y.reshape(x.shape), (y.reshape(x.shape), nrm.reshape(x.shape[:-1] + (1,)))


def l2norm_backward(dy, cache):
    """dx = (dy - y <dy, y>) / n."""
    y, nrm = cache
    dy = float_array("dy", dy, "(..., D)", like=y)
    check_shape("dy", dy, y.shape, "(..., D)")
    if _is_complex(dy, y):
        return _reference_fallback("l2norm_backward")(dy, cache)
    return _l2norm_bwd_kernel(_rows(dy), _rows(y), _rows(nrm)).reshape(dy.shape)


def layernorm_forward(x, g=None, b=None, eps=1e-5):
    """Not on the training path: the reference's LayerNorm (explicit fallback)."""
    return _reference_fallback("layernorm_forward")(x, g, b, eps)


def layernorm_backward(dy, cache):
    return _reference_fallback("layernorm_backward")(dy, cache)


# ---------------------------------------------------------------------------------------------
# SwiGLU MLP: three BLAS products around a compiled gate
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _swiglu_gate_kernel(a, u):
    """h = silu(a) * u, element-wise over 1-D arrays (the float64 path; float32: ``_swiglu_gate``)."""
    h = np.empty_like(a)
    for i in range(a.size):
        h[i] = a[i] * _sigmoid_scalar(a[i]) * u[i]
    return h


@njit(cache=True, nogil=True)
def _swiglu_gate_bwd_kernel(dh, a, u):
    """da = dh u silu'(a), du = dh silu(a)."""
    da = np.empty_like(a)
    du = np.empty_like(a)
    for i in range(a.size):
        s = _sigmoid_scalar(a[i])
        da[i] = dh[i] * u[i] * (s * (1.0 + a[i] * (1.0 - s)))
        du[i] = dh[i] * a[i] * s
    return da, du


def _all_float32(*arrays) -> bool:
    return all(a.dtype == np.float32 for a in arrays)


def _swiglu_gate(a, u):
    """h = silu(a) * u over flat arrays: ``vmath``'s vectorised loop in float32, else the kernel."""
    if _all_float32(a, u):
        return vmath.swiglu_gate32(a, u, vmath.exp_neg_abs(a))
    return _swiglu_gate_kernel(a, u)


def _swiglu_gate_bwd(dh, a, u):
    """(da, du) of the gate over flat arrays: ``vmath`` in float32, else the kernel."""
    if _all_float32(dh, a, u):
        return vmath.swiglu_gate_bwd32(dh, a, u, vmath.exp_neg_abs(a))
    return _swiglu_gate_bwd_kernel(dh, a, u)


def swiglu_forward(x, W_gate, W_up, W_down):
    """y = (silu(x W_gate^T) * (x W_up^T)) W_down^T; W_gate, W_up (F, D), W_down (D, F)."""
    x = float_array("x", x, "(..., D)", min_ndim=1)
    D = x.shape[-1]
    W_gate = float_array("W_gate", W_gate, "(F, D)", ndim=2, like=x)
    if W_gate.shape[1] != D:
        raise ValueError(f"W_gate must have shape (F, D) with D = {D}, got shape {W_gate.shape}")
    F = W_gate.shape[0]
    W_up = float_array("W_up", W_up, "(F, D)", ndim=2, like=x)
    check_shape("W_up", W_up, (F, D), "(F, D)")
    W_down = float_array("W_down", W_down, "(D, F)", ndim=2, like=x)
    check_shape("W_down", W_down, (D, F), "(D, F)")
    if _is_complex(x, W_gate, W_up, W_down) or len({x.dtype, W_gate.dtype, W_up.dtype, W_down.dtype}) > 1:
        return _reference_fallback("swiglu_forward")(x, W_gate, W_up, W_down)
    x2 = _rows(x)  # (N, D)
    a = x2 @ W_gate.T  # (N, F)
    u = x2 @ W_up.T  # (N, F)
    h = _swiglu_gate(a.reshape(-1), u.reshape(-1)).reshape(a.shape)  # (N, F)
    y = h @ W_down.T  # (N, D)
    lead = x.shape[:-1]
    return y.reshape(x.shape), (x, W_gate, W_up, W_down, a.reshape(lead + (F,)), u.reshape(lead + (F,)),
                                h.reshape(lead + (F,)))


def swiglu_backward(dy, cache):
    """Returns (dx, dW_gate, dW_up, dW_down)."""
    x, W_gate, W_up, W_down, a, u, h = cache
    dy = float_array("dy", dy, "(..., D)", like=x)
    check_shape("dy", dy, x.shape, "(..., D)")
    if _is_complex(dy, x, W_gate) or dy.dtype != x.dtype:
        return _reference_fallback("swiglu_backward")(dy, cache)
    dy2, x2, a2, u2, h2 = _rows(dy), _rows(x), _rows(a), _rows(u), _rows(h)
    dW_down = dy2.T @ h2  # (D, F)
    dh = dy2 @ W_down  # (N, F)
    da, du = _swiglu_gate_bwd(dh.reshape(-1), a2.reshape(-1), u2.reshape(-1))
    da, du = da.reshape(dh.shape), du.reshape(dh.shape)
    dx = (da @ W_gate + du @ W_up).reshape(x.shape)  # (..., D)
    return dx, da.T @ x2, du.T @ x2, dW_down


# ---------------------------------------------------------------------------------------------
# Causal depthwise convolution with a carried state
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _conv_fwd_kernel(xp, w, T):
    Bn, _, D = xp.shape
    K = w.shape[1]
    y = np.zeros((Bn, T, D), dtype=xp.dtype)
    for b in range(Bn):
        for t in range(T):
            for j in range(K):
                for d in range(D):
                    y[b, t, d] += w[d, j] * xp[b, t + j, d]
    return y


@njit(cache=True, nogil=True)
def _conv_bwd_kernel(dy, xp, w):
    Bn, T, D = dy.shape
    K = w.shape[1]
    dxp = np.zeros(xp.shape, dtype=xp.dtype)
    dw = np.zeros(w.shape, dtype=xp.dtype)
    for b in range(Bn):
        for t in range(T):
            for j in range(K):
                for d in range(D):
                    dxp[b, t + j, d] += dy[b, t, d] * w[d, j]
                    dw[d, j] += dy[b, t, d] * xp[b, t + j, d]
    return dxp, dw


def conv1d_forward(x, w, b=None, state=None):
    """Causal depthwise convolution of width K over time. Returns (y, cache, new_state)."""
    x = float_array("x", x, "(B, T, D)", ndim=3)
    Bn, T, D = x.shape
    w = float_array("w", w, "(D, K)", ndim=2, like=x)
    if w.shape[0] != D or w.shape[1] < 1:
        raise ValueError(f"w must have shape (D, K) with D = {D} and K >= 1, got shape {w.shape}")
    K = w.shape[1]
    if b is not None:
        b = float_array("b", b, "(D,)", ndim=1, like=x)
        check_shape("b", b, (D,), "(D,)")
    if state is not None:
        state = float_array("state", state, "(B, K-1, D)", ndim=3, like=x)
        check_shape("state", state, (Bn, K - 1, D), "(B, K-1, D)")
    if _is_complex(x, w, b, state) or w.dtype != x.dtype or (state is not None and state.dtype != x.dtype):
        return _reference_fallback("conv1d_forward")(x, w, b, state)
    if state is None:
        state = np.zeros((Bn, K - 1, D), dtype=x.dtype)
    xp = np.concatenate([state, x], axis=1)  # (B, K-1+T, D)
    y = _conv_fwd_kernel(xp, np.ascontiguousarray(w), T)  # (B, T, D)
    if b is not None:
        y = y + b
    return y, (xp, w, b is not None), xp[:, T:].copy()


def conv1d_backward(dy, cache, dnew_state=None):
    """Returns (dx, dw, db, dstate); db is None without a bias; dstate is (B, K-1, D) always."""
    xp, w, has_b = cache
    Bn, TK, D = xp.shape
    K = w.shape[1]
    T = TK - (K - 1)
    dy = float_array("dy", dy, "(B, T, D)", ndim=3, like=xp)
    check_shape("dy", dy, (Bn, T, D), "(B, T, D)")
    if dnew_state is not None:
        dnew_state = float_array("dnew_state", dnew_state, "(B, K-1, D)", ndim=3, like=xp)
        check_shape("dnew_state", dnew_state, (Bn, K - 1, D), "(B, K-1, D)")
    if _is_complex(dy, xp, dnew_state) or dy.dtype != xp.dtype:
        return _reference_fallback("conv1d_backward")(dy, cache, dnew_state)
    dxp, dw = _conv_bwd_kernel(np.ascontiguousarray(dy), xp, np.ascontiguousarray(w))
    if dnew_state is not None:
        dxp[:, T:] += dnew_state
    db = dy.sum(axis=(0, 1)) if has_b else None
    return dxp[:, K - 1:].copy(), dw, db, dxp[:, : K - 1].copy()


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (interleaved pairs)
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _rotate_kernel(x, cos, sin, sign):
    """x (M, T, dh): pair i of token t rotated by the angle with (cos, sign * sin)[t, i]."""
    M, T, dh = x.shape
    y = np.empty_like(x)
    for m in range(M):
        for t in range(T):
            for i in range(dh // 2):
                c = cos[t, i]
                s = sign * sin[t, i]
                x0 = x[m, t, 2 * i]
                x1 = x[m, t, 2 * i + 1]
                y[m, t, 2 * i] = x0 * c - x1 * s
                y[m, t, 2 * i + 1] = x0 * s + x1 * c
    return y


def rope_forward(x, positions, base=10000.0):
    """Rotary embedding: x (..., T, dh), dh even; positions int (T,)."""
    x = float_array("x", x, "(..., T, dh) with dh even", min_ndim=2)
    T, dh = x.shape[-2:]
    if dh % 2:
        raise ValueError(f"x must have shape (..., T, dh) with dh even, got shape {x.shape}")
    positions = int_array("positions", positions, "(T,)")
    check_shape("positions", positions, (T,), "(T,)")
    if _is_complex(x):
        return _reference_fallback("rope_forward")(x, positions, base)
    cos, sin = R.rope_cos_sin(positions, dh, float(base), x.dtype)  # (T, dh/2), angles in float64
    y = _rotate_kernel(np.ascontiguousarray(x).reshape(-1, T, dh), cos, sin, x.dtype.type(1.0))
    return y.reshape(x.shape), (cos, sin)


def rope_backward(dy, cache):
    """The transpose of a rotation is the rotation by the opposite angle."""
    cos, sin = cache
    dy = float_array("dy", dy, "(..., T, dh)", min_ndim=2)
    if dy.shape[-2:] != (cos.shape[0], 2 * cos.shape[1]):
        raise ValueError(
            f"dy must have shape (..., T, dh) = (..., {cos.shape[0]}, {2 * cos.shape[1]}), got {dy.shape}"
        )
    if _is_complex(dy) or dy.dtype != cos.dtype:
        return _reference_fallback("rope_backward")(dy, cache)
    T, dh = dy.shape[-2:]
    return _rotate_kernel(np.ascontiguousarray(dy).reshape(-1, T, dh), cos, sin, dy.dtype.type(-1.0)).reshape(dy.shape)


# ---------------------------------------------------------------------------------------------
# Softmax attention, Eqs. (62)-(63): BLAS products around a compiled masked softmax
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _causal_softmax_kernel(s, offset):
    """Row-wise softmax of s (M, T_q, T_k) in place, keys i > offset + t masked to exactly 0."""
    M, Tq, Tk = s.shape
    for m in range(M):
        for t in range(Tq):
            last = min(Tk, offset + t + 1)
            mx = s[m, t, 0]
            for i in range(1, last):
                mx = max(mx, s[m, t, i])
            z = 0.0
            for i in range(last):
                e = math.exp(s[m, t, i] - mx)
                s[m, t, i] = e
                z += e
            for i in range(last):
                s[m, t, i] = s[m, t, i] / z
            for i in range(last, Tk):
                s[m, t, i] = 0.0
    return s


@njit(cache=True, nogil=True)
def _window_softmax_kernel(s, offset, window, persistent):
    """Row-wise softmax of s (M, T_q, T_k) in place over the keys query t sees with a sliding window
    (reference.sequence_ops.attention_mask): i <= offset + t and (offset + t - i < window or
    i < persistent); every other weight exactly 0."""
    M, Tq, Tk = s.shape
    for m in range(M):
        for t in range(Tq):
            qi = offset + t
            mx = -math.inf
            for i in range(Tk):
                if i <= qi and (qi - i < window or i < persistent):
                    mx = max(mx, s[m, t, i])
            z = 0.0
            for i in range(Tk):
                if i <= qi and (qi - i < window or i < persistent):
                    e = math.exp(s[m, t, i] - mx)
                    s[m, t, i] = e
                    z += e
                else:
                    s[m, t, i] = 0.0
            for i in range(Tk):
                s[m, t, i] = s[m, t, i] / z
    return s


@njit(cache=True, nogil=True)
def _softmax_bwd_kernel(p, dp):
    """ds = p (dp - <dp, p>) row-wise, in place in dp."""
    M, Tq, Tk = p.shape
    for m in range(M):
        for t in range(Tq):
            acc = 0.0
            for i in range(Tk):
                acc += dp[m, t, i] * p[m, t, i]
            for i in range(Tk):
                dp[m, t, i] = p[m, t, i] * (dp[m, t, i] - acc)
    return dp


def attention_forward(q, k, v, causal=True, scale=None, window=None, persistent=0):
    """Softmax attention, NL Eqs. (62)-(63), with the reference's optional sliding window and
    persistent keys (Titans' SW-Attn*); same contract as the reference."""
    q = float_array("q", q, "(B, H, T_q, dh)", ndim=4)
    k = float_array("k", k, "(B, H, T_k, dh)", ndim=4, like=q)
    v = float_array("v", v, "(B, H, T_k, dv)", ndim=4, like=q)
    Bn, H, Tq, dh = q.shape
    if k.shape[:2] != (Bn, H) or k.shape[3] != dh:
        raise ValueError(f"k must have shape (B, H, T_k, dh) with B, H, dh = {Bn}, {H}, {dh}, got {k.shape}")
    Tk = k.shape[2]
    if v.shape[:3] != (Bn, H, Tk):
        raise ValueError(f"v must have shape (B, H, T_k, dv) with B, H, T_k = {Bn}, {H}, {Tk}, got {v.shape}")
    if causal and Tk < Tq:
        raise ValueError(f"k must have shape (B, H, T_k, dh) with T_k >= T_q = {Tq} when causal, got {k.shape}")
    R.check_window(window, persistent, causal, Tk)
    if _is_complex(q, k, v) or len({q.dtype, k.dtype, v.dtype}) > 1:
        return _reference_fallback("attention_forward")(q, k, v, causal, scale, window, persistent)
    scale = float(1.0 / np.sqrt(dh) if scale is None else scale)
    scores = np.matmul(q, k.swapaxes(-1, -2)) * q.dtype.type(scale)  # (B, H, T_q, T_k)
    offset = (Tk - Tq) if causal else Tk  # query t sees keys <= offset + t
    rows = np.ascontiguousarray(scores).reshape(-1, Tq, Tk)
    if window is None:
        p = _causal_softmax_kernel(rows, offset).reshape(scores.shape)
    else:  # SW-Attn*: the window, the persistent keys exempt
        p = _window_softmax_kernel(rows, offset, int(window), int(persistent)).reshape(scores.shape)
    y = np.matmul(p, v)  # (B, H, T_q, dv)  # Eq. (63)
    return y, (q, k, v, p, scale)


def attention_backward(dy, cache):
    """Returns (dq, dk, dv)."""
    q, k, v, p, scale = cache
    dy = float_array("dy", dy, "(B, H, T_q, dv)", ndim=4, like=q)
    check_shape("dy", dy, q.shape[:3] + v.shape[3:], "(B, H, T_q, dv)")
    if _is_complex(dy, q) or dy.dtype != q.dtype:
        return _reference_fallback("attention_backward")(dy, cache)
    dv = np.matmul(p.swapaxes(-1, -2), dy)  # (B, H, T_k, dv)
    dp = np.matmul(dy, v.swapaxes(-1, -2))  # (B, H, T_q, T_k)
    Tq, Tk = p.shape[2:]
    ds = _softmax_bwd_kernel(np.ascontiguousarray(p).reshape(-1, Tq, Tk),
                             np.ascontiguousarray(dp).reshape(-1, Tq, Tk)).reshape(p.shape)
    sc = q.dtype.type(scale)
    dq = np.matmul(ds, k) * sc  # (B, H, T_q, dh)
    dk = np.matmul(ds.swapaxes(-1, -2), q) * sc  # (B, H, T_k, dh)
    return dq, dk, dv


def softmax_forward(x, axis=-1):
    """Not on the training path (attention has its own kernel): the reference (explicit fallback)."""
    return _reference_fallback("softmax_forward")(x, axis)


def softmax_backward(dy, cache):
    return _reference_fallback("softmax_backward")(dy, cache)


# ---------------------------------------------------------------------------------------------
# Cross-entropy (next-token loss)
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _ce_fwd_kernel(flat, t):
    """Per row n: lse[n] = logsumexp(flat[n]); returns (lse, sum_n lse[n] - flat[n, t[n]])."""
    N, V = flat.shape
    lse = np.empty(N, dtype=flat.dtype)
    total = 0.0
    for n in range(N):
        m = flat[n, 0]
        for j in range(1, V):
            m = max(m, flat[n, j])
        z = 0.0
        for j in range(V):
            z += math.exp(flat[n, j] - m)
        lse[n] = math.log(z) + m
        total += lse[n] - flat[n, t[n]]
    return lse, total


@njit(cache=True, nogil=True)
def _ce_bwd_kernel(flat, t, lse, scale):
    N, V = flat.shape
    d = np.empty_like(flat)
    for n in range(N):
        for j in range(V):
            d[n, j] = math.exp(flat[n, j] - lse[n]) * scale
        d[n, t[n]] -= scale
    return d


def cross_entropy_forward(logits, targets):
    """loss = mean over all positions of logsumexp(logits) - logits[target]. Returns (loss, cache)."""
    logits = float_array("logits", logits, "(..., V)", min_ndim=1)
    V = logits.shape[-1]
    targets = int_array("targets", targets, "(...) = logits.shape[:-1]", upper=V)
    check_shape("targets", targets, logits.shape[:-1], "logits.shape[:-1]")
    if _is_complex(logits):
        return _reference_fallback("cross_entropy_forward")(logits, targets)
    flat = _rows(logits)  # (N, V)
    t = np.ascontiguousarray(targets.reshape(-1), dtype=np.int64)  # (N,)
    if flat.shape[0] == 0:
        return flat.dtype.type(0), (flat, t, np.zeros(0, dtype=flat.dtype), logits.shape)
    lse, total = _ce_fwd_kernel(flat, t)
    return flat.dtype.type(total / flat.shape[0]), (flat, t, lse, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss (softmax(logits) - onehot(target)) / N."""
    flat, t, lse, shape = cache
    dloss = np.asarray(dloss)
    if dloss.shape != ():
        raise ValueError(f"dloss must be a scalar (shape ()), got shape {dloss.shape}")
    if _is_complex(dloss, flat):
        return _reference_fallback("cross_entropy_backward")(dloss, cache)
    scale = flat.dtype.type(float(dloss) / max(flat.shape[0], 1))
    return _ce_bwd_kernel(flat, t, lse, scale).reshape(shape)


__all__ = [
    "ACTIVATIONS", "FALLBACKS", "FAST_ACTIVATIONS", "act_and_grad", "attention_backward", "attention_forward", "conv1d_backward",
    "conv1d_forward", "cross_entropy_backward", "cross_entropy_forward", "dgelu", "dsilu", "embedding_backward",
    "embedding_forward", "gelu", "gelu_backward", "gelu_forward", "l2norm_backward", "l2norm_forward",
    "layernorm_backward", "layernorm_forward", "linear_backward", "linear_forward", "rmsnorm_backward",
    "rmsnorm_forward", "rope_backward", "rope_forward", "sigmoid_backward", "sigmoid_forward", "silu",
    "silu_backward", "silu_forward", "softmax_backward", "softmax_forward", "softplus_backward",
    "softplus_forward", "swiglu_backward", "swiglu_forward",
]
