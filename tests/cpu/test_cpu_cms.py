"""fast/cpu/cms.py vs reference/cms.py: the CMS chain, outputs and every gradient (SPEC.md#fast-cpu).

Hypothesis draws the batch, the segment's length and start (so level chunks do not divide it),
the width, the levels' hidden widths and periods, the variant, the activation and the dtype;
inputs are read-only and must stay unchanged; no call may take the reference fallback.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from tolerances import assert_close

from nlref.fast.cpu import cms as F
from nlref.fast.cpu import primitives as FP
from nlref.reference import cms as R


def _ro(a):
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@given(dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3),
       T=st.integers(1, 9), start=st.integers(0, 5), D=st.integers(1, 5),
       levels=st.lists(st.tuples(st.integers(1, 6), st.sampled_from([None, 1, 2, 3, 4])), min_size=1, max_size=3),
       variant=st.sampled_from(["sequential", "independent"]), act=st.sampled_from(["gelu", "silu"]),
       shared=st.lists(st.booleans(), min_size=3, max_size=3),
       wanted=st.none() | st.lists(st.sampled_from(R.WANTED), min_size=3, max_size=3), as_lists=st.booleans())
def test_cms_matches_reference(dtype, seed, B, T, start, D, levels, variant, act, shared, wanted, as_lists):
    """``shared[l]``: level l's weights are one (D, Hm) / (Hm, D) pair broadcast over (B, G) (stride
    0, as the model passes a frozen level). ``wanted``: the backward's choice per level (reference/cms.py
    ``WANTED``; None: every level per group): the port's sums and skips against the reference's
    per-group gradients summed or dropped, and those against the plain backward's; ``factors`` (drawn
    for a level with one group, else ``groups``): the product of the port's factors is bitwise its
    own per-group gradient, and the reference's its own. ``as_lists``: the port gets each level's
    weights as lists of per-group (B, ...) arrays (``Ops.cms_group_lists``)."""
    rng = np.random.default_rng(seed)
    u = _ro(rng.standard_normal((B, T, D)).astype(dtype))
    weights, groups = [], []
    for (hm, period), sh in zip(levels, shared, strict=False):
        gr = R.groups_for(period, start, T)
        groups.append(gr)
        lead = (1, 1) if sh else (B, len(gr))
        pair = (_ro(0.5 * rng.standard_normal(lead + (D, hm)).astype(dtype)),
                _ro(0.5 * rng.standard_normal(lead + (hm, D)).astype(dtype)))
        weights.append(tuple(np.broadcast_to(w, (B, len(gr)) + w.shape[2:]) for w in pair))
    agg = _ro(rng.standard_normal(len(levels)).astype(dtype)) if variant == "independent" else None
    up = _ro(rng.standard_normal((B, T, D)).astype(dtype))
    before = [u.copy()] + [w.copy() for pair in weights for w in pair]
    wanted = None if wanted is None else [w if w != "factors" or len(gr) == 1 else "groups"
                                          for w, gr in zip(wanted, groups, strict=False)]
    note(f"{dtype} B={B} T={T} start={start} D={D} levels={levels} {variant} {act} shared={shared} wanted={wanted}")
    fallbacks = dict(FP.FALLBACKS)
    given = [([W1[:, g] for g in range(W1.shape[1])], [W2[:, g] for g in range(W2.shape[1])]) for W1, W2 in weights]
    yf, cf = F.forward(u, given if as_lists else weights, groups, variant, act, agg)
    duf, dwf, daggf = F.backward(up, cf, wanted)
    assert FP.FALLBACKS == fallbacks, "took the reference fallback"
    yr, cr = R.forward(u, weights, groups, variant, act, agg)
    dur, dwr, daggr = R.backward(up, cr, wanted)
    dur_all, dwr_all, _ = R.backward(up, cr)
    np.testing.assert_array_equal(dur, dur_all)
    _, dwf_all, _ = F.backward(up, cf)
    for l, want in enumerate(R.check_wanted(wanted, len(levels))):
        for j, (got, full) in enumerate(zip(dwr[l], dwr_all[l], strict=True)):
            if want == "skip":
                assert got is None and dwf[l] == (None, None)
            elif want == "factors":
                assert isinstance(got, R.Factors) and isinstance(dwf[l][j], R.Factors)
                np.testing.assert_array_equal(R.factors_product(got), full[:, 0])
                np.testing.assert_array_equal(F.factors_product(dwf[l][j]), dwf_all[l][j][:, 0])
            elif want == "sum":
                assert got.shape == (1, 1) + full.shape[2:]
                np.testing.assert_array_equal(got[0, 0], full.sum(axis=(0, 1)))
            else:
                np.testing.assert_array_equal(got, full)
    dwf = [pair if not isinstance(pair[0], R.Factors) else tuple(F.factors_product(f)[:, None] for f in pair)
           for pair in dwf if pair[0] is not None]
    dwr = [pair if not isinstance(pair[0], R.Factors) else tuple(R.factors_product(f)[:, None] for f in pair)
           for pair in dwr if pair[0] is not None]
    assert yf.dtype == yr.dtype == np.dtype(dtype)
    assert_close(yf, yr, dtype, "port", "y")
    assert_close(duf, dur, dtype, "port", "du")
    for l, ((a1, a2), (b1, b2)) in enumerate(zip(dwf, dwr, strict=True)):
        assert a1.dtype == b1.dtype and a2.dtype == b2.dtype
        assert_close(a1, b1, dtype, "port", f"dW1[{l}]")
        assert_close(a2, b2, dtype, "port", f"dW2[{l}]")
    if variant == "independent":
        assert_close(daggf, daggr, dtype, "port", "dagg")
    else:
        assert daggf is None
    for a, b in zip([u] + [w for pair in weights for w in pair], before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_level_caches_are_interchangeable(rng):
    """The port's backward accepts the reference's cache (a C-ordered ``pre``) and the reference's
    backward the port's (``pre`` a view of the feature-major (B, Hm, T) array)."""
    z = rng.standard_normal((2, 5, 3))
    W1, W2 = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 4, 3))
    _, cache = R.level_forward(z, W1, W2, [(0, 2), (2, 5)])
    _, fcache = F.level_forward(z, W1, W2, [(0, 2), (2, 5)])
    assert_close(fcache[5], cache[5], "float64", "port", "pre")
    dy = rng.standard_normal(z.shape)
    for a, b in zip(F.level_backward(dy, cache), R.level_backward(dy, cache), strict=True):
        assert_close(a, b, "float64", "port")
    for a, b in zip(R.level_backward(dy, fcache), R.level_backward(dy, cache), strict=True):
        assert_close(a, b, "float64", "port")


