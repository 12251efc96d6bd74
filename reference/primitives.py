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
    - causal attention with T_k >= T_q: the last query aligns with the last key (KV cache).
    - GELU is the exact x Phi(x) (erf), not the tanh approximation.
    - Every float argument of one call shares one precision (float32 or float64; complex64 /
      complex128 are accepted for the complex-step gradient check); mixing is a ValueError.

Element-wise activations also come as value / first / second derivative triples (``silu``,
``dsilu``, ``d2silu``, ...): the second derivatives are needed by the MLP memory's
inner-gradient backward. Every function computes in its input's dtype and accepts complex input
where the function is analytic (so the complex-step gradient check applies): stabilising shifts
(the max in softmax) use the real part as a constant, and masks never touch the complex path.
Inputs are never mutated; outputs never alias inputs.

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# Input checking: every bad input is a ValueError naming the argument and the expected shape.
# ---------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (np.float32, np.float64, np.complex64, np.complex128)


def _real_dtype(dtype) -> np.dtype:
    return np.finfo(dtype).dtype


def float_array(name: str, a, expected: str, ndim: int | None = None, min_ndim: int = 0, like=None):
    """Return ``a`` as an ndarray (no copy) after checking its dtype and rank.

    ``expected`` is the shape written for the error message, e.g. ``"(B, T, D)"``. ``like``: an
    array whose precision ``a`` must share (float32 with float32/complex64, float64 with
    float64/complex128).
    Public: the CPU port's ops check their arguments with it (fast/cpu/primitives.py).
    """
    a = np.asarray(a)
    if a.dtype.type not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a float32 or float64 array of shape {expected}, got dtype {a.dtype}"
        )
    if (ndim is not None and a.ndim != ndim) or a.ndim < min_ndim:
        raise ValueError(f"{name} must have shape {expected}, got shape {a.shape}")
    if like is not None and _real_dtype(a.dtype) != _real_dtype(like.dtype):
        raise ValueError(
            f"{name} must have the same precision as the input ({like.dtype}) and shape {expected}, "
            f"got dtype {a.dtype}"
        )
    return a


def int_array(name: str, a, expected: str, upper: int | None = None):
    """An integer array; with ``upper``, every entry must lie in [0, upper).
    Public: the CPU port's ops check their arguments with it (fast/cpu/primitives.py).
    """
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array of shape {expected}, got dtype {a.dtype}")
    if upper is not None and a.size and (a.min() < 0 or a.max() >= upper):
        raise ValueError(
            f"{name} must lie in [0, {upper}) (shape {expected}), got values in [{a.min()}, {a.max()}]"
        )
    return a


def check_shape(name: str, a: np.ndarray, shape: tuple, expected: str) -> None:
    """ValueError unless ``a.shape == shape``. Public: the CPU port uses it (fast/cpu/primitives.py)."""
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {expected} = {tuple(shape)}, got shape {a.shape}")


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


# ---------------------------------------------------------------------------------------------
# Causal depthwise convolution with a carried state (streaming).
# ---------------------------------------------------------------------------------------------


def conv1d_forward(x, w, b=None, state=None):
    """Causal depthwise convolution of width K over time. Returns (y, cache, new_state).

    y[:, t] = b + sum_j w[:, j] * xp[:, t + j], xp = concat(state, x) of shape (B, K-1+T, D):
    w[:, K-1] multiplies the current token. ``state`` (B, K-1, D) holds the last K-1 inputs of the
    previous call (zeros when None); new_state = the last K-1 rows of xp, so one call over T
    tokens equals chained calls that carry the state.
    """
    x = float_array("x", x, "(B, T, D)", ndim=3)
    Bn, T, D = x.shape
    w = float_array("w", w, "(D, K)", ndim=2, like=x)
    if w.shape[0] != D or w.shape[1] < 1:
        raise ValueError(f"w must have shape (D, K) with D = {D} and K >= 1, got shape {w.shape}")
    K = w.shape[1]
    if b is not None:
        b = float_array("b", b, "(D,)", ndim=1, like=x)
        check_shape("b", b, (D,), "(D,)")
    had_state = state is not None
    if had_state:
        state = float_array("state", state, "(B, K-1, D)", ndim=3, like=x)
        check_shape("state", state, (Bn, K - 1, D), "(B, K-1, D)")
    else:
        state = np.zeros((Bn, K - 1, D), dtype=x.dtype)
    xp = np.concatenate([state, x], axis=1)  # (B, K-1+T, D)
    y = np.zeros(x.shape, dtype=np.result_type(x, w))  # (B, T, D)
    for j in range(K):
        y = y + w[:, j] * xp[:, j : j + T]  # (B, T, D)
    if b is not None:
        y = y + b
    new_state = xp[:, T:].copy()  # (B, K-1, D)
    return y, (xp, w, b is not None), new_state


