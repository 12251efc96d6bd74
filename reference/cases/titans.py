"""Gradient-check cases of the Titans memory layer (reference/titans.py): small float64 problems.

SPEC: SPEC.md#titans, SPEC.md#gradient-checks (the convention of a case: ``make(rng) -> (loss,
inputs, grads)``, ``make.method``; reference/cases/__init__.py). The cases: tiny float64 layers;
every parameter, the input and (``with_state``) every array of an incoming mid-chunk state are
checked; ``gradcheck_case`` is reused by the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..titans import (
    TitansConfig,
    init_params,
    init_state,
    titans_backward,
    titans_forward,
)


def gradcheck_case(rng, cfg: TitansConfig, B=2, T=5, with_state=False):
    """(loss, inputs, grads) for ``check_gradients``: inputs are x, every parameter and, with
    ``with_state``, every array of an incoming mid-chunk state (keys ``state.<name>``)."""
    params = init_params(cfg, rng)
    for key in params:  # move off the special initial values so every path is exercised
        params[key] = params[key] + 0.3 * rng.standard_normal(params[key].shape)
        if key.startswith("b_"):  # gates where they are sensitive; retention ~0.8 so that the
            # running state still matters after a chunk (tiny gradients drown in rounding)
            params[key] = 0.5 * rng.standard_normal(params[key].shape) + (1.5 if key == "b_alpha" else 0.0)
    x = rng.standard_normal((B, T, cfg.d_model))
    inputs = {"x": x, **params}
    pos = 0
    if with_state:
        st = init_state(params, cfg, B)
        pos = int(rng.integers(0, cfg.chunk))
        for key in st:
            if key != "pos":
                inputs["state." + key] = 0.5 * rng.standard_normal(st[key].shape)
    u = rng.standard_normal(x.shape)

    def split(inp):
        prm = {k: v for k, v in inp.items() if k != "x" and not k.startswith("state.")}
        st = {k[6:]: v for k, v in inp.items() if k.startswith("state.")}
        if st:
            st["pos"] = pos
        return inp["x"], prm, st or None

    def loss(inp):
        return np.sum(titans_forward(*split(inp)[:2], cfg, split(inp)[2])[0] * u)

    _, cache, _ = titans_forward(*split(inputs)[:2], cfg, split(inputs)[2])
    dx, dparams, dstate0 = titans_backward(u, cache)
    grads = {"x": dx, **dparams}
    if dstate0 is not None:
        grads.update({"state." + k: v for k, v in dstate0.items()})
    return loss, inputs, grads


def _case(**kw) -> Callable:
    T = kw.pop("T", 5)
    with_state = kw.pop("with_state", False)
    kw = {"n_heads": 2, **kw}
    cfg = TitansConfig(d_model=4, hidden=3, eta_max=1.0, **kw)  # large eta: big write terms
    return lambda rng: gradcheck_case(rng, cfg, B=1, T=T, with_state=with_state)


GRADCHECKS: dict[str, Callable] = {
    "titans.matrix_momentum_c2": _case(chunk=2),
    "titans.matrix_c1": _case(chunk=1, momentum=False),
    "titans.mlp_momentum_c2": _case(chunk=2, memory="mlp"),
    "titans.mlp_ln_c2": _case(chunk=2, memory="mlp", layernorm=True, n_heads=1),  # LN over dh = 4
    "titans.mlp_c5_state": _case(chunk=5, T=7, memory="mlp", with_state=True),
    "titans.matrix_loop_c5_state": _case(chunk=5, T=7, impl="loop", with_state=True),
}
"""Every case: tiny float64 layer, every parameter and the input (and an incoming state)."""
