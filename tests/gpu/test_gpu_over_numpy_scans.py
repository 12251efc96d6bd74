"""The GPU port's scan host logic (fast/gpu/scans.py) against reference/selfmod.py's scans, on the
CPU: ``Scans`` with ``LoopKernels`` (the kernels' recurrences as whole-array loops) must give the
reference's values (another summation order for the batched parts: the "rewrite" rows), and the
whole model over the NumPy namespace with those scans equals the reference. The CUDA kernels
themselves are checked by tests/gpu/test_gpu_device_scans.py on a GPU. SPEC: SPEC.md#fast-gpu."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cases_fast import scan_case
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from nlref import config
from nlref.fast.gpu import namespace, scans
from nlref.reference import model as R
from nlref.reference import selfmod as RS


def _fallback():
    return {n: getattr(RS, n) for n in ("suffix_products", "suffix_products_backward", "scalar_suffix_products",
                                        "scalar_suffix_products_backward")}


@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), H=st.integers(1, 3), n=st.integers(1, 7),
       d=st.sampled_from([1, 2, 5, 33]), dtype=st.sampled_from([np.float32, np.float64]),
       transposed=st.booleans())
def test_scans_with_loop_kernels_equal_the_reference(seed, B, H, n, d, dtype, transposed):
    A, dR, dfull, alpha, dRs, dfull_s = scan_case(seed, B, H, n, d, dtype, transposed)
    S = scans.Scans(np, _fallback(), scans.LoopKernels(np))
    kind = "rewrite"
    Rm = S.suffix_products(A)
    assert_close(Rm, RS.suffix_products(A), dtype, kind, "R")
    dR1, dR2 = dR.copy(), dR.copy()
    dA = S.suffix_products_backward(A, Rm, dR1, dfull)
    dA_ref = RS.suffix_products_backward(A, RS.suffix_products(A), dR2, dfull)
    assert dA.dtype == dA_ref.dtype == np.dtype(dtype)
    assert_close(dA, dA_ref, dtype, kind, "dA")
    assert_close(dR1, dR2, dtype, kind, "dR after (the whole adjoint of each R_j)")
    Rs = S.scalar_suffix_products(alpha)
    assert_close(Rs, RS.scalar_suffix_products(alpha), dtype, kind, "scalar R")
    d1, d2 = dRs.copy(), dRs.copy()
    assert_close(S.scalar_suffix_products_backward(alpha, Rs, d1, dfull_s),
                 RS.scalar_suffix_products_backward(alpha, RS.scalar_suffix_products(alpha), d2, dfull_s),
                 dtype, kind, "dalpha")
    assert_close(d1, d2, dtype, kind, "scalar dR after")


def test_wide_heads_and_other_dtypes_use_the_reference_loops():
    calls = []
    fallback = {k: (lambda *a, _k=k, _f=f: calls.append(_k) or _f(*a)) for k, f in _fallback().items()}
    S = scans.Scans(np, fallback, scans.LoopKernels(np))
    A, dR, dfull, *_ = scan_case(0, 1, 1, 3, scans.MAX_D + 1, np.float64, False)
    S.suffix_products(A)
    S.suffix_products_backward(A, RS.suffix_products(A), dR, dfull)
    S.scalar_suffix_products(np.ones((1, 1, 3), np.complex128))
    assert calls == ["suffix_products", "suffix_products_backward", "scalar_suffix_products"]


@pytest.mark.parametrize("name", ["hope-tiny"])
@pytest.mark.parametrize("memory", ["mlp", "matrix"])
def test_model_over_numpy_with_the_scans_equals_reference(name, memory):
    cfg = dataclasses.replace(config.preset(name), dtype="float64", mem_kind=memory)
    ns = namespace.load("numpy", einsum="planned", kernels="loops")
    assert ns.selfmod.suffix_products.__self__.__class__ is scans.Scans  # the override is in place
    params = R.init_params(cfg, 5)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 27))
    loss, grads = R.loss_and_grads(params, tokens, cfg)
    loss2, grads2 = ns.model.loss_and_grads(params, tokens, cfg)
    assert_close(loss2, loss, "float64", "rewrite", "loss")
    for k in grads:
        assert_close(grads2[k], grads[k], "float64", "rewrite", k)


def test_kernels_option_is_checked():
    with pytest.raises(ValueError, match="kernels must be"):
        namespace.load("numpy", kernels="cuda")
