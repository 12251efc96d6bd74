"""fast.cpu.selfmod_chunk (the UT form of the key-side writes) vs the token sweep and the reference.

SPEC.md#fast-cpu (the switch ``fast.cpu.selfmod.KEY_WRITES`` and its ``auto`` rule); derivation
docs/selfmod-chunk.md §§2-3 (forward) and §7 (backward). ``key_write_ut`` / ``key_write_ut_backward``
compute the same function as the compiled token loop (``KEY_WRITES = "sweep"``: ``_key_write`` and
``_key_write_backward``) and as the reference's writes (reference/selfmod_memory.py ``write_tokens`` /
``write_tokens_backward``, the token loop; reference/selfmod_chunk.py ``write_chunk_ut`` /
``write_chunk_ut_backward``, the same UT form on dense gradients), for the factored inner gradients
G_t = l_t k_t^T of the key side. Draws: segments of 1-64 tokens, head widths 8-64 (where ``auto``
takes the UT form), float32 and float64, with and without momentum; every output and every returned
gradient. Inputs as tests/reference/test_selfmod_chunk_backward.py: unit keys, eta' in (0, 0.5),
alpha in (0.5, 1], beta in (0, 1).

Tolerances (tests/tolerances.py), each tensor relative to its largest entry, no floors: float64
within ("float64", "port"); float32 within max(("float32", "port"), ("float32",
"port_vs_own_rounding") x the float32 oracle's own error against its float64 value), the rule of
tests/cpu/test_cpu_selfmod.py (a cancelling sum such as dbeta rounds in every float32 evaluation).

The ``auto`` rule (``ut_is_accurate``: head width >= 8 and segment <= 64) is measured by
``measure_accuracy`` (``python tests/cpu/test_cpu_selfmod_chunk.py`` prints its table);
``test_auto_rule_boundary_is_the_measured_one`` pins both sides of the boundary.
"""

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from port_helpers import note
from port_helpers import readonly as _ro
from strategies import DTYPES, SEEDS
from tolerances import tol

from nlref.fast.cpu import selfmod as FS
from nlref.fast.cpu import selfmod_chunk as SC
from nlref.reference import selfmod_chunk as RC
from nlref.reference import selfmod_memory as SMM

OUTS = ("P", "S")  # key_write's returns
GRADS = ("dP0", "dS0", "dL", "dK", "dep", "dalpha", "dbeta")  # key_write_backward's returns


@contextlib.contextmanager
def key_writes(form):
    """``fast.cpu.selfmod.KEY_WRITES`` set to ``form`` for the block (hypothesis tests cannot take
    the function-scoped monkeypatch fixture)."""
    saved = FS.KEY_WRITES
    FS.KEY_WRITES = form
    try:
        yield
    finally:
        FS.KEY_WRITES = saved


def _inputs(rng, B, H, n, a, b, momentum):
    """key_write's arguments in float64 and the upstream adjoints (dP, dS); without momentum S0 = 0,
    beta None and dS = 0 (the layer's convention: no momentum state)."""
    P0 = rng.standard_normal((B, H, a, b))
    S0 = rng.standard_normal((B, H, a, b)) if momentum else np.zeros((B, H, a, b))
    L = rng.standard_normal((B, H, n, a))
    K = rng.standard_normal((B, H, n, b))
    K /= np.linalg.norm(K, axis=-1, keepdims=True)
    ep = rng.uniform(0.0, 0.5, (B, H, n))
    alpha = 1.0 - rng.uniform(0.0, 0.5, (B, H, n))
    beta = rng.uniform(0.0, 1.0, H) if momentum else None
    dP = rng.standard_normal((B, H, a, b))
    dS = rng.standard_normal((B, H, a, b)) if momentum else np.zeros((B, H, a, b))
    return (P0, S0, L, K, ep, alpha, beta), dP, dS


def _cast(args, dtype):
    return tuple(x.astype(dtype) if isinstance(x, np.ndarray) else x for x in args)


