"""This package and PyPI's ``nested-learning`` (0.2.0, another Hope implementation, import name
``nested_learning``, command ``nl``) install into one environment and both import (README.md,
"Names"). Both are installed with ``--no-deps`` into a fresh virtual environment: the check is
about names and files, not about the other project's dependencies (``nested_learning.levels``
needs only the standard library).

PyPI is one of the registries these machines reach; if pip cannot reach it the test is skipped
with pip's own message, and any other failure fails the test."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OTHER = "nested-learning==0.2.0"


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def test_installs_beside_pypi_nested_learning(tmp_path):
    wheels = tmp_path / "wheels"
    got = _run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), OTHER])
    if got.returncode != 0:
        unreachable = ("No matching distribution" in got.stderr or "connection" in got.stderr.lower()
                       or "Could not fetch" in got.stderr)
        if unreachable:
            pytest.skip(f"PyPI's {OTHER} cannot be downloaded here: {got.stderr.strip()[-300:]}")
        pytest.fail(got.stderr)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # ours: a wheel built from a copy of this source tree (setuptools writes build/ and *.egg-info
    # where it builds: never into the checkout), in pip's isolated build environment
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "build", "*.egg-info", "runs",
                                                             "__pycache__", ".numba_cache", ".hypothesis", "*.nbi",
                                                             "*.nbc", ".pytest_cache", ".ruff_cache"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(src)])
    assert built.returncode == 0, built.stderr[-2000:]
    ours = sorted(wheels.glob("nested_learning_reference-*.whl"))
    theirs = sorted(wheels.glob("nested_learning-0.2.0-*.whl"))
    assert len(ours) == 1 and len(theirs) == 1, sorted(p.name for p in wheels.iterdir())
    inst = _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(ours[0]), str(theirs[0])])
    assert inst.returncode == 0, inst.stderr[-2000:]
    probe = ("import nlref, nested_learning, nested_learning.levels\n"
             "from importlib.metadata import distribution\n"
             "a = {str(f) for f in distribution('nested-learning-reference').files}\n"
             "b = {str(f) for f in distribution('nested-learning').files}\n"
             "shared = sorted(f for f in a & b if not f.startswith('../'))\n"
             "assert not shared, shared\n"
             "assert nlref.__file__ != nested_learning.__file__\n"
             "print(nlref.__version__, nested_learning.__version__)\n")
    res = _run([str(py), "-c", probe])
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0.1.0", "0.2.0"]
    assert (env_dir / "bin" / "nested-learning").exists() and (env_dir / "bin" / "nl").exists()
