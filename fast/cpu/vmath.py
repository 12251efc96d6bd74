"""Vectorised float32 activations for the CPU port: sigmoid, SiLU, GELU and their two derivatives.

Paper: the activations of NL §8.1 (the MLP memory's sigma, Eq. (89)) and the Llama blocks of
NL §8.3 / Titans §4.4 (SiLU gate, GELU), arXiv 2512.24695v1. SPEC: SPEC.md#primitives (the
definitions: GELU is the exact x Phi(x)), SPEC.md#fast-cpu (the float32 fast path of the port).

The float64 kernels of fast/cpu/primitives.py and fast/cpu/mlp_memory.py call the scalar libm
``erf`` / ``exp`` per element, with a branch for the stable sigmoid: ~9-10 ns per element, and
LLVM cannot vectorise them. In float32 (the training dtype) this module computes the same
functions in two passes instead:

1. ``exp_neg_abs`` / ``exp_neg_half_square``: e = exp(-|x|) or exp(-x^2/2) for the whole flat
   array through NumPy's SIMD ``np.exp`` (measured 0.54 ns per float32 element, 0.95 in float64);
2. one compiled loop per output set (``act32``), branch-free float32 arithmetic (selects, float32
   constants, so nothing promotes to float64) that LLVM vectorises.

Symbols (paper symbol -> code name):

    sigma(x) = 1 / (1 + e^-x)       s        (and c = 1 - s = sigma(-x), kept separately)
    Phi(x), phi(x)                   cdf, pdf (standard normal cdf and density)
    erfc(z), erfcx(z) = e^(z^2) erfc(z)
    e                                exp(-|x|) (sigmoid family) or exp(-x^2/2) (GELU)

Decisions (SPEC.md#fast-cpu):
    - sigmoid: r = 1 / (1 + e), e = exp(-|x|); then {s, c} = {r, e r} selected by the sign of x.
      Both s and 1 - s carry full relative precision, so s' = s c never cancels;
    - Phi uses erfc of a non-negative argument only: Phi(x) = h for x < 0 and 1 - h for x >= 0,
      h = erfc(|x| / sqrt 2) / 2, so the relative accuracy holds in both tails;
    - erfc(z) = exp(-z^2) t Q(u), t = 2 / (2 + z), u = 2 t - 1, Q a degree-10 polynomial fitted by
      scripts/fit_erfc.py (relative error 1.2e-8 in float64, 2.9e-7 = ~2.4 ulps in float32). One
      exp(-x^2/2) serves both the cdf and the pdf;
    - the exp's argument -x^2/2 is rounded to float32 before NumPy's exp sees it: that rounding is
      up to 2.6e-6 absolute at |x| = 13 (where phi underflows), i.e. a 2.6e-6 relative error of
      phi (measured 4.1e-6 of the GELU if left alone). ``_square`` splits x^2 = p + err exactly
      (Dekker's product in float32: LLVM does not contract a * b + c into an FMA without
      fastmath, so the split is exact), the exp sees -p/2 and ``_gauss`` multiplies by
      exp(-err/2) = 1 - err/2. p + err also keeps GELU'' = phi (2 - x^2) accurate at its zero
      (2 - p is exact there, Sterbenz). Measured per element, GELU loop: 0.65-0.70 ns like this,
      1.0-1.3 ns with the exact square and the product taken in float64 instead;
    - ``error_model="numpy"``: Numba's default Python error model tests every float division for a
      zero divisor (to raise ZeroDivisionError), a branch that stops vectorisation: 2 / (2 + |x|)
      measured 3.3 ns per element with it, 0.32 without. The divisors here are >= 1 anyway;
    - the scalar helpers are ``inline="always"`` (inlined in Numba's IR): called through Numba's
      calling convention they are opaque to LLVM and nothing vectorises (measured per element:
      sigmoid/SiLU 2.5 ns, GELU 10 ns called; 0.12-0.23 ns and 1.0-1.3 ns inlined, the GELU
      then still with a float64 square);
    - the loops are unswitched by hand on which outputs are wanted (``mode``), so each loop body is
      straight-line code after inlining (the ``kind`` test is loop-invariant: LLVM hoists it).

Accuracy (tests/cpu/test_cpu_vmath.py, against scipy.special in float64 on a dense grid of
844,003 float32 inputs covering both tails up to underflow and out to 3e38): worst relative error
4.9e-7 (sigmoid''), 4.7e-7 (GELU), i.e. ~4 float32 ulps; f' and f'' relative to the magnitudes of
the terms summed (f' of GELU and SiLU crosses zero), floored near the float32 underflow.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

SIGMOID, SILU, GELU = 0, 1, 2
"""The activation codes of ``act32``."""

F, DF, F_DF, F_DF_D2F = 0, 1, 2, 3
"""``mode`` of ``act32``: which outputs it writes (f, f', (f, f'), (f, f', f''))."""

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_HALF = np.float32(0.5)
_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = np.float32(1.0 / math.sqrt(2.0 * math.pi))

# Q(u) of erfcx(z) = t Q(u), u^0 first: printed by scripts/fit_erfc.py (degree 10).
_Q0 = np.float32(0.5107913568226601)
_Q1 = np.float32(0.34358031765452013)
_Q2 = np.float32(0.1397357372747205)
_Q3 = np.float32(0.018221683841477952)
_Q4 = np.float32(-0.010751651348407238)
_Q5 = np.float32(-0.0032435045765005083)
_Q6 = np.float32(0.0015292178957009364)
_Q7 = np.float32(0.00043074142641429054)
_Q8 = np.float32(-0.0002994437957139459)
_Q9 = np.float32(-3.6633645485001786e-05)
_Q10 = np.float32(4.218304035118509e-05)


# ---------------------------------------------------------------------------------------------
# Pass 1: the exponentials (NumPy's SIMD exp over the whole array).
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def _neg_abs(x, out):
    for i in range(x.size):
        out[i] = -abs(x[i])


_SPLIT = np.float32(4097.0)
"""2^12 + 1: splits a 24-bit float32 significand into two 12-bit halves (Dekker / Veltkamp)."""
_XMAX = np.float32(1.0e4)
"""|x| is clamped here inside ``_square``: exp(-x^2/2) underflows to 0 beyond |x| = 14 already, and
the split's 4097 |x| would overflow float32 beyond 8e34 (inf - inf = nan)."""


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _square(v):
    """(p, err) with p + err = min(|x|, 1e4)^2 exactly: p = fl(x^2), err its rounding error (Dekker)."""
    x = min(abs(v), _XMAX)
    c = _SPLIT * x
    xh = c - (c - x)
    xl = x - xh
    p = x * x
    err = ((xh * xh - p) + _TWO * xh * xl) + xl * xl
    return p, err


@njit(cache=True, nogil=True, error_model="numpy")
def _neg_half_square(x, out):
    for i in range(x.size):
        p, _ = _square(x[i])
        out[i] = -_HALF * p


def exp_neg_abs(x: np.ndarray) -> np.ndarray:
    """exp(-|x|) of a flat float32 array (the sigmoid family's one exponential)."""
    e = np.empty_like(x)
    _neg_abs(x, e)
    return np.exp(e, out=e)


def exp_neg_half_square(x: np.ndarray) -> np.ndarray:
    """exp(-p/2), p = fl(x^2), of a flat float32 array; ``_gauss`` adds the rounding of x^2."""
    e = np.empty_like(x)
    _neg_half_square(x, e)
    return np.exp(e, out=e)


def exp_for(kind: int, x: np.ndarray) -> np.ndarray:
    """The exponential ``act32`` expects for that activation code."""
    return exp_neg_half_square(x) if kind == GELU else exp_neg_abs(x)


# ---------------------------------------------------------------------------------------------
# Scalar pieces (inlined into the loops).
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def sigmoid_pair(x, e):
    """(sigma(x), 1 - sigma(x)) from e = exp(-|x|), each to full relative precision."""
    r = _ONE / (_ONE + e)
    small = e * r
    s = r if x >= _ZERO else small
    c = small if x >= _ZERO else r
    return s, c


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _gauss(x, e_hi):
    """(exp(-x^2/2), p, err) from e_hi = exp(-p/2): exp(-(p + err)/2) = e_hi (1 - err/2), |err/2| <= 2.6e-6
    where e_hi is not 0."""
    p, err = _square(x)
    return e_hi - e_hi * (_HALF * err), p, err


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def phi_lower(ax, g):
    """Phi(-|x|) = erfc(|x| / sqrt 2) / 2 from ax = |x| and g = exp(-x^2/2)."""
    z = ax * _INV_SQRT2
    t = _TWO / (_TWO + z)
    u = _TWO * t - _ONE
    q = ((((((((((_Q10 * u + _Q9) * u + _Q8) * u + _Q7) * u + _Q6) * u + _Q5) * u + _Q4) * u + _Q3) * u + _Q2)
          * u + _Q1) * u + _Q0)  # fmt: skip
    return _HALF * g * t * q


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def triple(kind, x, e):
    """(f(x), f'(x), f''(x)) of sigmoid / silu / gelu (``kind``) in float32, from ``exp_for(kind)``'s e."""
    if kind == GELU:
        g, p, err = _gauss(x, e)
        h = phi_lower(abs(x), g)
        cdf = _ONE - h if x >= _ZERO else h
        pdf = _INV_SQRT_2PI * g
        return x * cdf, cdf + x * pdf, pdf * ((_TWO - p) - err)
    s, c = sigmoid_pair(x, e)
    ds = s * c
    if kind == SILU:
        return x * s, s * (_ONE + x * c), ds * (_TWO + x * (c - s))
    return s, ds, ds * (c - s)


# ---------------------------------------------------------------------------------------------
# Pass 2: the loops.
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def act32(x, e, kind, mode, f, df, d2f):
    """Writes f(x) (mode F), f'(x) (DF), both (F_DF) or all three (F_DF_D2F) of activation ``kind``
    element-wise over flat float32 arrays; e = ``exp_for(kind, x)``. Outputs not written may be
    empty."""
    n = x.size
    if mode == F:
        for i in range(n):
            f[i] = triple(kind, x[i], e[i])[0]
    elif mode == DF:
        for i in range(n):
            df[i] = triple(kind, x[i], e[i])[1]
    elif mode == F_DF:
        for i in range(n):
            a, b, _ = triple(kind, x[i], e[i])
            f[i] = a
            df[i] = b
    else:
        for i in range(n):
            a, b, c = triple(kind, x[i], e[i])
            f[i] = a
            df[i] = b
            d2f[i] = c


def activation(kind: int, mode: int, x: np.ndarray):
    """(f, f', f'') of a flat C-contiguous float32 array, the ones ``mode`` does not ask for None."""
    e = exp_for(kind, x)
    empty = np.empty(0, dtype=np.float32)
    f = np.empty_like(x) if mode != DF else empty
    df = np.empty_like(x) if mode != F else empty
    d2f = np.empty_like(x) if mode == F_DF_D2F else empty
    act32(x, e, kind, mode, f, df, d2f)
    return (f if mode != DF else None, df if mode != F else None, d2f if mode == F_DF_D2F else None)


@njit(cache=True, nogil=True, error_model="numpy")
def swiglu_gate32(a, u, e):
    """h = silu(a) u over flat float32 arrays; e = exp(-|a|)."""
    h = np.empty_like(a)
    for i in range(a.size):
        s, _ = sigmoid_pair(a[i], e[i])
        h[i] = a[i] * s * u[i]
    return h


@njit(cache=True, nogil=True, error_model="numpy")
def swiglu_gate_bwd32(dh, a, u, e):
    """da = dh u silu'(a), du = dh silu(a) over flat float32 arrays; e = exp(-|a|)."""
    da = np.empty_like(a)
    du = np.empty_like(a)
    for i in range(a.size):
        v = a[i]
        s, c = sigmoid_pair(v, e[i])
        da[i] = dh[i] * u[i] * (s * (_ONE + v * c))
        du[i] = dh[i] * v * s
    return da, du
