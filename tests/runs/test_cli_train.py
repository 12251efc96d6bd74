"""The train / eval / generate / plot commands through CliRunner and a subprocess (SPEC.md#training)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import write_corpus

from nlref.cli import cli
from nlref.fast.gpu import namespace
from nlref.reference import model

# The loop's logic runs on the reference (several tests patch reference.model.loss_and_grads);
# test_hope_family_end_to_end_with_exact_resume runs the default backend, the CPU port.
TINY = ["--preset", "transformer-tiny", "--backend", "reference", "--seq-len", "24", "--batch-size", "4",
        "--lr", "0.01"]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def assert_clean_error(result, *fragments):
    """Exit 1 or 2 with a one-line 'Error: ...' naming the problem, never a traceback."""
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run with a config file, shared by the commands that read a run."""
    base = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(base / "corpus")
    cfg = base / "run.toml"
    cfg.write_text("steps = 99\nval_fraction = 0.3\n[optimizer_hparams]\nweight_decay = 0.0\n")
    result = invoke("train", *TINY, "--config", cfg, "--data", corpus, "--steps", 30, "--out", base / "run",
                    "--eval-every", 10, "--checkpoint-every", 10, "--log-every", 10)
    assert result.exit_code == 0, result.output
    return base, corpus, base / "run", result.output


@pytest.mark.parametrize("command", ["train", "eval", "generate", "plot"])
def test_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Usage: cli " + command in result.output.replace("Usage: cli  ", "Usage: cli ")
    assert "--" in result.output


def test_train_writes_a_run(trained):
    _, _, run, output = trained
    assert "step 10/30" in output and "validation loss" in output and "bits per byte" in output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))  # the flag overrode the file's steps = 99
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
    assert np.mean([r["loss"] for r in steps[-5:]]) < np.mean([r["loss"] for r in steps[:5]])
    config = (run / "config.toml").read_text()
    assert "steps = 30" in config and "weight_decay = 0.0" in config
    assert json.loads((run / "summary.json").read_text())["steps"] == 30


