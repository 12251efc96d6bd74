"""Run directories that survive what users do to them (SPEC.md#run-directories, issue 14): the
writer's lock, never-stuck states, checks before the first step, resume against the whole config,
last good checkpoints, orphaned temp files, one metrics row per step."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from nlref import checkpoint, rundir, training
from nlref import data as data_mod
from nlref.cli import cli
from nlref.reference import model

WORDS = "the memory learns to compress its context into weights while the optimizer learns gradients".split()
TINY = ["--preset", "transformer-tiny", "--backend", "reference", "--seq-len", "16", "--batch-size", "2",
        "--lr", "0.01"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def write_corpus(path, n_docs=6, n_words=200, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (path / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=n_words)))
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(result, *fragments):
    """Exit 1 or 2, exactly one 'Error:' line naming the problem, no traceback."""
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def trajectory(run):
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("val_loss")) for r in rows(run)]


def wait_for(condition, timeout=60.0, what="condition"):
    """Wait until ``condition()`` holds; the timeout is only an upper bound (never decides a result)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


# ------------------------------------------------------------------------------------------------
# 1. The writer's lock
# ------------------------------------------------------------------------------------------------

# A real `train` whose first step blocks until the test writes a line to its stdin: it holds the
# lock for as long as the test wants, whatever the machine's speed.
_BLOCKED_TRAIN = (
    "import sys, runpy; from nlref.reference import model as m; f = m.loss_and_grads; calls = [0]\n"
    "def g(*a):\n"
    "    calls[0] += 1\n"
    "    if calls[0] == 1:\n"
    "        print('blocked', flush=True)\n"
    "        sys.stdin.readline()\n"
    "    return f(*a)\n"
    "m.loss_and_grads = g\n"
    "sys.argv = ['nested-learning'] + sys.argv[1:]; runpy.run_module('nlref', run_name='__main__')\n"
)


