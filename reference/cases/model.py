"""Gradient-check cases of the whole model (reference/model.py): float64, tiny presets, a few keys each.

SPEC: SPEC.md#gradient-checks (the convention of a case), SPEC.md#cms (first order: the loss
checked is ``loss_with_increments`` at the pass's own increments, whose exact gradient
``loss_and_grads`` returns).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..config import preset
from ..model import cms_increments, init_params, loss_and_grads, loss_with_increments


def _case(preset_name: str, in_context: bool, keys_like: tuple[str, ...], B0: int = 2, T0: int = 6):
    def make(rng, B=B0, T=T0):
        cfg = dataclasses.replace(preset(preset_name), dtype="float64", cms_in_context=in_context)
        params = init_params(cfg, seed=int(rng.integers(1 << 30)))
        tokens = rng.integers(0, cfg.vocab_size, size=(B, T))
        incs = cms_increments(params, tokens, cfg)
        _, grads = loss_and_grads(params, tokens, cfg)
        keys = [k for k in params if any(s in k for s in keys_like)]
        inputs = {k: params[k] for k in keys}
        return (lambda a: loss_with_increments(params | a, tokens, cfg, incs)), inputs, {k: grads[k] for k in keys}

    return make


GRADCHECKS: dict[str, Callable] = {
    "model.transformer_tiny": _case("transformer-tiny", False, ("blocks.1.attn.Wq", "blocks.0.norm2", "final_norm")),
    "model.hope_attention_tiny_static": _case("hope-attention-tiny", False,
                                              ("blocks.0.cms.0.W1", "blocks.1.norm1", "final_norm")),
    "model.hope_attention_tiny_in_context": _case("hope-attention-tiny", True,
                                                  ("blocks.0.cms.1.W2", "blocks.1.cms.0.W1", "final_norm")),
    "model.titans_tiny": _case("titans-tiny", False, ("blocks.1.mem.W1_0", "blocks.0.norm2.g",
                                                      "blocks.0.mem.g_o"), B0=1, T0=5),
    "model.hope_tiny_in_context": _case("hope-tiny", True, ("blocks.0.mem.memory.W1_0", "blocks.1.mem.g_o",
                                                            "blocks.0.norm1.g", "blocks.1.norm2.g"), B0=1, T0=5),
}
