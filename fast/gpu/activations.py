"""The element-wise activations (and their first and second derivatives) as one CUDA kernel each.

SPEC: SPEC.md#fast-gpu, SPEC.md#primitives (the functions: exact GELU x Phi(x), SiLU x s(x), the
logistic s(x), evaluated without overflow). Measured first on an H200 (scripts/gpu_profile.py,
hope-small, batch 4 x 256, 8.0 s per step): ``sigmoid`` took 0.39 s of host time (its overflow-free
form selects the two signs with boolean masks, and a masked assignment waits for the device to
count the mask), ``gelu`` / ``dgelu`` / ``d2gelu`` 0.9 s together (six to nine array operations
each, one kernel launch apiece). Here each function is one ``cupy.ElementwiseKernel``: the same
formula, computed in the input's dtype, in one pass. Values equal the reference's to rounding
(CUDA's erf/exp against NumPy/SciPy's; the ("float32" | "float64", "gpu") rows).

A kernel that fails to compile or launch (for example an input dtype it has no loop for, such as
complex) is reported once as a warning and the reference's own function is used from then on.
"""

from __future__ import annotations

import warnings

# The stable logistic (no overflow for either sign), written once and used by every SiLU/sigmoid body.
_S = "T nl_e = exp(-fabs(x)); T nl_s = x >= (T)0 ? (T)1 / ((T)1 + nl_e) : nl_e / ((T)1 + nl_e);"
_C = "const T nl_c = (T)0.70710678118654752440; const T nl_p = (T)0.39894228040143267794;"  # 1/sqrt(2), 1/sqrt(2 pi)

BODIES = {
    "sigmoid": _S + " y = nl_s;",
    "dsigmoid": _S + " y = nl_s * ((T)1 - nl_s);",
    "d2sigmoid": _S + " y = nl_s * ((T)1 - nl_s) * ((T)1 - (T)2 * nl_s);",
    "silu": _S + " y = x * nl_s;",
    "dsilu": _S + " y = nl_s * ((T)1 + x * ((T)1 - nl_s));",
    "d2silu": _S + " T nl_ds = nl_s * ((T)1 - nl_s); y = (T)2 * nl_ds + x * nl_ds * ((T)1 - (T)2 * nl_s);",
    "gelu": _C + " y = (T)0.5 * x * ((T)1 + erf(x * nl_c));",
    "dgelu": _C + " y = (T)0.5 * ((T)1 + erf(x * nl_c)) + x * nl_p * exp((T)-0.5 * x * x);",
    "d2gelu": _C + " y = nl_p * exp((T)-0.5 * x * x) * ((T)2 - x * x);",
}
"""name -> the CUDA body of ``y = f(x)`` (type T: float or double)."""


class _Fused:
    """One activation as an ElementwiseKernel, falling back to ``reference`` if the kernel fails."""

    def __init__(self, name: str, reference, cupy):
        self.__name__ = name
        self._reference = reference
        self._cupy = cupy
        self._kernel = cupy.ElementwiseKernel("T x", "T y", BODIES[name], f"nl_{name}")
        self.failed: str | None = None

    def __call__(self, x):
        if self.failed is None and isinstance(x, self._cupy.ndarray) and x.dtype.kind == "f":
            try:
                return self._kernel(x)
            except Exception as exc:  # a compile or launch failure: the reference's function from now on
                self.failed = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"fast/gpu: the fused {self.__name__} kernel failed ({self.failed}); "
                              "using the reference's function", RuntimeWarning, stacklevel=2)
        return self._reference(x)


def overrides(mod, cupy) -> dict:
    """{name: fused function} for the loaded primitives module ``mod``; its ``ACTIVATIONS`` table
    (shared by mlp_memory and cms) is updated in place, so every user of it gets the kernels."""
    fused = {name: _Fused(name, getattr(mod, name), cupy) for name in BODIES}
    for act in ("sigmoid", "silu", "gelu"):
        mod.ACTIVATIONS[act] = (fused[act], fused["d" + act], fused["d2" + act])
    return fused
