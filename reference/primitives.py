"""Primitive layers of the reference: forward/backward pairs in pure NumPy.

Paper: §5 (softmax attention as an l2 regression), Eqs. (62)-(63), arXiv 2512.24695v1; the other
ops are the Llama-style building blocks NL §8.3 and Titans §4.4 (arXiv 2501.00663) name without
equations (RMSNorm, SwiGLU, RoPE, causal depthwise conv-4, l2-normalised q/k, cross-entropy).
SPEC: SPEC.md#primitives.

Symbols (paper symbol -> code name, shape):

    x            x          (..., D)           an input, features last
    W, b         W, b       (D_out, D_in), (D_out,)
    E            E          (V, D)             embedding table; tokens int (...)
    g, b (norm)  g, b       (D,)               gain and bias of a norm
    W_gate/up    W_gate, W_up (F, D); W_down (D, F)   SwiGLU MLP
    w (conv)     w          (D, K)             depthwise causal kernel; w[:, K-1] hits token t
    q, k, v      q, k, v    (B, H, T, d_h)     attention (k, v may have T_k >= T_q)
    s(k_i, q)    p          (B, H, T_q, T_k)   exp(scale q.k_i), normalised: attention weights
    M*           y          (B, H, T_q, d_v)   Eq. (63): the weighted l2-regression optimum
    theta_i      theta      (d_h/2,)           RoPE frequencies base^(-2i/d_h)

Decisions where the paper is open (all in SPEC.md#primitives):
    - eps inside the square root for RMSNorm (1e-6), LayerNorm (1e-5) and the l2 norm (1e-6).
    - RoPE pairs interleaved neighbours (x[2i], x[2i+1]) (RoFormer), not the two halves;
      angles are computed in float64 and cast to the input dtype.
    - conv1d: causal, depthwise, width K; the carried state is the last K-1 inputs; the backward
      also accepts the gradient of the returned state, so chained calls backpropagate exactly.
    - cross-entropy: the mean over every position (no ignore index), log-sum-exp stabilised.
    - causal attention with T_k >= T_q: the last query aligns with the last key (KV cache);
      an optional sliding window with persistent keys exempt from it (Titans' SW-Attn*).
    - GELU is the exact x Phi(x) (erf), not the tanh approximation.
    - Every float argument of one call shares one precision (float32 or float64; complex64 /
      complex128 are accepted for the complex-step gradient check); mixing is a ValueError.

Element-wise activations also come as value / first / second derivative triples (``silu``,
``dsilu``, ``d2silu``, ...): the second derivatives are needed by the MLP memory's
inner-gradient backward. Every function computes in its input's dtype and accepts complex input
where the function is analytic (so the complex-step gradient check applies): stabilising shifts
(the max in softmax) use the real part as a constant, and masks never touch the complex path.
Inputs are never mutated; outputs never alias inputs.

Where things live: this module has the element-wise activations, linear, embedding, the norms
and SwiGLU; the token-mixing ops (conv1d, RoPE, softmax, attention, cross-entropy) are in
reference/sequence_ops.py and the argument checks in reference/array_checks.py. Every name stays
importable from here (re-exported below).

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

import numpy as np

# The argument checks live in reference/array_checks.py; re-exported.
from .array_checks import _FLOAT_DTYPES, _real_dtype, check_shape, float_array, int_array  # noqa: F401

# The token-mixing ops live in reference/sequence_ops.py; re-exported.
from .sequence_ops import (  # noqa: F401
    _rotate,
    _softmax,
    attention_backward,
    attention_forward,
    attention_mask,
    check_window,
    conv1d_backward,
    conv1d_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    rope_backward,
    rope_cos_sin,
    rope_forward,
    softmax_backward,
    softmax_forward,
)

# ---------------------------------------------------------------------------------------------
# The gradient of a broadcast parameter (the argument checks are in reference/array_checks.py).
# ---------------------------------------------------------------------------------------------


def _lead_sum(a: np.ndarray, keep: int) -> np.ndarray:
    """Sum over every axis but the last ``keep`` (the gradient of a broadcast parameter)."""
    return a.reshape((-1,) + a.shape[a.ndim - keep :]).sum(axis=0)


# ---------------------------------------------------------------------------------------------
# Element-wise activations and their first and second derivatives.
# ---------------------------------------------------------------------------------------------


def sigmoid(x):
    """s(x) = 1 / (1 + exp(-x)), evaluated without overflow for real input."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return 1.0 / (1.0 + np.exp(-x))
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def dsigmoid(x):
    s = sigmoid(x)
    return s * (1 - s)


def d2sigmoid(x):
    s = sigmoid(x)
    return s * (1 - s) * (1 - 2 * s)


def silu(x):
    """silu(x) = x s(x)."""
    return x * sigmoid(x)


def dsilu(x):
    s = sigmoid(x)
    return s * (1 + x * (1 - s))


def d2silu(x):
    s = sigmoid(x)
    ds = s * (1 - s)
    return 2 * ds + x * ds * (1 - 2 * s)


# Python floats (weak scalars under NumPy 2): they never promote a float32 array to float64.
_SQRT_2 = float(np.sqrt(2.0))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


