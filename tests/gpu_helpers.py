"""Shared helpers of the GPU port's tests (tests/gpu/test_gpu_device_*.py; SPEC.md#fast-gpu).

``require_gpu()`` is called at the top of every tests/gpu/test_gpu_device_*.py module. Where CuPy or a CUDA
device is missing it skips the module with the reason; with ``NL_REQUIRE_GPU=1`` it fails the
collection instead (pytest then exits non-zero), so a run on the GPU machine cannot pass by
skipping. Where a device is found it sets ``nlref.fast.gpu.model.NAMESPACE = "cupy"``.

``NL_GPU_TESTS_ON_NUMPY=1``: for checking the GPU tests' own logic on a CPU; results then say
nothing about a GPU. ``require_gpu()`` then does not skip and sets
``fast.gpu.model.NAMESPACE = "numpy"``, so every "GPU" call runs the reference's modules over
NumPy (bitwise the reference): the comparisons must pass with zero or rounding-level errors.

``NL_GPU_ERRORS=<file>``: every comparison made through ``check_close`` / ``record_error`` appends
one JSON line {"test", "dtype", "tensor", "kind", "rel", "tol", "namespace"} to that file (opened in
append mode per record, so parallel or repeated runs only add lines); ``worst_errors(file)`` reduces
it to the worst relative error per (test, dtype), for recalibrating the ("float32" | "float64",
"gpu") rows of tests/tolerances.py. A no-op when the variable is unset.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from tolerances import tol

ON_NUMPY = os.environ.get("NL_GPU_TESTS_ON_NUMPY") == "1"


def require_gpu() -> str:
    """Skip (or, with NL_REQUIRE_GPU=1, fail) the calling test module when no GPU can be used;
    returns what the tests run on (the device name, or the NumPy note)."""
    from nlref.fast.gpu import model as gpu_model
    from nlref.fast.gpu import namespace

    if ON_NUMPY:
        gpu_model.NAMESPACE = "numpy"
        return "NumPy (NL_GPU_TESTS_ON_NUMPY=1: checks the tests' logic, says nothing about a GPU)"
    ok, why = namespace.cupy_available()
    if ok:
        gpu_model.NAMESPACE = "cupy"
        return why
    if os.environ.get("NL_REQUIRE_GPU") == "1":
        pytest.fail(f"NL_REQUIRE_GPU=1 but the GPU tests cannot run: {why}", pytrace=False)
    pytest.skip(f"the GPU tests need CuPy and a CUDA device: {why}", allow_module_level=True)
    return why  # not reached


def rel_error(actual, expected) -> float:
    """max |a - e| / max(max |a|, max |e|, 1e-12): the measure of tolerances.assert_close."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(e))), float(np.max(np.abs(a))), 1e-12)
    return float(np.max(np.abs(a - e))) / scale


def _current_test() -> str:
    """The running test's node id without the phase suffix (hypothesis examples share it)."""
    node = os.environ.get("PYTEST_CURRENT_TEST", "?")
    return re.sub(r" \((setup|call|teardown)\)$", "", node)


def record_error(tensor: str, dtype, rel: float, kind: str = "gpu", tolerance: float | None = None) -> None:
    """Append one measured relative error to $NL_GPU_ERRORS (no-op when unset)."""
    path = os.environ.get("NL_GPU_ERRORS")
    if not path:
        return
    from nlref.fast.gpu import model as gpu_model

    row = {"test": _current_test(), "dtype": np.dtype(dtype).name, "tensor": tensor, "kind": kind,
           "rel": rel if np.isfinite(rel) else str(rel), "tol": tolerance, "namespace": gpu_model.NAMESPACE}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def worst_errors(path) -> dict[tuple[str, str], dict]:
    """(test, dtype) -> the recorded row with the largest relative error (reads $NL_GPU_ERRORS)."""
    worst: dict[tuple[str, str], dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rel = float(row["rel"])
            key = (row["test"], row["dtype"])
            if key not in worst or rel > float(worst[key]["rel"]):
                worst[key] = row
    return worst


def check_close(actual, expected, dtype, name: str = "", kind: str = "gpu", bound: float | None = None,
                scale: float | None = None, same_call: bool = True) -> float:
    """GPU result vs the reference: same shape and a relative error (``rel_error``, or max abs
    diff / ``scale`` when given) within the (dtype, kind) row of tests/tolerances.py (or ``bound``);
    records the error and, on failure, names the tensor, the worst index and both values. Under
    NL_GPU_TESTS_ON_NUMPY=1 a comparison of the same call on both sides (``same_call``) must be
    exact: that proves the test compares what it means to. Returns the relative error."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    t = tol(dtype, kind) if bound is None else bound
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        rel = rel_error(actual, expected)
    else:
        rel = float(np.max(np.abs(actual.astype(np.float64) - expected))) / scale if actual.size else 0.0
    record_error(name, dtype, rel, kind, t)
    if ON_NUMPY and same_call:
        assert rel == 0.0, f"{name}: {rel:.3e} != 0 on the NumPy namespace (the same computation on both sides)"
    if not rel <= t:
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        idx = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
        raise AssertionError(
            f"{name}: max rel {rel:.3e} > tol {t:.1e} ({np.dtype(dtype).name}, {kind}); worst index {idx}: "
            f"{actual[idx]!r} vs {expected[idx]!r}; max abs {float(np.max(diff)):.3e}"
        )
    return rel


def check_tree(got, want, dtype, name: str, kind: str = "gpu", same_call: bool = True) -> None:
    """Nested dicts / lists / tuples of arrays: the same structure (dict key order included), NumPy
    arrays of the reference's dtype, values within ``check_close``; other leaves equal."""
    if want is None:
        assert got is None, f"{name}: {type(got).__name__} where the reference has None"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{name}: keys {list(got)} != {list(want)}"
        for k in want:
            check_tree(got[k], want[k], dtype, f"{name}[{k}]", kind, same_call)
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), f"{name}: length differs"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            check_tree(a, b, dtype, f"{name}[{i}]", kind, same_call)
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{name}: {type(got).__name__}, not a NumPy array"
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        check_close(got, want, dtype, name, kind, same_call=same_call)
    else:
        assert got == want, f"{name}: {got!r} != {want!r}"


def assert_bitwise_tree(got, want, name: str = "") -> None:
    """Nested trees equal bit for bit, dtypes and structure included (the NumPy namespace)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{name}: keys differ"
        for k in want:
            assert_bitwise_tree(got[k], want[k], f"{name}[{k}]")
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want), f"{name}: {type(got)} vs {type(want)}"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_bitwise_tree(a, b, f"{name}[{i}]")
    elif isinstance(want, np.ndarray | np.generic):
        got_a, want_a = np.asarray(got), np.asarray(want)
        assert got_a.dtype == want_a.dtype, f"{name}: dtype {got_a.dtype} != {want_a.dtype}"
        np.testing.assert_array_equal(got_a, want_a, err_msg=name, strict=True)
    else:
        assert got == want, f"{name}: {got!r} != {want!r}"


def layer_config(cfg):
    """``cfg`` (a reference TitansConfig / SelfModConfig), checked to be the class the loaded
    modules use: fast/gpu/namespace.py rebinds them to the reference's own classes."""
    from nlref.fast.gpu import model as gpu_model

    pkg = gpu_model._ns()  # the package the GPU calls run (fast/gpu/namespace.py)
    module = {"TitansConfig": pkg.titans, "SelfModConfig": pkg.selfmod}[type(cfg).__name__]
    assert isinstance(cfg, getattr(module, type(cfg).__name__))
    return cfg
