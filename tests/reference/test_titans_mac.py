"""The Titans "memory as context" family (MAC, Titans §4.1).

SPEC.md#titans-mac. The block's mixer against its definition written out (per segment the memory's
fast weights from the Titans layer alone over the earlier segments' outputs, the retrieval read
written out, causal attention by loops over [p, h_1, a_1, h_2, a_2, ...], the layer alone over the
outputs, the gate), causality (a token changes no earlier output, although each retrieval h_j is
a function of its own token), the retrieval's reading of the memory as it stood at the segment's
start, and state_size exact. The checks the three hybrid families share (the whole-model gradient
check, streaming inside segments with the open segment's cache and M_s carried and the cache
sizes checked, the CPU port with its compiled Titans layer and read, training from the CLI, the
refusals) are in test_titans_hybrids.py.
"""

import dataclasses

import numpy as np
import pytest
from hybrid_oracles import mac_oracle
from tolerances import assert_close

from nlref import config
from nlref.reference import blocks
from nlref.reference import model as R

TINY = "titans-mac-tiny"
B0 = "blocks.0."

# ---------------------------------------------------------------------------------------------
# The MAC mixer: its definition, causality, the retrieval
# ---------------------------------------------------------------------------------------------


def _block_input(cfg, B, n, seed):
    return np.random.default_rng(seed).standard_normal((B, n, cfg.d_model))


def _mac(a, params, cfg, p0=0, past=None, mem=None):
    return blocks.mac_forward(R.REFERENCE, a, params, B0, cfg, p0, past, mem)


@pytest.mark.parametrize("overrides", [{}, {"mem_persistent": 0}, {"attn_window": 1}, {"mem_kind": "matrix"},
                                       {"attn_window": 20, "mem_persistent": 3}, {"attn_window": 3}])
def test_mac_mixer_is_its_definition(overrides):
    cfg = dataclasses.replace(config.preset(TINY), **overrides)
    params = R.init_params(cfg, seed=2)
    a = _block_input(cfg, 2, 9, seed=3)
    assert_close(_mac(a, params, cfg)[0], mac_oracle(a, params, cfg), "float64", "rewrite", "MAC mixer")


@pytest.mark.parametrize("j", [0, 2, 5, 8])
def test_a_token_changes_no_earlier_output(j):
    """Causality inside a segment: h_i is a function of a_i (its query) and a_i attends to h_k only
    for k <= i (the interleaved order), so changing a_j leaves every output before j bit for bit
    (Titans' literal [p || h || S] under a causal mask would let a_i read h_j, j > i) and changes
    the outputs from j on."""
    cfg = config.preset(TINY)
    params = R.init_params(cfg, seed=5)
    a = _block_input(cfg, 2, 10, seed=6)
    b = a.copy()
    b[:, j] += 1.0
    oa, ob = _mac(a, params, cfg)[0], _mac(b, params, cfg)[0]
    np.testing.assert_array_equal(oa[:, :j], ob[:, :j])
    assert not np.allclose(oa[:, j], ob[:, j])


def test_the_retrieval_reads_the_memory_at_the_segment_start():
    """M_s, carried in the state of an open segment, is the memory's running state after the earlier
    segments (Titans Eq. 21: M_{t-1}), not after the segment's own tokens; the first segment's is the
    meta-learned initial memory; at a segment's end the state holds no segment cache."""
    cfg = config.preset(TINY)  # segments of C = 4 tokens
    C = cfg.attn_window
    params = R.init_params(cfg, seed=7)
    a = _block_input(cfg, 2, 2 * C + 2, seed=8)
    _, _, past, mem = _mac(a[:, :C + 2], params, cfg)
    _, _, done, mem_c = _mac(a[:, :C], params, cfg)
    assert done is None
    for n in ("W1", "W2"):
        np.testing.assert_array_equal(past[2][n], mem_c[n])
        assert not np.allclose(past[2][n], mem[n])
    _, _, first, _ = _mac(a[:, :2], params, cfg)
    np.testing.assert_array_equal(first[2]["W1"], np.broadcast_to(params[B0 + "mem.W1_0"], first[2]["W1"].shape))
    assert past[0].shape[2] == cfg.mem_persistent + 2 * 2  # [p, h_1, a_1, h_2, a_2] of the open segment


# ---------------------------------------------------------------------------------------------
# The model: gradients, streaming, state
# ---------------------------------------------------------------------------------------------


def _tokens(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


def test_state_size_counts_the_largest_state():
    """state_size's fixed floats = a real state's at its largest, one token before a segment's end: the
    open segment's cache (N_p + 2 (C - 1) keys and values), M_s and the Titans state."""
    cfg = config.preset(TINY)
    params = R.init_params(cfg, seed=1)
    _, state = R.forward(params, _tokens(cfg, 2, 2 * cfg.attn_window - 1, seed=2), cfg)
    floats = 0
    for past, mem in zip(state["past"], state["mem"], strict=True):
        floats += past[0].size + past[1].size + sum(w.size for w in past[2].values())
        floats += sum(int(np.size(w)) for w in mem.values() if isinstance(w, np.ndarray))
    size = R.state_size(cfg)
    assert size["per_token"] == 0 and size["fixed"] == floats // 2


# ---------------------------------------------------------------------------------------------
# Presets, ports, the command line
# ---------------------------------------------------------------------------------------------


def test_presets_and_validation():
    """titans-mac-small within 10 % of transformer-small's parameter count (measured -0.12 %); the tiny
    preset is float64; the segment (attn_window) and N_p are the hybrids' fields; the block has its
    persistent tokens, the retrieval's query and norm and the gate, and the SwiGLU."""
    base = sum(R.param_counts(config.preset("transformer-small")).values())
    n = sum(R.param_counts(config.preset("titans-mac-small")).values())
    assert abs(n - base) <= 0.1 * base, (n, base)
    tiny = config.preset(TINY)
    assert tiny.dtype == "float64" and tiny.family == "titans-mac" and config.preset("titans-mac-small").dtype == "float32"
    assert config.from_dict(tiny.to_dict()) == tiny
    for key, bad in (("attn_window", 0), ("mem_persistent", -1)):
        with pytest.raises(ValueError, match=f"{key} must be an int"):
            dataclasses.replace(tiny, **{key: bad})
    shapes = R.param_shapes(tiny)
    D = tiny.d_model
    assert shapes["blocks.0.mac.persist"] == (2, D) and shapes["blocks.0.mac.W_q"] == shapes["blocks.0.mac.W_out"] == (D, D)
    assert not any(".mag." in k or ".mal." in k for k in shapes) and "blocks.0.mlp.W_up" in shapes
    assert "blocks.0.mac.persist" not in R.param_shapes(dataclasses.replace(tiny, mem_persistent=0))
