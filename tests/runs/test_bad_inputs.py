"""The inputs that gave a Python traceback (issue 14 item 5) now give one 'Error:' line and a
non-zero exit, and leave nothing behind (SPEC.md#run-directories)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nlref import checkpoint
from nlref.cli import cli

TINY = ["--preset", "transformer-tiny", "--backend", "reference", "--seq-len", "16", "--batch-size", "2"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(result, *fragments):
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    corpus = base / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(["abc", "de", "fgh", "ij"], size=300)))
    result = invoke("train", *TINY, "--data", corpus, "--steps", 2, "--out", base / "run")
    assert result.exit_code == 0, result.output
    return base, corpus, base / "run"


def test_a_huge_seq_len(run, tmp_path):
    _, corpus, _ = run
    result = invoke("train", *TINY[:-4], "--seq-len", 2**62, "--data", corpus, "--out", tmp_path / "r")
    assert_one_error_line(result, "fewer than seq_len")
    assert not (tmp_path / "r").exists()  # never a stuck directory


def test_a_huge_width(run, tmp_path):
    _, corpus, _ = run
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nd_model = 200000\n")
    result = invoke("train", *TINY, "--config", cfg, "--data", corpus, "--out", tmp_path / "r")
    assert_one_error_line(result, "d_model 200000", "needs at least", "available")
    assert not (tmp_path / "r").exists()


def test_out_under_a_file(run, tmp_path):
    _, corpus, _ = run
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert_one_error_line(invoke("train", *TINY, "--data", corpus, "--steps", 1, "--out", out), "--out")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_out_in_proc(run):
    _, corpus, _ = run
    assert_one_error_line(invoke("train", *TINY, "--data", corpus, "--steps", 1, "--out", "/proc/nl-run"),
                          "/proc/nl-run", "choose a writable place")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_plot_out_in_proc(run):
    pytest.importorskip("matplotlib")
    assert_one_error_line(invoke("plot", run[2], "--out", "/proc/x.png"), "/proc/x.png", "cannot write")


def test_plot_never_leaves_a_partial_png(run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    png.write_bytes(b"good")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert_one_error_line(invoke("plot", run[2], "--out", png), "No space left")
    assert png.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_a_config_file_that_is_not_utf8(run, tmp_path):
    _, corpus, _ = run
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes('preset = "transformer-tiny"\n# caf\xe9\n'.encode("latin-1"))
    assert_one_error_line(invoke("train", "--config", cfg, "--data", corpus), "not UTF-8", "0xe9")
    assert_one_error_line(invoke("train", "--config", tmp_path, "--data", corpus))  # a directory


@pytest.mark.parametrize("temperature", ["nan", "inf", "1e-320", "-1"])
def test_generate_temperature(run, temperature):
    assert_one_error_line(invoke("generate", run[2], "--temperature", temperature), "--temperature")


def test_generate_prompt_that_is_not_utf8(run):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such an argv byte
    assert_one_error_line(invoke("generate", run[2], "--prompt", prompt), "--prompt", "UTF-8")


def _edit_metadata(src, dst, **fields):
    """A copy of checkpoint ``src`` with metadata fields replaced and the metadata checksum redone
    (as a careful forger would): the field checks themselves must catch it."""
    from safetensors.numpy import load, save

    payload = Path(src).read_bytes()
    meta = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])["__metadata__"]
    meta.update(fields)
    meta["metadata_sha256"] = checkpoint._metadata_checksum(meta)
    Path(dst).write_bytes(save(load(payload), metadata=meta))


@pytest.mark.parametrize("step", ['"7"', "-3", "2.5", "1e400", "true", "null"])
def test_a_tampered_step_field(run, tmp_path, step):
    bad = tmp_path / "ck.safetensors"
    _edit_metadata(run[2] / "checkpoint.safetensors", bad, step=step)
    assert_one_error_line(invoke("eval", bad), "step")
    src = run[2] / "checkpoint.safetensors"
    raw = src.read_bytes().replace(b'"step":"2"', b'"step":"9"')  # tampered without redoing the checksum
    assert raw != src.read_bytes()
    bad.write_bytes(raw)
    assert_one_error_line(invoke("eval", bad), "does not match its checksum")


def test_a_huge_file_given_as_a_checkpoint(run, tmp_path):
    """8 GiB (sparse) after a valid checkpoint, and 8 GiB of garbage: refused from the header, never
    read into memory."""
    big = tmp_path / "big.safetensors"
    big.write_bytes((run[2] / "checkpoint.safetensors").read_bytes())
    os.truncate(big, 8 * 2**30)
    assert_one_error_line(invoke("eval", big), "header describes")
    garbage = tmp_path / "garbage.safetensors"
    with open(garbage, "wb") as f:
        f.write(b"\xff" * 64)
    os.truncate(garbage, 8 * 2**30)
    assert_one_error_line(invoke("eval", garbage), "not a safetensors file")
    with open(garbage, "r+b") as f:
        f.write((40).to_bytes(8, "little") + b"{" * 40)
    assert_one_error_line(invoke("generate", garbage), "bad header")
