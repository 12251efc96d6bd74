"""Conformance vectors (SPEC.md#conformance): the committed set verifies on the reference and on
the CPU port; the CLI exports, verifies, prints a per-tensor table and exits 1 on a mismatch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fake_clock import use_fake_clock
from tolerances import tol

from nlref import conformance as conf
from nlref.cli import cli
from nlref.fast.gpu import namespace

COMMITTED = Path(__file__).resolve().parents[1] / "conformance"


def _dtype(row) -> str:
    return "float32" if ".float32:" in row["name"] else "float64"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_committed_vectors_verify(backend):
    rows = conf.verify(COMMITTED, backend=backend)
    names = {r["name"].split(":")[0] for r in rows}
    assert names == set(conf.vector_names()), "the committed set must hold every vector"
    # within the vector's tolerance and the ("port") row of tests/tolerances.py, never bit for bit:
    # a committed file holds the rounding of the machine that wrote it (the reference itself
    # reproduces it to ~1e-6 in float32 on another machine's BLAS)
    bad = [r for r in rows if not (r["ok"] and r["max_rel"] <= tol(_dtype(r), "port"))]
    assert not bad, bad[:5]
    assert any(r["name"].endswith("grad.blocks.0.mem.memory.W1_0") for r in rows)  # hope: every gradient


def test_committed_vectors_follow_the_schema():
    manifest = json.loads((COMMITTED / "manifest.json").read_text())
    assert manifest["schema"] == conf.SCHEMA and manifest["version"] == conf.VERSION
    meta, groups = conf.load_vector(COMMITTED / "model.hope-tiny.float32.npz")
    assert meta["kind"] == "model" and meta["dtype"] == "float32" and meta["config"]["family"] == "hope"
    assert groups["output"]["loss"].shape == () and groups["output"]["loss"].dtype == np.float32
    assert set(groups["grad"]) == set(groups["param"])
    meta, groups = conf.load_vector(COMMITTED / "primitives.conv1d.float64.npz")
    assert meta["arguments"] == ["x", "w", "b", "state"] and set(groups["upstream"]) == {"y", "new_state"}


def test_cli_export_verify_and_mismatch(tmp_path):
    runner = CliRunner()
    out = tmp_path / "v"
    res = runner.invoke(cli, ["conformance", "export", str(out), "--only", "rmsnorm", "--dtype", "float64"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.npz")) == ["primitives.rmsnorm.float64.npz"]
    res = runner.invoke(cli, ["conformance", "verify", str(out), "--backend", "cpu"])
    assert res.exit_code == 0, res.output
    assert "primitives.rmsnorm.float64:grad.g" in res.output and "max rel" in res.output
    # An edited output: the manifest's hash catches it ...
    path = out / "primitives.rmsnorm.float64.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output.y"] = arrays["output.y"] + 1e-3
    np.savez(path, **arrays)
    res = runner.invoke(cli, ["conformance", "verify", str(out)])
    assert res.exit_code == 1 and "SHA-256" in res.output
    # ... and without a manifest the comparison fails the process, naming the tensor.
    (out / "manifest.json").unlink()
    res = runner.invoke(cli, ["conformance", "verify", str(out), "--backend", "reference"])
    assert res.exit_code == 1
    assert "FAIL" in res.output and "primitives.rmsnorm.float64:output.y" in res.output


def test_cli_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["conformance", "verify", str(tmp_path)])
    assert res.exit_code == 1 and "no conformance vectors" in res.output
    if not namespace.cupy_available()[0]:  # no GPU here: a clear error
        res = runner.invoke(cli, ["conformance", "verify", str(COMMITTED), "--backend", "gpu"])
        assert res.exit_code == 1 and "needs CuPy and a CUDA device" in res.output
    res = runner.invoke(cli, ["conformance", "export", str(tmp_path / "x"), "--only", "nothing-matches"])
    assert res.exit_code == 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(2))
    res = runner.invoke(cli, ["conformance", "verify", str(tmp_path)])
    assert res.exit_code == 1 and "not a conformance vector" in res.output


def test_bench_cli_runs_and_writes_json(tmp_path, monkeypatch):
    use_fake_clock(monkeypatch)  # the decode is measured, not skipped, however slow the machine (test_bench.py)
    runner = CliRunner()
    js = tmp_path / "b.jsonl"
    res = runner.invoke(cli, ["bench", "--preset", "transformer-tiny", "--seq-len", "8", "--batch-size", "2",
                              "--repeats", "1", "--decode-context", "8", "--decode-tokens", "1", "--backend", "reference",
                              "--backend", "cpu", "--backend", "torch", "--json-out", str(js)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in js.read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["reference", "cpu", "torch"]
    assert rows[0]["tokens_per_s"] > 0 and rows[1]["vs_reference"] > 0
    assert rows[1]["decode_s_per_token"]["8"] > 0
    torch_present = importlib.util.find_spec("torch") is not None
    assert rows[2].get("tokens_per_s", 0) > 0 if torch_present else "not available" in rows[2]["status"]
    assert "matrix-product rate" in res.output
    res = runner.invoke(cli, ["bench", "--preset", "nope"])
    assert res.exit_code == 2 and "unknown preset" in res.output