def _erf(x):
    from scipy.special import erf

    return erf(x)


def gelu(x):
    """Exact GELU, x Phi(x) with Phi the standard normal CDF (torch's default)."""
    return 0.5 * x * (1.0 + _erf(x / _SQRT_2))


def dgelu(x):
    return 0.5 * (1.0 + _erf(x / _SQRT_2)) + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def d2gelu(x):
    return _INV_SQRT_2PI * np.exp(-0.5 * x * x) * (2.0 - x * x)


def softplus(x):
    """log(1 + exp(x)), stable for real input."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return np.log1p(np.exp(x))
    return np.logaddexp(0.0, x).astype(x.dtype, copy=False)


def dsoftplus(x):
    return sigmoid(x)


def d2softplus(x):
    return dsigmoid(x)


ACTIVATIONS = {
    "sigmoid": (sigmoid, dsigmoid, d2sigmoid),
    "silu": (silu, dsilu, d2silu),
    "gelu": (gelu, dgelu, d2gelu),
    "softplus": (softplus, dsoftplus, d2softplus),
}
"""name -> (f, f', f''), the element-wise functions the memories and gates may use."""


def _activation_forward(name: str, x):
    f, df, _ = ACTIVATIONS[name]
    x = float_array("x", x, "(...)")
    return f(x), (name, x)


def _activation_backward(dy, cache):
    name, x = cache
    dy = float_array("dy", dy, "(...) like x", like=x)
    check_shape("dy", dy, x.shape, "x.shape")
    return dy * ACTIVATIONS[name][1](x)  # (...)


def sigmoid_forward(x):
    """y = sigmoid(x) element-wise. Returns (y, cache)."""
    return _activation_forward("sigmoid", x)


def sigmoid_backward(dy, cache):
    """dx = dy * s(x) (1 - s(x))."""
    return _activation_backward(dy, cache)


def silu_forward(x):
    """y = x sigmoid(x) element-wise. Returns (y, cache)."""
    return _activation_forward("silu", x)


def silu_backward(dy, cache):
    """dx = dy * s(x) (1 + x (1 - s(x)))."""
    return _activation_backward(dy, cache)


def gelu_forward(x):
    """y = x Phi(x) (exact GELU) element-wise. Returns (y, cache)."""
    return _activation_forward("gelu", x)


def gelu_backward(dy, cache):
    """dx = dy * (Phi(x) + x phi(x))."""
    return _activation_backward(dy, cache)


def softplus_forward(x):
    """y = log(1 + exp(x)) element-wise. Returns (y, cache)."""
    return _activation_forward("softplus", x)


def softplus_backward(dy, cache):
    """dx = dy * sigmoid(x)."""
    return _activation_backward(dy, cache)


# ---------------------------------------------------------------------------------------------
# Linear layer and embedding.
# ---------------------------------------------------------------------------------------------


def linear_forward(x, W, b=None):
    """y = x W^T + b over the last axis: x (..., D_in), W (D_out, D_in), b (D_out,) or None."""
    x = float_array("x", x, "(..., D_in)", min_ndim=1)
    W = float_array("W", W, "(D_out, D_in)", ndim=2, like=x)
    if W.shape[1] != x.shape[-1]:
        raise ValueError(f"W must have shape (D_out, D_in) with D_in = {x.shape[-1]}, got shape {W.shape}")
    y = np.einsum("...i,oi->...o", x, W, optimize=True)  # (..., D_out)
    if b is not None:
        b = float_array("b", b, "(D_out,)", ndim=1, like=x)
        check_shape("b", b, (W.shape[0],), "(D_out,)")
        y = y + b
    return y, (x, W, b is not None)


def linear_backward(dy, cache):
    """Returns (dx, dW, db); db is None when the forward had no bias."""
    x, W, has_b = cache
    dy = float_array("dy", dy, "(..., D_out)", like=x)
    check_shape("dy", dy, x.shape[:-1] + (W.shape[0],), "(..., D_out)")
    dx = np.einsum("...o,oi->...i", dy, W, optimize=True)  # (..., D_in)
    dW = np.einsum("...o,...i->oi", dy, x, optimize=True)  # (D_out, D_in)
    db = _lead_sum(dy, 1) if has_b else None  # (D_out,)
    return dx, dW, db


def embedding_forward(tokens, E):
    """y = E[tokens]: tokens int (...) in [0, V), E (V, D) -> y (..., D)."""
    E = float_array("E", E, "(V, D)", ndim=2)
    tokens = int_array("tokens", tokens, "(...)", upper=E.shape[0])
    y = E[tokens]  # (..., D), a copy (fancy indexing)
    return y, (tokens, E.shape, E.dtype)


def embedding_backward(dy, cache):
    """dE[v] = sum of dy over the positions whose token is v."""
    tokens, shape, dtype = cache
    dy = np.asarray(dy)
    if dy.shape != tokens.shape + (shape[1],):
        raise ValueError(f"dy must have shape (..., D) = {tokens.shape + (shape[1],)}, got shape {dy.shape}")
    dE = np.zeros(shape, dtype=np.result_type(dtype, dy.dtype))  # (V, D)
    np.add.at(dE, tokens.reshape(-1), dy.reshape(-1, shape[1]))
    return dE


# ---------------------------------------------------------------------------------------------
# Normalisations.
# ---------------------------------------------------------------------------------------------


def rmsnorm_forward(x, g, eps=1e-6):
    """y = x / sqrt(mean(x^2) + eps) * g over the last axis; x (..., D), g (D,)."""
    x = float_array("x", x, "(..., D)", min_ndim=1)
    g = float_array("g", g, "(D,)", ndim=1, like=x)
    check_shape("g", g, x.shape[-1:], "(D,)")
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + float(eps))  # (..., 1)
    xhat = x * r  # (..., D)
    return xhat * g, (xhat, r, g)


