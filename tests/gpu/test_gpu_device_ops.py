"""The GPU port's ops (fast/gpu/ops.py host views) vs the reference, float32 and float64 (SPEC.md#fast-gpu).

The CPU port's property tests (tests/cpu/test_cpu_*.py: their strategies, tests/strategies.py, and
input builders, tests/cases_fast.py, are shared, not copied) run against backend "gpu": every
primitive op of the registry (forward and backward; layernorm, softplus and softmax too), the MLP
/ matrix memory ops, Titans (matrix / MLP memory, chunk sizes that do not divide T, momentum, a
state continued from inside a chunk, the upstream gradient reaching y and the state), the
self-modifying layer and the CMS chain. Each comparison is within the ("float32" | "float64",
"gpu") rows of tests/tolerances.py (the selfmod layer reuses the CPU port's LayerNorm and
own-rounding rows, as its CPU test does) and records its relative error in $NL_GPU_ERRORS
(tests/gpu_helpers.py).

Skipped without CuPy and a CUDA device (NL_REQUIRE_GPU=1: an error instead);
NL_GPU_TESTS_ON_NUMPY=1 runs it on NumPy to check the tests themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
from cases_fast import PRIM_OPS as COMPILED_OPS
from cases_fast import mlp_inputs, selfmod_make, titans_make
from cases_fast import normal as _normal
from cases_fast import prim_case as _case
from cases_fast import prim_run as _run
from gpu_helpers import check_close, check_tree, layer_config, rel_error, require_gpu
from hypothesis import given, note
from hypothesis import strategies as st
from port_helpers import readonly
from strategies import DTYPES
from strategies import mlp_memory_configs as mlp_configs
from strategies import selfmod_layer_configs as selfmod_configs
from strategies import titans_layer_configs as titans_configs
from tolerances import tol

from nlref.fast import registry
from nlref.fast.gpu import ops as G
from nlref.reference import cms as RC
from nlref.reference import mlp_memory as RM
from nlref.reference import primitives as RP
from nlref.reference import selfmod as RS
from nlref.reference import titans as RT

pytestmark = pytest.mark.gpu
DEVICE = require_gpu()
REFERENCE_ONLY_OPS = ("layernorm", "softplus", "softmax")  # no CPU port, but a GPU one
ALL_OPS = COMPILED_OPS + REFERENCE_ONLY_OPS


def test_every_primitive_of_the_registry_is_tested():
    prims = {op.split(".")[1].rsplit("_", 1)[0] for op in registry.ported("gpu") if op.startswith("primitives.")}
    assert prims == set(ALL_OPS)


def _prim_case(op, rng, dtype, n, t, d):
    if op == "layernorm":
        return (_normal(rng, (n, t, d), dtype), _normal(rng, (d,), dtype), _normal(rng, (d,), dtype)), {}
    if op == "softplus":
        return (_normal(rng, (n, t, d), dtype, 3.0),), {}
    if op == "softmax":
        return (_normal(rng, (n, t, d), dtype, 2.0),), {"axis": int(rng.integers(-3, 3))}
    return _case(op, rng, dtype, n, t, d)


@pytest.mark.parametrize("op", ALL_OPS)
@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), t=st.integers(1, 7), d=st.integers(2, 6))
def test_primitive_matches_reference(op, dtype, seed, n, t, d):
    rng = np.random.default_rng(seed)
    args, kwargs = _prim_case(op, rng, dtype, n, t, d)
    note(f"{op} {dtype} n={n} t={t} d={d} {kwargs}")
    outs_g, grads_g = _run(G.primitives, op, args, kwargs, seed, dtype)
    outs_r, grads_r = _run(RP, op, args, kwargs, seed, dtype)
    truth = None
    for i, (a, b) in enumerate(zip(outs_g + grads_g, outs_r + grads_r, strict=True)):
        name = f"{op}[{i}]"
        if b is None:
            assert a is None, name
            continue
        assert isinstance(a, np.ndarray | np.generic), f"{name}: {type(a).__name__}, not NumPy"  # host
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype == np.dtype(dtype), f"{name}: dtype {a.dtype} vs {b.dtype}"
        try:
            check_close(a, b, dtype, name)
        except AssertionError:
            if dtype != "float32":
                raise
            # As in test_cpu_primitives: a cancelling float32 result (l2norm's backward) is
            # judged against the reference in float64: the GPU as accurate as the reference.
            if truth is None:
                args64 = tuple(x.astype(np.float64) if x.dtype.kind == "f" else x for x in args)
                o64, g64 = _run(RP, op, args64, kwargs, seed, "float64")
                truth = o64 + g64
            err_g = float(np.max(np.abs(a - truth[i])))
            err_r = float(np.max(np.abs(b - truth[i])))
            note(f"{name} float32 vs float64 truth: gpu {err_g:.2e}, reference {err_r:.2e}")
            assert err_g <= 4 * err_r + 1e-7 * float(np.max(np.abs(truth[i]))), f"{name}: {err_g} vs {err_r}"


def _cmp(got, want, dtype, names):
    assert len(got) == len(want), names
    for name, a, b in zip(names, got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype == np.dtype(dtype), f"{name}: dtype {a.dtype} vs {b.dtype}"
        check_close(a, b, dtype, name)


@given(mlp_configs)
def test_mlp_memory_ops_match_reference(c):
    note(str(c))
    rng, W1, W2, k, v = mlp_inputs(c)
    W1, W2, k, v = (readonly(a) for a in (W1, W2, k, v))
    dt, kw = c["dtype"], {"act": c["act"], "layernorm": c["layernorm"]}
    yg, cg = G.mlp_memory.mlp_memory_forward(W1, W2, k, **kw)
    yr, cr = RM.mlp_memory_forward(W1, W2, k, **kw)
    _cmp([yg], [yr], dt, ["y"])
    _cmp(G.mlp_memory.mlp_memory_backward(v, cg), RM.mlp_memory_backward(v, cr), dt, ["dW1", "dW2", "dz"])
    *fg, cg = G.mlp_memory.inner_grad(W1, W2, k, v, **kw)
    *fr, cr = RM.inner_grad(W1, W2, k, v, **kw)
    _cmp(fg, fr, dt, ["u1", "a", "u2"])
    cot = [rng.standard_normal(x.shape).astype(dt) for x in fr]
    _cmp(G.mlp_memory.inner_grad_backward(*cot, cg), RM.inner_grad_backward(*cot, cr), dt, ["dW1", "dW2", "dk", "dv_hat"])
    _cmp([G.mlp_memory.inner_loss(W1, W2, k, v, **kw)], [RM.inner_loss(W1, W2, k, v, **kw)], dt, ["loss"])
    _cmp(G.mlp_memory.inner_grad_dense(W1, W2, k, v, **kw), RM.inner_grad_dense(W1, W2, k, v, **kw), dt, ["G1", "G2"])
    # the matrix memory
    M = readonly(rng.standard_normal((*c["lead"], k.shape[-1], k.shape[-1])).astype(dt))
    yg, cg = G.mlp_memory.matrix_memory_forward(M, k)
    yr, cr = RM.matrix_memory_forward(M, k)
    _cmp([yg], [yr], dt, ["matrix y"])
    _cmp(G.mlp_memory.matrix_memory_backward(v, cg), RM.matrix_memory_backward(v, cr), dt, ["matrix dM", "matrix dk"])
    ug, cg = G.mlp_memory.matrix_inner_grad(M, k, v)
    ur, cr = RM.matrix_inner_grad(M, k, v)
    _cmp([ug], [ur], dt, ["matrix u"])
    du = rng.standard_normal(ur.shape).astype(dt)
    _cmp(G.mlp_memory.matrix_inner_grad_backward(du, cg), RM.matrix_inner_grad_backward(du, cr), dt,
         ["matrix dM", "matrix dk", "matrix dv_hat"])  # fmt: skip
    _cmp([G.mlp_memory.matrix_inner_loss(M, k, v)], [RM.matrix_inner_loss(M, k, v)], dt, ["matrix loss"])
    _cmp([G.mlp_memory.matrix_inner_grad_dense(M, k, v)], [RM.matrix_inner_grad_dense(M, k, v)], dt, ["matrix G"])


@given(titans_configs)
def test_titans_matches_reference(c):
    note(str(c))
    cfg, rng, x, params, state = titans_make(c)
    dt = c["dtype"]
    yg, cg, sg = G.titans.titans_forward(x, params, layer_config(cfg), state)
    yr, cr, sr = RT.titans_forward(x, params, cfg, state)
    check_tree(yg, yr, dt, "y")
    check_tree(sg, sr, dt, "state")
    dy = rng.standard_normal(yr.shape).astype(dt)
    dstate = {k: rng.standard_normal(v.shape).astype(dt) for k, v in sr.items() if k != "pos"}
    gg = G.titans.titans_backward(dy, cg, dstate)
    gr = RT.titans_backward(dy, cr, dstate)
    for name, a, b in zip(("dx", "dparams", "dstate0"), gg, gr, strict=True):
        check_tree(a, b, dt, name)


@given(st.integers(1, 7), st.booleans(), DTYPES, st.integers(0, 999))
def test_titans_chunk_coefficients_match_reference(c, momentum, dtype, seed):
    rng = np.random.default_rng(seed)
    alpha, beta = (rng.uniform(0.05, 0.99, (2, 3, c)).astype(dtype) for _ in range(2))
    eta = rng.uniform(0, 1, (2, 3, c)).astype(dtype)
    cg, kg = G.titans.chunk_coefficients(alpha, beta, eta, momentum)
    cr, kr = RT.chunk_coefficients(alpha, beta, eta, momentum)
    check_tree(list(cg), list(cr), dtype, "A s w Bc e")
    ups = [rng.standard_normal(a.shape).astype(dtype) for a in cr]
    check_tree(list(G.titans.chunk_coefficients_backward(*ups, kg)), list(RT.chunk_coefficients_backward(*ups, kr)),
               dtype, "dalpha dbeta deta")  # fmt: skip


def _check_selfmod(got, want, dtype, name, want64=None, kind="gpu"):
    """As test_cpu_selfmod._assert_same_tree: with ``want64`` (float32 draws) a tensor may
    differ by ("float32", "port_vs_own_rounding") x the reference's own float32 rounding error where
    that exceeds the ("float32", "gpu") row."""
    if isinstance(want, dict):
        assert list(got) == list(want), f"{name}: keys {list(got)} != {list(want)}"
        for k in want:
            _check_selfmod(got[k], want[k], dtype, f"{name}[{k}]", None if want64 is None else want64[k], kind)
        return
    if not isinstance(want, np.ndarray):
        assert got == want, f"{name}: {got!r} != {want!r}"
        return
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype, f"{name}: dtype {getattr(got, 'dtype', None)}"
    if want64 is None:
        check_close(got, want, dtype, name, kind)
        return
    own = rel_error(want, want64)
    bound = max(tol(dtype, "gpu"), tol(dtype, "port_vs_own_rounding") * own)
    check_close(got, want, dtype, name, "gpu", bound=bound)


@given(selfmod_configs)
def test_selfmod_matches_reference(c):
    note(str(c))
    cfg, rng, x, params, state = selfmod_make(c)  # LayerNorm drawn in float64 only (as on the CPU port)
    dt = c["dtype"]
    yg, cg, sg = G.selfmod.forward(x, params, layer_config(cfg), state)
    yr, cr, sr = RS.forward(x, params, cfg, state)
    kind = "port_selfmod_layernorm" if cfg.layernorm else "gpu"  # the CPU port's LN row, float64 only
    _check_selfmod(yg, yr, dt, "y", kind=kind)
    _check_selfmod(sg, sr, dt, "state", kind=kind)
    dy = rng.standard_normal(yr.shape).astype(dt)
    dstate = {k: rng.standard_normal(v.shape).astype(dt) for k, v in sr.items() if isinstance(v, np.ndarray)}
    gg = G.selfmod.backward(dy, cg, dstate)
    gr = RS.backward(dy, cr, dstate)
    g64 = [None] * 3
    if dt == "float32":  # the reference's own float32 rounding, for cancelling gradients
        _, _, x6, p6, s6 = selfmod_make({**c, "dtype": "float64"})
        c6 = RS.forward(x6, p6, cfg, s6)[1]
        g64 = RS.backward(dy.astype(np.float64), c6, {k: v.astype(np.float64) for k, v in dstate.items()})
    for name, a, b, b64 in zip(("dx", "dparams", "dstate0"), gg, gr, g64, strict=True):
        _check_selfmod(a, b, dt, name, b64, kind)


@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), T=st.integers(1, 9),
       start=st.integers(0, 5), D=st.integers(1, 5),
       levels=st.lists(st.tuples(st.integers(1, 6), st.sampled_from([None, 1, 2, 3, 4])), min_size=1, max_size=3),
       variant=st.sampled_from(["sequential", "independent"]), act=st.sampled_from(["gelu", "silu"]))  # fmt: skip
def test_cms_matches_reference(dtype, seed, B, T, start, D, levels, variant, act):
    """The CMS chain (cms.forward / backward) and one level (level_forward / level_backward)."""
    note(f"{dtype} B={B} T={T} start={start} D={D} levels={levels} {variant} {act}")
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((B, T, D)).astype(dtype)
    weights, groups = [], []
    for hm, period in levels:
        gr = RC.groups_for(period, start, T)
        groups.append(gr)
        weights.append((0.5 * rng.standard_normal((B, len(gr), D, hm)).astype(dtype),
                        0.5 * rng.standard_normal((B, len(gr), hm, D)).astype(dtype)))
    agg = rng.standard_normal(len(levels)).astype(dtype) if variant == "independent" else None
    up = rng.standard_normal((B, T, D)).astype(dtype)
    yg, cg = G.cms.forward(u, weights, groups, variant, act, agg)
    yr, cr = RC.forward(u, weights, groups, variant, act, agg)
    check_tree(yg, yr, dtype, "y")
    dug, dwg, daggg = G.cms.backward(up, cg)
    dur, dwr, daggr = RC.backward(up, cr)
    check_tree(dug, dur, dtype, "du")
    check_tree([list(p) for p in dwg], [list(p) for p in dwr], dtype, "dW")
    check_tree(daggg, daggr, dtype, "dagg")
    W1, W2 = weights[0]
    yg, cg = G.cms.level_forward(u, W1, W2, groups[0], act=act)
    yr, cr = RC.level_forward(u, W1, W2, groups[0], act=act)
    check_tree(yg, yr, dtype, "level y")
    check_tree(list(G.cms.level_backward(up, cg)), list(RC.level_backward(up, cr)), dtype, "level grads")
