"""Gradient-check cases of the linear-attention family layers (reference/linear_layers.py): float64, small.

SPEC: SPEC.md#linear-families, SPEC.md#gradient-checks (the convention of a case: ``make(rng) ->
(loss, inputs, grads)``, ``make.method``; reference/cases/__init__.py). The cases: tiny float64
layers; every parameter, the input and (``with_state``) the incoming memory; the loss also weights
the returned state. ``gradcheck_case`` is reused by the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..linear_layers import (
    LinearLayerConfig,
    backward,
    forward,
    init_params,
    init_state,
)


def gradcheck_case(rng, cfg: LinearLayerConfig, B=2, T=5, with_state=False):
    """(loss, inputs, grads) for ``check_gradients``: inputs are x, every parameter and, with
    ``with_state``, the incoming memory (key ``state.M``); the loss also weights the returned
    state, so the state's gradient path is checked too."""
    params = init_params(cfg, rng)
    for key in params:  # off the special initial values so that every path is exercised
        params[key] = params[key] + 0.3 * rng.standard_normal(params[key].shape)
    x = rng.standard_normal((B, T, cfg.d_model))
    inputs = {"x": x, **params}
    if with_state:
        inputs["state.M"] = 0.5 * rng.standard_normal(init_state(params, cfg, B)["M"].shape)
    u = rng.standard_normal(x.shape)
    U = rng.standard_normal(init_state(params, cfg, B)["M"].shape)

    def split(inp):
        prm = {k: v for k, v in inp.items() if k != "x" and not k.startswith("state.")}
        return inp["x"], prm, ({"M": inp["state.M"]} if "state.M" in inp else None)

    def loss(inp):
        y, _, st = forward(*split(inp)[:2], cfg, split(inp)[2])
        return np.sum(y * u) + np.sum(st["M"] * U)

    _, cache, _ = forward(*split(inputs)[:2], cfg, split(inputs)[2])
    dx, dparams, dstate0 = backward(u, cache, {"M": U})
    grads = {"x": dx, **dparams}
    if dstate0 is not None:
        grads["state.M"] = dstate0["M"]
    return loss, inputs, grads


def _case(**kw) -> Callable:
    T, with_state = kw.pop("T", 5), kw.pop("with_state", False)
    cfg = LinearLayerConfig(d_model=4, **{"n_heads": 2, **kw})
    return lambda rng: gradcheck_case(rng, cfg, B=2, T=T, with_state=with_state)


GRADCHECKS: dict[str, Callable] = {
    "linear_layers.hebbian_c2": _case(rule="hebbian", chunk=2),
    "linear_layers.delta_c2": _case(rule="delta", chunk=2),
    "linear_layers.gated_delta_c3_state": _case(rule="gated_delta", chunk=3, T=7, with_state=True),
    "linear_layers.delta_c1_state": _case(rule="delta", chunk=1, with_state=True, n_heads=1),
    "linear_layers.dgd_c3_state": _case(rule="dgd", chunk=3, T=7, with_state=True),
}
"""Every case: tiny float64 layer, every parameter and the input (and an incoming state)."""
