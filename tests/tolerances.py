"""The one tolerance table of the test suite, keyed by (dtype, kind).

Each row: the tolerance, a one-line reason, and the error it was calibrated from (measured with
the command in the row's comment). Change a row only with a new measurement.
"""

from __future__ import annotations

import numpy as np

# scripts/calibrate_tolerances.py reproduces the measurement behind each row (the comments below say
# what each was measured on) and prints the measured worst, the bound and the headroom; it exits 1 if
# a measurement exceeds its row (`--quick` for a few draws per row, `--rows dtype:kind,...` for some).

TOLERANCES: dict[tuple[str, str], tuple[float, str]] = {
    # Central differences with e = 1e-6 in float64: truncation O(e^2 f''') + rounding O(1e-16 / e);
    # the observed worst relative error over the primitives' and memories' property tests is ~1e-8.
    ("float64", "gradcheck"): (1e-6, "central differences, e=1e-6, float64"),
    # A primitive (reference/primitives.py) evaluated in float32 vs float64 on the same small
    # standard-normal inputs: worst observed 3.3e-7 (layernorm) over 20 seeds x every forward and
    # backward of tests/reference/test_primitives.py::test_float32_agrees_with_float64; margin for longer sums.
    ("float32", "primitive_vs_float64"): (1e-5, "a primitive in float32 vs float64, small inputs"),
    # Complex step is exact to rounding: observed ~1e-15.
    ("float64", "complex_step"): (1e-10, "complex step, h=1e-30, float64"),
    # Two exact rewrites of one recurrence (chunk form vs token loop) differ only by summation
    # order: observed ~1e-15 relative in float64.
    ("float64", "rewrite"): (1e-10, "same function, different summation order, float64"),
    ("float32", "rewrite"): (1e-4, "same function, different summation order, float32"),
    # One function evaluated in float32 vs in float64 (small well-scaled inputs). LayerNorm on the
    # MLP memory's branch amplifies rounding by 1/std of the branch (and its square in the
    # second-order VJP): worst observed 9.3e-5 with LN, 1.6e-6 without, over 1500 random configs
    # of tests/reference/test_mlp_memory.py::test_float32_in_float32_out_and_close_to_float64.
    ("float32", "mlp_memory_vs_float64"): (5e-4, "MLP memory in float32 vs float64, small inputs"),
    # Our optimizer vs torch.optim (2.13.0), 50-step float64 trajectories, each side computing its
    # own gradients: worst observed 2.0e-15 relative (Muon on the MLP), over
    # tests/oracle/test_optimizers_torch.py::test_matches_torch_optim and ::test_muon_matches_torch_muon_float64.
    ("float64", "torch_oracle"): (1e-12, "optimizer trajectories vs torch.optim, float64, 50 steps"),
    # Our float64 Muon vs the unmodified torch.optim.Muon, whose Newton-Schulz runs in bfloat16 by
    # design: worst observed 3.5e-3 relative over 50 steps (5.9e-4 / 1.5e-3 after 10), in
    # tests/oracle/test_optimizers_torch.py::test_muon_matches_unmodified_bfloat16_torch_muon.
    ("float64", "torch_muon_bfloat16"): (1e-2, "Muon vs torch's bfloat16 Newton-Schulz, 50 steps"),
    # A fast/cpu port vs the reference, both in the same dtype (summation order, BLAS vs einsum,
    # compiled erf/exp, rank-1 factors vs dense gradients). Worst observed, outputs + state + every
    # gradient: MLP memory 1.1e-13 (float64) / 4.9e-5 (float32 with LN; 1.2e-6 without) over 1500
    # configs (/tmp/p2_meas_mm.py = the draws of tests/cpu/test_cpu_mlp_memory.py); Titans 1.0e-12 /
    # 9.8e-5 (LN) over 400 configs (/tmp/p2_meas_t.py, test_cpu_titans.py); self-modifying Titans
    # 2.9e-13 / 7.1e-4 (float32, a cancelling gradient; see port_vs_own_rounding) without LN over 400
    # configs (/tmp/p2_meas_s.py, test_cpu_selfmod.py); matrix-memory token rules 1.8e-15 /
    # 2.4e-6 over 800 configs (/tmp/p2_meas_mem.py, test_cpu_memory.py).
    ("float64", "port"): (1e-10, "fast/cpu port vs reference, float64"),
    ("float32", "port"): (5e-4, "fast/cpu port vs reference, float32"),
    # The GPU port (fast/gpu: the reference's own code over CuPy, planned einsum, scan and
    # activation kernels) vs the reference, same dtype. Measured on an NVIDIA H200 (CuPy 14.2.0,
    # CUDA 13), 2026-11-26, `NL_REQUIRE_GPU=1 NL_GPU_ERRORS=... pytest tests/gpu/test_gpu_device_*.py` in
    # scripts/gpu_check.sh (5,121 recorded comparisons, every op and family of the CPU port's
    # property tests): worst 2.6e-14 (float64, hope-attention grad blocks.1.norm2.g) and 3.1e-5
    # (float32, selfmod dparams[b_alpha], a cancelling sum); the committed conformance vectors
    # 1.1e-14 / 9.0e-6. The rows keep the CPU port's values, which hold with margin (float64 4000x,
    # float32 16x): the same kind of differences (summation order, library rounding).
    # The GPU tests reuse ("float64", "port_selfmod_layernorm") and ("float32", "port_vs_own_rounding")
    # for the self-modifying layer exactly as the CPU port's tests do (same amplification by LN and
    # cancelling float32 gradients, whoever rounds), with the "gpu" row as the floor: worst
    # measured under the LN row 1.4e-13 (float64, selfmod state[alpha.W2_b]).
    ("float64", "gpu"): (1e-10, "fast/gpu port vs reference, float64"),
    ("float32", "gpu"): (5e-4, "fast/gpu port vs reference, float32"),
    # Self-modifying Titans with LayerNorm on all five memories' branches, float64: LN amplifies
    # rounding by 1/std of the branch, compounded through the writes: worst observed 9.9e-10
    # (gradient of v.W1_0) over the LN configs among 400 of /tmp/p2_meas_s.py.
    ("float64", "port_selfmod_layernorm"): (1e-8, "selfmod port vs reference with LN, float64"),
    # Self-modifying Titans in float32: a gradient that is a cancelling sum (gate biases, momentum
    # decays) differs between any two float32 evaluations; the reference itself is up to 1e-2 (LN) /
    # 4e-4 (no LN) relative away from its float64 value there. So a float32 selfmod tensor must be
    # within max(("float32", "port"), this factor x the reference's own float32-vs-float64 error).
    # Without LN (LN in float32 is not compared: a second evaluation differs by up to 2e-2, 10x the
    # reference's own error) every tensor of 600 float32 configs of /tmp/p2_meas_s2.py is within
    # max(5.2e-5, 4 x own error); with the factor alone the worst ratio was 1.8 (q.b_beta: port 7.1e-4,
    # reference 4.0e-4 from float64). The Titans port in float32 follows the same rule
    # (tests/cpu/test_cpu_titans.py): an MLP memory with LN put the port 5.8e-3 from the float32
    # reference on conv_v's gradient, the reference being 4.3e-3 from float64 itself (found by
    # scripts/calibrate_tolerances.py); over 200 selfmod + 400 titans float32 draws, 8 of 18,946
    # tensors exceed the port row, the worst at 1.34 x the reference's own error.
    ("float32", "port_vs_own_rounding"): (4.0, "factor on the reference's own float32 rounding error"),
    # The PyTorch eager oracle (torch_model.py, autograd) vs the reference's hand-written backward,
    # float64, loss and every gradient (per key, relative to its largest entry, floored at 1e-6 of
    # the largest gradient entry for exactly-zero gradients): worst observed 2.4e-12 (hope,
    # blocks.0.mem.b_alpha, matrix memory, eta_max 1) over 380 random configs of the four families
    # (/tmp/tsweep.py = the draws of tests/oracle/test_torch_oracle.py) and the tiny presets (<= 7e-14).
    ("float64", "torch_model_oracle"): (1e-10, "torch autograd vs hand-written backward, whole model, float64"),
    # fast/cpu/vmath.py's float32 activations (fitted erfc, NumPy's SIMD exp) vs SciPy in float64,
    # per element relative to the magnitudes of the terms (floored near underflow; see
    # tests/cpu/test_cpu_vmath.py::worst_error): worst observed 4.9e-7 (sigmoid'') over 844,003
    # float32 inputs covering both tails (the float32 ulp is 1.2e-7; the erfc fit alone 2.9e-7).
    ("float32", "activation_vs_float64"): (1e-6, "float32 vectorised activations vs float64 SciPy, per element"),
}


def tol(dtype, kind: str) -> float:
    return TOLERANCES[(np.dtype(dtype).name, kind)][0]


def assert_close(actual, expected, dtype, kind: str, name: str = "") -> None:
    """Shape first, then values (relative to the larger of the two maxima); on failure print the
    worst index, max abs and max rel. Dtypes are the callers' to check (some compare float32
    results with a float64 oracle)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    t = tol(dtype, kind)
    if actual.size == 0:
        return
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    scale = max(float(np.max(np.abs(expected))), float(np.max(np.abs(actual))), 1e-12)
    rel = float(np.max(diff)) / scale
    if not rel <= t:
        idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise AssertionError(
            f"{name}: max rel {rel:.3e} > tol {t:.1e} ({dtype}, {kind}); worst index {idx}: "
            f"{actual[idx]!r} vs {expected[idx]!r}; max abs {float(np.max(diff)):.3e}"
        )
