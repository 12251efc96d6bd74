"""The self-modifying layer's scans as CUDA kernels (fast/gpu/scans.py) against the reference's
loops (reference/selfmod.py), on the device, float32 and float64, every head width the kernels
take (1..32) and chunk lengths 1..16; plus the whole hope model with and without the kernels.
SPEC: SPEC.md#fast-gpu. Skipped without CuPy and a CUDA device (NL_REQUIRE_GPU=1: an error);
under NL_GPU_TESTS_ON_NUMPY=1 the kernels are ``LoopKernels`` over NumPy (checks the test only)."""

from __future__ import annotations

import numpy as np
import pytest
from cases_fast import scan_case
from gpu_helpers import ON_NUMPY, check_close, require_gpu
from hypothesis import given, settings
from hypothesis import strategies as st

from nlref.fast.gpu import model as G
from nlref.fast.gpu import scans
from nlref.reference import selfmod as RS

pytestmark = pytest.mark.gpu
DEVICE = require_gpu()


def _scans():
    xp = G.xp()
    fallback = {n: getattr(RS, n) for n in ("suffix_products", "suffix_products_backward",
                                            "scalar_suffix_products", "scalar_suffix_products_backward")}
    return xp, scans.Scans(xp, fallback, scans.LoopKernels(xp) if ON_NUMPY else scans.CudaKernels())


@settings(max_examples=30)
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), H=st.integers(1, 4), n=st.integers(1, 16),
       d=st.sampled_from([1, 3, 8, 16, 31, 32]), dtype=st.sampled_from([np.float32, np.float64]),
       transposed=st.booleans())
def test_cuda_scans_equal_the_reference_loops(seed, B, H, n, d, dtype, transposed):
    xp, S = _scans()
    A, dR, dfull, alpha, dRs, dfull_s = scan_case(seed, B, H, n, d, dtype, transposed)
    dev = G.to_device  # on the NumPy namespace the identity: keep the reference's inputs apart
    dR_ref, d_ref = dR.copy(), dRs.copy()
    Rm = S.suffix_products(dev(A))
    check_close(G.to_host(Rm), RS.suffix_products(A), dtype, "R", same_call=False)
    dR_dev = dev(dR.copy()) if not transposed else xp.swapaxes(
        dev(np.ascontiguousarray(np.swapaxes(dR, -1, -2))), -1, -2)
    dA = S.suffix_products_backward(dev(A), Rm, dR_dev, dev(dfull))
    dA_ref = RS.suffix_products_backward(A, RS.suffix_products(A), dR_ref, dfull)
    check_close(G.to_host(dA), dA_ref, dtype, "dA", same_call=False)
    check_close(G.to_host(dR_dev), dR_ref, dtype, "dR (in place)", same_call=False)
    Rs = S.scalar_suffix_products(dev(alpha))
    check_close(G.to_host(Rs), RS.scalar_suffix_products(alpha), dtype, "scalar R", same_call=False)
    d_dev = dev(dRs.copy())
    dal = S.scalar_suffix_products_backward(dev(alpha), Rs, d_dev, dev(dfull_s))
    dal_ref = RS.scalar_suffix_products_backward(alpha, RS.scalar_suffix_products(alpha), d_ref, dfull_s)
    check_close(G.to_host(dal), dal_ref, dtype, "dalpha", same_call=False)
    check_close(G.to_host(d_dev), d_ref, dtype, "scalar dR (in place)", same_call=False)


def test_the_model_loads_the_kernels():
    pkg = G._ns()
    fn = pkg.selfmod.suffix_products
    if ON_NUMPY:
        assert fn is not None
        return
    assert isinstance(fn.__self__, scans.Scans) and isinstance(fn.__self__._k, scans.CudaKernels)
