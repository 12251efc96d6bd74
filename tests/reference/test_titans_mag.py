"""The Titans "memory as a gate" family (MAG, Titans §4.2) and its sliding-window attention.

SPEC.md#titans-mag, SPEC.md#primitives (the window). The primitive: the sliding window with
persistent keys (Titans' SW-Attn*) against its mask written out, its float64 gradient check
(central differences, dot product and the complex step), the reduction to plain causal attention
when the window covers every key, and the CPU port's kernel equal to the reference. The family:
the block's mixer against its parts computed independently (the attention by loops, the Titans
layer alone, the gate), the reductions (no persistent tokens and the gate fixed: the attention
branch alone; a window over everything: Transformer++'s attention) and the state after the
persistent keys. The checks the three hybrid families share (the whole-model gradient check,
streaming with the KV cache cut to the window plus the persistent tokens, the CPU port, training
from the CLI, the GPU port's and torch oracle's refusals) are in test_titans_hybrids.py.
"""

import dataclasses

import numpy as np
import pytest
from hybrid_oracles import rms as _rms
from hybrid_oracles import sw_attention, titans_alone, with_persistent
from hybrid_oracles import window_oracle as _window_oracle
from hypothesis import given, note
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref import config
from nlref.fast.cpu import primitives as FP
from nlref.reference import blocks
from nlref.reference import model as R
from nlref.reference import primitives as P
from nlref.reference.cases import primitives as P_cases
from nlref.reference.gradcheck import check_gradients, numerical_gradient, rel_error

TINY = "titans-mag-tiny"

# ---------------------------------------------------------------------------------------------
# The sliding-window attention primitive (SW-Attn*)
# ---------------------------------------------------------------------------------------------


def _qkv(rng, b=2, h=2, tq=5, tk=7, dh=3, dv=2, dtype=np.float64):
    return tuple(rng.standard_normal(s).astype(dtype) for s in ((b, h, tq, dh), (b, h, tk, dh), (b, h, tk, dv)))


@given(seed=st.integers(0, 2**16), tq=st.integers(1, 6), extra=st.integers(0, 4), window=st.integers(1, 8),
       data=st.data())
def test_window_attention_matches_its_mask_written_out(seed, tq, extra, window, data):
    q, k, v = _qkv(np.random.default_rng(seed), tq=tq, tk=tq + extra)
    persistent = data.draw(st.integers(0, tq + extra), label="persistent")
    y, _ = P.attention_forward(q, k, v, window=window, persistent=persistent)
    assert_close(y, _window_oracle(q, k, v, window, persistent), "float64", "rewrite", "SW-Attn*")


@given(seed=st.integers(0, 2**16), tq=st.integers(1, 6), extra=st.integers(0, 3), over=st.integers(0, 3),
       data=st.data())
def test_window_covering_every_key_is_plain_causal_attention(seed, tq, extra, over, data):
    """The reduction: a window of T_k keys or more is causal attention (any persistent count), bit for
    bit; and a window hides exactly the keys it should (changing a hidden key changes nothing)."""
    q, k, v = _qkv(np.random.default_rng(seed), tq=tq, tk=tq + extra)
    Tk = tq + extra
    persistent = data.draw(st.integers(0, Tk), label="persistent")
    plain, _ = P.attention_forward(q, k, v)
    y, _ = P.attention_forward(q, k, v, window=Tk + over, persistent=persistent)
    np.testing.assert_array_equal(y, plain)
    if Tk >= 3:  # window 1, no persistent key: every query reads its own value
        y1, _ = P.attention_forward(q, k, v, window=1)
        np.testing.assert_array_equal(y1, v[:, :, Tk - tq:])
        mask = P.attention_mask(tq, Tk, 2, 1)
        hidden = [i for i in range(Tk) if not mask[:, i].any()]
        v2 = v.copy()
        v2[:, :, hidden] += 1.0
        np.testing.assert_array_equal(P.attention_forward(q, k, v2, window=2, persistent=1)[0],
                                      P.attention_forward(q, k, v, window=2, persistent=1)[0])


