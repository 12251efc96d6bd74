"""``nested-learning bench``: training-step and streaming-decode timings per backend, in one run.

SPEC: SPEC.md#fast-cpu (what is measured and how). Every number of one run comes from the same
machine and process, with the same BLAS thread limit for every backend (``NL_CPU_BLAS_THREADS``,
default 1: the CPU port's setting, applied to the reference too so the ratio compares code, not
thread settings).

- training step: ``loss_and_grads`` + one AdamW update (reference/optimizers.py) on a batch of
  random bytes; the first call is timed on its own (for the CPU port it includes Numba's
  compilation or cache load), then ``repeats`` steps whose median gives tokens/s;
- achieved GFLOP/s: a model-FLOP estimate (6 x matmul parameters x tokens, plus 6 T^2 D per layer
  and sequence for causal attention; the memory layers' inner products and the in-context CMS
  passes are NOT counted, so for hope families this understates the work) over the step time,
  and its fraction of the machine's matrix-product rate measured at the start of the run
  (a 512^3 product in the run's dtype under the same thread limit);
- streaming decode: a batch-1 context of ``context`` random tokens fed through ``forward`` in
  pieces of ``PREFILL_PIECE`` tokens carrying the streaming state (the same state one call would
  produce; pieces bound the prefill's temporaries), then ``DECODE_WARMUP`` untimed tokens, then
  ``decode_tokens`` single-token ``forward`` calls carrying the state, each timed: the median and
  the mean per token (the mean includes the in-context CMS writes that fall every ``period``
  tokens; the median mostly does not), and the state's size in bytes after the decode (O(1) in
  the context for the memory families, the KV cache for attention; measured after the decode so
  that every context has been through several calls: from its second call on, a state also holds
  the memory states at the start of the current chunk);
- a context is skipped, with its reason, when its prefill is predicted to take longer than
  ``prefill_seconds`` (default ``PREFILL_BUDGET`` x ``max_seconds``; predicted from the previous
  context's prefill rate, linear in the context for the memory families and quadratic for
  attention; from the training step's tokens/s for the first), when a prefill overruns twice that,
  and for attention families beyond ``ATTENTION_MAX_CONTEXT``
  tokens (their KV cache and per-token cost grow with the context: that is not a flat decode);
- a (preset, backend) whose first step took longer than ``max_seconds`` reports that first call
  as its step time (marked ``*``; no further step and no decode is run).

``startup_times`` (``python -m nested_learning.bench startup [PRESET]``) measures the cached
compile: two fresh Python processes, one after the other, with the same ``NUMBA_CACHE_DIR`` (a new
empty directory unless given), each timed from its launch to the end of its first CPU-port training
step at batch 4 x 256 (imports, parameters, compile or cache load, the step).

``--backend torch`` times ``torch_model`` (PyTorch eager on CPU, the ``oracle`` extra; gradients
by autograd) under ``torch.set_num_threads`` = the same thread limit; its gradients come back as
NumPy and take the same AdamW update (reference/optimizers.py) as every other backend. Without
torch the row says so.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import time

import numpy as np

DEFAULT_PRESETS = ("transformer-tiny", "hope-attention-tiny", "titans-tiny", "hope-tiny", "transformer-small",
                   "hope-attention-small", "titans-small", "hope-small")


def _modules(backend: str):
    if backend == "reference":
        from .reference import model
    elif backend == "cpu":
        from .fast.cpu import model
    elif backend == "torch":
        from . import torch_model as model  # ImportError naming the oracle extra without torch

        model.torch.set_num_threads(_blas_threads())  # the run's thread limit, as for BLAS
    else:
        raise ValueError(f"backend {backend!r} is not implemented (choose reference, cpu or torch)")
    return model


def _blas_threads() -> int:
    return int(os.environ.get("NL_CPU_BLAS_THREADS", "1"))


def matmul_gflops(dtype: str, n: int = 512, reps: int = 10) -> float:
    """The machine's matrix-product rate (GFLOP/s) in ``dtype`` under the run's BLAS limit."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    with threadpool_limits(limits=_blas_threads(), user_api="blas"):
        a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def model_flops(cfg, B: int, T: int) -> float:
    """Forward + backward FLOPs estimate of one step (see the module docstring)."""
    from .reference import model as ref

    n_matmul = sum(int(np.prod(s)) for k, s in ref.param_shapes(cfg).items()
                   if len(s) >= 2 and not k.startswith("embed."))
    flops = 6.0 * n_matmul * B * T
    if cfg.family in ("transformer", "hope-attention"):
        flops += 6.0 * cfg.n_layers * B * T * T * cfg.d_model
    return flops


