"""fast/cpu/primitives.py vs reference/primitives.py: same outputs, gradients, dtypes; no mutation.

SPEC.md#fast-cpu. Every compiled op is drawn by hypothesis (sizes, dtype, seed) with read-only
inputs; outputs and every gradient must agree within the ("float32" | "float64", "port") rows of
tests/tolerances.py, and no call may take the explicit reference fallback. Also: the registry
resolves, importing the package and ``--help`` never import numba, bad input raises the
reference's ValueError, and a NUMBA_DISABLE_JIT=1 subprocess runs the kernels' Python logic.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cases_fast import PRIM_OPS as OPS
from cases_fast import as_tuple as _as_tuple
from cases_fast import prim_case as _case
from cases_fast import prim_run as _run
from cases_fast import ro as _ro
from hypothesis import given, note
from hypothesis import strategies as st
from strategies import DTYPES
from tolerances import assert_close, tol

from nlref.fast import registry
from nlref.fast.cpu import primitives as F
from nlref.reference import primitives as R


@pytest.mark.parametrize("op", OPS)
@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), t=st.integers(1, 7),
       d=st.integers(2, 6))
def test_op_matches_reference(op, dtype, seed, n, t, d):
    rng = np.random.default_rng(seed)
    args, kwargs = _case(op, rng, dtype, n, t, d)
    before = [np.array(a, copy=True) for a in args]
    fallbacks = dict(F.FALLBACKS)
    outs_f, grads_f = _run(F, op, args, kwargs, seed, dtype)
    outs_r, grads_r = _run(R, op, args, kwargs, seed, dtype)
    assert F.FALLBACKS == fallbacks, f"{op}: took the reference fallback"
    note(f"{op} {dtype} n={n} t={t} d={d}")
    truth = None
    for i, (a, b) in enumerate(zip(outs_f + grads_f, outs_r + grads_r, strict=True)):
        if b is None:
            assert a is None
            continue
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype == np.dtype(dtype), f"{op}[{i}]: dtype {a.dtype} vs {b.dtype}"
        assert not any(np.shares_memory(a, x) for x in args if isinstance(x, np.ndarray))
        try:
            assert_close(a, b, dtype, "port", f"{op}[{i}]")
        except AssertionError:
            if dtype != "float32":
                raise
            # A cancelling float32 result (e.g. l2norm's backward projects dy onto the tangent
            # plane; at d = 2 the result can be 1e-5 of dy): neither float32 value is accurate to
            # the tolerance. Then the port must be as accurate as the reference, judged by the
            # reference in float64 on the same inputs.
            if truth is None:
                args64 = tuple(x.astype(np.float64) if x.dtype.kind == "f" else x for x in args)
                o64, g64 = _run(R, op, args64, kwargs, seed, "float64")
                truth = o64 + g64
            err_f = float(np.max(np.abs(a - truth[i])))
            err_r = float(np.max(np.abs(b - truth[i])))
            note(f"{op}[{i}] float32 vs float64 truth: port {err_f:.2e}, reference {err_r:.2e}")
            assert err_f <= 4 * err_r + 1e-7 * float(np.max(np.abs(truth[i]))), f"{op}[{i}]: {err_f} vs {err_r}"
    for a, b in zip(args, before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", ("rmsnorm", "swiglu", "attention", "rope", "cross_entropy", "conv1d"))
def test_caches_are_interchangeable(op, rng):
    """A fast backward accepts the reference forward's cache (same layout) and gives its values."""
    args, kwargs = _case(op, rng, "float64", 2, 5, 4)
    out = getattr(R, op + "_forward")(*args, **kwargs)
    if op == "cross_entropy":
        a, b = F.cross_entropy_backward(np.asarray(1.0), out[1]), R.cross_entropy_backward(np.asarray(1.0), out[1])
    else:
        up = rng.standard_normal(np.shape(out[0]))
        a = _as_tuple(getattr(F, op + "_backward")(up, out[1]))
        b = _as_tuple(getattr(R, op + "_backward")(up, out[1]))
    for x, y in zip(_as_tuple(a), _as_tuple(b), strict=True):
        if y is not None:
            assert_close(x, y, "float64", "port", op)


def test_results_do_not_depend_on_blas_or_numba_threads(rng):
    """No prange and a fixed reduction order: one call gives bit-identical results twice."""
    x = rng.standard_normal((4, 9, 16))
    g = rng.standard_normal(16)
    y1, c1 = F.rmsnorm_forward(x, g)
    y2, _ = F.rmsnorm_forward(x, g)
    np.testing.assert_array_equal(y1, y2)
    d1 = F.rmsnorm_backward(x, c1)
    np.testing.assert_array_equal(d1[0], F.rmsnorm_backward(x, c1)[0])


