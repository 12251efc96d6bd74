"""The command line and the package layout (SPEC.md#public-api; style guide "CLI")."""

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from nlref import cli as cli_module
from nlref.cli import cli


def _run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    # Run from an empty folder so nothing but the installed package can be imported.
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def test_help_imports_neither_numba_nor_cupy(tmp_path):
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from nlref.cli import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "for sub in ('info', 'check'):\n"
        "    assert CliRunner().invoke(cli, [sub, '--help']).exit_code == 0\n"
        "print(sorted(m for m in ('numba', 'cupy', 'numpy') if m in sys.modules))\n"
    )
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_reference_imports_neither_numba_nor_cupy(tmp_path):
    code = (
        "import sys, pkgutil, importlib\n"
        "import nlref.reference as ref\n"
        "names = [m.name for m in pkgutil.iter_modules(ref.__path__)]\n"
        "assert 'primitives' in names and 'gradcheck' in names, names\n"
        "for n in names:\n"
        "    importlib.import_module('nlref.reference.' + n)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'cupy')))\n"
    )
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_console_script_and_module_entry_point(tmp_path):
    for argv in (["nested-learning", "--help"], [sys.executable, "-m", "nlref", "--help"]):
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "check" in result.stdout and "info" in result.stdout


def test_nothing_installed_under_a_generic_top_level_name(tmp_path):
    code = (
        "import importlib.util\n"
        "print([n for n in ('reference', 'fast', 'cli', 'tests') if importlib.util.find_spec(n)])\n"
    )
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_info_runs():
    result = CliRunner().invoke(cli, ["info"])
    assert result.exit_code == 0, result.output
    assert "numpy" in result.output and "gpu:" in result.output


def test_check_passes_on_the_reference():
    result = CliRunner().invoke(cli, ["check", "--only", "primitives."])
    assert result.exit_code == 0, result.output
    assert " OK" in result.output and "FAIL" not in result.output


def test_check_fails_with_exit_1_on_a_wrong_gradient(monkeypatch):
    module = __import__("nlref.reference.cases.primitives", fromlist=["GRADCHECKS"])

    def wrong_case(rng):
        x = rng.standard_normal(5)

        def loss(inputs):
            return np.sum(np.sin(inputs["x"]))

        return loss, {"x": x}, {"x": np.cos(x) * 1.001}  # off by 0.1%: must be caught

    monkeypatch.setitem(module.GRADCHECKS, "zz_wrong.sin", wrong_case)
    result = CliRunner().invoke(cli, ["check", "--only", "zz_wrong"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_check_unknown_name_is_a_usage_error():
    result = CliRunner().invoke(cli, ["check", "--only", "no-such-op"])
    assert result.exit_code == 2
    assert "no gradient check matches" in result.output


@pytest.mark.parametrize("module_name", cli_module.GRADCHECK_MODULES)
def test_every_check_module_registers_cases(module_name):
    """reference/cases/<module>.py registers cases named after its module, and the reference module
    itself carries none (the test material lives in reference/cases/)."""
    module = __import__(f"nlref.reference.cases.{module_name}", fromlist=["GRADCHECKS"])
    assert len(module.GRADCHECKS) > 0
    assert all(name.startswith(module_name + ".") for name in module.GRADCHECKS)
    reference = __import__(f"nlref.reference.{module_name}", fromlist=["__name__"])
    assert not hasattr(reference, "GRADCHECKS")


def test_check_runs_every_case_of_reference_cases():
    from nlref.reference import cases

    names = list(cases.all_cases())
    assert len(names) == len(set(names)) == sum(len(m.GRADCHECKS) for m in cases.modules().values())
    assert list(cases.modules()) == list(cli_module.GRADCHECK_MODULES)
