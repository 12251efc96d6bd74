"""The Continuum Memory System: a chain of MLP levels, each updated in context at its own period.

Paper: §7, Eqs. (70)-(74), arXiv 2512.24695v1. SPEC: SPEC.md#cms (processing order:
SPEC.md#hope).

Symbols (paper symbol -> code name, shape; B batch, T tokens, D width, Hm a level's hidden width,
G the number of weight groups of a call, L levels):

    x_t / o_t            u          (B, T, D)      the CMS input (the normalised residual stream)
    MLP^(f_l)            level l    z + W1 act(W2 z)
    W_1 of level l       W1         (D, Hm)  outer parameter; per sequence (B, G, D, Hm) in context
    W_2 of level l       W2         (Hm, D)  outer parameter; per sequence (B, G, Hm, D) in context
    C^(l)                period     tokens between the level's updates (None: frozen)
    eta^(l)              eta        the level's inner learning rate
    sum_t f(theta; x_t)  grad_sum   the level's summed next-token-loss gradient over its chunk
    Agg weights (Eq. 74) agg        (L,)                      the independent variant's weights
    y_t                  y          (B, T, D)

Decisions where the paper is open (each in SPEC.md#cms):
    - a level is the residual MLP z + W1 act(W2 z) (the paper's memory MLP, Eqs. 89/91), act GELU;
    - sequential variant (Eq. 70/73): z_l = M_l(z_{l-1}); independent variant (Eq. 74):
      y = u + sum_l agg_l (M_l(u) - u), agg initialised to 1;
    - a level's weights are constant inside each of its chunks and may differ per sequence: a call
      gets them as (B, G, ...) arrays, one group per chunk ``groups[g] = (start, end)``;
    - the in-context update (Eq. 71) is plain GD on the summed next-token loss of the chunk's
      tokens, applied at the end of the chunk (``write``); the model computes the gradient
      (reference/model.py), this module applies it. The outer backward treats the increments as
      constants (first order, SPEC.md#cms): ``backward`` returns per-group weight gradients and
      the caller sums them onto the initial weights.
    - the nested variant (Eq. 72) is not implemented (SPEC.md#cms).

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from . import primitives as P

# ---------------------------------------------------------------------------------------------
# Parameters and the update schedule
# ---------------------------------------------------------------------------------------------


def param_shapes(d_model: int, levels, variant: str = "sequential") -> dict[str, tuple[int, ...]]:
    """Shapes of one CMS chain's outer parameters: ``{l}.W1`` (D, Hm), ``{l}.W2`` (Hm, D), and
    ``agg`` (L,) for the independent variant."""
    shapes: dict[str, tuple[int, ...]] = {}
    for l, lv in enumerate(levels):
        shapes[f"{l}.W1"] = (d_model, lv.hidden)
        shapes[f"{l}.W2"] = (lv.hidden, d_model)
    if variant == "independent":
        shapes["agg"] = (len(levels),)
    return shapes


def groups_for(period: int | None, start: int, n: int) -> list[tuple[int, int]]:
    """Split tokens at absolute positions [start, start + n) into the level's chunks.

    Returns (s, e) slices relative to ``start``; a frozen level (period None) has one group.
    """
    if period is None or n == 0:
        return [(0, n)]
    out = []
    t = start
    while t < start + n:
        e = min((t // period + 1) * period, start + n)
        out.append((t - start, e - start))
        t = e
    return out


def chunk_index(period: int | None, position: int) -> int:
    """The index of the level's chunk that holds absolute token ``position`` (0 if frozen)."""
    return 0 if period is None else position // period


def updates_at(levels, position: int, in_context: bool = True) -> list[int]:
    """The levels whose chunk ends just before token ``position`` (position % C^(l) == 0, > 0):
    they apply their summed gradient when that token arrives (Eq. 71, SPEC.md#hope)."""
    if not in_context or position <= 0:
        return []
    return [l for l, lv in enumerate(levels) if lv.period is not None and position % lv.period == 0]


def write(W: np.ndarray, grad_sum: np.ndarray, eta: float) -> np.ndarray:
    """The in-context update of a level at the end of its chunk: theta <- theta - eta sum_t grad."""
    return W - W.dtype.type(eta) * grad_sum  # Eq. (71)


