"""The linear-attention, DeltaNet and Gated DeltaNet layers (reference/linear_layers.py) and families.

SPEC.md#linear-families. The layer: float64 gradient checks of every parameter, the input and the
incoming state; the chunk form equals the token-loop rules of reference/memory.py; streaming. The
families: the whole-model float64 gradient check (as tests/reference/test_model.py), streaming equals one
call at random split points, the CPU port (the reference layer over the compiled token loops) agrees with
the reference, and ``nested-learning train`` runs each tiny preset.
"""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import write_corpus
from hypothesis import given, settings
from hypothesis import strategies as st
from model_checks import chained_forward, check_model_gradients
from model_checks import plain_loss as _plain_loss
from port_helpers import assert_model_port_matches
from tolerances import assert_close, tol

from nlref import config
from nlref.cli import cli
from nlref.fast.cpu import model as F
from nlref.fast.cpu import primitives as FP
from nlref.reference import linear_layers as LL
from nlref.reference import memory as MEM
from nlref.reference import model as R
from nlref.reference.cases import linear_layers as LL_cases
from nlref.reference.gradcheck import check_gradients

TINY = ["linear-attention-tiny", "deltanet-tiny", "gated-deltanet-tiny", "dgd-tiny"]

# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LL_cases.GRADCHECKS))
def test_registered_gradchecks(name, rng):
    loss, inputs, grads = LL_cases.GRADCHECKS[name](rng)
    errors = check_gradients(loss, inputs, grads, rng)
    assert max(errors.values()) <= tol("float64", "gradcheck"), errors


def _layer_oracle(x, params, cfg):
    """The layer written from the definition with memory.py's token loops (not the chunk forms)."""
    B, T, D = x.shape
    H, dh = cfg.n_heads, cfg.head_dim

    def heads(z, norm):
        z = z.reshape(B, T, H, dh)
        if norm:
            z = z / np.sqrt(np.sum(z * z, axis=-1, keepdims=True) + cfg.eps)
        return z.transpose(0, 2, 1, 3).reshape(B * H, T, dh)

    q, k, v = (heads(x @ params["W_" + n].T, n != "v") for n in ("q", "k", "v"))

    def gate(n):
        z = np.einsum("btd,hd->bht", x, params["w_" + n]) + params["b_" + n][None, :, None]
        return (1 / (1 + np.exp(-z))).reshape(B * H, T)

    eta = np.ones((B * H, T)) if cfg.rule == "hebbian" else gate("beta")
    alpha = gate("alpha") if cfg.rule in ("gated_delta", "dgd") else None
    if cfg.rule == "dgd":  # the exact prox step of Eq. (57), written out here
        eta = eta / (1 + eta * np.sum(k * k, axis=-1))
    fwd = MEM.hebbian_forward if cfg.rule == "hebbian" else MEM.delta_forward
    o, M_T, _ = fwd(q, k, v, eta, alpha, np.zeros((B * H, dh, dh)))
    o = o.reshape(B, H, T, dh).transpose(0, 2, 1, 3)
    o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + cfg.eps) * params["g_o"]
    return o.reshape(B, T, D) @ params["W_o"].T, M_T.reshape(B, H, dh, dh)


@settings(max_examples=25, deadline=None)
@given(rule=st.sampled_from(LL.RULES), H=st.integers(1, 2), dh=st.integers(1, 3), chunk=st.integers(1, 4),
       B=st.integers(1, 2), T=st.integers(1, 9), cuts=st.lists(st.integers(1, 8), max_size=3, unique=True),
       seed=st.integers(0, 2**16))
def test_layer_equals_token_loop_and_streams(rule, H, dh, chunk, B, T, cuts, seed):
    """The layer (chunk form) equals the token-loop oracle, and chained calls carrying the state
    equal one call at any split points (inside a chunk included)."""
    cfg = LL.LinearLayerConfig(d_model=H * dh, n_heads=H, rule=rule, chunk=chunk)
    rng = np.random.default_rng(seed)
    params = LL.init_params(cfg, rng)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    x = rng.standard_normal((B, T, H * dh))
    y, _, st_ = LL.forward(x, params, cfg)
    y_ref, M_ref = _layer_oracle(x, params, cfg)
    assert_close(y, y_ref, "float64", "rewrite", "layer vs token loop")
    assert_close(st_["M"], M_ref, "float64", "rewrite", "state vs token loop")
    cuts = sorted(c for c in cuts if c < T)
    pieces, s = [], None
    for a, b in zip([0] + cuts, cuts + [T], strict=True):
        yp, _, s = LL.forward(x[:, a:b], params, cfg, s)
        pieces.append(yp)
    assert_close(np.concatenate(pieces, axis=1), y, "float64", "rewrite", "streamed")
    assert_close(s["M"], st_["M"], "float64", "rewrite", "streamed state")


