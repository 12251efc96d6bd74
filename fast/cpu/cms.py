"""The Continuum Memory System on the CPU: the reference's CMS levels on BLAS + compiled activations.

Paper: §7, Eqs. (70)-(74), arXiv 2512.24695v1. SPEC: SPEC.md#cms (the definition),
SPEC.md#fast-cpu (the port).

Symbols (paper symbol -> code name, shape; as in reference/cms.py):

    x_t / o_t            u, z       (B, T, D)       the CMS input
    W_1, W_2 of level l  W1, W2     (B, G, D, Hm), (B, G, Hm, D)   one weight group per chunk
    MLP^(f_l)            level l    z + W1 act(W2 z)
    Agg weights (Eq. 74) agg        (L,)

Decisions (SPEC.md#fast-cpu): the same function, signatures, caches and return structures as
``reference/cms.py``. Each group's products are batched matmuls over the sequences (BLAS); the
activation and its derivative are the compiled kernels of ``fast/cpu/primitives.py``. The
schedule helpers (``groups_for``, ``chunk_index``, ``updates_at``, ``write``, ``param_shapes``)
are the reference's own functions: they are the specification of when a level updates and cost
nothing. An activation other than silu / gelu, or complex input, falls back to the reference
level explicitly (counted in ``primitives.FALLBACKS``).
"""

from __future__ import annotations

import numpy as np

from ...reference import cms as R
from ...reference.cms import chunk_index, groups_for, param_shapes, updates_at, write  # noqa: F401
from . import primitives as P

_COMPILED_ACTS = ("silu", "gelu")


def _compiled(act, *arrays) -> bool:
    return act in _COMPILED_ACTS and not any(np.iscomplexobj(a) for a in arrays)


def _bt(W: np.ndarray) -> np.ndarray:
    """(B, a, b) -> (B, b, a): the per-sequence transpose used by the batched products."""
    return W.swapaxes(-1, -2)


def _apply(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """x (B, n, a) @ W (B, a, b) -> (B, n, b). Weights shared by the batch (a broadcast view, stride
    0 over B: a frozen level, or any level outside the in-context pass) take one (B n, a) x (a, b)
    BLAS product instead of B small ones (NumPy's stacked matmul is slow on stride-0 stacks)."""
    if W.shape[0] > 1 and W.strides[0] == 0:
        Bn, n, a = x.shape
        return (x.reshape(Bn * n, a) @ W[0]).reshape(Bn, n, W.shape[2])
    return np.matmul(x, W)


def level_forward(z, W1, W2, groups, act="gelu"):
    """MLP^(f_l)(z) = z + W1 act(W2 z) with the weights of group g on tokens groups[g].

    z (B, T, D); W1 (B, G, D, Hm); W2 (B, G, Hm, D). Returns (y, cache) (the reference's cache).
    """
    z = R._check_level(z, np.asarray(W1), np.asarray(W2), groups)
    W1, W2 = np.asarray(W1), np.asarray(W2)
    if not _compiled(act, z, W1, W2) or len({z.dtype, W1.dtype, W2.dtype}) > 1:
        P.FALLBACKS["cms.level_forward"] = P.FALLBACKS.get("cms.level_forward", 0) + 1
        return R.level_forward(z, W1, W2, groups, act)
    f = P.FAST_ACTIVATIONS[act][0]
    pre = np.empty(z.shape[:2] + (W1.shape[3],), dtype=z.dtype)  # (B, T, Hm)
    y = np.empty(z.shape, dtype=z.dtype)  # (B, T, D)
    for g, (s, e) in enumerate(groups):
        pre[:, s:e] = _apply(z[:, s:e], _bt(W2[:, g]))  # (B, n, Hm): W2 z
        y[:, s:e] = z[:, s:e] + _apply(f(pre[:, s:e]), _bt(W1[:, g]))  # (B, n, D)  # Eq. (70)
    return y, (z, W1, W2, tuple(groups), act, pre)


def level_backward(dy, cache):
    """Returns (dz (B, T, D), dW1 (B, G, D, Hm), dW2 (B, G, Hm, D)): per-group, per-sequence."""
    z, W1, W2, groups, act, pre = cache
    dy = np.asarray(dy)
    if dy.shape != z.shape:
        raise ValueError(f"dy must have shape (B, T, D) = {z.shape}, got {dy.shape}")
    if not _compiled(act, dy, pre) or dy.dtype != pre.dtype:
        P.FALLBACKS["cms.level_backward"] = P.FALLBACKS.get("cms.level_backward", 0) + 1
        return R.level_backward(dy, cache)
    dz = dy.copy()  # (B, T, D): the residual path
    dW1 = np.empty(W1.shape, dtype=pre.dtype)
    dW2 = np.empty(W2.shape, dtype=pre.dtype)
    for g, (s, e) in enumerate(groups):
        p = pre[:, s:e]  # (B, n, Hm)
        dyg = dy[:, s:e]  # (B, n, D)
        fp, dfp = P.act_and_grad(act, p)  # act(p), act'(p) in one compiled pass
        dW1[:, g] = np.matmul(_bt(dyg), fp)  # (B, D, Hm)
        dpre = _apply(dyg, W1[:, g]) * dfp  # (B, n, Hm)
        dW2[:, g] = np.matmul(_bt(dpre), z[:, s:e])  # (B, Hm, D)
        dz[:, s:e] += _apply(dpre, W2[:, g])  # (B, n, D)
    return dz, dW1, dW2


def forward(u, weights, groups, variant="sequential", act="gelu", agg=None):
    """The CMS over a segment (Eq. 70 sequential / Eq. 74 independent). Returns (y, cache)."""
    if variant not in ("sequential", "independent"):
        raise ValueError(f"variant must be 'sequential' or 'independent', got {variant!r}")
    if len(weights) != len(groups) or not weights:
        raise ValueError(f"weights and groups must give one entry per level, got {len(weights)} and {len(groups)}")
    caches = []
    if variant == "sequential":
        z = u
        for (W1, W2), gr in zip(weights, groups, strict=True):
            z, c = level_forward(z, W1, W2, gr, act)  # Eq. (70)
            caches.append(c)
        return z, (variant, caches, None, None)
    agg = np.asarray(agg)
    if agg.shape != (len(weights),):
        raise ValueError(f"agg must have shape (L,) = ({len(weights)},), got {agg.shape}")
    y = np.array(u, copy=True)
    outs = []
    for l, ((W1, W2), gr) in enumerate(zip(weights, groups, strict=True)):
        m, c = level_forward(u, W1, W2, gr, act)
        caches.append(c)
        outs.append(m - u)  # (B, T, D)
        y = y + agg[l] * outs[-1]  # Eq. (74)
    return y, (variant, caches, agg, outs)


def backward(dy, cache):
    """Returns (du, dweights, dagg) as the reference does."""
    variant, caches, agg, outs = cache
    if variant == "sequential":
        dz = dy
        dweights = []
        for c in reversed(caches):
            dz, dW1, dW2 = level_backward(dz, c)
            dweights.append((dW1, dW2))
        return dz, dweights[::-1], None
    du = np.array(dy, copy=True)
    dweights = []
    dagg = np.zeros(agg.shape, dtype=np.result_type(agg, dy))
    for l, c in enumerate(caches):
        dagg[l] = np.sum(dy * outs[l])
        dm = agg[l] * dy
        dz, dW1, dW2 = level_backward(dm, c)
        du = du + dz - dm
        dweights.append((dW1, dW2))
    return du, dweights, dagg


__all__ = ["backward", "chunk_index", "forward", "groups_for", "level_backward", "level_forward",
           "param_shapes", "updates_at", "write"]
