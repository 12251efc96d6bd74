"""The Hope ablation switches and presets (SPEC.md#hope "Ablation switches", NL Table 6).

The self-modifying layer's switches are ModelConfig fields ``mem_<switch>`` (defaults = the pinned
readings of SPEC.md#selfmod). Checked here: both adapters (reference/model.py, fast/cpu/model.py)
hand every switch to the layer; each switch changes the model's gradients and the CPU port agrees
with the reference on loss_and_grads (the "port" rows of tests/tolerances.py); the CPU port runs its
own layer (no fallback) for every switch; ModelConfig round-trips through to_dict / from_dict and
TOML, bad values are a ValueError naming the field; each ablation preset trains two steps through
``nested-learning train`` on the reference and the CPU port, with the preset's switches in the
resolved config.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import write_corpus
from tolerances import assert_close

from nlref import config, training
from nlref.cli import cli
from nlref.fast.cpu import model as F
from nlref.fast.cpu import primitives as FP
from nlref.reference import model as R
from nlref.reference.blocks import layer_of
from nlref.reference.config import SELFMOD_SWITCHES, TITANS_SWITCHES

# each switch flipped from its default, with what it needs (single_shrink: a matrix memory)
FLIPS = {
    "mem_momentum": dict(mem_momentum=False),
    "mem_adaptive_q": dict(mem_adaptive_q=True),
    "mem_normalize_v": dict(mem_normalize_v=False),
    "mem_single_shrink": dict(mem_single_shrink=True, mem_kind="matrix"),
    "mem_stop_grad_writes": dict(mem_stop_grad_writes=True),
    "mem_layernorm": dict(mem_layernorm=True),
    "mem_dgd": dict(mem_dgd=False),
    "mem_retention": dict(mem_retention=False),
    "mem_adaptive_k": dict(mem_adaptive_k=False),
    "mem_adaptive_v": dict(mem_adaptive_v=False),
    "mem_step_norm": dict(mem_step_norm=True),  # not a Table 6 row: SPEC.md#hope-stability
}
# preset -> the fields it changes from hope-small (SPEC.md#hope "Ablation presets")
ABLATION_PRESETS = {
    "hope-small-no-momentum": dict(mem_momentum=False),
    "hope-small-no-cms": dict(cms_in_context=False),
    "hope-small-adaptive-q": dict(mem_adaptive_q=True),
    "hope-small-no-dgd": dict(mem_dgd=False),
    "hope-small-no-retention": dict(mem_retention=False),
    "hope-small-static-k": dict(mem_adaptive_k=False),  # "w/o inner-projection k"
    "hope-small-static-v": dict(mem_adaptive_v=False),  # "w/o inner-projection v"
    "hope-small-nested": dict(cms_nested=True),  # not a Table 6 row: nested CMS (Eq. 72)
}


def _tokens(cfg, B=2, T=9, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))


def test_every_switch_has_a_flip_and_defaults_are_the_layers():
    assert set(FLIPS) == set(SELFMOD_SWITCHES)
    from nlref.reference.selfmod import SelfModConfig

    layer = SelfModConfig(d_model=8)
    for key, default in SELFMOD_SWITCHES.items():
        assert getattr(layer, key.removeprefix("mem_")) == default == getattr(config.ModelConfig(), key), key


@pytest.mark.parametrize("switch", sorted(FLIPS))
def test_adapters_pass_the_switch_and_port_agrees(switch):
    """Both adapters build the layer with the switch; it changes the gradients; the CPU port's own
    layer (not a fallback) gives the reference's loss and gradients (float64 "port" row; with LN the
    "port_selfmod_layernorm" row, tests/tolerances.py)."""
    base = config.preset("hope-tiny")
    cfg = dataclasses.replace(base, **FLIPS[switch])
    name = switch.removeprefix("mem_")
    for ops in (R.REFERENCE, F.CPU):
        lcfg = layer_of(ops, cfg).cfg
        assert getattr(lcfg, name) == getattr(cfg, switch) != SELFMOD_SWITCHES[switch], (ops.name, switch)
    module = layer_of(F.CPU, cfg).module
    assert module.__name__ == "nlref.fast.cpu.selfmod"
    params = R.init_params(cfg, seed=0)
    tokens = _tokens(cfg)
    before = dict(FP.FALLBACKS)
    loss_r, grads_r = R.loss_and_grads(params, tokens, cfg)
    loss_f, grads_f = F.loss_and_grads(params, tokens, cfg)
    assert FP.FALLBACKS == before, "the CPU port fell back to the reference"
    kind = "port_selfmod_layernorm" if cfg.mem_layernorm else "port"
    assert_close(np.float64(loss_f), np.float64(loss_r), "float64", kind, "loss")
    assert set(grads_f) == set(grads_r)
    for k in grads_r:
        assert_close(grads_f[k], grads_r[k], "float64", kind, k)
    # the switch is a different function: same parameters (where shared), other gradients
    off = dataclasses.replace(cfg, **{switch: SELFMOD_SWITCHES[switch]})
    loss_o, grads_o = R.loss_and_grads(R.init_params(off, seed=0), tokens, off)
    shared = set(grads_o) & set(grads_r)
    assert any(not np.allclose(grads_o[k], grads_r[k], rtol=1e-6, atol=0) for k in shared), switch


def test_port_layer_runs_its_own_path_for_every_switch():
    """fast/cpu/selfmod.forward falls back to the reference only for complex inputs (the complex
    step); with each switch its cache is the port's own ("fast")."""
    for switch, flip in FLIPS.items():
        cfg = dataclasses.replace(config.preset("hope-tiny"), **flip)
        layer = layer_of(F.CPU, cfg)
        module, lcfg, fwd = layer.module, layer.cfg, layer.forward
        lp = module.init_params(lcfg, np.random.default_rng(0), dtype=np.float64)
        x = np.random.default_rng(1).standard_normal((1, 5, cfg.d_model))
        _, cache, _ = fwd(x, lp, lcfg)
        assert cache.get("fast") is True and "reference" not in cache, switch


