"""Bitwise comparison of reference/selfmod.py with an older version of it (issue 15 part 3).

Usage: python scripts/check_selfmod_bitwise.py OLD_DIR [--cases N] [--seed S]

OLD_DIR is a checkout of an earlier commit (``git worktree add /tmp/old_selfmod <rev>``). Its
``reference/selfmod.py`` is loaded by path as the module ``nlref.reference._old_selfmod``,
so its relative imports (primitives, mlp_memory) resolve to this checkout's siblings: the
comparison isolates the self-modifying layer itself. For N random cases (default 40), each in
float32 and float64, it runs both versions' ``forward`` or ``forward_loop`` (drawn) and
``backward`` with an upstream gradient and a state adjoint (none, partial or dense; drawn) and
compares with ``np.array_equal`` (NaN equal to NaN: a drawn case may overflow): the output, every key of the returned state, the cache entries
the tests read (k, q, v, o, eta, alpha, ep, vhat), dx, every parameter gradient and every key of
dstate0; and the pieces ``write``, ``write_chunk`` and ``write_chunk_backward`` directly. The
configurations vary every switch of SelfModConfig (memory kind, momentum, adaptive_q,
normalize_v, single_shrink, stop_grad_writes, layernorm, act, chunk sizes, heads), T, B and a
state from a previous call. Exits 1 on any difference (each one printed), 0 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import pathlib
import sys

import numpy as np

from nlref.reference import selfmod as NEW


def load_old(old_dir: str):
    path = pathlib.Path(old_dir) / "reference" / "selfmod.py"
    if not path.is_file():
        raise SystemExit(f"OLD_DIR: no reference/selfmod.py under {old_dir!r}")
    name = "nlref.reference._old_selfmod"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "nlref.reference"
    sys.modules[name] = mod  # before exec: the dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def draw_config(rng) -> tuple[dict, dict]:
    memory = str(rng.choice(["mlp", "matrix"]))
    H = int(rng.integers(1, 3))
    kw = {
        "d_model": H * int(rng.integers(2, 4)),
        "n_heads": H,
        "memory": memory,
        "hidden": int(rng.choice([0, 2, 3])),
        "act": str(rng.choice(["gelu", "silu"])),
        "layernorm": memory == "mlp" and bool(rng.integers(2)),
        "chunk_memory": int(rng.integers(1, 6)),
        "chunk_other": int(rng.integers(1, 6)),
        "momentum": bool(rng.integers(2)),
        "adaptive_q": bool(rng.integers(2)),
        "normalize_v": bool(rng.integers(2)),
        "single_shrink": memory == "matrix" and bool(rng.integers(2)),
        "stop_grad_writes": bool(rng.random() < 0.3),
        "eta_max": float(rng.choice([0.1, 1.0])),
    }
    run = {
        "T": int(rng.integers(1, 10)),
        "B": int(rng.integers(1, 3)),
        "with_state": bool(rng.integers(2)),
        "loop": bool(rng.integers(2)),
        "dstate": str(rng.choice(["none", "partial", "dense"])),
    }
    return kw, run


def strong_params(mod, cfg, rng, dtype):
    """init_params with strong, remembered writes and noise (every path moves the output)."""
    p = mod.init_params(cfg, rng, dtype)
    p["b_eta"] = np.zeros_like(p["b_eta"])
    p["b_alpha"] = np.full_like(p["b_alpha"], 2.0)
    for key in list(p):
        if key.endswith(".b_beta"):
            p[key] = np.zeros_like(p[key])
    return {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(dtype) for k, v in p.items()}


class Report:
    def __init__(self):
        self.compared, self.diffs, self.worst = 0, [], {}

    def same(self, where: str, a, b):
        self.compared += 1
        if isinstance(a, dict) or isinstance(b, dict):
            if set(a) != set(b):
                self.diffs.append(f"{where}: keys {sorted(set(a) ^ set(b))} differ")
                return
            for key in a:
                self.same(f"{where}[{key!r}]", a[key], b[key])
            return
        if isinstance(a, tuple) or isinstance(b, tuple):
            if not (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)):
                self.diffs.append(f"{where}: {type(a).__name__} vs {type(b).__name__} (lengths differ?)")
                return
            for j, (u, w) in enumerate(zip(a, b, strict=True)):
                self.same(f"{where}[{j}]", u, w)
            return
        if a is None or b is None or not isinstance(a, np.ndarray):
            if not (a is None and b is None) and a != b:
                self.diffs.append(f"{where}: {a!r} != {b!r}")
            return
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
            if a.shape != b.shape or a.dtype != b.dtype:
                self.diffs.append(f"{where}: shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
                return
            err = float(np.max(np.abs(a - b)))
            rel = err / max(float(np.max(np.abs(a))), np.finfo(a.dtype).tiny)
            self.worst[a.dtype.name] = max(self.worst.get(a.dtype.name, 0.0), rel)
            self.diffs.append(f"{where}: not bitwise equal (max |diff| {err:.3g}, relative to max |old| {rel:.3g})")


def layer_case(rep: Report, old, i: int, kw: dict, run: dict, dtype, seed: int):
    rng = np.random.default_rng([seed, i, np.dtype(dtype).itemsize])
    cfg_new, cfg_old = NEW.SelfModConfig(**kw), old.SelfModConfig(**kw)
    params = strong_params(NEW, cfg_new, rng, dtype)
    B, T, D = run["B"], run["T"], kw["d_model"]
    x = rng.standard_normal((B, T, D)).astype(dtype)
    state = None
    if run["with_state"]:  # a state from a previous call, inside a chunk of either clock
        state = old.forward(rng.standard_normal((B, int(rng.integers(1, 5)), D)).astype(dtype), params, cfg_old)[2]
    name = "forward_loop" if run["loop"] else "forward"
    yo, co, so = getattr(old, name)(x, params, cfg_old, copy.deepcopy(state))
    yn, cn, sn = getattr(NEW, name)(x, params, cfg_new, copy.deepcopy(state))
    where = f"case {i} {np.dtype(dtype).name} {name}"
    rep.same(f"{where} y", yo, yn)
    rep.same(f"{where} state", so, sn)
    for key in ("k", "q", "v", "o", "eta", "alpha", "ep", "vhat"):
        rep.same(f"{where} cache[{key!r}]", co[key], cn[key])
    dy = rng.standard_normal(yo.shape).astype(dtype)
    dstate = None
    arrays = [k for k, v in so.items() if isinstance(v, np.ndarray)]
    if run["dstate"] != "none":
        keep = arrays if run["dstate"] == "dense" else [k for k in arrays if rng.random() < 0.5]
        dstate = {k: rng.standard_normal(so[k].shape).astype(dtype) for k in keep}
    go = old.backward(dy, co, copy.deepcopy(dstate))
    gn = NEW.backward(dy, cn, copy.deepcopy(dstate))
    for label, a, b in zip(("dx", "dparams", "dstate0"), go, gn, strict=True):
        rep.same(f"{where} {label}", a, b)


def _new_style(fn) -> bool:
    """write_chunk_backward(dP, dS, cache) (new) or (dP, dS, Pw, S, G, k, ep, alpha, beta, keyside)."""
    return len(inspect.signature(fn).parameters) == 3


def write_case(rep: Report, old, i: int, dtype, seed: int):
    rng = np.random.default_rng([seed, 1000 + i, np.dtype(dtype).itemsize])
    B, H, n = int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(1, 7))
    keyside, momentum = bool(rng.integers(2)), bool(rng.integers(2))
    a, b = int(rng.integers(2, 4)), int(rng.integers(2, 4))  # the weight (a, b); the key k (b,)
    P0, S0 = (rng.standard_normal((B, H, a, b)).astype(dtype) for _ in range(2))
    G = rng.standard_normal((B, H, n, a, b)).astype(dtype)
    k = rng.standard_normal((B, H, n, b)).astype(dtype)
    ep, alpha = rng.uniform(0, 0.5, (B, H, n)).astype(dtype), rng.uniform(0.5, 1, (B, H, n)).astype(dtype)
    beta = rng.uniform(0.2, 0.9, H).astype(dtype) if momentum else None
    where = f"write case {i} {np.dtype(dtype).name} keyside={keyside} momentum={momentum} n={n}"
    Po, So, Pn, Sn = P0, S0, P0, S0
    for j in range(n):
        args = (G[:, :, j], k[:, :, j], ep[:, :, j], alpha[:, :, j], beta, keyside)
        Po, So = old.write(Po, So, *args)[:2]
        Pn, Sn = NEW.write(Pn, Sn, *args)[:2]
        rep.same(f"{where} write token {j}", (Po, So), (Pn, Sn))
    out_o = old.write_chunk(P0, S0, G, k, ep, alpha, beta, keyside)
    out_n = NEW.write_chunk(P0, S0, G, k, ep, alpha, beta, keyside)
    rep.same(f"{where} write_chunk", out_o[:2], out_n[:2])
    dP, dS = rng.standard_normal(P0.shape).astype(dtype), rng.standard_normal(P0.shape).astype(dtype)
    args = (P0, S0, G, k, ep, alpha, beta, keyside)
    bo = old.write_chunk_backward(dP, dS, out_o[2]) if _new_style(old.write_chunk_backward) else \
        old.write_chunk_backward(dP, dS, *args)
    bn = NEW.write_chunk_backward(dP, dS, out_n[2]) if _new_style(NEW.write_chunk_backward) else \
        NEW.write_chunk_backward(dP, dS, *args)
    rep.same(f"{where} write_chunk_backward", tuple(bo), tuple(bn))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old_dir", metavar="OLD_DIR", help="a checkout of the earlier commit (its root)")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    old = load_old(args.old_dir)
    rep = Report()
    rng = np.random.default_rng(args.seed)
    seen: dict[str, set] = {}
    for i in range(args.cases):
        kw, run = draw_config(rng)
        for key, val in {**kw, **run}.items():
            seen.setdefault(key, set()).add(val)
        for dtype in (np.float32, np.float64):
            layer_case(rep, old, i, kw, run, dtype, args.seed)
            write_case(rep, old, i, dtype, args.seed)
    for d in rep.diffs:
        print("DIFF", d)
    varied = ", ".join(f"{k}: {sorted(v, key=str)}" for k, v in seen.items() if len(v) > 1)
    print(f"varied: {varied}")
    print(f"{args.cases} cases x 2 dtypes (float32, float64): {rep.compared} comparisons, {len(rep.diffs)} differences")
    if rep.diffs:
        print("NOT bitwise identical; worst relative difference per dtype:", rep.worst)
        return 1
    print(f"bitwise identical on {args.cases} cases (x 2 dtypes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
