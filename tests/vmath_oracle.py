"""The float64 oracle of fast/cpu/vmath.py's float32 activations (not a test file): the inputs, the
truth from SciPy and the error measure of tests/cpu/test_cpu_vmath.py, also run by that file's
NUMBA_DISABLE_JIT=1 subprocess and by scripts/calibrate_tolerances.py (the ("float32",
"activation_vs_float64") row of tests/tolerances.py).

The oracle is independent of the code under test: scipy.special.ndtr / expit and NumPy's float64
exp, evaluated at the float32 inputs converted exactly to float64. A value is compared relative to
itself where it is a normal float32; f' and f'' of SiLU and GELU are sums that cross zero, so they
are compared relative to the sum of the magnitudes of their terms, floored near the float32
underflow (``worst_error``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, ndtr
from tolerances import tol

from nlref.fast.cpu import vmath as V

ULPS_BOUND = tol("float32", "activation_vs_float64")
"""Max relative error (1e-6, ~8 float32 ulps of 1.2e-7; tests/tolerances.py). Measured worst over the grid: sigmoid (f, f', f'')
2.6e-7 / 3.6e-7 / 4.9e-7, SiLU 2.9e-7 / 3.1e-7 / 3.5e-7, GELU 4.7e-7 / 3.3e-7 / 3.1e-7; the erfc fit
alone is 2.9e-7 in float32 (scripts/fit_erfc.py); without the exp-argument correction the GELU's
is 4.1e-6."""

TINY = float(np.finfo(np.float32).tiny)


def grid() -> np.ndarray:
    """float32 test inputs: dense over both tails, geometric near 0, extremes; both signs."""
    pos = np.concatenate([np.linspace(0.0, 14.0, 400_001), np.geomspace(1e-30, 1.0, 20_001),
                          np.geomspace(14.0, 3.0e38, 2_001)])  # fmt: skip
    return np.unique(np.concatenate([pos, -pos]).astype(np.float32))


def truth(kind: int, x32: np.ndarray):
    """(f, f', f'') in float64 and the scale each is compared at."""
    x = x32.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if kind == V.GELU:
            cdf = ndtr(x)
            pdf = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
            f, df, d2f = x * cdf, cdf + x * pdf, pdf * (2.0 - x * x)
            return (f, df, d2f), (np.abs(f), cdf + np.abs(x * pdf), np.abs(d2f))
        s, c = expit(x), expit(-x)
        ds = s * c
        if kind == V.SILU:
            return ((x * s, s + x * ds, ds * (2.0 + x * (c - s))),
                    (np.abs(x * s), s + np.abs(x * ds), ds * (2.0 + np.abs(x))))  # fmt: skip
        return (s, ds, ds * (c - s)), (s, ds, ds)


def worst_error(kind: int, x32: np.ndarray) -> list[float]:
    """Worst error of f, f', f'' relative to their scale, the scale floored at TINY (1 + x^2).

    The floor: where a true value is near the float32 underflow, an intermediate (sigma(x) below
    x = -87, Phi(x) or phi(x) beyond |x| = 13) is already subnormal, rounded to a fixed absolute
    step below TINY 2^-23, and then multiplied by x or (2 - x^2); x^2 is capped at 2^14, beyond
    every such underflow."""
    got = V.activation(kind, V.F_DF_D2F, x32)
    want, scale = truth(kind, x32)
    x = x32.astype(np.float64)
    floor = TINY * (1.0 + np.minimum(x * x, 2.0**14))
    out = []
    for g, w, sc in zip(got, want, scale, strict=True):
        assert g.dtype == np.float32 and g.shape == x32.shape
        finite = np.isfinite(w)
        assert np.array_equal(np.isfinite(g), finite), "non-finite where the truth is finite or back"
        diff = np.abs(g.astype(np.float64) - w)[finite]
        out.append(float(np.max(diff / np.maximum(sc, floor)[finite], initial=0.0)))
    return out