def test_round_trip_and_validation():
    for name in ("hope-small", *ABLATION_PRESETS):
        cfg = config.preset(name)
        assert config.from_dict(cfg.to_dict()) == cfg
        assert config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for name, change in ABLATION_PRESETS.items():
        assert config.preset(name) == dataclasses.replace(config.preset("hope-small"), name=name, **change)
    # a config written before the switches existed reads back as the same function
    old = {k: v for k, v in config.preset("hope-small").to_dict().items() if k not in SELFMOD_SWITCHES}
    assert config.from_dict(old) == config.preset("hope-small")
    flipped = dataclasses.replace(config.preset("hope-tiny"), **FLIPS["mem_single_shrink"], mem_momentum=False)
    assert config.from_dict(flipped.to_dict()) == flipped
    base = config.preset("hope-tiny")
    for key in SELFMOD_SWITCHES:
        with pytest.raises(ValueError, match=f"{key} must be true or false, got 'no'"):
            dataclasses.replace(base, **{key: "no"})
        with pytest.raises(ValueError, match=f"{key} must be true or false, got 1"):
            config.from_dict({**base.to_dict(), key: 1})
        # the Titans families take config.TITANS_SWITCHES too (SPEC.md#titans-stability), a transformer none
        other = "transformer-tiny" if key in TITANS_SWITCHES else "titans-tiny"
        with pytest.raises(ValueError, match=f"{key} is a switch of the hope family's self-modifying layer"):
            dataclasses.replace(config.preset(other), **{key: not SELFMOD_SWITCHES[key]})
    assert dataclasses.replace(config.preset("titans-tiny"), mem_momentum=True).mem_momentum  # the default is fine
    with pytest.raises(ValueError, match="mem_single_shrink needs mem_kind='matrix'"):
        dataclasses.replace(base, mem_single_shrink=True)
    with pytest.raises(ValueError, match=r"unknown config keys \['momentum'\]"):
        config.from_dict({**base.to_dict(), "momentum": False})


