"""The Continuum Memory System (reference/cms.py): gradients, level semantics, bad input.

SPEC.md#cms. The model-level CMS semantics (in-context updates inside the language model) are in
tests/reference/test_model.py.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref.config import CMSLevel
from nlref.reference import cms
from nlref.reference import primitives as P
from nlref.reference.cases import cms as cms_cases
from nlref.reference.gradcheck import check_gradients


def _params(rng, D, hidden, variant="sequential", scale=0.5):
    p = {}
    for l, h in enumerate(hidden):
        p[f"{l}.W1"] = scale * rng.standard_normal((D, h))
        p[f"{l}.W2"] = scale * rng.standard_normal((h, D))
    if variant == "independent":
        p["agg"] = rng.standard_normal(len(hidden))
    return p


def _shared(p, l, B, G=1):
    return tuple(np.broadcast_to(p[f"{l}.{n}"], (B, G) + p[f"{l}.{n}"].shape) for n in ("W1", "W2"))


def _mlp(z, W1, W2):
    """The oracle: z + W1 gelu(W2 z), written directly (no cms code)."""
    return z + np.einsum("dh,bth->btd", W1, P.gelu(np.einsum("hd,btd->bth", W2, z)))


@pytest.mark.parametrize("name", sorted(cms_cases.GRADCHECKS))
def test_registered_gradchecks(name, rng):
    loss, inputs, grads = cms_cases.GRADCHECKS[name](rng)
    errors = check_gradients(loss, inputs, grads, rng)
    assert max(errors.values()) <= tol("float64", "gradcheck"), errors


@given(
    B=st.integers(1, 2), T=st.integers(1, 6), D=st.integers(1, 3), start=st.integers(0, 5),
    periods=st.lists(st.sampled_from([None, 1, 2, 3]), min_size=1, max_size=3),
    variant=st.sampled_from(["sequential", "independent"]), seed=st.integers(0, 2**16),
)
def test_gradients_property(B, T, D, start, periods, variant, seed):
    """Per-group, per-sequence weight gradients and the input gradient agree with central
    differences for random shapes, segment offsets and periods (the groups a call gets)."""
    rng = np.random.default_rng(seed)
    groups = [cms.groups_for(p, start, T) for p in periods]
    inputs = {"u": rng.standard_normal((B, T, D))}
    for l, gr in enumerate(groups):
        inputs[f"{l}.W1"] = 0.7 * rng.standard_normal((B, len(gr), D, 2))
        inputs[f"{l}.W2"] = 0.7 * rng.standard_normal((B, len(gr), 2, D))
    if variant == "independent":
        inputs["agg"] = rng.standard_normal(len(periods))
    up = rng.standard_normal((B, T, D))

    def fwd(a):
        return cms.forward(a["u"], [(a[f"{l}.W1"], a[f"{l}.W2"]) for l in range(len(periods))], groups,
                           variant, "gelu", a.get("agg"))

    _, cache = fwd(inputs)
    du, dw, dagg = cms.backward(up, cache)
    grads = {"u": du} | {f"{l}.W{j + 1}": dw[l][j] for l in range(len(periods)) for j in range(2)}
    if dagg is not None:
        grads["agg"] = dagg
    errors = check_gradients(lambda a: np.sum(fwd(a)[0] * up), inputs, grads, rng)
    assert max(errors.values()) <= tol("float64", "gradcheck"), errors


def test_groups_count_tokens():
    assert cms.groups_for(4, 0, 10) == [(0, 4), (4, 8), (8, 10)]
    assert cms.groups_for(4, 3, 6) == [(0, 1), (1, 5), (5, 6)]  # absolute positions 3 | 4..7 | 8
    assert cms.groups_for(None, 3, 6) == [(0, 6)]
    assert cms.updates_at([CMSLevel(2, 2), CMSLevel(2, 4), CMSLevel(2)], 8) == [0, 1]
    assert cms.updates_at([CMSLevel(2, 2), CMSLevel(2, 4), CMSLevel(2)], 6) == [0]
    assert cms.updates_at([CMSLevel(2, 2)], 0) == []
    assert cms.updates_at([CMSLevel(2, 2)], 4, in_context=False) == []


def test_frozen_level_is_a_static_mlp(rng):
    """A level with no period is exactly z + W1 gelu(W2 z), and stays so in context."""
    B, T, D = 2, 7, 3
    levels = (CMSLevel(4), CMSLevel(5))
    p = _params(rng, D, (4, 5))
    u = rng.standard_normal((B, T, D))
    oracle = _mlp(_mlp(u, p["0.W1"], p["0.W2"]), p["1.W1"], p["1.W2"])
    y, _ = cms.forward(u, [_shared(p, 0, B), _shared(p, 1, B)], [[(0, T)], [(0, T)]])
    assert_close(y, oracle, "float64", "rewrite", "static chain")
    y_ic, W = cms.in_context_forward(u, p, levels, lambda y, s, e: np.ones_like(y))
    assert_close(y_ic, oracle, "float64", "rewrite", "in-context driver with frozen levels")
    for key in ("0.W1", "1.W2"):
        assert np.array_equal(W[key][0], p[key])


def _online_gd_oracle(u, W1, W2, target, eta):
    """Token by token: y_t = z + W1 gelu(W2 z) with the current weights, then one GD step on
    0.5 ||y_t - target_t||^2 with hand-derived gradients (no cms code)."""
    B, T, D = u.shape
    W1 = np.broadcast_to(W1, (B,) + W1.shape).copy()
    W2 = np.broadcast_to(W2, (B,) + W2.shape).copy()
    ys = []
    for t in range(T):
        z = u[:, t]  # (B, D)
        pre = np.einsum("bhd,bd->bh", W2, z)
        a = P.gelu(pre)
        y = z + np.einsum("bdh,bh->bd", W1, a)
        ys.append(y)
        r = y - target[:, t]  # dloss/dy
        g1 = np.einsum("bd,bh->bdh", r, a)
        g2 = np.einsum("bh,bd->bhd", np.einsum("bdh,bd->bh", W1, r) * P.dgelu(pre), z)
        W1, W2 = W1 - eta * g1, W2 - eta * g2
    return np.stack(ys, axis=1), W1, W2


@given(B=st.integers(1, 3), T=st.integers(1, 7), D=st.integers(1, 3), eta=st.floats(0.0, 0.5),
       seed=st.integers(0, 2**16))
def test_period_one_is_online_gradient_descent(B, T, D, eta, seed):
    rng = np.random.default_rng(seed)
    p = _params(rng, D, (3,))
    u = rng.standard_normal((B, T, D))
    target = rng.standard_normal((B, T, D))
    y, W = cms.in_context_forward(u, p, (CMSLevel(3, period=1, eta=eta),),
                                  lambda y, s, e: y - target[:, s:e])
    y_ref, W1_ref, W2_ref = _online_gd_oracle(u, p["0.W1"], p["0.W2"], target, eta)
    assert_close(y, y_ref, "float64", "rewrite", "outputs")
    assert_close(W["0.W1"], W1_ref, "float64", "rewrite", "W1")
    assert_close(W["0.W2"], W2_ref, "float64", "rewrite", "W2")


@given(period=st.integers(1, 4), T=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_updates_at_token_boundaries(period, T, seed):
    """Outputs before the first boundary are the static MLP's; the weights change exactly once per
    completed period, by eta times the summed gradient of that chunk's tokens."""
    rng = np.random.default_rng(seed)
    B, D = 2, 2
    p = _params(rng, D, (3,))
    u = rng.standard_normal((B, T, D))
    target = rng.standard_normal((B, T, D))
    level = CMSLevel(3, period=period, eta=0.3)
    y, W = cms.in_context_forward(u, p, (level,), lambda y, s, e: y - target[:, s:e])
    static = _mlp(u, p["0.W1"], p["0.W2"])
    first = min(period, T)
    assert_close(y[:, :first], static[:, :first], "float64", "rewrite", "first chunk")
    if T >= period:  # at least one completed chunk: the weights moved
        assert not np.allclose(W["0.W1"], p["0.W1"])
    else:
        assert np.array_equal(W["0.W1"], np.broadcast_to(p["0.W1"], W["0.W1"].shape))
    if T >= period:  # one chunk by hand: the summed gradient at the chunk-start weights
        z = u[:, :period]  # (B, C, D)
        pre = np.einsum("hd,btd->bth", p["0.W2"], z)
        r = static[:, :period] - target[:, :period]  # dloss/dy of the chunk's tokens
        g1 = np.einsum("btd,bth->bdh", r, P.gelu(pre))
        g2 = np.einsum("bth,btd->bhd", np.einsum("dh,btd->bth", p["0.W1"], r) * P.dgelu(pre), z)
        W1_after, W2_after = p["0.W1"] - 0.3 * g1, p["0.W2"] - 0.3 * g2  # (B, ., .)
        if T < 2 * period:
            assert_close(W["0.W1"], W1_after, "float64", "rewrite", "W1 after one chunk")
            assert_close(W["0.W2"], W2_after, "float64", "rewrite", "W2 after one chunk")
        if T > period:  # the first token after the boundary reads the updated weights
            z1 = u[:, period]  # (B, D)
            y1 = z1 + np.einsum("bdh,bh->bd", W1_after, P.gelu(np.einsum("bhd,bd->bh", W2_after, z1)))
            assert_close(y[:, period], y1, "float64", "rewrite", "first token after the boundary")


