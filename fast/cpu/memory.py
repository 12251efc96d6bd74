"""Numba port of the matrix-memory learning rules' token loops (Hebbian, delta rule, DGD, Oja).

Paper: §5, Eqs. (14)-(18), (56)-(57), (64)-(67), arXiv 2512.24695v1. Specification:
reference/memory.py and SPEC.md#memory; same functions, signatures (``*_forward(q, k, v, eta, alpha,
M0) -> (y, M_T, cache)``, ``*_backward(dy, dM_T, cache) -> dict``), return structures and dtypes.

Symbols (per sequence):

| paper        | code       | shape           |
| ------------ | ---------- | --------------- |
| q_t, k_t     | q, k       | (B, T, d_k)     |
| v_t          | v          | (B, T, d_v)     |
| eta_t, alpha_t | eta, alpha | (B, T)        |
| M_t          | states     | (B, T+1, d_v, d_k) |
| y_t = M_t q_t| y          | (B, T, d_v)     |

Every rule writes ``M_t = alpha_t M_{t-1} + eta_t u_t w_t^T`` with
Hebbian ``u = v, w = k`` (Eq. 64), delta ``u = v - M_{t-1} k, w = k`` (Eq. 65), Oja
``u = v, w = k - M_{t-1}^T v`` (Eq. 67); DGD is the delta rule with ``eta' = eta / (1 + eta ||k||^2)``
(Eq. 57). One compiled kernel per direction (``_rule_forward``, ``_rule_backward``) runs the token
loop for each sequence; the cache keeps the reference's layout (the states ``(B, T+1, d_v, d_k)``), so
either backward takes either forward's cache.

Port decisions:
- the chunk forms (``*_chunked_*``, UT transform and Omega) and ``omega_*`` are not ported: they
  are the reference's functions, re-exported here as explicit fallbacks (``FALLBACK``);
- complex inputs (the reference's complex-step path) fall back to the reference explicitly;
- validation is the reference's (same ``ValueError`` messages).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ...reference import memory as RM

_RULE = {"hebbian": 0, "delta": 1, "oja": 2}

# Not ported: explicit fallbacks to the reference (same functions).
FALLBACK = ("hebbian_chunked", "delta_chunked", "dgd_chunked", "omega", "omega_chunked")
hebbian_chunked_forward, hebbian_chunked_backward = RM.hebbian_chunked_forward, RM.hebbian_chunked_backward
delta_chunked_forward, delta_chunked_backward = RM.delta_chunked_forward, RM.delta_chunked_backward
dgd_chunked_forward, dgd_chunked_backward = RM.dgd_chunked_forward, RM.dgd_chunked_backward
omega_forward, omega_backward = RM.omega_forward, RM.omega_backward
omega_chunked_forward, omega_chunked_backward = RM.omega_chunked_forward, RM.omega_chunked_backward
omega_inner_grad, prox_step_size = RM.omega_inner_grad, RM.prox_step_size


@njit(cache=True, nogil=True)
def _rule_forward(rule, q, k, v, eta, alpha, states, y):
    """Token loop: states[:, 0] holds M0; fills states[:, 1:] and y (write, then read, Eq. 15)."""
    B, T, dk = k.shape
    dv = v.shape[2]
    u = np.empty(dv, dtype=states.dtype)
    w = np.empty(dk, dtype=states.dtype)
    for b in range(B):
        for t in range(T):
            M = states[b, t]
            Mn = states[b, t + 1]
            for i in range(dv):
                if rule == 1:  # delta: u = v - M k
                    acc = 0.0
                    for j in range(dk):
                        acc += M[i, j] * k[b, t, j]
                    u[i] = v[b, t, i] - acc
                else:
                    u[i] = v[b, t, i]
            for j in range(dk):
                if rule == 2:  # Oja: w = k - M^T v
                    acc = 0.0
                    for i in range(dv):
                        acc += M[i, j] * v[b, t, i]
                    w[j] = k[b, t, j] - acc
                else:
                    w[j] = k[b, t, j]
            e = eta[b, t]
            a = alpha[b, t]
            for i in range(dv):
                eu = e * u[i]
                acc = 0.0
                for j in range(dk):
                    m = a * M[i, j] + eu * w[j]  # Eqs. (64), (65), (67)
                    Mn[i, j] = m
                    acc += m * q[b, t, j]
                y[b, t, i] = acc  # Eq. (15)   y_t = M_t q_t


@njit(cache=True, nogil=True)
def _rule_backward(rule, q, k, v, eta, alpha, states, dy, dM, dq, dk_, dv_, deta, dalpha):
    """Reverse token loop; dM (B, d_v, d_k) holds dM_T on entry and dM0 on exit."""
    B, T, dk = k.shape
    dv = v.shape[2]
    u = np.empty(dv, dtype=states.dtype)
    w = np.empty(dk, dtype=states.dtype)
    du = np.empty(dv, dtype=states.dtype)
    dw = np.empty(dk, dtype=states.dtype)
    for b in range(B):
        G = dM[b]
        for t in range(T - 1, -1, -1):
            M = states[b, t]
            Mn = states[b, t + 1]
            for i in range(dv):
                for j in range(dk):
                    G[i, j] += dy[b, t, i] * q[b, t, j]  # the read y_t = M_t q_t
            for j in range(dk):
                acc = 0.0
                for i in range(dv):
                    acc += Mn[i, j] * dy[b, t, i]
                dq[b, t, j] = acc
            for i in range(dv):  # recompute the write's factors
                if rule == 1:
                    acc = 0.0
                    for j in range(dk):
                        acc += M[i, j] * k[b, t, j]
                    u[i] = v[b, t, i] - acc
                else:
                    u[i] = v[b, t, i]
            for j in range(dk):
                if rule == 2:
                    acc = 0.0
                    for i in range(dv):
                        acc += M[i, j] * v[b, t, i]
                    w[j] = k[b, t, j] - acc
                else:
                    w[j] = k[b, t, j]
            e = eta[b, t]
            da = 0.0
            de = 0.0
            for i in range(dv):
                acc = 0.0
                for j in range(dk):
                    da += G[i, j] * M[i, j]
                    acc += G[i, j] * w[j]
                de += u[i] * acc
                du[i] = e * acc  # eta dM w
            for j in range(dk):
                acc = 0.0
                for i in range(dv):
                    acc += G[i, j] * u[i]
                dw[j] = e * acc  # eta dM^T u
            dalpha[b, t] = da
            deta[b, t] = de
            a = alpha[b, t]
            if rule == 0:
                for i in range(dv):
                    dv_[b, t, i] = du[i]
                for j in range(dk):
                    dk_[b, t, j] = dw[j]
                for i in range(dv):
                    for j in range(dk):
                        G[i, j] = a * G[i, j]
            elif rule == 1:  # u = v - M k
                for i in range(dv):
                    dv_[b, t, i] = du[i]
                for j in range(dk):
                    acc = 0.0
                    for i in range(dv):
                        acc += M[i, j] * du[i]
                    dk_[b, t, j] = dw[j] - acc
                for i in range(dv):
                    for j in range(dk):
                        G[i, j] = a * G[i, j] - du[i] * k[b, t, j]
            else:  # w = k - M^T v
                for j in range(dk):
                    dk_[b, t, j] = dw[j]
                for i in range(dv):
                    acc = 0.0
                    for j in range(dk):
                        acc += M[i, j] * dw[j]
                    dv_[b, t, i] = du[i] - acc
                for i in range(dv):
                    for j in range(dk):
                        G[i, j] = a * G[i, j] - v[b, t, i] * dw[j]


def _forward(rule, q, k, v, eta, alpha, M0):
    has_alpha = alpha is not None
    q, k, v, eta, alpha, M0, _ = RM.check_inputs(q, k, v, eta, alpha, M0)
    if np.iscomplexobj(k):  # the complex-step path: the reference's
        return None
    B, T, _ = k.shape
    states = np.empty((B, T + 1) + M0.shape[1:], dtype=M0.dtype)  # (B, T+1, d_v, d_k)
    states[:, 0] = M0
    y = np.empty_like(v)  # (B, T, d_v)
    c = [np.ascontiguousarray(a) for a in (q, k, v, eta, alpha)]
    _rule_forward(_RULE[rule], *c, states, y)
    cache = {"q": q, "k": k, "v": v, "eta": eta, "alpha": alpha, "M0": M0, "states": states,
             "has_alpha": has_alpha}  # fmt: skip
    return y, states[:, T].copy(), cache


def _backward(rule, dy, dM_T, cache):
    dy = RM.check_dy(dy, cache)
    q, k, v, eta, alpha, states = (cache[n] for n in ("q", "k", "v", "eta", "alpha", "states"))
    dM = np.array(RM.state_grad(dM_T, cache), dtype=k.dtype)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    deta, dalpha = np.empty_like(eta), np.empty_like(alpha)
    c = [np.ascontiguousarray(a) for a in (q, k, v, eta, alpha, states)]
    _rule_backward(_RULE[rule], *c, np.ascontiguousarray(dy, dtype=k.dtype), dM, dq, dk, dv, deta, dalpha)
    return RM.input_grads(cache, q=dq, k=dk, v=dv, eta=deta, alpha=dalpha, M0=dM)


def hebbian_forward(q, k, v, eta, alpha, M0):
    """Same as ``reference.memory.hebbian_forward`` (Eq. 64): (y, M_T, cache)."""
    out = _forward("hebbian", q, k, v, eta, alpha, M0)
    return RM.hebbian_forward(q, k, v, eta, alpha, M0) if out is None else out


def hebbian_backward(dy, dM_T, cache):
    """Same as ``reference.memory.hebbian_backward``."""
    if np.iscomplexobj(cache["k"]):
        return RM.hebbian_backward(dy, dM_T, cache)
    return _backward("hebbian", dy, dM_T, cache)


def delta_forward(q, k, v, eta, alpha, M0):
    """Same as ``reference.memory.delta_forward`` (Eq. 65): (y, M_T, cache)."""
    out = _forward("delta", q, k, v, eta, alpha, M0)
    return RM.delta_forward(q, k, v, eta, alpha, M0) if out is None else out


def delta_backward(dy, dM_T, cache):
    """Same as ``reference.memory.delta_backward``."""
    if np.iscomplexobj(cache["k"]):
        return RM.delta_backward(dy, dM_T, cache)
    return _backward("delta", dy, dM_T, cache)


def dgd_forward(q, k, v, eta, alpha, M0):
    """Same as ``reference.memory.dgd_forward`` (Eqs. 56-57): the delta rule at eta'."""
    q, k, v, eta, _, M0, _ = RM.check_inputs(q, k, v, eta, alpha, M0)
    y, M_T, cache = delta_forward(q, k, v, RM.prox_step_size(eta, k), alpha, M0)  # Eq. (57)
    cache["eta_raw"] = eta
    return y, M_T, cache


