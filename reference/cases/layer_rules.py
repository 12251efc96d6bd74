"""Gradient-check cases of the layer update rules (reference/layer_rules.py): small float64 problems.

SPEC: SPEC.md#layer-rules, SPEC.md#gradient-checks (the convention of a case: ``make(rng) -> (loss,
inputs, grads)``, ``make.method``; reference/cases/__init__.py). The cases: the inner objectives
each rule steps along (GGD, momentum memory; ``dot`` and ``l2`` objectives).
"""

from __future__ import annotations

from collections.abc import Callable

from ..layer_rules import ggd_inner_grad, ggd_inner_loss, momentum_inner_grad, momentum_inner_loss


def _gc_ggd(objective):
    def make(rng):
        X, U = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
        inputs = {"W": rng.standard_normal((2, 3))}
        grads = {"W": ggd_inner_grad(inputs["W"], X, U, objective)}
        return (lambda x: ggd_inner_loss(x["W"], X, U, objective)), inputs, grads

    return make


def _gc_momentum(objective):
    def make(rng):
        X, U = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
        inputs = {"M": rng.standard_normal((2, 3)), "W1": rng.standard_normal((2, 5)),
                  "W2": rng.standard_normal((5, 3)) * 0.5}
        dM, dW1, dW2 = momentum_inner_grad(inputs["M"], inputs["W1"], inputs["W2"], X, U, objective)

        def loss(x):
            return momentum_inner_loss(x["M"], x["W1"], x["W2"], X, U, objective)

        return loss, inputs, {"M": dM, "W1": dW1, "W2": dW2}

    return make


GRADCHECKS: dict[str, Callable] = {
    "layer_rules.ggd_inner_grad[dot]": _gc_ggd("dot"),
    "layer_rules.ggd_inner_grad[l2]": _gc_ggd("l2"),
    "layer_rules.momentum_inner_grad[dot]": _gc_momentum("dot"),
    "layer_rules.momentum_inner_grad[l2]": _gc_momentum("l2"),
}
"""Small float64 cases for ``nested-learning check``: the inner gradients each rule steps along."""
