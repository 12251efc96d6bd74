"""Gradient-check cases of the momentum toy (Eq. 53) (reference/toy.py): small float64 problems.

SPEC: SPEC.md#optimizers, SPEC.md#gradient-checks (the convention of a case: ``make(rng) -> (loss,
inputs, grads)``, ``make.method``; reference/cases/__init__.py). The cases: the hand-written
gradient of the valley psi.
"""

from __future__ import annotations

from collections.abc import Callable

from ..toy import psi, psi_grad


def _gc_psi(rng):
    x = rng.standard_normal(2)
    return (lambda d: psi(d["x"])), {"x": x}, {"x": psi_grad(x)}


GRADCHECKS: dict[str, Callable] = {"toy.psi": _gc_psi}
"""Float64 check of the hand-written gradient of Eq. (53) (SPEC.md#gradient-checks)."""
