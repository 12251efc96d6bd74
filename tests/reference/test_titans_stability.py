"""The Titans presets' memory (SPEC.md#titans-stability): Titans §3.3's LayerNorm memory
z + LN(W1 s(W2 z)) and eta_max 0.01, which keep the layer finite on repeated keys where the plain
residual memory at eta_max 0.1 overflows, and the switch that selects it (``mem_layernorm``) on every
path: validation, the layer config, the CPU port and the torch oracle (tests/oracle)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from port_helpers import assert_model_port_matches

from nlref import config
from nlref.fast.cpu import model as F
from nlref.reference import contract, titans
from nlref.reference import model as R

TITANS_PRESETS = [n for n, c in config.PRESETS.items()
                  if c.family in ("titans", "titans-mag", "titans-mal", "titans-mac") and not n.endswith("-tiny")]

# Python-like text whose 16-space indents repeat one key for 12+ tokens of a 16-token chunk: the inner
# gradients of a chunk (all at its start state) then add up to a step far past the inner loss's curvature
INDENTED = "".join(f"def f{i}(x):\n" + " " * 16 + f"return x + {i}\n" for i in range(40)).encode()


def _loss(cfg, seed):
    tokens = np.frombuffer(INDENTED, dtype=np.uint8).astype(np.int64)[None, :257]
    with np.errstate(all="ignore"):
        loss, _ = R.loss_and_grads(R.init_params(cfg, seed), tokens, cfg)
    return loss


def test_presets_from_small_up_use_the_layernorm_memory():
    assert len(TITANS_PRESETS) >= 6, TITANS_PRESETS  # small, medium, 50m, 125m, mag-small, mal-small
    for name in TITANS_PRESETS:
        cfg = config.preset(name)
        assert cfg.mem_kind == "mlp" and cfg.mem_layernorm and cfg.mem_eta_max == 0.01, name
        lc = contract.layer_config(titans, cfg)
        assert lc.layernorm and lc.eta_max == 0.01, name
    assert not config.preset("titans-tiny").mem_layernorm  # the tiny presets: the vectors of spec 0.3


def test_repeated_keys_stay_finite_with_the_presets_memory():
    """At initialisation, before any outer step: titans-small's loss on indented text is finite for
    every seed; the plain memory at eta_max 0.1 (titans-small before this fix) is not, for most."""
    cfg = dataclasses.replace(config.preset("titans-small"), dtype="float64")
    old = dataclasses.replace(cfg, mem_layernorm=False, mem_eta_max=0.1)
    new_losses = [_loss(cfg, s) for s in range(4)]
    old_losses = [_loss(old, s) for s in range(4)]
    assert all(math.isfinite(v) for v in new_losses), new_losses
    assert sum(not math.isfinite(v) for v in old_losses) >= 2, old_losses  # the test can tell


def test_layernorm_changes_the_function():
    cfg = config.preset("titans-tiny")
    ln = dataclasses.replace(cfg, mem_layernorm=True)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9))
    params = R.init_params(cfg, 1)
    a, _ = R.loss_and_grads(params, tokens, cfg)
    b, _ = R.loss_and_grads(params, tokens, ln)
    assert abs(a - b) > 1e-6 * abs(a)


@pytest.mark.parametrize("name", ["titans-tiny", "titans-mag-tiny"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_port_matches_reference_with_layernorm(name, dtype):
    cfg = dataclasses.replace(config.preset(name), mem_layernorm=True, dtype=dtype)
    params = R.init_params(cfg, 2)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 9))
    assert_model_port_matches(F, R, params, tokens, cfg, dtype, 4)


@pytest.mark.parametrize("over, message", [
    ({"family": "transformer"}, "mem_layernorm is a switch of the hope family's self-modifying layer and of the "
                                "Titans memory families; family 'transformer' has none"),
    ({"family": "titans", "mem_kind": "matrix"}, "mem_layernorm is the LayerNorm of an MLP memory"),
])
def test_layernorm_switch_is_validated(over, message):
    base = config.preset("transformer-tiny" if over["family"] == "transformer" else "titans-tiny").to_dict()
    base.update(over, mem_layernorm=True)
    with pytest.raises(ValueError, match=message):
        config.from_dict(base)