@given(B=st.integers(2, 4), seed=st.integers(0, 2**16), variant=st.sampled_from(["sequential", "independent"]))
def test_no_information_crosses_sequences(B, seed, variant):
    rng = np.random.default_rng(seed)
    T, D = 6, 2
    levels = (CMSLevel(3, period=1, eta=0.2), CMSLevel(2, period=2, eta=0.1), CMSLevel(2))
    p = _params(rng, D, (3, 2, 2), variant)
    u = rng.standard_normal((B, T, D))
    target = rng.standard_normal((B, T, D))
    perm = rng.permutation(B)
    y, W = cms.in_context_forward(u, p, levels, lambda y, s, e: y - target[:, s:e], variant)
    yp, Wp = cms.in_context_forward(u[perm], p, levels, lambda y, s, e: y - target[perm][:, s:e], variant)
    assert_close(yp, y[perm], "float64", "rewrite", "permuted outputs")
    for key in W:
        assert_close(Wp[key], W[key][perm], "float64", "rewrite", key)


def test_write_is_eq71():
    W = np.arange(6.0).reshape(2, 3)
    g = np.ones((2, 3))
    assert np.array_equal(cms.write(W, g, 0.0), W)
    assert np.array_equal(cms.write(W, g, 0.5), W - 0.5)
    assert cms.write(W.astype(np.float32), g.astype(np.float32), 0.1).dtype == np.float32


