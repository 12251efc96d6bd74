"""The key-side DGD writes of one segment in the chunk-parallel UT form, forward and backward (BLAS).

Paper: §8.1, Eq. (88), arXiv 2512.24695v1 (DGD: §4.5, Eqs. (56)-(57); momentum: Titans Eqs. (16)-(18)).
Specification: reference/selfmod_chunk.py (``write_chunk_ut``, ``write_chunk_ut_backward``), derived in
docs/selfmod-chunk.md §§2-3 (forward) and §7 (backward); SPEC.md#fast-cpu (when the port uses it).

The same functions as ``fast.cpu.selfmod.key_write`` / ``key_write_backward`` (the token sweep), with
the same signatures and returns, for the factored inner gradients G_t = l_t k_t^T of the key side:

    S_t = beta S_{t-1} - eta'_t l_t k_t^T,   P_t = P_{t-1} (alpha_t I - eta'_t k_t k_t^T) + S_t

With the scalar decays D[t, s] = alpha_{s+1} .. alpha_t, E[t, m] = sum_{i=m}^t D[t, i] beta^(i-m),
c_t = sum_{i<=t} D[t, i] beta^i (no momentum: beta = 0, S_0 = 0) and the key reads w_t = P_{t-1} k_t:

    w_t = D[t-1, 0] P_0 k_t + c_{t-1} S_0 k_t - sum_{i<t} eta'_i (k_t . k_i) (E[t-1, i] l_i + D[t-1, i] w_i)
    P_n = D[n, 0] P_0 + c_n S_0 - sum_m (E[n, m] eta'_m l_m + D[n, m] eta'_m w_m) k_m^T
    S_n = beta^n S_0 - sum_m beta^(n-m) eta'_m l_m k_m^T

The first line is the unit lower-triangular solve (I + L) w = r of docs/selfmod-chunk.md §3, written
as forward substitution. Per (b, h) the level-3 work is a few (n x dh x a) products, one NumPy
matmul over the stacked (B, H) problems each (P_0 K^T, S_0 K^T, [U] K, and in the backward dP K^T,
dS K^T, dr [w; l]^T, [w; l] dP, l dS, dr P_0, dr S_0, dr^T [D K, c K]); the n x n work (the Gram,
the decays, both substitutions, the coefficient matrices and the decays' VJP, O(n^2) scans without
division) runs in compiled kernels with float64 accumulators (the port's precision rule).

Symbols (per (b, h); 0-based token index j = t - 1 in the code):

| paper                 | code          | shape                      |
| --------------------- | ------------- | -------------------------- |
| P_0, S_0              | P0, S0        | (B, H, a, b)               |
| l_t, k_t              | L, K          | (B, H, n, a), (B, H, n, b) |
| eta'_t, alpha_t, beta | ep, alpha, beta | (B, H, n), (H,)          |
| D, E, c               | D, E, c       | (n+1, n+1), (n+1, n), (n+1) float64 |
| k_t . k_i             | KK            | (n, n) float64             |
| P_0 k_t, S_0 k_t      | KP, KS        | (B, H, n, a)               |
| w_t, dr_t             | w, dr         | (B, H, n, a)               |

Accuracy (docs/selfmod-chunk.md §7.6): the part carried from the chunk-start state (P_0 A_1 .. A_n
forward, dP_0 and dS_0 backward) is a sum of terms of size D[n, 0] |P_0|, so its rounding error is
relative to that scale, not to its own size; the port uses this form only where that is measured
harmless (``fast.cpu.selfmod.KEY_WRITES``, SPEC.md#fast-cpu).
"""

from __future__ import annotations

import numpy as np
from numba import njit


def _T(a):
    return np.swapaxes(a, -1, -2)


@njit(cache=True, nogil=True, inline="always")
def _dot(x, y):
    """sum_u x[u] y[u] in float64 with eight interleaved accumulators (a scalar running sum is a
    latency-bound chain that LLVM does not vectorise without fastmath); fixed order."""
    m = x.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    top = m - m % 8
    for u in range(0, top, 8):
        s0 += np.float64(x[u]) * y[u]
        s1 += np.float64(x[u + 1]) * y[u + 1]
        s2 += np.float64(x[u + 2]) * y[u + 2]
        s3 += np.float64(x[u + 3]) * y[u + 3]
        s4 += np.float64(x[u + 4]) * y[u + 4]
        s5 += np.float64(x[u + 5]) * y[u + 5]
        s6 += np.float64(x[u + 6]) * y[u + 6]
        s7 += np.float64(x[u + 7]) * y[u + 7]
    for u in range(top, m):
        s0 += np.float64(x[u]) * y[u]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, nogil=True)
