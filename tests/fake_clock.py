"""A fake clock for the time-based decisions of bench.py (``bench.CLOCK``), so that no test
depends on the machine's speed or load.

``FakeClock(tick)`` returns 0, tick, 2 tick, ... at successive readings (every interval the bench
measures is then a whole number of ticks, the same on every machine), and ``advance(seconds)``
moves it on by hand (a stand-in model "takes" that long). Install it with ``use_fake_clock``.
"""

from __future__ import annotations


class FakeClock:
    def __init__(self, tick: float = 0.0):
        self.tick, self.now, self.readings = tick, 0.0, 0

    def __call__(self) -> float:
        t = self.now
        self.now += self.tick
        self.readings += 1
        return t

    def advance(self, seconds: float) -> None:
        self.now += seconds


def use_fake_clock(monkeypatch, tick: float = 2.0**-10) -> FakeClock:
    """Put a FakeClock in ``bench.CLOCK`` for the test (a power of two: exact sums)."""
    from nlref import bench

    clock = FakeClock(tick)
    monkeypatch.setattr(bench, "CLOCK", clock)
    return clock
