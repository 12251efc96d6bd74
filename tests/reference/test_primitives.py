"""Tests of reference/primitives.py (SPEC.md#primitives).

Every backward: float64 central differences, complex step and the dot-product test, as
hypothesis properties over random sizes and values. Then the properties the SPEC pins: causality
of attention (also over a KV cache), softmax attention as the weighted l2-regression optimum of
NL Eqs. (62)-(63), conv1d state carrying at every split, RoPE's pairing, norm preservation and
relative-position property, stable softmax / cross-entropy, bad input, dtype preservation, no
mutation and no aliasing of inputs.
"""

import re

import numpy as np
import pytest
from cases_reference import primitive_calls as _calls
from cases_reference import primitive_run as _run
from hypothesis import given, note
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref.reference import primitives as P
from nlref.reference.cases import primitives as P_cases
from nlref.reference.gradcheck import check_gradients, numerical_gradient, rel_error

SEEDS = st.integers(0, 2**32 - 1)
small = st.integers(1, 3)


@st.composite
def _attention_sizes(draw):
    causal = draw(st.booleans())
    tq = draw(small)
    tk = tq + draw(st.integers(0, 2)) if causal else draw(small)
    return {
        "b": draw(st.integers(1, 2)),
        "h": draw(st.integers(1, 2)),
        "tq": tq,
        "tk": tk,
        "dh": draw(small),
        "dv": draw(small),
        "causal": causal,
    }


@st.composite
def _window_attention_sizes(draw):
    tq = draw(small)
    tk = tq + draw(st.integers(0, 3))
    return {"b": draw(st.integers(1, 2)), "h": draw(st.integers(1, 2)), "tq": tq, "tk": tk, "dh": draw(small),
            "dv": draw(small), "window": draw(st.integers(1, 4)), "persistent": draw(st.integers(0, tk))}


SIZES = {
    "primitives.sigmoid": st.fixed_dictionaries({"n": small, "d": small}),
    "primitives.silu": st.fixed_dictionaries({"n": small, "d": small}),
    "primitives.gelu": st.fixed_dictionaries({"n": small, "d": small}),
    "primitives.softplus": st.fixed_dictionaries({"n": small, "d": small}),
    "primitives.linear": st.fixed_dictionaries({"n": small, "d": small, "f": small, "bias": st.booleans()}),
    "primitives.embedding": st.fixed_dictionaries(
        {"n": small, "t": small, "v": st.integers(1, 5), "d": small}
    ),
    "primitives.rmsnorm": st.fixed_dictionaries({"n": small, "d": st.integers(2, 5)}),
    "primitives.layernorm": st.fixed_dictionaries(
        {"n": small, "d": st.integers(3, 5), "affine": st.booleans()}
    ),
    # Norms over D = 1 (y ~ sign(x)) or LayerNorm over D = 2 (xhat = +-1) are left out: there the
    # true gradient is O(eps), so both the central difference (cancellation in f) and the backward
    # formula (1 - y^2) lose ~10 digits (measured rel. errors 2e-4 and 6e-10).
    "primitives.l2norm": st.fixed_dictionaries({"n": small, "d": st.integers(2, 5)}),
    "primitives.swiglu": st.fixed_dictionaries({"n": small, "d": small, "f": small}),
    "primitives.conv1d": st.fixed_dictionaries(
        {
            "n": st.integers(1, 2),
            "t": st.integers(1, 5),
            "d": small,
            "k": st.integers(1, 4),
            "bias": st.booleans(),
            "state": st.booleans(),
        }
    ),
    "primitives.rope": st.fixed_dictionaries(
        {"n": small, "t": small, "half": small, "offset": st.integers(-3, 50)}
    ),
    "primitives.softmax": st.fixed_dictionaries(
        {"n": small, "d": st.integers(1, 5), "axis": st.sampled_from([0, -1])}
    ),
    "primitives.attention": _attention_sizes(),
    "primitives.attention_window": _window_attention_sizes(),
    "primitives.cross_entropy": st.fixed_dictionaries({"n": small, "t": small, "v": st.integers(1, 5)}),
}


