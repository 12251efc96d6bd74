"""Fuzzing the run commands (issue 14 item 7, SPEC.md#run-directories): bad config TOML, bad
argument vectors and damaged checkpoint bytes give exit 1 or 2, one 'Error:' line, no traceback,
and write nothing outside the run directory; kill -9 at random points, then resume, reproduces the
uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlref import checkpoint, training
from nlref.cli import cli

TINY = ["--preset", "transformer-tiny", "--backend", "reference", "--seq-len", "8", "--batch-size", "2"]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A corpus, a finished run, a file and a cwd to run in; built once."""
    root = tmp_path_factory.mktemp("fuzz")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(["ab", "cde", "f", "ghij"], size=200)))
    (root / "file.txt").write_text("not a directory")
    (root / "cwd").mkdir()
    result = CliRunner().invoke(cli, ["train", *TINY, "--data", str(corpus), "--steps", "2", "--out",
                                      str(root / "run")])
    assert result.exit_code == 0, result.output
    return root


def _snapshot(root: Path, skip: Path | None = None) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if (skip is None or skip not in p.parents) and name != "train.lock":  # the lock holds a pid
                out[str(p)] = p.stat().st_mtime_ns, p.stat().st_size
    return out


def _run_bad(base: Path, args: list[str], out: Path | None = None, allow_ok=False):
    """Invoke in ``base/cwd``; assert a clean failure and no write outside ``out``."""
    before = _snapshot(base, out)
    cwd = os.getcwd()
    os.chdir(base / "cwd")
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        os.chdir(cwd)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exc_info)
    if not (allow_ok and result.exit_code == 0):
        assert result.exit_code in (1, 2), (args, Path(args[2]).read_bytes() if args[1] == "--config" else "",
                                            result.output)
        assert "Traceback" not in result.output
        assert sum(ln.startswith("Error:") for ln in result.output.splitlines()) == 1, (args, result.output)
    assert _snapshot(base, out) == before, args
    return result


# ------------------------------------------------------------------------------------------------
# Config TOML
# ------------------------------------------------------------------------------------------------

_NUMBERS = ["lr", "min_lr_ratio", "grad_clip", "val_fraction"]
_COUNTS = ["eval_batches", "seed", "blas_threads", "warmup_steps", "eval_every", "checkpoint_every", "log_every"]
_BY_FLAGS = {"preset", "backend", "seq_len", "batch_size", "steps", "data"}  # the flags override the file
_STRINGS = ["optimizer", "dtype"]  # preset, backend, data: set by the command's flags
_MODEL_INTS = ["vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden"]
_MODEL_STRS = ["family", "dtype", "cms_variant", "cms_activation", "mem_kind"]

_wrong_type = st.sampled_from(['"x"', "[1, 2]", "{a = 1}", "true", "1979-05-27"])
_bad_number = st.one_of(_wrong_type, st.sampled_from(["nan", "-inf", "-1.0", "-1e300"]))
_bad_count = st.one_of(_wrong_type, st.sampled_from(["-1", "-9223372036854775808", "1.5", "nan"]))
_bad_string = st.one_of(st.sampled_from(["1", "[]", "true", '""', '"nope"', '"../../etc"']),
                        st.text(min_size=1, max_size=8).map(json.dumps))
_bad_entry = st.one_of(
    st.tuples(st.sampled_from(_NUMBERS), _bad_number),
    st.tuples(st.sampled_from(_COUNTS), _bad_count),
    st.tuples(st.sampled_from(_STRINGS), _bad_string),
    st.tuples(st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda k: k not in training.TRAIN_KEYS),
              st.just("1")),
    st.tuples(st.sampled_from(_MODEL_INTS).map(lambda k: f"[model]\n{k}"),
              st.one_of(_wrong_type, st.sampled_from(["0", "-3"]))),
    st.tuples(st.sampled_from(_MODEL_STRS).map(lambda k: f"[model]\n{k}"), st.sampled_from(["1", '"nope"', "[]"])),
    st.tuples(st.sampled_from(["[model]\nwidth", "[optimizer_hparams]\nbogus", "[optimizer_hparams]\nbeta1"]),
              st.sampled_from(["1", '"x"', "-5"])),
    st.tuples(st.sampled_from(["model", "optimizer_hparams"]), st.sampled_from(["1", '"x"'])),
)
_raw_toml = st.one_of(st.binary(min_size=1, max_size=64), st.text(max_size=40).map(lambda t: ("= " + t).encode()))


