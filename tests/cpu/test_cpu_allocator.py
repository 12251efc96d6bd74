"""fast/cpu/allocator.py: glibc's heap settings for training processes (SPEC.md#fast-cpu, "The allocator").

What is checked is the mechanism, not a time: in a fresh process, freeing a 64 MiB array and
making another costs page faults again under glibc's defaults (the block went back to the system
through munmap) and at most a tenth of them after ``tune`` (the block is reused from the heap); the switch
``NL_CPU_MALLOC`` and its errors; the command line applies it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from nlref.cli import cli
from nlref.fast.cpu import allocator

_FAULTS = """
import resource, sys
import numpy as np
from nlref.fast.cpu import allocator
applied = allocator.tune()
a = np.ones(64 * 2**20 // 8); del a  # made, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(64 * 2**20 // 8)  # the same size again
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode):
    env = {**os.environ, "NL_CPU_MALLOC": mode}
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_tuned_heap_reuses_a_freed_large_block_instead_of_faulting_it_in_again():
    applied, tuned = _faults("heap")
    if not applied:
        pytest.skip("no glibc mallopt here: tune() does nothing")
    untouched, default = _faults("default")
    assert not untouched
    # at least one fault per 2 MiB (transparent huge pages); measured 544 here with glibc's defaults, 0 tuned
    assert default >= 32, f"glibc's default made only {default} faults for 64 MiB: nothing to compare"
    assert tuned * 10 <= default, f"{tuned} page faults for a reused block vs {default}: the heap settings did not apply"


def test_the_switch_and_its_errors(monkeypatch):
    monkeypatch.setenv("NL_CPU_MALLOC", "default")
    assert allocator.mode() == "default" and allocator.tune() is False
    monkeypatch.setenv("NL_CPU_MALLOC", "mmap")
    with pytest.raises(ValueError, match="NL_CPU_MALLOC='mmap': must be one of heap, default"):
        allocator.tune()
    res = CliRunner().invoke(cli, ["info"])
    assert res.exit_code == 2 and "NL_CPU_MALLOC='mmap'" in res.output