TINY_MODEL = """[model]
d_model = 8
n_heads = 2
mem_hidden = 4
mem_chunk = 4
mem_chunk_other = 4
cms_levels = [{hidden = 8, period = 4, eta = 0.01}, {hidden = 8, period = 8, eta = 0.01}, {hidden = 8}]
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("abl") / "corpus", n_docs=4, n_words=200)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("preset", sorted(ABLATION_PRESETS))
def test_preset_trains_from_the_cli(preset, backend, corpus, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(TINY_MODEL)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", preset, "--backend", backend, "--config", str(toml),
                                      "--data", str(corpus), "--steps", "2", "--seq-len", "16", "--batch-size",
                                      "2", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads((out / "config.toml").read_text())["model"]
    for key, value in ABLATION_PRESETS[preset].items():
        assert resolved[key] == value, (key, resolved)
    for key, default in SELFMOD_SWITCHES.items():
        assert resolved[key] == ABLATION_PRESETS[preset].get(key, default), key
    rc = training.run_config_from_dict(json.loads((out / "config.json").read_text()))
    assert rc.model.d_model == 8 and rc.model.name == preset
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"]) and np.isfinite(summary["validation"]["loss"])


def test_switch_from_a_toml_model_table(corpus, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(TINY_MODEL + "mem_kind = \"matrix\"\nmem_single_shrink = true\nmem_normalize_v = false\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", "hope-small", "--backend", "cpu", "--config", str(toml),
                                      "--data", str(corpus), "--steps", "1", "--seq-len", "16", "--batch-size",
                                      "2", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads((out / "config.toml").read_text())["model"]
    assert resolved["mem_single_shrink"] is True and resolved["mem_normalize_v"] is False
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_MODEL + "mem_momentum = \"off\"\n")
    result = CliRunner().invoke(cli, ["train", "--preset", "hope-small", "--config", str(bad), "--data",
                                      str(corpus), "--out", str(tmp_path / "bad")], catch_exceptions=False)
    assert result.exit_code in (1, 2) and "mem_momentum must be true or false" in result.output, result.output
    assert "Traceback" not in result.output


def test_run_from_before_the_switches_resumes(corpus, tmp_path):
    """A checkpoint and config.toml written before the switches existed (no mem_<switch> keys) resume:
    the missing fields read as their defaults, the same model (training.py's resume check)."""
    from nlref import checkpoint as ckpt

    toml = tmp_path / "run.toml"
    toml.write_text(TINY_MODEL)
    run = tmp_path / "run"
    args = ["train", "--preset", "hope-small", "--backend", "reference", "--config", str(toml), "--data",
            str(corpus), "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--out", str(run)]
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    ck = ckpt.load_checkpoint(run / "checkpoint.safetensors")
    old = json.loads(json.dumps(ck.config))
    for key in SELFMOD_SWITCHES:
        del old["model"][key]
    ckpt.save_checkpoint(run / "checkpoint.safetensors", params=ck.params, opt_state=ck.opt_state, config=old,
                         step=ck.step, rng_state=ck.rng_state, data_position=ck.data_position, extra=ck.extra)
    lines = (run / "config.toml").read_text().splitlines()
    (run / "config.toml").write_text("\n".join(ln for ln in lines if ln.split(" = ")[0] not in SELFMOD_SWITCHES))
    result = CliRunner().invoke(cli, ["train", "--resume", str(run), "--steps", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_info_says_no_cms_level_updates_in_context():
    """``info --model hope-small-no-cms``: every level is shown frozen, not with a period it never uses."""
    result = CliRunner().invoke(cli, ["info", "--model", "hope-small-no-cms"])
    assert result.exit_code == 0, result.output
    levels = [line for line in result.output.splitlines() if "CMS level" in line]
    assert levels and all("frozen" in line for line in levels), result.output
    on = CliRunner().invoke(cli, ["info", "--model", "hope-small"]).output
    assert any("period 16 tokens" in line for line in on.splitlines() if "CMS level" in line)


def test_the_torch_oracle_refuses_every_forward_switch():
    """torch_model.py computes the self-modifying layer with its default switches only: each switch
    that changes the forward (all but ``mem_stop_grad_writes``), flipped, is a NotImplementedError
    naming it, in the oracle and in its nn.Module, not a silent default computation."""
    pytest.importorskip("torch")
    from nlref import torch_model as TM
    from nlref.torch_module import unsupported

    base = config.preset("hope-tiny")
    TM._check_computes(dataclasses.replace(base, **FLIPS["mem_stop_grad_writes"]))  # the gradient alone
    assert unsupported(dataclasses.replace(base, **FLIPS["mem_stop_grad_writes"])) is None
    for switch, flip in FLIPS.items():
        if switch == "mem_stop_grad_writes":
            continue
        cfg = dataclasses.replace(base, **flip)
        with pytest.raises(NotImplementedError, match=f"not .*{switch} = "):
            TM._check_computes(cfg)
        assert f"{switch}=" in (unsupported(cfg) or ""), switch
