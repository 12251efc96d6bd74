"""The key-side writes' two forms side by side: hope-small's ``loss_and_grads`` with
``fast.cpu.selfmod.KEY_WRITES`` = ``sweep`` and ``ut`` (SPEC.md#fast-cpu, docs/performance.md#cpu-key-writes).

Usage: [NL_CPU_GROUPS=1] python scripts/bench_key_writes.py [ROUNDS] [PRESET]

One process (so the machine's load hits both forms alike): PRESET (default hope-small) in float32,
a batch of 4 x 256 random bytes (seed 0), two warm calls per form, then ROUNDS (default 15) rounds
of one timed call per form, the order alternating per round. Prints each round, the medians, their
ratio and the per-round ratios, the forms' loss and gradient difference, and with one group
(``NL_CPU_GROUPS=1``: every call in this thread) cProfile's call count of one call per form. The
attribute is set in this process only, so worker processes (``NL_CPU_WORKERS=process``) would keep
their own setting: run with the library's default thread workers.
"""

import cProfile
import dataclasses
import pstats
import sys
import time

import numpy as np

from nlref import config
from nlref.fast.cpu import model as FM
from nlref.fast.cpu import selfmod as FS


def main(rounds=15, preset="hope-small"):
    cfg = dataclasses.replace(config.preset(preset), dtype="float32")
    params = FM.init_params(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, 256, (4, 256))
    print(f"{preset}: groups {FM.GROUPS}, workers {FM.WORKERS}, threads {FM.worker_threads(len(FM.batch_groups(4)))}")
    res = {}
    for form in ("sweep", "ut"):
        FS.KEY_WRITES = form
        res[form] = FM.loss_and_grads(params, tokens, cfg)
        FM.loss_and_grads(params, tokens, cfg)
    scale = max(float(np.max(np.abs(g))) for g in res["sweep"][1].values())
    gd = max(float(np.max(np.abs(res["ut"][1][k] - res["sweep"][1][k]))) for k in res["sweep"][1])
    print(f"loss sweep {res['sweep'][0]!r} ut {res['ut'][0]!r}; gradients differ by {gd / scale:.1e} of their scale")
    times = {"sweep": [], "ut": []}
    for r in range(rounds):
        for form in ("sweep", "ut") if r % 2 == 0 else ("ut", "sweep"):
            FS.KEY_WRITES = form
            t = time.perf_counter()
            FM.loss_and_grads(params, tokens, cfg)
            times[form].append(time.perf_counter() - t)
        print(r, {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratios = [u / s for u, s in zip(times["ut"], times["sweep"], strict=True)]
    print(f"median: sweep {med['sweep']:.3f} s, ut {med['ut']:.3f} s, ut / sweep {med['ut'] / med['sweep']:.3f}; "
          f"per-round ratios median {np.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
    if FM.GROUPS == 1:
        for form in ("sweep", "ut"):
            FS.KEY_WRITES = form
            prof = cProfile.Profile()
            prof.enable()
            FM.loss_and_grads(params, tokens, cfg)
            prof.disable()
            print(f"cProfile {form}: {pstats.Stats(prof).total_calls} calls per step")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15, sys.argv[2] if len(sys.argv) > 2 else "hope-small")
