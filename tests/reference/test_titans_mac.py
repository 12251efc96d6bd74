"""The Titans "memory as context" family (MAC, Titans §4.1).

SPEC.md#titans-mac. The block's mixer against its definition written out (per segment the memory's
fast weights from the Titans layer alone over the earlier segments' outputs, the retrieval read
written out, causal attention by loops over [p, h_1, a_1, h_2, a_2, ...], the layer alone over the
outputs, the gate), causality (a token changes no earlier output, although each retrieval h_j is
a function of its own token), the retrieval's reading of the memory as it stood at the segment's
start, the whole-model float64 gradient check (as tests/reference/test_model.py), streaming
equals one call at random split points (inside segments: the open segment's cache and M_s carried)
with the cache sizes checked, state_size exact, the CPU port (its compiled Titans layer, its
read) within the "port" rows, ``nested-learning train`` on the reference and CPU backends, and
the clear refusals of the GPU port and the torch oracle.
"""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import write_corpus
from hybrid_oracles import mac_oracle
from hypothesis import given, note, settings
from hypothesis import strategies as st
from model_checks import check_model_gradients, plain_loss
from port_helpers import assert_model_port_matches
from tolerances import assert_close

from nlref import config
from nlref.cli import cli
from nlref.fast.cpu import model as F
from nlref.fast.cpu import primitives as FP
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


@pytest.mark.parametrize("overrides", [{}, {"mem_persistent": 0}, {"mem_kind": "matrix", "attn_window": 3}])
def test_whole_model_gradients(overrides):
    """float64: loss_and_grads's hand-written backward against directional finite differences along 3
    random directions over every parameter and central differences at one entry of every key
    (tests/model_checks.py): through the attention, the retrieval's read of M_s (into the earlier
    segments' writes and the initial memory), the memory's writes and the gate."""
    cfg = dataclasses.replace(config.preset(TINY), **overrides)
    rng = np.random.default_rng(7)
    params = R.init_params(cfg, seed=3)
    tokens = _tokens(cfg, 2, 10, seed=1)
    loss, grads = R.loss_and_grads(params, tokens, cfg)
    assert list(grads) == list(params)
    assert ("blocks.0.mac.persist" in params) == (cfg.mem_persistent > 0)

    def f(a):
        return plain_loss(a, tokens, cfg)

    check_model_gradients(f, loss, params, grads, rng)
    for key in ("blocks.0.mac.W_q", "blocks.0.mac.norm_h.g") + (("blocks.0.mac.persist",) if cfg.mem_persistent else ()):
        assert np.abs(grads[key]).max() > 0, key  # the retrieval and the persistent tokens are trained


@given(cuts=st.lists(st.integers(1, 10), min_size=1, max_size=4, unique=True), seed=st.integers(0, 2**16))
def test_streaming_equals_one_call(cuts, seed):
    """forward over T tokens == chained calls carrying the state at any split points (inside the
    4-token segments and the memory's 2-token chunks): logits and the memory states; the cache of an
    open segment holds its [p, h_1, a_1, ...] so far, and none is kept at a segment's end."""
    cfg = config.preset(TINY)
    C, Np = cfg.attn_window, cfg.mem_persistent
    params = R.init_params(cfg, seed=seed % 7)
    tokens = _tokens(cfg, 2, 11, seed)
    logits, state = R.forward(params, tokens, cfg)
    pieces, st_ = [], None
    for a, b in zip([0] + sorted(cuts), sorted(cuts) + [11], strict=True):
        lg, st_ = R.forward(params, tokens[:, a:b], cfg, st_)
        pieces.append(lg)
        for past in st_["past"]:
            if b % C == 0:
                assert past is None
            else:
                assert past[0].shape[2] == past[1].shape[2] == Np + 2 * (b % C)
    assert_close(np.concatenate(pieces, axis=1), logits, "float64", "rewrite", "logits")
    for i in range(cfg.n_layers):
        for key, w in state["mem"][i].items():
            if isinstance(w, np.ndarray):
                assert_close(st_["mem"][i][key], w, "float64", "rewrite", f"mem {i} {key}")
            else:
                assert st_["mem"][i][key] == w
        for j in range(2):
            assert_close(st_["past"][i][j], state["past"][i][j], "float64", "rewrite", f"past {i}")


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


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(2, 10), data=st.data())
def test_cpu_port_matches_reference(dtype, seed, B, T, data):
    """fast/cpu's model (the driver with its compiled Titans layer and attention: no fallback, not even
    the counted model-layer one) = the reference within the "port" rows: loss, every gradient,
    logits, the state, a two-call stream, and a CPU state continued on the reference."""
    overrides = data.draw(st.sampled_from([{}, {"mem_persistent": 0}, {"mem_kind": "matrix"}, {"attn_window": 5}]))
    cfg = dataclasses.replace(config.preset(TINY), dtype=dtype, **overrides)
    assert F.PORTED_LAYERS[cfg.family] == "titans"
    split = data.draw(st.integers(1, T - 1), label="split")
    note(f"{overrides} B={B} T={T} split={split}")
    params = R.init_params(cfg, seed % 100)
    tokens = _tokens(cfg, B, T, seed)
    before = dict(FP.FALLBACKS)
    assert_model_port_matches(F, R, params, tokens, cfg, dtype, split)
    assert FP.FALLBACKS == before, "the CPU port took a reference fallback"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("mac") / "corpus", n_docs=4, n_words=200)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_preset_trains_from_the_cli(backend, corpus, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", TINY, "--backend", backend, "--data", str(corpus),
                                      "--steps", "2", "--seq-len", "8", "--batch-size", "2", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    assert json.loads((out / "config.json").read_text())["model"]["family"] == "titans-mac"


def test_gpu_backend_and_torch_oracle_refuse_the_family(tmp_path, monkeypatch):
    """The GPU port does not compute titans-mac: one clear error before anything is written (the CLI)
    and a ValueError from its API; the torch oracle raises NotImplementedError, never computes
    another family's block."""
    from nlref.fast.gpu import model as gpu

    monkeypatch.setattr(gpu, "NAMESPACE", "numpy")
    cfg = config.preset(TINY)
    with pytest.raises(ValueError, match="does not compute the 'titans-mac' family"):
        gpu.loss_and_grads(R.init_params(cfg, 0), np.zeros((1, 4), dtype=np.int64), cfg)
    data = tmp_path / "d.txt"
    data.write_text("some text for a tiny corpus\n" * 200)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", TINY, "--backend", "gpu", "--data", str(data),
                                      "--steps", "1", "--seq-len", "8", "--out", str(out)])
    assert result.exit_code == 1 and "does not compute the 'titans-mac' family" in result.output, result.output
    assert not out.exists()
    pytest.importorskip("torch")  # the oracle extra (nlref.torch_model raises ImportError without it)
    from nlref import torch_model
    for call in (lambda p: torch_model.forward(p, np.zeros((1, 3), dtype=np.int64), cfg),
                 lambda p: torch_model.loss_and_grads(p, np.zeros((1, 3), dtype=np.int64), cfg)):
        with pytest.raises(NotImplementedError, match="does not compute the 'titans-mac' family"):
            call(R.init_params(cfg, 0))
