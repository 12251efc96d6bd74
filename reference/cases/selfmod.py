"""Gradient-check cases of self-modifying Titans (reference/selfmod.py): float64, tiny, strong writes.

SPEC: SPEC.md#selfmod (the cases and why they use the complex step), SPEC.md#gradient-checks (the
convention of a case: ``make(rng) -> (loss, inputs, grads)``, ``make.method``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..selfmod import SelfModConfig, backward, forward, init_params


def example_params(cfg: SelfModConfig, rng: np.random.Generator, dtype=np.float64, spread: float = 0.3):
    """init_params perturbed by ``spread`` N(0, 1) noise, with strong writes that are remembered
    (eta ~ 0.5 eta_max, alpha ~ 0.9, beta ~ 0.5, gate readouts of size ~0.5): every parameter then
    moves the output by a visible amount (gradient checks, the ports' equivalence tests)."""
    p = init_params(cfg, rng, dtype)
    p["b_eta"] = np.zeros_like(p["b_eta"])
    if cfg.retention:  # (no alpha gate without retention: alpha = 1)
        p["b_alpha"] = np.full_like(p["b_alpha"], 2.0)  # alpha ~ 0.9: the writes are remembered
    p["w_eta"] = (0.5 * rng.standard_normal(p["w_eta"].shape)).astype(dtype)
    if cfg.retention:
        p["w_alpha"] = (0.5 * rng.standard_normal(p["w_alpha"].shape)).astype(dtype)
    for m in cfg.memories:
        if cfg.momentum:
            p[f"{m}.b_beta"] = np.zeros_like(p[f"{m}.b_beta"])
    return {k: (v + spread * rng.standard_normal(v.shape)).astype(dtype) for k, v in p.items()}


def _case(T=5, B=1, with_state=False, **kw):
    cfg = SelfModConfig(d_model=2, n_heads=1, hidden=2, eta_max=1.0, **kw)  # strong writes

    def case(rng):
        params = example_params(cfg, rng)
        x = rng.standard_normal((B, T, cfg.d_model))
        state = None
        if with_state:  # continue a stream from inside a chunk
            state = forward(rng.standard_normal((B, 3, cfg.d_model)), params, cfg)[2]
        y, cache, _ = forward(x, params, cfg, state)
        u = rng.standard_normal(y.shape)
        dx, dparams, _ = backward(u, cache)

        def loss(inputs):
            inputs = dict(inputs)
            xx = inputs.pop("x")
            st = None if state is None else {k: v.astype(xx.dtype) if isinstance(v, np.ndarray) else v
                                             for k, v in state.items()}  # fmt: skip
            return np.sum(forward(xx, inputs, cfg, st)[0] * u)

        grads = {"x": dx, **dparams}
        return loss, {"x": x, **params}, grads

    # Every key, entry by entry, by the complex step (the forward is analytic): central differences
    # at e = 1e-6 carry ~1e-10 x (loss scale) of rounding per entry and cannot resolve a key whose
    # gradient is < ~1e-4 of the largest (measured: a gate memory's momentum decay, ~1e-7 of the
    # loss, gave 1e-4..1 relative error). `nested-learning check` reads this attribute.
    case.method = "complex"
    return case


GRADCHECKS: dict[str, Callable[[np.random.Generator], tuple]] = {
    "selfmod.mlp": _case(chunk_memory=2, chunk_other=3),
    "selfmod.mlp_no_momentum": _case(chunk_memory=3, chunk_other=1, momentum=False),
    "selfmod.mlp_adaptive_q": _case(chunk_memory=1, chunk_other=2, adaptive_q=True),
    "selfmod.matrix": _case(memory="matrix", chunk_memory=2, chunk_other=1),
    "selfmod.matrix_single_shrink": _case(memory="matrix", chunk_memory=1, chunk_other=2, single_shrink=True),
    "selfmod.mlp_streaming": _case(T=3, chunk_memory=2, chunk_other=2, with_state=True),
}
