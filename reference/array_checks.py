"""The reference's input checks: every bad input is a ValueError naming the argument and the
expected shape.

Paper: none (argument checking; no equation). SPEC: SPEC.md#primitives (every float argument of one
call shares one precision: float32 or float64, complex64 / complex128 for the complex-step
gradient check; mixing is a ValueError).

Part of ``reference/primitives.py``, which re-exports every name here (``P.float_array``,
``P.int_array``, ``P.check_shape`` are how the other reference modules and the CPU port,
fast/cpu/primitives.py, call them); its own module so that reference/sequence_ops.py can share
them without importing primitives.

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

import numpy as np

_FLOAT_DTYPES = (np.float32, np.float64, np.complex64, np.complex128)


def _real_dtype(dtype) -> np.dtype:
    return np.finfo(dtype).dtype


def float_array(name: str, a, expected: str, ndim: int | None = None, min_ndim: int = 0, like=None):
    """Return ``a`` as an ndarray (no copy) after checking its dtype and rank.

    ``expected`` is the shape written for the error message, e.g. ``"(B, T, D)"``. ``like``: an
    array whose precision ``a`` must share (float32 with float32/complex64, float64 with
    float64/complex128).
    Public: the CPU port's ops check their arguments with it (fast/cpu/primitives.py).
    """
    a = np.asarray(a)
    if a.dtype.type not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a float32 or float64 array of shape {expected}, got dtype {a.dtype}"
        )
    if (ndim is not None and a.ndim != ndim) or a.ndim < min_ndim:
        raise ValueError(f"{name} must have shape {expected}, got shape {a.shape}")
    if like is not None and _real_dtype(a.dtype) != _real_dtype(like.dtype):
        raise ValueError(
            f"{name} must have the same precision as the input ({like.dtype}) and shape {expected}, "
            f"got dtype {a.dtype}"
        )
    return a


def int_array(name: str, a, expected: str, upper: int | None = None):
    """An integer array; with ``upper``, every entry must lie in [0, upper).
    Public: the CPU port's ops check their arguments with it (fast/cpu/primitives.py).
    """
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array of shape {expected}, got dtype {a.dtype}")
    if upper is not None and a.size and (a.min() < 0 or a.max() >= upper):
        raise ValueError(
            f"{name} must lie in [0, {upper}) (shape {expected}), got values in [{a.min()}, {a.max()}]"
        )
    return a


def check_shape(name: str, a: np.ndarray, shape: tuple, expected: str) -> None:
    """ValueError unless ``a.shape == shape``. Public: the CPU port uses it (fast/cpu/primitives.py)."""
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {expected} = {tuple(shape)}, got shape {a.shape}")