PREFILL_PIECE = 1024  # tokens per prefill call
DECODE_WARMUP = 2  # untimed decode tokens before the timed ones
ATTENTION_MAX_CONTEXT = 8192
PREFILL_BUDGET = 3.0  # a context's prefill may take this many times --max-seconds (64K tokens of hope-small on
# the CPU port take ~75 s: the flat-decode measurement must fit the default budget of a 60 s run)


def _time_steps(model, opt, params, tokens, cfg, repeats: int, max_seconds: float):
    """(first call s, median step s, steps timed); a first call over ``max_seconds`` is the step
    time itself (0 steps timed)."""
    state = opt.init(params)
    t = time.perf_counter()
    _, grads = model.loss_and_grads(params, tokens, cfg)
    params, state = opt.update(params, grads, state)
    first = time.perf_counter() - t
    if first > max_seconds:
        return first, first, 0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _, grads = model.loss_and_grads(params, tokens, cfg)
        params, state = opt.update(params, grads, state)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), repeats


def state_bytes(state) -> int:
    """Bytes held by the arrays (NumPy or torch) of a streaming state."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    n = getattr(state, "nbytes", None)
    return int(n) if isinstance(n, (int, np.integer)) else 0


def _time_decode(model, params, cfg, context: int, n_tokens: int, abort_after: float = float("inf"),
                 piece: int = PREFILL_PIECE):
    """Prefill ``context`` tokens in pieces, then time ``n_tokens`` decode steps (batch 1).

    Returns a dict (prefill_s, median_s, mean_s, state_bytes), or None when the prefill ran past
    ``abort_after`` seconds."""
    rng = np.random.default_rng(1)
    state = None
    t0 = time.perf_counter()
    done = 0
    while done < context:
        n = min(piece, context - done)
        _, state = model.forward(params, rng.integers(0, cfg.vocab_size, size=(1, n)), cfg, state)
        done += n
        if time.perf_counter() - t0 > abort_after and done < context:
            return None
    prefill = time.perf_counter() - t0
    gc.collect()  # the prefill's temporaries are freed before decode is timed
    for _ in range(DECODE_WARMUP):
        _, state = model.forward(params, rng.integers(0, cfg.vocab_size, size=(1, 1)), cfg, state)
    times = []
    for _ in range(n_tokens):
        tok = rng.integers(0, cfg.vocab_size, size=(1, 1))
        t = time.perf_counter()
        _, state = model.forward(params, tok, cfg, state)
        times.append(time.perf_counter() - t)
    size = state_bytes(state)
    return dict(prefill_s=prefill, median_s=float(np.median(times)), mean_s=float(np.mean(times)), state_bytes=size)


def _predict_prefill(cfg, c, last, tokens_per_s):
    """Predicted prefill seconds of context c from the last measured (context, seconds), else
    from the training step's tokens/s."""
    if last is None:
        return c / tokens_per_s
    c0, s0 = last
    power = 2 if cfg.family in ("transformer", "hope-attention") else 1
    return s0 * (c / c0) ** power


