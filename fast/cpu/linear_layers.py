"""CPU port of the linear-attention, DeltaNet, Gated DeltaNet and DGD layers.

Paper: NL Eqs. (14)-(18), (56)-(57), (64)-(65), arXiv 2512.24695v1. Specification:
reference/linear_layers.py and SPEC.md#linear-families; the same functions and signatures.

The layer is the reference's (its projections, gates, read norm and hand-written backward, run
with ``rule=``): only the memory rule differs. The reference runs memory.py's chunk forms (the
UT transform: per chunk a triangular solve written as a loop of small einsums, about 8,000 NumPy
calls per deltanet-small step); this port runs fast/cpu/memory.py's compiled token loops of the
same rules (``hebbian``, ``delta`` (with alpha: gated), ``dgd``), one kernel per direction for
all (sequence, head) pairs. The two are exact rewrites of one recurrence (reference/memory.py's
tests), so they differ in rounding only: checked by the same property tests as the other ports
(tests/reference/test_linear_families.py, the "port" tolerance rows). The chunk size no longer
matters here (the token loop has none). The token loop's cache keeps every state (B H, T + 1, dh,
dh): memory linear in T, as the chunk form's per-chunk starts are.
"""

from __future__ import annotations

from ...reference import linear_layers as RL
from ...reference.linear_layers import (  # noqa: F401  (the module's API, as the reference's)
    FAMILY_RULES,
    RULES,
    LinearLayerConfig,
    init_params,
    init_state,
    param_shapes,
)
from . import memory as FM

_TOKEN_RULES = {"hebbian": (FM.hebbian_forward, FM.hebbian_backward), "delta": (FM.delta_forward, FM.delta_backward),
                "gated_delta": (FM.delta_forward, FM.delta_backward), "dgd": (FM.dgd_forward, FM.dgd_backward)}
"""The layer's rule -> the compiled token loop (gated_delta is the delta rule with its alpha)."""


def _rule(cfg):
    fwd, bwd = _TOKEN_RULES[cfg.rule]
    return (lambda q, k, v, eta, alpha, M0, chunk: fwd(q, k, v, eta, alpha, M0)), bwd


def forward(x, params, cfg: LinearLayerConfig, state=None):
    """reference.linear_layers.forward with the compiled token loop: (y, cache, new_state)."""
    return RL.forward(x, params, cfg, state, rule=_rule)


def backward(dy, cache, dstate=None):
    """reference.linear_layers.backward with the compiled token loop's backward: (dx, dparams, dstate0)."""
    return RL.backward(dy, cache, dstate, rule=_rule)