def test_bad_input_raises_value_error_naming_the_argument():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="W must have shape"):
        F.linear_forward(x, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="g must have shape"):
        F.rmsnorm_forward(x, np.zeros(3))
    with pytest.raises(ValueError, match="g must have the same precision"):
        F.rmsnorm_forward(x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="tokens must lie in"):
        F.embedding_forward(np.array([[0, 9]]), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="k must have shape"):
        F.attention_forward(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="targets must lie in"):
        F.cross_entropy_forward(np.zeros((2, 3)), np.array([0, 5]))
    with pytest.raises(ValueError, match="x must be a float32 or float64 array"):
        F.swiglu_forward(np.zeros((2, 3), dtype=np.int64), np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="dy must have shape"):
        F.rmsnorm_backward(np.zeros((2, 3, 5)), F.rmsnorm_forward(x, np.ones(4))[1])


def test_complex_input_falls_back_to_the_reference_explicitly(rng):
    x = rng.standard_normal((2, 4)) + 1e-30j
    before = F.FALLBACKS.get("rmsnorm_forward", 0)
    y, _ = F.rmsnorm_forward(x, np.ones(4))
    assert F.FALLBACKS["rmsnorm_forward"] == before + 1
    np.testing.assert_array_equal(y, R.rmsnorm_forward(x, np.ones(4))[0])


def test_registry_resolves_and_cpu_ops_exist():
    for op, (_ref, cpu, gpu) in registry.REGISTRY.items():
        assert callable(registry.load(op, "reference")), op
        if cpu is not None:
            assert callable(registry.load(op, "cpu")), op
        assert gpu is not None and callable(registry.load(op, "gpu")), op  # every op: the reference on CuPy
    with pytest.raises(ValueError, match="no cpu port"):
        registry.load("primitives.layernorm_forward", "cpu")
    with pytest.raises(ValueError, match="unknown op"):
        registry.load("primitives.nope", "cpu")
    assert "model.loss_and_grads" in registry.ported("cpu")


def test_importing_the_package_and_help_never_import_numba():
    code = textwrap.dedent("""
        import sys
        import nlref, nlref.fast, nlref.fast.model, nlref.fast.registry
        from click.testing import CliRunner
        from nlref.cli import cli
        assert CliRunner().invoke(cli, ["--help"]).exit_code == 0
        assert "numba" not in sys.modules, "numba was imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


_NO_JIT = """
import numpy as np
from nlref.fast.cpu import primitives as F, cms as FC, model as FM
from nlref.reference import primitives as R, cms as RC, model as RM
from nlref import config
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 4)); g = rng.standard_normal(4); up = rng.standard_normal((2, 3, 4))
def close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)
    assert err < 1e-10, (what, err)
for op, args in [("rmsnorm", (x, g)), ("l2norm", (x,)), ("gelu", (x,)), ("silu", (x,)), ("sigmoid", (x,)),
                 ("swiglu", (x, rng.standard_normal((5, 4)), rng.standard_normal((5, 4)), rng.standard_normal((4, 5)))),
                 ("rope", (x, np.arange(3)))]:
    yf, cf = getattr(F, op + "_forward")(*args); yr, cr = getattr(R, op + "_forward")(*args)
    close(yf, yr, op)
    gf, gr = getattr(F, op + "_backward")(up, cf), getattr(R, op + "_backward")(up, cr)
    for a, b in zip(gf if isinstance(gf, tuple) else (gf,), gr if isinstance(gr, tuple) else (gr,)):
        close(a, b, op + " backward")