# ---------------------------------------------------------------------------------------------
# One level: y = z + W1 act(W2 z), weights constant per group and per sequence
# ---------------------------------------------------------------------------------------------


def _act(name: str) -> tuple[Callable, Callable]:
    f, df, _ = P.ACTIVATIONS[name]
    return f, df


def check_level(z, W1, W2, groups):
    """Validate one level's z (B, T, D), W1, W2 (B, G, ...) over ``groups``; return z as an array.
    Public: the CPU port uses it (fast/cpu/cms.py)."""
    z = np.asarray(z)
    if z.ndim != 3 or z.dtype.kind not in "fc":
        raise ValueError(f"z must be a float array of shape (B, T, D), got {z.dtype} {z.shape}")
    Bn, T, D = z.shape
    G = len(groups)
    if W1.ndim != 4 or W1.shape[:3] != (Bn, G, D):
        raise ValueError(f"W1 must have shape (B, G, D, Hm) = ({Bn}, {G}, {D}, Hm), got {W1.shape}")
    Hm = W1.shape[3]
    if W2.shape != (Bn, G, Hm, D):
        raise ValueError(f"W2 must have shape (B, G, Hm, D) = {(Bn, G, Hm, D)}, got {W2.shape}")
    if groups[0][0] != 0 or groups[-1][1] != T or any(a[1] != b[0] for a, b in zip(groups, groups[1:], strict=False)):
        raise ValueError(f"groups must tile [0, {T}) in order, got {groups}")
    return z


def level_forward(z, W1, W2, groups, act="gelu"):
    """MLP^(f_l)(z) = z + W1 act(W2 z) with the weights of group g on tokens groups[g].

    z (B, T, D); W1 (B, G, D, Hm); W2 (B, G, Hm, D) (use np.broadcast_to for shared weights).
    Returns (y, cache).
    """
    z = check_level(z, W1, W2, groups)
    f, _ = _act(act)
    pre = np.empty(z.shape[:2] + (W1.shape[3],), dtype=np.result_type(z, W1))  # (B, T, Hm)
    y = np.empty(z.shape, dtype=pre.dtype)  # (B, T, D)
    for g, (s, e) in enumerate(groups):
        pre[:, s:e] = np.einsum("btd,bhd->bth", z[:, s:e], W2[:, g], optimize=True)  # W2 z
        y[:, s:e] = z[:, s:e] + np.einsum("bth,bdh->btd", f(pre[:, s:e]), W1[:, g], optimize=True)  # Eq. (70)
    return y, (z, W1, W2, tuple(groups), act, pre)


class Factors(NamedTuple):
    """A level's weight gradient over one group kept as its per-token factors (``WANTED``
    ``factors``): dW[b] = sum_t u[b, t] v[b, t]^T, u (B, n, out), v (B, n, in) (dW1: u = dy,
    v = act(pre); dW2: u = dpre, v = z). n (out + in) numbers per sequence instead of out x in: a
    1-token chunk's write is rank 1 (SPEC.md#cms "Factored writes")."""

    u: np.ndarray
    v: np.ndarray


def factors_product(F: Factors) -> np.ndarray:
    """The gradient (B, out, in) that ``F`` stands for: sum_t u_t v_t^T per sequence."""
    return np.einsum("btu,btv->buv", F.u, F.v, optimize=True)


def write_factors(W: np.ndarray, F: Factors, eta: float) -> np.ndarray:
    """``write`` with the chunk's summed gradient given as its factors (Eq. 71)."""
    return write(W, factors_product(F), eta)