def rmsnorm_backward(dy, cache):
    """dx = r (dxhat - xhat mean(dxhat xhat)), dxhat = dy g; dg = sum dy xhat. Returns (dx, dg)."""
    xhat, r, g = cache
    dy = float_array("dy", dy, "(..., D)", like=xhat)
    check_shape("dy", dy, xhat.shape, "(..., D)")
    dxhat = dy * g  # (..., D)
    dx = r * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))  # (..., D)
    dg = _lead_sum(dy * xhat, 1)  # (D,)
    return dx, dg


def layernorm_forward(x, g=None, b=None, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * g + b over the last axis (biased variance)."""
    x = float_array("x", x, "(..., D)", min_ndim=1)
    if g is not None:
        g = float_array("g", g, "(D,)", ndim=1, like=x)
        check_shape("g", g, x.shape[-1:], "(D,)")
    if b is not None:
        b = float_array("b", b, "(D,)", ndim=1, like=x)
        check_shape("b", b, x.shape[-1:], "(D,)")
    xc = x - np.mean(x, axis=-1, keepdims=True)  # (..., D)
    r = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + float(eps))  # (..., 1)
    xhat = xc * r  # (..., D)
    y = xhat
    if g is not None:
        y = y * g
    if b is not None:
        y = y + b
    if y is xhat:
        y = xhat.copy()
    return y, (xhat, r, g, b is not None)


def layernorm_backward(dy, cache):
    """dx = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat)). Returns (dx, dg, db)."""
    xhat, r, g, has_b = cache
    dy = float_array("dy", dy, "(..., D)", like=xhat)
    check_shape("dy", dy, xhat.shape, "(..., D)")
    dxhat = dy * g if g is not None else dy  # (..., D)
    dx = r * (
        dxhat - np.mean(dxhat, axis=-1, keepdims=True) - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True)
    )  # (..., D)
    dg = _lead_sum(dy * xhat, 1) if g is not None else None  # (D,)
    db = _lead_sum(dy, 1) if has_b else None  # (D,)
    return dx, dg, db


def l2norm_forward(x, eps=1e-6):
    """y = x / sqrt(sum(x^2) + eps) over the last axis (the l2-normalised q and k of NL §8.3)."""
    x = float_array("x", x, "(..., D)", min_ndim=1)
    n = np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + float(eps))  # (..., 1)
    y = x / n  # (..., D)
    return y, (y, n)


def l2norm_backward(dy, cache):
    """dx = (dy - y <dy, y>) / n."""
    y, n = cache
    dy = float_array("dy", dy, "(..., D)", like=y)
    check_shape("dy", dy, y.shape, "(..., D)")
    return (dy - y * np.sum(dy * y, axis=-1, keepdims=True)) / n  # (..., D)


# ---------------------------------------------------------------------------------------------
# SwiGLU MLP.
# ---------------------------------------------------------------------------------------------


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
    a = np.einsum("...d,fd->...f", x, W_gate, optimize=True)  # (..., F)
    u = np.einsum("...d,fd->...f", x, W_up, optimize=True)  # (..., F)
    h = silu(a) * u  # (..., F)
    y = np.einsum("...f,df->...d", h, W_down, optimize=True)  # (..., D)
    return y, (x, W_gate, W_up, W_down, a, u, h)


def swiglu_backward(dy, cache):
    """Returns (dx, dW_gate, dW_up, dW_down)."""
    x, W_gate, W_up, W_down, a, u, h = cache
    dy = float_array("dy", dy, "(..., D)", like=x)
    check_shape("dy", dy, x.shape, "(..., D)")
    dW_down = np.einsum("...d,...f->df", dy, h, optimize=True)  # (D, F)
    dh = np.einsum("...d,df->...f", dy, W_down, optimize=True)  # (..., F)
    da = dh * u * dsilu(a)  # (..., F)
    du = dh * silu(a)  # (..., F)
    dx = np.einsum("...f,fd->...d", da, W_gate, optimize=True) + np.einsum(
        "...f,fd->...d", du, W_up, optimize=True
    )  # (..., D)
    dW_gate = np.einsum("...f,...d->fd", da, x, optimize=True)  # (F, D)
    dW_up = np.einsum("...f,...d->fd", du, x, optimize=True)  # (F, D)
    return dx, dW_gate, dW_up, dW_down
