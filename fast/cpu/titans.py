"""Numba/BLAS port of the Titans neural long-term memory layer (chunk-parallel form, streaming state).

Paper: Titans §3-§4 (arXiv 2501.00663), Titans Eqs. (9)-(18); NL conventions, arXiv 2512.24695v1.
Specification: reference/titans.py, SPEC.md#titans (derivation: docs/titans-backward.md). Same
functions, signatures, return structures (``titans_forward(x, params, cfg, state=None) -> (y, cache,
state)``, ``titans_backward(dy, cache, dstate=None) -> (dx, dparams, dstate0)``) and dtypes.

Symbols (per head; as in the reference):

| paper (Titans)    | code         | shape                 |
| ----------------- | ------------ | --------------------- |
| q_t, k_t, v_t     | q, k, v      | (B, H, T, dh)         |
| theta_t, eta_t, 1-alpha_t | eta, beta, alpha | (B, H, T)  |
| M_t / W1, W2      | W[n]         | (B, H, ., .)          |
| S_t               | S[n]         | like W[n]             |
| grad factors      | L, R         | (B, H, n, .)          |
| chunk weights     | A, s, w, Bc, e | (B, H), (B, H), (B, H, n), (B, H), (B, H, n) |

How it is fast:
- every per-chunk product of the reference's einsums (the read, the inner-gradient factors and
  their VJP via fast.cpu.mlp_memory, the folded writes ``sum_m w_m L_m R_m^T``) is a stacked
  matrix product (BLAS);
- the gate scans (cumulative products of alpha and beta, Titans Eqs. 16-18) and their backward are
  one compiled kernel each over (B, H) (serial: the work is O(B H C^2), below the cost of a
  parallel launch); the products are formed directly (no log/exp);
- the projections are plain matrix products (``_linear``): NumPy 2.4's ``einsum(optimize=True)``
  in reference.primitives.linear_* takes ~20 ms per (4, 256, 128) x (128, 128) product here.
- like the reference, the backward keeps only each chunk's start states and the per-token factors.
- per chunk, the MLP memory runs once on the stacked [q; k] tokens (the read and the inner gradient
  are both at the chunk-start state); both folds of a weight (w and e) are one stacked product; the
  backward keeps [dW; dS] in one array, so the folds' VJP is two stacked products; the element-wise
  glue (state update, the inner products dA/ds/dBc, the factor cotangents, the cotangent step) is
  compiled, in place. Measured at titans-small sizes (float32, one thread, B=4 / B=2, medians
  alternated with the previous version in one process): forward 17.4 -> 16.3 / 9.8 -> 9.5 ms,
  backward 28.4 -> 25.8 / 15.2 -> 13.4 ms. What is left is mostly BLAS time (the stacked products
  run at ~80 GFLOP/s) and fast.cpu.mlp_memory's VJPs.

Port decisions:
- the forward's cache has the reference's layout (the same tape per chunk, the primitives' caches,
  fast.cpu.mlp_memory caches that carry the reference's keys), so either backward accepts either
  forward's cache (tested);
- ``cfg.impl == "loop"`` (the token-loop oracle) falls back to reference.titans explicitly;
- the layer runs with one BLAS thread (``mlp_memory.blas_single_thread``: measured 0.16 s vs
  0.59 s per forward+backward at titans-small sizes on the loaded 2-core machine);
- the element-wise glue (conv, norms, activations, output norm) calls fast.cpu.primitives (compiled;
  the same functions and cache layouts as reference.primitives).
"""

from __future__ import annotations

import inspect

import numpy as np
from numba import njit

from ...reference import titans as RT
from ...reference.titans import (  # noqa: F401  (same API)
    TitansConfig,
    init_name,
    init_params,
    init_state,
    param_shapes,
    weight_names,
)
from . import mlp_memory as FM
from . import primitives as P  # the compiled glue (same functions and cache layouts as reference.primitives)