w = rng.standard_normal((4, 4)); s0 = rng.standard_normal((2, 3, 4))
yf, cf, nf = F.conv1d_forward(x, w, None, s0); yr, cr, nr = R.conv1d_forward(x, w, None, s0)
close(yf, yr, "conv"); [close(a, b, "conv backward") for a, b in zip(F.conv1d_backward(up, cf)[::3], R.conv1d_backward(up, cr)[::3])]
q = rng.standard_normal((1, 2, 3, 4)); k = rng.standard_normal((1, 2, 4, 4)); v = rng.standard_normal((1, 2, 4, 2))
yf, cf = F.attention_forward(q, k, v); yr, cr = R.attention_forward(q, k, v); close(yf, yr, "attention")
du = rng.standard_normal(yf.shape)
[close(a, b, "attention backward") for a, b in zip(F.attention_backward(du, cf), R.attention_backward(du, cr))]
lg = rng.standard_normal((2, 3, 5)); t = rng.integers(0, 5, (2, 3))
lf, cf = F.cross_entropy_forward(lg, t); lr, cr = R.cross_entropy_forward(lg, t); close(lf, lr, "ce")
close(F.cross_entropy_backward(np.asarray(1.0), cf), R.cross_entropy_backward(np.asarray(1.0), cr), "ce backward")
tok = rng.integers(0, 6, (2, 3)); E = rng.standard_normal((6, 4))
close(F.embedding_backward(up, F.embedding_forward(tok, E)[1]), R.embedding_backward(up, R.embedding_forward(tok, E)[1]), "emb")
x32 = (4 * x).astype(np.float32); a32 = x32.reshape(-1); u32 = np.flip(a32).copy()  # float32: the vmath path
for name in ("gelu", "silu", "sigmoid"):
    for order in (0, 1):
        got = F._act(name, order, x32); assert got.dtype == np.float32
        err = np.max(np.abs(got - F._act(name, order, x32.astype(np.float64)))) / np.max(np.abs(got))
        assert err < 1e-6, (name, order, err)
h32 = F._swiglu_gate(a32, u32); assert h32.dtype == np.float32
assert np.max(np.abs(h32 - F._swiglu_gate(a32.astype(np.float64), u32.astype(np.float64)))) < 1e-6 * np.max(np.abs(h32))
for name in ("hope-attention-tiny", "transformer-tiny"):
    cfg = config.preset(name)
    p = RM.init_params(cfg, 1); tok = rng.integers(0, cfg.vocab_size, (1, 5))
    lf, gf = FM.loss_and_grads(p, tok, cfg); lr, gr = RM.loss_and_grads(p, tok, cfg)
    close(lf, lr, name); [close(gf[k], gr[k], name + k) for k in gr]
print("no-jit ok")
"""


def test_float32_activations_take_vmath_and_match_the_float64_kernels(rng):
    """float32 silu / gelu / sigmoid (f, f', the pair) and the SwiGLU gate take fast/cpu/vmath.py's
    path (equal to its output) and agree with the float64 libm kernels within the
    ("float32", "activation_vs_float64") row (1e-6) of the largest entry (the port row allows
    5e-4); no fallback. Inputs cover both tails of the GELU."""
    from nlref.fast.cpu import vmath

    bound = tol("float32", "activation_vs_float64")

    x = np.concatenate([np.linspace(-14, 14, 2800), 3 * rng.standard_normal(1000)]).astype(np.float32)
    x = _ro(x.reshape(1, -1, 8))
    kinds = {"silu": vmath.SILU, "gelu": vmath.GELU, "sigmoid": vmath.SIGMOID}
    before = dict(F.FALLBACKS)
    for name, kind in kinds.items():
        for order in (0, 1):
            got = F._act(name, order, x)
            assert got.dtype == np.float32 and got.shape == x.shape
            np.testing.assert_array_equal(got.reshape(-1), vmath.activation(kind, order, x.reshape(-1))[order])
            want = F._act(name, order, x.astype(np.float64))  # the scalar erf/exp kernel
            assert np.max(np.abs(got - want)) <= bound * np.max(np.abs(want)), (name, order)
        if name != "sigmoid":
            f, df = F.act_and_grad(name, x)
            np.testing.assert_array_equal(f, F._act(name, 0, x))
            np.testing.assert_array_equal(df, F._act(name, 1, x))
    a = x.reshape(-1)
    u, dh = _ro(np.flip(a)), _ro(np.roll(a, 3))
    h = F._swiglu_gate(a, u)
    h64 = F._swiglu_gate_kernel(a.astype(np.float64), u.astype(np.float64))
    assert h.dtype == np.float32 and np.max(np.abs(h - h64)) <= bound * np.max(np.abs(h64))
    for got, want in zip(F._swiglu_gate_bwd(dh, a, u), F._swiglu_gate_bwd_kernel(*(v.astype(np.float64) for v in (dh, a, u))),
                         strict=True):  # fmt: skip
        assert got.dtype == np.float32 and np.max(np.abs(got - want)) <= bound * np.max(np.abs(want))
    assert F.FALLBACKS == before


def test_kernels_logic_without_jit():
    """NUMBA_DISABLE_JIT=1: the kernels run as plain Python (the coverage mode) and still agree."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", _NO_JIT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "no-jit ok" in out.stdout, out.stdout + out.stderr
