"""Gradient-check cases of the MLP memory (reference/mlp_memory.py): small float64 problems.

SPEC: SPEC.md#mlp-memory, SPEC.md#gradient-checks (the convention of a case: ``make(rng) -> (loss,
inputs, grads)``, ``make.method``; reference/cases/__init__.py). The cases: its read, its inner
gradient (per-token weighted), that gradient's VJP (the second-order terms the outer backward needs)
and the matrix memory's inner-gradient VJP.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..mlp_memory import (
    inner_grad,
    inner_grad_backward,
    inner_loss,
    matrix_inner_grad,
    matrix_inner_grad_backward,
    mlp_memory_backward,
    mlp_memory_forward,
)


def _mlp_inputs(rng, lead=(2,), N=3, D=3, Hm=4):
    return {
        "W1": 0.6 * rng.standard_normal((*lead, D, Hm)),
        "W2": 0.6 * rng.standard_normal((*lead, Hm, D)),
        "k": rng.standard_normal((*lead, N, D)),
        "v_hat": rng.standard_normal((*lead, N, D)),
    }


def _case_forward(layernorm: bool, act: str = "gelu"):
    def case(rng):
        x = _mlp_inputs(rng)
        inputs = {"W1": x["W1"], "W2": x["W2"], "z": x["k"]}
        up = rng.standard_normal(x["k"].shape)

        def loss(d):
            return np.sum(mlp_memory_forward(d["W1"], d["W2"], d["z"], act=act, layernorm=layernorm)[0] * up)

        _, cache = mlp_memory_forward(**inputs, act=act, layernorm=layernorm)
        dW1, dW2, dz = mlp_memory_backward(up, cache)
        return loss, inputs, {"W1": dW1, "W2": dW2, "z": dz}

    return case


def _case_inner_grad(layernorm: bool, act: str = "gelu"):
    """Per-token weights c_n: d/dW sum_n c_n l_n must equal sum_n c_n u1_n a_n^T (and u2_n k_n^T)."""

    def case(rng):
        inputs = _mlp_inputs(rng)
        cw = rng.standard_normal(inputs["k"].shape[:-1])  # (..., N)

        def loss(d):
            return np.sum(cw * inner_loss(d["W1"], d["W2"], d["k"], d["v_hat"], act=act, layernorm=layernorm))

        u1, a, u2, _ = inner_grad(**inputs, act=act, layernorm=layernorm)
        gW1 = np.einsum("...n,...nd,...nh->...dh", cw, u1, a)
        gW2 = np.einsum("...n,...nh,...ne->...he", cw, u2, inputs["k"])
        return loss, inputs, {"W1": gW1, "W2": gW2}

    return case


def _case_inner_grad_backward(layernorm: bool, act: str = "gelu"):
    def case(rng):
        inputs = _mlp_inputs(rng)
        u1, a, u2, cache = inner_grad(**inputs, act=act, layernorm=layernorm)
        c1, c2, c3 = (rng.standard_normal(x.shape) for x in (u1, a, u2))

        def loss(d):
            f1, f2, f3, _ = inner_grad(d["W1"], d["W2"], d["k"], d["v_hat"], act=act, layernorm=layernorm)
            return np.sum(f1 * c1) + np.sum(f2 * c2) + np.sum(f3 * c3)

        dW1, dW2, dk, dv_hat = inner_grad_backward(c1, c2, c3, cache)
        return loss, inputs, {"W1": dW1, "W2": dW2, "k": dk, "v_hat": dv_hat}

    return case


def _case_matrix_inner_grad_backward(rng):
    lead, N, Dv, Dk = (2,), 3, 2, 3
    inputs = {
        "M": rng.standard_normal((*lead, Dv, Dk)),
        "k": rng.standard_normal((*lead, N, Dk)),
        "v_hat": rng.standard_normal((*lead, N, Dv)),
    }
    u, cache = matrix_inner_grad(**inputs)
    cu = rng.standard_normal(u.shape)

    def loss(d):
        return np.sum(matrix_inner_grad(d["M"], d["k"], d["v_hat"])[0] * cu)

    dM, dk, dv_hat = matrix_inner_grad_backward(cu, cache)
    return loss, inputs, {"M": dM, "k": dk, "v_hat": dv_hat}


GRADCHECKS: dict[str, Callable[[np.random.Generator], tuple]] = {
    "mlp_memory.forward": _case_forward(False),
    "mlp_memory.forward_layernorm": _case_forward(True),
    "mlp_memory.inner_grad": _case_inner_grad(False),
    "mlp_memory.inner_grad_layernorm": _case_inner_grad(True),
    "mlp_memory.inner_grad_backward": _case_inner_grad_backward(False),
    "mlp_memory.inner_grad_backward_layernorm": _case_inner_grad_backward(True),
    "mlp_memory.inner_grad_backward_silu": _case_inner_grad_backward(False, act="silu"),
    "mlp_memory.matrix_inner_grad_backward": _case_matrix_inner_grad_backward,
}
"""name -> case(rng) -> (loss_fn, inputs, grads): small float64 checks for `nested-learning check`."""