def test_bad_input_raises_value_error():
    z = np.zeros((2, 5, 3))
    with pytest.raises(ValueError, match="W1 must have shape"):
        F.level_forward(z, np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 3)), [(0, 5)])
    with pytest.raises(ValueError, match="W2 must have shape"):
        F.level_forward(z, np.zeros((2, 1, 3, 4)), np.zeros((2, 1, 3, 3)), [(0, 5)])
    with pytest.raises(ValueError, match="groups must tile"):
        F.level_forward(z, np.zeros((2, 1, 3, 4)), np.zeros((2, 1, 4, 3)), [(0, 4)])
    with pytest.raises(ValueError, match="variant must be"):
        F.forward(z, [(np.zeros((2, 1, 3, 4)), np.zeros((2, 1, 4, 3)))], [[(0, 5)]], "nested")
    with pytest.raises(ValueError, match="agg must have shape"):
        F.forward(z, [(np.zeros((2, 1, 3, 4)), np.zeros((2, 1, 4, 3)))], [[(0, 5)]], "independent", agg=np.ones(2))
    with pytest.raises(ValueError, match="one \\(B, ...\\) array per group"):  # per-group lists (Ops.cms_group_lists)
        F.level_forward(z, [np.zeros((2, 3, 4))] * 2, [np.zeros((2, 4, 3))] * 2, [(0, 5)])
    with pytest.raises(ValueError, match="W1: every group's weights"):
        F.level_forward(z, [np.zeros((2, 3, 4)), np.zeros((2, 3, 5))], [np.zeros((2, 4, 3))] * 2, [(0, 2), (2, 5)])
    with pytest.raises(ValueError, match="W2 must have shape"):
        F.level_forward(z, [np.zeros((2, 3, 4))], [np.zeros((2, 3, 3))], [(0, 5)])
    cache = F.forward(z, [(np.zeros((2, 1, 3, 4)), np.zeros((2, 1, 4, 3)))], [[(0, 5)]])[1]
    for mod in (F, R):
        with pytest.raises(ValueError, match="wanted must give one of"):
            mod.backward(z, cache, ["sum", "sum"])
        with pytest.raises(ValueError, match="wanted must give one of"):
            mod.backward(z, cache, ["total"])
    with pytest.raises(ValueError, match="want must be one of"):
        F.level_backward(z, cache[1][0], "total")
    with pytest.raises(ValueError, match="dy must have shape"):
        F.level_backward(np.zeros((2, 4, 3)), F.level_forward(z, np.zeros((2, 1, 3, 4)), np.zeros((2, 1, 4, 3)), [(0, 5)])[1])
    two = F.level_forward(z, np.zeros((2, 2, 3, 4)), np.zeros((2, 2, 4, 3)), [(0, 2), (2, 5)])[1]
    for fn in (F.level_backward, lambda dy, c, want: R.level_backward(dy, c, want == "factors")):
        with pytest.raises(ValueError, match="factors are a one-group level's gradients; this call has 2 groups"):
            fn(z, two, "factors")