def _ut(args, dP, dS):
    """The UT form: {name: tensor} of the two outputs and the seven gradients."""
    out = SC.key_write_ut(*args) + SC.key_write_ut_backward(dP, dS, *args)
    return dict(zip(OUTS + GRADS, out, strict=True))


def _sweep(args, dP, dS):
    """The compiled token loop (the ``sweep`` path of key_write / key_write_backward)."""
    with key_writes("sweep"):
        out = FS.key_write(*args) + FS.key_write_backward(dP, dS, *args)
    return dict(zip(OUTS + GRADS, out, strict=True))


def _reference(args, dP, dS):
    """reference.selfmod_memory.write_tokens / write_tokens_backward (the token loop on dense
    G_t = l_t k_t^T), mapped to key_write's returns: dL_t = dG_t k_t, dK_t = dk_t + dG_t^T l_t; dbeta
    per head (the port's is per (b, h): compared summed over the batch)."""
    P0, S0, L, K, ep, alpha, beta = args
    G = L[..., :, None] * K[..., None, :]  # (B, H, n, a, b)
    P, S, cache = SMM.write_tokens(P0, S0, G, K, ep, alpha, beta, True)
    dP0, dS0, dG, dk, dep, dal, dbeta = SMM.write_tokens_backward(dP, dS, cache)
    dL = np.einsum("zhnac,zhnc->zhna", dG, K)
    dK = dk + np.einsum("zhnac,zhna->zhnc", dG, L)
    return dict(P=P, S=S, dP0=dP0, dS0=dS0, dL=dL, dK=dK, dep=dep, dalpha=dal, dbeta=dbeta)


def _reference_ut(args, dP, dS):
    """reference.selfmod_chunk.write_chunk_ut / write_chunk_ut_backward (the UT form on dense G)."""
    P0, S0, L, K, ep, alpha, beta = args
    G = L[..., :, None] * K[..., None, :]
    P, S, cache = RC.write_chunk_ut(P0, S0, G, K, ep, alpha, beta, True)
    dP0, dS0, dG, dk, dep, dal, dbeta = RC.write_chunk_ut_backward(dP, dS, cache)
    dL = np.einsum("zhnac,zhnc->zhna", dG, K)
    dK = dk + np.einsum("zhnac,zhna->zhnc", dG, L)
    return dict(P=P, S=S, dP0=dP0, dS0=dS0, dL=dL, dK=dK, dep=dep, dalpha=dal, dbeta=dbeta)


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x - ref))) / max(float(np.max(np.abs(ref))), 1e-300)


def _comparable(got, ref, momentum):
    """The tensors to compare: without momentum there is no momentum state, so dS0 (zero in the
    port, None in the reference) and dbeta (the sweep's is <dS~, S_{t-1}> at beta = 0, unused by the
    layer; the UT form's and the reference's are None/zero) are left out; dbeta summed over the
    batch where the oracle's is per head."""
    out = {}
    for name in OUTS + GRADS:
        if not momentum and name in ("dS0", "dbeta"):
            continue
        g, r = got[name], ref[name]
        if name == "dbeta" and np.ndim(g) == 2 and np.ndim(r) == 1:
            g = np.asarray(g).sum(axis=0)
        out[name] = (g, r)
    return out


def _check(got, ref64, dtype, momentum, own=None, label=""):
    """``got`` (in ``dtype``) against the float64 oracle ``ref64``; in float32 ``own`` is the float32
    oracle, whose own error against ``ref64`` may widen the bound (module docstring)."""
    errs, bad = {}, {}
    for name, (g, r) in _comparable(got, ref64, momentum).items():
        assert isinstance(g, np.ndarray) and g.dtype == np.dtype(dtype), f"{label}{name}: dtype"
        e = _rel(g, r)
        bound = tol(dtype, "port")
        if own is not None:
            o = _rel(_comparable(own, ref64, momentum)[name][0], r)
            bound = max(bound, tol(dtype, "port_vs_own_rounding") * o)
        errs[name] = e
        if not e <= bound:
            bad[name] = (e, bound)
    note(f"{label}errors {errs}")
    assert not bad, f"{label}{bad}"
    return errs


