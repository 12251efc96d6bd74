"""Gradient-check cases of the optimizers' momentum memories (reference/optimizers.py): float64, small.

SPEC: SPEC.md#optimizers, SPEC.md#gradient-checks (the convention of a case: ``make(rng) -> (loss,
inputs, grads)``, ``make.method``; reference/cases/__init__.py). The cases: the inner gradients each
momentum memory takes a step along (the optimizer updates themselves have no backward).
"""

from __future__ import annotations

from collections.abc import Callable

from ..optimizers import (
    deep_inner_grad,
    deep_inner_loss,
    delta_inner_grad,
    delta_inner_loss,
    dot_inner_grad,
    dot_inner_loss,
)


def _gc_dot(rng):
    G = rng.standard_normal((3, 4))
    PG = rng.standard_normal((3, 4))
    inputs = {"m": rng.standard_normal((3, 4))}
    return (lambda x: dot_inner_loss(x["m"], G, PG)), inputs, {"m": dot_inner_grad(inputs["m"], G, PG)}


def _gc_delta(rng):
    G = rng.standard_normal((3, 4))
    PG = rng.standard_normal((3, 4))
    c = 0.7
    inputs = {"m": rng.standard_normal((3, 4))}
    return (lambda x: delta_inner_loss(x["m"], G, PG, c)), inputs, {"m": delta_inner_grad(inputs["m"], G, PG, c)}


def _gc_deep(rng):
    G = rng.standard_normal((3, 4))
    inputs = {"M": rng.standard_normal((3, 4)), "W1": rng.standard_normal((3, 5)),
              "W2": rng.standard_normal((5, 4)) * 0.5}
    dM, dW1, dW2 = deep_inner_grad(inputs["M"], inputs["W1"], inputs["W2"], G)

    def loss(x):
        return deep_inner_loss(x["M"], x["W1"], x["W2"], G)

    return loss, inputs, {"M": dM, "W1": dW1, "W2": dW2}


GRADCHECKS: dict[str, Callable] = {
    "optimizers.dot_inner_grad": _gc_dot,
    "optimizers.delta_inner_grad": _gc_delta,
    "optimizers.deep_inner_grad": _gc_deep,
}
"""Small float64 cases for ``nested-learning check``: the inner gradients each momentum memory
takes a step along (the optimizer updates themselves have no backward)."""