def level_backward(dy, cache, factors=False):
    """Returns (dz (B, T, D), dW1 (B, G, D, Hm), dW2 (B, G, Hm, D)): per-group, per-sequence.
    ``factors`` (a call with one group): dW1 and dW2 as that group's ``Factors`` instead."""
    z, W1, W2, groups, act, pre = cache
    f, df = _act(act)
    dy = np.asarray(dy)
    if dy.shape != z.shape:
        raise ValueError(f"dy must have shape (B, T, D) = {z.shape}, got {dy.shape}")
    if factors and len(groups) != 1:
        raise ValueError(f"factors are a one-group level's gradients; this call has {len(groups)} groups")
    dz = dy.copy()  # (B, T, D): the residual path
    dW1 = np.zeros(W1.shape, dtype=pre.dtype)
    dW2 = np.zeros(W2.shape, dtype=pre.dtype)
    for g, (s, e) in enumerate(groups):
        a = f(pre[:, s:e])  # (B, n, Hm)
        F1 = Factors(dy[:, s:e], a)
        dW1[:, g] = factors_product(F1)  # sum_t dy_t act(pre_t)^T
        dpre = np.einsum("btd,bdh->bth", dy[:, s:e], W1[:, g], optimize=True) * df(pre[:, s:e])  # (B, n, Hm)
        F2 = Factors(dpre, z[:, s:e])
        dW2[:, g] = factors_product(F2)  # sum_t dpre_t z_t^T
        dz[:, s:e] += np.einsum("bth,bhd->btd", dpre, W2[:, g], optimize=True)
    if factors:  # dy and z are the caller's arrays: the kept factors get copies
        return dz, F1._replace(u=F1.u.copy()), F2._replace(v=F2.v.copy())
    return dz, dW1, dW2


class Replay:
    """The weights in force per chunk of a level, kept as its first weights and each write's
    ``Factors`` (``Ops.cms_factored_writes``, SPEC.md#cms "Factored writes"): item g is W_0 after
    the first g writes, rebuilt by the backend's ``write_factors`` in order, the same arrays as the
    writes made. Reading the items in order costs one write each; an earlier item than the last read
    starts again from W_0. Holds n (out + in) numbers per write instead of each chunk's weights."""

    def __init__(self, W0, eta: float, write_factors):
        self.W0, self.eta, self.step = W0, eta, write_factors
        self.writes: list[Factors] = []
        self._g, self._W = 0, W0

    def append(self, F: Factors) -> None:
        self.writes.append(F)

    def __len__(self) -> int:
        return 1 + len(self.writes)

    def __getitem__(self, g: int):
        if not 0 <= g < len(self):
            raise IndexError(f"group {g} of {len(self)}")
        if g < self._g:
            self._g, self._W = 0, self.W0
        while self._g < g:
            self._W = self.step(self._W, self.writes[self._g], self.eta)
            self._g += 1
        return self._W

    def __iter__(self):
        W = self.W0
        yield W
        for F in self.writes:
            W = self.step(W, F, self.eta)
            yield W


# ---------------------------------------------------------------------------------------------
# The chain: sequential (Eqs. 70, 73) or independent (Eq. 74)
# ---------------------------------------------------------------------------------------------


def forward(u, weights, groups, variant="sequential", act="gelu", agg=None):
    """The CMS over a segment. ``weights[l] = (W1, W2)`` of shapes (B, G_l, D, Hm_l),
    (B, G_l, Hm_l, D); ``groups[l]`` tiles the segment into level l's chunks.

    sequential:  y = M_L(... M_1(u))                                   # Eq. (70)
    independent: y = u + sum_l agg_l (M_l(u) - u)                       # Eq. (74)
    Returns (y, cache).
    """
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
        outs.append(m - u)  # (B, T, D): level l's MLP part
        y = y + agg[l] * outs[-1]  # Eq. (74)
    return y, (variant, caches, agg, outs)


WANTED = ("groups", "sum", "skip", "factors")
"""What ``backward(..., wanted)`` returns for a level's weights: ``groups`` (dW1, dW2) per group and
sequence (B, G, ...); ``sum`` their sum over the sequences and groups, shape (1, 1, ...) (the outer
gradient of the initial weights, SPEC.md#cms); ``skip`` (None, None), not computed (a write's
re-run needs only the due levels' gradients); ``factors`` (a level with one group) its ``Factors``
(``Ops.cms_factored_writes``). A port computes the sum and the skip directly."""


def check_wanted(wanted, n_levels: int) -> list[str]:
    """``wanted`` as a list of one WANTED entry per level (None: every level ``groups``)."""
    if wanted is None:
        return ["groups"] * n_levels
    wanted = list(wanted)
    if len(wanted) != n_levels or any(w not in WANTED for w in wanted):
        raise ValueError(f"wanted must give one of {WANTED} per level ({n_levels}), got {wanted}")
    return wanted