def dgd_backward(dy, dM_T, cache):
    """Same as ``reference.memory.dgd_backward``."""
    grads = delta_backward(dy, dM_T, cache)
    deta, dk_prox = RM.prox_step_size_backward(grads["eta"], cache["eta_raw"], cache["k"])
    grads["eta"], grads["k"] = deta, grads["k"] + dk_prox
    return grads


def oja_forward(q, k, v, eta, alpha, M0):
    """Same as ``reference.memory.oja_forward`` (Eqs. 66-67): (y, M_T, cache)."""
    out = _forward("oja", q, k, v, eta, alpha, M0)
    return RM.oja_forward(q, k, v, eta, alpha, M0) if out is None else out


def oja_backward(dy, dM_T, cache):
    """Same as ``reference.memory.oja_backward``."""
    if np.iscomplexobj(cache["k"]):
        return RM.oja_backward(dy, dM_T, cache)
    return _backward("oja", dy, dM_T, cache)


RULES = {
    "hebbian": (hebbian_forward, hebbian_backward),
    "hebbian_chunked": (hebbian_chunked_forward, hebbian_chunked_backward),
    "delta": (delta_forward, delta_backward),
    "delta_chunked": (delta_chunked_forward, delta_chunked_backward),
    "dgd": (dgd_forward, dgd_backward),
    "dgd_chunked": (dgd_chunked_forward, dgd_chunked_backward),
    "oja": (oja_forward, oja_backward),
    "omega": (omega_forward, omega_backward),
    "omega_chunked": (omega_chunked_forward, omega_chunked_backward),
}
"""Same keys as ``reference.memory.RULES``; the names in ``FALLBACK`` are the reference's functions."""
