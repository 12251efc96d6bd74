"""Measure the errors the rows of tests/tolerances.py bound, and check each row against its measurement.

SPEC: tests/tolerances.py's docstring (a row changes only with a new measurement). For each
(dtype, kind) row this reproduces the measurement its comment describes, on the tests' own cases
(tests/strategies.py, tests/cases_fast.py, tests/cases_reference.py, tests/vmath_oracle.py), and
prints one table: the row, what was measured, the worst relative error, the row's bound and the
headroom (bound / worst). Exit status 1 if a measured worst exceeds its bound, else 0. Rows that
cannot be measured here (no GPU; no torch) say why and do not count as failures.

Run from the repository root:
    python scripts/calibrate_tolerances.py            # every row, < 3 minutes on 2 cores
    python scripts/calibrate_tolerances.py --quick    # fewer draws per row (seconds)
    python scripts/calibrate_tolerances.py --rows float32:port,float64:rewrite
The draws are deterministic (hypothesis derandomized; fixed seeds), so a rerun prints the same table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tolerances import TOLERANCES, tol  # noqa: E402


class NotHere(Exception):
    """A row that cannot be measured on this machine (the reason is printed)."""


def rel(a, b) -> float:
    """The measure of tolerances.assert_close: max |a - b| / max(max |a|, max |b|, 1e-12)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), 1e-12)


