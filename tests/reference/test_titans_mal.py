"""The Titans "memory as a layer" family (MAL, Titans §4.3).

SPEC.md#titans-mal. The block's mixer against its parts computed independently (the Titans layer
alone over x~ = [p] || a, RMSNorm written out, the sliding window by loops with no key exempt
from it), the reductions (no persistent tokens and a window over everything: the titans family's
layer then Transformer++'s attention; a window of one token: the memory's output projected, every
other position hidden) and the state after the persistent tokens. The checks the three hybrid
families share (the whole-model gradient check, streaming with the KV cache cut to the last
window - 1 positions, the CPU port, training from the CLI, the refusals) are in
test_titans_hybrids.py. The window primitive itself is tested in test_titans_mag.py (SW-Attn*
with any number of persistent keys, 0 included).
"""

import dataclasses

import numpy as np
import pytest
from hybrid_oracles import rms, sw_attention, titans_alone, with_persistent
from tolerances import assert_close

from nlref import config
from nlref.reference import blocks
from nlref.reference import model as R

TINY = "titans-mal-tiny"
B0 = "blocks.0."

# ---------------------------------------------------------------------------------------------
# The MAL mixer: its parts, its reductions
# ---------------------------------------------------------------------------------------------


def _mal_oracle(a, params, cfg, b=B0):
    """The MAL mixer from its definition, at a sequence start: x~ = [p] || a; m = the Titans layer
    alone over x~; y = SW-Attn(RMSNorm(m)) (the projections, RoPE at x~'s positions, the window by
    loops, no persistent key exempt); o = y at the positions of a."""
    Np = cfg.mem_persistent
    xt = with_persistent(a, params, b + "mal.persist", Np)
    u = rms(titans_alone(xt, params, b, cfg), params[b + "mal.norm.g"], cfg.norm_eps)
    return sw_attention(u, params, b, cfg, 0)[:, Np:]


def _block_input(cfg, B, n, seed):
    return np.random.default_rng(seed).standard_normal((B, n, cfg.d_model))


def _mal(a, params, cfg, b=B0):
    return blocks.mal_forward(R.REFERENCE, a, params, b, cfg, 0, None, None)[0]


@pytest.mark.parametrize("overrides", [{}, {"mem_persistent": 0}, {"attn_window": 1}, {"mem_kind": "matrix"},
                                       {"attn_window": 20, "mem_persistent": 3}])
def test_mal_mixer_is_its_parts(overrides):
    cfg = dataclasses.replace(config.preset(TINY), **overrides)
    params = R.init_params(cfg, seed=2)
    a = _block_input(cfg, 2, 7, seed=3)
    assert_close(_mal(a, params, cfg), _mal_oracle(a, params, cfg), "float64", "rewrite", "MAL mixer")


def test_mal_reduces_to_the_other_families_parts():
    """N_p = 0 and a window over every token: the titans family's layer (blocks.layer_of on a titans
    config), RMSNorm, then the transformer family's attention (blocks.attn_forward, plain causal):
    MAL is the composition of the parts the other families use, bit for bit."""
    cfg = dataclasses.replace(config.preset(TINY), mem_persistent=0, attn_window=50)
    params = R.init_params(cfg, seed=4)
    a = _block_input(cfg, 2, 9, seed=5)
    titans_cfg = dataclasses.replace(config.preset("titans-tiny"), d_model=cfg.d_model, n_heads=cfg.n_heads,
                                     mem_chunk=cfg.mem_chunk, mem_hidden=cfg.mem_hidden)
    layer = blocks.layer_of(R.REFERENCE, titans_cfg)
    lp = {k[len(B0) + 4:]: w for k, w in params.items() if k.startswith(B0 + "mem.")}
    m = layer.forward(a, lp, layer.cfg, None)[0]
    u = R.REFERENCE.primitives.rmsnorm_forward(m, params[B0 + "mal.norm.g"], cfg.norm_eps)[0]
    y = blocks.attn_forward(R.REFERENCE, u, params, B0, cfg, 0, None)[0]
    np.testing.assert_array_equal(_mal(a, params, cfg), y)


