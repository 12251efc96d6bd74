"""Cost growth: training tokens/s and peak memory against the sequence length and the batch size.

Paper: none (the measurements of the CPU-speed issue, items 3 and 6; arXiv 2512.24695v1).
SPEC.md#fast-cpu "Cost growth". ``nested-learning bench-growth`` runs it: every point (preset,
backend, batch B, sequence length T) in a fresh Python process, so that its peak memory is its own:

- ``tokens/s``: B T over the median of ``repeats`` training steps (``loss_and_grads`` + AdamW, as
  ``nested-learning bench``) after a small step (one sequence of at most 48 tokens: the kernels
  compile or load per type, not per shape) and one untimed full step;
- ``peak MB``: the process's peak resident memory (``bench.peak_rss_kib``: VmHWM) after the steps;
  ``base MB`` the same after the small step (interpreter, imports, kernels, parameters, optimizer
  state);
  ``KB/token`` = (peak - base) / (B T): what one step holds per token (activations, the backward's
  intermediates) — flat in T when the step's memory is linear in the sequence;
- the growth line per preset: each point's time per token over that of the batch-4, T = 256 point
  (1.00 = flat; the issue's target for the memory families is within 15 % from 256 to 4,096).

The CPU port runs with ``NL_CPU_WORKERS=thread`` here (one process holds the whole step, so its
peak is the step's; process workers would hold part of it in other processes) and its usual groups
(``NL_CPU_GROUPS``). BLAS is limited to one thread as in ``nested-learning bench``. A point whose
predicted time (from the previous point's rate) exceeds ``max_seconds`` is skipped with that
reason. Timings come from one shared machine: read ratios within one run, not absolute figures.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

SEQ_LENS = (64, 256, 1024, 4096)
BATCHES = (1, 4, 16)
BASE_T = 256


def point(preset: str, backend: str, batch: int, seq_len: int, repeats: int, dtype: str) -> dict:
    """One measurement, in this process (run by ``measure`` in a child): tokens/s, base and peak RSS."""
    import dataclasses

    import numpy as np
    from threadpoolctl import threadpool_limits

    from nlref import bench, config
    from nlref.fast.cpu import allocator

    allocator.tune()  # as the command line's processes (SPEC.md#fast-cpu, "The allocator")
    timed = bench._backend(backend, batch)  # nested-learning bench's backend and AdamW step
    cfg = dataclasses.replace(config.preset(preset), dtype=dtype)
    with threadpool_limits(limits=1, user_api="blas"):
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, seq_len + 1))
        # the kernels compile per type, not per shape: a small step loads (or compiles) them all
        # before the baseline, so the peak below is the measured steps' own memory
        step = timed.stepper(timed.params(cfg), tokens[:1, :min(seq_len, 48) + 1], cfg)
        t0 = time.perf_counter()
        step()
        timed.synchronize()
        first = time.perf_counter() - t0
        base = bench.peak_rss_kib()  # KiB
        step.tokens = timed.device_tokens(tokens)
        step()  # untimed: first use of this shape's buffers
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            timed.synchronize()
            times.append(time.perf_counter() - t0)
    peak = bench.peak_rss_kib()
    median = statistics.median(times)
    return {"preset": preset, "backend": backend, "batch": batch, "seq_len": seq_len, "dtype": dtype,
            "first_s": first, "step_s": median, "tokens_per_s": batch * seq_len / median,
            "base_mb": base / 1024, "peak_mb": peak / 1024, "kb_per_token": (peak - base) / (batch * seq_len)}


def measure(preset, backend, batch, seq_len, repeats, dtype, timeout: float) -> dict:
    """``point`` in a fresh process (its own peak memory); an error or a timeout is a row saying so."""
    env = {**os.environ, "NL_CPU_WORKERS": "thread"}
    code = ("import json, sys; from nlref.bench_growth import point; "
            "print(json.dumps(point(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), "
            "sys.argv[6])))")
    row = {"preset": preset, "backend": backend, "batch": batch, "seq_len": seq_len, "dtype": dtype}
    try:
        r = subprocess.run([sys.executable, "-c", code, preset, backend, str(batch), str(seq_len), str(repeats), dtype],
                           capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "skipped": f"over the {timeout:.0f} s limit of one point"}
    if r.returncode != 0:
        return {**row, "error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def plan(seq_lens=SEQ_LENS, batches=BATCHES, base_t=BASE_T) -> list[tuple[int, int]]:
    """The (batch, seq_len) points: every length at batch 4, then every batch at ``base_t``."""
    pts = [(4, t) for t in seq_lens] + [(b, base_t) for b in batches]
    out = []
    for p in pts:
        if p not in out:
            out.append(p)
    return out


def run(presets=("hope-small", "titans-small", "transformer-small"), backend="cpu", seq_lens=SEQ_LENS,
        batches=BATCHES, repeats=2, dtype="float32", max_seconds=120.0, echo=print, json_out=None) -> list[dict]:
    """Every point of ``plan`` for every preset; rows printed as they end (and written to ``json_out``)."""
    rows = []
    echo(f"bench-growth: backend {backend}, {dtype}, AdamW step, {repeats} timed steps per point after one untimed; "
         f"each point a fresh process (NL_CPU_WORKERS=thread, BLAS 1 thread); {os.cpu_count()} cores, load "
         f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    echo(f"{'preset':<20} {'B':>3} {'T':>5} {'tokens/s':>9} {'base MB':>8} {'peak MB':>8} {'KB/token':>9}")
    for preset in presets:
        done, rate = [], None
        for batch, seq_len in plan(seq_lens, batches):
            predicted = None if rate is None else batch * seq_len * (1 + repeats) / rate
            if predicted is not None and predicted > max_seconds:
                row = {"preset": preset, "backend": backend, "batch": batch, "seq_len": seq_len, "dtype": dtype,
                       "skipped": f"predicted {predicted:.0f} s > --max-seconds {max_seconds:g}"}
            else:
                row = measure(preset, backend, batch, seq_len, repeats, dtype, timeout=max(60.0, 3 * max_seconds))
                if "tokens_per_s" in row:
                    rate = row["tokens_per_s"]
            done.append(row)
            rows.append(row)
            echo(_fmt(row))
            if json_out:
                with open(json_out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        echo(_growth_line(preset, done))
    return rows


def cost_vs_base(rows: list[dict]) -> dict[tuple[int, int], float]:
    """{(batch, seq_len): time per token over the batch-4, T = ``BASE_T`` point's} for the measured rows
    of one preset (1.00 = flat)."""
    base = next((r for r in rows if r["batch"] == 4 and r["seq_len"] == BASE_T and "tokens_per_s" in r), None)
    if base is None:
        return {}
    return {(r["batch"], r["seq_len"]): base["tokens_per_s"] / r["tokens_per_s"] for r in rows if "tokens_per_s" in r}


def _growth_line(preset: str, rows: list[dict]) -> str:
    cost = cost_vs_base(rows)
    if not cost:
        return f"{preset}: no batch-4 T={BASE_T} point measured, no cost ratios"
    by_t = ", ".join(f"T={t} {c:.2f}" for (b, t), c in sorted(cost.items()) if b == 4)
    by_b = ", ".join(f"B={b} {c:.2f}" for (b, t), c in sorted(cost.items()) if t == BASE_T and b != 4)
    return f"{preset}: time per token vs B=4 T={BASE_T}: {by_t}" + (f"; {by_b}" if by_b else "")


def _fmt(r: dict) -> str:
    head = f"{r['preset']:<20} {r['batch']:>3} {r['seq_len']:>5}"
    if "skipped" in r or "error" in r:
        return head + "  " + ("skipped: " + r["skipped"] if "skipped" in r else "error: " + r["error"])
    return head + f" {r['tokens_per_s']:>9,.0f} {r['base_mb']:>8.0f} {r['peak_mb']:>8.0f} {r['kb_per_token']:>9.1f}"