# ---------------------------------------------------------------------------------------------
# Compiled gate scans: the chunk coefficients and their backward
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _coef_kernel(alpha, beta, eta, momentum, a_out, P_out, K_out, A, s, w, Bc, e):
    """Per (b, h): a_i = prod_{j>i} alpha_j, P[i, m] = prod_{m<j<=i} beta_j (identity without
    momentum), K_m = sum_{i>=m} a_i P[i, m]; A = a_0, s = sum_{i>=1} a_i P[i, 0], w = eta K,
    Bc = P[c, 0], e_m = eta_m P[c, m] (Titans Eqs. 16-18)."""
    nb, nh, c = alpha.shape
    for bh in range(nb * nh):
        b, h = bh // nh, bh % nh
        a_out[b, h, c] = 1.0
        for i in range(c - 1, -1, -1):
            a_out[b, h, i] = a_out[b, h, i + 1] * alpha[b, h, i]  # alpha_{i+1} (1-based)
        for i in range(c + 1):
            for m in range(c + 1):
                P_out[b, h, i, m] = 0.0
            P_out[b, h, i, i] = 1.0
            if momentum:
                for m in range(i - 1, -1, -1):
                    P_out[b, h, i, m] = P_out[b, h, i, m + 1] * beta[b, h, m]  # beta_{m+1}
        for m in range(1, c + 1):
            acc = 0.0
            for i in range(m, c + 1):
                acc += a_out[b, h, i] * P_out[b, h, i, m]
            K_out[b, h, m - 1] = acc
            w[b, h, m - 1] = eta[b, h, m - 1] * acc
        A[b, h] = a_out[b, h, 0]
        if momentum:
            acc = 0.0
            for i in range(1, c + 1):
                acc += a_out[b, h, i] * P_out[b, h, i, 0]
            s[b, h] = acc
            Bc[b, h] = P_out[b, h, c, 0]
            for m in range(1, c + 1):
                e[b, h, m - 1] = eta[b, h, m - 1] * P_out[b, h, c, m]
        else:
            s[b, h] = 0.0
            Bc[b, h] = 0.0
            for m in range(c):
                e[b, h, m] = 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def _coef_backward_kernel(dA, ds, dw, dBc, de, a, Pm, K, alpha, beta, eta, momentum, dalpha, dbeta, deta):
    """VJP of ``_coef_kernel``. dalpha by a division-free recurrence (finite where a retention gate
    underflowed to 0 in float32; the reference's log-derivative form divides by alpha); dbeta in the
    reference's log-derivative form (d log P[i, m] / d log beta_j = [m < j <= i]), dividing by beta.
    ``error_model="numpy"``: a momentum gate at 0 gives inf/nan as the reference's NumPy division
    does, not ZeroDivisionError."""
    nb, nh, c = alpha.shape
    for bh in range(nb * nh):
        b, h = bh // nh, bh % nh
        terms = np.zeros((c + 1, c + 1), dtype=a.dtype)
        for m in range(1, c + 1):
            deta[b, h, m - 1] = dw[b, h, m - 1] * K[b, h, m - 1] + de[b, h, m - 1] * Pm[b, h, c, m]
        for i in range(1, c + 1):
            for m in range(1, i + 1):
                terms[i, m] = a[b, h, i] * Pm[b, h, i, m] * dw[b, h, m - 1] * eta[b, h, m - 1]
            if momentum:
                terms[i, 0] = a[b, h, i] * Pm[b, h, i, 0] * ds[b, h]
        # dalpha_t (0-based t) = (sum_{i<=t} r_i + dA a_0) / alpha_t, r_i = a_i G_i, computed without the
        # division (a gate that underflowed to 0 in float32 made it 0/0): with G_0 = dA and
        # G_i = sum_m P[i, m] Q[i, m], a_i / alpha_t = prod_{i<=u<t} alpha_u * a_{t+1} for i <= t, so
        # dalpha_t = a_{t+1} S_t with S_0 = G_0, S_t = S_{t-1} alpha_{t-1} + G_t.
        run = dA[b, h]
        for t in range(c):
            if t > 0:
                g = 0.0
                for m in range(1, t + 1):
                    g += Pm[b, h, t, m] * dw[b, h, m - 1] * eta[b, h, m - 1]
                if momentum:
                    g += Pm[b, h, t, 0] * ds[b, h]
                run = run * alpha[b, h, t - 1] + g
            dalpha[b, h, t] = a[b, h, t + 1] * run
        if momentum:
            pref = 0.0  # sum_{m<j} de_m e_m
            for j in range(1, c + 1):
                acc = 0.0
                for i in range(j, c + 1):
                    for m in range(j):
                        acc += terms[i, m]
                acc += dBc[b, h] * Pm[b, h, c, 0] + pref
                dbeta[b, h, j - 1] = acc / beta[b, h, j - 1]
                pref += de[b, h, j - 1] * eta[b, h, j - 1] * Pm[b, h, c, j]
        else:
            for j in range(c):
                dbeta[b, h, j] = 0.0


