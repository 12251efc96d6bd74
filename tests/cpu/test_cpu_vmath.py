"""fast/cpu/vmath.py: the float32 activations against SciPy in float64, to a few float32 ulps.

SPEC.md#fast-cpu (the float32 fast path). The oracle is independent of the code under test:
scipy.special.ndtr / expit and NumPy's float64 exp, evaluated at the float32 inputs converted
exactly to float64. The grid is dense over [-14, 14] (both tails down to float32 underflow of
Phi and phi at |x| ~ 13.2), geometric towards 0 and out to the largest float32. A value is
compared relative to itself where it is a normal float32; f' and f'' of SiLU and GELU are sums
that cross zero, so they are compared relative to the sum of the magnitudes of their terms (the
scale at which any float32 evaluation, the reference's included, rounds), floored near the
float32 underflow (``worst_error``). The oracle and the grid are tests/vmath_oracle.py. Plus:
NUMBA_DISABLE_JIT=1 runs the same logic as plain Python and meets the same bounds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import ndtr
from vmath_oracle import TINY, ULPS_BOUND, grid, worst_error

from nlref.fast.cpu import vmath as V


@pytest.mark.parametrize("kind", [V.SIGMOID, V.SILU, V.GELU], ids=["sigmoid", "silu", "gelu"])
def test_float32_activation_is_within_a_few_ulps_of_float64_scipy(kind):
    x = grid()
    errs = worst_error(kind, x)
    assert max(errs) <= ULPS_BOUND, f"kind {kind}: worst errors (f, f', f'') {errs}"
    # the modes that write fewer outputs compute the same numbers
    full = V.activation(kind, V.F_DF_D2F, x)
    for mode, idx in ((V.F, (0,)), (V.DF, (1,)), (V.F_DF, (0, 1))):
        part = V.activation(kind, mode, x)
        for i in idx:
            np.testing.assert_array_equal(part[i], full[i])


def test_gelu_cdf_keeps_relative_precision_in_both_tails():
    """Phi(x) alone (f / x), where a 1 - erfc form or an erf form would lose it: far left tail."""
    x = np.float32(-np.linspace(5.0, 13.0, 2001))
    f = V.activation(V.GELU, V.F, x)[0].astype(np.float64)
    cdf = f / x.astype(np.float64)
    want = ndtr(x.astype(np.float64))
    ok = want >= TINY / 13.0
    assert np.max(np.abs(cdf[ok] / want[ok] - 1.0)) <= ULPS_BOUND


def test_an_erfc_one_coefficient_off_would_be_caught(monkeypatch):
    """The grid test can fail: a 1e-5 change of one coefficient of Q breaks the bound."""
    monkeypatch.setattr(V, "_Q3", np.float32(float(V._Q3) * (1 + 1e-5) + 1e-6))
    x = grid()
    g = np.exp(-0.5 * x.astype(np.float64) ** 2)
    h = np.array([V.phi_lower.py_func(abs(v), np.float32(gv)) for v, gv in zip(x[:: 997], g[:: 997], strict=True)])
    want = ndtr(-np.abs(x[:: 997].astype(np.float64)))
    ok = want >= TINY
    assert np.max(np.abs(h[ok] / want[ok] - 1.0)) > ULPS_BOUND


_NO_JIT = """
import numpy as np
import numba
assert numba.config.DISABLE_JIT
import vmath_oracle as T
from nlref.fast.cpu import vmath as V
x = np.concatenate([np.linspace(-13.5, 13.5, 301), [-1e30, -50.0, 0.0, 1e-20, 50.0, 1e30]]).astype(np.float32)
for kind in (V.SIGMOID, V.SILU, V.GELU):
    errs = T.worst_error(kind, x)
    assert max(errs) <= T.ULPS_BOUND, (kind, errs)
print("no-jit ok")
"""


def test_kernels_logic_without_jit():
    """NUMBA_DISABLE_JIT=1: the same loops as plain Python meet the same bound (coverage mode)."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _NO_JIT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "no-jit ok" in out.stdout, out.stdout + out.stderr