def _decays(al, bet, D, E, c, pw):
    """D, E, c of one (b, h) (docs/selfmod-chunk.md §2) by their scans, and pw[p] = beta^p."""
    n = al.shape[0]
    pw[0] = 1.0
    for p in range(1, n + 1):
        pw[p] = pw[p - 1] * bet
    for t in range(n + 1):
        for s in range(n + 1):
            D[t, s] = 0.0
    for s in range(n + 1):
        D[s, s] = 1.0
        for t in range(s + 1, n + 1):
            D[t, s] = al[t - 1] * D[t - 1, s]
    for m0 in range(n):
        for t in range(m0 + 1):
            E[t, m0] = 0.0
        E[m0 + 1, m0] = 1.0
        for t in range(m0 + 2, n + 1):
            E[t, m0] = al[t - 1] * E[t - 1, m0] + pw[t - 1 - m0]
    c[0] = 0.0
    for t in range(1, n + 1):
        c[t] = al[t - 1] * c[t - 1] + pw[t]


@njit(cache=True, nogil=True)
def _ut_reads(K, KP, KS, L, ep, alpha, beta, momentum, mode, D, E, c, KK, out):
    """The decays, the key Gram and the key reads w_t of every (b, h) (forward substitution, float64).

    mode 0 (forward): out (B, H, n, 2a) (a without momentum) gets the rows of the end-state product,
    [E[n, m] eta'_m l_m + D[n, m] eta'_m w_m, beta^(n-m) eta'_m l_m], so that P_n, S_n = (fold) - out^T K.
    mode 1 (backward): out (B, H, 2n, a) gets [w; l] (the stacked left factor of two products)."""
    nb, nh, n, a = L.shape
    b = K.shape[3]
    w64 = np.empty((n, a), dtype=np.float64)
    acc = np.empty(a, dtype=np.float64)
    pw = np.empty(n + 1, dtype=np.float64)
    Kt = np.empty((b, n), dtype=np.float64)
    row = np.empty(n, dtype=np.float64)
    for bh in range(nb * nh):
        bi, h = bh // nh, bh % nh
        bet = np.float64(beta[h]) if momentum else 0.0
        Db, Eb, cb, KKb = D[bi, h], E[bi, h], c[bi, h], KK[bi, h]
        _decays(alpha[bi, h], bet, Db, Eb, cb, pw)
        for t0 in range(n):  # the Gram k_t . k_i, rows vectorised over i (keys transposed, float64)
            for q in range(b):
                Kt[q, t0] = K[bi, h, t0, q]
        for t0 in range(n):
            for i0 in range(n):
                row[i0] = 0.0
            for q in range(b):
                kv = Kt[q, t0]
                for i0 in range(n):
                    row[i0] += kv * Kt[q, i0]
            for i0 in range(n):
                KKb[t0, i0] = row[i0]
        for t0 in range(n):
            d0 = Db[t0, 0]
            ct = cb[t0]
            for u in range(a):
                acc[u] = d0 * KP[bi, h, t0, u]
            if momentum:
                for u in range(a):
                    acc[u] += ct * KS[bi, h, t0, u]
            for i0 in range(t0):
                e_k = ep[bi, h, i0] * KKb[t0, i0]
                cl = e_k * Eb[t0, i0]  # E[t-1, i] eta'_i (k_t . k_i): the momenta's part of the read
                cw = e_k * Db[t0, i0 + 1]  # L[t, i] = D[t-1, i] eta'_i (k_t . k_i)
                for u in range(a):
                    acc[u] -= cl * L[bi, h, i0, u] + cw * w64[i0, u]
            for u in range(a):
                w64[t0, u] = acc[u]
        if mode == 0:
            for m0 in range(n):
                e_ = np.float64(ep[bi, h, m0])
                cl = Eb[n, m0] * e_
                cw = Db[n, m0 + 1] * e_
                for u in range(a):
                    out[bi, h, m0, u] = cl * L[bi, h, m0, u] + cw * w64[m0, u]
                if momentum:
                    cs = pw[n - 1 - m0] * e_
                    for u in range(a):
                        out[bi, h, m0, a + u] = cs * L[bi, h, m0, u]
        else:
            for t0 in range(n):
                for u in range(a):
                    out[bi, h, t0, u] = w64[t0, u]
                    out[bi, h, n + t0, u] = L[bi, h, t0, u]


