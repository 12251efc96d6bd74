"""glibc malloc settings for the training processes: large arrays reused from the heap.

Paper: none (a property of the machine, not of the model; arXiv 2512.24695v1). SPEC: SPEC.md#fast-cpu
("The allocator"). Measured: docs/performance.md#cpu-allocator.

A training step makes and frees many arrays of megabytes (activations, caches, per-chunk weight
groups, gradients). glibc serves every allocation above its mmap threshold (128 KiB, raised
dynamically up to 32 MiB) with a fresh ``mmap`` and returns it to the system on ``free``, so each
step faults in (and the kernel zeroes) the same pages again, and it trims the top of the heap above
128 KiB. ``tune`` sets ``M_MMAP_MAX = 0`` (every block from the heap, reused after ``free``) and
``M_TRIM_THRESHOLD = TRIM_THRESHOLD`` (freed memory stays in the process up to that much above
the heap's top). Nothing computed changes: the same code, the same arrays, the same numbers; the
peak resident memory was the same within 1.2 % in the measurements (docs/performance.md).

``NL_CPU_MALLOC``: ``heap`` (the default) applies the settings where ``tune`` is called (the command
line at start-up, the CPU port's worker processes, the benchmarks' measuring children), ``default``
leaves glibc as it is. Where there is no glibc ``mallopt`` (macOS, musl) ``tune`` does nothing.
Importing this module changes nothing.
"""

from __future__ import annotations

import ctypes
import os

MODES = ("heap", "default")
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # bytes kept above the heap's top after a free


def mode() -> str:
    """``NL_CPU_MALLOC`` (default ``heap``); a ValueError naming the choices for any other value."""
    value = os.environ.get("NL_CPU_MALLOC", "heap")
    if value not in MODES:
        raise ValueError(f"NL_CPU_MALLOC={value!r}: must be one of {', '.join(MODES)}")
    return value


def tune() -> bool:
    """Apply the heap settings to this process (``NL_CPU_MALLOC=heap``); True when glibc took both."""
    if mode() != "heap":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["MODES", "TRIM_THRESHOLD", "mode", "tune"]