def tree_rel(a, b) -> float:
    """The worst ``rel`` over the array leaves of two nested dicts / lists / tuples."""
    if isinstance(b, dict):
        return max((tree_rel(a[k], b[k]) for k in b), default=0.0)
    if isinstance(b, list | tuple):
        return max((tree_rel(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(b, np.ndarray):
        return rel(a, b)
    return 0.0


def leaves(tree, name=""):
    """(name, array) of every array leaf."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{name}[{k}]")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{name}[{i}]")
    elif isinstance(tree, np.ndarray):
        yield name, tree


def draws(strategy, n: int) -> list:
    """``n`` examples of ``strategy``, the same on every run (derandomized, no database)."""
    out: list = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(x):
        out.append(x)

    collect()
    return out


# ------------------------------------------------------------------------------------------------
# The measurements, one per row: each returns (worst, what was measured)
# ------------------------------------------------------------------------------------------------


def m_gradcheck(n):
    """Central differences (e = 1e-6) vs every hand-written gradient the reference registers
    (GRADCHECKS of reference/cases/<module>.py, the cases ``nested-learning check`` runs), ``n`` seeds each."""
    from nlref.cli import GRADCHECK_MODULES
    from nlref.reference.gradcheck import check_gradients

    worst, count = 0.0, 0
    for module_name in GRADCHECK_MODULES:
        module = importlib.import_module(f"nlref.reference.cases.{module_name}")
        for i, make in enumerate(module.GRADCHECKS.values()):
            if getattr(make, "method", "central") != "central":
                continue
            for seed in range(n):
                rng = np.random.default_rng([seed, i])
                loss, inputs, grads = make(rng)
                worst = max(worst, max(check_gradients(loss, inputs, grads, rng).values()))
                count += 1
    return worst, f"{count} registered gradient checks (central, every key and the dot test)"


def m_primitive_vs_float64(n):
    """tests/reference/test_primitives.py::test_float32_agrees_with_float64 over ``n`` seeds."""
    from cases_reference import primitive_calls, primitive_run

    worst, names = 0.0, sorted(primitive_calls(np.random.default_rng(0), np.float32))
    for seed in range(n):
        for name in names:
            in32, forward, backward = primitive_calls(np.random.default_rng(seed), np.float32)[name]
            in64, _, _ = primitive_calls(np.random.default_rng(seed), np.float64)[name]
            out32, g32 = primitive_run(name, in32, forward, backward, np.random.default_rng(seed + 1))
            out64, g64 = primitive_run(name, in64, forward, backward, np.random.default_rng(seed + 1))
            worst = max([worst] + [rel(a, b) for a, b in zip(out32 + g32, out64 + g64, strict=True)])
    return worst, f"{n} seeds x {len(names)} primitives, every output and gradient"


def m_complex_step(n):
    """The complex step (h = 1e-30) vs the momentum inner gradient of reference/layer_rules.py, the
    draws of tests/reference/test_layer_rules.py::test_momentum_inner_grad_property (not the dot test)."""
    from nlref.reference import layer_rules as LR
    from nlref.reference.gradcheck import check_gradients

    shapes = st.tuples(st.integers(0, 2**16), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5))
    worst = 0.0
    cases = draws(st.tuples(shapes, st.integers(1, 4), st.sampled_from(LR.OBJECTIVES)), n)
    for (seed, d_out, d_in, N), h, objective in cases:
        rng = np.random.default_rng(seed)
        X, U = rng.standard_normal((N, d_in)), rng.standard_normal((N, d_out))
        inputs = {"M": rng.standard_normal((d_out, d_in)), "W1": rng.standard_normal((d_out, h)),
                  "W2": rng.standard_normal((h, d_in))}  # fmt: skip
        dM, dW1, dW2 = LR.momentum_inner_grad(inputs["M"], inputs["W1"], inputs["W2"], X, U, objective)
        errors = check_gradients(lambda x, X=X, U=U, o=objective: LR.momentum_inner_loss(x["M"], x["W1"], x["W2"], X, U, o),
                                 inputs, {"M": dM, "W1": dW1, "W2": dW2}, rng, method="complex")  # fmt: skip
        errors.pop("<dot>")
        worst = max(worst, max(errors.values()))
    return worst, f"{len(cases)} momentum inner-gradient draws"


def m_rewrite(dtype):
    def measure(n):
        """reference/memory.py's chunk forms vs their token loops (Hebbian, delta, DGD; chunk sizes
        1, 2, 3, 16; outputs, final state, every gradient; float32 gradients on one scale, as
        tests/reference/test_memory.py::test_chunk_form_equals_token_loop)."""
        from nlref.reference import memory as RM
        from nlref.reference.cases import memory as RM_cases

        strategy = st.tuples(st.sampled_from(["hebbian", "delta", "dgd"]), st.sampled_from([1, 2, 3, 16]),
                             st.integers(1, 2), st.integers(1, 17), st.integers(1, 4), st.integers(1, 4),
                             st.integers(0, 2**31), st.booleans())  # fmt: skip
        worst, cases = 0.0, draws(strategy, n)
        for token, C, B, T, dk, dv, seed, with_alpha in cases:
            rng = np.random.default_rng(seed)
            x = RM_cases.example_inputs(rng, B, T, dk, dv)
            x["M0"] = 0.5 * rng.standard_normal((B, dv, dk))
            x = {k: v.astype(dtype) for k, v in x.items()}
            args = (x["q"], x["k"], x["v"], x["eta"], x["alpha"] if with_alpha else None, x["M0"])
            (tf, tb), (cf_, cb) = RM.RULES[token], RM.RULES[token + "_chunked"]
            y_a, M_a, cache_a = tf(*args)
            y_b, M_b, cache_b = cf_(*args, chunk_size=C)
            dy = rng.standard_normal(y_a.shape).astype(dtype)
            dM = rng.standard_normal(M_a.shape).astype(dtype)
            g_a, g_b = tb(dy, dM, cache_a), cb(dy, dM, cache_b)
            if dtype == "float64":
                grads = max(rel(g_b[k], g_a[k]) for k in g_a)
            else:
                names = sorted(g_a)
                grads = rel(np.concatenate([g_b[k].ravel() for k in names]), np.concatenate([g_a[k].ravel() for k in names]))
            worst = max(worst, rel(y_b, y_a), rel(M_b, M_a), grads)
        return worst, f"{len(cases)} chunk-form draws"

    return measure


def m_mlp_memory_vs_float64(n):
    """tests/reference/test_mlp_memory.py::test_float32_in_float32_out_and_close_to_float64 over ``n`` draws."""
    from cases_reference import mlp_all_outputs, mlp_reference_inputs
    from strategies import mlp_memory_reference_configs

    worst, cases = 0.0, draws(mlp_memory_reference_configs(), n)
    for cfg in cases:
        x32, _ = mlp_reference_inputs(cfg, np.float32)
        x64 = {k: v.astype(np.float64) for k, v in x32.items()}
        o32, o64 = mlp_all_outputs(x32, cfg), mlp_all_outputs(x64, cfg)
        worst = max([worst] + [rel(o32[k], o64[k].astype(np.float32)) for k in o32])
    return worst, f"{len(cases)} MLP-memory configs, every function's outputs"


def _port_mlp(n, dtype):
    from cases_fast import mlp_inputs
    from strategies import mlp_memory_configs

    from nlref.fast.cpu import mlp_memory as F
    from nlref.reference import mlp_memory as R

    worst, cases = 0.0, draws(mlp_memory_configs.map(lambda c: {**c, "dtype": dtype}), n)
    for c in cases:
        rng, W1, W2, k, v = mlp_inputs(c)
        kw = {"act": c["act"], "layernorm": c["layernorm"]}
        yf, cf = F.mlp_memory_forward(W1, W2, k, **kw)
        yr, cr = R.mlp_memory_forward(W1, W2, k, **kw)
        dy = rng.standard_normal(yr.shape).astype(dtype)
        *ff, gf = F.inner_grad(W1, W2, k, v, **kw)
        *fr, gr = R.inner_grad(W1, W2, k, v, **kw)
        cot = [rng.standard_normal(x.shape).astype(dtype) for x in fr]
        worst = max(worst, rel(yf, yr), tree_rel(F.mlp_memory_backward(dy, cf), R.mlp_memory_backward(dy, cr)),
                    tree_rel(ff, fr), tree_rel(F.inner_grad_backward(*cot, gf), R.inner_grad_backward(*cot, gr)),
                    tree_rel(F.inner_grad_dense(W1, W2, k, v, **kw), R.inner_grad_dense(W1, W2, k, v, **kw)))  # fmt: skip
    return worst, len(cases)


def _port_titans(n, dtype):
    from cases_fast import titans_make
    from strategies import titans_layer_configs

    from nlref.fast.cpu import titans as FT
    from nlref.reference import titans as RT

    worst, cases = 0.0, draws(titans_layer_configs.map(lambda c: {**c, "dtype": dtype}), n)
    for c in cases:
        if dtype == "float32":  # tensors above the port row are the own-rounding row's (as the test)
            worst = max([worst] + [e for _, e, _ in _titans_errors(c) if e <= tol("float32", "port")])
            continue
        cfg, rng, x, params, state = titans_make(c)
        yf, cf, sf = FT.titans_forward(x, params, cfg, state)
        yr, cr, sr = RT.titans_forward(x, params, cfg, state)
        dy = rng.standard_normal(yr.shape).astype(dtype)
        dstate = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in sr.items() if k != "pos"}
        worst = max(worst, rel(yf, yr), tree_rel(sf, sr),
                    tree_rel(FT.titans_backward(dy, cf, dstate), RT.titans_backward(dy, cr, dstate)))
    return worst, len(cases)


def _titans_errors(c):
    """(name, port's rel error, the float32 reference's own rel error from float64) per gradient
    tensor of one float32 Titans draw (tests/cpu/test_cpu_titans.py's rule)."""
    from cases_fast import titans_make

    from nlref.fast.cpu import titans as FT
    from nlref.reference import titans as RT

    cfg, rng, x, params, state = titans_make(c)
    yf, cf, sf = FT.titans_forward(x, params, cfg, state)
    yr, cr, sr = RT.titans_forward(x, params, cfg, state)
    dy = rng.standard_normal(yr.shape).astype(np.float32)
    dstate = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in sr.items() if k != "pos"}
    _, _, x6, p6, s6 = titans_make({**c, "dtype": "float64"})
    g64 = RT.titans_backward(dy.astype(np.float64), RT.titans_forward(x6, p6, cfg, s6)[1],
                             {k: v.astype(np.float64) for k, v in dstate.items()})
    got = {"y": yf, "grads": FT.titans_backward(dy, cf, dstate)}
    want = dict(leaves({"y": yr, "grads": RT.titans_backward(dy, cr, dstate)}))
    own = dict(leaves({"y": RT.titans_forward(x6, p6, cfg, s6)[0], "grads": g64}))
    out = []
    for name, a in leaves(got):
        w = want[name]
        if not np.all(np.isfinite(w)):  # the draw diverges in the reference itself (seen: 1 of 400
            same = np.array_equal(np.isfinite(a), np.isfinite(w))  # draws, chunk 1, an MLP memory)
            out.append((name, 0.0 if same else float("inf"), 1.0))  # the port must diverge alike
            continue
        out.append((name, rel(a, w), rel(w, own[name])))
    return out


def _port_memory_rules(n, dtype):
    from nlref.fast.cpu import memory as FMEM
    from nlref.reference import memory as RM
    from nlref.reference.cases import memory as RM_cases

    strategy = st.tuples(st.sampled_from(("hebbian", "delta", "dgd", "oja")), st.integers(1, 2), st.integers(1, 7),
                         st.integers(1, 4), st.integers(1, 4), st.booleans(), st.booleans(), st.integers(0, 2**16))
    worst, cases = 0.0, draws(strategy, n)
    for rule, B, T, dk, dv, with_alpha, with_dM, seed in cases:
        rng = np.random.default_rng(seed)
        inputs = RM_cases.example_inputs(rng, B, T, dk, dv)
        inputs["M0"] = 0.5 * rng.standard_normal((B, dv, dk))
        inputs = {key: val.astype(dtype) for key, val in inputs.items()}
        args = (inputs["q"], inputs["k"], inputs["v"], inputs["eta"], inputs["alpha"] if with_alpha else None,
                inputs["M0"])  # fmt: skip
        (ff, fb), (rf, rb) = FMEM.RULES[rule], RM.RULES[rule]
        yf, Mf, cf = ff(*args)
        yr, Mr, cr = rf(*args)
        dy = rng.standard_normal(yr.shape).astype(dtype)
        dM = rng.standard_normal(Mr.shape).astype(dtype) if with_dM else None
        worst = max(worst, rel(yf, yr), rel(Mf, Mr), tree_rel(fb(dy, dM, cf), rb(dy, dM, cr)))
    return worst, len(cases)


def _selfmod_cases(n, dtype, layernorm):
    """Self-modifying draws in ``dtype``; with ``layernorm`` the LN configs (MLP memories, dh = 3:
    where cases_fast.selfmod_make turns LayerNorm on, float64 only)."""
    from strategies import selfmod_layer_configs

    def fix(c):
        c = {**c, "dtype": dtype}
        return {**c, "layernorm": True, "memory": "mlp", "dh": 3} if layernorm else {**c, "layernorm": False}

    return draws(selfmod_layer_configs.map(fix), n)


def _selfmod_errors(c):
    """(name, port's rel error, the float32 reference's own rel error from float64 or None) per tensor."""
    from cases_fast import selfmod_make

    from nlref.fast.cpu import selfmod as FS
    from nlref.reference import selfmod as RS

    cfg, rng, x, params, state = selfmod_make(c)
    yf, cf, sf = FS.forward(x, params, cfg, state)
    yr, cr, sr = RS.forward(x, params, cfg, state)
    dy = rng.standard_normal(yr.shape).astype(c["dtype"])
    dstate = {k: rng.standard_normal(v.shape).astype(c["dtype"]) for k, v in sr.items() if isinstance(v, np.ndarray)}
    got, want = {"y": yf, "state": sf, "grads": FS.backward(dy, cf, dstate)}, {"y": yr, "state": sr,
                                                                                "grads": RS.backward(dy, cr, dstate)}
    own = {}
    if c["dtype"] == "float32":
        _, _, x6, p6, s6 = selfmod_make({**c, "dtype": "float64"})
        c6 = RS.forward(x6, p6, cfg, s6)[1]
        own = dict(leaves({"grads": RS.backward(dy.astype(np.float64), c6,
                                                {k: v.astype(np.float64) for k, v in dstate.items()})}))
    want_leaves = dict(leaves(want))
    return [(name, rel(a, want_leaves[name]), rel(want_leaves[name], own[name]) if name in own else None)
            for name, a in leaves(got)]


def m_port(dtype):
    def measure(n):
        """fast/cpu vs the reference, same dtype: MLP memory, Titans, the matrix-memory token rules
        (every output, state and gradient) and, in float64, self-modifying Titans without LN (float32
        selfmod: the port_vs_own_rounding row; LN: port_selfmod_layernorm)."""
        parts = {"mlp_memory": _port_mlp(4 * n, dtype), "titans": _port_titans(n, dtype),
                 "memory rules": _port_memory_rules(2 * n, dtype)}  # fmt: skip
        if dtype == "float64":
            cases = _selfmod_cases(n, dtype, layernorm=False)
            parts["selfmod"] = (max(e for c in cases for _, e, _ in _selfmod_errors(c)), len(cases))
        worst = max(w for w, _ in parts.values())
        return worst, ", ".join(f"{k} {w:.1e} ({m})" for k, (w, m) in parts.items())

    return measure


def m_port_selfmod_layernorm(n):
    """Self-modifying Titans with LayerNorm on the memories' branches, float64, port vs reference."""
    cases = _selfmod_cases(n, "float64", layernorm=True)
    return max(e for c in cases for _, e, _ in _selfmod_errors(c)), f"{len(cases)} selfmod LN configs"


def m_port_vs_own_rounding(n):
    """float32 self-modifying Titans without LN: the factor the row must give, the largest
    (port's error) / (the float32 reference's own error from float64) over the tensors whose port
    error exceeds the fixed ("float32", "port") row (0 when none does)."""
    from strategies import titans_layer_configs

    floor = tol("float32", "port")
    cases = _selfmod_cases(n, "float32", layernorm=False)
    titans = draws(titans_layer_configs.map(lambda c: {**c, "dtype": "float32"}), 2 * n)
    worst, over, total = 0.0, 0, 0
    for errors in [_selfmod_errors(c) for c in cases] + [_titans_errors(c) for c in titans]:
        for _, err, own in errors:
            total += 1
            if err > floor:
                over += 1
                worst = max(worst, err / own if own else float("inf"))
    return worst, (f"{len(cases)} float32 selfmod + {len(titans)} titans configs: {over} of {total} tensors "
                   "above the port row")


def m_torch_model_oracle(n):
    """torch_model.py's autograd vs the reference's hand-written backward, float64, loss and every
    gradient (per key, the scale floored at 1e-6 of the largest gradient entry, as
    tests/oracle/test_torch_oracle.py), ``n`` draws per family of strategies.model_configs in float64."""
    try:
        from nlref import torch_model as TM
    except ImportError as e:
        raise NotHere(f"no torch ({e})") from None
    from strategies import FAMILIES, model_configs

    from nlref.reference import model as R

    worst, count = 0.0, 0
    for family in FAMILIES:
        for cfg, seed, B, T in draws(st.tuples(model_configs(family).filter(lambda c: c.dtype == "float64"),
                                               st.integers(0, 1000), st.integers(1, 2), st.integers(2, 9)), n):
            params = R.init_params(cfg, seed)
            tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))
            lr, gr = R.loss_and_grads(params, tokens, cfg)
            lt, gt = TM.loss_and_grads(params, tokens, cfg)
            floor = 1e-6 * max(float(np.max(np.abs(g))) for g in gr.values())
            errs = [float(np.max(np.abs(gt[k] - g))) / max(float(np.max(np.abs(gt[k]))), float(np.max(np.abs(g))), floor)
                    for k, g in gr.items()]  # fmt: skip
            worst = max([worst, abs(lt - lr) / abs(lr)] + errs)
            count += 1
    return worst, f"{count} model configs of the four families"


