"""The checks the three Titans hybrid families (MAG, MAL, MAC: Titans §4.1-4.3) share.

SPEC.md#titans-mag, SPEC.md#titans-mal, SPEC.md#titans-mac. One test per check, parametrised over
the families: the whole-model float64 gradient check (as tests/reference/test_model.py), streaming
equals one call at random split points with each family's KV cache size after every call, the CPU
port (its compiled Titans layer and attention, no fallback) within the "port" rows,
``nested-learning train`` on the reference and CPU backends, and the clear refusals of the GPU
port and the torch oracle. What differs between the families (the mixer against its definition,
its reductions, its state) stays in test_titans_mag.py, test_titans_mal.py and test_titans_mac.py.
"""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import write_corpus
from hypothesis import given, note, settings
from hypothesis import strategies as st
from model_checks import chained_forward, check_model_gradients, plain_loss
from port_helpers import assert_model_port_matches
from tolerances import assert_close

from nlref import config
from nlref.cli import cli
from nlref.fast.cpu import model as F
from nlref.fast.cpu import primitives as FP
from nlref.reference import model as R

FAMILIES = ["titans-mag", "titans-mal", "titans-mac"]


def _tiny(family):
    return f"{family}-tiny"


def _mixer(family):
    """The block's parameter prefix of the family's mixer: blocks.i.mag / .mal / .mac."""
    return family.removeprefix("titans-")