def test_window_of_one_is_the_memory_output_projected():
    """attn_window = 1: each position sees only its own key (no persistent key is exempt from MAL's
    window), so o = Wo Wv RMSNorm(M(x~)) position by position; the persistent tokens still reach
    the output through the memory, which has read them."""
    cfg = dataclasses.replace(config.preset(TINY), attn_window=1)
    params = R.init_params(cfg, seed=6)
    a = _block_input(cfg, 2, 6, seed=7)
    Np = cfg.mem_persistent
    xt = with_persistent(a, params, B0 + "mal.persist", Np)
    u = rms(titans_alone(xt, params, B0, cfg), params[B0 + "mal.norm.g"], cfg.norm_eps)
    want = u[:, Np:] @ params[B0 + "attn.Wv"].T @ params[B0 + "attn.Wo"].T
    assert_close(_mal(a, params, cfg), want, "float64", "rewrite", "window 1")
    moved = params | {B0 + "mal.persist": params[B0 + "mal.persist"] + 1.0}
    assert not np.allclose(_mal(a, moved, cfg), _mal(a, params, cfg))


# ---------------------------------------------------------------------------------------------
# The model: gradients, streaming, state
# ---------------------------------------------------------------------------------------------


def _tokens(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


def test_state_holds_the_memory_after_the_persistent_tokens():
    """After a fresh call over one token, block 0's cache holds x~'s last window - 1 = 2 positions: the
    second persistent token's key (input-independent: the same for every sequence) and the token's;
    the memory has read N_p + T tokens; state_size counts the state exactly (the window cache of
    W - 1 positions, no persistent keys kept, + the Titans state)."""
    cfg = config.preset(TINY)
    params = R.init_params(cfg, seed=1)
    Np = cfg.mem_persistent
    _, one = R.forward(params, np.array([[1], [7]]), cfg)
    K = one["past"][0][0]
    assert K.shape[2] == cfg.attn_window - 1 == 2
    np.testing.assert_array_equal(K[0, :, 0], K[1, :, 0])
    assert not np.allclose(K[0, :, 1], K[1, :, 1])
    T = 5
    _, state = R.forward(params, _tokens(cfg, 2, T, seed=2), cfg)
    for i in range(cfg.n_layers):
        assert state["mem"][i]["pos"] == (Np + T) % cfg.mem_chunk
    floats = sum(K.size + V.size for K, V in state["past"]) // 2
    floats += sum(int(np.size(w)) for m in state["mem"] for w in m.values() if isinstance(w, np.ndarray)) // 2
    size = R.state_size(cfg)
    assert size["per_token"] == 0 and size["fixed"] == floats


# ---------------------------------------------------------------------------------------------
# Presets, ports, the command line
# ---------------------------------------------------------------------------------------------


def test_presets_and_validation():
    """titans-mal-small within 10 % of transformer-small's parameter count (measured +0.04 %); the tiny
    preset is float64; the window and N_p are this family's fields too; the block has its own
    persistent tokens and the attention's input norm, none of MAG's gate, and the SwiGLU."""
    base = sum(R.param_counts(config.preset("transformer-small")).values())
    n = sum(R.param_counts(config.preset("titans-mal-small")).values())
    assert abs(n - base) <= 0.1 * base, (n, base)
    tiny = config.preset(TINY)
    assert tiny.dtype == "float64" and tiny.family == "titans-mal" and config.preset("titans-mal-small").dtype == "float32"
    assert config.from_dict(tiny.to_dict()) == tiny
    for key, bad in (("attn_window", 0), ("mem_persistent", -1)):
        with pytest.raises(ValueError, match=f"{key} must be an int"):
            dataclasses.replace(tiny, **{key: bad})
    shapes = R.param_shapes(tiny)
    assert shapes["blocks.0.mal.persist"] == (2, tiny.d_model) and shapes["blocks.0.mal.norm.g"] == (tiny.d_model,)
    assert not any(".mag." in k for k in shapes) and "blocks.0.mlp.W_up" in shapes
    assert "blocks.0.mal.persist" not in R.param_shapes(dataclasses.replace(tiny, mem_persistent=0))