def test_every_op_has_a_gradcheck_and_a_size_strategy():
    assert set(SIZES) == set(P_cases.GRADCHECKS)
    for name in [
        "linear",
        "embedding",
        "rmsnorm",
        "layernorm",
        "sigmoid",
        "silu",
        "gelu",
        "softplus",
        "swiglu",
        "conv1d",
        "l2norm",
        "rope",
        "softmax",
        "attention",
        "cross_entropy",
    ]:
        assert f"primitives.{name}" in P_cases.GRADCHECKS


@pytest.mark.parametrize("name", sorted(P_cases.GRADCHECKS))
@given(data=st.data())
def test_backward_matches_finite_differences_and_dot_product(name, data):
    sizes = data.draw(SIZES[name], label="sizes")
    seed = data.draw(SEEDS, label="seed")
    loss, inputs, grads = P_cases.GRADCHECKS[name](np.random.default_rng(seed), **sizes)
    errors = check_gradients(loss, inputs, grads, np.random.default_rng(seed + 1))
    note(f"central/dot errors: {errors}")
    assert max(errors.values()) <= tol("float64", "gradcheck"), errors
    # Every primitive is analytic on its complex path, so the complex step is exact to rounding.
    exact = numerical_gradient(loss, inputs, keys=list(grads), method="complex")
    cs = {k: rel_error(np.asarray(grads[k], dtype=np.float64), exact[k]) for k in grads}
    note(f"complex-step errors: {cs}")
    assert max(cs.values()) <= tol("float64", "complex_step"), cs


def test_default_gradchecks_pass_and_are_fast(rng):
    for name, make in P_cases.GRADCHECKS.items():
        loss, inputs, grads = make(rng)
        calls = []
        errors = check_gradients(lambda x, loss=loss, calls=calls: calls.append(1) or loss(x), inputs, grads, rng)
        # "fast" as work, not wall-clock time (which depends on the machine's load): `nested-learning
        # check` runs every registered case, so each stays small (most today: 86 evaluations)
        assert len(calls) <= 100, f"{name}: {len(calls)} loss evaluations"
        assert max(errors.values()) <= tol("float64", "gradcheck"), (name, errors)


def test_a_wrong_backward_is_caught(rng):
    loss, inputs, grads = P_cases.GRADCHECKS["primitives.attention"](rng)
    grads = dict(grads, k=grads["k"] * 1.001)
    errors = check_gradients(loss, inputs, grads, rng)
    assert errors["k"] > 1e-4 and errors["<dot>"] > 1e-5


# ---------------------------------------------------------------------------------------------
# Activations: the derivative triples agree with the complex step of the function.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(P.ACTIVATIONS))
@given(seed=SEEDS)
def test_activation_triples_are_consistent(name, seed):
    f, df, d2f = P.ACTIVATIONS[name]
    x = 3.0 * np.random.default_rng(seed).standard_normal(7)
    h = 1e-30
    assert_close(df(x), np.imag(f(x + 1j * h)) / h, "float64", "complex_step", f"d{name}")
    assert_close(d2f(x), np.imag(df(x + 1j * h)) / h, "float64", "complex_step", f"d2{name}")


@pytest.mark.parametrize("name", sorted(P.ACTIVATIONS))
def test_activations_are_finite_at_extremes(name):
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for fn in P.ACTIVATIONS[name]:
            assert np.all(np.isfinite(fn(x)))


def test_activation_reference_values():
    assert_close(P.silu(np.array([1.0])), [1.0 / (1.0 + np.exp(-1.0))], "float64", "rewrite")
    assert_close(P.gelu(np.array([1.0])), [0.8413447460685429], "float64", "rewrite")  # Phi(1)
    assert_close(P.softplus(np.array([0.0, 800.0])), [np.log(2.0), 800.0], "float64", "rewrite")


# ---------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------


def _qkv(rng, b=2, h=2, tq=4, tk=4, dh=3, dv=2):
    return (
        rng.standard_normal((b, h, tq, dh)),
        rng.standard_normal((b, h, tk, dh)),
        rng.standard_normal((b, h, tk, dv)),
    )