def test_dtypes_and_no_mutation(rng):
    B, T, D = 2, 5, 3
    for dtype in (np.float32, np.float64):
        p = {k: v.astype(dtype) for k, v in _params(rng, D, (4,)).items()}
        u = rng.standard_normal((B, T, D)).astype(dtype)
        u0, p0 = u.copy(), {k: v.copy() for k, v in p.items()}
        w = _shared(p, 0, B)
        y, cache = cms.forward(u, [w], [[(0, T)]])
        du, dw, _ = cms.backward(np.ones_like(y), cache)
        assert y.dtype == dtype and du.dtype == dtype and dw[0][0].dtype == dtype
        assert np.array_equal(u, u0) and all(np.array_equal(p[k], p0[k]) for k in p)
        y_ic, _ = cms.in_context_forward(u, p, (CMSLevel(4, 2, 0.1),), lambda y, s, e: y)
        assert y_ic.dtype == dtype and np.array_equal(u, u0)


def test_bad_input(rng):
    B, T, D = 2, 4, 3
    p = _params(rng, D, (4,))
    u = rng.standard_normal((B, T, D))
    W1, W2 = _shared(p, 0, B)
    with pytest.raises(ValueError, match=r"z must be a float array of shape \(B, T, D\)"):
        cms.level_forward(u[0], W1, W2, [(0, T)])
    with pytest.raises(ValueError, match=r"W1 must have shape \(B, G, D, Hm\)"):
        cms.level_forward(u, W1[:, :, :2], W2, [(0, T)])
    with pytest.raises(ValueError, match=r"W2 must have shape \(B, G, Hm, D\)"):
        cms.level_forward(u, W1, W2[:, :, :2], [(0, T)])
    with pytest.raises(ValueError, match="groups must tile"):
        cms.level_forward(u, W1, W2, [(0, T - 1)])
    with pytest.raises(ValueError, match="variant must be"):
        cms.forward(u, [(W1, W2)], [[(0, T)]], variant="nested")
    with pytest.raises(ValueError, match=r"agg must have shape \(L,\)"):
        cms.forward(u, [(W1, W2)], [[(0, T)]], variant="independent", agg=np.ones(2))
    with pytest.raises(ValueError, match="z must be a float"):
        cms.level_forward(u.astype(np.int64), W1, W2, [(0, T)])