@FUZZ
@given(entry=st.one_of(_bad_entry.map(lambda kv: f"{kv[0]} = {kv[1]}\n".encode()), _raw_toml))
def test_fuzz_bad_config_toml(base, entry):
    import shutil

    cfg = base / "cwd" / "fuzz.toml"
    cfg.write_bytes(entry)
    out = base / "cwd" / "run"
    try:
        try:  # raw bytes may happen to be a valid config of only keys the flags override: then it trains
            import tomllib

            harmless = set(tomllib.loads(entry.decode())) <= _BY_FLAGS
        except (ValueError, UnicodeDecodeError):
            harmless = False
        result = _run_bad(base, ["train", "--config", str(cfg), *TINY, "--steps", "1", "--data", str(base / "corpus"),
                                 "--out", str(out)], out=out, allow_ok=harmless)
        if harmless and result.exit_code == 0:
            return
        # Refused before anything was written, or (lr = inf) stopped at the first step with nothing kept.
        assert not out.exists() or "not finite" in result.output, (entry, result.output)
    finally:
        cfg.unlink()
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Argument vectors
# ------------------------------------------------------------------------------------------------

_BAD_TRAIN = {
    "--steps": ["0", "-1", "x", "1.5", ""], "--batch-size": ["0", "-2", "x"], "--seq-len": ["0", "-1", "nan"],
    "--warmup-steps": ["-1", "x"], "--eval-every": ["-1"], "--checkpoint-every": ["-3"], "--log-every": ["0"],
    "--lr": ["nan", "-1", "0", "x", "-inf"], "--optimizer": ["nope", ""], "--backend": ["tpu"],
    "--dtype": ["float16"], "--preset": ["nope", ""], "--seed": ["-1", "x"], "--data": ["{missing}", "{file}/x"],
    "--config": ["{missing}", "{file}"],
}


@st.composite
def bad_argv(draw):
    command = draw(st.sampled_from(["train", "eval", "generate", "plot", "resume"]))
    if command in ("train", "resume"):
        args = {"--preset": "transformer-tiny", "--backend": "reference", "--steps": "1", "--seq-len": "8",
                "--batch-size": "2", "--data": "{corpus}", "--out": "{out}"}
        flag = draw(st.sampled_from(sorted(_BAD_TRAIN) + ["--out", "--bogus"]))
        if flag == "--out":
            args["--out"] = draw(st.sampled_from(["{file}", "{file}/run", "/proc/nl-fuzz"]))
        elif flag == "--bogus":
            args["--bogus"] = "1"
        else:
            args[flag] = draw(st.sampled_from(_BAD_TRAIN[flag]))
        argv = ["train"] + [x for kv in args.items() for x in kv]
        if command == "resume":  # a resume of the finished run with a fixed option changed, or of no run
            argv = ["train", "--resume", draw(st.sampled_from(["{run}", "{missing}", "{corpus}", "{file}"]))]
            argv += draw(st.sampled_from([["--lr", "0.5"], ["--steps", "1"], ["--seq-len", "4"], ["--out", "{out}"],
                                          ["--config", "{file}"], ["--overwrite"], []]))
            if argv[2] == "{run}" and argv[3:] == []:
                argv += ["--steps", "1"]  # below the run's step 2
        return argv
    if command == "eval":
        target = draw(st.sampled_from(["{run}", "{missing}", "{file}", "{corpus}"]))
        extra = draw(st.sampled_from([["--seq-len", "0"], ["--batch-size", "-1"], ["--max-batches", "0"],
                                      ["--data", "{missing}"], ["--max-docs", "0"], ["--backend", "x"], []]))
        if target == "{run}" and not extra:
            extra = ["--doc-bytes", "0"]
        return ["eval", target, *extra]
    if command == "generate":
        target = draw(st.sampled_from(["{run}", "{missing}", "{file}", "{corpus}"]))
        extra = draw(st.sampled_from([["--temperature", "nan"], ["--temperature", "1e-320"], ["--max-bytes", "-1"],
                                      ["--top-k", "-1"], ["--prompt", ""], ["--prompt", "caf\udce9"], []]))
        if target == "{run}" and not extra:
            extra = ["--temperature", "-inf"]
        return ["generate", target, *extra]
    target = draw(st.sampled_from(["{run}", "{missing}", "{file}", "{corpus}"]))
    extra = draw(st.sampled_from([["--smooth", "1"], ["--smooth", "nan"], ["--out", "{file}/x.png"],
                                  ["--out", "/proc/x.png"], []]))
    if target == "{run}" and not extra:
        extra = ["--smooth", "-0.5"]
    return ["plot", target, *extra]


