"""The data-parallel benchmark: training tokens/s on 1, 2, 4 ranks and the all-reduce's share of a step.

Paper: none (run machinery; arXiv 2512.24695v1). SPEC.md#distributed. ``nested-learning bench-mpi``
runs it: one ``mpiexec -n N`` per rank count, all in one run, the rows printed side by side with
their ratio to the first. Each rank times its own share of the global batch (forward + backward),
the wait for the slowest rank (a barrier: the load imbalance), the fused all-reduce itself, and
the optimizer step; rank 0 reports the medians. On one machine the ranks share its cores, so more
ranks than cores only adds processes; the row says how many cores there are.

The planning table (``plan``) needs no MPI: the bytes one step all-reduces for each preset, and
the time a ring all-reduce of them takes at typical interconnect bandwidths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LINKS = (("1 GbE", 0.125e9), ("10 GbE", 1.25e9), ("100 Gb/s InfiniBand", 12.5e9), ("NVLink (~300 GB/s)", 300e9))
"""(name, bytes per second per direction) of typical links, for ``plan``."""


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def worker(preset: str, backend: str, batch_size: int, seq_len: int, dtype: str, steps: int) -> dict | None:
    """Run under mpiexec: ``steps`` timed training steps (after one warm-up) of the global batch
    split over the world; rank 0 returns the medians (seconds), the other ranks None."""
    import numpy as np

    from nlref import backends, config, distributed, training

    w = distributed.world()
    be = backends.get(backend)
    mc = config.from_dict({**config.preset(preset).to_dict(), "vocab_size": 256, "dtype": dtype})
    params = be.to_device(be.model.init_params(mc, seed=0))
    opt = be.optimizers().make("adamw", lr=1e-3)
    state = opt.init(params)
    rng = np.random.default_rng(0)
    mine = distributed.shares(batch_size, w.size)[w.rank]
    rows = []
    for i in range(steps + 1):
        tokens = rng.integers(0, 256, (batch_size, seq_len + 1))
        t0 = time.perf_counter()
        loss, grads = be.loss_and_grads(params, tokens[mine], mc)
        be.synchronize()
        t1 = time.perf_counter()
        if w.size > 1:
            w.comm.Barrier()
        t2 = time.perf_counter()
        if w.size > 1:
            grads, loss = distributed.allreduce(w, grads, float(loss), (mine.stop - mine.start) / batch_size,
                                                distributed.batch_digest(tokens))
        be.synchronize()
        t3 = time.perf_counter()
        params, state = opt.update(params, grads, state)
        be.synchronize()
        t4 = time.perf_counter()
        if i:  # the first step compiles / warms caches
            rows.append((t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3))
    n_grad = sum(int(x.size) for x in training.tree_leaves(grads))
    if not w.is_root:
        return None
    cols = list(zip(*rows, strict=True))
    step, compute, wait, reduce, update = (_median(c) for c in cols)
    return {"ranks": w.size, "preset": preset, "backend": backend, "batch": batch_size, "seq_len": seq_len,
            "dtype": dtype, "step_s": step, "compute_s": compute, "wait_s": wait, "allreduce_s": reduce,
            "update_s": update, "tokens_per_s": batch_size * seq_len / step,
            "grad_bytes": n_grad * np.dtype(dtype).itemsize, "library": w.library}


def _mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    import shutil

    found = shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("no mpiexec beside the interpreter or on PATH: pip install 'nested-learning-reference[mpi]'")
    return found


def run(ranks=(1, 2, 4), preset: str = "hope-tiny", backend: str = "cpu", batch_size: int = 8, seq_len: int = 128,
        dtype: str = "float32", steps: int = 5, echo: Callable[[str], None] = print, timeout: float = 600) -> list[dict]:
    """One ``mpiexec -n N`` per entry of ``ranks``; print the rows side by side; return them."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise RuntimeError("mpi4py is not installed: pip install 'nested-learning-reference[mpi]'") from None
    for n in ranks:
        if batch_size < n:
            raise ValueError(f"--batch-size {batch_size} cannot be split over {n} ranks: give at least {max(ranks)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = dict(os.environ)
    env.setdefault("NL_CPU_WORKERS", "process")  # as the command line runs the CPU port
    echo(f"data-parallel training step: {preset}, {backend} backend, global batch {batch_size} x {seq_len} {dtype}, "
         f"median of {steps} steps; {cores} cores on this machine, shared by the ranks "
         f"(NL_CPU_GROUPS={env.get('NL_CPU_GROUPS', '2')} groups per rank on {env['NL_CPU_WORKERS']} workers)")
    rows = []
    for n in ranks:
        spec = json.dumps([preset, backend, batch_size, seq_len, dtype, steps])
        r = subprocess.run([_mpiexec(), "-n", str(n), sys.executable, "-m", "nlref.bench_mpi", spec],
                           capture_output=True, text=True, env=env, timeout=timeout)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not line:
            raise RuntimeError(f"mpiexec -n {n} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        rows.append(json.loads(line[-1]))
    base = rows[0]["tokens_per_s"]
    echo(f"{'ranks':>5} {'tokens/s':>9} {'x':>5} {'step ms':>8} {'compute':>8} {'wait':>7} {'all-red':>8} "
         f"{'share':>6} {'update':>7}  gradient")
    for r in rows:
        echo(f"{r['ranks']:>5} {r['tokens_per_s']:>9,.0f} {r['tokens_per_s'] / base:>5.2f} {1e3 * r['step_s']:>8.1f} "
             f"{1e3 * r['compute_s']:>8.1f} {1e3 * r['wait_s']:>7.1f} {1e3 * r['allreduce_s']:>8.2f} "
             f"{r['allreduce_s'] / r['step_s']:>6.1%} {1e3 * r['update_s']:>7.1f}  {r['grad_bytes'] / 1e6:.2f} MB")
    echo("compute: this rank's share of the batch (forward + backward); wait: for the slowest rank; all-red: the "
         "fused all-reduce alone; share: all-reduce / step")
    return rows


def plan(presets=None, dtype: str = "float32", echo: Callable[[str], None] = print) -> list[dict]:
    """The gradient bytes one step all-reduces per preset, and a ring all-reduce's time at ``LINKS``:
    each rank sends and receives 2 (N - 1) / N of the buffer (about twice its size for large N)."""
    import numpy as np

    from nlref import config
    from nlref.reference import model

    names = presets or [n for n in config.PRESETS if n.endswith(("-small", "-medium")) and "hope-small-" not in n]
    out = []
    echo(f"{'preset':<22} {'parameters':>11} {'gradient':>9}  " + "  ".join(f"{n:>20}" for n, _ in LINKS))
    for name in names:
        mc = config.preset(name)
        n = int(sum(int(np.prod(s)) for s in model.param_shapes(mc).values()))
        nbytes = n * np.dtype(dtype).itemsize
        times = [2 * nbytes / bw for _, bw in LINKS]
        out.append({"preset": name, "parameters": n, "grad_bytes": nbytes, "ring_allreduce_s": times})
        echo(f"{name:<22} {n:>11,} {nbytes / 1e6:>7.2f}MB  " + "  ".join(f"{1e3 * t:>18.3f}ms" for t in times))
    echo(f"({dtype} gradients; ring all-reduce ~ 2 x gradient bytes / link bandwidth per step, latency not counted)")
    return out


if __name__ == "__main__":
    result = worker(*json.loads(sys.argv[1]))
    if result is not None:
        print(json.dumps(result), flush=True)
