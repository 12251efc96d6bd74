"""Gradient-check cases of the further optimizer memories (reference/optimizer_memories.py): float64, small.

SPEC: SPEC.md#optimizer-memories, SPEC.md#gradient-checks (the convention of a case: ``make(rng) ->
(loss, inputs, grads)``, ``make.method``; reference/cases/__init__.py). The cases: the
preconditioner's, Newton-Schulz's and the outer-product memory's inner gradients, and the feature
map's VJP.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..optimizer_memories import (
    feature_map,
    feature_map_backward,
    ns_inner_grad,
    ns_inner_loss,
    outer_inner_grad,
    outer_inner_loss,
    precond_inner_grad,
    precond_inner_loss,
)


def _gc_precond(rng):
    S, Y = rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
    inputs = {"P": rng.standard_normal((4, 4))}
    return (lambda x: precond_inner_loss(x["P"], S, Y)), inputs, {"P": precond_inner_grad(inputs["P"], S, Y)}


def _gc_ns(rng):
    g = rng.standard_normal((4, 3)) * 0.5
    inputs = {"O": rng.standard_normal((4, 3)) * 0.5}
    return (lambda x: ns_inner_loss(x["O"], g, 0.7)), inputs, {"O": ns_inner_grad(inputs["O"], g, 0.7)}


def _gc_feature(rng):
    coefficients = (1.0, -0.4, 0.3)
    up = rng.standard_normal((3, 4))
    inputs = {"G": rng.standard_normal((3, 4))}
    grads = {"G": feature_map_backward(up, inputs["G"], coefficients)}
    return (lambda x: np.sum(feature_map(x["G"], coefficients) * up)), inputs, grads


def _gc_outer(rng):
    A = rng.standard_normal((4, 6))
    B = rng.standard_normal((4, 4))
    H, PM, lam = A @ A.T, rng.standard_normal(4), 0.1 * B @ B.T  # a matrix lam (the eps H^{1/2} case)
    inputs = {"m": rng.standard_normal(4)}
    return (lambda x: outer_inner_loss(x["m"], H, PM, lam)), inputs, {"m": outer_inner_grad(inputs["m"], H, PM, lam)}


GRADCHECKS: dict[str, Callable] = {
    "optimizer_memories.precond_inner_grad": _gc_precond,
    "optimizer_memories.ns_inner_grad": _gc_ns,
    "optimizer_memories.feature_map": _gc_feature,
    "optimizer_memories.outer_inner_grad": _gc_outer,
}
"""Small float64 cases for ``nested-learning check``: the inner gradients and the feature map's VJP."""
