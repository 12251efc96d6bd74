"""The test suite's own layout: test files stand on their own, and the device tests carry the gpu mark.

- No file under tests/ imports a test module (``test_*``), in code or in a subprocess script held in
  a string: what several test files share lives in helper modules (tests/strategies.py,
  tests/cases_fast.py, tests/port_helpers.py, tests/corpus.py, ...), never in a test file.
- Every test of a module that calls ``gpu_helpers.require_gpu`` (the tests that need CuPy and a CUDA
  device) carries the ``gpu`` marker, and no other test does: ``pytest -m gpu`` selects exactly the
  device tests, ``pytest -m "not gpu"`` the rest. Checked by collecting (NL_GPU_TESTS_ON_NUMPY=1, so
  the device modules are collected rather than skipped where there is no device) and reading which
  node ids each marker expression selects.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
# "from test_x import ..." / "import test_x" at the start of a line (code or a script in a string)
_IMPORTS_A_TEST = re.compile(r"^\s*(from\s+test_\w*\s+import|import\s+test_\w*)", re.MULTILINE)


def _python_files():
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_file_under_tests_imports_a_test_module():
    files = _python_files()
    assert len(files) > 40, files
    bad = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{path.name}:{node.lineno}: {n}" for n in names if n.split(".")[0].startswith("test_")]
        bad += [f"{path.name}: {m.group(0).strip()}" for m in _IMPORTS_A_TEST.finditer(text)]
    assert not bad, "test files imported as libraries (move the shared code to a helper module):\n" + "\n".join(bad)


def test_the_import_check_would_catch_one():
    assert _IMPORTS_A_TEST.search("x = 1\nfrom test_model import _plain_loss\n")
    assert _IMPORTS_A_TEST.search('SCRIPT = """\n    import test_cpu_vmath as T\n"""')
    assert not _IMPORTS_A_TEST.search("from tests_helpers import x\nfrom strategies import test_x\n")


def _calls_require_gpu(path: Path) -> bool:
    """A call of require_gpu anywhere in the module's code (not in a string: a probe script that
    forces the no-device path, as in tests/gpu/test_gpu_over_numpy_namespace.py, is not a device test)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "require_gpu") or (
                    isinstance(f, ast.Attribute) and f.attr == "require_gpu"):  # fmt: skip
                return True
    return False


def _collect(*args) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NL_REQUIRE_GPU", "NL_GPU_ERRORS")}
    env.update(NL_GPU_TESTS_ON_NUMPY="1", PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode in (0, 5), out.stdout[-3000:] + out.stderr[-2000:]  # 5: nothing selected
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_every_device_test_carries_the_gpu_marker_and_no_other():
    device_files = sorted(p.name for p in TESTS.rglob("test_*.py") if _calls_require_gpu(p))
    assert "test_gpu_device_ops.py" in device_files and len(device_files) >= 4, device_files
    selected = set(_collect("-m", "gpu", "tests"))
    rest = set(_collect("-m", "not gpu", "tests"))
    assert selected and len(rest) > 500 and not selected & rest, (len(selected), len(rest))
    files = sorted({node.split("::")[0].split("/")[-1] for node in selected})
    assert files == device_files, f"-m gpu selects tests of {files}; the modules calling require_gpu: {device_files}"
    unmarked = sorted(n for n in rest if n.split("::")[0].split("/")[-1] in device_files)
    assert not unmarked, f"device tests without the gpu marker: {unmarked[:10]}"
