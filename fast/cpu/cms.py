"""The Continuum Memory System on the CPU: the reference's CMS levels on BLAS + compiled activations.

Paper: §7, Eqs. (70)-(74), arXiv 2512.24695v1. SPEC: SPEC.md#cms (the definition),
SPEC.md#fast-cpu (the port).

Symbols (paper symbol -> code name, shape; as in reference/cms.py):

    x_t / o_t            u, z       (B, T, D)       the CMS input
    W_1, W_2 of level l  W1, W2     (B, G, D, Hm), (B, G, Hm, D)   one weight group per chunk
    MLP^(f_l)            level l    z + W1 act(W2 z)
    Agg weights (Eq. 74) agg        (L,)

Decisions (SPEC.md#fast-cpu): the same function, signatures, caches and return structures as
``reference/cms.py``. The activation and its derivative are the compiled kernels of
``fast/cpu/primitives.py``. The schedule helpers (``groups_for``, ``chunk_index``, ``updates_at``,
``write``, ``param_shapes``) are the reference's own functions: they are the specification of when
a level updates and cost nothing. An activation other than silu / gelu, or complex input, falls
back to the reference level explicitly (counted in ``primitives.FALLBACKS``).

*Feature-major products* (measured, OpenBLAS 0.3.31 single thread, float32, one sequence's
(16, 128) tokens against a (384, 128) weight): ``z @ W2.T`` (a row-major operand times a
transposed one) takes 40-50 us, while ``W2 @ zT`` with zT = z^T stored contiguously takes 15 us
(the ~100 GFLOP/s peak); the transposed-transposed, transposed-plain and plain-plain orientations
are all near 15-17 us, only row-major-times-transposed is slow (2.7x at 16 tokens, 1.4x at 64).
So the forward keeps the activations feature-major: zT (B, D, T), pre as preT (B, Hm, T),
act(pre) (B, Hm, T), and each product has the weight, untransposed, on the left (one batched
matmul over the sequences per group, written into slices of the (B, ., T) buffers). The
sequential chain hands each level's output to the next in that layout (zT_next = zT + W1 act(.),
the same sums as z + W1 act(.)), so one transposed copy per level gives the row-major y. The
cache keeps the reference's layout as a view: ``pre`` is preT.swapaxes(1, 2), a (B, T, Hm) array
the reference's backward reads as is; this port's backward gets preT back without a copy (a
reference cache is copied once). The backward runs act and act' once over the whole preT and
multiplies by act' once (dpreT = (W1^T dy^T) * act'(pre)); its products are in fast orientations
(dW1 = dy^T act(pre) transposed-transposed, ~20% slower than plain at these shapes but cheaper
than transposing act(pre); dW2 = dpreT z and dz = dy + dpreT^T W2). Shared weights (a stride-0
broadcast, the frozen level) need no special case in this layout: the batched matmul over a
stride-0 stack measured the same as over a contiguous one (57 vs 58 us for 4 x 16 tokens), and
one merged (B n, D) product was no faster than B per-sequence ones at n = 16.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ...reference import cms as R
from ...reference.cms import Factors, Replay, chunk_index, groups_for, param_shapes, updates_at, write  # noqa: F401
from . import primitives as P

_COMPILED_ACTS = ("silu", "gelu")


def _compiled(act, *arrays) -> bool:
    return act in _COMPILED_ACTS and not any(np.iscomplexobj(a) for a in arrays)


_GROUP_LISTS = (list, Replay)
"""The per-group forms of a level's weights besides a (B, G, ...) array: a list of G (B, ...)
arrays (``Ops.cms_group_lists``) or a ``Replay`` that rebuilds them in order (``Ops.cms_factored_writes``)."""


def _at(W, g):
    """Group g's weights (B, ...) of W: a (B, G, ...) array, a list of G (B, ...) arrays or a Replay."""
    return W[g] if isinstance(W, _GROUP_LISTS) else W[:, g]


def _stacked(W):
    """W as a (B, G, ...) array (per-group arrays stacked: the reference's form)."""
    return np.stack(list(W), axis=1) if isinstance(W, _GROUP_LISTS) else np.asarray(W)


def factors_product(F: Factors) -> np.ndarray:
    """The gradient (B, out, in) that ``F`` stands for (reference/cms.py ``factors_product``): one
    batched product u^T v, the operands in the layouts ``level_backward`` forms a group's gradient
    from, so it gives the same numbers as its ``groups`` gradient."""
    return np.matmul(F.u.swapaxes(1, 2), F.v)