@FUZZ
@given(argv=bad_argv())
def test_fuzz_bad_argument_vectors(base, argv):
    if argv[0] == "plot":
        pytest.importorskip("matplotlib")
    out = base / "cwd" / "run"
    names = {"corpus": base / "corpus", "out": out, "file": base / "file.txt", "missing": base / "missing",
             "run": base / "run"}
    argv = [a.format(**names) for a in argv]
    import shutil

    try:
        _run_bad(base, argv, out=out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Checkpoint bytes
# ------------------------------------------------------------------------------------------------


def _semantics(payload: bytes):
    """(header as JSON, data bytes) of a safetensors payload, or None if unparsable."""
    try:
        n = int.from_bytes(payload[:8], "little")
        return json.loads(payload[8 : 8 + n]), payload[8 + n :]
    except (ValueError, UnicodeDecodeError):
        return None


@st.composite
def damaged(draw, payload: bytes):
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "header_len", "random", "append"]))
    n = len(payload)
    if kind == "truncate":
        return payload[: draw(st.integers(0, n - 1))]
    if kind == "flip":
        i = draw(st.integers(0, n - 1))
        return payload[:i] + bytes([payload[i] ^ draw(st.integers(1, 255))]) + payload[i + 1 :]
    if kind == "insert":
        i = draw(st.integers(0, n))
        return payload[:i] + draw(st.binary(min_size=1, max_size=16)) + payload[i:]
    if kind == "header_len":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + payload[8:]
    if kind == "append":
        return payload + draw(st.binary(min_size=1, max_size=16))
    return draw(st.binary(max_size=256))


@FUZZ
@given(data=st.data())
def test_fuzz_damaged_checkpoint_bytes(base, data):
    original = (base / "run" / "checkpoint.safetensors").read_bytes()
    payload = data.draw(damaged(original))
    path = base / "cwd" / "damaged.safetensors"
    path.write_bytes(payload)
    try:
        command = data.draw(st.sampled_from([["eval", str(path)], ["generate", str(path), "--max-bytes", "2"]]))
        same = _semantics(payload) == _semantics(original)  # e.g. a flip inside the header's padding spaces
        _run_bad(base, command, out=None, allow_ok=same)
    finally:
        path.unlink()


# ------------------------------------------------------------------------------------------------
# kill -9 at random points, then resume
# ------------------------------------------------------------------------------------------------


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_kill9_at_random_points_then_resume_reproduces_the_uninterrupted_run(base, tmp_path):
    """Four kills after a random number of logged steps (0: before the first one; the kill may land
    inside a checkpoint write); each resume (a restart when there is no checkpoint yet) ends with
    the uninterrupted run's metrics, bit for bit, and no temp file left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    args = ["train", *TINY, "--data", str(base / "corpus"), "--steps", "16", "--checkpoint-every", "3",
            "--eval-every", "4", "--lr", "0.01"]
    assert CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "whole")]).exit_code == 0
    whole = _rows(tmp_path / "whole")
    rng = np.random.default_rng(14)
    for trial, k in enumerate(rng.integers(0, 17, size=4)):
        run = tmp_path / f"cut{trial}"
        proc = subprocess.Popen([sys.executable, "-m", "nlref", *args, "--out", str(run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60  # an upper bound; the kill point is wherever the run is then

        def logged(run=run):
            try:
                return sum('"loss"' in ln for ln in (run / "metrics.jsonl").read_text().splitlines())
            except FileNotFoundError:
                return -1

        while proc.poll() is None and logged() < k and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if not (run / "config.toml").exists():  # killed before the run wrote anything: start it
            result = CliRunner().invoke(cli, [*args, "--out", str(run), "--overwrite"])
        else:
            result = CliRunner().invoke(cli, ["train", "--resume", str(run)])
        assert result.exit_code == 0, (k, result.output)
        assert _same(_rows(run), whole), k  # every loss, lr, gradient norm and validation, exactly
        assert not list(run.glob(".*.tmp")), k
        assert checkpoint.load_checkpoint(run / "checkpoint.safetensors").step == 16


def _same(a, b):
    """Equal metrics but for the step times."""
    strip = [{k: v for k, v in r.items() if k not in ("step_time_s", "time")} for r in a]
    return strip == [{k: v for k, v in r.items() if k not in ("step_time_s", "time")} for r in b]