def chunk_coefficients(alpha, beta, eta, momentum):
    """Same as ``reference.titans.chunk_coefficients``: ((A, s, w, Bc, e), cache)."""
    alpha, beta, eta = (np.ascontiguousarray(g) for g in (alpha, beta, eta))
    B, H, c = alpha.shape
    dt = alpha.dtype
    a = np.empty((B, H, c + 1), dt)
    Pm = np.empty((B, H, c + 1, c + 1), dt)
    K = np.empty((B, H, c), dt)
    A, s, Bc = (np.empty((B, H), dt) for _ in range(3))
    w, e = np.empty((B, H, c), dt), np.empty((B, H, c), dt)
    _coef_kernel(alpha, beta, eta, bool(momentum), a, Pm, K, A, s, w, Bc, e)
    return (A, s, w, Bc, e), (a, Pm, K, alpha, beta, eta, momentum)


def chunk_coefficients_backward(dA, ds, dw, dBc, de, cache):
    """Same as ``reference.titans.chunk_coefficients_backward``: (dalpha, dbeta, deta)."""
    a, Pm, K, alpha, beta, eta, momentum = cache
    dt = alpha.dtype
    dalpha, dbeta, deta = (np.empty_like(alpha) for _ in range(3))
    dA, ds, dw, dBc, de = (np.ascontiguousarray(np.asarray(g, dtype=dt)) for g in (dA, ds, dw, dBc, de))
    _coef_backward_kernel(dA, ds, dw, dBc, de, a, Pm, K, alpha, beta, eta, bool(momentum), dalpha, dbeta, deta)
    return dalpha, dbeta, deta


# ---------------------------------------------------------------------------------------------
# The memory at the chunk-start state: read and inner-gradient factors (BLAS, fast.cpu.mlp_memory)
# ---------------------------------------------------------------------------------------------


def _T(a):
    return np.swapaxes(a, -1, -2)


def _read_forward(cfg, Wb, q):
    if cfg.memory == "matrix":
        return FM.matrix_memory_forward(Wb["M"], q)  # Titans Eq. (15)
    return FM.mlp_memory_forward(Wb["W1"], Wb["W2"], q, act=cfg.act, layernorm=cfg.layernorm)


def _read_backward(cfg, do, cache):
    if cfg.memory == "matrix":
        dM, dq = FM.matrix_memory_backward(do, cache)
        return {"M": dM}, dq
    dW1, dW2, dq = FM.mlp_memory_backward(do, cache)
    return {"W1": dW1, "W2": dW2}, dq


def read_forward(cfg, W, q):
    """reference.titans.read_forward (a read-only retrieval at fast weights W, SPEC.md#titans-mac), compiled."""
    return _read_forward(cfg, W, q)


def read_backward(cfg, do, cache):
    """reference.titans.read_backward."""
    return _read_backward(cfg, do, cache)


def inner_grad(cfg, Wb, k, v):
    """Same as ``reference.titans.inner_grad``: ({name: (L, R)}, cache), grad_n = L_n R_n^T."""
    if cfg.memory == "matrix":
        u, cache = FM.matrix_inner_grad(Wb["M"], k, v)  # Titans Eq. (12)
        return {"M": (u, k)}, cache
    u1, a, u2, cache = FM.inner_grad(Wb["W1"], Wb["W2"], k, v, cfg.act, cfg.layernorm)  # Titans Eq. (12)
    return {"W1": (u1, a), "W2": (u2, k)}, cache


def inner_grad_backward(cfg, dfac, cache):
    """Same as ``reference.titans.inner_grad_backward``: (dWb, dk, dv)."""
    if cfg.memory == "matrix":
        du, dR = dfac["M"]
        dM, dk, dv = FM.matrix_inner_grad_backward(du, cache)
        return {"M": dM}, dk + dR, dv
    (du1, da), (du2, dk_direct) = dfac["W1"], dfac["W2"]
    dW1, dW2, dk, dv = FM.inner_grad_backward(du1, da, du2, cache)
    return {"W1": dW1, "W2": dW2}, dk + dk_direct, dv


def _linear(x, W):
    """y = x W^T as one matrix product: x (..., I), W (O, I) -> ((..., O), cache); the cache has
    reference.primitives.linear_forward's layout (x, W, has_bias), so caches are interchangeable."""
    return x @ W.T, (x, W, False)


def _linear_backward(dy, cache):
    """(dx, dW) of ``_linear``."""
    x, W = cache[0], cache[1]
    I, O = W.shape[1], W.shape[0]
    return dy @ W, dy.reshape(-1, O).T @ x.reshape(-1, I)