def conv1d_backward(dy, cache, dnew_state=None):
    """Returns (dx, dw, db, dstate); db is None without a bias; dstate is (B, K-1, D) always.

    ``dnew_state`` (optional, (B, K-1, D)): the gradient reaching the returned state from a later
    call, so a chain of calls is differentiated exactly (the state's rows are copies of inputs).
    """
    xp, w, has_b = cache
    Bn, TK, D = xp.shape
    K = w.shape[1]
    T = TK - (K - 1)
    dy = float_array("dy", dy, "(B, T, D)", ndim=3, like=xp)
    check_shape("dy", dy, (Bn, T, D), "(B, T, D)")
    dxp = np.zeros(xp.shape, dtype=np.result_type(xp, dy))  # (B, K-1+T, D)
    dw = np.zeros(w.shape, dtype=dxp.dtype)  # (D, K)
    for j in range(K):
        dxp[:, j : j + T] += dy * w[:, j]
        dw[:, j] = np.einsum("btd,btd->d", dy, xp[:, j : j + T])
    if dnew_state is not None:
        dnew_state = float_array("dnew_state", dnew_state, "(B, K-1, D)", ndim=3, like=xp)
        check_shape("dnew_state", dnew_state, (Bn, K - 1, D), "(B, K-1, D)")
        dxp[:, T:] += dnew_state
    db = np.einsum("btd->d", dy) if has_b else None  # (D,)
    return dxp[:, K - 1 :].copy(), dw, db, dxp[:, : K - 1].copy()


# ---------------------------------------------------------------------------------------------
# Rotary position embedding.
# ---------------------------------------------------------------------------------------------


def rope_cos_sin(positions, dh, base, dtype):
    """cos and sin (T, dh/2) of the angles positions[t] base^(-2i/dh), in float64, cast to dtype's real type.
    Public: the CPU port's RoPE uses it (fast/cpu/primitives.py)."""
    i = np.arange(dh // 2, dtype=np.float64)  # (dh/2,)
    theta = base ** (-2.0 * i / dh)  # (dh/2,)
    angle = np.einsum("t,i->ti", positions.astype(np.float64), theta)  # (T, dh/2)
    real = _real_dtype(dtype)
    return np.cos(angle).astype(real), np.sin(angle).astype(real)


def _rotate(x, cos, sin):
    """Rotate each interleaved pair (x[2i], x[2i+1]) by the angle whose cos/sin are given."""
    x0 = x[..., 0::2]  # (..., T, dh/2)
    x1 = x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2] = x0 * cos - x1 * sin
    y[..., 1::2] = x0 * sin + x1 * cos
    return y


def rope_forward(x, positions, base=10000.0):
    """Rotary embedding: x (..., T, dh), dh even; positions int (T,) (absolute, may be offset).

    Pair i = (x[2i], x[2i+1]) is rotated by angle positions[t] * base^(-2i/dh).
    """
    x = float_array("x", x, "(..., T, dh) with dh even", min_ndim=2)
    T, dh = x.shape[-2:]
    if dh % 2:
        raise ValueError(f"x must have shape (..., T, dh) with dh even, got shape {x.shape}")
    positions = int_array("positions", positions, "(T,)")
    check_shape("positions", positions, (T,), "(T,)")
    cos, sin = rope_cos_sin(positions, dh, float(base), x.dtype)  # (T, dh/2)
    return _rotate(x, cos, sin), (cos, sin)


def rope_backward(dy, cache):
    """The transpose of a rotation is the rotation by the opposite angle."""
    cos, sin = cache
    dy = float_array("dy", dy, "(..., T, dh)", min_ndim=2)
    if dy.shape[-2:] != (cos.shape[0], 2 * cos.shape[1]):
        raise ValueError(
            f"dy must have shape (..., T, dh) = (..., {cos.shape[0]}, {2 * cos.shape[1]}), got {dy.shape}"
        )
    return _rotate(dy, cos, -sin)


# ---------------------------------------------------------------------------------------------
# Softmax and attention.
# ---------------------------------------------------------------------------------------------


def _softmax(x, axis, mask=None):
    """Stable softmax; the shift is the (real) max, a constant, so complex input stays analytic.
    Entries where ``mask`` is False get weight exactly 0."""
    if mask is None:
        e = np.exp(x - np.max(x.real, axis=axis, keepdims=True))
    else:  # masked entries are shifted to 0 first, so they can never overflow
        m = np.max(np.where(mask, x.real, -np.inf), axis=axis, keepdims=True)
        e = np.where(mask, np.exp(np.where(mask, x - m, 0)), 0)
    return e / np.sum(e, axis=axis, keepdims=True)


