"""Numba/BLAS port of self-modifying Titans: the key, value, gate and output memories learn in context.

Paper: §8.1-8.2, Eqs. (83)-(93), arXiv 2512.24695v1 (DGD: §4.5, Eqs. (56)-(57)). Specification:
reference/selfmod.py, SPEC.md#selfmod (derivation: docs/selfmod-backward.md); the port's decisions:
SPEC.md#fast-cpu. Same functions, signatures, return structures and dtypes:
``forward(x, params, cfg, state=None) -> (y, cache, state)``,
``backward(dy, cache, dstate=None) -> (dx, dparams, dstate0)``.

Symbols (per head; as in the reference):

| paper                  | code          | shape                     |
| ---------------------- | ------------- | ------------------------- |
| x_t                    | x             | (B, T, D)                 |
| q_t, k_t, v_t          | q, k, v       | (B, H, n, dh)             |
| eta_t, alpha_t, eta'_t | eta, alpha, ep| (B, H, n)                 |
| momentum decay         | beta          | (H,) per memory           |
| W_key (W2 or M)        | P (key side)  | (B, H, a, dh)             |
| W1                     | P (other)     | (B, H, dh, Hm)            |
| S                      | S             | like P                    |
| grad factors G = L R^T | L, R          | (B, H, n, a), (B, H, n, b)|

How it is fast (the reference forms per-token dense gradients G (B, H, n, a, b) and dh x dh suffix
products with np.einsum; its writes are ~90% of a hope-small training step):
- the inner gradients stay rank-1 factors ``G_t = L_t R_t^T`` (fast.cpu.mlp_memory, BLAS);
- the weight that does not multiply the key (W1) obeys exactly the Titans recurrence
  ``S_t = beta S_{t-1} - eta'_t G_t, W_t = alpha_t W_{t-1} + S_t``, so a segment's writes fold into
  ``A W + s S - sum_t w_t L_t R_t^T`` with the compiled coefficient scans of fast.cpu.titans
  (Titans Eqs. 16-18): one matrix product per segment, forward and backward;
- the key-side weight (W2 or M) carries the DGD shrink ``W (alpha I - eta' k k^T)`` (Eq. 88): a
  compiled token loop over the segment (``_key_write``), serial over the (b, h) pairs (measured on
  the shared 2-core machine: with ``parallel=True`` and Numba's default OpenMP layer the kernel took
  a median 12 ms per call vs 0.7 ms serial, spinning threads competing with other processes; with
  OMP_WAIT_POLICY=passive 0.7 ms either way); its backward (``_key_write_backward``) recomputes the segment's states from the stored
  segment-start state instead of storing one per token (in place, one fused pass per token), and
  reverses them token by token, each token one fused pass over the (a, b) entries that accumulates
  the key's and the gates' cotangents column-wise (measured 2.5 -> 1.3 ms per call at hope-small
  sizes against the former separate passes and per-(b, h) work arrays; keeping the replay's P k
  per token and not storing dS~ gains a few percent more, see the kernel's docstring);
- or, by default where ``ut_is_accurate`` (head width >= 8, segment <= 64; the switch ``KEY_WRITES``,
  env ``NL_CPU_KEY_WRITES``, SPEC.md#fast-cpu), the same writes in the chunk-parallel UT form
  (fast.cpu.selfmod_chunk; docs/selfmod-chunk.md §§3, 7): BLAS products of the (n x a x b) sizes and
  compiled O(n^2) kernels instead of n dependent passes over the state. hope-small training step
  (float32, 4 x 256, interleaved in one process, medians of 15, scripts/bench_key_writes.py):
  0.88-0.95x the sweep's (docs/performance.md#cpu-key-writes);
- the W1 fold's full-size VJP terms (three inner products with the segment-start state, two scaled
  copies) run in one compiled pass (``_fold_state_backward``, 123-135 -> 37 us per call); its forward
  update takes both folds from one product and writes P and S in one compiled pass
  (``_fold_state_forward``: 400 -> 310 us per memory and segment, B = 4, float32, the rest being the
  product and the state's memory traffic), and the factors' VJP is one compiled pass over the four
  BLAS products (``_fold_factors_backward``, ten NumPy element-wise calls before);
- a call returns the arrays it made without copying them (the reference copies the whole state and
  dstate: 30 (B, H, dh, Hm) copies each way); only an array it would share with the input state or
  dstate is copied (tested). Segment forward at hope-small sizes (B = 4, float32, alternating in one
  process, medians) 11.2 -> 9.0 ms, B = 2 6.0 -> 5.1 ms; within a training step the copies had cost
  ~0.5 ms per call (their pages are warm there);
- not done, measured: stacking the memories that read the same input (the weights as one
  (M, B, H, ...) array, one product and one activation call for all of them). At these sizes a
  stacked product costs what the separate ones cost (80 gemms of 16 x 32 x 128: 283 vs 288 us), so
  the saving is NumPy's per-call overhead only; five MLP reads took 1.3-1.6 ms either way with
  the weights already stacked and 3.2 ms with an ``np.stack`` per segment (the states are written
  per memory, so a stack is a copy of every weight each segment);
- the forward keeps the per-token factors and read caches (vectors per token) for the backward;
  states are kept only at segment starts (as the reference);
- the layer runs with one BLAS thread (fast.cpu.mlp_memory.blas_single_thread).

Port decisions:
- ``forward_loop`` (the token-loop oracle), complex inputs (the complex-step path) and any cache
  made by the reference fall back to reference.selfmod explicitly; the port's own cache (rank-1
  factors and read caches per segment) is not the reference's layout;
- the element-wise glue (conv, l2/RMS norms, activations) calls fast.cpu.primitives (compiled; the
  same functions and cache layouts as reference.primitives).
- ``step_norm`` (SPEC.md#hope-stability): the reference's ``step_scale`` and its backward (per-token
  NumPy, not worth compiling for an opt-in switch) put s_t on the left factor, ``G~_t = (s_t L_t) R_t^T``,
  so every write form above runs unchanged; the backward takes ``ds_t = <dL~_t, L_t>`` and
  ``dL_t = s_t dL~_t``.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit

from ...reference import selfmod as RS
from ...reference.selfmod import SelfModConfig, init_params, init_state, param_shapes  # noqa: F401  (same API)
from . import mlp_memory as FM
from . import primitives as P  # the compiled glue (same functions and cache layouts as reference.primitives)
from . import selfmod_chunk as SC
from . import titans as FT

KEY_WRITE_FORMS = ("auto", "sweep", "ut")
KEY_WRITES = os.environ.get("NL_CPU_KEY_WRITES", "auto")
"""How ``key_write`` / ``key_write_backward`` compute a segment's key-side writes: ``sweep`` (the
compiled token loop), ``ut`` (the chunk-parallel UT form, fast.cpu.selfmod_chunk, for every
configuration) or ``auto`` (the default: the UT form where ``ut_is_accurate``, else the sweep).
Read from ``NL_CPU_KEY_WRITES`` at import; a module attribute, so a measurement or a test may set
it (SPEC.md#fast-cpu). Both forms compute the same function (tests/cpu/test_cpu_selfmod_chunk.py). A
worker process (``NL_CPU_WORKERS=process``) reads the variable at its own import: setting the
attribute changes the calling process only."""
if KEY_WRITES not in KEY_WRITE_FORMS:
    raise ValueError(f"NL_CPU_KEY_WRITES={KEY_WRITES!r}: must be one of {', '.join(KEY_WRITE_FORMS)}")

UT_MIN_HEAD = 8
UT_MAX_SEGMENT = 64


def ut_is_accurate(b, n):
    """The pinned rule for ``KEY_WRITES = "auto"``: the UT form at head width b >= 8 and segments of
    at most n = 64 tokens, in both dtypes. Its chunk-start part (P's P_0 term, dP0, dS0) is accurate
    only relative to the scalar decay D[n, 0] |P_0| (docs/selfmod-chunk.md §7.6), which the shrinks
    outrun over long segments of few key directions. Measured against the float64 sweep (unit keys,
    eta' < 0.5, alpha > 0.5, a = 16, 8 draws per cell; ``PYTHONPATH=tests python
    tests/cpu/test_cpu_selfmod_chunk.py``): inside the rule the float32 UT form's worst error is at
    most 3.1e-6, 2.9x the float32 sweep's own (the corner b = 8, n = 64; chunk-start tensors 5.9x),
    the float64 UT form's 6.5e-15; just outside, b = 4 at n = 64 and b = 8 at n = 128, the chunk-start
    tensors are 33x and 27x the sweep's error (1.8e-5); b = 2, n = 64 is 0.29 off in float32 and b = 1,
    n = 64 3e-2 in float64. Conservative where the heads are wide (b >= 16 measured within 3x up to
    n = 128) and at short segments (b = 4, n <= 32 within 3.4x); hope-small is b = 32, n = 16."""
    return b >= UT_MIN_HEAD and n <= UT_MAX_SEGMENT


def _use_ut(P0, L):
    if KEY_WRITES == "auto":
        return ut_is_accurate(P0.shape[3], L.shape[2])
    return KEY_WRITES == "ut"

# ---------------------------------------------------------------------------------------------
# Compiled kernels: the key-side DGD writes of one segment and their backward
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _key_write(P0, S0, L, K, ep, alpha, beta, P_out, S_out):
    """n token writes of the key-side weight, per (b, h) (Eq. 88 with the pinned momentum):
    S <- beta S - eta'_t L_t k_t^T, P <- alpha_t P - eta'_t (P k_t) k_t^T + S (momentum off: beta = 0
    and S0 = 0, which is S = -eta'_t L_t k_t^T exactly). P0, S0 (B, H, a, b); L (B, H, n, a); K (B, H, n, b).
    Reductions go through np.dot (BLAS: without fastmath LLVM does not vectorise a reduction loop);
    the rank-1 updates are plain loops (vectorised)."""
    nb, nh, a, b = P0.shape
    n = L.shape[2]
    for bh in range(nb * nh):
        bi, h = bh // nh, bh % nh
        Pc = P0[bi, h].copy()
        Sc = S0[bi, h].copy()
        bet = beta[h]
        for j in range(n):
            e = ep[bi, h, j]
            al = alpha[bi, h, j]
            k = K[bi, h, j]
            l = L[bi, h, j]
            Pk = np.dot(Pc, k)  # (a,)   P k_t, before the write
            for i in range(a):
                el = e * l[i]
                epk = e * Pk[i]
                for c in range(b):
                    s = bet * Sc[i, c] - el * k[c]
                    Sc[i, c] = s
                    Pc[i, c] = al * Pc[i, c] - epk * k[c] + s  # Eq. (88)
        P_out[bi, h] = Pc
        S_out[bi, h] = Sc


@njit(cache=True, nogil=True)
def _key_write_backward(P0, S0, L, K, ep, alpha, beta, dP_end, dS_end, dP0, dS0, dL, dK, dep, dalpha, dbeta):
    """VJP of ``_key_write`` per (b, h): recompute the states before each token from (P0, S0), then
    reverse the tokens. Outputs dP0, dS0; dL (B, H, n, a); dK (B, H, n, b) (the key as the gradient's
    right factor and in the shrink); dep, dalpha (B, H, n); dbeta (B, H) = sum_t <dS~_t, S_{t-1}>.

    Adjoints (M_t = alpha_t I - eta'_t k_t k_t^T; dS~_t = dS_t + dP_t is the adjoint of S_t, which
    enters P_t and S_{t+1}): dP_{t-1} = dP_t M_t, dS_{t-1} = beta dS~_t, dL_t = -eta'_t dS~_t k_t,
    dk_t = -eta'_t (dS~_t^T l_t + P_{t-1}^T (dP_t k_t) + dP_t^T (P_{t-1} k_t)).
    Layout: the replay keeps each token's P_{t-1} k_t (PK) for the reverse sweep instead of a second
    matrix-vector product per token; the reverse sweep keeps Z = [dS; dP] (2a, b) so that one product
    Z k gives dS k and dP k (dS~ k is their sum) and dS~ is formed on the fly rather than stored (one
    array stream fewer per token). Measured at hope-small sizes (B = H = 4, n = 16, a = 128, b = 32,
    float32, one thread, old and new alternating in one process, medians): quiet machine 1.06 ->
    1.02 ms per call; under load (3 runs, best of 15) 1.10/1.10/1.08 -> 1.20/1.08/1.06 ms: a few
    percent at most. Column accumulators are float64 (float32 measured 0.96 ms, 6% faster: kept
    float64, the port's precision rule, SPEC.md#fast-cpu). A BLAS matrix-vector product at these
    sizes costs ~0.5 us per call (measured), ~1/4 of the per-token time. Not kept
    (measured slower): a transposed (b, a) layout with the matrix-vector products fused into the
    update sweeps (1.04 ms forward, 3.9 ms backward: the key's row reductions then need lane-wise
    partial sums and every 128-element row loop pays LLVM's runtime alias checks)."""
    nb, nh, a, b = P0.shape
    n = L.shape[2]
    # work arrays allocated once per call, not per (b, h)
    histP = np.empty((n, a, b), dtype=P0.dtype)  # P_{t-1}, the state before token t
    histS = np.empty((n, a, b), dtype=P0.dtype)
    PK = np.empty((n, a), dtype=P0.dtype)  # P_{t-1} k_t
    Z = np.empty((2 * a, b), dtype=P0.dtype)  # [dS_t ; dP_t]
    acc_k = np.empty(b, dtype=np.float64)  # column-wise accumulators (float64)
    acc_a = np.empty(b, dtype=np.float64)
    acc_b = np.empty(b, dtype=np.float64)
    for bh in range(nb * nh):
        bi, h = bh // nh, bh % nh
        bet = beta[h]
        # forward replay: histP[j], histS[j] = the states before token j, each computed from the one
        # before (one fused pass per token; the state after the last token is not needed)
        histP[0] = P0[bi, h]
        histS[0] = S0[bi, h]
        for j in range(n):
            k = K[bi, h, j]
            Pp = histP[j]
            Pk = PK[j]
            Pk[:] = np.dot(Pp, k)  # (a,)   P_{j-1} k_j, before the write
            if j == n - 1:
                break
            e = ep[bi, h, j]
            al = alpha[bi, h, j]
            l = L[bi, h, j]
            Sp = histS[j]
            Pn = histP[j + 1]
            Sn = histS[j + 1]
            for i in range(a):
                el = e * l[i]
                epk = e * Pk[i]
                for c in range(b):
                    s = bet * Sp[i, c] - el * k[c]
                    Sn[i, c] = s
                    Pn[i, c] = al * Pp[i, c] - epk * k[c] + s  # Eq. (88)
        # reverse sweep: per token one product Z k, then one fused pass over the (a, b) entries that
        # accumulates the key's cotangent, <dP_j, P_{j-1}> and <dS~_j, S_{j-1}> column-wise
        # (vectorised over b) and updates dP, dS in place
        dS = Z[:a]
        dP = Z[a:]
        dS[:, :] = dS_end[bi, h]
        dP[:, :] = dP_end[bi, h]
        bsum = 0.0
        for j in range(n - 1, -1, -1):
            e = ep[bi, h, j]
            al = alpha[bi, h, j]
            k = K[bi, h, j]
            l = L[bi, h, j]
            Pj = histP[j]
            Sj = histS[j]
            Pk = PK[j]
            Zk = np.dot(Z, k)  # (2a,)   dS_j k, dP_j k
            g_dot = 0.0
            s_dot = 0.0
            for i in range(a):
                zs = Zk[i] + Zk[a + i]  # dS~_j k
                Zk[i] = zs
                dL[bi, h, j, i] = -e * zs  # dG = -eta' dS~_j;  dL = dG k
                g_dot += l[i] * zs
                s_dot += Zk[a + i] * Pk[i]
            dep[bi, h, j] = -g_dot - s_dot  # -<dS~_j, G_j> - <dP k, P k>
            acc_k[:] = 0.0
            acc_a[:] = 0.0
            acc_b[:] = 0.0
            for i in range(a):
                li = l[i]
                dpk = Zk[a + i]
                pk = Pk[i]
                epk = e * dpk
                for c in range(b):
                    dpv = dP[i, c]
                    dsv = dpv + dS[i, c]  # dS~_j
                    pv = Pj[i, c]
                    acc_k[c] += li * dsv + dpk * pv + pk * dpv  # L^T dS~_j + (dP k)^T P_{j-1} + (P k)^T dP_j
                    acc_a[c] += dpv * pv  # <dP_j, P_{j-1}>
                    acc_b[c] += dsv * Sj[i, c]  # <dS~_j, S_{j-1}>
                    dP[i, c] = al * dpv - epk * k[c]
                    dS[i, c] = bet * dsv
            dalpha[bi, h, j] = acc_a.sum()
            bsum += acc_b.sum()
            for c in range(b):
                dK[bi, h, j, c] = -e * acc_k[c]
        dP0[bi, h] = dP
        dS0[bi, h] = dS
        dbeta[bi, h] = bsum


@njit(cache=True, nogil=True)
def _fold_state_forward(W0, S0, A, s, Bc, F, P_out, S_out):
    """The W1 fold's update per (b, h), one pass over the weight's entries (Titans Eqs. 16-18 with
    the NL write, Eq. 88): P = A W0 + s S0 - F[:p], S = Bc S0 - F[p:], where F (B, H, 2p, q) stacks
    sum_t w_t L_t R_t^T over sum_t e_t L_t R_t^T (one matrix product). Replaces five NumPy
    expressions and their four full-size temporaries (measured below, ``_forward``)."""
    nb, nh, p, q = W0.shape
    for bh in range(nb * nh):
        bi, h = bh // nh, bh % nh
        a_ = A[bi, h]
        s_ = s[bi, h]
        b_ = Bc[bi, h]
        for r in range(p):
            for c in range(q):
                s0 = S0[bi, h, r, c]
                P_out[bi, h, r, c] = a_ * W0[bi, h, r, c] + s_ * s0 - F[bi, h, r, c]  # Eq. (88)
                S_out[bi, h, r, c] = b_ * s0 - F[bi, h, p + r, c]


@njit(cache=True, nogil=True)
def _fold_factors_backward(LdP, LdS, RdP, RdS, R, wt, e, dL, dR, dwt, de):
    """The element-wise part of the W1 fold's VJP with respect to its factors and coefficients, per
    token (``F = sum_t w_t L_t R_t^T`` and ``sum_t e_t L_t R_t^T``, their cotangents dP and dS):
    dwt = -<L dP, R>, de = -<L dS, R> (float64 sums), dR = -wt L dP - e L dS,
    dL = -wt R dP^T - e R dS^T, from the four products (BLAS). Replaces ten NumPy calls and their
    temporaries: ~95 -> ~20 us per memory and segment at hope-small sizes (measured with _backward)."""
    nb, nh, n, q = LdP.shape
    p = RdP.shape[3]
    for bi in range(nb):
        for h in range(nh):
            for t in range(n):
                w_ = wt[bi, h, t]
                e_ = e[bi, h, t]
                accw = 0.0
                acce = 0.0
                for c in range(q):
                    lp = LdP[bi, h, t, c]
                    ls = LdS[bi, h, t, c]
                    r = R[bi, h, t, c]
                    accw += lp * r
                    acce += ls * r
                    dR[bi, h, t, c] = -w_ * lp - e_ * ls
                dwt[bi, h, t] = -accw
                de[bi, h, t] = -acce
                for c in range(p):
                    dL[bi, h, t, c] = -w_ * RdP[bi, h, t, c] - e_ * RdS[bi, h, t, c]


@njit(cache=True, nogil=True)
def _fold_state_backward(dPe, dSe, W0, S0, A, s, Bc, dP0, dS0, sums):
    """The full-size part of the W1 fold's VJP (``P = A W0 + s S0 - ...``, ``S = Bc S0 - ...``) per
    (b, h), one pass over the weight's entries: sums (3, B, H) = <dP, W0>, <dP, S0>, <dS, S0>;
    dP0 = A dP, dS0 = s dP + Bc dS. Row-wise float64 accumulators vectorised over the contiguous
    axis. Measured at hope-small sizes ((4, 4, 32, 128) float32): 37 us against 123-135 us for the
    NumPy expressions it replaces (three products and reductions, three scaled copies)."""
    nb, nh, p, q = dPe.shape
    accA = np.empty(q, dtype=np.float64)
    accs = np.empty(q, dtype=np.float64)
    accB = np.empty(q, dtype=np.float64)
    for bh in range(nb * nh):
        bi, h = bh // nh, bh % nh
        a_ = A[bi, h]
        s_ = s[bi, h]
        b_ = Bc[bi, h]
        accA[:] = 0.0
        accs[:] = 0.0
        accB[:] = 0.0
        for r in range(p):
            for c in range(q):
                dp = dPe[bi, h, r, c]
                dsv = dSe[bi, h, r, c]
                s0 = S0[bi, h, r, c]
                accA[c] += dp * W0[bi, h, r, c]
                accs[c] += dp * s0
                accB[c] += dsv * s0
                dP0[bi, h, r, c] = a_ * dp
                dS0[bi, h, r, c] = s_ * dp + b_ * dsv
        sums[0, bi, h] = accA.sum()
        sums[1, bi, h] = accs.sum()
        sums[2, bi, h] = accB.sum()


def key_write(P0, S0, L, K, ep, alpha, beta):
    """The key-side writes of one segment: (P_end, S_end). ``beta`` (H,) or None (no momentum). The
    token sweep or the UT form (``KEY_WRITES``)."""
    if _use_ut(P0, L):
        return SC.key_write_ut(P0, S0, L, K, ep, alpha, beta)
    dt = P0.dtype
    b_ = np.zeros(P0.shape[1], dt) if beta is None else np.ascontiguousarray(beta, dtype=dt)
    S0 = np.zeros_like(P0) if S0 is None else S0
    P_out, S_out = np.empty(P0.shape, dt), np.empty(P0.shape, dt)  # C order whatever P0's (SPEC.md#fast-cpu)
    args = [np.ascontiguousarray(a, dtype=dt) for a in (P0, S0, L, K, ep, alpha)]
    _key_write(*args, b_, P_out, S_out)
    return P_out, S_out


def key_write_backward(dP_end, dS_end, P0, S0, L, K, ep, alpha, beta):
    """VJP of ``key_write``: (dP0, dS0, dL, dK, dep, dalpha, dbeta_dot (B, H)). Without momentum
    (``beta`` None) dS_end must be zero (there is no momentum state). The token sweep's VJP or the UT
    form's (``KEY_WRITES``)."""
    if _use_ut(P0, L):
        return SC.key_write_ut_backward(dP_end, dS_end, P0, S0, L, K, ep, alpha, beta)
    dt = P0.dtype
    b_ = np.zeros(P0.shape[1], dt) if beta is None else np.ascontiguousarray(beta, dtype=dt)
    S0 = np.zeros_like(P0) if S0 is None else S0
    dS_end = np.zeros_like(P0) if dS_end is None else dS_end
    B, H, n = ep.shape
    dP0, dS0 = np.empty(P0.shape, dt), np.empty(P0.shape, dt)
    dL, dK = np.empty(L.shape, dt), np.empty(K.shape, dt)
    dep, dalpha = np.empty((B, H, n), dt), np.empty((B, H, n), dt)
    dbeta = np.empty((B, H), dt)
    args = [np.ascontiguousarray(a, dtype=dt) for a in (P0, S0, L, K, ep, alpha)]
    _key_write_backward(*args, b_, np.ascontiguousarray(dP_end, dtype=dt),
                        np.ascontiguousarray(dS_end, dtype=dt), dP0, dS0, dL, dK, dep, dalpha, dbeta)  # fmt: skip
    return dP0, dS0, dL, dK, dep, dalpha, dbeta


# ---------------------------------------------------------------------------------------------
# One memory: read and inner-gradient factors (BLAS)
# ---------------------------------------------------------------------------------------------

_heads, _merge = RS.heads, RS.merge
_T = FM._T


def read_forward(cfg, st, z):
    """Same as ``reference.selfmod.read_forward``: y = M(z) at the state ``st``. For the layer's own
    calls: the arrays were checked once by the layer call (``_check_inputs``), so an MLP memory's
    read does not check them again (``check=False``); likewise ``read_backward``,
    ``inner_grad_factors``."""
    if cfg.memory == "matrix":
        return FM.matrix_memory_forward(st["M"], z)  # Eq. (83)
    return FM.mlp_memory_forward(st["W1"], st["W2"], z, act=cfg.act, layernorm=cfg.layernorm, check=False)  # Eq. (89)


def read_backward(cfg, dy, cache):
    """Same as ``reference.selfmod.read_backward``: ({w: dW}, dz)."""
    if cfg.memory == "matrix":
        dM, dz = FM.matrix_memory_backward(dy, cache)
        return {"M": dM}, dz
    dW1, dW2, dz = FM.mlp_memory_backward(dy, cache, check=False)
    return {"W1": dW1, "W2": dW2}, dz


def inner_grad_factors(cfg, st, k, vhat):
    """G_w = L R^T per weight at ``st`` (Eq. 93, vhat constant): ({w: (L, R)}, cache)."""
    if cfg.memory == "matrix":
        if cfg.single_shrink:
            return {"M": (-vhat, k)}, None  # the write becomes + eta' vhat k^T
        u, c = FM.matrix_inner_grad(st["M"], k, vhat)  # Eq. (93)   u = 2 (M k - vhat)
        return {"M": (u, k)}, c
    u1, a, u2, c = FM.inner_grad(st["W1"], st["W2"], k, vhat, act=cfg.act, layernorm=cfg.layernorm, check=False)
    return {"W1": (u1, a), "W2": (u2, k)}, c


def inner_grad_factors_backward(cfg, dfac, cache):
    """VJP of ``inner_grad_factors`` -> ({w: dW or None}, dk, dvhat); the explicit key R = k included."""
    if cfg.memory == "matrix":
        du, dR = dfac["M"]
        if cfg.single_shrink:
            return {"M": None}, dR, -du
        dM, dk, dvh = FM.matrix_inner_grad_backward(du, cache)
        return {"M": dM}, dk + dR, dvh
    (du1, da), (du2, dR) = dfac["W1"], dfac["W2"]
    dW1, dW2, dk, dvh = FM.inner_grad_backward(du1, da, du2, cache)
    return {"W1": dW1, "W2": dW2}, dk + dR, dvh


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


def _linear(x, W):
    return x @ W.T


def _output_forward(o, x, params, cfg):
    """y = W_o (RMSNorm_head(o) * silu(W_g x)): the reference's output step, with matmul products."""
    on, c_norm = P.rmsnorm_forward(o, params["g_o"], cfg.eps)  # (B, H, T, dh)
    gl = _linear(x, params["W_g"])  # (B, T, D)
    g, c_silu = P.silu_forward(gl)
    h = _merge(on) * g  # (B, T, D)
    return _linear(h, params["W_o"]), (c_norm, c_silu, on, g, h)


def _output_backward(dy, cache, x, params, H):
    c_norm, c_silu, on, g, h = cache
    D = x.shape[-1]
    dW_o = dy.reshape(-1, D).T @ h.reshape(-1, D)
    dh_ = dy @ params["W_o"]
    dg = dh_ * _merge(on)
    don = _heads(dh_ * g, H)
    dgl = P.silu_backward(dg, c_silu)
    dx = dgl @ params["W_g"]
    dW_g = dgl.reshape(-1, D).T @ x.reshape(-1, D)
    do, dg_o = P.rmsnorm_backward(don, c_norm)
    return do, dx, {"W_o": dW_o, "W_g": dW_g, "g_o": dg_o}


def _fallback(x, params):
    return np.iscomplexobj(x) or any(np.iscomplexobj(v) for v in params.values() if isinstance(v, np.ndarray))


def forward(x, params, cfg, state=None):
    """Same as ``reference.selfmod.forward``: (y (B, T, D), cache, state)."""
    if not isinstance(x, np.ndarray) or not isinstance(params, dict) or _fallback(x, params):
        y, cache, new_state = RS.forward(x, params, cfg, state)  # complex step: the reference's path
        return y, {"reference": cache}, new_state
    with FM.blas_single_thread():
        return _forward(x, params, cfg, state)


def forward_loop(x, params, cfg, state=None):
    """The token-loop oracle: reference.selfmod.forward_loop (explicit fallback)."""
    y, cache, new_state = RS.forward_loop(x, params, cfg, state)
    return y, {"reference": cache}, new_state


def backward(dy, cache, dstate=None):
    """Same as ``reference.selfmod.backward``: (dx, dparams, dstate0)."""
    if "reference" in cache:
        return RS.backward(dy, cache["reference"], dstate)
    if not cache.get("fast"):  # a cache made by reference.selfmod.forward
        return RS.backward(dy, cache, dstate)
    with FM.blas_single_thread():
        return _backward(dy, cache, dstate)


def _state_shapes(params, cfg, B):
    """The array keys of ``init_state(params, cfg, B)`` and their shapes, in its order, without
    building the state (the reference's check allocates one: ~5 ms per call at hope-small sizes)."""
    shapes = {}
    for m in cfg.memories:
        for w in RS.weights(cfg):
            shape = (B,) + params[RS.init_key(m, w)].shape
            shapes[f"{m}.{w}"] = shapes[f"{m}.{w}_b"] = shape
            if cfg.momentum:
                shapes[f"{m}.S_{w}"] = shape
    for c in ("conv_q", "conv_k", "conv_v"):
        shapes[c] = (B, cfg.conv_width - 1, cfg.d_model)
    return shapes


def _check_inputs(x, params, cfg, state):
    """reference.selfmod.check_inputs with the same errors, the state checked against shapes."""
    RS.check_inputs(x, params, cfg, None)
    if state is None:
        return
    shapes = _state_shapes(params, cfg, x.shape[0])
    order = list(shapes)[:-3] + ["pos_other", "pos_memory"] + list(shapes)[-3:]  # init_state's key order
    for key in order:
        if key not in state:
            raise ValueError(f"state[{key!r}]: missing (see init_state)")
        if key in shapes:
            st = state[key]
            if not isinstance(st, np.ndarray) or st.shape != shapes[key] or st.dtype != x.dtype:
                raise ValueError(
                    f"state[{key!r}]: expected shape {shapes[key]} and dtype {x.dtype}, "
                    f"got {getattr(st, 'shape', None)}, {getattr(st, 'dtype', None)}"
                )


def _forward(x, params, cfg, state):
    _check_inputs(x, params, cfg, state)
    B, T, D = x.shape
    H, dh = cfg.n_heads, cfg.head_dim
    wn = RS.weights(cfg)
    had_state = state is not None
    st = init_state(params, cfg, B) if state is None else state
    W = {m: {w: st[f"{m}.{w}"] for w in wn} for m in cfg.memories}
    Bst = {m: {w: st[f"{m}.{w}_b"] for w in wn} for m in cfg.memories}
    S = {m: {w: st.get(f"{m}.S_{w}") for w in wn} for m in cfg.memories}
    conv = {c: st[f"conv_{c}"] for c in ("q", "k", "v")}
    pos0 = (int(st["pos_other"]), int(st["pos_memory"]))
    betas = {m: RS.betas(params, cfg, m) for m in cfg.memories}
    xh = np.ascontiguousarray(_heads(x, H))  # (B, H, T, dh)
    lin = {c: _linear(x, params[f"W_{c}"]) for c in cfg.static_projections}  # (B, T, D)   static x W_c^T
    o = np.zeros((B, H, T, dh), dtype=x.dtype)
    segs = []
    for t0, t1, starts in RS.segments(cfg, T, *pos0):
        for m in starts:
            Bst[m] = dict(W[m])  # a chunk starts: its reads and gradients use this state
        seg = {"t0": t0, "t1": t1, "starts": starts, "B": {m: dict(Bst[m]) for m in cfg.memories},
               "W": {m: dict(W[m]) for m in cfg.memories}, "S": {m: dict(S[m]) for m in cfg.memories}}  # fmt: skip
        xs = xh[:, :, t0:t1]  # (B, H, n, dh)
        pre, c_pre = {}, {}
        for m in cfg.readers:
            pre[m], c_pre[m] = read_forward(cfg, Bst[m], xs)  # Eq. (83) at the chunk start
        c_conv, c_l2 = {}, {}
        cin = {c: _merge(pre[c]) if cfg.adaptive(c) else lin[c][:, t0:t1] for c in ("k", "v", "q")}  # convs' inputs
        kc, c_conv["k"], conv["k"] = P.conv1d_forward(cin["k"], params["conv_k"], None, conv["k"])
        vc, c_conv["v"], conv["v"] = P.conv1d_forward(cin["v"], params["conv_v"], None, conv["v"])
        qc, c_conv["q"], conv["q"] = P.conv1d_forward(cin["q"], params["conv_q"], None, conv["q"])
        k, c_l2["k"] = P.l2norm_forward(_heads(kc, H), cfg.eps)  # (B, H, n, dh)
        q, c_l2["q"] = P.l2norm_forward(_heads(qc, H), cfg.eps)
        v = _heads(vc, H)
        if cfg.normalize_v:
            v, c_l2["v"] = P.l2norm_forward(v, cfg.eps)
        k, q, v = (np.ascontiguousarray(a) for a in (k, q, v))
        _, _, eta, alpha, ep = RS.gates(params, cfg, pre["eta"], pre.get("alpha"), k)
        o[:, :, t0:t1], c_o = read_forward(cfg, Bst["memory"], q)  # Eq. (83)   o = M_memory(q)
        mem = {}
        for m in cfg.memories:
            vh, c_vh = read_forward(cfg, Bst[m], v)  # Eq. (84)   vhat = M_box(v)
            fac, c_g = inner_grad_factors(cfg, Bst[m], k, vh)
            scale = None
            if cfg.step_norm:  # the reference's scale s_t on each G_t = L_t R_t^T, put on L (SPEC.md#hope-stability)
                s, c_s = RS.step_scale(cfg, Bst[m], k, eta, cfg.chunk(m))
                scale = (s, c_s, {w: L for w, (L, _) in fac.items()})
                fac = {w: (L * s[..., None], R) for w, (L, R) in fac.items()}
            coef = None
            for w in wn:
                L, R = fac[w]
                if RS.shrinks(cfg, w):
                    W[m][w], S_new = key_write(W[m][w], S[m][w], L, R, ep, alpha, betas[m])  # Eq. (88)
                else:  # retention + momentum only: the Titans chunk fold (Titans Eqs. 16-18)
                    beta_t = (np.broadcast_to(betas[m][None, :, None], alpha.shape) if cfg.momentum
                              else np.zeros_like(alpha))  # fmt: skip
                    coef = FT.chunk_coefficients(alpha, beta_t, ep, cfg.momentum)
                    (A, s, wt, Bc, e), _ = coef
                    if cfg.momentum:  # both folds in one product, the update in one compiled pass
                        F = _T(np.concatenate((L * wt[..., None], L * e[..., None]), axis=-1)) @ R  # (B, H, 2p, q)
                        P_new, S_new = np.empty(W[m][w].shape, x.dtype), np.empty(W[m][w].shape, x.dtype)  # C order
                        ins = (W[m][w], S[m][w], A, s, Bc, F)
                        _fold_state_forward(*(np.ascontiguousarray(a, dtype=x.dtype) for a in ins), P_new, S_new)
                    else:
                        P_new = A[..., None, None] * W[m][w] - FT._fold(wt, L, R)  # Eq. (88)   alpha W - eta' G
                    W[m][w] = P_new
                if cfg.momentum:
                    S[m][w] = S_new
            mem[m] = (fac, c_g, c_vh, coef, scale)
        seg.update(k=k, q=q, v=v, eta=eta, alpha=alpha, ep=ep, pre=pre, c_pre=c_pre, c_conv=c_conv, c_l2=c_l2,
                   c_o=c_o, mem=mem)  # fmt: skip
        segs.append(seg)
    y, out_cache = _output_forward(o, x, params, cfg)
    # The returned state copies only the arrays it would share with the input state (a memory with
    # no write in this call, a chunk that started before it): the others were made by this call and
    # are never written in place (the chunk-start states are also read by the backward through the
    # cache). The reference copies all of them: 30 (B, H, dh, Hm) copies per call (module docstring).
    given = {id(a) for a in st.values() if isinstance(a, np.ndarray)} if had_state else set()  # the caller's

    def own(a):
        return np.array(a, copy=True, order="C") if id(a) in given else a

    new_state: dict = {}
    for m in cfg.memories:
        for w in wn:
            new_state[f"{m}.{w}"] = own(W[m][w])
            new_state[f"{m}.{w}_b"] = own(Bst[m][w])
            if cfg.momentum:
                new_state[f"{m}.S_{w}"] = own(S[m][w])
    new_state["pos_other"] = (pos0[0] + T) % cfg.chunk_other
    new_state["pos_memory"] = (pos0[1] + T) % cfg.chunk_memory
    for c in ("q", "k", "v"):
        new_state[f"conv_{c}"] = np.array(conv[c], copy=True)
    cache = {"x": x, "params": params, "cfg": cfg, "had_state": had_state, "segs": segs, "out": out_cache,
             "o": o, "fast": True}  # fmt: skip
    return y, cache, new_state


def merge_caches(caches):
    """(y, cache) of one ``forward`` over the concatenated inputs of a chain of ``forward`` calls
    (each call's state the previous one's new state), from the chain's port caches, or None when one
    of them is not the port's. The chain computes the same function as one call over the whole input
    (SPEC.md#selfmod), and its backward is the chain rule through the states the calls pass on, so
    the merged cache is the calls' segments in order (positions shifted); only the output projection
    (cheap) is recomputed over the whole input. Used by fast.cpu.model to re-use the chunk-major
    pass's lowest-block layer in the whole-sequence pass."""
    if not caches or not all(isinstance(c, dict) and c.get("fast") and "o" in c for c in caches):
        return None
    first = caches[0]
    params, cfg = first["params"], first["cfg"]
    segs, t = [], 0
    for c in caches:
        for seg in c["segs"]:
            segs.append(dict(seg, t0=seg["t0"] + t, t1=seg["t1"] + t))
        t += c["x"].shape[1]
    x = np.concatenate([c["x"] for c in caches], axis=1)  # (B, T, D)
    o = np.concatenate([c["o"] for c in caches], axis=2)  # (B, H, T, dh)
    with FM.blas_single_thread():
        y, out_cache = _output_forward(o, x, params, cfg)
    cache = {"x": x, "params": params, "cfg": cfg, "had_state": first["had_state"], "segs": segs,
             "out": out_cache, "o": o, "fast": True}  # fmt: skip
    return y, cache


def _backward(dy, cache, dstate):
    x, params, cfg = cache["x"], cache["params"], cache["cfg"]
    B, T, D = x.shape
    H = cfg.n_heads
    if not isinstance(dy, np.ndarray) or dy.shape != x.shape:
        raise ValueError(f"dy: expected an array of shape (B, T, D) = {x.shape}, got {getattr(dy, 'shape', None)}")
    sg = cfg.stop_grad_writes
    wn = RS.weights(cfg)
    dt = x.dtype
    grads = {name: np.zeros(shape, dtype=dt) for name, shape in param_shapes(cfg).items()}
    do, dx, g_out = _output_backward(np.asarray(dy, dtype=dt), cache["out"], x, params, H)
    for key, val in g_out.items():
        grads[key] += val
    dxh = np.zeros((B, H, T, cfg.head_dim), dtype=dt)
    betas = {m: RS.betas(params, cfg, m) for m in cfg.memories}
    ds = dstate or {}
    ref = _state_shapes(params, cfg, B)

    def get(key):  # no copy: dW and dS are replaced, never written in place (dB: see below)
        return np.asarray(ds[key], dtype=dt) if ds.get(key) is not None else np.zeros(ref[key], dtype=dt)

    dW = {m: {w: get(f"{m}.{w}") for w in wn} for m in cfg.memories}
    # dB[m][w]: None while zero; the first term taken over (every term is a fresh array of this call),
    # later ones added in place (the reference copies the whole dstate: 30 copies per call)
    dB = {m: {w: (np.array(ds[f"{m}.{w}_b"], dtype=dt) if ds.get(f"{m}.{w}_b") is not None else None) for w in wn}
          for m in cfg.memories}  # fmt: skip

    def add_dB(m, w, part):
        if part is None:
            return
        if dB[m][w] is None:
            dB[m][w] = part
        else:
            dB[m][w] += part
    dS = {m: {w: (get(f"{m}.S_{w}") if cfg.momentum else np.zeros(ref[f"{m}.{w}"], dtype=dt)) for w in wn}
          for m in cfg.memories}  # fmt: skip
    dconv = {c: get(f"conv_{c}") for c in "qkv"}
    dlin = {c: np.zeros((B, T, D), dtype=dt) for c in cfg.static_projections}  # of the static x W_c^T
    # live[m]: memory m's running-state cotangents (dW, dS) may be nonzero. The writes' VJP is linear
    # in them, and within a segment every read uses the chunk-start state, not the writes, so while
    # they are zero the write backward of m returns zeros and is skipped (exact). That holds from the
    # end of the input back to m's last chunk start when no dstate comes in: every per-chunk call of
    # the chunk-major CMS pass, and the last chunk of any call (SPEC.md#fast-cpu).
    live = {m: any(ds.get(f"{m}.{w}") is not None and np.any(ds[f"{m}.{w}"]) for w in wn)
            or any(cfg.momentum and ds.get(f"{m}.S_{w}") is not None and np.any(ds[f"{m}.S_{w}"]) for w in wn)
            for m in cfg.memories}  # fmt: skip
    for seg in reversed(cache["segs"]):
        t0, t1 = seg["t0"], seg["t1"]
        k, eta, alpha, ep = seg["k"], seg["eta"], seg["alpha"], seg["ep"]
        dk, dv = np.zeros_like(k), np.zeros_like(seg["v"])
        dalpha, dep, deta_s = np.zeros_like(alpha), np.zeros_like(ep), np.zeros_like(eta)
        for m in cfg.memories:
            if sg:  # W_t = W_{t-1} + sg(increment): the adjoint passes straight through the writes
                continue
            if not live[m]:  # zero cotangents in, zero out (see ``live`` above)
                continue
            fac, c_g, c_vh, coef, scale = seg["mem"][m]
            beta = betas[m]
            dfac = {}
            for w in wn:
                L, R = fac[w]
                if RS.shrinks(cfg, w):
                    dP0, dS0, dL, dR, dep_w, dal_w, dbeta_bh = key_write_backward(
                        dW[m][w], dS[m][w], seg["W"][m][w], seg["S"][m][w], L, R, ep, alpha, beta)  # fmt: skip
                    dep += dep_w
                    dalpha += dal_w
                    if beta is not None:
                        grads[f"{m}.b_beta"] += dbeta_bh.sum(axis=0) * beta * (1 - beta)
                else:
                    (A, s, wt, Bc, e), ccache = coef
                    dPe, dSe = dW[m][w], dS[m][w]
                    LdP = L @ dPe  # (B, H, n, b)
                    if cfg.momentum:
                        dL, dR = np.empty_like(L), np.empty_like(R)
                        dwt, de = np.empty_like(wt), np.empty_like(e)
                        ins = (LdP, L @ dSe, R @ _T(dPe), R @ _T(dSe), R, wt, e)
                        _fold_factors_backward(*(np.ascontiguousarray(a, dtype=dt) for a in ins), dL, dR, dwt, de)
                        dP0, dS0 = np.empty(dPe.shape, dt), np.empty(dPe.shape, dt)
                        sums = np.empty((3,) + A.shape, dtype=dt)  # dA, ds, dBc
                        ins = (dPe, dSe, seg["W"][m][w], seg["S"][m][w], A, s, Bc)
                        args = [np.ascontiguousarray(v, dtype=dt) for v in ins]
                        _fold_state_backward(*args, dP0, dS0, sums)
                        dA, ds_, dBc = sums
                    else:
                        dwt = -np.sum(LdP * R, axis=-1)
                        dL = -wt[..., None] * (R @ _T(dPe))
                        dR = -wt[..., None] * LdP
                        dA = np.sum(dPe * seg["W"][m][w], axis=(-2, -1))
                        de = np.zeros_like(wt)
                        ds_ = dBc = np.zeros_like(dA)
                        dS0 = dSe
                        dP0 = A[..., None, None] * dPe
                    dal_w, dbeta_t, dep_w = FT.chunk_coefficients_backward(dA, ds_, dwt, dBc, de, ccache)
                    dep += dep_w
                    dalpha += dal_w
                    if beta is not None:
                        grads[f"{m}.b_beta"] += dbeta_t.sum(axis=(0, 2)) * beta * (1 - beta)
                dW[m][w], dS[m][w] = dP0, dS0
                dfac[w] = (dL, dR)
            if scale is not None:  # L~ = s L: d_scale = <dL~, L>, dL = s dL~
                s, c_s, raw = scale
                d_scale = sum(np.sum(dfac[w][0] * raw[w], axis=-1) for w in wn)
                dfac = {w: (s[..., None] * dL, dR) for w, (dL, dR) in dfac.items()}
                dst_s, dk_s, deta_m = RS.step_scale_backward(cfg, d_scale, c_s)
                dk += dk_s
                deta_s += deta_m
                for w in wn:
                    add_dB(m, w, dst_s[w])
            dst, dk_g, dvh = inner_grad_factors_backward(cfg, dfac, c_g)
            dk += dk_g
            dst_r, dv_r = read_backward(cfg, dvh, c_vh)
            dv += dv_r
            for w in wn:
                add_dB(m, w, dst[w])
                add_dB(m, w, dst_r[w])
        dst_o, dq = read_backward(cfg, np.ascontiguousarray(do[:, :, t0:t1]), seg["c_o"])  # o = M_memory(q)
        for w in wn:
            add_dB("memory", w, dst_o[w])
        if cfg.dgd:
            den = 1 + eta * np.sum(k * k, axis=-1)  # eta' = eta / (1 + eta ||k||^2)   Eq. (57)
            deta = dep / den**2
            dk += (-2 * dep * ep**2)[..., None] * k
        else:  # without DGD (Table 6): eta' = eta
            deta = dep
        deta = deta + deta_s  # eta's own use in step_norm's scale (zero without it)
        dc = {}
        for c, dpost in (("k", dk), ("q", dq), ("v", dv)):
            if c == "v" and not cfg.normalize_v:
                dc["v"] = _merge(dv)
                continue
            dc[c] = _merge(P.l2norm_backward(dpost, seg["c_l2"][c]))
        dpre_seg = {}
        for c in ("k", "v", "q"):
            dpre_c, dwc, _, dconv[c] = P.conv1d_backward(dc[c], seg["c_conv"][c], dnew_state=dconv[c])
            grads[f"conv_{c}"] += dwc
            dpre_seg[c] = dpre_c
        for c in cfg.static_projections:
            dlin[c][:, t0:t1] = dpre_seg[c]
        dpre = {c: _heads(dpre_seg[c], H) for c in ("k", "v", "q") if cfg.adaptive(c)}
        for gname, dgate in (("eta", deta), ("alpha", dalpha))[:len(cfg.gate_names)]:  # alpha = 1 w/o retention
            pe = seg["pre"][gname]  # (B, H, n, dh)
            wg = params[f"w_{gname}"]  # (H, dh)
            s_ = np.sum(pe * wg[None, :, None, :], axis=-1) + params[f"b_{gname}"][:, None]
            scale = cfg.eta_max if gname == "eta" else 1.0
            dsig = dgate * scale * P.dsigmoid(s_)  # (B, H, n)
            grads[f"w_{gname}"] += np.einsum("bhn,bhnd->hd", dsig, pe)
            grads[f"b_{gname}"] += dsig.sum(axis=(0, 2))
            dpre[gname] = dsig[..., None] * wg[None, :, None, :]
        for m in cfg.readers:
            dst_x, dxs = read_backward(cfg, np.ascontiguousarray(dpre[m]), seg["c_pre"][m])
            dxh[:, :, t0:t1] += dxs
            for w in wn:
                add_dB(m, w, dst_x[w])
        for m in seg["starts"]:  # a chunk that starts here took its chunk-start state from the running state
            for w in wn:
                if dB[m][w] is not None:
                    dW[m][w] = dW[m][w] + dB[m][w]
                    dB[m][w] = None
            live[m] = True
    dx = dx + _merge(dxh)
    for c in cfg.static_projections:  # c = x W_c^T
        dx = dx + dlin[c] @ params[f"W_{c}"]
        grads[f"W_{c}"] += dlin[c].reshape(-1, D).T @ x.reshape(-1, D)
    given = {id(a) for a in ds.values() if isinstance(a, np.ndarray)}  # returned as copies, never aliased

    def own(a):
        return np.array(a, copy=True, order="C") if id(a) in given else a

    dstate0: dict = {}
    for m in cfg.memories:
        for w in wn:
            dBw = np.zeros(ref[f"{m}.{w}_b"], dtype=dt) if dB[m][w] is None else dB[m][w]
            if cache["had_state"]:
                dstate0[f"{m}.{w}"], dstate0[f"{m}.{w}_b"] = own(dW[m][w]), dBw
                if cfg.momentum:
                    dstate0[f"{m}.S_{w}"] = own(dS[m][w])
            else:  # W_0 = B_0 = the broadcast meta-learned state
                grads[RS.init_key(m, w)] += (dW[m][w] + dBw).sum(axis=0)
    for c in "qkv":
        dstate0[f"conv_{c}"] = own(dconv[c])
    return dx, grads, dstate0
