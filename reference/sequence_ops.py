"""Primitive sequence layers of the reference: forward/backward pairs in pure NumPy for the ops
that mix tokens (causal depthwise conv1d, RoPE, softmax, softmax attention, cross-entropy).

Paper: §5 (softmax attention as an l2 regression), Eqs. (62)-(63), arXiv 2512.24695v1; RoPE,
the causal depthwise conv-4 and the cross-entropy are the building blocks NL §8.3 and Titans §4.4
(arXiv 2501.00663) name without equations. SPEC: SPEC.md#primitives.

Part of ``reference/primitives.py``: its docstring has the symbols and the decisions (RoPE's
interleaved pairs and float64 angles, conv1d's carried state, causal attention with T_k >= T_q,
cross-entropy's mean), and it re-exports every name here (``primitives.attention_forward`` is
how the model driver and the CPU port call them). The argument checks come from
reference/array_checks.py.

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

import numpy as np

from .array_checks import _real_dtype, check_shape, float_array, int_array

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


def attention_forward(q, k, v, causal=True, scale=None, window=None, persistent=0):
    """Softmax attention, NL Eqs. (62)-(63): y_t = sum_i s(k_i, q_t) v_i / sum_j s(k_j, q_t).

    q (B, H, T_q, dh), k (B, H, T_k, dh), v (B, H, T_k, dv); s(k, q) = exp(scale q.k) with scale
    1/sqrt(dh) by default. Causal: query t sits at absolute position T_k - T_q + t (the last query
    aligns with the last key, as when streaming over a KV cache) and sees keys up to there.

    Sliding window (Titans' SW-Attn*, causal only): ``window`` W >= 1 limits query t (key index
    i_t = T_k - T_q + t) to the keys i_t - W < i <= i_t (itself and the W - 1 before it), except
    the first ``persistent`` keys (the persistent tokens), which stay visible to every query at or
    after them whatever the window. The keys after the persistent ones must be contiguous
    positions ending at the last query (a KV cache cut to the window keeps that). The backward is
    ``attention_backward`` unchanged: a masked weight is exactly 0, so is its gradient.
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
    check_window(window, persistent, causal, Tk)
    scale = 1.0 / np.sqrt(dh) if scale is None else scale
    scale = float(scale)
    scores = scale * np.einsum("bhqd,bhkd->bhqk", q, k, optimize=True)  # (B, H, T_q, T_k)
    mask = None
    if causal:
        mask = attention_mask(Tq, Tk, window, persistent)  # (T_q, T_k)
    p = _softmax(scores, axis=-1, mask=mask)  # (B, H, T_q, T_k): s(k_i, q) normalised, Eq. (63)
    y = np.einsum("bhqk,bhkv->bhqv", p, v, optimize=True)  # (B, H, T_q, dv)  # Eq. (63)
    return y, (q, k, v, p, scale)


def check_window(window, persistent, causal, Tk):
    """ValueError unless ``window`` is None or an int >= 1 (causal only) and ``persistent`` an int
    in [0, T_k]. Public: the CPU port uses it (fast/cpu/primitives.py)."""
    def is_int(n):  # a Python int (not a bool) or a 0-d integer scalar of any array namespace
        if hasattr(n, "shape"):
            return n.shape == () and n.dtype.kind in "iu"
        return isinstance(n, int) and not isinstance(n, bool)

    if window is not None:
        if not is_int(window) or window < 1:
            raise ValueError(f"window must be None or an int >= 1 (keys a query sees, itself included), got {window!r}")
        if not causal:
            raise ValueError("window needs causal=True (a sliding window looks back from each query)")
    if not is_int(persistent) or not 0 <= persistent <= Tk:
        raise ValueError(f"persistent must be an int in [0, T_k] = [0, {Tk}], got {persistent!r}")


def attention_mask(Tq, Tk, window=None, persistent=0):
    """(T_q, T_k) bool: key i is visible to query t (causal, with the sliding window and the
    persistent keys of ``attention_forward``). Public: the CPU port's tests use it."""
    qi = np.arange(Tk - Tq, Tk)[:, None]  # (T_q, 1): each query's key index
    ki = np.arange(Tk)[None, :]  # (1, T_k)
    mask = ki <= qi
    if window is not None:
        mask = mask & ((qi - ki < window) | (ki < persistent))
    return mask


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