@njit(cache=True, nogil=True)
def _write_rank1(W, u, v, eta, out):  # pragma: no cover - compiled
    """out[b] = W[b] - eta * (u[b] v[b]^T) for u (B, p), v (B, q): ``write`` of a 1-token chunk's
    product, each element the same two roundings (u_i v_j, then eta times it) and subtraction."""
    for b in range(W.shape[0]):
        for i in range(W.shape[1]):
            ui = u[b, i]
            for j in range(W.shape[2]):
                out[b, i, j] = W[b, i, j] - eta * (ui * v[b, j])


def write_factors(W: np.ndarray, F: Factors, eta: float) -> np.ndarray:
    """``write`` with the chunk's summed gradient given as its factors (Eq. 71), bitwise
    ``write(W, factors_product(F), eta)``. A 1-token chunk's (rank 1: the product has one term per
    element, which a matmul rounds once) in one compiled pass; a longer chunk's as the product,
    then ``eta *`` and ``W -`` in place in the product's array (the same two roundings per element
    as ``write``, without its two temporaries of the weights' size: a ``Replay`` rebuilds every
    item this way, SPEC.md#cms "Factored writes")."""
    if W.dtype != F.u.dtype or W.dtype != F.v.dtype or W.dtype.kind != "f":
        return write(W, factors_product(F), eta)
    if F.u.shape[1] != 1:
        G = factors_product(F)  # a fresh array: the result is written into it
        np.multiply(G, W.dtype.type(eta), out=G)
        return np.subtract(W, G, out=G)
    out = np.empty(W.shape, W.dtype)
    _write_rank1(W, F.u[:, 0], F.v[:, 0], W.dtype.type(eta), out)
    return out


def _check_groups(z, W1, W2, groups):
    """``R.check_level`` for weights given as lists of per-group (B, ...) arrays (``Ops.cms_group_lists``),
    with the same messages, without stacking them."""
    z = np.asarray(z)
    if len(W1) != len(groups) or len(W2) != len(groups):
        raise ValueError(f"W1 and W2 must give one (B, ...) array per group ({len(groups)}), got {len(W1)}, {len(W2)}")
    first = (np.asarray(W1[0])[:, None], np.asarray(W2[0])[:, None])  # (a Replay's items keep W_0's shape, dtype)
    R.check_level(z, np.broadcast_to(first[0], first[0].shape[:1] + (len(groups),) + first[0].shape[2:]),
                  np.broadcast_to(first[1], first[1].shape[:1] + (len(groups),) + first[1].shape[2:]), groups)
    for name, W in (("W1", W1), ("W2", W2)):
        if isinstance(W, list) and any(np.shape(w) != np.shape(W[0]) or np.asarray(w).dtype != np.asarray(W[0]).dtype for w in W):
            raise ValueError(f"{name}: every group's weights must have the shape and dtype of the first, "
                             f"{np.shape(W[0])}")
    return z


def _t(x: np.ndarray) -> np.ndarray:
    """(B, T, k) -> (B, k, T), contiguous: the feature-major layout of the level's products."""
    return np.ascontiguousarray(x.swapaxes(1, 2))


def _level_forward(z, zT, W1, W2, groups, act):
    """``level_forward``'s compiled path in the feature-major layout. zT: ``_t(z)`` or None.

    Returns (y (B, T, D), yT = _t(y) (the next level's zT), cache). Every product has the weight
    as its left, untransposed operand: W2 z -> (B, Hm, n) slices of preT (B, Hm, T), W1 act(.) ->
    (B, D, n) slices of outT (B, D, T). The activation runs once over the whole preT.
    """
    if zT is None:
        zT = _t(z)
    B, T, D = z.shape
    f = P.FAST_ACTIVATIONS[act][0]
    preT = np.empty((B, _at(W1, 0).shape[-1], T), dtype=z.dtype)  # (B, Hm, T)
    for g, (s, e) in enumerate(groups):
        np.matmul(_at(W2, g), zT[:, :, s:e], out=preT[:, :, s:e])  # (B, Hm, n): W2 z
    fT = f(preT)  # (B, Hm, T), contiguous
    yT = np.empty((B, D, T), dtype=z.dtype)
    for g, (s, e) in enumerate(groups):
        np.matmul(_at(W1, g), fT[:, :, s:e], out=yT[:, :, s:e])  # (B, D, n): W1 act(W2 z)
    yT += zT  # z + W1 act(W2 z)  # Eq. (70)
    return _t(yT), yT, (z, W1, W2, tuple(groups), act, preT.swapaxes(1, 2))