def as_wanted(dW1, dW2, want):
    """A level's per-group (dW1, dW2) as ``want`` (a WANTED entry) asks: the reference's statement
    of what a port computes directly (the CPU port's fallback uses it)."""
    if want == "skip":
        return None, None
    if want == "sum":
        return dW1.sum(axis=(0, 1), keepdims=True), dW2.sum(axis=(0, 1), keepdims=True)
    return dW1, dW2  # groups, or the factors level_backward returned


def backward(dy, cache, wanted=None):
    """Returns (du, dweights, dagg): dweights[l] = (dW1, dW2) per group and sequence (the caller
    sums them onto the initial weights, SPEC.md#cms), or as ``wanted[l]`` asks (see ``WANTED``:
    the reference computes every gradient and then sums or drops it); dagg is None for the
    sequential variant."""
    variant, caches, agg, outs = cache
    wanted = check_wanted(wanted, len(caches))
    if variant == "sequential":
        dz = dy
        dweights = []
        for c, want in zip(reversed(caches), reversed(wanted), strict=True):
            dz, dW1, dW2 = level_backward(dz, c, want == "factors")
            dweights.append(as_wanted(dW1, dW2, want))
        return dz, dweights[::-1], None
    du = np.array(dy, copy=True)
    dweights = []
    dagg = np.zeros(agg.shape, dtype=np.result_type(agg, dy))
    for l, c in enumerate(caches):
        dagg[l] = np.sum(dy * outs[l])
        dm = agg[l] * dy
        dz, dW1, dW2 = level_backward(dm, c, wanted[l] == "factors")
        du = du + dz - dm  # the level's residual z is subtracted in (M_l(u) - u)
        dweights.append(as_wanted(dW1, dW2, wanted[l]))
    return du, dweights, dagg


# ---------------------------------------------------------------------------------------------
# A standalone in-context driver (used by the tests and as the plainest statement of Eq. 71)
# ---------------------------------------------------------------------------------------------


def in_context_forward(u, params, levels, dloss_dy, variant="sequential", act="gelu"):
    """Run the CMS over u (B, T, D) token chunk by token chunk with in-context updates.

    ``params``: the outer weights ``{l}.W1``, ``{l}.W2`` (and ``agg``). ``dloss_dy(y_chunk, s, e)``
    returns the gradient of the summed per-token loss of tokens [s, e) with respect to the
    chunk's outputs (B, e - s, D). The processing chunk is the shortest period; each level sums
    the gradients over its own chunk and applies ``write`` at its end (Eq. 71). That sum is the
    gradient of the level's own chunk's loss (SPEC.md#cms, spec 0.2) because here nothing crosses
    tokens: the chain is token-wise and the loss is a sum over processing chunks (the language
    model, whose attention and memory layers do cross tokens, re-runs each level's chunk instead:
    reference/model.py). Returns (y (B, T, D), final per-sequence weights {key: (B, ...)}).
    """
    Bn, T, D = u.shape
    periods = [lv.period for lv in levels if lv.period is not None]
    C = min(periods) if periods else T
    W = {}
    acc = {}
    for l in range(len(levels)):
        for name in ("W1", "W2"):
            W[f"{l}.{name}"] = np.broadcast_to(params[f"{l}.{name}"], (Bn,) + params[f"{l}.{name}"].shape).copy()
            acc[f"{l}.{name}"] = np.zeros_like(W[f"{l}.{name}"])
    ys = []
    for s in range(0, T, C):
        e = min(s + C, T)
        weights = [(W[f"{l}.W1"][:, None], W[f"{l}.W2"][:, None]) for l in range(len(levels))]
        groups = [[(0, e - s)] for _ in levels]
        y, cache = forward(u[:, s:e], weights, groups, variant, act, params.get("agg"))
        ys.append(y)
        _, dweights, _ = backward(dloss_dy(y, s, e), cache)
        for l, lv in enumerate(levels):
            if lv.period is None:
                continue
            acc[f"{l}.W1"] += dweights[l][0][:, 0]
            acc[f"{l}.W2"] += dweights[l][1][:, 0]
            if e % lv.period == 0:
                for name in ("W1", "W2"):
                    W[f"{l}.{name}"] = write(W[f"{l}.{name}"], acc[f"{l}.{name}"], lv.eta)  # Eq. (71)
                    acc[f"{l}.{name}"] = np.zeros_like(acc[f"{l}.{name}"])
    return np.concatenate(ys, axis=1), W