def run(presets=(), backends=(), batch_size=4, seq_len=256, dtype="float32", repeats=3, decode_contexts=(1024,),
        decode_tokens=8, max_seconds=60.0, json_out=None, echo=print, prefill_seconds=None) -> list[dict]:
    """Run the benchmark and print its table; returns the rows."""
    from threadpoolctl import threadpool_limits

    from . import config
    from .reference import optimizers

    presets = presets or DEFAULT_PRESETS
    if not backends:
        backends = ("reference", "cpu")
    decode_contexts = sorted(set(decode_contexts))
    if prefill_seconds is None:
        prefill_seconds = PREFILL_BUDGET * max_seconds
    cfgs = [dataclasses.replace(config.preset(p), dtype=dtype) for p in presets]  # ValueError names bad ones
    rate = matmul_gflops(dtype)
    echo(f"nested-learning bench  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} {platform.processor() or ''}"
         f" {os.cpu_count()} cores  python {platform.python_version()}  numpy {np.__version__}"
         f"  load {_load()}")
    echo(f"batch {batch_size} x {seq_len} tokens, {dtype}, AdamW; BLAS threads {_blas_threads()} (every backend); "
         f"matrix-product rate {rate:.1f} GFLOP/s (512^3 {dtype})")
    echo(f"decode: batch 1, context prefilled in pieces of {PREFILL_PIECE}, {decode_tokens} timed tokens after "
         f"{DECODE_WARMUP} warm-up; median (mean) ms per token")
    rows = []
    header = (f"{'preset':<22} {'backend':<9} {'tokens/s':>9} {'vs ref':>7} {'GFLOP/s':>8} {'of peak':>7} "
              f"{'first call s':>12} " + " ".join(f"{'decode@' + _ctx(c):>15}" for c in decode_contexts))
    echo(header)
    for cfg in cfgs:
        ref_tps = None
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch_size, seq_len))
        attention = cfg.family in ("transformer", "hope-attention")
        for backend in backends:
            row = {"preset": cfg.name, "backend": backend, "dtype": dtype, "batch": batch_size, "seq_len": seq_len}
            try:
                model = _modules(backend)
            except ImportError as exc:  # torch without the oracle extra
                row["status"] = f"not available: {exc}"
                echo(f"{cfg.name:<22} {backend:<9} {row['status']}")
                rows.append(row)
                continue
            params = model.init_params(cfg, 0)
            opt = optimizers.make("adamw", lr=1e-3)
            with threadpool_limits(limits=_blas_threads(), user_api="blas"):
                first, step, n = _time_steps(model, opt, params, tokens, cfg, repeats, max_seconds)
                tps = batch_size * seq_len / step
                gflops = model_flops(cfg, batch_size, seq_len) / step / 1e9
                row.update(first_call_s=first, step_s=step, steps_timed=n, tokens_per_s=tps, gflops=gflops,
                           of_peak=gflops / rate)
                if backend == "reference":
                    ref_tps = tps
                row["vs_reference"] = tps / ref_tps if ref_tps else None
                decode, skipped, last = {}, {}, None
                for c in decode_contexts:
                    decode[c] = None
                    if n == 0:
                        skipped[c] = f"first step over {max_seconds:g} s"
                        continue
                    if attention and c > ATTENTION_MAX_CONTEXT:
                        skipped[c] = f"attention beyond {ATTENTION_MAX_CONTEXT} tokens"
                        continue
                    predicted = _predict_prefill(cfg, c, last, tps)
                    if predicted > prefill_seconds:
                        skipped[c] = f"prefill predicted {predicted:.0f} s > {prefill_seconds:g} s"
                        continue
                    res = _time_decode(model, params, cfg, c, decode_tokens, abort_after=2 * prefill_seconds)
                    if res is None:
                        skipped[c] = f"prefill over {2 * prefill_seconds:g} s"
                        continue
                    decode[c] = res
                    last = (c, res["prefill_s"])
                    row[f"prefill_{c}_s"] = res["prefill_s"]
                row["decode_s_per_token"] = {str(c): (v["median_s"] if v else None) for c, v in decode.items()}
                row["decode_mean_s_per_token"] = {str(c): (v["mean_s"] if v else None) for c, v in decode.items()}
                row["decode_state_bytes"] = {str(c): (v["state_bytes"] if v else None) for c, v in decode.items()}
                if skipped:
                    row["decode_skipped"] = {str(c): why for c, why in skipped.items()}
            ratio = f"{row['vs_reference']:>6.1f}x" if row["vs_reference"] else f"{'-':>7}"
            dec = " ".join(f"{_fmt_decode(v):>15}" for v in decode.values())
            mark = "*" if n == 0 else " "
            echo(f"{cfg.name:<22} {backend:<9} {tps:>8.0f}{mark} {ratio} {gflops:>8.2f} {100 * gflops / rate:>6.1f}% "
                 f"{first:>12.2f} {dec}")
            rows.append(row)
    if any(r.get("steps_timed") == 0 for r in rows):
        echo(f"* first step over {max_seconds:g} s: its time is the step time (no further step, no decode)")
    notes = [f"{r['preset']} {r['backend']} @{_ctx(int(c))}: {why}" for r in rows
             for c, why in r.get("decode_skipped", {}).items() if not why.startswith(("attention", "first step"))]
    if any(why.startswith("attention") for r in rows for why in r.get("decode_skipped", {}).values()):
        notes.insert(0, f"attention families beyond {ATTENTION_MAX_CONTEXT} tokens (the KV cache grows with the context)")
    if notes:
        echo("decode skipped: " + "; ".join(notes))
    if json_out:
        with open(json_out, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return rows


def _ctx(c: int) -> str:
    return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def _fmt_decode(v) -> str:
    return "skipped" if v is None else f"{1e3 * v['median_s']:.2f} ({1e3 * v['mean_s']:.2f})"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


_STARTUP_SCRIPT = """
import time
t0 = time.perf_counter()
import numpy as np
from nested_learning import config
from nested_learning.fast.cpu import model
from nested_learning.reference import optimizers
cfg = config.preset({preset!r})
params = model.init_params(cfg, 0)
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=({batch}, {seq_len}))
opt = optimizers.make("adamw", lr=1e-3)
t1 = time.perf_counter()
_, grads = model.loss_and_grads(params, tokens, cfg)
params, st = opt.update(params, grads, opt.init(params))
t2 = time.perf_counter()
_, grads = model.loss_and_grads(params, tokens, cfg)
params, st = opt.update(params, grads, st)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def startup_times(preset: str = "hope-small", runs: int = 2, cache_dir=None, batch_size: int = 4, seq_len: int = 256,
                  echo=print) -> list[dict]:
    """Cached compile: ``runs`` fresh processes in turn with one ``NUMBA_CACHE_DIR`` (a new empty
    directory unless given), each timed from launch to the end of its first CPU-port training
    step. Per run: ``to_first_step_s`` (launch -> first step done, wall clock of the parent),
    ``imports_s`` (imports and parameters, inside the child), ``first_step_s`` (first
    ``loss_and_grads`` + AdamW: compile or cache load included), ``warm_step_s`` (the second step)."""
    import subprocess
    import sys
    import tempfile

    from . import config

    config.preset(preset)  # ValueError naming the known presets
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nl-numba-cache-")
        cache_dir = tmp.name
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    code = _STARTUP_SCRIPT.format(preset=preset, batch=batch_size, seq_len=seq_len)
    out = []
    try:
        for i in range(runs):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if res.returncode:
                raise RuntimeError(f"startup run {i + 1} failed:\n{res.stderr}")
            imports, first, warm = (float(x) for x in res.stdout.split()[-3:])
            row = dict(preset=preset, run=i + 1, to_first_step_s=wall - warm, imports_s=imports, first_step_s=first,
                       warm_step_s=warm, numba_cache_dir=str(cache_dir))
            out.append(row)
            echo(f"process {i + 1} ({'empty' if i == 0 and tmp else 'same'} NUMBA_CACHE_DIR): launch -> first step "
                 f"done {row['to_first_step_s']:.2f} s (imports + params {imports:.2f} s, first step {first:.2f} s; "
                 f"a warm step takes {warm:.2f} s; start-up overhead {row['to_first_step_s'] - warm:.2f} s)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


if __name__ == "__main__":  # python -m nested_learning.bench startup [PRESET]
    import sys

    if len(sys.argv) >= 2 and sys.argv[1] == "startup":
        startup_times(sys.argv[2] if len(sys.argv) > 2 else "hope-small")
    else:
        sys.exit("usage: python -m nested_learning.bench startup [PRESET]")
