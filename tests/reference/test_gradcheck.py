"""The gradient-check tools themselves must catch wrong gradients (SPEC.md#gradient-checks)."""

import numpy as np
import pytest

from nlref.reference import gradcheck


def _case(rng):
    inputs = {"a": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}

    def loss(x):
        return np.sum(np.tanh(x["a"] @ x["b"]) ** 2)

    t = np.tanh(inputs["a"] @ inputs["b"])
    dt = 2 * t * (1 - t**2)
    grads = {"a": np.outer(dt, inputs["b"]), "b": inputs["a"].T @ dt}
    return loss, inputs, grads


@pytest.mark.parametrize("method", ["central", "complex"])
def test_correct_gradient_passes(rng, method):
    loss, inputs, grads = _case(rng)
    errors = gradcheck.check_gradients(loss, inputs, grads, rng, method=method)
    assert max(errors.values()) < 1e-8


def test_wrong_gradient_fails_both_checks(rng):
    loss, inputs, grads = _case(rng)
    grads = dict(grads, b=grads["b"] * 1.01)
    errors = gradcheck.check_gradients(loss, inputs, grads, rng)
    assert errors["b"] > 1e-3
    assert errors["<dot>"] > 1e-4


def test_inputs_not_mutated(rng):
    loss, inputs, grads = _case(rng)
    before = {k: v.copy() for k, v in inputs.items()}
    gradcheck.check_gradients(loss, inputs, grads, rng, method="complex")
    for k in inputs:
        np.testing.assert_array_equal(inputs[k], before[k])


def test_shape_mismatch_is_a_clear_error(rng):
    loss, inputs, grads = _case(rng)
    with pytest.raises(ValueError, match="'a'"):
        gradcheck.check_gradients(loss, inputs, dict(grads, a=grads["a"].T), rng)
