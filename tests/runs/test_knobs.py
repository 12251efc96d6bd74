"""The training knobs a practitioner expects (SPEC.md#training): gradient accumulation, schedules,
weight decay and clipping flags, early stopping, top-p sampling, Ctrl-C with a checkpoint, the
slow-start notice, warmup, and the run files (TOML by tomli-w, metrics fields, umask, plot axes)."""

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import write_corpus

from nlref import progress, training
from nlref.cli import cli


def tiny(corpus, **kw):
    flags = dict(preset="transformer-tiny", backend="reference", data=str(corpus), steps=6, batch_size=4, seq_len=16,
                 lr=1e-2, eval_batches=1, checkpoint_every=0, log_every=10, val_fraction=0.3, dtype="float64")
    flags.update(kw)
    return training.resolve_config({}, flags)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=5, n_words=200)


def _losses(run):
    return [r["loss"] for r in training.read_metrics(run) if "loss" in r]


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------------------------
# Gradient accumulation, schedules, flags
# ------------------------------------------------------------------------------------------------


def test_grad_accum_equals_a_batch_n_times_larger(tmp_path, corpus):
    quiet = {"echo": lambda s: None}
    big = training.train(tiny(corpus, batch_size=6), tmp_path / "big", **quiet)
    acc = training.train(tiny(corpus, batch_size=2, grad_accum=3), tmp_path / "acc", **quiet)
    np.testing.assert_allclose(_losses(tmp_path / "acc"), _losses(tmp_path / "big"), rtol=1e-12, atol=1e-13)
    a, _, _ = training.load_model_checkpoint(tmp_path / "acc")
    b, _, _ = training.load_model_checkpoint(tmp_path / "big")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-10, atol=1e-12)
    assert acc["steps"] == big["steps"] == 6  # (validation windows come in --batch-size batches: not compared)
    rows = [r for r in training.read_metrics(tmp_path / "acc") if "loss" in r]
    assert rows[-1]["tokens"] == 6 * 6 * 16  # the tokens of the whole accumulated batch
    # and it really accumulates: one micro-batch alone is another trajectory
    training.train(tiny(corpus, batch_size=2), tmp_path / "small", **quiet)
    assert abs(_losses(tmp_path / "small")[1] - _losses(tmp_path / "acc")[1]) > 1e-6


def test_accumulate_weights_uneven_micro_batches():
    from nlref import backends, distributed
    from nlref.reference import config

    cfg = config.preset("transformer-tiny")
    be = backends.get("reference")
    params = be.model.init_params(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(5, 9))
    full_loss, full = be.loss_and_grads(params, tokens, cfg)
    loss, acc = distributed.accumulate(be, params, tokens, cfg, micro=3)  # rows 2, 2, 1
    assert loss == pytest.approx(float(full_loss), rel=1e-12)
    for k in full:
        np.testing.assert_allclose(acc[k], full[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "constant", "cosine"])
