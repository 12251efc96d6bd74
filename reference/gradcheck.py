"""Numerical derivatives and the dot-product (adjoint) test for hand-written gradients.

SPEC: SPEC.md#gradient-checks. Every backward in ``reference/`` is checked with these tools in
float64. The convention throughout: a check is about a *scalar* function ``loss(inputs)`` of a
dict of arrays (for a layer, ``loss = <forward(inputs), u>`` with a random upstream ``u``), and a
dict ``grads`` of hand-written gradients with (a subset of) the same keys.

- ``numerical_gradient``: central differences, or the complex step where the function is
  analytic (no ``abs``, ``max``, comparisons; exact to rounding, no cancellation).
- ``dot_product_test``: the adjoint identity ``d/de loss(x + e v) = <grad, v>`` along a random
  direction ``v`` drawn over every input at once: one function evaluation pair checks the whole
  vector-Jacobian product, including the cross terms a per-entry check samples only sparsely.
- ``check_gradients``: both, returning per-key relative errors (the numbers ``nested-learning
  check`` prints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

Inputs = Mapping[str, np.ndarray]
LossFn = Callable[[dict[str, np.ndarray]], float]


def rel_error(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> float:
    """max |a - b| / max(max|a|, max|b|, floor): a scale-aware relative error of two arrays."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), floor)
    return float(np.max(np.abs(a - b))) / scale


def _copy_inputs(inputs: Inputs, dtype=None) -> dict[str, np.ndarray]:
    out = {}
    for key, value in inputs.items():
        arr = np.array(value, copy=True, order="C")  # C order: numerical_gradient perturbs reshape(-1) views
        if dtype is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(dtype)
        out[key] = arr
    return out


def _float_keys(inputs: Inputs, keys: Iterable[str] | None) -> list[str]:
    if keys is None:
        return [k for k, v in inputs.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
    keys = list(keys)
    missing = [k for k in keys if k not in inputs]
    if missing:
        raise ValueError(f"numerical_gradient: keys {missing} are not inputs; inputs are {sorted(inputs)}")
    return keys


def numerical_gradient(
    loss: LossFn,
    inputs: Inputs,
    keys: Iterable[str] | None = None,
    method: str = "central",
    eps: float | None = None,
) -> dict[str, np.ndarray]:
    """Entry-by-entry numerical gradient of the scalar ``loss(inputs)``.

    ``method="central"``: (f(x + e) - f(x - e)) / 2e with e = 1e-6 by default, error O(e^2).
    ``method="complex"``: Im f(x + i h) / h with h = 1e-30: exact to rounding for analytic f
    (every op's forward must then accept complex arrays). Inputs are never mutated.
    """
    if method not in ("central", "complex"):
        raise ValueError(f"numerical_gradient: method must be 'central' or 'complex', got {method!r}")
    keys = _float_keys(inputs, keys)
    out: dict[str, np.ndarray] = {}
    if method == "central":
        h = 1e-6 if eps is None else eps
        work = _copy_inputs(inputs)
        for key in keys:
            x = work[key]
            g = np.zeros(x.shape, dtype=np.float64)
            flat = x.reshape(-1)
            gflat = g.reshape(-1)
            for i in range(flat.size):
                old = flat[i]
                flat[i] = old + h
                fp = float(loss(work))
                flat[i] = old - h
                fm = float(loss(work))
                flat[i] = old
                gflat[i] = (fp - fm) / (2 * h)
            out[key] = g
    else:
        h = 1e-30 if eps is None else eps
        work = _copy_inputs(inputs, dtype=np.complex128)
        for key in keys:
            x = work[key]
            g = np.zeros(x.shape, dtype=np.float64)
            flat = x.reshape(-1)
            gflat = g.reshape(-1)
            for i in range(flat.size):
                old = flat[i]
                flat[i] = old + 1j * h
                gflat[i] = np.imag(loss(work)) / h
                flat[i] = old
            out[key] = g
    return out


def dot_product_test(
    loss: LossFn,
    inputs: Inputs,
    grads: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    keys: Iterable[str] | None = None,
    eps: float = 1e-6,
) -> float:
    """Relative error of the adjoint identity along one random direction over all ``keys``.

    lhs = (loss(x + eps v) - loss(x - eps v)) / (2 eps), rhs = sum_k <grads[k], v[k]>.
    Returns |lhs - rhs| / max(|lhs|, |rhs|, sum_k sum |grads[k] * v[k]|).
    """
    keys = _float_keys(inputs, keys if keys is not None else list(grads))
    directions = {k: rng.standard_normal(np.shape(inputs[k])) for k in keys}
    plus = _copy_inputs(inputs)
    minus = _copy_inputs(inputs)
    for k in keys:
        plus[k] = plus[k] + eps * directions[k]
        minus[k] = minus[k] - eps * directions[k]
    lhs = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
    terms = [np.asarray(grads[k], dtype=np.float64) * directions[k] for k in keys]
    rhs = float(sum(np.sum(t) for t in terms))
    # Scale by the size of the terms, not only by |rhs|: a direction along which the derivative
    # happens to nearly cancel would otherwise inflate the relative error of a correct gradient.
    scale = max(abs(lhs), abs(rhs), float(sum(np.sum(np.abs(t)) for t in terms)), 1e-12)
    return abs(lhs - rhs) / scale


def check_gradients(
    loss: LossFn,
    inputs: Inputs,
    grads: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    method: str = "central",
    keys: Iterable[str] | None = None,
) -> dict[str, float]:
    """Per-key relative error of ``grads`` against ``numerical_gradient``, plus the key
    ``"<dot>"`` for the dot-product test over all keys at once."""
    keys = list(grads) if keys is None else list(keys)
    for k in keys:
        if k not in grads:
            raise ValueError(f"check_gradients: no hand-written gradient for {k!r}")
        if np.shape(grads[k]) != np.shape(inputs[k]):
            raise ValueError(
                f"check_gradients: gradient {k!r} has shape {np.shape(grads[k])}, "
                f"input has {np.shape(inputs[k])}"
            )
    numeric = numerical_gradient(loss, inputs, keys=keys, method=method)
    errors = {k: rel_error(np.asarray(grads[k], dtype=np.float64), numeric[k]) for k in keys}
    errors["<dot>"] = dot_product_test(loss, inputs, grads, rng, keys=keys)
    return errors


def upstream_loss(forward: Callable[..., np.ndarray], upstream: np.ndarray) -> LossFn:
    """``loss(inputs) = <forward(**inputs), upstream>``: the scalar whose gradient is the VJP."""

    def loss(inputs: dict[str, np.ndarray]) -> float:
        y = forward(**inputs)
        return np.sum(y * upstream)

    return loss