@pytest.mark.parametrize("mod", [F, R], ids=["cpu", "reference"])
def test_a_replay_rebuilds_the_writes_weights_in_order_and_out_of_order(mod, rng):
    """``Replay`` (Ops.cms_factored_writes): item g is bitwise the array the g-th chain of
    ``write_factors`` made, read in order, out of order, by iteration, and through the port's level
    (which takes it in place of the list of those arrays)."""
    B, D, Hm, G = 2, 3, 4, 6
    W0 = rng.standard_normal((B, D, Hm))
    made, replay = [W0], R.Replay(W0, 0.3, mod.write_factors)
    for _ in range(G - 1):
        Fc = R.Factors(rng.standard_normal((B, 2, D)), rng.standard_normal((B, 2, Hm)))
        made.append(mod.write_factors(made[-1], Fc, 0.3))
        replay.append(Fc)
    assert len(replay) == G
    for g in [0, 1, 2, 5, 3, 3, 0, 4]:
        np.testing.assert_array_equal(replay[g], made[g])
    for a, b in zip(replay, made, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexError):
        replay[G]
    groups = [(g, g + 1) for g in range(G)]
    zz = rng.standard_normal((B, G, D))
    W2 = [rng.standard_normal((B, Hm, D)) for _ in range(G)]
    y1, c1 = F.level_forward(zz, replay, W2, groups)
    y2, c2 = F.level_forward(zz, made, W2, groups)
    np.testing.assert_array_equal(y1, y2)
    dy = rng.standard_normal(zz.shape)
    for a, b in zip(F.level_backward(dy, c1), F.level_backward(dy, c2), strict=True):
        np.testing.assert_array_equal(a, b)


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.sampled_from(["float32", "float64"]),
       st.floats(1e-4, 2.0), st.booleans(), st.integers(0, 2**32 - 1))
def test_a_one_token_write_is_compiled_and_bitwise_the_product_then_the_write(B, p, q, dtype, eta, strided, seed):
    """``write_factors`` of a 1-token chunk (rank 1) runs one compiled pass; it is bitwise
    ``write(W, factors_product(F), eta)`` (the product's one term per element is rounded once either
    way), for strided factors too; a longer chunk's writes ``eta *`` and ``W -`` in place into the
    product, bitwise that too (W itself unchanged); mixed dtypes take ``write`` itself."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((B, p, q)).astype(dtype)
    W_before = W.copy()
    u = rng.standard_normal((B, 3 if strided else 1, p)).astype(dtype)[:, -1:]
    v = rng.standard_normal((B, 1, q)).astype(dtype)
    n = int(rng.integers(3, 18))
    u_n = rng.standard_normal((B, n, p)).astype(dtype)
    v_n = rng.standard_normal((B, 2 * n if strided else n, q)).astype(dtype)[:, ::2 if strided else 1]
    for Fc in (R.Factors(u, v), R.Factors(np.repeat(u, 2, axis=1), np.repeat(v, 2, axis=1)), R.Factors(u_n, v_n)):
        got, want = F.write_factors(W, Fc, eta), R.write(W, F.factors_product(Fc), eta)
        assert got.dtype == want.dtype == W.dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(W, W_before)
    mixed = F.write_factors(W.astype("float64"), R.Factors(u.astype("float32"), v.astype("float32")), eta)
    np.testing.assert_array_equal(mixed, R.write(W.astype("float64"), F.factors_product(R.Factors(
        u.astype("float32"), v.astype("float32"))), eta))


def test_unported_activation_falls_back_explicitly(rng):
    """An activation outside the compiled set is computed by the reference and counted."""
    z = rng.standard_normal((1, 3, 2))
    W1, W2 = rng.standard_normal((1, 1, 2, 3)), rng.standard_normal((1, 1, 3, 2))
    before = FP.FALLBACKS.get("cms.level_forward", 0)
    y, _ = F.level_forward(z, W1, W2, [(0, 3)], act="softplus")
    assert FP.FALLBACKS["cms.level_forward"] == before + 1
    np.testing.assert_array_equal(y, R.level_forward(z, W1, W2, [(0, 3)], act="softplus")[0])