def _gate_forward(x, w, b):
    """sigmoid(x w^T + b) per token and head: (B, T, D), (H, D), (H,) -> (B, H, T)."""
    z = np.ascontiguousarray((x @ w.T).transpose(0, 2, 1)) + b[None, :, None]  # (B, H, T)
    return P.sigmoid_forward(z)


def _gate_backward(dg, cache, x, w):
    dz = P.sigmoid_backward(dg, cache)  # (B, H, T)
    dzt = dz.transpose(0, 2, 1)  # (B, T, H)
    H, D = w.shape
    return dzt @ w, dzt.reshape(-1, H).T @ x.reshape(-1, D), dz.sum(axis=(0, 2))


def _inner(a, b):
    """<a, b> over the last two axes -> (B, H)."""
    return np.sum(a * b, axis=(-2, -1))


def _fold(wt, L, R):
    """sum_m wt_m L_m R_m^T: (B, H, n), (B, H, n, i), (B, H, n, j) -> (B, H, i, j), one product."""
    return _T(L * wt[..., None]) @ R


# Compiled element-wise glue of the chunk loop. Each replaces 3-8 NumPy calls (and their temporaries) per
# chunk and weight; sums run in float64 (the NumPy pairwise sums they replace are as accurate in float32).


@njit(cache=True, nogil=True)
def _state_step(A, s, Bc, W, S, F, momentum, W_out, S_out):
    """One chunk's state update from the folds F[:, :, 0] = sum_m w_m L_m R_m^T, F[:, :, 1] = the
    same with e (Titans Eqs. 16-18): W' = (A W - F_0) + s S, S' = Bc S - F_1 (the reference's order
    of operations); without momentum W' = A W - F_0 and S is not touched."""
    nb, nh, ni, nj = W.shape
    for b in range(nb):
        for h in range(nh):
            a_, s_, bc = A[b, h], s[b, h], Bc[b, h]
            for i in range(ni):
                for j in range(nj):
                    wn = a_ * W[b, h, i, j] - F[b, h, 0, i, j]
                    if momentum:
                        sv = S[b, h, i, j]
                        W_out[b, h, i, j] = wn + s_ * sv
                        S_out[b, h, i, j] = bc * sv - F[b, h, 1, i, j]
                    else:
                        W_out[b, h, i, j] = wn


@njit(cache=True, nogil=True)
def _state_inners(D2, W0, S0, momentum, out):
    """out[:, :, 0] += <dW, W_start>, out[:, :, 1] += <dW, S_start>, out[:, :, 2] += <dS, S_start>
    per (b, h) (the cotangents dA, ds, dBc of the chunk weights); D2[:, :, 0] = dW, D2[:, :, 1] = dS.
    The sums run down the rows into per-column float64 accumulators: without fastmath a running scalar
    sum is one serial chain of adds (measured 65 us per call at titans-small sizes), the column
    accumulators vectorise."""
    nb, nh, ni, nj = W0.shape
    acc = np.empty((3, nj), np.float64)
    for b in range(nb):
        for h in range(nh):
            acc[:] = 0.0
            for i in range(ni):
                for j in range(nj):
                    dw = np.float64(D2[b, h, 0, i, j])
                    acc[0, j] += dw * W0[b, h, i, j]
                    if momentum:
                        s0 = np.float64(S0[b, h, i, j])
                        acc[1, j] += dw * s0
                        acc[2, j] += D2[b, h, 1, i, j] * s0
            for k in range(3):
                tot = 0.0
                for j in range(nj):
                    tot += acc[k, j]
                out[b, h, k] += tot