@given(seed=SEEDS, t=st.integers(2, 6), extra=st.integers(0, 3), data=st.data())
def test_causal_attention_ignores_future_keys_and_values(seed, t, extra, data):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, tq=t, tk=t + extra)
    y, _ = P.attention_forward(q, k, v)
    j = data.draw(st.integers(1, t - 1), label="first changed query")  # key index extra + j
    k2, v2 = k.copy(), v.copy()
    k2[:, :, extra + j :] = rng.standard_normal(k2[:, :, extra + j :].shape)
    v2[:, :, extra + j :] = rng.standard_normal(v2[:, :, extra + j :].shape)
    y2, _ = P.attention_forward(q, k2, v2)
    np.testing.assert_array_equal(y2[:, :, :j], y[:, :, :j])
    assert not np.allclose(y2[:, :, j:], y[:, :, j:])


@given(seed=SEEDS, t=st.integers(1, 6), data=st.data())
def test_attention_with_kv_cache_equals_full_causal_pass(seed, t, data):
    """Queries of the last tq tokens against all keys == the last tq rows of the full pass."""
    q, k, v = _qkv(np.random.default_rng(seed), tq=t, tk=t)
    tq = data.draw(st.integers(1, t), label="tq")
    y_full, _ = P.attention_forward(q, k, v)
    y_tail, _ = P.attention_forward(q[:, :, t - tq :], k, v)
    assert_close(y_tail, y_full[:, :, t - tq :], "float64", "rewrite", "kv-cache attention")


@given(seed=SEEDS, tq=st.integers(1, 4), tk=st.integers(1, 5), causal=st.booleans())
def test_attention_is_weighted_l2_optimum(seed, tq, tk, causal):
    """NL Eqs. (62)-(63): y(q) = argmin_M sum_i s(k_i, q) ||v_i - M||^2 with s = exp(scale q.k_i).

    Checked three ways per query: the closed form (explicit loop, no stabilising shift), the
    gradient of the objective vanishing at y, and y beating random perturbations.
    """
    if causal and tk < tq:
        tk = tq
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, b=1, h=2, tq=tq, tk=tk, dh=3, dv=2)
    scale = 0.7
    y, _ = P.attention_forward(q, k, v, causal=causal, scale=scale)
    for h in range(2):
        for t in range(tq):
            visible = range(tk - tq + t + 1) if causal else range(tk)
            s = np.array([np.exp(scale * q[0, h, t] @ k[0, h, i]) for i in visible])  # s(k_i, q)
            vs = v[0, h, list(visible)]  # (n, dv)
            M = y[0, h, t]

            def objective(M, s=s, vs=vs):
                return float(np.sum(s * np.sum((vs - M) ** 2, axis=-1)))  # Eq. (62)

            closed = (s[:, None] * vs).sum(0) / s.sum()  # Eq. (63)
            assert_close(M, closed, "float64", "rewrite", "Nadaraya-Watson closed form")
            grad = -2.0 * np.sum(s[:, None] * (vs - M), axis=0)  # d objective / dM
            assert np.max(np.abs(grad)) <= 1e-12 * max(1.0, float(np.sum(s[:, None] * np.abs(vs))))
            for _ in range(3):
                assert objective(M) < objective(M + 1e-3 * rng.standard_normal(M.shape))


def test_non_causal_attention_sees_every_key(rng):
    q, k, v = _qkv(rng, tq=3, tk=5)
    y, _ = P.attention_forward(q, k, v, causal=False)
    v2 = v.copy()
    v2[:, :, -1] += 1.0
    y2, _ = P.attention_forward(q, k, v2, causal=False)
    assert np.all(np.abs(y2 - y) > 0)


def test_attention_is_stable_for_large_scores(rng):
    q, k, v = _qkv(rng)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, _ = P.attention_forward(1e3 * q, k, v)
    assert np.all(np.isfinite(y))


# ---------------------------------------------------------------------------------------------
# Causal depthwise conv1d: explicit oracle and state carrying.
# ---------------------------------------------------------------------------------------------


def _conv_oracle(x, w, b, state):
    Bn, T, D = x.shape
    K = w.shape[1]
    y = np.zeros_like(x)
    for bi in range(Bn):
        for t in range(T):
            for j in range(K):
                src = t - (K - 1) + j  # w[:, K-1] multiplies token t
                if src >= 0:
                    y[bi, t] += w[:, j] * x[bi, src]
                elif state is not None:
                    y[bi, t] += w[:, j] * state[bi, K - 1 + src]
            if b is not None:
                y[bi, t] += b
    return y