@njit(cache=True, nogil=True)
def _ut_fold(P0, S0, D, c, beta, momentum, L, K, ep, P_out, S_out):
    """In place, per (b, h), one pass: P_out holds F_P = sum_m (E eta' l + D eta' w)_m k_m^T and S_out
    F_S = sum_m beta^(n-m) eta'_m l_m k_m^T (the products, written there by ``key_write_ut``); they
    become P_n = D[n, 0] P_0 + c_n S_0 - F_P and S_n = beta^n S_0 - F_S. Without momentum S_n =
    -eta'_n l_n k_n^T (the token sweep's S at beta = 0; the layer does not keep it)."""
    nb, nh, a, b = P0.shape
    n = L.shape[2]
    for bh in range(nb * nh):
        bi, h = bh // nh, bh % nh
        d0 = D[bi, h, n, 0]
        if momentum:
            cn = c[bi, h, n]
            bn = np.float64(beta[h]) ** n
            for r in range(a):
                for q in range(b):
                    s0 = S0[bi, h, r, q]
                    P_out[bi, h, r, q] = d0 * P0[bi, h, r, q] + cn * s0 - P_out[bi, h, r, q]
                    S_out[bi, h, r, q] = bn * s0 - S_out[bi, h, r, q]
        else:
            e_ = ep[bi, h, n - 1]
            for r in range(a):
                el = e_ * L[bi, h, n - 1, r]
                for q in range(b):
                    P_out[bi, h, r, q] = d0 * P0[bi, h, r, q] - P_out[bi, h, r, q]
                    S_out[bi, h, r, q] = -el * K[bi, h, n - 1, q]


@njit(cache=True, nogil=True)
def _ut_read_adjoints(dPK, dSK, K, ep, beta, momentum, D, E, c, KK, dr, KdKc, dL):
    """Per (b, h), docs/selfmod-chunk.md §7.2-7.3 and the factor part of §7.5 (float64):
    dw_i = -D[n, i] eta'_i dP k_i; dr = (I + L)^-T dw by back substitution; in the same sweep
    dstep_m k_m = E[n, m] dP k_m + beta^(n-m) dS k_m + sum_{t>m} E[t-1, m] (k_t . k_m) dr_t, whence
    dl_m = -eta'_m dstep_m k_m. Outputs dr, dL and KdKc = [D[t-1, 0] k_t, c_{t-1} k_t] (the right
    factor of dr^T's product into dP_0, dS_0). The row dots of §7 are taken later from products of
    width b (``_ut_finish``)."""
    nb, nh, n, a = dPK.shape
    b = K.shape[3]
    dr64 = np.empty((n, a), dtype=np.float64)
    accr = np.empty(a, dtype=np.float64)
    accs = np.empty(a, dtype=np.float64)
    for bh in range(nb * nh):
        bi, h = bh // nh, bh % nh
        bet = np.float64(beta[h]) if momentum else 0.0
        Db, Eb, cb, KKb = D[bi, h], E[bi, h], c[bi, h], KK[bi, h]
        for t0 in range(n - 1, -1, -1):
            e_ = np.float64(ep[bi, h, t0])
            u_ = Db[n, t0 + 1] * e_
            en = Eb[n, t0]
            for u in range(a):
                pk = np.float64(dPK[bi, h, t0, u])
                accr[u] = -u_ * pk  # dw_t
                accs[u] = en * pk
            if momentum:
                pb = bet ** (n - 1 - t0)
                for u in range(a):
                    accs[u] += pb * dSK[bi, h, t0, u]
            for i0 in range(t0 + 1, n):
                kk = KKb[i0, t0]
                cr = Db[i0, t0 + 1] * e_ * kk  # L[i, t]
                cs = Eb[i0, t0] * kk
                for u in range(a):
                    v = dr64[i0, u]
                    accr[u] -= cr * v
                    accs[u] += cs * v
            for u in range(a):
                dr64[t0, u] = accr[u]
                dr[bi, h, t0, u] = accr[u]
                dL[bi, h, t0, u] = -e_ * accs[u]
            d0 = Db[t0, 0]
            ct = cb[t0]
            for q in range(b):
                KdKc[bi, h, t0, q] = d0 * K[bi, h, t0, q]
                if momentum:
                    KdKc[bi, h, t0, b + q] = ct * K[bi, h, t0, q]