@njit(cache=True, nogil=True)
def _factor_cotangents(LD, RD, R, w, e, momentum, dw, de, dL, dR):
    """The fold's VJP for the factors: with LD[:, :, k] = L dX_k, RD[:, :, k] = R dX_k^T (dX_0 = dW,
    dX_1 = dS): dw_m -= <L_m dW, R_m>, de_m -= <L_m dS, R_m> (accumulated over the weights),
    dL = -w RD_0 - e RD_1, dR = -w LD_0 - e LD_1. The row sums use four partial sums (independent
    chains of adds; a single running sum is latency-bound)."""
    nb, nh, _, nm, nj = LD.shape
    ni = RD.shape[4]
    for b in range(nb):
        for h in range(nh):
            for m in range(nm):
                wm, em = w[b, h, m], e[b, h, m]
                a0 = a1 = a2 = a3 = 0.0  # dw_m's partial sums
                c0 = c1 = c2 = c3 = 0.0  # de_m's
                j4 = nj - nj % 4
                for j in range(0, j4, 4):
                    a0 += LD[b, h, 0, m, j] * np.float64(R[b, h, m, j])
                    a1 += LD[b, h, 0, m, j + 1] * np.float64(R[b, h, m, j + 1])
                    a2 += LD[b, h, 0, m, j + 2] * np.float64(R[b, h, m, j + 2])
                    a3 += LD[b, h, 0, m, j + 3] * np.float64(R[b, h, m, j + 3])
                    if momentum:
                        c0 += LD[b, h, 1, m, j] * np.float64(R[b, h, m, j])
                        c1 += LD[b, h, 1, m, j + 1] * np.float64(R[b, h, m, j + 1])
                        c2 += LD[b, h, 1, m, j + 2] * np.float64(R[b, h, m, j + 2])
                        c3 += LD[b, h, 1, m, j + 3] * np.float64(R[b, h, m, j + 3])
                for j in range(j4, nj):
                    a0 += LD[b, h, 0, m, j] * np.float64(R[b, h, m, j])
                    if momentum:
                        c0 += LD[b, h, 1, m, j] * np.float64(R[b, h, m, j])
                for j in range(nj):
                    if momentum:
                        dR[b, h, m, j] = -wm * LD[b, h, 0, m, j] - em * LD[b, h, 1, m, j]
                    else:
                        dR[b, h, m, j] = -wm * LD[b, h, 0, m, j]
                dw[b, h, m] -= (a0 + a1) + (a2 + a3)
                if momentum:
                    de[b, h, m] -= (c0 + c1) + (c2 + c3)
                for i in range(ni):
                    if momentum:
                        dL[b, h, m, i] = -wm * RD[b, h, 0, m, i] - em * RD[b, h, 1, m, i]
                    else:
                        dL[b, h, m, i] = -wm * RD[b, h, 0, m, i]


@njit(cache=True, nogil=True)
def _cotangent_step(A, s, Bc, D2, momentum):
    """In place, the state cotangents one chunk back: dS <- s dW + Bc dS, dW <- A dW."""
    nb, nh, _, ni, nj = D2.shape
    for b in range(nb):
        for h in range(nh):
            a_, s_, bc = A[b, h], s[b, h], Bc[b, h]
            for i in range(ni):
                for j in range(nj):
                    dw = D2[b, h, 0, i, j]
                    if momentum:
                        D2[b, h, 1, i, j] = s_ * dw + bc * D2[b, h, 1, i, j]
                    D2[b, h, 0, i, j] = a_ * dw


# ---------------------------------------------------------------------------------------------
# The chunk-parallel memory (Titans Eqs. 16-18)
# ---------------------------------------------------------------------------------------------


# the LayerNorm eps of the MLP memory: the reference layer calls mlp_memory without an eps, so it is
# that function's default (read from it, so the two cannot drift)
_MEM_LN_EPS = inspect.signature(FM.mlp_memory_forward).parameters["eps"].default


def _read_and_inner_grad(cfg, Wb, q, k, v):
    """``_read_forward(cfg, Wb, q)`` and ``inner_grad(cfg, Wb, k, v)`` in one pass: both evaluate the
    memory at the same chunk-start state, so the MLP memory runs once on the stacked [q; k] tokens
    (two products and one activation pass instead of four and two). Returns (o, rcache, fac, fcache)
    with the caches fast.cpu.mlp_memory's functions return (same keys). The matrix memory and
    complex input (the complex-step path) take the separate calls."""
    if cfg.memory == "matrix" or np.iscomplexobj(q) or np.iscomplexobj(Wb["W1"]):
        o, rcache = _read_forward(cfg, Wb, q)
        fac, fcache = inner_grad(cfg, Wb, k, v)
        return o, rcache, fac, fcache
    W1, W2 = Wb["W1"], Wb["W2"]
    n = q.shape[2]
    y, _, a, sp, spp, c, rstd = FM._read(W1, W2, np.concatenate((q, k), axis=2), cfg.act, cfg.layernorm,
                                         _MEM_LN_EPS, True)  # fmt: skip
    tok = (slice(None), slice(None), slice(None, n))
    kt = (slice(None), slice(None), slice(n, None))
    ln = cfg.layernorm
    rcache = {"W1": W1, "W2": W2, "z": q, "a": a[tok], "sp": sp[tok], "c": c[tok], "rstd": rstd[tok] if ln else None,
              "layernorm": ln, "fast": True}  # fmt: skip
    ck, rk = c[kt], (rstd[kt] if ln else None)
    g = 2 * (y[kt] - v)  # (B, H, n, dh)   Titans Eq. (12) (mlp_memory.inner_grad)
    u1 = FM._layernorm_jvp(g, ck, rk) if ln else g
    wv = u1 @ W1  # (B, H, n, Hm)   W1^T u1
    ak, spk = a[kt], sp[kt]
    u2 = spk * wv
    fcache = {"W1": W1, "W2": W2, "k": k, "a": ak, "sp": spk, "spp": spp[kt], "c": ck, "rstd": rk,
              "g": g, "u1": u1, "w": wv, "layernorm": ln, "fast": True}  # fmt: skip
    return y[tok], rcache, {"W1": (u1, ak), "W2": (u2, k)}, fcache


