"""The fused activation kernels' bodies (fast/gpu/activations.py) compute the reference's functions.

The CUDA bodies are plain C++ over a type T; here they are compiled for the host with g++ (the
same source text, <cmath>'s exp/erf/fabs in place of CUDA's) and evaluated on NumPy arrays through
ctypes, against reference/primitives.py's (f, f', f'') in float64 and float32. On a GPU,
tests/gpu/test_gpu_device_ops.py checks the kernels themselves. Skipped where no C++ compiler is found.
SPEC: SPEC.md#fast-gpu."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from tolerances import assert_close

from nlref.fast.gpu import activations
from nlref.reference import primitives as P

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the kernel bodies for the host")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    lines = ["#include <cmath>", "using std::exp; using std::erf; using std::fabs;"]
    for name, body in activations.BODIES.items():
        lines.append(f"template <typename T> static T f_{name}(T x) {{ T y; {body} return y; }}")
        for suffix, T in (("f", "float"), ("d", "double")):
            lines.append(f'extern "C" void {name}_{suffix}(const {T}* a, {T}* b, long n) '
                         f"{{ for (long i = 0; i < n; ++i) b[i] = f_{name}<{T}>(a[i]); }}")
    d = tmp_path_factory.mktemp("acts")
    (d / "acts.cpp").write_text("\n".join(lines) + "\n")
    subprocess.run([CXX, "-O1", "-shared", "-fPIC", "-o", str(d / "acts.so"), str(d / "acts.cpp")], check=True,
                   capture_output=True)
    return ctypes.CDLL(str(d / "acts.so"))


def _run(lib, name, x):
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    fn = getattr(lib, f"{name}_{'f' if x.dtype == np.float32 else 'd'}")
    fn(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p), ctypes.c_long(x.size))
    return y


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(activations.BODIES))
def test_kernel_body_is_the_reference_function(library, name, dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(500) * 3, [-80.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 80.0]]).astype(dtype)
    got = _run(library, name, x)
    want = getattr(P, name)(x)
    assert np.all(np.isfinite(got)), name
    assert_close(got, want, dtype, "rewrite", name)  # another libm: rounding-level differences