@njit(cache=True, nogil=True)
def _ut_finish(dP, dS, P0, S0, RW, WLdP, LdS, drP, drS, K, ep, alpha, beta, momentum, D, E, c, KK,
               dP0, dS0, dK, dep, dalpha, dbeta):
    """Per (b, h): the full-size part (<dP, P_0>, <dP, S_0>, <dS, S_0>; dP_0 = D[n, 0] dP + dr^T D K,
    dS_0 = c_n dP + beta^n dS + dr^T c K, completed in place: dP0, dS0 arrive holding the products
    dr^T D K and dr^T c K; without momentum dS0 = 0), then the n x n part of docs/selfmod-chunk.md §7.1-7.5 (the
    adjoints of D, E, c; dk = C K + its row terms with C symmetric from the Gram and the momenta's
    reads; deta') and the decays' VJP into alpha and beta by reverse scans (no division). The row dots
    of §7 come from the width-b products: w_t . dP k_t = (w_t^T dP) . k_t, l_t . dP k_t, l_t . dS k_t,
    dr_t . P_0 k_t = (dr_t^T P_0) . k_t, dr_t . S_0 k_t, and l_m . dstep_m k_m from RW's dr_t . l_m."""
    nb, nh, a, b = P0.shape
    n = K.shape[2]
    colp = np.empty(b, dtype=np.float64)
    cols = np.empty(b, dtype=np.float64)
    colb = np.empty(b, dtype=np.float64)
    dD = np.empty((n + 1, n + 1), dtype=np.float64)
    dE = np.empty((n + 1, n), dtype=np.float64)
    dc = np.empty(n + 1, dtype=np.float64)
    C = np.empty((n, n), dtype=np.float64)
    dal = np.empty(n, dtype=np.float64)
    de = np.empty(n, dtype=np.float64)
    pw = np.empty(n + 1, dtype=np.float64)
    acc = np.empty(b, dtype=np.float64)
    for bh in range(nb * nh):
        bi, h = bh // nh, bh % nh
        bet = np.float64(beta[h]) if momentum else 0.0
        Db, Eb, cb, KKb = D[bi, h], E[bi, h], c[bi, h], KK[bi, h]
        pw[0] = 1.0
        for p in range(1, n + 1):
            pw[p] = pw[p - 1] * bet
        d0 = Db[n, 0]
        cn = cb[n]
        bn = pw[n]
        # 7.1 and 7.4b: the full-size terms, one pass
        colp[:] = 0.0
        cols[:] = 0.0
        colb[:] = 0.0
        for r in range(a):
            for q in range(b):
                dp = dP[bi, h, r, q]
                colp[q] += dp * P0[bi, h, r, q]
                dP0[bi, h, r, q] = d0 * dp + dP0[bi, h, r, q]
            if momentum:
                for q in range(b):
                    dp = dP[bi, h, r, q]
                    dsv = dS[bi, h, r, q]
                    s0 = S0[bi, h, r, q]
                    cols[q] += dp * s0
                    colb[q] += dsv * s0
                    dS0[bi, h, r, q] = cn * dp + bn * dsv + dS0[bi, h, r, q]
            else:
                for q in range(b):
                    dS0[bi, h, r, q] = 0.0
        dD[:, :] = 0.0
        dE[:, :] = 0.0
        dc[:] = 0.0
        C[:, :] = 0.0
        dD[n, 0] = colp.sum()
        dc[n] = cols.sum()
        dbet = n * pw[n - 1] * colb.sum() if momentum else 0.0
        for m0 in range(n):
            e_ = np.float64(ep[bi, h, m0])
            km = K[bi, h, m0]
            lpk = _dot(WLdP[bi, h, n + m0], km)  # l_m . dP k_m
            du = -_dot(WLdP[bi, h, m0], km)  # -w_m . dP k_m
            dE[n, m0] = -e_ * lpk
            dD[n, m0 + 1] += du * e_
            dD[m0, 0] += _dot(drP[bi, h, m0], km)  # dr_t . P_0 k_t
            lstep = Eb[n, m0] * lpk  # l_m . dstep_m k_m (the rest below)
            if momentum:
                lsk = _dot(LdS[bi, h, m0], km)  # l_m . dS k_m
                lstep += pw[n - 1 - m0] * lsk
                if m0 < n - 1:
                    dbet -= (n - 1 - m0) * pw[n - 2 - m0] * e_ * lsk
                dc[m0] += _dot(drS[bi, h, m0], km)  # dr_t . S_0 k_t
            for t0 in range(m0 + 1, n):
                lstep += Eb[t0, m0] * KK[bi, h, t0, m0] * RW[bi, h, t0, n + m0]
            de[m0] = du * Db[n, m0 + 1] - lstep  # -<dstep_m, G_m> = -l_m . dstep_m k_m
        # 7.3-7.4: dL = -dr w^T (strict lower), the Gram, the momenta's reads
        for t0 in range(n):
            for i0 in range(t0):
                e_ = np.float64(ep[bi, h, i0])
                kk = KKb[t0, i0]
                dLm = -np.float64(RW[bi, h, t0, i0])
                rl = np.float64(RW[bi, h, t0, n + i0])  # dr_t . l_i
                dl = Db[t0, i0 + 1]
                dD[t0, i0 + 1] += dLm * e_ * kk
                de[i0] += dLm * dl * kk
                dE[t0, i0] -= e_ * kk * rl
                v = dLm * dl * e_ - Eb[t0, i0] * e_ * rl
                C[t0, i0] += v
                C[i0, t0] += v
        # dk_t = sum_i C[t, i] k_i - eta'_t (E[n, t] l_t^T dP + beta^(n-t) l_t^T dS) - u_t w_t^T dP
        #        + D[t-1, 0] dr_t^T P_0 + c_{t-1} dr_t^T S_0
        for t0 in range(n):
            e_ = np.float64(ep[bi, h, t0])
            fl = -e_ * Eb[n, t0]
            fw = -e_ * Db[n, t0 + 1]
            dt0 = Db[t0, 0]
            for q in range(b):
                acc[q] = fl * WLdP[bi, h, n + t0, q] + fw * WLdP[bi, h, t0, q] + dt0 * drP[bi, h, t0, q]
            if momentum:
                fs = -e_ * pw[n - 1 - t0]
                ct = cb[t0]
                for q in range(b):
                    acc[q] += fs * LdS[bi, h, t0, q] + ct * drS[bi, h, t0, q]
            for i0 in range(n):
                cv = C[t0, i0]
                if cv != 0.0:
                    for q in range(b):
                        acc[q] += cv * K[bi, h, i0, q]
            for q in range(b):
                dK[bi, h, t0, q] = acc[q]
        # 7.5: the decays' VJP by reverse scans (D[t, s] = alpha_t D[t-1, s]; E, c as in _decays)
        al = alpha[bi, h]
        dal[:] = 0.0
        for s in range(n):
            g = 0.0
            for t in range(n, s, -1):
                g += dD[t, s]
                dal[t - 1] += g * Db[t - 1, s]
                g *= al[t - 1]
        for m0 in range(n):
            g = 0.0
            for t in range(n, m0 + 1, -1):
                g += dE[t, m0]
                dal[t - 1] += g * Eb[t - 1, m0]
                if momentum:
                    dbet += g * (t - 1 - m0) * pw[t - 2 - m0]
                g *= al[t - 1]
        if momentum:
            g = 0.0
            for t in range(n, 0, -1):
                g += dc[t]
                dal[t - 1] += g * cb[t - 1]
                dbet += g * t * pw[t - 1]
                g *= al[t - 1]
        for j in range(n):
            dalpha[bi, h, j] = dal[j]
            dep[bi, h, j] = de[j]
        dbeta[bi, h] = dbet