def _level(z, zT, W1, W2, groups, act):
    """(y, yT or None, cache) of one level: the compiled path, or the counted reference fallback.
    W1, W2: (B, G, ...) arrays, lists of G (B, ...) arrays (``Ops.cms_group_lists``) or Replays."""
    if isinstance(W1, _GROUP_LISTS) or isinstance(W2, _GROUP_LISTS):
        W1, W2 = (W if isinstance(W, Replay) else list(W) for W in (W1, W2))
        z = _check_groups(z, W1, W2, groups)
        w1, w2 = np.asarray(W1[0]), np.asarray(W2[0])
    else:
        z = R.check_level(z, np.asarray(W1), np.asarray(W2), groups)
        W1, W2 = w1, w2 = np.asarray(W1), np.asarray(W2)
    if not _compiled(act, z, w1, w2) or len({z.dtype, w1.dtype, w2.dtype}) > 1:
        P.FALLBACKS["cms.level_forward"] = P.FALLBACKS.get("cms.level_forward", 0) + 1
        return R.level_forward(z, _stacked(W1), _stacked(W2), groups, act) + (None,)
    y, yT, cache = _level_forward(z, zT, W1, W2, groups, act)
    return y, cache, yT


def level_forward(z, W1, W2, groups, act="gelu"):
    """MLP^(f_l)(z) = z + W1 act(W2 z) with the weights of group g on tokens groups[g].

    z (B, T, D); W1 (B, G, D, Hm); W2 (B, G, Hm, D), or each a list of G per-group (B, ...) arrays
    (the driver's ``Ops.cms_group_lists``: no (B, G, ...) stack is made). Returns (y, cache) (the
    reference's cache, its weights as given; its ``pre`` is a (B, T, Hm) view of a feature-major
    (B, Hm, T) array).
    """
    y, cache, _ = _level(z, None, W1, W2, groups, act)
    return y, cache


def level_backward(dy, cache, want="groups"):
    """Returns (dz (B, T, D), dW1, dW2): per group and sequence (B, G, ...) for ``want="groups"``,
    summed over them (1, 1, ...) for ``"sum"``, None for ``"skip"``, the one group's ``Factors`` for
    ``"factors"`` (reference/cms.py ``WANTED``; ``factors_product`` of them is the ``groups`` gradient).

    Feature-major like the forward: act and act' once over preT (B, Hm, T) (a free transpose of
    this port's cache, a copy of a reference cache), dpreT = (W1^T dy^T) * act'(preT) with one
    multiply, then dW2 = dpreT z and dz = dy + dpreT^T W2 per group. The sum is one product per
    sequence over all of its tokens (dW1 = dy^T act(pre), dW2 = dpre^T z, then summed over the
    sequences), not one per group: at a period-1 level over 256 tokens, 2 products instead of 512
    per weight, and no (B, G, ...) array.
    """
    z, W1, W2, groups, act, pre = cache
    dy = np.asarray(dy)
    if dy.shape != z.shape:
        raise ValueError(f"dy must have shape (B, T, D) = {z.shape}, got {dy.shape}")
    if want not in R.WANTED:
        raise ValueError(f"want must be one of {R.WANTED}, got {want!r}")
    if want == "factors" and len(groups) != 1:
        raise ValueError(f"factors are a one-group level's gradients; this call has {len(groups)} groups")
    if not _compiled(act, dy, pre) or dy.dtype != pre.dtype:
        P.FALLBACKS["cms.level_backward"] = P.FALLBACKS.get("cms.level_backward", 0) + 1
        cache = (z, _stacked(W1), _stacked(W2), groups, act, pre)
        return R.as_wanted(*R.level_backward(dy, cache, want == "factors"), want)
    dtype = pre.dtype
    preT = np.ascontiguousarray(pre.swapaxes(1, 2))  # (B, Hm, T)
    fT, dfT = P.act_and_grad(act, preT)  # act(pre), act'(pre) in one compiled pass
    dyt = dy.swapaxes(1, 2)  # (B, D, T) view
    dW1 = dW2 = None
    if want == "groups":
        G = len(groups)
        dW1 = np.empty(z.shape[:1] + (G,) + _at(W1, 0).shape[1:], dtype=dtype)  # (B, G, D, Hm)
        dW2 = np.empty(z.shape[:1] + (G,) + _at(W2, 0).shape[1:], dtype=dtype)
    dpreT = np.empty(preT.shape, dtype=dtype)  # (B, Hm, T)
    for g, (s, e) in enumerate(groups):
        if dW1 is not None:
            np.matmul(dyt[:, :, s:e], fT[:, :, s:e].swapaxes(1, 2), out=dW1[:, g])  # (B, D, Hm): dy^T act(pre)
        np.matmul(_at(W1, g).swapaxes(1, 2), dyt[:, :, s:e], out=dpreT[:, :, s:e])  # (B, Hm, n): W1^T dy^T
    dpreT *= dfT  # the gradient at pre
    dz = dy.copy()  # (B, T, D): the residual path
    for g, (s, e) in enumerate(groups):
        if dW2 is not None:
            np.matmul(dpreT[:, :, s:e], z[:, s:e], out=dW2[:, g])  # (B, Hm, D): dpre^T z
        dz[:, s:e] += np.matmul(dpreT[:, :, s:e].swapaxes(1, 2), _at(W2, g))  # (B, n, D): dpre W2
    if want == "sum":  # every token's product at once, per sequence, then over the sequences
        dW1 = np.matmul(dyt, fT.swapaxes(1, 2)).sum(axis=0)[None, None]  # (1, 1, D, Hm)
        dW2 = np.matmul(dpreT, z).sum(axis=0)[None, None]  # (1, 1, Hm, D)
    if want == "factors":  # the group's products' operands, as factors_product multiplies them
        # dy and z are the caller's arrays: copies (order K keeps their layouts); fT and dpreT are this call's own
        dW1 = Factors(np.copy(dy, order="K"), fT.swapaxes(1, 2))  # u (B, n, D), v (B, n, Hm)
        dW2 = Factors(dpreT.swapaxes(1, 2), np.copy(z, order="K"))  # u (B, n, Hm), v (B, n, D)
    return dz, dW1, dW2


