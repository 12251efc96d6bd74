"""The self-modifying layer's token scans as CUDA kernels (the GPU port's custom kernels).

SPEC: SPEC.md#fast-gpu. Paper: Eq. (88) with Titans Eqs. (16)-(18) (the chunk-parallel writes of
reference/selfmod.py). Measured first on an H200 (scripts/gpu_profile.py, hope-small, batch 4 x 256):
a training step took 8.0 s, of which ``write_chunk_backward`` and ``write_chunk`` spent 3.0 s of
host time in their per-token loops (a matrix product and a copy per token of each 16-token chunk,
for every memory and weight). Those loops are sequential scans over the chunk's tokens:

    suffix_products            R_{n-1} = I,  R_j = A_{j+1} R_{j+1}           (d x d matrices)
    suffix_products_backward   dR_{j+1} += A_{j+1}^T dR_j  (after dR_0 += A_0^T dfull)
    scalar_suffix_products     R_{n-1} = 1,  R_j = alpha_{j+1} R_{j+1}
    scalar_suffix_products_backward   dR_{j+1} += alpha_{j+1} dR_j

Here each whole scan is one kernel launch: one thread block per (batch, head) holds the running
d x d matrix in shared memory (d <= 32, one thread per entry) and walks the n tokens; the scalar
scans use one thread per (batch, head). Everything that is not sequential is one batched product
(``dA_{j+1} = dR_j R_{j+1}^T`` for all j at once) or a cumulative product. Results equal the
reference's to rounding (another summation order: the ("float32" | "float64", "gpu") rows).
Heads wider than 32, or dtypes other than float32 / float64, use the reference's loops.

``Scans(xp, fallback, kernels)`` holds that host logic; ``kernels`` is ``CudaKernels()`` on a GPU,
or ``LoopKernels(numpy)`` (the same recurrences as whole-array loops) to test the host logic on a
CPU. ``NL_GPU_KERNELS=0`` turns the kernels off (the reference's loops run on the GPU instead).
"""

from __future__ import annotations

import numpy

MAX_D = 32  # one thread per matrix entry: d * d <= 1024 threads per block

_SOURCE = r"""
template <typename T>
__device__ void suffix_products_impl(const T* A, T* R, int n, int d) {
    extern __shared__ __align__(16) unsigned char smem[];
    T* cur = reinterpret_cast<T*>(smem);
    const int t = threadIdx.x, r = t / d, c = t % d;
    const size_t dd = (size_t)d * d;
    const T* Ag = A + (size_t)blockIdx.x * n * dd;
    T* Rg = R + (size_t)blockIdx.x * n * dd;
    T v = (r == c) ? T(1) : T(0);
    cur[t] = v;
    Rg[(size_t)(n - 1) * dd + t] = v;
    __syncthreads();
    for (int j = n - 2; j >= 0; --j) {
        const T* Aj = Ag + (size_t)(j + 1) * dd;
        T s = T(0);
        for (int m = 0; m < d; ++m) s += Aj[r * d + m] * cur[m * d + c];
        __syncthreads();
        cur[t] = s;
        Rg[(size_t)j * dd + t] = s;
        __syncthreads();
    }
}

template <typename T>
__device__ void adjoint_chain_impl(const T* A, T* dR, int n, int d) {
    extern __shared__ __align__(16) unsigned char smem[];
    T* cur = reinterpret_cast<T*>(smem);
    const int t = threadIdx.x, r = t / d, c = t % d;
    const size_t dd = (size_t)d * d;
    const T* Ag = A + (size_t)blockIdx.x * n * dd;
    T* dRg = dR + (size_t)blockIdx.x * n * dd;
    cur[t] = dRg[t];
    __syncthreads();
    for (int j = 0; j < n - 1; ++j) {
        const T* Aj = Ag + (size_t)(j + 1) * dd;
        T s = T(0);
        for (int m = 0; m < d; ++m) s += Aj[m * d + r] * cur[m * d + c];  // (A^T cur)[r][c]
        const T v = dRg[(size_t)(j + 1) * dd + t] + s;
        __syncthreads();
        cur[t] = v;
        dRg[(size_t)(j + 1) * dd + t] = v;
        __syncthreads();
    }
}

template <typename T>
__device__ void scalar_chain_impl(const T* a, T* dR, int rows, int n) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= rows) return;
    const T* ag = a + (size_t)g * n;
    T* dg = dR + (size_t)g * n;
    T prev = dg[0];
    for (int j = 0; j < n - 1; ++j) {
        const T v = dg[j + 1] + ag[j + 1] * prev;
        dg[j + 1] = v;
        prev = v;
    }
}

extern "C" __global__ void suffix_products_f32(const float* A, float* R, int n, int d) {
    suffix_products_impl<float>(A, R, n, d);
}
extern "C" __global__ void suffix_products_f64(const double* A, double* R, int n, int d) {
    suffix_products_impl<double>(A, R, n, d);
}
extern "C" __global__ void adjoint_chain_f32(const float* A, float* dR, int n, int d) {
    adjoint_chain_impl<float>(A, dR, n, d);
}
extern "C" __global__ void adjoint_chain_f64(const double* A, double* dR, int n, int d) {
    adjoint_chain_impl<double>(A, dR, n, d);
}
extern "C" __global__ void scalar_chain_f32(const float* a, float* dR, int rows, int n) {
    scalar_chain_impl<float>(a, dR, rows, n);
}
extern "C" __global__ void scalar_chain_f64(const double* a, double* dR, int rows, int n) {
    scalar_chain_impl<double>(a, dR, rows, n);
}
"""