@given(seed=st.integers(0, 2**16), data=st.data())
def test_window_attention_gradients(seed, data):
    """float64: central differences and the dot-product test, and the complex step (exact to
    rounding), of the registered case at drawn sizes (what ``nested-learning check`` runs)."""
    tq = data.draw(st.integers(1, 4), label="tq")
    tk = tq + data.draw(st.integers(0, 3), label="extra")
    sizes = dict(b=data.draw(st.integers(1, 2)), tq=tq, tk=tk, window=data.draw(st.integers(1, 4), label="window"),
                 persistent=data.draw(st.integers(0, tk), label="persistent"))
    loss, inputs, grads = P_cases.GRADCHECKS["primitives.attention_window"](np.random.default_rng(seed), **sizes)
    errors = check_gradients(loss, inputs, grads, np.random.default_rng(seed + 1))
    note(f"errors {errors}")
    assert max(errors.values()) <= tol("float64", "gradcheck"), errors
    exact = numerical_gradient(loss, inputs, keys=list(grads), method="complex")
    cs = {k: rel_error(np.asarray(grads[k]), exact[k]) for k in grads}
    assert max(cs.values()) <= tol("float64", "complex_step"), cs


def test_window_attention_bad_arguments():
    q, k, v = _qkv(np.random.default_rng(0))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="window must be None or an int >= 1"):
            P.attention_forward(q, k, v, window=bad)
    with pytest.raises(ValueError, match="window needs causal=True"):
        P.attention_forward(q, k, v, causal=False, window=2)
    with pytest.raises(ValueError, match=r"persistent must be an int in \[0, T_k\]"):
        P.attention_forward(q, k, v, window=2, persistent=8)
    with pytest.raises(ValueError, match="window must be None"):
        FP.attention_forward(q, k, v, window=0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(seed=st.integers(0, 2**16), tq=st.integers(1, 6), extra=st.integers(0, 4), window=st.integers(1, 8),
       data=st.data())
def test_cpu_port_window_attention_matches_reference(dtype, seed, tq, extra, window, data):
    """fast/cpu's compiled masked softmax (no reference fallback) = the reference, forward and backward."""
    q, k, v = _qkv(np.random.default_rng(seed), tq=tq, tk=tq + extra, dtype=np.dtype(dtype))
    persistent = data.draw(st.integers(0, tq + extra), label="persistent")
    before = dict(FP.FALLBACKS)
    yf, cf = FP.attention_forward(q, k, v, window=window, persistent=persistent)
    yr, cr = P.attention_forward(q, k, v, window=window, persistent=persistent)
    assert yf.dtype == np.dtype(dtype)
    assert_close(yf, yr, dtype, "port", "y")
    dy = np.random.default_rng(seed + 1).standard_normal(yr.shape).astype(dtype)
    for name, gf, gr in zip("qkv", FP.attention_backward(dy, cf), P.attention_backward(dy, cr), strict=True):
        assert_close(gf, gr, dtype, "port", f"d{name}")
    assert FP.FALLBACKS == before


# ---------------------------------------------------------------------------------------------
# The MAG mixer: its parts, its reductions
# ---------------------------------------------------------------------------------------------


def _mag_oracle(a, params, cfg, b="blocks.0."):
    """The MAG mixer from its definition, at a sequence start: x~ = [p] || a; y = SW-Attn*(x~) (the
    projections, RoPE at x~'s positions, the window by loops); m = the Titans layer alone over x~;
    o = W_out (RMSNorm_a(y) * sigmoid(RMSNorm_m(m))) at the positions of a."""
    Np = cfg.mem_persistent
    xt = with_persistent(a, params, b + "mag.persist", Np)
    y = sw_attention(xt, params, b, cfg, Np)
    m = titans_alone(xt, params, b, cfg)
    ya = _rms(y[:, Np:], params[b + "mag.norm_a.g"], cfg.norm_eps)
    ym = _rms(m[:, Np:], params[b + "mag.norm_m.g"], cfg.norm_eps)
    return (ya / (1 + np.exp(-ym))) @ params[b + "mag.W_out"].T


def _block_input(cfg, B, n, seed):
    return np.random.default_rng(seed).standard_normal((B, n, cfg.d_model))


@pytest.mark.parametrize("overrides", [{}, {"mem_persistent": 0}, {"attn_window": 1}, {"mem_kind": "matrix"},
                                       {"attn_window": 20, "mem_persistent": 3}])
def test_mag_mixer_is_its_parts(overrides):
    cfg = dataclasses.replace(config.preset(TINY), **overrides)
    params = R.init_params(cfg, seed=2)
    a = _block_input(cfg, 2, 7, seed=3)
    o = blocks.mag_forward(R.REFERENCE, a, params, "blocks.0.", cfg, 0, None, None)[0]
    assert_close(o, _mag_oracle(a, params, cfg), "float64", "rewrite", "MAG mixer")


def test_mag_reduces_to_its_attention_branch():
    """N_p = 0 and the gate fixed (g_m = 0: sigma = 1/2 everywhere) leave W_out (RMSNorm_a(y) / 2) of the
    sliding-window attention alone; with a window over every token that attention is the
    transformer family's own (blocks.attn_forward, plain causal), so the mixer is built of the parts
    the other families use. The memory branch alone moves the output only through the gate."""
    cfg = dataclasses.replace(config.preset(TINY), mem_persistent=0, attn_window=50)
    params = R.init_params(cfg, seed=4)
    b = "blocks.0."
    fixed = params | {b + "mag.norm_m.g": np.zeros(cfg.d_model)}
    a = _block_input(cfg, 2, 9, seed=5)
    o = blocks.mag_forward(R.REFERENCE, a, fixed, b, cfg, 0, None, None)[0]
    y = blocks.attn_forward(R.REFERENCE, a, fixed, b, cfg, 0, None)[0]
    attn_alone = (0.5 * _rms(y, fixed[b + "mag.norm_a.g"], cfg.norm_eps)) @ fixed[b + "mag.W_out"].T
    assert_close(o, attn_alone, "float64", "rewrite", "gate fixed")
    other = fixed | {k: 1.5 * w for k, w in fixed.items() if k.startswith(b + "mem.")}  # another memory
    np.testing.assert_allclose(blocks.mag_forward(R.REFERENCE, a, other, b, cfg, 0, None, None)[0], o, rtol=0, atol=0)
    o2 = blocks.mag_forward(R.REFERENCE, a, params | {b + "mem.W_o": 1.5 * params[b + "mem.W_o"]}, b, cfg, 0,
                            None, None)[0]
    assert not np.allclose(o2, blocks.mag_forward(R.REFERENCE, a, params, b, cfg, 0, None, None)[0])


# ---------------------------------------------------------------------------------------------
# The model: gradients, streaming, state
# ---------------------------------------------------------------------------------------------


def _tokens(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


def test_state_holds_the_persistent_keys_and_the_memory_after_them():
    """After a fresh call, block i's cache begins with the keys of its persistent tokens (at x~'s
    positions 0..N_p-1, the same for every sequence) and its memory has read N_p + T tokens;
    state_size counts the state exactly (window cache + the Titans state)."""
    cfg = config.preset(TINY)
    params = R.init_params(cfg, seed=1)
    T = 5
    _, state = R.forward(params, _tokens(cfg, 2, T, seed=2), cfg)
    _, other = R.forward(params, _tokens(cfg, 2, T, seed=9), cfg)
    Np = cfg.mem_persistent
    for i in range(cfg.n_layers):
        np.testing.assert_array_equal(state["past"][i][0][:, :, :Np], other["past"][i][0][:, :, :Np])
        np.testing.assert_array_equal(state["past"][i][0][0, :, :Np], state["past"][i][0][1, :, :Np])
        assert state["mem"][i]["pos"] == (Np + T) % cfg.mem_chunk
    floats = sum(K.size + V.size for K, V in state["past"]) // 2
    floats += sum(int(np.size(w)) for m in state["mem"] for w in m.values() if isinstance(w, np.ndarray)) // 2
    size = R.state_size(cfg)
    assert size["per_token"] == 0 and size["fixed"] == floats


# ---------------------------------------------------------------------------------------------
# Presets, ports, the command line
# ---------------------------------------------------------------------------------------------


def test_presets_and_validation():
    """titans-mag-small within 10 % of transformer-small's parameter count (measured 0.3 %); the tiny
    preset is float64; the window and N_p are validated and belong to this family alone."""
    base = sum(R.param_counts(config.preset("transformer-small")).values())
    n = sum(R.param_counts(config.preset("titans-mag-small")).values())
    assert abs(n - base) <= 0.1 * base, (n, base)
    tiny = config.preset(TINY)
    assert tiny.dtype == "float64" and tiny.family == "titans-mag" and config.preset("titans-mag-small").dtype == "float32"
    assert config.from_dict(tiny.to_dict()) == tiny
    for key, bad in (("attn_window", 0), ("attn_window", 2.5), ("mem_persistent", -1), ("mem_persistent", True)):
        with pytest.raises(ValueError, match=f"{key} must be an int"):
            dataclasses.replace(tiny, **{key: bad})
    with pytest.raises(ValueError, match="attn_window is a field of the Titans hybrid families"):
        dataclasses.replace(config.preset("transformer-tiny"), attn_window=3)
    with pytest.raises(ValueError, match="mem_persistent is a field of the Titans hybrid families"):
        dataclasses.replace(config.preset("titans-tiny"), mem_persistent=2)
    with pytest.raises(ValueError, match="mlp_hidden must be a positive int"):
        dataclasses.replace(tiny, mlp_hidden=0)
