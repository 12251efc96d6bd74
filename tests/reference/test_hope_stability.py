"""The hope presets' inner step bound (SPEC.md#hope-stability): ``mem_eta_max = 0.003`` from
hope-small up. The mechanism is Titans' (SPEC.md#titans-stability): a chunk's inner gradients are
taken at its start state and summed, so a run of one repeated key (indentation, the columns of a
table) takes a step of about 2 eta C times the inner loss's curvature, which grows with the memory's
weights; once trained weights are a few times their initial scale the memories overflow within one
sequence. Checked here in float64 on the CPU port (property-tested equal to the reference): the
self-modifying layer's memories (M_k, M_v, M_eta, M_alpha, M_memory) with their initial weights
scaled by 3 and every eta gate near its bound, on table-like text."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nlref import config
from nlref.fast.cpu import mlp_memory as FM
from nlref.fast.cpu import model as F

# 60 rows of a codec table: the spaces between the columns repeat one key for 8+ tokens of a chunk
TABLE = "".join(f"    '{chr(97 + i % 26)}'        #  0x{i:02X} -> LATIN SMALL LETTER {chr(65 + i % 26)}\n"
                for i in range(60)).encode()
HOPE_PRESETS = [n for n, c in config.PRESETS.items() if c.family == "hope" and not n.endswith("-tiny")]


def _is_memory_init(name: str) -> bool:
    """A self-modifying memory's meta-learned initial weight (``blocks.i.mem.<m>.W1_0`` / ``W2_0``)."""
    return ".mem." in name and name.rsplit(".", 1)[1] in ("W1_0", "W2_0")


def _largest_memory_weight(cfg, seed, monkeypatch, scale=3.0) -> float:
    """The largest |weight| any self-modifying memory reaches over the sequence (every state an
    inner gradient is taken at), from weights ``scale`` times their initialisation and eta gates at
    sigmoid(4)."""
    seen = []
    inner_grad = FM.inner_grad

    def spy(W1, W2, *args, **kw):
        seen.append(max(float(np.max(np.abs(W1))), float(np.max(np.abs(W2)))))
        return inner_grad(W1, W2, *args, **kw)

    monkeypatch.setattr(FM, "inner_grad", spy)
    params = F.init_params(cfg, seed)
    for name in params:
        if _is_memory_init(name):
            params[name] = params[name] * scale
        if name.endswith(".mem.b_eta"):
            params[name] = np.full_like(params[name], 4.0)
    tokens = np.frombuffer(TABLE, dtype=np.uint8).astype(np.int64)[None, :513]
    with np.errstate(all="ignore"):
        F.loss_and_grads(params, tokens, cfg)
    monkeypatch.undo()
    assert seen, "the spy saw no inner gradient: the test measures nothing"
    return max(seen)


def test_presets_from_small_up_use_the_bound():
    assert len(HOPE_PRESETS) >= 10, HOPE_PRESETS  # small, medium, 50m, 125m and the small ablations
    for name in HOPE_PRESETS:
        assert config.preset(name).mem_eta_max == 0.003, name
    assert config.preset("hope-tiny").mem_eta_max == 0.1  # the tiny presets: the vectors of spec 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeated_keys_stay_bounded_at_the_presets_bound(seed, monkeypatch):
    cfg = dataclasses.replace(config.preset("hope-small"), dtype="float64")
    old = dataclasses.replace(cfg, mem_eta_max=0.01)
    new_w = _largest_memory_weight(cfg, seed, monkeypatch)
    old_w = _largest_memory_weight(old, seed, monkeypatch)
    assert new_w < 10.0, new_w  # measured 2.4-2.8: the scaled initial weights, barely moved
    assert not old_w < 1e6, old_w  # measured 1e118 to inf: the test can tell the two bounds apart


def _largest_initial_weight(cfg, seed) -> float:
    params = F.init_params(cfg, seed)
    return max(float(np.max(np.abs(v))) for k, v in params.items() if _is_memory_init(k))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_curvature_normalised_step_stays_bounded_where_the_bound_does_not(seed, monkeypatch):
    """``mem_step_norm`` (each G_t times 1 / (1 + eta_t C lambda_t), lambda_t a bound of the inner
    curvature) removes the mechanism instead of widening the margin: from weights 30x their
    initialisation at the presets' bound, and 10x at the default bound 0.1 (33x the presets'),
    where the bound alone overflows from 10x, no memory grows beyond its scaled initial weights
    (float64)."""
    cfg = dataclasses.replace(config.preset("hope-small"), dtype="float64")
    normed = dataclasses.replace(cfg, mem_step_norm=True)
    init = _largest_initial_weight(cfg, seed)
    for scale, c in ((30.0, normed), (10.0, dataclasses.replace(normed, mem_eta_max=0.1))):
        grown = _largest_memory_weight(c, seed, monkeypatch, scale) / (scale * init)
        assert grown < 1.5, (scale, c.mem_eta_max, grown)  # measured 1.00: the writes stay small
    plain = _largest_memory_weight(cfg, seed, monkeypatch, 10.0)
    assert not plain < 1e6, plain  # the same weights without it overflow: the test tells them apart
