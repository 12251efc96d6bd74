"""The reference's gradient-check cases: one module per reference module, kept out of the teaching code.

SPEC: SPEC.md#gradient-checks. ``reference/cases/<module>.py`` holds the cases of
``reference/<module>.py``: a ``GRADCHECKS`` dict, case name (``"<module>.<op>"``) -> maker.

The convention of a case maker: ``make(rng, **sizes) -> (loss_fn, inputs, analytic_grads)``.
It takes a ``numpy.random.Generator`` (and, where it has them, optional size keywords, so the
tests can draw sizes with hypothesis; called with the rng alone it builds a small default case)
and returns

    loss_fn          inputs -> a real scalar (a layer is checked through ``<forward(inputs), u>``
                     with a random upstream ``u``);
    inputs           name -> float64 array, the point where the gradient is checked;
    analytic_grads   name -> the hand-written gradient of ``loss_fn`` at ``inputs`` (the same keys).

A maker whose forward is analytic may carry ``make.method = "complex"`` (the complex step);
otherwise central differences are used (reference/gradcheck.py ``check_gradients``).
``nested-learning check`` runs every case of ``all_cases()`` in order, case ``i`` with
``numpy.random.default_rng([seed, i])``, and exits 1 if one fails.

Importing this package imports no NumPy; ``modules()`` and ``all_cases()`` import the case modules
(and through them the reference).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable

MODULES = (
    "primitives", "memory", "mlp_memory", "titans", "selfmod", "cms", "model", "optimizers", "toy",
    "layer_rules", "optimizer_memories", "linear_layers",
)
"""The reference modules that have gradient-check cases, in the order ``nested-learning check``
runs them (the order fixes each case's seed)."""


def modules() -> dict[str, types.ModuleType]:
    """Reference module name -> its case module ``reference.cases.<name>`` (in ``MODULES`` order)."""
    return {name: importlib.import_module(f"{__name__}.{name}") for name in MODULES}


def all_cases() -> dict[str, Callable]:
    """Case name -> maker over every module in ``MODULES`` (in order; names are unique)."""
    out: dict[str, Callable] = {}
    for module_name, module in modules().items():
        for name, make in module.GRADCHECKS.items():
            if name in out:
                raise ValueError(f"gradient-check case {name!r} of {module_name} is registered twice")
            out[name] = make
    return out
