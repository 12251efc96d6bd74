"""scripts/calibrate_tolerances.py: the measurements behind tests/tolerances.py (its rows' comments).

``--quick`` on a subset of rows (the reference's own comparisons, the chunk-form rewrites, the float32
activations) must measure every requested row within its bound, print the table (the row, the
measured worst, the bound, the headroom) and exit 0; a bound below the measurement makes it exit 1
and name the row; every row of the table has a measurement (or a stated reason it is not measured).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tolerances import TOLERANCES

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "calibrate_tolerances.py"
SUBSET = ["float64:gradcheck", "float32:primitive_vs_float64", "float64:complex_step", "float64:rewrite",
          "float32:rewrite", "float32:mlp_memory_vs_float64", "float32:activation_vs_float64"]


def _load():
    spec = importlib.util.spec_from_file_location("calibrate_tolerances", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_subset_is_within_every_bound_and_prints_the_table():
    env = {k: v for k, v in os.environ.items() if k != "NL_GPU_TESTS_ON_NUMPY"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rows", ",".join(SUBSET)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:6] == ["row", "measured", "worst", "bound", "headroom", "seconds"], lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert sorted(rows) == sorted(SUBSET), lines
    for name, cols in rows.items():
        dtype, kind = name.split(":")
        worst, bound = float(cols[1]), float(cols[2])
        assert bound == TOLERANCES[(dtype, kind)][0], name
        assert 0.0 < worst <= bound, name  # a measurement of 0 would measure nothing
        assert cols[3].endswith("x") and abs(float(cols[3][:-1]) / (bound / worst) - 1) < 0.01, name
    assert lines[-1] == f"0 of {len(SUBSET)} rows exceed their bound", lines[-1]


def test_a_bound_below_the_measurement_exits_1_naming_the_row(monkeypatch, capsys):
    calib = _load()
    monkeypatch.setitem(calib.TOLERANCES, ("float32", "rewrite"), (1e-12, "too tight"))
    assert calib.main(["--quick", "--rows", "float32:rewrite,float64:rewrite"]) == 1
    text = capsys.readouterr().out
    assert "EXCEEDS THE BOUND" in text and text.splitlines()[-1] == "1 of 2 rows exceed their bound: float32:rewrite"


def test_every_row_of_the_table_has_a_measurement():
    calib = _load()
    assert set(calib.MEASURES) == set(TOLERANCES)
    for row, (measure, full, quick) in calib.MEASURES.items():
        assert callable(measure) and full >= 0 and quick >= 0, row