@given(seed=SEEDS, t=st.integers(1, 6), k=st.integers(1, 5), with_state=st.booleans())
def test_conv1d_matches_the_explicit_formula(seed, t, k, with_state):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((2, t, 3)), rng.standard_normal((3, k)), rng.standard_normal(3)
    state = rng.standard_normal((2, k - 1, 3)) if with_state else None
    y, _, new_state = P.conv1d_forward(x, w, b, state)
    assert_close(y, _conv_oracle(x, w, b, state), "float64", "rewrite", "conv1d")
    full = np.concatenate([state if with_state else np.zeros((2, k - 1, 3)), x], axis=1)
    assert_close(new_state, full[:, full.shape[1] - (k - 1) :], "float64", "rewrite", "new_state")


@given(seed=SEEDS, t=st.integers(1, 7), k=st.integers(1, 5), with_state=st.booleans())
def test_conv1d_chained_calls_equal_one_call_at_every_split(seed, t, k, with_state):
    """Forward outputs, final state and every gradient agree for every split point s in [0, T]."""
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((2, t, 3)), rng.standard_normal((3, k)), rng.standard_normal(3)
    state = rng.standard_normal((2, k - 1, 3)) if with_state else None
    dy, ds = rng.standard_normal((2, t, 3)), rng.standard_normal((2, k - 1, 3))
    y, cache, final = P.conv1d_forward(x, w, b, state)
    dx, dw, db, dstate = P.conv1d_backward(dy, cache, dnew_state=ds)
    for s in range(t + 1):
        y1, c1, mid = P.conv1d_forward(x[:, :s], w, b, state)
        y2, c2, final2 = P.conv1d_forward(x[:, s:], w, b, mid)
        assert_close(np.concatenate([y1, y2], axis=1), y, "float64", "rewrite", f"y, split {s}")
        assert_close(final2, final, "float64", "rewrite", f"state, split {s}")
        dx2, dw2, db2, dmid = P.conv1d_backward(dy[:, s:], c2, dnew_state=ds)
        dx1, dw1, db1, dstate1 = P.conv1d_backward(dy[:, :s], c1, dnew_state=dmid)
        assert_close(np.concatenate([dx1, dx2], axis=1), dx, "float64", "rewrite", f"dx, split {s}")
        assert_close(dw1 + dw2, dw, "float64", "rewrite", f"dw, split {s}")
        assert_close(db1 + db2, db, "float64", "rewrite", f"db, split {s}")
        assert_close(dstate1, dstate, "float64", "rewrite", f"dstate, split {s}")


def test_conv1d_token_by_token_streaming_equals_one_call(rng):
    x, w = rng.standard_normal((2, 6, 3)), rng.standard_normal((3, 4))
    y, _, final = P.conv1d_forward(x, w)
    state, ys = None, []
    for t in range(6):
        yt, _, state = P.conv1d_forward(x[:, t : t + 1], w, state=state)
        ys.append(yt)
    assert_close(np.concatenate(ys, axis=1), y, "float64", "rewrite", "streamed y")
    assert_close(state, final, "float64", "rewrite", "streamed state")


def test_conv1d_without_state_has_zero_dstate_shape(rng):
    _, cache, _ = P.conv1d_forward(rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 4)))
    dx, dw, db, dstate = P.conv1d_backward(rng.standard_normal((2, 3, 2)), cache)
    assert db is None and dstate.shape == (2, 3, 2)


# ---------------------------------------------------------------------------------------------
# RoPE.
# ---------------------------------------------------------------------------------------------


def test_rope_pairs_interleaved_neighbours():
    """Pair i = (x[2i], x[2i+1]) turns by position * base^(-2i/dh) (SPEC.md#primitives)."""
    x = np.array([[1.0, 0.0, 1.0, 0.0]])  # (T=1, dh=4)
    y, _ = P.rope_forward(x, np.array([3]), base=100.0)
    a0, a1 = 3.0, 3.0 * 100.0 ** (-2.0 / 4.0)
    expected = [[np.cos(a0), np.sin(a0), np.cos(a1), np.sin(a1)]]
    assert_close(y, expected, "float64", "rewrite", "rope pairing")
    y0, _ = P.rope_forward(x, np.array([0]))
    assert_close(y0, x, "float64", "rewrite", "rope at position 0")


