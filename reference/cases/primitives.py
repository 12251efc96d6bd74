"""Gradient-check cases of the primitive layers (reference/primitives.py): small float64 problems.

SPEC: SPEC.md#primitives, SPEC.md#gradient-checks (the convention of a case: ``make(rng) -> (loss,
inputs, grads)``, ``make.method``; reference/cases/__init__.py). The cases: one small float64
problem per op; each maker takes the rng and optional size keywords (the tests draw sizes with
hypothesis, ``nested-learning check`` uses the defaults) and returns (loss, inputs, grads) with loss
= <forward(inputs), u> for a random upstream u.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..primitives import (
    attention_backward,
    attention_forward,
    conv1d_backward,
    conv1d_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    l2norm_backward,
    l2norm_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    rmsnorm_backward,
    rmsnorm_forward,
    rope_backward,
    rope_forward,
    sigmoid_backward,
    sigmoid_forward,
    silu_backward,
    silu_forward,
    softmax_backward,
    softmax_forward,
    softplus_backward,
    softplus_forward,
    swiglu_backward,
    swiglu_forward,
)


def _upstream(rng, shape):
    return rng.standard_normal(shape)


def gradcheck_activation(name: str):
    fwd = {
        "sigmoid": sigmoid_forward,
        "silu": silu_forward,
        "gelu": gelu_forward,
        "softplus": softplus_forward,
    }[name]
    bwd = {
        "sigmoid": sigmoid_backward,
        "silu": silu_backward,
        "gelu": gelu_backward,
        "softplus": softplus_backward,
    }[name]

    def make(rng, n=2, d=3):
        x = 2.0 * rng.standard_normal((n, d))
        u = _upstream(rng, (n, d))
        y, cache = fwd(x)
        return (lambda a: np.sum(fwd(a["x"])[0] * u)), {"x": x}, {"x": bwd(u, cache)}

    return make


def gradcheck_linear(rng, n=2, d=3, f=2, bias=True):
    x = rng.standard_normal((n, d))
    W = rng.standard_normal((f, d))
    inputs = {"x": x, "W": W}
    if bias:
        inputs["b"] = rng.standard_normal(f)
    u = _upstream(rng, (n, f))
    _, cache = linear_forward(**inputs)
    dx, dW, db = linear_backward(u, cache)
    grads = {"x": dx, "W": dW} | ({"b": db} if bias else {})
    return (lambda a: np.sum(linear_forward(**a)[0] * u)), inputs, grads


def gradcheck_embedding(rng, n=2, t=3, v=5, d=3):
    tokens = rng.integers(0, v, size=(n, t))
    E = rng.standard_normal((v, d))
    u = _upstream(rng, (n, t, d))
    _, cache = embedding_forward(tokens, E)
    return (
        (lambda a: np.sum(embedding_forward(tokens, a["E"])[0] * u)),
        {"E": E},
        {"E": embedding_backward(u, cache)},
    )


def gradcheck_rmsnorm(rng, n=2, d=4):
    inputs = {"x": rng.standard_normal((n, d)), "g": rng.standard_normal(d)}
    u = _upstream(rng, (n, d))
    _, cache = rmsnorm_forward(**inputs)
    dx, dg = rmsnorm_backward(u, cache)
    return (lambda a: np.sum(rmsnorm_forward(**a)[0] * u)), inputs, {"x": dx, "g": dg}


def gradcheck_layernorm(rng, n=2, d=4, affine=True):
    inputs = {"x": rng.standard_normal((n, d))}
    if affine:
        inputs |= {"g": rng.standard_normal(d), "b": rng.standard_normal(d)}
    u = _upstream(rng, (n, d))
    _, cache = layernorm_forward(**inputs)
    dx, dg, db = layernorm_backward(u, cache)
    grads = {"x": dx} | ({"g": dg, "b": db} if affine else {})
    return (lambda a: np.sum(layernorm_forward(**a)[0] * u)), inputs, grads


def gradcheck_l2norm(rng, n=2, d=4):
    inputs = {"x": rng.standard_normal((n, d))}
    u = _upstream(rng, (n, d))
    _, cache = l2norm_forward(**inputs)
    return (lambda a: np.sum(l2norm_forward(**a)[0] * u)), inputs, {"x": l2norm_backward(u, cache)}


def gradcheck_swiglu(rng, n=2, d=3, f=4):
    inputs = {
        "x": rng.standard_normal((n, d)),
        "W_gate": rng.standard_normal((f, d)),
        "W_up": rng.standard_normal((f, d)),
        "W_down": rng.standard_normal((d, f)),
    }
    u = _upstream(rng, (n, d))
    _, cache = swiglu_forward(**inputs)
    grads = dict(zip(["x", "W_gate", "W_up", "W_down"], swiglu_backward(u, cache), strict=True))
    return (lambda a: np.sum(swiglu_forward(**a)[0] * u)), inputs, grads


def gradcheck_conv1d(rng, n=2, t=3, d=2, k=4, bias=True, state=True):
    """Checks the gradients w.r.t. x, w, b, the incoming state, with an upstream on new_state too."""
    inputs = {"x": rng.standard_normal((n, t, d)), "w": rng.standard_normal((d, k))}
    if bias:
        inputs["b"] = rng.standard_normal(d)
    if state:
        inputs["state"] = rng.standard_normal((n, k - 1, d))
    u = _upstream(rng, (n, t, d))
    us = _upstream(rng, (n, k - 1, d))

    def loss(a):
        y, _, new_state = conv1d_forward(**a)
        return np.sum(y * u) + np.sum(new_state * us)

    _, cache, _ = conv1d_forward(**inputs)
    dx, dw, db, dstate = conv1d_backward(u, cache, dnew_state=us)
    grads = {"x": dx, "w": dw} | ({"b": db} if bias else {}) | ({"state": dstate} if state else {})
    return loss, inputs, grads


def gradcheck_rope(rng, n=2, t=3, half=2, offset=5):
    x = rng.standard_normal((n, t, 2 * half))
    positions = np.arange(offset, offset + t)
    u = _upstream(rng, x.shape)
    _, cache = rope_forward(x, positions)
    return (
        (lambda a: np.sum(rope_forward(a["x"], positions)[0] * u)),
        {"x": x},
        {"x": rope_backward(u, cache)},
    )


def gradcheck_softmax(rng, n=2, d=4, axis=-1):
    x = 2.0 * rng.standard_normal((n, d))
    u = _upstream(rng, x.shape)
    _, cache = softmax_forward(x, axis=axis)
    return (
        (lambda a: np.sum(softmax_forward(a["x"], axis=axis)[0] * u)),
        {"x": x},
        {"x": softmax_backward(u, cache)},
    )


def gradcheck_attention(rng, b=1, h=2, tq=2, tk=3, dh=2, dv=3, causal=True):
    inputs = {
        "q": rng.standard_normal((b, h, tq, dh)),
        "k": rng.standard_normal((b, h, tk, dh)),
        "v": rng.standard_normal((b, h, tk, dv)),
    }
    u = _upstream(rng, (b, h, tq, dv))
    _, cache = attention_forward(**inputs, causal=causal)
    grads = dict(zip("qkv", attention_backward(u, cache), strict=True))
    return (lambda a: np.sum(attention_forward(**a, causal=causal)[0] * u)), inputs, grads


def gradcheck_attention_window(rng, b=1, h=1, tq=3, tk=4, dh=2, dv=2, window=2, persistent=1):
    """The sliding window with persistent keys (Titans' SW-Attn*): the window masks keys inside
    the sequence, the persistent ones stay visible (SPEC.md#primitives)."""
    kw = dict(causal=True, window=window, persistent=min(persistent, tk))
    inputs = {
        "q": rng.standard_normal((b, h, tq, dh)),
        "k": rng.standard_normal((b, h, tk, dh)),
        "v": rng.standard_normal((b, h, tk, dv)),
    }
    u = _upstream(rng, (b, h, tq, dv))
    _, cache = attention_forward(**inputs, **kw)
    grads = dict(zip("qkv", attention_backward(u, cache), strict=True))
    return (lambda a: np.sum(attention_forward(**a, **kw)[0] * u)), inputs, grads


def gradcheck_cross_entropy(rng, n=2, t=3, v=4):
    logits = 2.0 * rng.standard_normal((n, t, v))
    targets = rng.integers(0, v, size=(n, t))
    _, cache = cross_entropy_forward(logits, targets)
    return (
        (lambda a: cross_entropy_forward(a["logits"], targets)[0]),
        {"logits": logits},
        {"logits": cross_entropy_backward(1.0, cache)},
    )


GRADCHECKS: dict[str, Callable[[np.random.Generator], tuple]] = {
    "primitives.sigmoid": gradcheck_activation("sigmoid"),
    "primitives.silu": gradcheck_activation("silu"),
    "primitives.gelu": gradcheck_activation("gelu"),
    "primitives.softplus": gradcheck_activation("softplus"),
    "primitives.linear": gradcheck_linear,
    "primitives.embedding": gradcheck_embedding,
    "primitives.rmsnorm": gradcheck_rmsnorm,
    "primitives.layernorm": gradcheck_layernorm,
    "primitives.l2norm": gradcheck_l2norm,
    "primitives.swiglu": gradcheck_swiglu,
    "primitives.conv1d": gradcheck_conv1d,
    "primitives.rope": gradcheck_rope,
    "primitives.softmax": gradcheck_softmax,
    "primitives.attention": gradcheck_attention,
    "primitives.attention_window": gradcheck_attention_window,
    "primitives.cross_entropy": gradcheck_cross_entropy,
}
"""name -> maker(rng) -> (loss, inputs, grads): the cases ``nested-learning check`` runs."""