def _compare(oracle, n, a, b, B, H, momentum, dtype, seed):
    args, dP, dS = _inputs(np.random.default_rng(seed), B, H, n, a, b, momentum)
    ref64 = oracle(args, dP, dS)
    if dtype == "float64":
        ro = tuple(_ro(x) for x in args), _ro(dP), _ro(dS)  # read-only: the UT form writes no input
        return _check(_ut(*ro), ref64, dtype, momentum, label="float64: ")
    a32, dP32, dS32 = _cast(args, np.float32), dP.astype(np.float32), dS.astype(np.float32)
    return _check(_ut(a32, dP32, dS32), ref64, dtype, momentum, own=oracle(a32, dP32, dS32), label="float32: ")


@given(n=st.integers(1, 64), a=st.sampled_from([1, 3, 8, 17, 32, 64, 128]), b=st.integers(8, 64),
       B=st.integers(1, 2), H=st.integers(1, 3), momentum=st.booleans(), dtype=DTYPES, seed=SEEDS)  # fmt: skip
def test_ut_form_equals_the_token_sweep(n, a, b, B, H, momentum, dtype, seed):
    """key_write_ut / key_write_ut_backward == the compiled token loop, every output and gradient
    (float32: the UT form in float32 against the float64 sweep, the float32 sweep's own error as the
    rounding reference)."""
    _compare(_sweep, n, a, b, B, H, momentum, dtype, seed)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("n, a, b", [(64, 128, 8), (64, 128, 64), (64, 8, 8), (1, 1, 8), (16, 128, 32), (16, 32, 32)])
def test_ut_form_equals_the_token_sweep_at_the_corners(n, a, b, momentum, dtype):
    """The same at the corners of the rule's region and at hope-small's sizes (W2: a = 128, M: a = dh
    = 32, 16-token segments), which hypothesis may not draw."""
    _compare(_sweep, n, a, b, 2, 4, momentum, dtype, 7 * n + a + b)


@given(n=st.integers(1, 64), a=st.sampled_from([1, 2, 5, 8, 16]), b=st.integers(8, 64),
       B=st.integers(1, 2), H=st.integers(1, 2), momentum=st.booleans(), dtype=DTYPES, seed=SEEDS)  # fmt: skip
def test_ut_form_equals_the_reference_token_writes(n, a, b, B, H, momentum, dtype, seed):
    """key_write_ut / key_write_ut_backward == reference.selfmod_memory.write_tokens and
    write_tokens_backward (the specification's token loop) on the dense gradients l_t k_t^T."""
    _compare(_reference, n, a, b, B, H, momentum, dtype, seed)


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("n, a, b", [(1, 4, 8), (16, 16, 32), (64, 8, 8), (37, 5, 64)])
def test_ut_form_equals_the_reference_ut_form(n, a, b, momentum):
    """The port against reference.selfmod_chunk.write_chunk_ut / write_chunk_ut_backward (the same
    algebra on dense G), float64, and the reference UT form against its token loop (so the three
    agree)."""
    args, dP, dS = _inputs(np.random.default_rng(n * 1000 + b), 2, 2, n, a, b, momentum)
    ref = _reference_ut(args, dP, dS)
    _check(_ut(args, dP, dS), ref, "float64", momentum)
    _check({k: (np.zeros_like(args[0]) if v is None else v) for k, v in ref.items()},
           _reference(args, dP, dS), "float64", momentum)  # fmt: skip


