"""Gradient-check cases of the matrix memories (reference/memory.py): small float64 problems.

SPEC: SPEC.md#memory, SPEC.md#gradient-checks (the convention of a case: ``make(rng) -> (loss,
inputs, grads)``, ``make.method``; reference/cases/__init__.py). The cases: ``example_inputs`` draws
well-conditioned inputs; ``gradcheck_case`` checks a rule through loss = <y, u> + <M_T, U> (every
input, the final state's path included).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..memory import RULES


def example_inputs(rng, B, T, d_k, d_v, dtype=np.float64, gamma=False):
    """Well-conditioned random inputs: keys of norm ~1, eta in (0.1, 0.9), alpha in (0.6, 1)."""
    out = {
        "q": rng.standard_normal((B, T, d_k)),
        "k": rng.standard_normal((B, T, d_k)) / np.sqrt(d_k),
        "v": rng.standard_normal((B, T, d_v)),
        "eta": rng.uniform(0.1, 0.9, (B, T)),
        "alpha": rng.uniform(0.6, 1.0, (B, T)),
    }
    if gamma:
        out["gamma"] = rng.uniform(0.1, 1.0, (B, T))
    out["M0"] = rng.standard_normal((B, d_v, d_k)) * 0.5
    return {name: x.astype(dtype) for name, x in out.items()}


def gradcheck_case(rule, inputs, rng, **static):
    """(loss, inputs, grads) for ``check_gradients``: loss = <y, u> + <M_T, U> with random u, U."""
    forward, backward = RULES[rule]
    y, M_T, cache = forward(**inputs, **static)
    u = rng.standard_normal(y.shape)
    U = rng.standard_normal(M_T.shape)

    def loss(xs):
        y_, M_ = forward(**xs, **static)[:2]
        return np.sum(y_ * u) + np.sum(M_ * U)

    return loss, inputs, backward(u, U, cache)


def _case(rule, T, gamma=False, **static):
    def make(rng):
        return gradcheck_case(rule, example_inputs(rng, 2, T, 3, 2, gamma=gamma), rng, **static)

    return make


GRADCHECKS: dict[str, Callable] = {
    "memory.hebbian": _case("hebbian", 5),
    "memory.hebbian_chunked": _case("hebbian_chunked", 7, chunk_size=3),
    "memory.delta": _case("delta", 5),
    "memory.delta_chunked": _case("delta_chunked", 7, chunk_size=3),
    "memory.dgd": _case("dgd", 5),
    "memory.dgd_chunked": _case("dgd_chunked", 7, chunk_size=3),
    "memory.oja": _case("oja", 5),
    "memory.omega": _case("omega", 6, gamma=True, window=2),
    "memory.omega_chunk3": _case("omega", 7, gamma=True, window=3, chunk_size=3),
    "memory.omega_chunked": _case("omega_chunked", 7, gamma=True, window=3, chunk_size=3),
}
"""Small float64 cases for ``nested-learning check`` (SPEC.md#gradient-checks)."""
