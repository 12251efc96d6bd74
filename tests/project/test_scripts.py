"""scripts/readme_quickstart.py (the README quickstart parser shared by .ci/run and
scripts/fresh_machine.sh) and scripts/fresh_machine.sh's own logic, on throwaway repositories
whose quickstart commands take no time (the real check takes ~10 minutes and is run by hand)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
needs_git_and_bash = pytest.mark.skipif(shutil.which("git") is None or shutil.which("bash") is None,
                                        reason="needs git and bash")


def _parse(readme: Path):
    return subprocess.run([sys.executable, str(SCRIPTS / "readme_quickstart.py"), str(readme)],
                          capture_output=True, text=True)


def test_the_readme_quickstart_is_two_commands_read_verbatim():
    res = _parse(ROOT / "README.md")
    assert res.returncode == 0, res.stderr
    commands = res.stdout.splitlines()
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(commands) == 2 and all(c in lines for c in commands)  # each a README line, unchanged
    assert "pytest" in commands[1]


@pytest.mark.parametrize("block, error", [
    ("no quickstart here\n", "no '## Quickstart' fenced block"),
    ("## Quickstart\n\n```sh\none\ntwo\nthree\n```\n", "exactly two commands, found 3"),
    ("## Quickstart\n\n```sh\n# a comment\n\nonly one\n```\n", "exactly two commands, found 1"),
])
def test_a_readme_without_two_quickstart_commands_is_an_error(tmp_path, block, error):
    (tmp_path / "README.md").write_text("# x\n\n" + block)
    res = _parse(tmp_path / "README.md")
    assert res.returncode == 1 and error in res.stderr, res.stderr


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def _repo(path: Path, first: str, second: str) -> Path:
    """A git repository holding this checkout's scripts and a README with the two commands."""
    path.mkdir()
    shutil.copytree(SCRIPTS, path / "scripts")
    (path / "README.md").write_text(f"# x\n\n## Quickstart\n\n```sh\n{first}\n{second}\n```\n\nmore\n")
    _git(path, "init", "-q")
    _git(path, "add", ".")
    _git(path, "commit", "-q", "-m", "x")
    return path


def _fresh(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"} | (env_extra or {})
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env, timeout=300)


@needs_git_and_bash
def test_fresh_machine_runs_both_commands_in_a_clean_clone_and_fails_if_one_fails(tmp_path):
    # the second command sees a fresh shell's settings (no NL_*), a new venv, and the clone as its folder
    src = _repo(tmp_path / "src", "echo first-ran > ran.txt",
                'test -z "${NL_LEAK:-}" && test "$VIRTUAL_ENV" != "$HOST_VENV" && test -f ran.txt')
    tmp = tmp_path / "t"
    tmp.mkdir()
    ok = _fresh(str(SCRIPTS / "fresh_machine.sh"), str(src),
                env_extra={"NL_LEAK": "1", "HOST_VENV": os.environ.get("VIRTUAL_ENV", "-"), "TMPDIR": str(tmp)})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    summary = ok.stdout.split("fresh machine check:")[1]
    assert "echo first-ran > ran.txt" in summary and summary.count("exit 0") == 2, summary
    assert not any(tmp.iterdir())  # removed after a pass
    bad = _repo(tmp_path / "bad", "false", "echo second-ran")
    res = _fresh(str(SCRIPTS / "fresh_machine.sh"), str(bad), env_extra={"TMPDIR": str(tmp)})
    assert res.returncode == 1, res.stdout + res.stderr
    summary = res.stdout.split("fresh machine check:")[1]
    assert "false" in summary and "exit 1 " in summary and "FAILED" in summary
    assert "exit 0" in summary  # the second still ran
    assert "second-ran" in res.stdout and "kept: " in summary


@needs_git_and_bash
def test_fresh_machine_clones_the_committed_head_of_its_checkout(tmp_path):
    src = _repo(tmp_path / "src", "echo committed-one", "echo committed-two")
    (src / "README.md").write_text((src / "README.md").read_text().replace("committed-two", "uncommitted"))
    res = _fresh(str(src / "scripts" / "fresh_machine.sh"), "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "  echo committed-one\n  echo committed-two\n" in res.stdout and "uncommitted" not in res.stdout