def _prep(P0, S0, L, K, ep, alpha, beta):
    dt = P0.dtype
    momentum = beta is not None
    b_ = np.zeros(P0.shape[1], dt) if beta is None else np.ascontiguousarray(beta, dtype=dt)
    S0 = np.zeros_like(P0) if S0 is None else S0
    args = [np.ascontiguousarray(a, dtype=dt) for a in (P0, S0, L, K, ep, alpha)]
    return momentum, b_, args


def _reads(P0, S0, L, K, ep, alpha, b_, momentum, mode):
    """KP, KS (BLAS) and the kernel's decays, Gram and reads; out as ``_ut_reads``' mode."""
    B, H, n, a = L.shape
    KP = K @ _T(P0)  # (B, H, n, a)   P_0 k_t
    KS = K @ _T(S0) if momentum else KP  # S_0 k_t (not read without momentum)
    D = np.empty((B, H, n + 1, n + 1))
    E = np.empty((B, H, n + 1, n))
    c = np.empty((B, H, n + 1))
    KK = np.empty((B, H, n, n))
    shape = (B, H, n, 2 * a if momentum else a) if mode == 0 else (B, H, 2 * n, a)
    out = np.empty(shape, dtype=P0.dtype)
    _ut_reads(K, KP, KS, L, ep, alpha, b_, momentum, mode, D, E, c, KK, out)
    return KP, KS, D, E, c, KK, out