@given(seed=SEEDS, t=st.integers(1, 5), half=st.integers(1, 4), offset=st.integers(-10, 10_000))
def test_rope_preserves_norms(seed, t, half, offset):
    x = np.random.default_rng(seed).standard_normal((2, t, 2 * half))
    y, _ = P.rope_forward(x, np.arange(offset, offset + t))
    pair_norm = lambda a: a[..., 0::2] ** 2 + a[..., 1::2] ** 2  # noqa: E731
    assert_close(pair_norm(y), pair_norm(x), "float64", "rewrite", "per-pair norm")


@given(
    seed=SEEDS,
    half=st.integers(1, 4),
    m=st.integers(0, 500),
    n=st.integers(0, 500),
    shift=st.integers(-200, 200),
)
def test_rope_scores_depend_only_on_relative_position(seed, half, m, n, shift):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, 2 * half)), rng.standard_normal((1, 2 * half))
    rq = lambda p: P.rope_forward(q, np.array([p]))[0][0]  # noqa: E731
    rk = lambda p: P.rope_forward(k, np.array([p]))[0][0]  # noqa: E731
    a = rq(m) @ rk(n)
    b = rq(m + shift) @ rk(n + shift)
    assert abs(a - b) <= 1e-9 * (np.linalg.norm(q) * np.linalg.norm(k))


def test_rope_offset_positions_continue_a_stream(rng):
    x = rng.standard_normal((2, 3, 7, 4))  # (B, H, T, dh)
    y, _ = P.rope_forward(x, np.arange(7))
    y_tail, _ = P.rope_forward(x[:, :, 4:], np.arange(4, 7))
    assert_close(y_tail, y[:, :, 4:], "float64", "rewrite", "rope offset")


# ---------------------------------------------------------------------------------------------
# Norms, SwiGLU, softmax, cross-entropy, embedding: definitions and stability.
# ---------------------------------------------------------------------------------------------


@given(seed=SEEDS, d=st.integers(2, 6))
def test_norms_match_their_definitions(seed, d):
    rng = np.random.default_rng(seed)
    x, g, b = 3.0 * rng.standard_normal((3, d)), rng.standard_normal(d), rng.standard_normal(d)
    y, _ = P.rmsnorm_forward(x, g, eps=1e-6)
    assert_close(y, x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * g, "float64", "rewrite", "rmsnorm")
    y, _ = P.layernorm_forward(x, g, b, eps=1e-5)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    assert_close(y, (x - mu) / np.sqrt(var + 1e-5) * g + b, "float64", "rewrite", "layernorm")
    y, _ = P.layernorm_forward(x)
    assert np.max(np.abs(y.mean(-1))) < 1e-12
    assert_close(y.var(-1), var[:, 0] / (var[:, 0] + 1e-5), "float64", "rewrite", "layernorm var")
    y, _ = P.l2norm_forward(x, eps=0.0)
    assert_close(np.linalg.norm(y, axis=-1), np.ones(3), "float64", "rewrite", "l2norm unit")


def test_swiglu_matches_composition(rng):
    x, Wg, Wu, Wd = (rng.standard_normal(s) for s in [(2, 3, 4), (5, 4), (5, 4), (4, 5)])
    y, _ = P.swiglu_forward(x, Wg, Wu, Wd)
    a = x @ Wg.T
    expected = ((a / (1 + np.exp(-a))) * (x @ Wu.T)) @ Wd.T
    assert_close(y, expected, "float64", "rewrite", "swiglu")


@given(seed=SEEDS, shift=st.floats(-1e3, 1e3))
def test_softmax_sums_to_one_and_ignores_shifts(seed, shift):
    x = 5.0 * np.random.default_rng(seed).standard_normal((3, 6))
    y, _ = P.softmax_forward(x)
    assert_close(y.sum(-1), np.ones(3), "float64", "rewrite", "softmax sum")
    assert_close(P.softmax_forward(x + shift)[0], y, "float64", "rewrite", "softmax shift")
    assert_close(P.softmax_forward(x.T, axis=0)[0], y.T, "float64", "rewrite", "softmax axis")


@given(seed=SEEDS, v=st.integers(1, 6))
def test_cross_entropy_matches_definition(seed, v):
    rng = np.random.default_rng(seed)
    logits, targets = rng.standard_normal((2, 3, v)), rng.integers(0, v, size=(2, 3))
    loss, _ = P.cross_entropy_forward(logits, targets)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.mean(np.log(np.take_along_axis(p, targets[..., None], -1)))
    assert_close(loss, expected, "float64", "rewrite", "cross-entropy")