def m_activation_vs_float64(n):
    """fast/cpu/vmath.py's float32 f, f', f'' of sigmoid / SiLU / GELU vs SciPy float64 on
    tests/vmath_oracle.py's grid (every ``n``-th point of it; 1: the whole grid)."""
    from vmath_oracle import grid, worst_error

    from nlref.fast.cpu import vmath as V

    x = grid()[::n]
    worst = max(max(worst_error(kind, x)) for kind in (V.SIGMOID, V.SILU, V.GELU))
    return worst, f"{x.size:,} float32 inputs x 3 activations x (f, f', f'')"


def m_gpu(dtype):
    def measure(n):
        """The GPU port vs the reference: tests/gpu/test_gpu_device_*.py under NL_REQUIRE_GPU=1 with every
        comparison recorded (NL_GPU_ERRORS), the worst of the ("gpu") kind per dtype."""
        from gpu_helpers import worst_errors

        from nlref.fast.gpu import namespace

        ok, why = namespace.cupy_available()
        if not ok:
            raise NotHere(f"no GPU: {why}")
        path = Path(tempfile.mkdtemp()) / "gpu_errors.jsonl"
        files = ["tests/gpu/test_gpu_device_ops.py"] + ([] if n < 8 else ["tests/gpu/test_gpu_device_model.py", "tests/gpu/test_gpu_device_scans.py"])
        env = dict(os.environ, NL_REQUIRE_GPU="1", NL_GPU_ERRORS=str(path))
        env.pop("NL_GPU_TESTS_ON_NUMPY", None)
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                             cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError("the GPU tests failed:\n" + out.stdout[-2000:])
        rows = [r for r in worst_errors(path).values() if r["dtype"] == dtype and r["kind"] == "gpu"]
        return max(float(r["rel"]) for r in rows), f"{len(rows)} GPU tests of {', '.join(files)}"

    return measure


