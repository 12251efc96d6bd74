"""Primitive layers of the reference: forward/backward pairs in pure NumPy.

SPEC: SPEC.md#primitives. Paper: the building blocks named in NL section 8 and Titans section 4.4
(arXiv 2512.24695v1; Titans arXiv 2501.00663).

Element-wise activations come as value / first / second derivative triples (``silu``,
``dsilu``, ``d2silu``, ...): the second derivatives are needed by the MLP memory's inner-gradient
backward (reference/memory.py). Every function here computes in its input's dtype and accepts
complex input where the function is analytic (so the complex-step gradient check applies).
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# Element-wise activations and their first and second derivatives.
# ---------------------------------------------------------------------------------------------


def sigmoid(x):
    """s(x) = 1 / (1 + exp(-x)), evaluated without overflow for real input."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return 1.0 / (1.0 + np.exp(-x))
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def dsigmoid(x):
    s = sigmoid(x)
    return s * (1 - s)


def d2sigmoid(x):
    s = sigmoid(x)
    return s * (1 - s) * (1 - 2 * s)


def silu(x):
    """silu(x) = x s(x)."""
    return x * sigmoid(x)


def dsilu(x):
    s = sigmoid(x)
    return s * (1 + x * (1 - s))


def d2silu(x):
    s = sigmoid(x)
    ds = s * (1 - s)
    return 2 * ds + x * ds * (1 - 2 * s)


_SQRT_2 = np.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def _erf(x):
    from scipy.special import erf

    return erf(x)


def gelu(x):
    """Exact GELU, x Phi(x) with Phi the standard normal CDF (torch's default)."""
    return 0.5 * x * (1.0 + _erf(x / _SQRT_2))


def dgelu(x):
    return 0.5 * (1.0 + _erf(x / _SQRT_2)) + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def d2gelu(x):
    return _INV_SQRT_2PI * np.exp(-0.5 * x * x) * (2.0 - x * x)


def softplus(x):
    """log(1 + exp(x)), stable for real input."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return np.log1p(np.exp(x))
    return np.logaddexp(0.0, x).astype(x.dtype, copy=False)


def dsoftplus(x):
    return sigmoid(x)


def d2softplus(x):
    return dsigmoid(x)


ACTIVATIONS = {
    "sigmoid": (sigmoid, dsigmoid, d2sigmoid),
    "silu": (silu, dsilu, d2silu),
    "gelu": (gelu, dgelu, d2gelu),
    "softplus": (softplus, dsoftplus, d2softplus),
}
"""name -> (f, f', f''), the element-wise functions the memories and gates may use."""