def memory_chunked_forward(q, k, v, alpha, beta, eta, mem, cfg):
    """Same as ``reference.titans.memory_chunked_forward``: (o, cache, mem_out)."""
    names = RT.weight_names(cfg)
    W = {n: mem[n] for n in names}
    Wb = {n: mem[n + "_b"] for n in names}
    S = {n: mem["S_" + n] for n in names} if cfg.momentum else None
    segs = RT.segments(q.shape[2], mem["pos"], cfg.chunk)
    o = np.empty_like(q)
    tape = []
    mom = bool(cfg.momentum)
    for t0, t1, boundary in segs:
        sl = slice(t0, t1)
        o[:, :, sl], rcache, fac, fcache = _read_and_inner_grad(cfg, Wb, q[:, :, sl], k[:, :, sl], v[:, :, sl])
        (A, s, w, Bc, e), ccache = chunk_coefficients(alpha[..., sl], beta[..., sl], eta[..., sl], cfg.momentum)
        W_start, S_start = W, S
        we = np.stack((w, e), axis=2) if mom else w[:, :, None]  # (B, H, 1|2, n)
        W, S = {}, ({} if mom else None)
        for n in names:  # Titans Eqs. (16)-(18): both folds of a weight in one product
            L, R = fac[n]
            F = _T(L[:, :, None] * we[..., None]) @ R[:, :, None]  # (B, H, 1|2, i, j)
            W[n] = np.empty(W_start[n].shape, W_start[n].dtype)  # C order whatever the start's (SPEC.md#fast-cpu)
            if mom:
                S[n] = np.empty(S_start[n].shape, S_start[n].dtype)
            _state_step(A, s, Bc, W_start[n], S_start[n] if mom else W_start[n], F, mom, W[n],
                        S[n] if mom else W[n])  # fmt: skip
        if boundary:
            Wb = W
        tape.append((sl, rcache, fac, fcache, (A, s, w, Bc, e), ccache, W_start, S_start, boundary))
    mem_out = {"pos": (mem["pos"] + q.shape[2]) % cfg.chunk}
    for n in names:
        mem_out[n], mem_out[n + "_b"] = W[n], Wb[n]
        if cfg.momentum:
            mem_out["S_" + n] = S[n]
    return o, (tape, alpha, beta, eta, cfg), mem_out