def key_write_ut(P0, S0, L, K, ep, alpha, beta):
    """The key-side writes of one segment in the UT form: (P_end, S_end), as
    ``fast.cpu.selfmod.key_write``. ``beta`` (H,) or None (no momentum; S0 is then zero or None)."""
    momentum, b_, (P0, S0, L, K, ep, alpha) = _prep(P0, S0, L, K, ep, alpha, beta)
    _, _, D, _, c, _, U = _reads(P0, S0, L, K, ep, alpha, b_, momentum, 0)
    a = P0.shape[2]
    P_out, S_out = np.empty_like(P0), np.empty_like(P0)
    # the products straight into the outputs (no (B, H, 2a, b) temporary: at hope-small sizes a fresh
    # 0.5 MB array per call costs its page faults, measured 700 -> 220 us per call in isolation)
    np.matmul(_T(U[..., :a]), K, out=P_out)  # sum_m (E[n, m] eta'_m l_m + D[n, m] eta'_m w_m) k_m^T
    if momentum:
        np.matmul(_T(U[..., a:]), K, out=S_out)  # sum_m beta^(n-m) eta'_m l_m k_m^T
    _ut_fold(P0, S0, D, c, b_, momentum, L, K, ep, P_out, S_out)
    return P_out, S_out


def key_write_ut_backward(dP_end, dS_end, P0, S0, L, K, ep, alpha, beta):
    """VJP of ``key_write_ut``: (dP0, dS0, dL, dK, dep, dalpha, dbeta_dot (B, H)), as
    ``fast.cpu.selfmod.key_write_backward`` (dbeta_dot is d/d beta per (b, h); without momentum dS_end
    must be zero and dS0 is zero). Recomputes the reads from (P0, S0) (docs/selfmod-chunk.md §5)."""
    momentum, b_, (P0, S0, L, K, ep, alpha) = _prep(P0, S0, L, K, ep, alpha, beta)
    dt = P0.dtype
    B, H, n, a = L.shape
    b = K.shape[3]
    dP = np.ascontiguousarray(dP_end, dtype=dt)
    dS = np.zeros_like(P0) if dS_end is None or not momentum else np.ascontiguousarray(dS_end, dtype=dt)
    KP, KS, D, E, c, KK, WL = _reads(P0, S0, L, K, ep, alpha, b_, momentum, 1)
    dPK = K @ _T(dP)  # (B, H, n, a)   dP k_t
    dSK = K @ _T(dS) if momentum else dPK
    dr = np.empty((B, H, n, a), dtype=dt)
    KdKc = np.empty((B, H, n, 2 * b if momentum else b), dtype=dt)
    dL = np.empty((B, H, n, a), dtype=dt)
    _ut_read_adjoints(dPK, dSK, K, ep, b_, momentum, D, E, c, KK, dr, KdKc, dL)
    RW = dr @ _T(WL)  # (B, H, n, 2n)   dr_t . w_i, dr_t . l_i
    WLdP = WL @ dP  # (B, H, 2n, b)   w_i^T dP, l_i^T dP
    drP = dr @ P0  # (B, H, n, b)
    if momentum:
        LdS, drS = L @ dS, dr @ S0
    else:
        LdS = drS = drP  # not read
    dP0, dS0 = np.empty_like(P0), np.empty_like(P0)
    # dr^T [D[t-1, 0] k_t, c_{t-1} k_t] straight into dP0, dS0 (completed in place by _ut_finish; no
    # (B, H, a, 2b) temporary, as key_write_ut's products)
    np.matmul(_T(dr), KdKc[..., :b], out=dP0)
    if momentum:
        np.matmul(_T(dr), KdKc[..., b:], out=dS0)
    dK = np.empty((B, H, n, b), dtype=dt)
    dep, dalpha = np.empty((B, H, n), dt), np.empty((B, H, n), dt)
    dbeta = np.empty((B, H), dt)
    _ut_finish(dP, dS, P0, S0, RW, WLdP, LdS, drP, drS, K, ep, alpha, b_, momentum, D, E, c, KK,
               dP0, dS0, dK, dep, dalpha, dbeta)  # fmt: skip
    return dP0, dS0, dL, dK, dep, dalpha, dbeta


__all__ = ["key_write_ut", "key_write_ut_backward"]
