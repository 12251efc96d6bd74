"""What a command shows while it works: the training progress bar and the notice of a slow start.

Paper: none (infrastructure of SPEC.md#run-directories: "No silent minute"). arXiv 2512.24695v1.

- ``StepProgress``: on a terminal a tqdm bar (steps, loss, tokens/s, ETA) with validation lines
  written above it; off a terminal one line every ``every`` steps (the format the logs keep).
- ``slow_start``: around the first call of a compiled backend. Numba compiles the CPU port's
  kernels on their first call after an install (about 1-2 minutes on 2 cores for hope-small,
  measured: README.md) and loads them from its cache on later runs (seconds). Whether a kernel is
  cached is not known before the call without Numba internals, so the notice is timed instead: if
  the call still runs after ``after_s`` seconds, the command says what it is waiting for and how
  long it may take, then shows the time passing (a spinner on a terminal, a line every 30 s off
  one), and says how long it took when it ends. ``nested-learning warmup`` compiles ahead.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable

SLOW_START_S = 3.0
WHY = {
    "cpu": ("Numba is compiling the CPU kernels (on the first run after an install: about 1-2 minutes on "
            "2 cores; later runs load them from its cache in seconds; `nested-learning warmup` compiles "
            "them ahead)"),
    "gpu": "CuPy is compiling the GPU kernels (on the first run only; they are cached after)",
}


class StepProgress:
    """Training progress from step ``start`` to ``total``."""

    def __init__(self, total: int, start: int, every: int, echo: Callable[[str], None], tty: bool):
        self.total, self.start, self.every, self.echo, self.tty = total, start, every, echo, tty
        self.t0 = time.perf_counter()
        self.bar = None
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", file=sys.stdout, dynamic_ncols=True,
                            leave=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.t0
            done = step - self.start
            eta = elapsed / done * (self.total - step) if done else 0.0
            self.echo(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                      f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    def note(self, msg: str) -> None:
        """A line beside the progress (a validation result): above the bar on a terminal."""
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            self.echo(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def slow_start(echo: Callable[[str], None], tty: bool, backend: str, active: bool = True,
               after_s: float = SLOW_START_S, what: str = "the first step"):
    """Say what a slow first call of ``backend`` waits for (module docstring); a no-op when not
    ``active`` or for a backend that compiles nothing (the reference)."""
    if not active or backend not in WHY:
        yield
        return
    done = threading.Event()
    shown = []
    t0 = time.perf_counter()

    def watch():
        if done.wait(after_s):
            return
        shown.append(True)
        echo(f"{what} is still running after {after_s:g} s: {WHY[backend]}")
        if tty:
            from tqdm import tqdm

            with tqdm(total=None, file=sys.stdout, leave=False, bar_format="  waiting {elapsed}") as spin:
                while not done.wait(0.5):
                    spin.update(0)
                    spin.refresh()
        else:
            while not done.wait(30.0):
                echo(f"  still waiting ({time.perf_counter() - t0:.0f} s)")

    thread = threading.Thread(target=watch, name="nl-slow-start", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if shown:
            echo(f"{what} took {time.perf_counter() - t0:.0f} s")
