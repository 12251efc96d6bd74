"""fast.cpu.memory vs reference.memory: the ported token-loop rules (Hebbian, delta, DGD, Oja) give the
same outputs, final state and every gradient (SPEC.md#memory); the chunk forms and Omega are the
reference's functions (explicit fallbacks). Tolerances: ("float64"|"float32", "port").
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from port_helpers import note
from port_helpers import readonly as _ro
from tolerances import assert_close

from nlref.fast.cpu import memory as FMEM
from nlref.reference import memory as RM
from nlref.reference.cases import memory as RM_cases

PORTED = ("hebbian", "delta", "dgd", "oja")


@given(st.sampled_from(PORTED), st.integers(1, 2), st.integers(1, 7), st.integers(1, 4), st.integers(1, 4),
       st.booleans(), st.booleans(), st.sampled_from(["float32", "float64"]), st.integers(0, 2**16))  # fmt: skip
def test_rule_matches_reference(rule, B, T, dk, dv, with_alpha, with_dM, dtype, seed):
    rng = np.random.default_rng(seed)
    inputs = RM_cases.example_inputs(rng, B, T, dk, dv)
    inputs["M0"] = 0.5 * rng.standard_normal((B, dv, dk))
    inputs = _ro({key: val.astype(dtype) for key, val in inputs.items()})
    saved = {key: val.copy() for key, val in inputs.items()}
    alpha = inputs["alpha"] if with_alpha else None
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["eta"], alpha, inputs["M0"])
    ff, fb = FMEM.RULES[rule]
    rf, rb = RM.RULES[rule]
    yf, Mf, cf = ff(*args)
    yr, Mr, cr = rf(*args)
    for name, a, b in (("y", yf, yr), ("M_T", Mf, Mr)):
        assert a.dtype == b.dtype
        note(f"{name}: {float(np.max(np.abs(a.astype(np.float64) - b))):.3e}")
        assert_close(a, b, dtype, "port", name)
    dy = rng.standard_normal(yr.shape).astype(dtype)
    dM = rng.standard_normal(Mr.shape).astype(dtype) if with_dM else None
    gf, gr = fb(dy, dM, cf), rb(dy, dM, cr)
    assert list(gf) == list(gr)
    for key in gr:
        assert gf[key].dtype == gr[key].dtype
        assert_close(gf[key], gr[key], dtype, "port", key)
    gx = rb(dy, dM, cf)  # the caches are interchangeable
    for key in gr:
        assert_close(gx[key], gr[key], dtype, "port", key)
    for key, val in inputs.items():
        np.testing.assert_array_equal(val, saved[key])


def test_a_wrong_port_would_be_caught():
    rng = np.random.default_rng(0)
    x = RM_cases.example_inputs(rng, 1, 5, 3, 2)
    x["M0"] = rng.standard_normal((1, 2, 3))
    yf, _, cf = FMEM.delta_forward(**x)
    yr, _, cr = RM.delta_forward(**x)
    cf["states"] = cf["states"].copy()
    cf["states"][:, 2] += 1e-3  # a wrong stored state changes the backward
    g = FMEM.delta_backward(np.ones_like(yf), None, cf)
    with pytest.raises(AssertionError):
        assert_close(g["k"], RM.delta_backward(np.ones_like(yr), None, cr)["k"], "float64", "port", "k")


def test_fallbacks_are_the_reference_functions():
    for name in FMEM.FALLBACK:
        assert FMEM.RULES[name] == RM.RULES[name]
    assert set(FMEM.RULES) == set(RM.RULES)


def test_bad_input_raises_like_the_reference():
    rng = np.random.default_rng(0)
    x = RM_cases.example_inputs(rng, 1, 4, 3, 2)
    x["M0"] = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="M0"):
        FMEM.hebbian_forward(**{**x, "M0": np.zeros((1, 3, 3))})
    with pytest.raises(ValueError, match="eta"):
        FMEM.delta_forward(**{**x, "eta": np.zeros((1, 5))})
    with pytest.raises(ValueError, match="dtype"):
        FMEM.oja_forward(**{**x, "v": x["v"].astype(np.float32)})
    y, _, cache = FMEM.delta_forward(**x)
    with pytest.raises(ValueError, match="dy"):
        FMEM.delta_backward(np.zeros((1, 3, 2)), None, cache)
    with pytest.raises(ValueError, match="dM_T"):
        FMEM.delta_backward(np.zeros_like(y), np.zeros((1, 3, 3)), cache)


def test_complex_input_falls_back_to_the_reference():
    rng = np.random.default_rng(0)
    x = {key: val.astype(complex) for key, val in RM_cases.example_inputs(rng, 1, 3, 2, 2).items()}
    x["M0"] = np.zeros((1, 2, 2), dtype=complex)
    yf, _, cf = FMEM.oja_forward(**x)
    yr, _, cr = RM.oja_forward(**x)
    np.testing.assert_array_equal(yf, yr)
    gf, gr = FMEM.oja_backward(np.ones_like(yf), None, cf), RM.oja_backward(np.ones_like(yr), None, cr)
    for key in gr:
        np.testing.assert_array_equal(gf[key], gr[key])


_NOJIT_SCRIPT = """
import numpy as np
from nlref.fast.cpu import memory as FMEM
from nlref.reference import memory as RM
from nlref.reference.cases import memory as RM_cases
import numba
assert numba.config.DISABLE_JIT
rng = np.random.default_rng(0)
for rule in ("hebbian", "delta", "dgd", "oja"):
    x = RM_cases.example_inputs(rng, 2, 4, 3, 2)
    x["M0"] = rng.standard_normal((2, 2, 3))
    yf, Mf, cf = FMEM.RULES[rule][0](**x)
    yr, Mr, cr = RM.RULES[rule][0](**x)
    dy = rng.standard_normal(yr.shape)
    gf, gr = FMEM.RULES[rule][1](dy, Mr, cf), RM.RULES[rule][1](dy, Mr, cr)
    errs = [np.max(np.abs(yf - yr)), np.max(np.abs(Mf - Mr))] + [np.max(np.abs(gf[k] - gr[k])) for k in gr]
    assert max(errs) < 1e-12, (rule, max(errs))
print("ok")
"""


def test_kernels_without_jit_match_the_reference():
    """NUMBA_DISABLE_JIT=1: the kernels' Python logic (coverage mode) still matches the reference."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", _NOJIT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