def forward(u, weights, groups, variant="sequential", act="gelu", agg=None):
    """The CMS over a segment (Eq. 70 sequential / Eq. 74 independent). Returns (y, cache)."""
    if variant not in ("sequential", "independent"):
        raise ValueError(f"variant must be 'sequential' or 'independent', got {variant!r}")
    if len(weights) != len(groups) or not weights:
        raise ValueError(f"weights and groups must give one entry per level, got {len(weights)} and {len(groups)}")
    caches = []
    if variant == "sequential":
        z, zT = u, None
        for (W1, W2), gr in zip(weights, groups, strict=True):
            z, c, zT = _level(z, zT, W1, W2, gr, act)  # Eq. (70)
            caches.append(c)
        return z, (variant, caches, None, None)
    agg = np.asarray(agg)
    if agg.shape != (len(weights),):
        raise ValueError(f"agg must have shape (L,) = ({len(weights)},), got {agg.shape}")
    y = np.array(u, copy=True)
    outs = []
    u = np.asarray(u)
    uT = _t(u) if u.ndim == 3 and _compiled(act, u) else None  # shared by the levels
    for l, ((W1, W2), gr) in enumerate(zip(weights, groups, strict=True)):
        m, c, _ = _level(u, uT, W1, W2, gr, act)
        caches.append(c)
        outs.append(m - u)  # (B, T, D)
        y = y + agg[l] * outs[-1]  # Eq. (74)
    return y, (variant, caches, agg, outs)


def backward(dy, cache, wanted=None):
    """Returns (du, dweights, dagg) as the reference does (``wanted``: reference/cms.py ``WANTED``,
    computed directly: a skipped level's gradients are not formed, a summed one is one product)."""
    variant, caches, agg, outs = cache
    wanted = R.check_wanted(wanted, len(caches))
    if variant == "sequential":
        dz = dy
        dweights = []
        for c, want in zip(reversed(caches), reversed(wanted), strict=True):
            dz, dW1, dW2 = level_backward(dz, c, want)
            dweights.append((dW1, dW2))
        return dz, dweights[::-1], None
    du = np.array(dy, copy=True)
    dweights = []
    dagg = np.zeros(agg.shape, dtype=np.result_type(agg, dy))
    for l, c in enumerate(caches):
        dagg[l] = np.sum(dy * outs[l])
        dm = agg[l] * dy
        dz, dW1, dW2 = level_backward(dm, c, wanted[l])
        du = du + dz - dm
        dweights.append((dW1, dW2))
    return du, dweights, dagg


__all__ = ["Factors", "Replay", "backward", "chunk_index", "factors_product", "forward", "groups_for",
           "level_backward", "level_forward", "param_shapes", "updates_at", "write", "write_factors"]
