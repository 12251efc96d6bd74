"""One BLAS thread limit for the whole CPU port, safe under the port's own worker threads.

SPEC: SPEC.md#fast-cpu (BLAS threads; the batch split over cores).

The port's public functions run BLAS with ``NL_CPU_BLAS_THREADS`` threads (default 1) and the
sequence-memory layers with one (their products are small). threadpoolctl's ``limit`` sets a
process-wide value and restores the previous one on exit, so two threads that nest their own
limits would restore each other's values in the middle of a computation. ``limited(n)`` is
therefore re-entrant: the outermost call (in any thread) sets the limit and restores it when the
last holder leaves; any call made while a limit is held only counts itself (it does not change the
value). Results never depend on the value beyond rounding.
"""

from __future__ import annotations

import contextlib
import threading

_LOCK = threading.Lock()
_HOLDERS = 0
_ACTIVE = None  # threadpoolctl's limiter of the outermost holder
_CONTROLLER = None


def _controller():
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


@contextlib.contextmanager
def limited(n: int):
    """Run the block with BLAS limited to ``n`` threads unless a limit is already held (then the
    holder's value stands). Without threadpoolctl or an inspectable BLAS: runs as is."""
    global _HOLDERS, _ACTIVE
    with _LOCK:
        if _HOLDERS == 0:
            try:
                _ACTIVE = _controller().limit(limits=n, user_api="blas")
            except Exception:  # threadpoolctl missing or unable to inspect the BLAS
                _ACTIVE = None
        _HOLDERS += 1
    try:
        yield
    finally:
        with _LOCK:
            _HOLDERS -= 1
            if _HOLDERS == 0 and _ACTIVE is not None:
                _ACTIVE.restore_original_limits()
                _ACTIVE = None


def held() -> int:
    """How many blocks hold the limit now (0: none)."""
    return _HOLDERS


__all__ = ["held", "limited"]