_SUFFIX = {numpy.dtype(numpy.float32): "f32", numpy.dtype(numpy.float64): "f64"}


class CudaKernels:
    """The three scans as CuPy RawModule kernels (compiled by NVRTC at the first call, then cached)."""

    def __init__(self):
        import cupy

        self._cupy = cupy
        self._module = None

    def _fn(self, name: str, dtype):
        if self._module is None:
            self._module = self._cupy.RawModule(code=_SOURCE)
        return self._module.get_function(f"{name}_{_SUFFIX[numpy.dtype(dtype)]}")

    def suffix(self, A, R):
        """R[g] for A (G, n, d, d) C-contiguous; R preallocated like A."""
        G, n, d = A.shape[0], A.shape[1], A.shape[-1]
        if G:
            self._fn("suffix_products", A.dtype)((G,), (d * d,), (A, R, numpy.int32(n), numpy.int32(d)),
                                                 shared_mem=d * d * A.itemsize)

    def adjoint_chain(self, A, dR):
        """dR_{j+1} += A_{j+1}^T dR_j in place; A, dR (G, n, d, d) C-contiguous."""
        G, n, d = A.shape[0], A.shape[1], A.shape[-1]
        if G:
            self._fn("adjoint_chain", A.dtype)((G,), (d * d,), (A, dR, numpy.int32(n), numpy.int32(d)),
                                               shared_mem=d * d * A.itemsize)

    def scalar_chain(self, alpha, dR):
        """dR_{j+1} += alpha_{j+1} dR_j in place; alpha, dR (G, n) C-contiguous."""
        G, n = alpha.shape
        if G:
            threads = 128
            self._fn("scalar_chain", alpha.dtype)(((G + threads - 1) // threads,), (threads,),
                                                  (alpha, dR, numpy.int32(G), numpy.int32(n)))


class LoopKernels:
    """The same recurrences as whole-array loops over the tokens (for checking ``Scans`` on a CPU)."""

    def __init__(self, xp):
        self._xp = xp

    def suffix(self, A, R):
        n = A.shape[1]
        R[:, n - 1] = self._xp.eye(A.shape[-1], dtype=A.dtype)
        for j in range(n - 2, -1, -1):
            R[:, j] = A[:, j + 1] @ R[:, j + 1]

    def adjoint_chain(self, A, dR):
        for j in range(A.shape[1] - 1):
            dR[:, j + 1] += self._xp.swapaxes(A[:, j + 1], -1, -2) @ dR[:, j]

    def scalar_chain(self, alpha, dR):
        for j in range(alpha.shape[1] - 1):
            dR[:, j + 1] += alpha[:, j + 1] * dR[:, j]


class Scans:
    """The four scan functions of reference/selfmod.py, each one kernel launch where it can be.

    ``fallback``: the loaded module's own functions (a dict by name), used for heads wider than
    ``MAX_D`` and for dtypes the kernels do not take."""

    def __init__(self, xp, fallback: dict, kernels):
        self._xp, self._fallback, self._k = xp, fallback, kernels

    @staticmethod
    def _ok(a, d: int | None = None) -> bool:
        return numpy.dtype(a.dtype) in _SUFFIX and (d is None or 1 <= d <= MAX_D)

    def suffix_products(self, A):
        xp = self._xp
        if not self._ok(A, A.shape[-1]):
            return self._fallback["suffix_products"](A)
        B, H, n, d, _ = A.shape
        A3 = xp.ascontiguousarray(A).reshape(B * H, n, d, d)
        R = xp.empty_like(A3)
        self._k.suffix(A3, R)
        return R.reshape(A.shape)

    def suffix_products_backward(self, A, R, dR, dfull):
        xp = self._xp
        if not self._ok(A, A.shape[-1]):
            return self._fallback["suffix_products_backward"](A, R, dR, dfull)
        B, H, n, d, _ = A.shape
        dA = xp.zeros_like(A)
        dA[:, :, 0] = dfull @ xp.swapaxes(R[:, :, 0], -1, -2)
        dR[:, :, 0] += xp.swapaxes(A[:, :, 0], -1, -2) @ dfull
        work = xp.ascontiguousarray(dR)
        self._k.adjoint_chain(xp.ascontiguousarray(A).reshape(B * H, n, d, d), work.reshape(B * H, n, d, d))
        if work is not dR:
            dR[...] = work  # dR holds every R_j's whole adjoint on return, as in the reference
        if n > 1:
            dA[:, :, 1:] = dR[:, :, :-1] @ xp.swapaxes(R[:, :, 1:], -1, -2)  # all j at once
        return dA

    def scalar_suffix_products(self, alpha):
        xp = self._xp
        if not self._ok(alpha):
            return self._fallback["scalar_suffix_products"](alpha)
        if alpha.shape[-1] == 1:
            return xp.ones_like(alpha)
        tail = xp.cumprod(alpha[..., :0:-1], axis=-1)[..., ::-1]  # prod_{i>j} alpha_i for j < n - 1
        return xp.concatenate([tail, xp.ones_like(alpha[..., :1])], axis=-1)

    def scalar_suffix_products_backward(self, alpha, R, dR, dfull):
        xp = self._xp
        if not self._ok(alpha):
            return self._fallback["scalar_suffix_products_backward"](alpha, R, dR, dfull)
        B, H, n = alpha.shape
        dalpha = xp.zeros_like(alpha)
        dalpha[..., 0] = dfull * R[..., 0]
        dR[..., 0] += alpha[..., 0] * dfull
        work = xp.ascontiguousarray(dR)
        self._k.scalar_chain(xp.ascontiguousarray(alpha).reshape(B * H, n), work.reshape(B * H, n))
        if work is not dR:
            dR[...] = work
        dalpha[..., 1:] = dR[..., :-1] * R[..., 1:]
        return dalpha

    def overrides(self) -> dict:
        """{name: function} for reference/selfmod.py's module globals."""
        return {name: getattr(self, name) for name in ("suffix_products", "suffix_products_backward",
                                                        "scalar_suffix_products",
                                                        "scalar_suffix_products_backward")}
