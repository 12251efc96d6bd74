"""fast.cpu.mlp_memory vs reference.mlp_memory: same outputs and every gradient (SPEC.md#mlp-memory).

Property tests draw leading dims, token counts, widths, the activation, LayerNorm on/off and the
dtype; inputs are made read-only and checked unchanged. Tolerances: ("float64"|"float32", "port").
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from cases_fast import mlp_inputs as _inputs
from hypothesis import given
from port_helpers import note, readonly
from strategies import mlp_memory_configs as configs
from tolerances import assert_close, tol

from nlref.fast.cpu import mlp_memory as F
from nlref.reference import mlp_memory as R


def _ro(*arrays):
    return [readonly(a) for a in arrays]


def _compare(fast, ref, dtype, names):
    assert len(fast) == len(ref)
    for name, a, b in zip(names, fast, ref, strict=True):
        assert isinstance(a, np.ndarray) and a.dtype == np.dtype(dtype), f"{name}: dtype {getattr(a, 'dtype', a)}"
        note(f"{name}: max abs diff {float(np.max(np.abs(a.astype(np.float64) - b))):.3e}")
        assert_close(a, b, dtype, "port", name)


@given(configs)
def test_read_and_backward_match_reference(c):
    rng, W1, W2, z, dy = _inputs(c)
    W1, W2, z, dy = _ro(W1, W2, z, dy)
    before = [a.copy() for a in (W1, W2, z, dy)]
    kw = {"act": c["act"], "layernorm": c["layernorm"]}
    yf, cf = F.mlp_memory_forward(W1, W2, z, **kw)
    yr, cr = R.mlp_memory_forward(W1, W2, z, **kw)
    assert cf.get("fast"), "the equivalence test must not take the reference fallback"
    _compare([yf], [yr], c["dtype"], ["y"])
    _compare(F.mlp_memory_backward(dy, cf), R.mlp_memory_backward(dy, cr), c["dtype"], ["dW1", "dW2", "dz"])
    for a, b in zip((W1, W2, z, dy), before, strict=True):
        np.testing.assert_array_equal(a, b)


@given(configs)
def test_unchecked_calls_compute_bitwise_the_checked_ones(c):
    """``check=False`` (the self-modifying layer's own calls, its arrays checked once per layer call)
    skips only the checks: on valid input the read, its backward and the inner gradient are bitwise
    the checked calls'."""
    rng, W1, W2, z, dy = _inputs(c)
    kw = {"act": c["act"], "layernorm": c["layernorm"]}
    (y1, c1), (y2, c2) = F.mlp_memory_forward(W1, W2, z, **kw), F.mlp_memory_forward(W1, W2, z, **kw, check=False)
    np.testing.assert_array_equal(y1, y2)
    for a, b in zip(F.mlp_memory_backward(dy, c1), F.mlp_memory_backward(dy, c2, check=False), strict=True):
        np.testing.assert_array_equal(a, b)
    g1, g2 = F.inner_grad(W1, W2, z, dy, **kw), F.inner_grad(W1, W2, z, dy, **kw, check=False)
    for a, b in zip(g1[:3], g2[:3], strict=True):
        np.testing.assert_array_equal(a, b)


@given(configs)
def test_inner_grad_and_its_vjp_match_reference(c):
    rng, W1, W2, k, v = _inputs(c)
    kw = {"act": c["act"], "layernorm": c["layernorm"]}
    W1, W2, k, v = _ro(W1, W2, k, v)
    *ff, cf = F.inner_grad(W1, W2, k, v, **kw)
    *fr, cr = R.inner_grad(W1, W2, k, v, **kw)
    assert cf.get("fast")
    _compare(ff, fr, c["dtype"], ["u1", "a", "u2"])
    cot = _ro(*(rng.standard_normal(x.shape).astype(c["dtype"]) for x in fr))
    _compare(F.inner_grad_backward(*cot, cf), R.inner_grad_backward(*cot, cr), c["dtype"],
             ["dW1", "dW2", "dk", "dv_hat"])  # fmt: skip
    _compare([F.inner_loss(W1, W2, k, v, **kw)], [R.inner_loss(W1, W2, k, v, **kw)], c["dtype"], ["loss"])
    _compare(F.inner_grad_dense(W1, W2, k, v, **kw), R.inner_grad_dense(W1, W2, k, v, **kw), c["dtype"],
             ["G1", "G2"])  # fmt: skip


@given(configs)
def test_matrix_memory_matches_reference(c):
    rng, _, _, k, v = _inputs(c)
    D = k.shape[-1]
    M = rng.standard_normal((*c["lead"], D, D)).astype(c["dtype"])
    M, k, v = _ro(M, k, v)
    yf, cf = F.matrix_memory_forward(M, k)
    yr, cr = R.matrix_memory_forward(M, k)
    _compare([yf], [yr], c["dtype"], ["y"])
    _compare(F.matrix_memory_backward(v, cf), R.matrix_memory_backward(v, cr), c["dtype"], ["dM", "dk"])
    uf, cf = F.matrix_inner_grad(M, k, v)
    ur, cr = R.matrix_inner_grad(M, k, v)
    _compare([uf], [ur], c["dtype"], ["u"])
    du = rng.standard_normal(ur.shape).astype(c["dtype"])
    _compare(F.matrix_inner_grad_backward(du, cf), R.matrix_inner_grad_backward(du, cr), c["dtype"],
             ["dM", "dk", "dv_hat"])  # fmt: skip
    _compare([F.matrix_inner_loss(M, k, v)], [R.matrix_inner_loss(M, k, v)], c["dtype"], ["loss"])
    _compare([F.matrix_inner_grad_dense(M, k, v)], [R.matrix_inner_grad_dense(M, k, v)], c["dtype"], ["G"])


def test_a_wrong_port_would_be_caught():
    """The comparison can fail: a perturbed second derivative is detected."""
    c = {"lead": (2,), "N": 4, "D": 4, "Hm": 5, "act": "gelu", "layernorm": False, "dtype": "float64", "seed": 3}
    rng, W1, W2, k, v = _inputs(c)
    *_, cf = F.inner_grad(W1, W2, k, v)
    *fr, cr = R.inner_grad(W1, W2, k, v)
    cot = [rng.standard_normal(x.shape) for x in fr]
    cf["spp"] = cf["spp"] * 1.001
    with pytest.raises(AssertionError):
        _compare(F.inner_grad_backward(*cot, cf), R.inner_grad_backward(*cot, cr), "float64",
                 ["dW1", "dW2", "dk", "dv_hat"])  # fmt: skip


def test_bad_input_raises_like_the_reference():
    W1, W2 = np.zeros((2, 3, 4)), np.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="W2"):
        F.mlp_memory_forward(W1, np.zeros((2, 3, 3)), np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match="z"):
        F.mlp_memory_forward(W1, W2, np.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="v_hat"):
        F.inner_grad(W1, W2, np.zeros((2, 5, 3)), np.zeros((2, 5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="act"):
        F.inner_grad(W1, W2, np.zeros((2, 5, 3)), np.zeros((2, 5, 3)), act="relu")
    with pytest.raises(ValueError, match="du2"):
        *_, cache = F.inner_grad(W1, W2, np.zeros((2, 5, 3)), np.zeros((2, 5, 3)))
        F.inner_grad_backward(np.zeros((2, 5, 3)), np.zeros((2, 5, 4)), np.zeros((2, 5, 3)), cache)
    with pytest.raises(ValueError, match="k"):
        F.matrix_inner_grad(np.zeros((2, 3, 3)), np.zeros((2, 5, 4)), np.zeros((2, 5, 3)))


def test_complex_input_falls_back_to_the_reference():
    """The complex-step path is the reference's (explicit fallback); results identical."""
    rng = np.random.default_rng(0)
    W1 = rng.standard_normal((1, 3, 4)) + 1e-30j
    W2, k, v = rng.standard_normal((1, 4, 3)), rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 2, 3))
    *a, ca = F.inner_grad(W1, W2.astype(complex), k.astype(complex), v.astype(complex))
    *b, _ = R.inner_grad(W1, W2.astype(complex), k.astype(complex), v.astype(complex))
    assert "fast" not in ca
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