def test_cross_entropy_is_stable_and_scales_with_dloss(rng):
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, cache = P.cross_entropy_forward(logits, np.array([1, 2]))
    assert_close(loss, (1e4 + np.log(3.0)) / 2, "float64", "rewrite", "stable loss")
    assert_close(
        P.cross_entropy_backward(2.0, cache),
        2.0 * P.cross_entropy_backward(1.0, cache),
        "float64",
        "rewrite",
        "dloss scaling",
    )


def test_embedding_backward_accumulates_repeated_tokens(rng):
    E = rng.standard_normal((4, 3))
    tokens = np.array([[2, 2, 0], [2, 1, 2]])
    dy = rng.standard_normal((2, 3, 3))
    y, cache = P.embedding_forward(tokens, E)
    assert_close(y, E[tokens], "float64", "rewrite", "embedding")
    dE = P.embedding_backward(dy, cache)
    assert_close(dE[2], dy[0, 0] + dy[0, 1] + dy[1, 0] + dy[1, 2], "float64", "rewrite", "dE[2]")
    assert_close(dE[3], np.zeros(3), "float64", "rewrite", "dE of an unused token")


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------

f64 = lambda *s: np.zeros(s)  # noqa: E731
f32 = lambda *s: np.zeros(s, dtype=np.float32)  # noqa: E731