def test_no_momentum_returns_the_sweeps_momentum_and_zero_dS0():
    """beta None: S_end = -eta'_n l_n k_n^T (the sweep's S at beta = 0), dS0 = 0, dbeta = 0 (no
    momentum state), S0 may be None."""
    args, dP, dS = _inputs(np.random.default_rng(3), 2, 2, 9, 6, 8, False)
    P0, _, L, K, ep, alpha, _ = args
    P, S = SC.key_write_ut(P0, None, L, K, ep, alpha, None)
    np.testing.assert_allclose(S, -ep[:, :, -1, None, None] * L[:, :, -1, :, None] * K[:, :, -1, None, :], rtol=1e-14)
    sw = _sweep(args, dP, dS)
    np.testing.assert_allclose(P, sw["P"], rtol=0, atol=1e-13 * np.max(np.abs(sw["P"])))
    g = SC.key_write_ut_backward(dP, None, P0, None, L, K, ep, alpha, None)
    assert not np.any(g[1]) and not np.any(g[6])


def test_a_wrong_ut_form_would_be_caught():
    """The comparison sees a dropped term: without the reads' coupling (r~ = w~ in the adjoint solve,
    i.e. L = 0 there) the gradients are far outside the port row."""
    args, dP, dS = _inputs(np.random.default_rng(4), 1, 2, 12, 8, 8, True)
    ref = _sweep(args, dP, dS)
    real = SC._ut_read_adjoints

    def uncoupled(dPK, dSK, K, ep, beta, momentum, D, E, c, KK, *rest):
        return real(dPK, dSK, K, ep, beta, momentum, D, E, c, np.zeros_like(KK), *rest)

    SC._ut_read_adjoints = uncoupled
    try:
        got = _ut(args, dP, dS)
    finally:
        SC._ut_read_adjoints = real
    with pytest.raises(AssertionError):
        _check(got, ref, "float64", True)


# ---------------------------------------------------------------------------------------------
# The switch and the pinned auto rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form, b, n, want", [
    ("auto", 7, 16, "sweep"), ("auto", 4, 16, "sweep"), ("auto", 1, 1, "sweep"),
    ("auto", 8, 64, "ut"), ("auto", 8, 65, "sweep"), ("auto", 32, 16, "ut"), ("auto", 64, 1, "ut"),
    ("auto", 64, 100, "sweep"), ("ut", 2, 100, "ut"), ("sweep", 32, 16, "sweep")])  # fmt: skip
def test_switch_picks_the_form(form, b, n, want, monkeypatch):
    """``auto`` takes the sweep below head width 8 and above 64 tokens, the UT form otherwise; ``ut``
    and ``sweep`` always take theirs; forward and backward alike."""
    called = []
    real_f, real_b = SC.key_write_ut, SC.key_write_ut_backward
    monkeypatch.setattr(SC, "key_write_ut", lambda *a: called.append("f") or real_f(*a))
    monkeypatch.setattr(SC, "key_write_ut_backward", lambda *a: called.append("b") or real_b(*a))
    monkeypatch.setattr(FS, "KEY_WRITES", form)
    assert FS.ut_is_accurate(b, n) == (b >= 8 and n <= 64)
    args, dP, dS = _inputs(np.random.default_rng(0), 1, 1, n, 3, b, True)
    FS.key_write(*args)
    FS.key_write_backward(dP, dS, *args)
    assert called == (["f", "b"] if want == "ut" else [])


def test_environment_variable_sets_the_switch():
    """NL_CPU_KEY_WRITES is read at import; a value outside {auto, sweep, ut} is a ValueError naming
    the variable and its choices."""
    code = "import nlref.fast.cpu.selfmod as F; print(F.KEY_WRITES)"
    env = dict(os.environ, NL_CPU_KEY_WRITES="ut")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ut", out.stderr
    env["NL_CPU_KEY_WRITES"] = "fast"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "NL_CPU_KEY_WRITES='fast'" in out.stderr and "auto, sweep, ut" in out.stderr


