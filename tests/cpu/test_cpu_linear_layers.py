"""fast.cpu.linear_layers vs reference.linear_layers: outputs, the returned state and every gradient
(SPEC.md#linear-families). The port runs the reference layer over fast/cpu/memory.py's compiled
token loops; the reference over memory.py's chunk forms: the same function, another order of
operations. One hypothesis draw makes a rule, heads, head width, chunk size (not dividing T), a
dtype, a seed and whether the call continues a stream; the upstream gradient reaches both y and
the returned state. Tolerances: ("float64"|"float32", "port"); in float32 a tensor may differ
from the float32 reference by ("float32", "port_vs_own_rounding") times the reference's own
float32 rounding error (against the same layer in float64) where that exceeds the fixed row, the
rule of tests/cpu/test_cpu_titans.py: measured here, a float32 Hebbian layer's W_q gradient (of
size 1e-6, a cancelling sum) is 5.0e-3 from the float32 reference, which is itself that far from
float64."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref.fast.cpu import linear_layers as FL
from nlref.reference import linear_layers as RL


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), 1e-30)


def _close(fast, ref, ref64, dtype, name):
    if dtype == "float64":
        assert_close(fast, ref, dtype, "port", name)
        return
    bound = max(tol(dtype, "port"), tol(dtype, "port_vs_own_rounding") * _rel(ref, ref64))
    assert fast.shape == ref.shape and fast.dtype == ref.dtype, name
    assert _rel(fast, ref) <= bound, f"{name}: rel {_rel(fast, ref):.3e} > {bound:.3e}"


@settings(max_examples=30, deadline=None)
# dh >= 2: at dh = 1 the l2-normalised q and k are +-1 whatever W_q, W_k, so their gradients are
# exactly zero and both sides return rounding noise (measured: 5.0e-11 vs 5.4e-11 in float32)
@given(rule=st.sampled_from(RL.RULES), H=st.integers(1, 3), dh=st.integers(2, 5), chunk=st.integers(1, 5),
       B=st.integers(1, 2), T=st.integers(1, 11), stream=st.booleans(), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**16))
def test_port_equals_reference(rule, H, dh, chunk, B, T, stream, dtype, seed):
    cfg = RL.LinearLayerConfig(d_model=H * dh, n_heads=H, rule=rule, chunk=chunk)
    rng = np.random.default_rng(seed)
    params = {k: v.astype(dtype) for k, v in RL.init_params(cfg, rng).items()}
    x = rng.standard_normal((B, T, cfg.d_model)).astype(dtype)
    state = None
    if stream:  # continue a sequence from the reference's own state
        state = RL.forward(rng.standard_normal((B, 3, cfg.d_model)).astype(dtype), params, cfg)[2]
    y_r, c_r, s_r = RL.forward(x, params, cfg, state)
    y_f, c_f, s_f = FL.forward(x, params, cfg, state)
    dy = rng.standard_normal(y_r.shape).astype(dtype)
    dM = {"M": rng.standard_normal(s_r["M"].shape).astype(dtype)}
    dx_r, g_r, d0_r = RL.backward(dy, c_r, dM)
    dx_f, g_f, d0_f = FL.backward(dy, c_f, dM)
    # the same reference layer in float64 on the same (rounded) inputs: the float32 reference's own error
    def f64(t):
        return None if t is None else {k: np.asarray(v, np.float64) for k, v in t.items()}

    y_6, c_6, s_6 = RL.forward(x.astype(np.float64), f64(params), cfg, f64(state))
    dx_6, g_6, d0_6 = RL.backward(dy.astype(np.float64), c_6, f64(dM))
    assert y_f.dtype == y_r.dtype and list(g_f) == list(g_r)
    _close(y_f, y_r, y_6, dtype, "y")
    _close(s_f["M"], s_r["M"], s_6["M"], dtype, "state M")
    _close(dx_f, dx_r, dx_6, dtype, "dx")
    for k in g_r:
        _close(g_f[k], g_r[k], g_6[k], dtype, k)
    assert (d0_f is None) == (d0_r is None)
    if d0_r is not None:
        _close(d0_f["M"], d0_r["M"], d0_6["M"], dtype, "dstate0")


def test_the_cpu_model_runs_the_port_not_the_reference_layer():
    from nlref.fast.cpu import model as F

    for family in RL.FAMILY_RULES:
        assert F.layer(family) is FL