def test_layer_bad_input():
    cfg = LL.LinearLayerConfig(d_model=4, n_heads=2, rule="gated_delta")
    params = LL.init_params(cfg, np.random.default_rng(0))
    x = np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="rule must be one of"):
        LL.LinearLayerConfig(d_model=4, rule="oja")
    with pytest.raises(ValueError, match=r"params\['w_alpha'\]: missing"):
        LL.forward(x, {k: v for k, v in params.items() if k != "w_alpha"}, cfg)
    with pytest.raises(ValueError, match=r"state\['M'\]: expected shape \(1, 2, 2, 2\)"):
        LL.forward(x, params, cfg, {"M": np.zeros((1, 2, 2))})
    with pytest.raises(ValueError, match="x: expected shape"):
        LL.forward(np.zeros((1, 3, 5)), params, cfg)


# ---------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------


def _tokens(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


@pytest.mark.parametrize("name", TINY)
def test_whole_model_gradients(name):
    """float64: directional finite differences along 3 random directions over every parameter and
    central differences at one random entry of every key (tests/reference/test_model.py's check)."""
    cfg = config.preset(name)
    rng = np.random.default_rng(7)
    params = R.init_params(cfg, seed=3)
    tokens = _tokens(cfg, 2, 7, seed=1)
    loss, grads = R.loss_and_grads(params, tokens, cfg)
    assert set(grads) == set(params)
    assert any(k.endswith("mem.W_q") for k in grads)

    def f(a):
        return _plain_loss(a, tokens, cfg)

    check_model_gradients(f, loss, params, grads, rng)


@pytest.mark.parametrize("name", TINY)
@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 10), min_size=1, max_size=3, unique=True), seed=st.integers(0, 2**16))
def test_streaming_equals_one_call(name, cuts, seed):
    """forward over T tokens == chained calls carrying the state at any split points (the tiny
    presets' chunk is 2 tokens: splits inside a chunk included): logits and the memory states."""
    cfg = config.preset(name)
    params = R.init_params(cfg, seed=seed % 7)
    tokens = _tokens(cfg, 2, 11, seed)
    logits, state, chained, states = chained_forward(params, tokens, cfg, cuts)
    st_ = states[-1][1]
    assert_close(chained, logits, "float64", "rewrite", f"{name} logits")
    for i, mem in enumerate(state["mem"]):
        assert_close(st_["mem"][i]["M"], mem["M"], "float64", "rewrite", f"{name} mem {i}")


def test_presets_and_validation():
    """The small presets have the transformer-small's parameter count within 10 %; the tiny ones
    are float64; mlp_hidden is validated for the new families."""
    base = sum(R.param_counts(config.preset("transformer-small")).values())
    for name in TINY:
        assert config.preset(name).dtype == "float64"
        small = name.replace("-tiny", "-small")
        n = sum(R.param_counts(config.preset(small)).values())
        assert abs(n - base) <= 0.1 * base, (small, n, base)
        with pytest.raises(ValueError, match="mlp_hidden must be a positive int"):
            dataclasses.replace(config.preset(name), mlp_hidden=0)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_port_matches_reference(name, dtype):
    """fast/cpu's model (the reference layer over fast/cpu/memory.py's compiled token loops, no
    fallback) agrees with the reference (the chunk forms): loss, every gradient, logits, state,
    streaming."""
    cfg = dataclasses.replace(config.preset(name), dtype=dtype)
    assert F.PORTED_LAYERS[cfg.family] == "linear_layers"
    params = R.init_params(cfg, seed=4)
    tokens = _tokens(cfg, 3, 9, seed=5)
    before = dict(FP.FALLBACKS)
    assert_model_port_matches(F, R, params, tokens, cfg, dtype, split=4)
    assert FP.FALLBACKS.get(f"model.{cfg.family}_layer", 0) == before.get(f"model.{cfg.family}_layer", 0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lin") / "corpus", n_docs=4, n_words=200)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("preset", TINY)
def test_preset_trains_from_the_cli(preset, backend, corpus, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", preset, "--backend", backend, "--data", str(corpus),
                                      "--steps", "2", "--seq-len", "8", "--batch-size", "2", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    assert json.loads((out / "config.json").read_text())["model"]["family"] == config.preset(preset).family


def test_the_gpu_backend_names_the_backends_that_compute_a_new_family(tmp_path, monkeypatch):
    """A family the GPU port does not compute yet: one clear error before anything is written (the
    command line; the GPU port over NumPy, so the check is the family's, not CuPy's absence) and a
    ValueError from the port's API, never a bare ImportError or a silent fallback."""
    from nlref.fast.gpu import model as gpu

    monkeypatch.setattr(gpu, "NAMESPACE", "numpy")
    cfg = config.preset("deltanet-tiny")
    with pytest.raises(ValueError, match="does not compute the 'deltanet' family"):
        gpu.loss_and_grads(R.init_params(cfg, 0), np.zeros((1, 4), dtype=np.int64), cfg)
    data = tmp_path / "d.txt"
    data.write_text("some text for a tiny corpus\n" * 200)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", "deltanet-tiny", "--backend", "gpu", "--data", str(data),
                                      "--steps", "1", "--seq-len", "8", "--out", str(out)])
    assert result.exit_code == 1 and "does not compute the 'deltanet' family" in result.output, result.output
    assert not out.exists()