def measure_accuracy(b, n, a=16, seeds=8, B=2, H=2):
    """The float32 UT form's and the float32 sweep's worst error against the float64 sweep over every
    output and gradient (each relative to its largest entry), over ``seeds`` draws of ``_inputs``
    (momentum on and off alternately), and the float64 UT form's. -> (ut32, sweep32, ut64, worst,
    start): worst = ut32 / sweep32; start = the worst ut32 / max(sweep32, 1e-7) of one tensor carried
    from the chunk-start state (P, dP0, dS0), the part whose rounding is relative to D[n, 0] |P_0|
    (docs/selfmod-chunk.md §7.6; the other tensors keep the sweep's relative accuracy, and their
    per-tensor ratio is rounding noise of 2-5 in the cancelling sums, dbeta, in both forms)."""
    rng = np.random.default_rng(1000 * b + n)
    ut32 = sw32 = ut64 = start = 0.0
    for s in range(seeds):
        momentum = s % 2 == 0
        args, dP, dS = _inputs(rng, B, H, n, a, b, momentum)
        ref = _sweep(args, dP, dS)
        a32, dP32, dS32 = _cast(args, np.float32), dP.astype(np.float32), dS.astype(np.float32)
        g32, o32 = _comparable(_ut(a32, dP32, dS32), ref, momentum), _comparable(_sweep(a32, dP32, dS32), ref, momentum)
        g64 = _comparable(_ut(args, dP, dS), ref, momentum)
        for name, (g, r) in g32.items():
            e, o = _rel(g, r), _rel(o32[name][0], r)
            ut32, sw32, ut64 = max(ut32, e), max(sw32, o), max(ut64, _rel(g64[name][0], r))
            if name in ("P", "dP0", "dS0"):
                start = max(start, e / max(o, 1e-7))
    return ut32, sw32, ut64, ut32 / sw32, start


START_RATIO = 8.0
"""The bound on ``measure_accuracy``'s chunk-start ratio that separates the ``auto`` rule's corner
(b = 8, n = 64: measured 5.9) from the cases just outside it (b = 4, n = 64: 33; b = 8, n = 128: 27)."""


def test_auto_rule_boundary_is_the_measured_one():
    """At the rule's corner (b = 8, n = 64: its narrowest heads at its longest segments) the float32
    UT form's worst error is within ("float32", "port_vs_own_rounding") x the float32 sweep's worst
    and within the port row, its chunk-start tensors within START_RATIO x the sweep's; just outside
    (b = 4 at n = 64, b = 8 at n = 128) the chunk-start tensors lose more than that, and at b = 2,
    n = 64 the UT form is far outside the port row (docs/selfmod-chunk.md §7.6: the chunk-start part
    is accurate only relative to D[n, 0] |P_0|, which the shrinks outrun over long segments of few
    key directions)."""
    factor = tol("float32", "port_vs_own_rounding")
    ut32, _, ut64, worst, start = measure_accuracy(8, 64)
    note(f"b=8 n=64: ut32 {ut32:.2e} ut64 {ut64:.2e} worst {worst:.1f} start {start:.1f}")
    assert worst <= factor and ut32 <= tol("float32", "port") and start <= START_RATIO
    assert ut64 <= tol("float64", "port")
    for b, n in ((4, 64), (8, 128)):
        outside = measure_accuracy(b, n)
        assert outside[4] > START_RATIO, (b, n, outside)
    assert measure_accuracy(2, 64, seeds=2)[0] > tol("float32", "port")


if __name__ == "__main__":  # the table behind ut_is_accurate: PYTHONPATH=tests python tests/cpu/test_cpu_selfmod_chunk.py
    print("  b    n  float32 UT  float32 sweep  float64 UT  UT/sweep  chunk-start UT/sweep (float32)")
    for b in (1, 2, 4, 8, 16, 32, 64):
        for n in (16, 32, 64, 128):
            ut32, sw32, ut64, worst, start = measure_accuracy(b, n)
            print(f"{b:3d} {n:4d}  {ut32:10.1e}  {sw32:13.1e}  {ut64:10.1e}  {worst:8.1f}  {start:9.3g}", flush=True)