BAD_INPUTS = [
    ("linear W shape", lambda: P.linear_forward(f64(2, 3), f64(4, 5)), "W", "(D_out, D_in)"),
    ("linear x int", lambda: P.linear_forward(np.zeros((2, 3), int), f64(4, 3)), "x", "(..., D_in)"),
    ("linear W dtype", lambda: P.linear_forward(f64(2, 3), f32(4, 3)), "W", "(D_out, D_in)"),
    ("linear b shape", lambda: P.linear_forward(f64(2, 3), f64(4, 3), f64(3)), "b", "(D_out,)"),
    (
        "linear dy shape",
        lambda: P.linear_backward(f64(2, 3), P.linear_forward(f64(2, 3), f64(4, 3))[1]),
        "dy",
        "(..., D_out)",
    ),
    ("embedding table rank", lambda: P.embedding_forward(np.zeros(3, int), f64(4)), "E", "(V, D)"),
    ("embedding float tokens", lambda: P.embedding_forward(np.zeros(3), f64(4, 2)), "tokens", "(...)"),
    (
        "embedding token too large",
        lambda: P.embedding_forward(np.array([0, 4]), f64(4, 2)),
        "tokens",
        "[0, 4)",
    ),
    ("embedding negative token", lambda: P.embedding_forward(np.array([-1]), f64(4, 2)), "tokens", "[0, 4)"),
    ("rmsnorm g shape", lambda: P.rmsnorm_forward(f64(2, 3), f64(4)), "g", "(D,)"),
    ("rmsnorm g dtype", lambda: P.rmsnorm_forward(f32(2, 3), f64(3)), "g", "(D,)"),
    ("layernorm b shape", lambda: P.layernorm_forward(f64(2, 3), f64(3), f64(2)), "b", "(D,)"),
    ("l2norm x int", lambda: P.l2norm_forward(np.ones((2, 3), int)), "x", "(..., D)"),
    ("l2norm x scalar", lambda: P.l2norm_forward(np.float64(1.0)), "x", "(..., D)"),
    (
        "swiglu W_down shape",
        lambda: P.swiglu_forward(f64(2, 3), f64(4, 3), f64(4, 3), f64(4, 3)),
        "W_down",
        "(D, F)",
    ),
    (
        "swiglu W_gate shape",
        lambda: P.swiglu_forward(f64(2, 3), f64(4, 2), f64(4, 3), f64(3, 4)),
        "W_gate",
        "(F, D)",
    ),
    ("conv1d x rank", lambda: P.conv1d_forward(f64(3, 2), f64(2, 4)), "x", "(B, T, D)"),
    ("conv1d w shape", lambda: P.conv1d_forward(f64(1, 3, 2), f64(3, 4)), "w", "(D, K)"),
    (
        "conv1d state shape",
        lambda: P.conv1d_forward(f64(1, 3, 2), f64(2, 4), None, f64(1, 4, 2)),
        "state",
        "(B, K-1, D)",
    ),
    ("rope odd dh", lambda: P.rope_forward(f64(2, 3), np.arange(2)), "x", "dh even"),
    ("rope float positions", lambda: P.rope_forward(f64(2, 4), np.zeros(2)), "positions", "(T,)"),
    ("rope positions length", lambda: P.rope_forward(f64(2, 4), np.arange(3)), "positions", "(T,)"),
    ("softmax axis", lambda: P.softmax_forward(f64(2, 3), axis=2), "axis", "(2, 3)"),
    (
        "attention q rank",
        lambda: P.attention_forward(f64(2, 3, 4), f64(1, 2, 3, 4), f64(1, 2, 3, 4)),
        "q",
        "(B, H, T_q, dh)",
    ),
    (
        "attention k dh",
        lambda: P.attention_forward(f64(1, 2, 3, 4), f64(1, 2, 3, 5), f64(1, 2, 3, 4)),
        "k",
        "(B, H, T_k, dh)",
    ),
    (
        "attention v length",
        lambda: P.attention_forward(f64(1, 2, 3, 4), f64(1, 2, 3, 4), f64(1, 2, 2, 4)),
        "v",
        "(B, H, T_k, dv)",
    ),
    (
        "attention causal T_k < T_q",
        lambda: P.attention_forward(f64(1, 1, 3, 2), f64(1, 1, 2, 2), f64(1, 1, 2, 2)),
        "k",
        "T_k >= T_q",
    ),
    (
        "attention v dtype",
        lambda: P.attention_forward(f64(1, 1, 2, 2), f64(1, 1, 2, 2), f32(1, 1, 2, 2)),
        "v",
        "(B, H, T_k, dv)",
    ),
    (
        "cross-entropy target too large",
        lambda: P.cross_entropy_forward(f64(2, 3), np.array([0, 3])),
        "targets",
        "[0, 3)",
    ),
    (
        "cross-entropy negative target",
        lambda: P.cross_entropy_forward(f64(2, 3), np.array([-1, 0])),
        "targets",
        "[0, 3)",
    ),
    (
        "cross-entropy targets shape",
        lambda: P.cross_entropy_forward(f64(2, 3), np.array([0, 1, 2])),
        "targets",
        "logits.shape[:-1]",
    ),
    (
        "cross-entropy float targets",
        lambda: P.cross_entropy_forward(f64(2, 3), np.zeros(2)),
        "targets",
        "(...)",
    ),
    ("sigmoid int", lambda: P.sigmoid_forward(np.arange(3)), "x", "(...)"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_argument_and_shape(case):
    _, call, arg, expected = case
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert re.match(rf"{re.escape(arg)}\b", message), message
    assert expected in message, message


# ---------------------------------------------------------------------------------------------
# dtype preservation, no mutation, no aliasing: every forward and backward.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_calls(np.random.default_rng(0), np.float32)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_inputs_untouched_outputs_not_aliased(name, dtype):
    rng = np.random.default_rng(7)
    inputs, forward, backward = _calls(rng, dtype)[name]
    before = {k: v.copy() for k, v in inputs.items()}
    for v in inputs.values():
        v.setflags(write=False)  # any in-place write to an input raises
    outputs, grads = _run(name, inputs, forward, backward, rng)
    for arr in outputs + grads:
        assert np.asarray(arr).dtype == dtype, (name, np.asarray(arr).dtype)
        for k, v in inputs.items():
            assert not np.shares_memory(arr, v), (name, k)
    for k in inputs:
        np.testing.assert_array_equal(inputs[k], before[k])


@pytest.mark.parametrize("name", sorted(_calls(np.random.default_rng(0), np.float32)))
def test_float32_agrees_with_float64(name):
    in32, forward, backward = _calls(np.random.default_rng(3), np.float32)[name]
    in64, _, _ = _calls(np.random.default_rng(3), np.float64)[name]
    out32, g32 = _run(name, in32, forward, backward, np.random.default_rng(4))
    out64, g64 = _run(name, in64, forward, backward, np.random.default_rng(4))
    for a, b in zip(out32 + g32, out64 + g64, strict=True):
        assert_close(a, b, "float32", "primitive_vs_float64", name)