def memory_chunked_backward(do, cache, dmem=None):
    """Same as ``reference.titans.memory_chunked_backward``: (dq, dk, dv, dalpha, dbeta, deta, dmem0).

    The state cotangents of a weight live in one array D2 (B, H, 1|2, i, j) = [dW; dS], so the four
    products of the folds' VJP are two stacked products (L D2, R D2^T) and the element-wise rest is
    compiled (``_state_inners``, ``_factor_cotangents``, ``_cotangent_step``), updated in place."""
    tape, alpha, beta, eta, cfg = cache
    names = RT.weight_names(cfg)
    mom = bool(cfg.momentum)
    dq, dk, dv = (np.zeros_like(do) for _ in range(3))
    dalpha, dbeta, deta = (np.zeros_like(alpha) for _ in range(3))
    W_like = tape[-1][6]
    D2, dWb = {}, {}
    for n in names:
        like = W_like[n]
        D2[n] = np.empty((*like.shape[:2], 1 + mom, *like.shape[2:]), like.dtype)
        D2[n][:, :, 0] = RT.dmem_get(dmem, n, like)
        if mom:
            D2[n][:, :, 1] = RT.dmem_get(dmem, "S_" + n, like)
        dWb[n] = np.array(RT.dmem_get(dmem, n + "_b", like), copy=True)
    for sl, rcache, fac, fcache, coef, ccache, W_start, S_start, boundary in reversed(tape):
        if boundary:
            for n in names:
                D2[n][:, :, 0] += dWb[n]
                dWb[n][...] = 0
        dWb_r, dq[:, :, sl] = _read_backward(cfg, do[:, :, sl], rcache)
        for n in names:
            dWb[n] += dWb_r[n]
        if cfg.stop_grad_writes:
            continue
        A, s, w, Bc, e = coef
        dt = w.dtype
        inn = np.zeros((*A.shape, 3), np.float64)  # dA, ds, dBc
        dw, de = np.zeros(w.shape, np.float64), np.zeros(w.shape, np.float64)
        dfac = {}
        for n in names:
            L, R = fac[n]
            X = D2[n]
            _state_inners(X, W_start[n], S_start[n] if mom else W_start[n], mom, inn)
            LD = L[:, :, None] @ X  # (B, H, 1|2, m, j)   L_m^T dW, L_m^T dS
            RD = R[:, :, None] @ _T(X)  # (B, H, 1|2, m, i)   dW R_m, dS R_m
            dL, dR = np.empty_like(L), np.empty_like(R)
            _factor_cotangents(LD, RD, R, w, e, mom, dw, de, dL, dR)
            dfac[n] = (dL, dR)
        dA, ds, dBc = (inn[..., i].astype(dt) for i in range(3))
        da, db, de_ = chunk_coefficients_backward(dA, ds, dw.astype(dt), dBc, de.astype(dt), ccache)
        dalpha[..., sl], dbeta[..., sl], deta[..., sl] = da, db, de_
        dWb_g, dk[:, :, sl], dv[:, :, sl] = inner_grad_backward(cfg, dfac, fcache)
        for n in names:
            dWb[n] += dWb_g[n]
            _cotangent_step(A, s, Bc, D2[n], mom)
    dmem0 = {}
    for n in names:
        dmem0[n], dmem0[n + "_b"] = D2[n][:, :, 0], dWb[n]
        if cfg.momentum:
            dmem0["S_" + n] = D2[n][:, :, 1] if not cfg.stop_grad_writes else np.zeros_like(dWb[n])
    return dq, dk, dv, dalpha, dbeta, deta, dmem0


# ---------------------------------------------------------------------------------------------
# The layer (glue as in the reference; the memory core above)
# ---------------------------------------------------------------------------------------------


def titans_forward(x, params, cfg: TitansConfig, state=None):
    """Same as ``reference.titans.titans_forward``: (y, cache, state)."""
    with FM.blas_single_thread():
        return _titans_forward(x, params, cfg, state)


def titans_backward(dy, cache, dstate=None):
    """Same as ``reference.titans.titans_backward``: (dx, dparams, dstate0)."""
    with FM.blas_single_thread():
        return _titans_backward(dy, cache, dstate)


