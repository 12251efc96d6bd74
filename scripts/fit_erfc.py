"""Fit the polynomial of fast/cpu/vmath.py's float32 erfc: erfc(z) = exp(-z^2) t Q(u), z >= 0.

SPEC: SPEC.md#fast-cpu (the float32 activations). With t = 2 / (2 + z) in (0, 1] and u = 2 t - 1 in
(-1, 1], erfcx(z) / t is a smooth function of t on the whole half-line (it tends to 2 / sqrt(pi) *
(1/2) as z -> oo), so one polynomial Q in u covers every z: no range split, no branch. Q is the
weighted (relative-error) least-squares fit on Chebyshev nodes of t, written in the power basis of
u (well conditioned: |coefficients| <= 0.6, so float32 Horner does not cancel). The target is
scipy.special.erfcx in float64.

Run: ``python scripts/fit_erfc.py`` prints the coefficients (paste into fast/cpu/vmath.py's
``_ERFCX_Q``) and the maximum relative error of t Q(u) against erfcx on a dense grid, evaluated in
float64 and in float32 (Horner in float32, as the kernels do). Measured (degree 10): 1.2e-8 (float64)
and 2.8e-7 (float32, ~2.3 float32 ulps, dominated by the rounding of t).
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import chebyshev
from scipy.special import erfcx

DEGREE = 10
NODES = 4000


def fit(degree: int = DEGREE) -> np.ndarray:
    """Power-basis coefficients (ascending) of Q(u), u = 2 t - 1, t = 2 / (2 + z)."""
    k = np.arange(NODES)
    t = 0.5 + 0.5 * np.cos(np.pi * (k + 0.5) / NODES)  # Chebyshev nodes in (0, 1)
    z = 2.0 / t - 2.0
    target = erfcx(z) / t
    V = chebyshev.chebvander(2.0 * t - 1.0, degree) / target[:, None]  # relative-error weights
    c, *_ = np.linalg.lstsq(V, np.ones_like(target), rcond=None)
    return chebyshev.cheb2poly(c)


def evaluate(coef: np.ndarray, z: np.ndarray, dtype) -> np.ndarray:
    """t Q(u) in dtype, Horner from the highest coefficient (the kernels' order of operations)."""
    z = z.astype(dtype)
    one, two = dtype(1.0), dtype(2.0)
    t = two / (two + z)
    u = two * t - one
    q = dtype(coef[-1])
    for c in coef[-2::-1]:
        q = q * u + dtype(c)
    return (t * q).astype(np.float64)


def main() -> None:
    coef = fit()
    print(f"degree {DEGREE}, Q(u) coefficients, u^0 first:")
    for c in coef:
        print(f"    {float(c)!r},")
    z = np.concatenate([np.linspace(0.0, 12.0, 400_001), np.geomspace(12.0, 1e8, 4001)])
    for dtype in (np.float64, np.float32):
        zz = z.astype(dtype).astype(np.float64)  # the argument the dtype can hold
        rel = np.max(np.abs(evaluate(coef, z, dtype) / erfcx(zz) - 1.0))
        print(f"max relative error of erfcx, evaluated in {dtype.__name__}: {rel:.2e}")


if __name__ == "__main__":
    main()
