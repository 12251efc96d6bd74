"""Gradient-check cases of the Continuum Memory System (reference/cms.py): small float64 problems.

SPEC: SPEC.md#cms, SPEC.md#gradient-checks (the convention of a case: ``make(rng) -> (loss, inputs,
grads)``, ``make.method``; reference/cases/__init__.py). The cases: the sequential and independent
chains over per-group level weights (a segment starting at absolute position 1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..cms import backward, forward, groups_for


def _case(variant: str, act: str = "gelu"):
    def make(rng, B=2, T=5, D=3, hidden=(4, 2), periods=(2, 3)):
        u = rng.standard_normal((B, T, D))
        inputs = {"u": u}
        groups = []
        for l, (h, p) in enumerate(zip(hidden, periods, strict=True)):
            gr = groups_for(p, 1, T)  # a segment starting at absolute position 1
            groups.append(gr)
            inputs[f"{l}.W1"] = 0.5 * rng.standard_normal((B, len(gr), D, h))
            inputs[f"{l}.W2"] = 0.5 * rng.standard_normal((B, len(gr), h, D))
        if variant == "independent":
            inputs["agg"] = rng.standard_normal(len(hidden))
        up = rng.standard_normal((B, T, D))

        def fwd(a):
            w = [(a[f"{l}.W1"], a[f"{l}.W2"]) for l in range(len(hidden))]
            return forward(a["u"], w, groups, variant, act, a.get("agg"))

        y, cache = fwd(inputs)
        du, dw, dagg = backward(up, cache)
        grads = {"u": du}
        for l, (d1, d2) in enumerate(dw):
            grads[f"{l}.W1"] = d1
            grads[f"{l}.W2"] = d2
        if dagg is not None:
            grads["agg"] = dagg
        return (lambda a: np.sum(fwd(a)[0] * up)), inputs, grads

    return make


GRADCHECKS: dict[str, Callable] = {
    "cms.sequential": _case("sequential"),
    "cms.independent": _case("independent"),
    "cms.sequential_silu": _case("sequential", "silu"),
}
