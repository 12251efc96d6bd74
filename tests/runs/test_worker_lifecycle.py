"""The CPU port's worker processes die with the process that started them (SPEC.md#run-directories,
issue 14 item 4): after SIGKILL or SIGTERM of the parent, no descendant survives."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")

# Starts the port's process pool (a forkserver and its workers), runs one task in each worker slot,
# says "ready" and waits forever.
_PARENT = (
    "import os, sys, time\n"
    "os.environ['NL_CPU_WORKERS'] = 'process'\n"
    "from nlref.fast.cpu import model as m\n"
    "pool = m._pool('process', 2)\n"
    "print(sorted({f.result() for f in [pool.submit(os.getpid) for _ in range(4)]}), flush=True)\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a live process, None if it is gone (a zombie counts as gone: it has exited)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    state, ppid = fields[0], int(fields[1])
    return None if state in ("Z", "X") else (state, ppid)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[1], []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_worker_outlives_its_killed_parent(sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        workers = parent.stdout.readline()
        assert parent.stdout.readline().strip() == "ready", parent.stderr.read()
        family = _descendants(parent.pid)
        worker_pids = {int(p) for p in workers.strip("[]\n").split(",")}
        assert worker_pids and worker_pids <= family, (workers, family)
    finally:
        parent.send_signal(sig)
        parent.wait(timeout=30)  # not communicate: surviving workers would hold its pipes open
        for f in (parent.stdin, parent.stdout, parent.stderr):
            f.close()
    assert parent.returncode == -sig
    deadline = time.monotonic() + 20  # an upper bound: they go within about a second
    while {p for p in family if _stat(p) is not None} and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = {p for p in family if _stat(p) is not None}
    for p in survivors:  # do not leave them behind if the test fails
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not survivors, f"{len(survivors)} of {len(family)} child processes outlived their parent"