def _titans_forward(x, params, cfg, state):
    if isinstance(cfg, TitansConfig) and cfg.impl == "loop":  # the token-loop oracle: the reference's
        y, cache, new_state = RT.titans_forward(x, params, cfg, state)
        return y, {"reference": cache}, new_state
    x = RT.check_inputs(x, params, cfg, state)
    B, T, D = x.shape
    H, dh = cfg.n_heads, cfg.head_dim
    fresh = state is None
    if fresh:
        state = init_state(params, cfg, B)
    new_state, c_proj, heads = {}, {}, {}
    for n in ("q", "k", "v"):
        p, c_lin = _linear(x, params["W_" + n])  # (B, T, D)
        c, c_conv, new_state["conv_" + n] = P.conv1d_forward(p, params["conv_" + n], None, state["conv_" + n])
        s, c_act = P.silu_forward(c)  # Titans Eq. (11)
        s = s.reshape(B, T, H, dh)
        c_norm = None
        if n != "v":
            s, c_norm = P.l2norm_forward(s, cfg.eps)
        heads[n] = np.ascontiguousarray(s.transpose(0, 2, 1, 3))  # (B, H, T, dh)
        c_proj[n] = (c_lin, c_conv, c_act, c_norm)
    s_eta, c_eta = _gate_forward(x, params["w_eta"], params["b_eta"])
    eta = cfg.eta_max * s_eta  # (B, H, T)
    alpha, c_alpha = (_gate_forward(x, params["w_alpha"], params["b_alpha"]) if cfg.retention
                      else (np.ones((B, H, T), x.dtype), None))  # fmt: skip
    beta, c_beta = (_gate_forward(x, params["w_beta"], params["b_beta"]) if cfg.momentum
                    else (np.zeros((B, H, T), x.dtype), None))  # fmt: skip
    mem = {key: state[key] for key in RT.mem_keys(cfg)}
    mem["pos"] = int(state["pos"])
    o, c_mem, mem_out = memory_chunked_forward(heads["q"], heads["k"], heads["v"], alpha, beta, eta, mem, cfg)
    for key, val in mem_out.items():
        new_state[key] = val if key == "pos" else np.array(val, copy=True, order="C")
    o_n, c_rms = P.rmsnorm_forward(o.transpose(0, 2, 1, 3), params["g_o"], cfg.eps)  # (B, T, H, dh)
    zg, c_g = _linear(x, params["W_g"])
    g, c_gs = P.silu_forward(zg)
    h = o_n.reshape(B, T, D) * g
    y, c_o = _linear(h, params["W_o"])
    cache = dict(x=x, params=params, cfg=cfg, fresh=fresh, c_proj=c_proj, gates=(c_eta, c_alpha, c_beta),
                 c_mem=c_mem, c_rms=c_rms, o_n=o_n, c_g=c_g, g=g, c_gs=c_gs, c_o=c_o)
    return y, cache, new_state


def _titans_backward(dy, cache, dstate):
    if "reference" in cache:  # the forward fell back to the reference
        return RT.titans_backward(dy, cache["reference"], dstate)
    x, params, cfg = cache["x"], cache["params"], cache["cfg"]
    B, T, D = x.shape
    H, dh = cfg.n_heads, cfg.head_dim
    dy = np.asarray(dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected shape (B, T, D) = {x.shape}, got {dy.shape}")
    dstate = {} if dstate is None else dstate
    grads = {}
    dh_, grads["W_o"] = _linear_backward(dy, cache["c_o"])
    dg = dh_ * cache["o_n"].reshape(B, T, D)
    do_n = (dh_ * cache["g"]).reshape(B, T, H, dh)
    dx, grads["W_g"] = _linear_backward(P.silu_backward(dg, cache["c_gs"]), cache["c_g"])
    do, grads["g_o"] = P.rmsnorm_backward(do_n, cache["c_rms"])
    dmem = {key: dstate.get(key) for key in RT.mem_keys(cfg)}
    dq, dk, dv, dalpha, dbeta, deta, dmem0 = memory_chunked_backward(
        np.ascontiguousarray(do.transpose(0, 2, 1, 3)), cache["c_mem"], dmem)  # fmt: skip
    c_eta, c_alpha, c_beta = cache["gates"]
    for name, dgate, c in (("eta", deta * cfg.eta_max, c_eta), ("alpha", dalpha, c_alpha), ("beta", dbeta, c_beta)):
        if c is None:
            continue
        dx_g, grads["w_" + name], grads["b_" + name] = _gate_backward(dgate, c, x, params["w_" + name])
        dx = dx + dx_g
    dstate0 = None if cache["fresh"] else {}
    for n, dhead in (("q", dq), ("k", dk), ("v", dv)):
        c_lin, c_conv, c_act, c_norm = cache["c_proj"][n]
        ds = dhead.transpose(0, 2, 1, 3)
        if c_norm is not None:
            ds = P.l2norm_backward(ds, c_norm)
        dc = P.silu_backward(ds.reshape(B, T, D), c_act)
        dp, grads["conv_" + n], _, dconv_state = P.conv1d_backward(dc, c_conv, dstate.get("conv_" + n))
        dx_p, grads["W_" + n] = _linear_backward(dp, c_lin)
        dx = dx + dx_p
        if dstate0 is not None:
            dstate0["conv_" + n] = dconv_state
    for n in RT.weight_names(cfg):
        init = RT.init_name(n)
        if cache["fresh"]:
            grads[init] = (dmem0[n] + dmem0[n + "_b"]).sum(axis=0)
        else:
            grads[init] = np.zeros_like(params[init])
            dstate0.update({key: dmem0[key] for key in RT.mem_keys(cfg)
                            if key.removeprefix("S_").removesuffix("_b") == n})  # fmt: skip
    grads = {key: grads[key] for key in param_shapes(cfg)}
    return dx, grads, dstate0