_NOJIT_SCRIPT = """
import numpy as np
from nlref.fast.cpu import mlp_memory as F
from nlref.reference import mlp_memory as R
rng = np.random.default_rng(0)
for act in ("gelu", "silu", "sigmoid", "softplus"):
    for ln in (False, True):
        W1, W2 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 3))
        k, v = rng.standard_normal((2, 2, 3)), rng.standard_normal((2, 2, 3))
        *a, ca = F.inner_grad(W1, W2, k, v, act, ln)
        *b, cb = R.inner_grad(W1, W2, k, v, act, ln)
        cot = [rng.standard_normal(x.shape) for x in b]
        for x, y in zip(a + list(F.inner_grad_backward(*cot, ca)), b + list(R.inner_grad_backward(*cot, cb))):
            assert np.max(np.abs(x - y)) <= 1e-10 * max(1.0, np.max(np.abs(y))), (act, ln)
import numba
assert numba.config.DISABLE_JIT
print("ok")
"""


@pytest.mark.parametrize("act", ["gelu", "silu", "sigmoid", "softplus"])
def test_float32_activation_triple_matches_the_float64_kernel(act):
    """float32 (s, s', s'') (fast/cpu/vmath.py for sigmoid / silu / gelu, the scalar kernel for
    softplus) agrees with the float64 libm kernel within the
    ("float32", "activation_vs_float64") row (1e-6) of each tensor's largest entry, with
    and without s''; both tails of the GELU included."""
    bound = tol("float32", "activation_vs_float64")
    x = np.concatenate([np.linspace(-14, 14, 2801), np.linspace(-0.01, 0.01, 31)]).astype(np.float32).reshape(2, -1, 8)
    want = F._act(act, x.astype(np.float64), True)
    for second in (True, False):
        got = F._act(act, readonly(x), second)
        assert (got[2] is None) == (not second)
        for g, w in zip(got[: 2 + second], want, strict=False):
            assert g.dtype == np.float32 and g.shape == x.shape
            assert np.max(np.abs(g - w)) <= bound * np.max(np.abs(w)), act


def test_kernels_without_jit_match_the_reference():
    """NUMBA_DISABLE_JIT=1: the kernels' Python logic (coverage mode) still matches the reference."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", _NOJIT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