def test_eval_continual_generate_and_plot_from_a_trained_checkpoint(trained, tmp_path):
    _, corpus, run, _ = trained
    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "bits per byte" in result.output
    result = invoke("eval", run / "checkpoint.safetensors", "--data", corpus / "doc1.txt", "--seq-len", 16)
    assert result.exit_code == 0 and "doc1.txt" in result.output
    result = invoke("eval", run, "--continual", "--data", corpus, "--max-docs", 3, "--doc-bytes", 120)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    table = [ln.split() for ln in lines if ln.strip()[:1].isdigit()]
    assert [row[0] for row in table] == ["1", "2", "3"]
    assert float(table[0][2]) == float(table[0][3])  # document 1: nothing read before it
    assert any(float(r[2]) != float(r[3]) for r in table[1:])  # the carried state changes later ones
    result = invoke("generate", run / "checkpoint.safetensors", "--prompt", "the mem", "--max-bytes", 40,
                    "--temperature", 0.7, "--top-k", 10, "--seed", 1)
    assert result.exit_code == 0 and result.output.startswith("the mem") and len(result.output) > 20
    again = invoke("generate", run, "--prompt", "the mem", "--max-bytes", 40, "--temperature", 0.7, "--top-k", 10,
                   "--seed", 1)
    assert again.output == result.output
    png = tmp_path / "curves.png"
    result = invoke("plot", run, run, "--out", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(trained, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = invoke("plot", trained[2], "--out", tmp_path / "x.png")
    assert_clean_error(result, "matplotlib", "nested-learning-reference[plot]")


def test_bad_data_gives_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 8)
    for path, words in [(tmp_path / "nope", "no such file"), (tmp_path / "empty.txt", "empty"),
                        (tmp_path / "blob.bin", "binary")]:
        result = invoke("train", *TINY, "--data", path, "--steps", 2, "--out", tmp_path / "r")
        assert_clean_error(result, "Error:", words)


def test_config_and_option_errors(trained, tmp_path):
    base, corpus, run, _ = trained
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    assert_clean_error(invoke("train", "--config", bad), "unknown keys ['stepz']", "batch_size")
    bad.write_text('preset = "transformer-tiny"\n[model]\nwidth = 3\n')
    assert_clean_error(invoke("train", "--config", bad, "--out", tmp_path / "r"), "width", "d_model")
    if not namespace.cupy_available()[0]:  # no GPU here: a clear error, nothing written
        assert_clean_error(invoke("train", *TINY, "--backend", "gpu", "--out", tmp_path / "r"),
                           "needs CuPy and a CUDA device")
        assert not (tmp_path / "r").exists()
    assert_clean_error(invoke("train", *TINY, "--data", corpus, "--out", run), "already holds a run", "--resume")
    assert_clean_error(invoke("train", "--resume", run, "--lr", 1), "--resume continues the run", "--lr")
    assert_clean_error(invoke("train", "--resume", tmp_path), "not a run directory")
    assert_clean_error(invoke("generate", run, "--prompt", ""), "prompt is empty")


def test_corrupt_truncated_and_foreign_checkpoints_give_clear_errors(trained, tmp_path):
    _, corpus, run, _ = trained
    payload = (run / "checkpoint.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(payload[: len(payload) // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    flipped = bytearray(payload)
    flipped[-5] ^= 0xFF
    corrupt.write_bytes(bytes(flipped))
    for path, words in [(truncated, "truncated"), (corrupt, "corrupt")]:
        for command in (["eval", path], ["generate", path, "--prompt", "x"]):
            assert_clean_error(invoke(*command), "Error:", words)
    # A run whose config was edited to another model cannot resume from its checkpoint.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("checkpoint.safetensors", "data.json", "metrics.jsonl"):
        (other / name).write_bytes((run / name).read_bytes())
    (other / "config.toml").write_text((run / "config.toml").read_text().replace("mlp_hidden = 12",
                                                                                   "mlp_hidden = 16"))
    assert_clean_error(invoke("train", "--resume", other, "--steps", 40), "another model", "mlp_hidden")


def test_non_finite_loss_stops_the_command(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", n_docs=4)
    real = model.loss_and_grads
    calls = {"n": 0}

    def poisoned(params, tokens, cfg):
        calls["n"] += 1
        loss, grads = real(params, tokens, cfg)
        return (float("inf") if calls["n"] == 9 else loss), grads

    monkeypatch.setattr(model, "loss_and_grads", poisoned)
    result = invoke("train", *TINY, "--data", corpus, "--steps", 20, "--checkpoint-every", 4, "--out", tmp_path / "r")
    assert_clean_error(result, "step 9: the loss is not finite", "step 8) is kept")
    monkeypatch.setattr(model, "loss_and_grads", real)
    assert invoke("eval", tmp_path / "r").exit_code == 0  # the kept checkpoint is usable


def _train_cmd(corpus, out, *extra):
    return [sys.executable, "-m", "nlref", "train", *TINY, "--data", str(corpus), "--steps", "24",
            "--checkpoint-every", "6", "--eval-every", "6", "--log-every", "1", "--out", str(out), *extra]


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    whole = subprocess.run(_train_cmd(corpus, tmp_path / "whole"), capture_output=True, text=True, env=env,
                           timeout=120)
    assert whole.returncode == 0, whole.stderr
    # The kill lands at a step chosen by the test, not by the machine's speed: the child stops in
    # step 10's gradient (9 steps done, the checkpoint of step 6 written) and says so; then SIGKILL.
    # Steps 7-9's metrics lines are beyond the checkpoint: the resume must drop them.
    stop = tmp_path / "stopped-in-step-10"
    child = ("import os, runpy, sys, time\n"
             "from nlref.reference import model as m\n"
             "f, calls = m.loss_and_grads, []\n"
             "def at_step(*a):\n"
             "    calls.append(1)\n"
             "    if len(calls) == 10:\n"
             "        open(os.environ['NL_TEST_STOP_FILE'], 'w').close()\n"
             "        time.sleep(3600)\n"
             "    return f(*a)\n"
             "m.loss_and_grads = at_step\n"
             "sys.argv = ['nested-learning'] + sys.argv[1:]\n"
             "runpy.run_module('nlref', run_name='__main__')\n")
    cmd = [sys.executable, "-c", child] + _train_cmd(corpus, tmp_path / "cut")[3:]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "NL_TEST_STOP_FILE": str(stop)})
    deadline = time.time() + 600  # a guard against a hang only
    while not stop.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert stop.exists() and proc.returncode == -signal.SIGKILL, err
    cut_rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines() if x]
    assert max(r["step"] for r in cut_rows) == 9, "killed in step 10: steps 1-9 logged, the checkpoint is step 6's"
    resumed = subprocess.run([sys.executable, "-m", "nlref", "train", "--resume", str(tmp_path / "cut")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    def trajectory(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        return [(r["step"], r.get("loss"), r.get("lr"), r.get("val_loss")) for r in rows]

    assert trajectory(tmp_path / "cut") == trajectory(tmp_path / "whole")  # exactly, bit for bit
    assert len(trajectory(tmp_path / "whole")) == 24 + 4


def test_hope_family_end_to_end_with_exact_resume(tmp_path, monkeypatch):
    """hope-tiny (self-modifying Titans + in-context CMS) on the CPU port (--backend cpu): train,
    interrupt, resume, eval, generate."""
    from nlref.fast.cpu import model as cpu_model

    corpus = write_corpus(tmp_path / "corpus", n_docs=5)
    args = ["train", "--preset", "hope-tiny", "--backend", "cpu", "--data", corpus, "--steps", 6,
            "--batch-size", 2, "--seq-len", 12, "--checkpoint-every", 3, "--eval-every", 3]
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0
    real = cpu_model.loss_and_grads
    calls = {"n": 0}

    def crash(params, tokens, cfg):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return real(params, tokens, cfg)

    monkeypatch.setattr(cpu_model, "loss_and_grads", crash)
    interrupted = invoke(*args, "--out", tmp_path / "cut")  # click turns the interrupt into "Aborted!"
    assert interrupted.exit_code == 1 and "Aborted" in interrupted.output
    monkeypatch.setattr(cpu_model, "loss_and_grads", real)
    assert invoke("train", "--resume", tmp_path / "cut").exit_code == 0

    def trajectory(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in rows]

    assert trajectory(tmp_path / "cut") == trajectory(tmp_path / "whole")
    result = invoke("eval", tmp_path / "cut", "--continual", "--data", corpus, "--max-docs", 2, "--doc-bytes", 20,
                    "--seq-len", 8)
    assert result.exit_code == 0 and "continual" in result.output, result.output
    result = invoke("generate", tmp_path / "cut", "--prompt", "the", "--max-bytes", 8, "--temperature", 0,
                    "--backend", "cpu")
    assert result.exit_code == 0 and result.output.startswith("the")
    reference = invoke("generate", tmp_path / "cut", "--prompt", "the", "--max-bytes", 8, "--temperature", 0,
                       "--backend", "reference")
    assert reference.exit_code == 0 and reference.output == result.output


def test_help_of_the_run_commands_imports_nothing_heavy(tmp_path):
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from nlref.cli import cli\n"
        "for sub in ('train', 'eval', 'generate', 'plot'):\n"
        "    assert CliRunner().invoke(cli, [sub, '--help']).exit_code == 0\n"
        "print(sorted(m for m in ('numba', 'cupy', 'numpy', 'matplotlib') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