def test_schedules(schedule):
    tc = training.TrainConfig(steps=20, warmup_steps=4, lr=1.0, min_lr_ratio=0.1, schedule=schedule)
    lrs = [training.lr_at(s, tc) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    if schedule == "constant":
        assert lrs[4:] == [1.0] * 16
    else:
        assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
        assert all(b <= a + 1e-15 for a, b in zip(lrs[4:], lrs[5:], strict=False))
    if schedule == "linear":  # equal decrements
        np.testing.assert_allclose(np.diff(lrs[4:]), -0.9 / 15)
    with pytest.raises(ValueError, match="schedule"):
        training.TrainConfig(schedule="exponential")


def test_weight_decay_and_grad_clip_flags_reach_the_run(tmp_path, corpus):
    result = _invoke("train", "--preset", "transformer-tiny", "--backend", "reference", "--data", corpus,
                     "--steps", 2, "--seq-len", 16, "--weight-decay", 0.2, "--grad-clip", 0.5, "--grad-accum", 2,
                     "--schedule", "linear", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["optimizer_hparams"]["weight_decay"] == 0.2
    assert saved["train"]["grad_clip"] == 0.5 and saved["train"]["grad_accum"] == 2
    assert saved["train"]["schedule"] == "linear"
    bad = _invoke("train", "--preset", "transformer-tiny", "--backend", "reference", "--data", corpus, "--steps", 2,
                  "--optimizer", "delta_momentum", "--weight-decay", 0.1, "--out", tmp_path / "bad")
    assert bad.exit_code != 0 and "weight_decay" in bad.output and "valid" in bad.output
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_sgd_with_momentum_trains(tmp_path, corpus):
    rc = training.resolve_config({"optimizer_hparams": {"momentum": 0.9, "nesterov": True}},
                                 {**dict(preset="transformer-tiny", backend="reference", data=str(corpus), steps=3,
                                         seq_len=16, optimizer="sgd", lr=0.1, checkpoint_every=0)})
    summary = training.train(rc, tmp_path / "r", echo=lambda s: None)
    assert math.isfinite(summary["validation"]["loss"])
    from nlref import checkpoint

    ck = checkpoint.load_checkpoint(tmp_path / "r" / "checkpoint.safetensors")
    assert any(k.startswith("buf/") for k in ck.opt_state)  # torch's momentum buffer is in the state


# ------------------------------------------------------------------------------------------------
# Early stopping
# ------------------------------------------------------------------------------------------------


def test_patience_counts_validations_without_a_new_best():
    p = training.Patience(2, [3.0, 2.0, 2.5])
    assert not p.exhausted and p.best == 2.0 and p.since == 1
    p.add(2.0)  # equal is not better
    assert p.exhausted
    assert not training.Patience(0, [1.0, 2.0, 3.0, 4.0]).exhausted  # 0: never
    with pytest.raises(ValueError, match="eval_every"):
        training.TrainConfig(early_stop_patience=2)


def test_early_stop_then_resume_has_nothing_to_do(tmp_path, corpus, monkeypatch):
    real = training.evaluate
    calls = []

    def rising(*a, **kw):  # validation losses 5.0, 5.1, 5.2, ...: no new best after the first
        ev = dict(real(*a, **kw))
        ev["loss"] = 5.0 + 0.1 * len(calls)
        calls.append(1)
        return ev

    monkeypatch.setattr(training, "evaluate", rising)
    rc = tiny(corpus, steps=20, eval_every=2, early_stop_patience=2)
    summary = training.train(rc, tmp_path / "r", echo=lambda s: None)
    assert summary["early_stopped_at"] == 6 and summary["steps"] == 6  # validations at 2 (best), 4, 6
    out = []
    again = training.train(rc, tmp_path / "r", resume=True, echo=out.append)
    assert again["steps"] == 6 and any("stopped early" in line for line in out)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = [training.sample_next(logits, 1.0, 0, rng, top_p=0.75) for _ in range(3000)]
    counts = np.bincount(draws, minlength=4) / len(draws)
    # the nucleus of 0.75 is {0, 1} (0.5 + 0.3 >= 0.75), renormalised to 0.625 / 0.375
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] - 0.625) < 0.03
    assert all(training.sample_next(logits, 1.0, 0, rng, top_p=0.4) == 0 for _ in range(50))
    assert {training.sample_next(logits, 1.0, 0, rng, top_p=1.0) for _ in range(400)} == {0, 1, 2, 3}


# ------------------------------------------------------------------------------------------------
# Ctrl-C: a checkpoint at the next step boundary, then an exact resume
# ------------------------------------------------------------------------------------------------

TRAIN = ["--preset", "transformer-tiny", "--backend", "reference", "--seq-len", "16", "--batch-size", "4",
         "--steps", "16", "--checkpoint-every", "0", "--eval-every", "4", "--log-every", "1"]

CHILD = ("import os, runpy, signal, sys\n"
         "from nlref.reference import model as m\n"
         "f, calls = m.loss_and_grads, []\n"
         "def at_step(*a):\n"
         "    calls.append(1)\n"
         "    if len(calls) in {int(n) for n in os.environ['NL_TEST_SIGNAL_AT'].split(',')}:\n"
         "        os.kill(os.getpid(), int(os.environ['NL_TEST_SIGNAL']))\n"
         "    return f(*a)\n"
         "m.loss_and_grads = at_step\n"
         "sys.argv = ['nested-learning'] + sys.argv[1:]\n"
         "runpy.run_module('nlref', run_name='__main__')\n")


