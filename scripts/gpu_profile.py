"""Where a GPU training step's time goes (run on a GPU machine; prints a short report).

SPEC: SPEC.md#fast-gpu. The GPU port runs the reference's code over CuPy, so a step is many small
kernel launches issued from Python. This script times one ``loss_and_grads`` of a preset on the
GPU (after a warm-up), profiles a second one with cProfile (host-side time per function, the
launch overhead's breakdown), and times the per-call cost of the operations the reference uses
most (``einsum``, ``@``, an element-wise op) at that model's sizes, synchronised.

    python scripts/gpu_profile.py [PRESET] [BATCH] [SEQ]
    (NL_GPU_KERNELS=0: without the custom kernels; NL_PROFILE=0: the step time only)
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

import numpy as np


def main() -> int:
    preset = sys.argv[1] if len(sys.argv) > 1 else "hope-small"
    B = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    T = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    from nlref import config
    from nlref.fast.gpu import model as G

    cp = G.xp()
    ns = G._ns()
    print(f"einsum: {type(ns.xp.einsum).__name__}; selfmod scans: "
          f"{'kernels' if hasattr(ns.selfmod.suffix_products, '__self__') else 'the reference loops'}")
    cfg = config.preset(preset)
    params = G.to_device(G.init_params(cfg, 0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1))
    for _ in range(2):
        G.loss_and_grads(params, tokens, cfg, as_numpy=False)
    G.synchronize()
    t0 = time.perf_counter()
    G.loss_and_grads(params, tokens, cfg, as_numpy=False)
    G.synchronize()
    dt = time.perf_counter() - t0
    print(f"{preset} batch {B}x{T}: one step {dt:.3f} s = {B * T / dt:.0f} tokens/s")
    if os.environ.get("NL_PROFILE") == "0":
        return 0
    prof = cProfile.Profile()
    prof.enable()
    G.loss_and_grads(params, tokens, cfg, as_numpy=False)
    G.synchronize()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    stats.print_stats(25)
    print("\n".join(out.getvalue().splitlines()[:45]))

    def per_call(fn, n=200):
        fn()
        cp.cuda.Device().synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        cp.cuda.Device().synchronize()
        return (time.perf_counter() - t) / n * 1e6

    rng = np.random.default_rng(1)
    a, k, m = (cp.asarray(rng.standard_normal(s).astype(np.float32))
               for s in ((B, 8, 16, 32, 64), (B, 8, 16, 32), (B, 8, 32, 32)))
    rows = [
        ("einsum bhnvk,bhnv->bhnk (namespace)", lambda: ns.xp.einsum("bhnvk,bhnv->bhnk", a, k)),
        ("einsum bhnd,bhnm->bhndm (namespace)", lambda: ns.xp.einsum("bhnd,bhnm->bhndm", k, k)),
        ("matmul (B,8,32,32)@(B,8,32,32)", lambda: m @ m),
        ("multiply (B,8,16,32,64)", lambda: a * a),
        ("sum axis -1 (B,8,16,32,64)", lambda: a.sum(axis=-1)),
        ("exp (B,8,16,32)", lambda: cp.exp(k)),
    ]
    for name, fn in rows:
        print(f"per call {name:<34} {per_call(fn):8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
