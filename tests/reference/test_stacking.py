"""Ad-hoc level stacking (NL §7.3, SPEC.md#cms "Ad-hoc level stacking"): a frozen CMS chain becomes
in-context levels; with every rate 0 the stacked model is the pre-trained one (the paper's own
reduction), with rates > 0 it learns in context."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nlref.reference import config, model
from nlref.reference.stacking import stack


def _pretrained(family="hope-attention"):
    return dataclasses.replace(config.preset(f"{family}-tiny"), cms_in_context=False)


@pytest.mark.parametrize("family", ["hope-attention", "hope"])
def test_rates_zero_recover_the_pretrained_model(family):
    cfg = _pretrained(family)
    params = model.init_params(cfg, seed=3)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 11))
    new_params, new = stack(params, cfg, periods=(2, 4, None), etas=(0.0, 0.0, 0.0))
    assert new.cms_in_context and [lv.period for lv in new.cms_levels] == [2, 4, None]
    assert all(new_params[k] is params[k] for k in params)  # the same weights: MLP_0^(f_i) = MLP_i
    base, _ = model.forward(params, tokens, cfg)
    got, state = model.forward(new_params, tokens, new)
    np.testing.assert_allclose(got, base, rtol=1e-13, atol=1e-14)
    assert "0.W1" in state["cms"][0]  # level 0 really is in context (its fast weights exist)
    loss0, _ = model.loss_and_grads(params, tokens, cfg)
    loss1, _ = model.loss_and_grads(new_params, tokens, new)
    assert loss1 == pytest.approx(loss0, rel=1e-12)


def test_positive_rates_learn_in_context():
    cfg = _pretrained()
    params = model.init_params(cfg, seed=3)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 11))
    new_params, new = stack(params, cfg, periods=(2, 4, None), etas=(0.5, 0.2, 0.0))
    base, _ = model.forward(params, tokens, cfg)
    got, _ = model.forward(new_params, tokens, new)
    np.testing.assert_allclose(got[:, :2], base[:, :2], rtol=1e-13, atol=1e-14)  # before the first write
    assert np.abs(got[:, 3:] - base[:, 3:]).max() > 1e-8  # after it the levels have moved


def test_refusals_say_why():
    with pytest.raises(ValueError, match="no CMS chain"):
        stack({}, config.preset("transformer-tiny"), (), ())
    with pytest.raises(ValueError, match="already learn in context"):
        stack({}, config.preset("hope-tiny"), (2, 4, None), (0.1, 0.1, 0.0))
    with pytest.raises(ValueError, match="give 3 periods and 3 rates"):
        stack({}, _pretrained(), (2, 4), (0.1, 0.1))


def test_stack_then_train_from_the_cli(tmp_path):
    """The §7.3 workflow end to end: train hope-attention-tiny with its CMS frozen, stack its MLPs
    into in-context levels (rates 0: the same function, checked on the weights), then continue
    training the stacked model from those weights."""
    import json

    from click.testing import CliRunner
    from corpus import write_corpus

    from nlref import api
    from nlref.cli import cli

    corpus = write_corpus(tmp_path / "corpus", n_docs=4, n_words=150)
    run = CliRunner().invoke
    cfg_file = tmp_path / "frozen.toml"
    cfg_file.write_text("[model]\ncms_in_context = false\n")
    args = ["--backend", "reference", "--seq-len", "16", "--steps", "2", "--data", str(corpus)]
    r = run(cli, ["train", "--config", str(cfg_file), "--preset", "hope-attention-tiny", *args, "--out",
                  str(tmp_path / "pre")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "stacked.safetensors"
    r = run(cli, ["stack", str(tmp_path / "pre"), "--period", "2", "--period", "4", "--period", "none",
                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    pre, stacked = api.load(tmp_path / "pre", backend="reference"), api.load(out, backend="reference")
    text = "the memory learns to compress its context into weights"
    assert stacked.config.cms_in_context and stacked.loss(text)["loss"] == pytest.approx(pre.loss(text)["loss"],
                                                                                      rel=1e-12)
    r = run(cli, ["train", "--init-from", str(out), *args, "--out", str(tmp_path / "cont")])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "cont" / "config.json").read_text())
    assert saved["model"]["name"] == "hope-attention-tiny-stacked" and saved["train"]["init_from"] == str(out)
    assert run(cli, ["train", "--init-from", str(out), "--preset", "hope-tiny", *args]).exit_code == 2
    bad = run(cli, ["train", "--init-from", str(tmp_path / "missing.safetensors"), *args, "--out",
                    str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "no such file" in bad.output and not (tmp_path / "bad").exists()