def not_reproduced(test):
    def measure(n):
        raise NotHere(f"measured by {test} (its optimizer trajectories are that file's own); run it")

    return measure


# (dtype, kind) -> (measure, draws in a full run, draws with --quick)
MEASURES = {
    ("float64", "gradcheck"): (m_gradcheck, 2, 1),
    ("float32", "primitive_vs_float64"): (m_primitive_vs_float64, 20, 3),
    ("float64", "complex_step"): (m_complex_step, 200, 20),
    ("float64", "rewrite"): (m_rewrite("float64"), 300, 30),
    ("float32", "rewrite"): (m_rewrite("float32"), 300, 30),
    ("float32", "mlp_memory_vs_float64"): (m_mlp_memory_vs_float64, 1500, 100),
    ("float64", "torch_oracle"): (not_reproduced("tests/oracle/test_optimizers_torch.py"), 0, 0),
    ("float64", "torch_muon_bfloat16"): (not_reproduced("tests/oracle/test_optimizers_torch.py"), 0, 0),
    ("float64", "port"): (m_port("float64"), 100, 8),
    ("float32", "port"): (m_port("float32"), 100, 8),
    ("float64", "gpu"): (m_gpu("float64"), 8, 1),
    ("float32", "gpu"): (m_gpu("float32"), 8, 1),
    ("float64", "port_selfmod_layernorm"): (m_port_selfmod_layernorm, 100, 8),
    ("float32", "port_vs_own_rounding"): (m_port_vs_own_rounding, 200, 15),
    ("float64", "torch_model_oracle"): (m_torch_model_oracle, 25, 2),
    ("float32", "activation_vs_float64"): (m_activation_vs_float64, 1, 50),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer draws per row (seconds, not minutes)")
    ap.add_argument("--rows", default="", help="comma-separated dtype:kind (or kind) rows to measure; default all")
    args = ap.parse_args(argv)
    missing = set(TOLERANCES) - set(MEASURES)
    assert not missing, f"rows without a measurement: {sorted(missing)}"
    wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
    rows = [r for r in TOLERANCES if not wanted or f"{r[0]}:{r[1]}" in wanted or r[1] in wanted]
    if wanted and not rows:
        ap.error(f"no row matches {args.rows!r}; rows: {', '.join(f'{d}:{k}' for d, k in TOLERANCES)}")
    print(f"{'row':<40} {'measured worst':>14} {'bound':>9} {'headroom':>9}  seconds  measured on")
    failed = []
    for row in rows:
        measure, full, quick = MEASURES[row]
        bound = TOLERANCES[row][0]
        t0 = time.perf_counter()
        name = f"{row[0]}:{row[1]}"
        try:
            worst, what = measure(quick if args.quick else full)
        except NotHere as e:
            print(f"{name:<40} {'-':>14} {bound:>9.1e} {'-':>9}  {time.perf_counter() - t0:>7.1f}  skipped: {e}")
            continue
        except Exception as e:  # a measurement that cannot run is a failure, with the reason
            failed.append(name)
            print(f"{name:<40} {'error':>14} {bound:>9.1e} {'-':>9}  {time.perf_counter() - t0:>7.1f}  "
                  f"could not measure: {type(e).__name__}: {e}")  # fmt: skip
            continue
        ok = bool(np.isfinite(worst) and worst <= bound)
        if not ok:
            failed.append(name)
        head = f"{bound / worst:.1f}x" if worst > 0 else "inf"
        print(f"{name:<40} {worst:>14.2e} {bound:>9.1e} {head:>9}  {time.perf_counter() - t0:>7.1f}  "
              f"{what}{'' if ok else '  EXCEEDS THE BOUND'}", flush=True)  # fmt: skip
    print(f"{len(failed)} of {len(rows)} rows exceed their bound" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