def _trajectory(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("val_loss")) for r in rows]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_at_the_step_boundary_and_resume_is_exact(tmp_path, sig):
    corpus = write_corpus(tmp_path / "corpus", n_docs=5, n_words=200)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "nlref", "train", *TRAIN, "--data", str(corpus)]
    whole = subprocess.run([*base, "--out", str(tmp_path / "whole")], capture_output=True, text=True, env=env,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr
    # the signal arrives inside step 7's gradient: step 7 completes, its checkpoint is written, exit
    cut = subprocess.run([sys.executable, "-c", CHILD, "train", *TRAIN, "--data", str(corpus),
                          "--out", str(tmp_path / "cut")], capture_output=True, text=True, timeout=300,
                         env={**env, "NL_TEST_SIGNAL_AT": "7", "NL_TEST_SIGNAL": str(int(sig))})
    assert cut.returncode == 128 + int(sig), (cut.returncode, cut.stderr[-2000:])
    assert "at step 7/16" in cut.stderr and "--resume" in cut.stderr, cut.stderr
    from nlref import checkpoint

    assert checkpoint.load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors").step == 7
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "nlref", "train", "--resume", str(tmp_path / "cut")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _trajectory(tmp_path / "cut") == _trajectory(tmp_path / "whole")  # bit for bit


def test_a_second_ctrl_c_aborts_without_waiting(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=5, n_words=200)
    cut = subprocess.run([sys.executable, "-c", CHILD, "train", *TRAIN, "--data", str(corpus),
                          "--out", str(tmp_path / "cut")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NL_TEST_SIGNAL_AT": "3,4", "NL_TEST_SIGNAL": str(int(signal.SIGINT))})
    # the first SIGINT (step 3's gradient) asks for a stop after step 3; the loop stops there
    # before step 4 ever runs, so a stop lands at 3: the second never comes
    assert cut.returncode == 130 and "at step 3/16" in cut.stderr, cut.stderr
    out = []
    stop = __import__("nlref.rundir", fromlist=["StopOnSignal"]).StopOnSignal(out.append)
    # the handler this process had (Python's default_int_handler, or SIG_IGN under nohup / `cmd &`,
    # which Python keeps from its parent)
    before = signal.getsignal(signal.SIGINT)
    with stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.signum == signal.SIGINT and out
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before  # the handler before comes back


# ------------------------------------------------------------------------------------------------
# No silent minute
# ------------------------------------------------------------------------------------------------


def test_slow_start_says_what_it_waits_for():
    lines = []
    with progress.slow_start(lines.append, False, "cpu", after_s=0.05):
        deadline = time.monotonic() + 30  # the call lasts until the notice came, however slow the machine
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "still running after 0.05 s" in lines[0] and "compiling the CPU kernels" in lines[0]
    assert lines[-1].startswith("the first step took")
    quick = []
    with progress.slow_start(quick.append, False, "cpu", after_s=5.0):
        pass
    with progress.slow_start(quick.append, False, "reference", after_s=0.0):
        time.sleep(0.05)  # the reference compiles nothing: no notice
    with progress.slow_start(quick.append, False, "cpu", active=False, after_s=0.0):
        time.sleep(0.05)
    assert quick == []


def test_warmup_command(tmp_path):
    result = _invoke("warmup", "--preset", "transformer-tiny")
    assert result.exit_code == 0, result.output
    assert "transformer-tiny float32:" in result.output and "warm: 1 preset(s) on cpu" in result.output


# ------------------------------------------------------------------------------------------------
# Run files
# ------------------------------------------------------------------------------------------------


def test_a_path_outside_the_bmp_resumes(tmp_path):
    corpus = write_corpus(tmp_path / "emoji😀", n_docs=4, n_words=150)
    run = tmp_path / "run😀"
    args = ["--preset", "transformer-tiny", "--backend", "reference", "--seq-len", "16"]
    assert _invoke("train", *args, "--data", corpus, "--steps", 2, "--out", run).exit_code == 0
    again = _invoke("train", "--resume", run, "--steps", 3)
    assert again.exit_code == 0, again.output
    assert "emoji😀" in (run / "config.toml").read_text(encoding="utf-8")


def test_metrics_rows_carry_split_and_time_and_files_get_the_umask(tmp_path, corpus):
    old = os.umask(0o022)
    try:
        t0 = time.time()
        training.train(tiny(corpus, steps=3, eval_every=2), tmp_path / "r", echo=lambda s: None)
    finally:
        os.umask(old)
    rows = training.read_metrics(tmp_path / "r")
    assert [r["split"] for r in rows] == ["train", "train", "validation", "train", "validation"]
    assert all(t0 - 1 <= r["time"] <= time.time() + 1 for r in rows)
    for name in ("config.toml", "config.json", "data.json", "metrics.jsonl", "checkpoint.safetensors",
                 "summary.json"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize("x", ["steps", "tokens", "time"])
def test_plot_axes(tmp_path, corpus, x):
    pytest.importorskip("matplotlib")
    run = tmp_path / "r"
    training.train(tiny(corpus, steps=3, eval_every=2), run, echo=lambda s: None)
    result = _invoke("plot", run, "--x", x, "--out", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [r for r in training.read_metrics(run) if "loss" in r]
    from nlref.cli import _plot_x

    xs = _plot_x(rows, x)
    assert xs == sorted(xs) and len(xs) == 3
    if x == "tokens":
        assert xs == [4 * 16, 8 * 16, 12 * 16]