def _start_blocked_train(corpus, out, *extra):
    cmd = [sys.executable, "-c", _BLOCKED_TRAIN, "train", *TINY, "--data", str(corpus), "--steps", "6",
           "--checkpoint-every", "2", "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    for line in proc.stdout:  # blocks until the first step (lock taken, run files written) or the end
        if line.strip() == "blocked":
            break
    assert proc.poll() is None, proc.communicate()
    assert (out / rundir.LOCK_NAME).read_text().strip() == str(proc.pid)
    return proc


def test_a_second_writer_fails_at_once_naming_the_holder_and_a_kill_leaves_no_stale_lock(tmp_path, corpus):
    out = tmp_path / "run"
    holder = _start_blocked_train(corpus, out)
    try:
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        # A second writer in another process (the command line), and one in this process.
        second = subprocess.run([sys.executable, "-m", "nlref", "train", *TINY, "--data", str(corpus),
                                 "--steps", "3", "--out", str(out)], capture_output=True, text=True, env=ENV,
                                timeout=120)
        assert second.returncode == 1, second.stderr
        assert "Traceback" not in second.stderr
        err = [ln for ln in second.stderr.splitlines() if ln.startswith("Error:")]
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "in use" in err[0], second.stderr
        for args in (["--out", out, "--overwrite"], ["--out", out]):
            assert_one_error_line(invoke("train", *TINY, "--data", corpus, "--steps", 3, *args),
                                  f"pid {holder.pid}")
        assert_one_error_line(invoke("train", "--resume", out), f"pid {holder.pid}")
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert after == before  # the failed writers touched nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    # The OS dropped the killed holder's lock: the run is resumable (it had no checkpoint yet, so
    # the resume restarts it from step 0) and finishes.
    resumed = invoke("train", "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    assert "restarting it from step 0" in resumed.output
    assert [r["step"] for r in rows(out) if "loss" in r] == list(range(1, 7))


def test_the_lock_is_held_for_the_life_of_the_call(tmp_path, corpus, monkeypatch):
    """Inside the training loop, another lock on the directory fails (the same process may not
    write twice either)."""
    real = model.loss_and_grads
    seen = []

    def probe(params, tokens, cfg):
        try:
            rundir.RunLock(tmp_path / "run").acquire().release()
            seen.append("free")
        except rundir.RunDirError as exc:
            seen.append(str(exc))
        return real(params, tokens, cfg)

    monkeypatch.setattr(model, "loss_and_grads", probe)
    assert invoke("train", *TINY, "--data", corpus, "--steps", 2, "--out", tmp_path / "run").exit_code == 0
    assert len(seen) == 2 and all(f"pid {os.getpid()}" in s for s in seen), seen
    rundir.RunLock(tmp_path / "run").acquire().release()  # released at the end


# ------------------------------------------------------------------------------------------------
# 2. Never stuck: resumable, restartable with --overwrite, or rejected with the reason
# ------------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, call, exc=KeyboardInterrupt):
    real = model.loss_and_grads
    calls = {"n": 0}

    def crash(params, tokens, cfg):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc("simulated")
        return real(params, tokens, cfg)

    monkeypatch.setattr(model, "loss_and_grads", crash)
    return real


@pytest.mark.parametrize("stop", ["kill", "nan", "memory"])
def test_a_run_stopped_before_its_first_checkpoint_is_resumable_and_restartable(tmp_path, corpus, monkeypatch, stop):
    args = [*TINY, "--data", corpus, "--steps", 8, "--checkpoint-every", 50]
    assert invoke("train", *args, "--out", tmp_path / "whole").exit_code == 0
    real = model.loss_and_grads
    if stop == "kill":
        _interrupt_at(monkeypatch, 3)
        assert invoke("train", *args, "--out", tmp_path / "cut").exit_code == 1  # "Aborted!"
    elif stop == "memory":
        _interrupt_at(monkeypatch, 3, MemoryError)
        assert_one_error_line(invoke("train", *args, "--out", tmp_path / "cut"), "out of memory at step 3",
                              "no checkpoint was written", "--overwrite")
    else:
        monkeypatch.setattr(model, "loss_and_grads", lambda p, t, c: (float("nan"), real(p, t, c)[1]))
        assert_one_error_line(invoke("train", *args, "--out", tmp_path / "cut"), "step 1: the loss is not finite",
                              "no checkpoint was written", "--overwrite")
    monkeypatch.setattr(model, "loss_and_grads", real)
    cut = tmp_path / "cut"
    assert not (cut / "checkpoint.safetensors").exists()
    # --out again: rejected, naming both ways on.
    assert_one_error_line(invoke("train", *args, "--out", cut), "stopped before its first checkpoint",
                          f"--resume {cut}", "--overwrite")
    # --resume restarts it from step 0 with its config: the uninterrupted run's trajectory.
    result = invoke("train", "--resume", cut)
    assert result.exit_code == 0, result.output
    assert trajectory(cut) == trajectory(tmp_path / "whole")
    # --overwrite starts over in place, also to the same trajectory.
    result = invoke("train", *args, "--out", cut, "--overwrite")
    assert result.exit_code == 0 and "--overwrite: removed" in result.output, result.output
    assert trajectory(cut) == trajectory(tmp_path / "whole")


def test_overwrite_replaces_only_the_runs_files_and_resume_excludes_it(tmp_path, corpus):
    run = tmp_path / "run"
    assert invoke("train", *TINY, "--data", corpus, "--steps", 3, "--out", run).exit_code == 0
    (run / "notes.txt").write_text("mine")
    assert_one_error_line(invoke("train", *TINY, "--data", corpus, "--steps", 2, "--out", run),
                          "already holds a run with a checkpoint at step 3", f"--resume {run}", "--overwrite")
    assert_one_error_line(invoke("train", "--resume", run, "--overwrite"), "--overwrite cannot be combined")
    assert invoke("train", *TINY, "--data", corpus, "--steps", 2, "--out", run, "--overwrite").exit_code == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (run / "notes.txt").read_text() == "mine"


def test_a_validation_split_shorter_than_seq_len_is_found_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _, (val_name,) = data_mod.split_files(["a.txt", "b.txt"], 0.05)  # the one validation file of two
    for name in ("a.txt", "b.txt"):
        (data / name).write_text("tiny" if name == val_name else " ".join(WORDS * 40))
    assert data_mod.load_corpus(str(data), 0.05).val.n_bytes == 4
    result = invoke("train", "--preset", "transformer-tiny", "--backend", "reference", "--seq-len", 32, "--steps", 3,
                    "--data", data, "--out", tmp_path / "run")
    assert_one_error_line(result, "validation split holds 4 bytes", "seq_len + 1 = 33", "--seq-len")
    assert not (tmp_path / "run").exists()


def test_a_step_that_cannot_fit_in_memory_is_refused_with_the_estimate(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "available_memory", lambda: 8 * 2**30)  # the same verdict on any machine
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"d{i}.txt").write_text("abcdefgh " * 130_000)  # 1.17 MB each
    result = invoke("train", "--preset", "transformer-tiny", "--backend", "reference", "--seq-len", 1_000_000,
                    "--steps", 3, "--config", _toml(tmp_path, "val_fraction = 0.5\n"),
                    "--data", data, "--out", tmp_path / "run")
    assert_one_error_line(result, "seq_len 1000000 needs at least", "GiB", "more than the 8.0 GiB available")
    cfg = _toml(tmp_path, 'preset = "transformer-tiny"\nbackend = "reference"\nsteps = 2\n[model]\nd_model = 200000\n')
    result = invoke("train", "--config", cfg, "--data", data, "--seq-len", 8, "--out", tmp_path / "run")
    assert_one_error_line(result, "d_model 200000", "parameters", "needs at least", "TiB")
    assert not (tmp_path / "run").exists()
    est = rundir.estimate_step_bytes(training.resolve_config({}, {"preset": "transformer-tiny", "seq_len": 1_000_000}))
    assert est["total"] > 3 * 4 * 1_000_001 * 256 * 8  # the logits' softmax alone


def _toml(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------
# 3. Resume verifies the whole training config
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def done_run(tmp_path, corpus):
    run = tmp_path / "run"
    result = invoke("train", *TINY, "--data", corpus, "--steps", 6, "--checkpoint-every", 3, "--out", run)
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.parametrize("edit, key", [
    (('optimizer = "adamw"', 'optimizer = "sgd"'), "optimizer: checkpoint 'adamw', config.toml 'sgd'"),
    (("lr = 0.01", "lr = 0.02"), "lr: checkpoint 0.01, config.toml 0.02"),
    (("seed = 0", "seed = 1"), "seed: checkpoint 0, config.toml 1"),
    (("batch_size = 2", "batch_size = 3"), "batch_size: checkpoint 2"),
    (("seq_len = 16", "seq_len = 12"), "seq_len: checkpoint 16"),
    (("weight_decay = 0.01", "weight_decay = 0.5"), "optimizer_hparams.weight_decay"),
])
def test_resume_rejects_an_edited_training_setting_naming_the_key(done_run, edit, key):
    text = (done_run / "config.toml").read_text()
    if edit[0] not in text:  # optimizer_hparams is empty by default: add the key
        text += edit[1] + "\n"
    (done_run / "config.toml").write_text(text.replace(*edit))
    result = invoke("train", "--resume", done_run, "--steps", 8)
    assert_one_error_line(result, key, "--config", "--out NEW_DIR")


def test_resume_may_change_steps_and_remembers_it(done_run):
    assert_one_error_line(invoke("train", "--resume", done_run, "--steps", 4), "steps 4 is below the checkpoint's step 6")
    result = invoke("train", "--resume", done_run)
    assert result.exit_code == 0 and "complete at step 6" in result.output, result.output
    assert invoke("train", "--resume", done_run, "--steps", 9).exit_code == 0
    assert "steps = 9" in (done_run / "config.toml").read_text()  # the next resume continues from there
    result = invoke("train", "--resume", done_run)
    assert result.exit_code == 0 and "complete at step 9" in result.output, result.output


def test_the_checkpoint_checksum_covers_its_metadata(done_run, tmp_path):
    from safetensors.numpy import load, save

    path = done_run / "checkpoint.safetensors"
    payload = path.read_bytes()
    header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    meta = dict(header["__metadata__"])
    for key, value in (("step", "4"), ("step", "1e400"), ("config", meta["config"].replace('"seed": 0', '"seed": 5'))):
        edited = tmp_path / "edited.safetensors"
        edited.write_bytes(save(load(payload), metadata={**meta, key: value}))
        with pytest.raises(checkpoint.CheckpointError, match="metadata does not match its checksum"):
            checkpoint.load_checkpoint(edited)
        assert_one_error_line(invoke("eval", edited), "metadata does not match its checksum")


# ------------------------------------------------------------------------------------------------
# 6. Last good checkpoints, orphaned temp files, one row per step
# ------------------------------------------------------------------------------------------------


def test_diverged_parameters_stop_the_run_and_are_never_checkpointed(tmp_path, corpus, monkeypatch):
    real_make = training.make_optimizer
    calls = {"n": 0}

    def blowing_up(rc, lr):
        opt = real_make(rc, lr)

        def update(params, grads, state):
            calls["n"] += 1
            params, state = opt.update(params, grads, state)
            if calls["n"] == 5:  # finite, but 3.9e298 (the checkpoint)
                params = {k: v * 3.9e298 if k == "embed.E" else v for k, v in params.items()}
            return params, state

        return type(opt)(opt.name, opt.hparams, opt.init, update)

    monkeypatch.setattr(training, "make_optimizer", blowing_up)
    run = tmp_path / "run"
    result = invoke("train", *TINY, "--data", corpus, "--steps", 8, "--checkpoint-every", 2, "--out", run)
    assert_one_error_line(result, "step 5: the parameters diverged", "step 4) is kept")
    ck = checkpoint.load_checkpoint(run / "checkpoint.safetensors")
    assert ck.step == 4 and max(float(np.abs(v).max()) for v in ck.params.values()) < 10


def test_a_non_finite_checkpoint_is_refused_by_eval_and_generate(done_run, tmp_path):
    ck = checkpoint.load_checkpoint(done_run / "checkpoint.safetensors")
    bad = tmp_path / "nan.safetensors"
    checkpoint.save_checkpoint(bad, params={k: np.full_like(v, np.nan) for k, v in ck.params.items()},
                               opt_state=ck.opt_state, config=ck.config, step=ck.step, rng_state=ck.rng_state,
                               data_position=ck.data_position, extra=ck.extra)
    assert_one_error_line(invoke("eval", bad), "non-finite values")
    assert_one_error_line(invoke("generate", bad, "--prompt", "x"), "non-finite values")


def test_orphaned_temp_files_are_removed_at_the_next_start(done_run):
    orphan = done_run / ".checkpoint.safetensors.abc123.tmp"
    orphan.write_bytes(b"\0" * 5000)
    other = done_run / ".keep.tmp"  # not one of the run's files: left alone
    other.write_bytes(b"x")
    result = invoke("train", "--resume", done_run, "--steps", 7)
    assert result.exit_code == 0, result.output
    assert "removed 1 orphaned temp file(s) (4.9 KiB)" in result.output
    assert not orphan.exists() and other.exists()


@pytest.mark.parametrize("kill_in", ["final validation", "summary"])
def test_resume_after_the_last_checkpoint_gives_one_row_per_step_and_one_final_validation(
        tmp_path, corpus, monkeypatch, kill_in):
    args = [*TINY, "--data", corpus, "--steps", 6, "--checkpoint-every", 3, "--eval-every", 3]
    assert invoke("train", *args, "--out", tmp_path / "whole").exit_code == 0
    real_evaluate, real_write = training.evaluate, checkpoint.atomic_write_text
    calls = {"n": 0}

    def evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the final validation, after the last checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real_evaluate(*a, **k)

    def write(path, text):
        if str(path).endswith("summary.json"):  # after the final validation row
            raise KeyboardInterrupt("simulated kill")
        return real_write(path, text)

    if kill_in == "summary":
        monkeypatch.setattr(checkpoint, "atomic_write_text", write)
    else:
        monkeypatch.setattr(training, "evaluate", evaluate)
    cut = tmp_path / "cut"
    assert invoke("train", *args, "--out", cut).exit_code == 1
    monkeypatch.setattr(training, "evaluate", real_evaluate)
    monkeypatch.setattr(checkpoint, "atomic_write_text", real_write)
    assert not (cut / "summary.json").exists()
    with open(cut / "metrics.jsonl", "a") as f:  # and a duplicated row and a line cut by the kill
        f.write(json.dumps(rows(cut)[-1]) + "\n" + '{"step": 6, "lo')
    result = invoke("train", "--resume", cut)
    assert result.exit_code == 0, result.output
    assert trajectory(cut) == trajectory(tmp_path / "whole")
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["final_train_loss"] == rows(tmp_path / "whole")[-2]["loss"] is not None