def _tokens(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


# (family, overrides, T): MAC's segments are attn_window tokens, so its window of 3 and 10 tokens
# put a segment boundary inside the sequence; MAG and MAL slide a window of 2 over 8 tokens.
GRADIENT_CASES = [(f, o, T) for f, w, T in (("titans-mag", 2, 8), ("titans-mal", 2, 8), ("titans-mac", 3, 10))
                  for o in ({}, {"mem_persistent": 0}, {"mem_kind": "matrix", "attn_window": w})]  # fmt: skip


@pytest.mark.parametrize(("family", "overrides", "T"), GRADIENT_CASES)
def test_whole_model_gradients(family, overrides, T):
    """float64: loss_and_grads's hand-written backward against directional finite differences along 3
    random directions over every parameter and central differences at one entry of every key
    (tests/model_checks.py, as test_model.py's check of the other families): through the attention,
    the memory's writes, the gate, and for MAC the retrieval's read of M_s (into the earlier
    segments' writes and the initial memory). The persistent tokens (and MAC's retrieval) are
    trained: their gradients are not zero."""
    cfg = dataclasses.replace(config.preset(_tiny(family)), **overrides)
    mixer = f"blocks.0.{_mixer(family)}"
    rng = np.random.default_rng(7)
    params = R.init_params(cfg, seed=3)
    tokens = _tokens(cfg, 2, T, seed=1)
    loss, grads = R.loss_and_grads(params, tokens, cfg)
    assert list(grads) == list(params)
    assert (f"{mixer}.persist" in params) == (cfg.mem_persistent > 0)

    def f(a):
        return plain_loss(a, tokens, cfg)

    check_model_gradients(f, loss, params, grads, rng)
    trained = [f"{mixer}.persist"] if cfg.mem_persistent else []
    if family == "titans-mac":
        trained += [f"{mixer}.W_q", f"{mixer}.norm_h.g"]
    for key in trained:
        assert np.abs(grads[key]).max() > 0, key


def _cache_lengths(family, cfg, b):
    """The KV cache length each family keeps after b tokens (None: no cache), from its definition:
    MAG the persistent keys and the last window - 1 keys; MAL the last window - 1 positions of
    x~ = [p] || a (the persistent positions while they are among them); MAC the open segment's
    [p, h_1, a_1, ...] so far, none at a segment's end (its segments are attn_window tokens)."""
    W, Np = cfg.attn_window, cfg.mem_persistent
    if family == "titans-mag":
        return Np + min(W - 1, b)
    if family == "titans-mal":
        return min(W - 1, Np + b)
    return None if b % W == 0 else Np + 2 * (b % W)


@pytest.mark.parametrize("family", FAMILIES)
@given(cuts=st.lists(st.integers(1, 10), min_size=1, max_size=4, unique=True), seed=st.integers(0, 2**16))
def test_streaming_equals_one_call(family, cuts, seed):
    """forward over T tokens == chained calls carrying the state at any split points (inside the
    windows, MAC's segments and the memory's 2-token chunks): logits, the memory states and the KV
    caches; after every call each cache holds exactly what the family's definition keeps."""
    cfg = config.preset(_tiny(family))
    params = R.init_params(cfg, seed=seed % 7)
    tokens = _tokens(cfg, 2, 11, seed)
    logits, state, chained, states = chained_forward(params, tokens, cfg, cuts)
    for b, st_b in states:
        want = _cache_lengths(family, cfg, b)
        for past in st_b["past"]:
            if want is None:
                assert past is None
            else:
                assert past[0].shape[2] == past[1].shape[2] == want
    assert_close(chained, logits, "float64", "rewrite", "logits")
    st_ = states[-1][1]
    for i in range(cfg.n_layers):
        for key, w in state["mem"][i].items():
            if isinstance(w, np.ndarray):
                assert_close(st_["mem"][i][key], w, "float64", "rewrite", f"mem {i} {key}")
            else:
                assert st_["mem"][i][key] == w
        for j in range(2):
            assert_close(st_["past"][i][j], state["past"][i][j], "float64", "rewrite", f"past {i}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(2, 10), data=st.data())
def test_cpu_port_matches_reference(family, dtype, seed, B, T, data):
    """fast/cpu's model (the driver with its compiled Titans layer and attention: no fallback, not even
    the counted model-layer one) = the reference within the "port" rows: loss, every gradient,
    logits, the state, a two-call stream, and a CPU state continued on the reference."""
    overrides = data.draw(st.sampled_from([{}, {"mem_persistent": 0}, {"mem_kind": "matrix"}, {"attn_window": 5}]))
    cfg = dataclasses.replace(config.preset(_tiny(family)), dtype=dtype, **overrides)
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
    return write_corpus(tmp_path_factory.mktemp("hybrids") / "corpus", n_docs=4, n_words=200)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_preset_trains_from_the_cli(family, backend, corpus, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", _tiny(family), "--backend", backend, "--data", str(corpus),
                                      "--steps", "2", "--seq-len", "8", "--batch-size", "2", "--out", str(out)],
                                catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    assert json.loads((out / "config.json").read_text())["model"]["family"] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_backend_and_torch_oracle_refuse_the_family(family, tmp_path, monkeypatch):
    """The GPU port does not compute the hybrid families: one clear error before anything is written
    (the CLI) and a ValueError from its API; the torch oracle raises NotImplementedError, never
    computes another family's block."""
    from nlref.fast.gpu import model as gpu

    monkeypatch.setattr(gpu, "NAMESPACE", "numpy")
    cfg = config.preset(_tiny(family))
    refusal = f"does not compute the '{family}' family"
    with pytest.raises(ValueError, match=refusal):
        gpu.loss_and_grads(R.init_params(cfg, 0), np.zeros((1, 4), dtype=np.int64), cfg)
    data = tmp_path / "d.txt"
    data.write_text("some text for a tiny corpus\n" * 200)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", _tiny(family), "--backend", "gpu", "--data", str(data),
                                      "--steps", "1", "--seq-len", "8", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 1 and refusal in result.output, result.output
    assert not out.exists()
    pytest.importorskip("torch")  # the oracle extra (nlref.torch_model raises ImportError without it)
    from nlref import torch_model

    for call in (lambda p: torch_model.forward(p, np.zeros((1, 3), dtype=np.int64), cfg),
                 lambda p: torch_model.loss_and_grads(p, np.zeros((1, 3), dtype=np.int64), cfg)):  # fmt: skip
        with pytest.raises(NotImplementedError, match=refusal):
            call(R.init_params(cfg, 0))