def softmax_forward(x, axis=-1):
    """y = exp(x) / sum(exp(x)) along ``axis``."""
    x = float_array("x", x, "(...)", min_ndim=1)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {x.shape}")
    y = _softmax(x, axis)
    return y, (y, axis)


def softmax_backward(dy, cache):
    """dx = y (dy - <dy, y>) along the axis."""
    y, axis = cache
    dy = float_array("dy", dy, "(...) like y", like=y)
    check_shape("dy", dy, y.shape, "y.shape")
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


def attention_forward(q, k, v, causal=True, scale=None):
    """Softmax attention, NL Eqs. (62)-(63): y_t = sum_i s(k_i, q_t) v_i / sum_j s(k_j, q_t).

    q (B, H, T_q, dh), k (B, H, T_k, dh), v (B, H, T_k, dv); s(k, q) = exp(scale q.k) with scale
    1/sqrt(dh) by default. Causal: query t sits at absolute position T_k - T_q + t (the last query
    aligns with the last key, as when streaming over a KV cache) and sees keys up to there.
    """
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
        raise ValueError(
            f"k must have shape (B, H, T_k, dh) with T_k >= T_q = {Tq} when causal, got {k.shape}"
        )
    scale = 1.0 / np.sqrt(dh) if scale is None else scale
    scale = float(scale)
    scores = scale * np.einsum("bhqd,bhkd->bhqk", q, k, optimize=True)  # (B, H, T_q, T_k)
    mask = None
    if causal:
        mask = np.arange(Tk)[None, :] <= np.arange(Tk - Tq, Tk)[:, None]  # (T_q, T_k)
    p = _softmax(scores, axis=-1, mask=mask)  # (B, H, T_q, T_k): s(k_i, q) normalised, Eq. (63)
    y = np.einsum("bhqk,bhkv->bhqv", p, v, optimize=True)  # (B, H, T_q, dv)  # Eq. (63)
    return y, (q, k, v, p, scale)


def attention_backward(dy, cache):
    """Returns (dq, dk, dv)."""
    q, k, v, p, scale = cache
    dy = float_array("dy", dy, "(B, H, T_q, dv)", ndim=4, like=q)
    check_shape("dy", dy, q.shape[:3] + v.shape[3:], "(B, H, T_q, dv)")
    dv = np.einsum("bhqk,bhqv->bhkv", p, dy, optimize=True)  # (B, H, T_k, dv)
    dp = np.einsum("bhqv,bhkv->bhqk", dy, v, optimize=True)  # (B, H, T_q, T_k)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))  # (B, H, T_q, T_k); 0 where masked
    dq = scale * np.einsum("bhqk,bhkd->bhqd", ds, k, optimize=True)  # (B, H, T_q, dh)
    dk = scale * np.einsum("bhqk,bhqd->bhkd", ds, q, optimize=True)  # (B, H, T_k, dh)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Cross-entropy (next-token loss).
# ---------------------------------------------------------------------------------------------


def cross_entropy_forward(logits, targets):
    """loss = mean over all positions of logsumexp(logits) - logits[target].

    logits (..., V), targets int (...) in [0, V). Returns (loss, cache), loss a 0-d scalar of the
    logits' dtype.
    """
    logits = float_array("logits", logits, "(..., V)", min_ndim=1)
    V = logits.shape[-1]
    targets = int_array("targets", targets, "(...) = logits.shape[:-1]", upper=V)
    check_shape("targets", targets, logits.shape[:-1], "logits.shape[:-1]")
    flat = logits.reshape(-1, V)  # (N, V)
    t = targets.reshape(-1)  # (N,)
    m = np.max(flat.real, axis=-1, keepdims=True)  # (N, 1), a constant shift
    lse = np.log(np.sum(np.exp(flat - m), axis=-1)) + m[:, 0]  # (N,)
    picked = flat[np.arange(flat.shape[0]), t]  # (N,)
    loss = np.mean(lse - picked) if flat.shape[0] else flat.dtype.type(0)
    return loss, (flat, t, lse, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss (softmax(logits) - onehot(target)) / N."""
    flat, t, lse, shape = cache
    dloss = np.asarray(dloss)
    if dloss.shape != ():
        raise ValueError(f"dloss must be a scalar (shape ()), got shape {dloss.shape}")
    N = flat.shape[0]
    d = np.exp(flat - lse[:, None])  # (N, V) softmax
    d[np.arange(N), t] -= 1
    dtype = np.result_type(flat.dtype, dloss.dtype) if np.iscomplexobj(dloss) else flat.dtype
    d = d * (dloss / max(N, 1)).astype(dtype)  # (N, V)
    return d.reshape(shape)
