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
- streaming decode: a batch-1 prefill of ``context`` tokens through ``forward``, then
  ``decode_tokens`` single-token ``forward`` calls carrying the state; the median per token
  (skipped for the reference beyond 4K tokens and for attention families beyond 8K, whose
  one-call prefill materialises a context x context score matrix).

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


def _time_steps(model, opt, params, tokens, cfg, repeats: int, max_seconds: float):
    """(first call s, median step s, steps timed)."""
    state = opt.init(params)
    t = time.perf_counter()
    _, grads = model.loss_and_grads(params, tokens, cfg)
    opt.update(params, grads, state)
    first = time.perf_counter() - t
    n = 1 if first > max_seconds else repeats
    times = []
    for _ in range(n):
        t = time.perf_counter()
        _, grads = model.loss_and_grads(params, tokens, cfg)
        params, state = opt.update(params, grads, state)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), n


def _time_decode(model, params, cfg, context: int, n_tokens: int):
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, cfg.vocab_size, size=(1, context))
    t = time.perf_counter()
    _, state = model.forward(params, prompt, cfg)
    prefill = time.perf_counter() - t
    gc.collect()  # the prefill's temporaries are freed before decode is timed
    times = []
    for _ in range(n_tokens):
        tok = rng.integers(0, cfg.vocab_size, size=(1, 1))
        t = time.perf_counter()
        _, state = model.forward(params, tok, cfg, state)
        times.append(time.perf_counter() - t)
    return prefill, float(np.median(times))


def run(presets=(), backends=(), batch_size=4, seq_len=256, dtype="float32", repeats=3, decode_contexts=(1024,),
        decode_tokens=8, max_seconds=60.0, json_out=None, echo=print) -> list[dict]:
    """Run the benchmark and print its table; returns the rows."""
    from threadpoolctl import threadpool_limits

    from . import config
    from .reference import optimizers

    presets = presets or DEFAULT_PRESETS
    if not backends:
        backends = ("reference", "cpu")
    cfgs = [dataclasses.replace(config.preset(p), dtype=dtype) for p in presets]  # ValueError names bad ones
    rate = matmul_gflops(dtype)
    echo(f"nested-learning bench  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} {platform.processor() or ''}"
         f" {os.cpu_count()} cores  python {platform.python_version()}  numpy {np.__version__}")
    echo(f"batch {batch_size} x {seq_len} tokens, {dtype}, AdamW; BLAS threads {_blas_threads()} (every backend); "
         f"matrix-product rate {rate:.1f} GFLOP/s (512^3 {dtype})")
    rows = []
    header = (f"{'preset':<22} {'backend':<9} {'tokens/s':>9} {'vs ref':>7} {'GFLOP/s':>8} {'of peak':>7} "
              f"{'first call s':>12} " + " ".join(f"{'decode@' + str(c):>12}" for c in decode_contexts))
    echo(header)
    for cfg in cfgs:
        ref_tps = None
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch_size, seq_len))
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
                decode = {}
                for c in decode_contexts:
                    attention = cfg.family in ("transformer", "hope-attention")
                    # the reference is too slow for long prefills; an attention prefill of c tokens
                    # builds a c x c score matrix per head (16 GiB at 64K), so those are skipped
                    if first > max_seconds or (backend == "reference" and c > 4096) or (attention and c > 8192):
                        decode[c] = None
                        continue
                    prefill, per_token = _time_decode(model, params, cfg, c, decode_tokens)
                    decode[c] = per_token
                    row[f"prefill_{c}_s"] = prefill
                row["decode_s_per_token"] = {str(c): v for c, v in decode.items()}
            ratio = f"{row['vs_reference']:>6.1f}x" if row["vs_reference"] else f"{'-':>7}"
            dec = " ".join(f"{(f'{1e3 * v:.2f} ms' if v is not None else 'skipped'):>12}" for v in decode.values())
            echo(f"{cfg.name:<22} {backend:<9} {tps:>9.0f} {ratio} {gflops:>8.2f} {100 * gflops / rate:>6.1f}% "
                 f"{first:>12.2f} {dec}")
            rows.append(row)
    if json_out:
        with open(json_out, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return rows
