"""Tests of reference/memory.py: the matrix associative memories (SPEC.md#memory).

- float64 gradient checks (complex step and central differences + dot-product test) of every
  backward, token and chunk forms, over random small shapes with lengths that do not divide the
  chunk size;
- chunk form == token loop (outputs, final state, every gradient) at chunk sizes 1, 2, 3, 16;
- the paper's identities: linear attention is one GD step with rate 1 on -<M k, v> (Eqs. 14-18),
  DGD is the exact minimiser of its proximal problem (Eq. 56), the delta rule with
  eta / (1 + eta) is DGD for unit keys, Omega with c = 1 is the delta rule, Oja's rule finds the
  top principal direction, zero learning rate leaves the memory alone;
- bad input raises ValueError naming the argument and the expected shape; inputs are not mutated.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref.reference import memory
from nlref.reference.cases import memory as memory_cases
from nlref.reference.gradcheck import check_gradients, numerical_gradient, rel_error

TOKEN_RULES = ["hebbian", "delta", "dgd", "oja", "omega"]
CHUNK_PAIRS = [("hebbian", "hebbian_chunked"), ("delta", "delta_chunked"), ("dgd", "dgd_chunked"),
               ("omega", "omega_chunked")]


def _inputs(seed, rule, B, T, d_k, d_v, dtype=np.float64, with_alpha=True):
    rng = np.random.default_rng(seed)
    x = memory_cases.example_inputs(rng, B, T, d_k, d_v, dtype=dtype, gamma=rule.startswith("omega"))
    if not with_alpha:
        x["alpha"] = None
    return x


def _run(rule, x, **static):
    forward, _ = memory.RULES[rule]
    return forward(**x, **static)


def _assert_gradcheck(rule, x, seed, **static):
    """Complex step entry by entry (exact to rounding), the dot-product test, and central
    differences over the whole gradient vector.

    Per-key central differences are not used here: where one key's gradient is ~1e-5 of the
    loss's scale, the O(1e-16 |loss| / e) rounding of central differences alone exceeds 1e-6
    relative (measured 2.3e-6 for d eta, omega_chunked, B=1, T=1, d_k=4, d_v=1, seed 100023219,
    where the complex step gives 1.2e-14). GRADCHECKS (test_gradchecks_registry) runs them per key.
    """
    x = {name: a for name, a in x.items() if a is not None}
    if "alpha" not in x:
        static = {"alpha": None, **static}
    rng = np.random.default_rng(seed + 1)
    loss, inputs, grads = memory_cases.gradcheck_case(rule, x, rng, **static)
    errors = check_gradients(loss, inputs, grads, rng, method="complex")
    assert set(errors) == set(inputs) | {"<dot>"}
    dot = errors.pop("<dot>")
    assert dot <= tol("float64", "gradcheck"), ("dot-product test", dot)
    assert max(errors.values()) <= tol("float64", "complex_step"), errors
    central = numerical_gradient(loss, inputs, keys=list(grads))
    names = sorted(grads)
    flat_hand = np.concatenate([np.ravel(grads[n]) for n in names])
    flat_central = np.concatenate([np.ravel(central[n]) for n in names])
    assert rel_error(flat_hand, flat_central) <= tol("float64", "gradcheck")


shapes = st.tuples(st.integers(1, 2), st.integers(1, 9), st.integers(1, 4), st.integers(1, 4))


# ---------------------------------------------------------------------------------------------
# Gradient checks.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", TOKEN_RULES)
@given(shape=shapes, seed=st.integers(0, 2**31), with_alpha=st.booleans(), window=st.integers(1, 4))
def test_token_rule_gradients(rule, shape, seed, with_alpha, window):
    B, T, d_k, d_v = shape
    static = {"window": window} if rule == "omega" else {}
    _assert_gradcheck(rule, _inputs(seed, rule, B, T, d_k, d_v, with_alpha=with_alpha), seed, **static)


@st.composite
def chunked_lengths(draw):
    """(T, C) with T <= 9 and, for C > 1, T not a multiple of C."""
    C = draw(st.integers(2, 4))
    n_full = draw(st.integers(0, (9 - 1) // C))
    rest = draw(st.integers(1, C - 1))
    return n_full * C + rest, C


@pytest.mark.parametrize("rule", ["hebbian_chunked", "delta_chunked", "dgd_chunked", "omega_chunked", "omega"])
@given(dims=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)), lengths=chunked_lengths(),
       seed=st.integers(0, 2**31), with_alpha=st.booleans(), window=st.integers(1, 4))
def test_chunk_form_gradients(rule, dims, lengths, seed, with_alpha, window):
    (B, d_k, d_v), (T, C) = dims, lengths
    static = {"chunk_size": C}
    if rule.startswith("omega"):
        static["window"] = window
    _assert_gradcheck(rule, _inputs(seed, rule, B, T, d_k, d_v, with_alpha=with_alpha), seed, **static)


def test_gradchecks_registry():
    """Every GRADCHECKS case passes (what ``nested-learning check`` runs)."""
    assert {"memory.hebbian", "memory.hebbian_chunked", "memory.delta", "memory.delta_chunked",
            "memory.dgd", "memory.dgd_chunked", "memory.oja", "memory.omega",
            "memory.omega_chunked"} <= set(memory_cases.GRADCHECKS)
    for i, (name, make) in enumerate(memory_cases.GRADCHECKS.items()):
        rng = np.random.default_rng(i)
        loss, inputs, grads = make(rng)
        errors = check_gradients(loss, inputs, grads, rng)
        assert max(errors.values()) <= tol("float64", "gradcheck"), (name, errors)


def test_gradchecks_complex_step():
    """The forwards are analytic (no abs, max or branches; ||k||^2 = k . k), so the complex step
    checks every GRADCHECKS case to rounding."""
    for i, (name, make) in enumerate(memory_cases.GRADCHECKS.items()):
        rng = np.random.default_rng(100 + i)
        loss, inputs, grads = make(rng)
        errors = check_gradients(loss, inputs, grads, rng, method="complex")
        dot = errors.pop("<dot>")
        assert dot <= tol("float64", "gradcheck"), (name, dot)
        assert max(errors.values()) <= tol("float64", "complex_step"), (name, errors)


def test_gradcheck_detects_a_wrong_gradient():
    """The check can fail: a perturbed hand-written gradient is caught."""
    rng = np.random.default_rng(0)
    loss, inputs, grads = memory_cases.GRADCHECKS["memory.delta_chunked"](rng)
    grads = dict(grads)
    grads["alpha"] = grads["alpha"] * (1 + 1e-4)
    errors = check_gradients(loss, inputs, grads, rng)
    assert errors["alpha"] > tol("float64", "gradcheck")


# ---------------------------------------------------------------------------------------------
# Chunk form == token loop (exact rewrites; for Omega, the token loop at the same chunk size).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", CHUNK_PAIRS, ids=[p[1] for p in CHUNK_PAIRS])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("C", [1, 2, 3, 16])
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 17), st.integers(1, 4), st.integers(1, 4)),
       seed=st.integers(0, 2**31), window=st.integers(1, 4), with_alpha=st.booleans())
def test_chunk_form_equals_token_loop(pair, dtype, C, shape, seed, window, with_alpha):
    token, chunked = pair
    B, T, d_k, d_v = shape
    x = _inputs(seed, token, B, T, d_k, d_v, dtype=dtype, with_alpha=with_alpha)
    static_token = {"window": window, "chunk_size": C} if token == "omega" else {}
    static_chunk = {"window": window, "chunk_size": C} if token == "omega" else {"chunk_size": C}
    y_a, M_a, cache_a = _run(token, x, **static_token)
    y_b, M_b, cache_b = _run(chunked, x, **static_chunk)
    assert y_b.dtype == M_b.dtype == np.dtype(dtype)
    assert_close(y_b, y_a, dtype, "rewrite", "y")
    assert_close(M_b, M_a, dtype, "rewrite", "M_T")
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(y_a.shape).astype(dtype)
    dM = rng.standard_normal(M_a.shape).astype(dtype)
    g_a = memory.RULES[token][1](dy, dM, cache_a)
    g_b = memory.RULES[chunked][1](dy, dM, cache_b)
    assert set(g_a) == set(g_b) == {n for n, a in x.items() if a is not None}
    for name in g_a:
        assert g_b[name].dtype == np.dtype(dtype), name
    if dtype == np.float64:
        for name in g_a:
            assert_close(g_b[name], g_a[name], dtype, "rewrite", f"d{name}")
    else:
        # float32: one scale for the whole gradient vector. A single entry can be a cancellation
        # (e.g. d eta_t = r_t . (dM k_t) with O(1) factors and an O(1e-6) sum: measured 5e-2
        # relative between the forms for B = T = 1, d_k = d_v = 3, seed 3, thorough profile),
        # which no per-array relative test survives in float32; float64 above is per array.
        names = sorted(g_a)
        assert_close(np.concatenate([g_b[n].ravel() for n in names]),
                     np.concatenate([g_a[n].ravel() for n in names]), dtype, "rewrite", "all gradients")


def test_omega_chunk_size_is_part_of_the_definition():
    """Omega at C = 2 (gradients at the chunk-start state) is a different function from C = 1."""
    x = _inputs(3, "omega", 1, 6, 3, 2)
    y1, _, _ = memory.omega_forward(**x, window=2, chunk_size=1)
    y2, _, _ = memory.omega_forward(**x, window=2, chunk_size=2)
    assert np.max(np.abs(y1 - y2)) > 1e-3
    # ... while the first token of every chunk sees the same state, so y_0 agrees.
    assert_close(y2[:, 0], y1[:, 0], np.float64, "rewrite", "y_0")


# ---------------------------------------------------------------------------------------------
# The paper's identities.
# ---------------------------------------------------------------------------------------------


@given(shape=shapes, seed=st.integers(0, 2**31))
def test_linear_attention_is_one_gd_step_on_dot_product(shape, seed):
    """Eqs. 14-18: with alpha = eta = 1, M_t = M_{t-1} - 1 * grad_M(-<M k_t, v_t>) at M_{t-1}."""
    B, T, d_k, d_v = shape
    x = _inputs(seed, "hebbian", B, T, d_k, d_v)
    x["eta"] = np.ones_like(x["eta"])
    x["alpha"] = None
    y, M_T, cache = memory.hebbian_forward(**x)
    states = cache["states"]
    for t in range(T):
        def objective(inp, t=t):
            return -np.sum(np.einsum("bvk,bk->bv", inp["M"], x["k"][:, t]) * x["v"][:, t])
        grad = numerical_gradient(objective, {"M": states[:, t]})["M"]
        assert_close(states[:, t + 1], states[:, t] - 1.0 * grad, np.float64, "gradcheck", f"M_{t}")
        assert_close(y[:, t], np.einsum("bvk,bk->bv", states[:, t + 1], x["q"][:, t]), np.float64,
                     "rewrite", f"y_{t}")


@given(shape=shapes, seed=st.integers(0, 2**31), key_scale=st.sampled_from([0.3, 1.0, 2.5]))
def test_dgd_is_the_exact_proximal_minimiser(shape, seed, key_scale):
    """Eq. 56 with alpha = 1: M_t = argmin 1/2||M k - v||^2 + 1/(2 eta)||M - M_{t-1}||^2, solved
    independently as M (I + eta k k^T) = eta v k^T + M_{t-1}; any key norm."""
    B, T, d_k, d_v = shape
    x = _inputs(seed, "dgd", B, T, d_k, d_v)
    x["k"] = x["k"] * key_scale
    x["alpha"] = None
    _, _, cache = memory.dgd_forward(**x)
    states = cache["states"]
    eye = np.eye(d_k)
    for b in range(B):
        for t in range(T):
            k_t, v_t, e = x["k"][b, t], x["v"][b, t], x["eta"][b, t]
            lhs = (eye + e * np.outer(k_t, k_t)).T
            rhs = (e * np.outer(v_t, k_t) + states[b, t]).T
            minimiser = np.linalg.solve(lhs, rhs).T  # (d_v, d_k)
            assert_close(states[b, t + 1], minimiser, np.float64, "rewrite", f"M[{b},{t}]")


@given(shape=shapes, seed=st.integers(0, 2**31), with_alpha=st.booleans(), C=st.integers(1, 4))
def test_delta_with_scaled_rate_is_dgd_for_unit_keys(shape, seed, with_alpha, C):
    """||k|| = 1: the delta rule with eta / (1 + eta) equals DGD with eta (token and chunk forms)."""
    B, T, d_k, d_v = shape
    x = _inputs(seed, "dgd", B, T, d_k, d_v, with_alpha=with_alpha)
    x["k"] = x["k"] / np.linalg.norm(x["k"], axis=-1, keepdims=True)
    y_dgd, M_dgd, _ = memory.dgd_forward(**x)
    x_delta = dict(x, eta=x["eta"] / (1 + x["eta"]))
    y_delta, M_delta, _ = memory.delta_forward(**x_delta)
    assert_close(y_delta, y_dgd, np.float64, "rewrite", "y")
    assert_close(M_delta, M_dgd, np.float64, "rewrite", "M_T")
    y_c, M_c, _ = memory.dgd_chunked_forward(**x, chunk_size=C)
    assert_close(y_c, y_delta, np.float64, "rewrite", "y chunked")
    # ... and with the unscaled rate they differ (the test can fail).
    y_raw, _, _ = memory.delta_forward(**x)
    assert np.max(np.abs(y_raw - y_dgd)) > 1e-6


@given(shape=shapes, seed=st.integers(0, 2**31), with_alpha=st.booleans())
def test_omega_with_window_one_is_the_delta_rule(shape, seed, with_alpha):
    """ATLAS: c = 1 (and gamma = 1) gives the delta rule; so does the parallel form at C = 1."""
    B, T, d_k, d_v = shape
    x = _inputs(seed, "omega", B, T, d_k, d_v, with_alpha=with_alpha)
    x["gamma"] = np.ones_like(x["gamma"])
    y_o, M_o, _ = memory.omega_forward(**x, window=1)
    y_p, M_p, _ = memory.omega_chunked_forward(**x, window=1, chunk_size=1)
    x.pop("gamma")
    y_d, M_d, _ = memory.delta_forward(**x)
    for y, M, name in [(y_o, M_o, "token"), (y_p, M_p, "parallel")]:
        assert_close(y, y_d, np.float64, "rewrite", f"y {name}")
        assert_close(M, M_d, np.float64, "rewrite", f"M_T {name}")


@pytest.mark.parametrize("rule", sorted(memory.RULES))
@given(shape=shapes, seed=st.integers(0, 2**31), with_alpha=st.booleans(), C=st.integers(1, 4))
def test_zero_learning_rate_leaves_memory_unchanged(rule, shape, seed, with_alpha, C):
    """eta = 0: M_t = (prod_{j<=t} alpha_j) M0, or exactly M0 with alpha = 1 (None)."""
    B, T, d_k, d_v = shape
    x = _inputs(seed, rule, B, T, d_k, d_v, with_alpha=with_alpha)
    x["eta"] = np.zeros_like(x["eta"])
    static = {}
    if rule.startswith("omega"):
        static["window"] = 2
    if rule.endswith("chunked") or rule == "omega":
        static["chunk_size"] = C
    y, M_T, _ = _run(rule, x, **static)
    if with_alpha:
        decay = np.cumprod(x["alpha"], axis=1)  # (B, T)
        assert_close(M_T, decay[:, -1, None, None] * x["M0"], np.float64, "rewrite", "M_T")
        expected_y = decay[:, :, None] * np.einsum("bvk,btk->btv", x["M0"], x["q"])
        assert_close(y, expected_y, np.float64, "rewrite", "y")
    else:
        np.testing.assert_array_equal(M_T, x["M0"])
        assert_close(y, np.einsum("bvk,btk->btv", x["M0"], x["q"]), np.float64, "rewrite", "y")


def test_oja_finds_the_top_principal_direction():
    """Eq. 67 read as M += eta v (k - M^T v)^T: with one output (d_v = 1), alpha = 1 and the
    value set to the memory's own read v = M k (Oja's neuron), M converges to the unit-norm top
    eigenvector of the keys' covariance. Run as T = 1 calls carrying the state."""
    rng = np.random.default_rng(0)
    d_k = 3
    basis, _ = np.linalg.qr(rng.standard_normal((d_k, d_k)))
    scales = np.array([2.0, 0.7, 0.3])
    M = np.array([[[0.3, -0.2, 0.5]]])  # (1, 1, d_k)
    for _ in range(3000):
        k = (basis @ (scales * rng.standard_normal(d_k)))[None, None, :]  # (1, 1, d_k)
        v = np.einsum("bvk,btk->btv", M, k)  # Oja: the value is the neuron's output
        _, M, _ = memory.oja_forward(k, k, v, np.full((1, 1), 0.01), None, M)
    w = M[0, 0]
    assert abs(np.linalg.norm(w) - 1) < 0.05
    assert abs(abs(w @ basis[:, 0]) - 1) < 0.01


@pytest.mark.parametrize("rule", sorted(memory.RULES))
@given(seed=st.integers(0, 2**31), split=st.integers(1, 3), C=st.integers(1, 3))
def test_one_call_equals_chained_calls(rule, seed, split, C):
    """Streaming: one call over T tokens == two calls carrying the final state (split at a
    chunk boundary; Omega with window 1 so that no window straddles the calls)."""
    T = 7
    x = _inputs(seed, rule, 2, T, 3, 2)
    static = {}
    if rule.startswith("omega"):
        static["window"] = 1
    if rule.endswith("chunked") or rule == "omega":
        static["chunk_size"] = C
    at = min(split * C, T - 1)
    y, M_T, _ = _run(rule, x, **static)
    first = {n: (a[:, :at] if n != "M0" else a) for n, a in x.items()}
    y1, M1, _ = _run(rule, first, **static)
    second = {n: (a[:, at:] if n != "M0" else M1) for n, a in x.items()}
    y2, M2, _ = _run(rule, second, **static)
    assert_close(np.concatenate([y1, y2], axis=1), y, np.float64, "rewrite", "y")
    assert_close(M2, M_T, np.float64, "rewrite", "M_T")


def test_alpha_none_is_alpha_one_without_its_gradient():
    x = _inputs(5, "delta", 2, 5, 3, 2)
    x_none = dict(x, alpha=None)
    x_ones = dict(x, alpha=np.ones_like(x["alpha"]))
    rng = np.random.default_rng(0)
    dy, dM = rng.standard_normal((2, 5, 2)), rng.standard_normal((2, 2, 3))
    for fwd, bwd, static in [(memory.delta_forward, memory.delta_backward, {}),
                             (memory.delta_chunked_forward, memory.delta_chunked_backward, {"chunk_size": 2})]:
        y_n, M_n, c_n = fwd(**x_none, **static)
        y_o, M_o, c_o = fwd(**x_ones, **static)
        np.testing.assert_array_equal(y_n, y_o)
        g_n, g_o = bwd(dy, dM, c_n), bwd(dy, dM, c_o)
        assert "alpha" not in g_n and "alpha" in g_o
        for name in g_n:
            np.testing.assert_array_equal(g_n[name], g_o[name])


def test_backward_accepts_no_state_gradient():
    x = _inputs(6, "hebbian", 1, 4, 2, 2)
    y, _, cache = memory.hebbian_chunked_forward(**x, chunk_size=3)
    dy = np.ones_like(y)
    g_none = memory.hebbian_chunked_backward(dy, None, cache)
    g_zero = memory.hebbian_chunked_backward(dy, np.zeros((1, 2, 2)), cache)
    for name in g_none:
        np.testing.assert_array_equal(g_none[name], g_zero[name])


# ---------------------------------------------------------------------------------------------
# Bad input and mutation.
# ---------------------------------------------------------------------------------------------


def _good(rule="delta"):
    return _inputs(0, rule, 2, 5, 3, 2)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"q": np.zeros((2, 5, 4))}, r"q: expected shape \(B, T, d_k\)"),
        ({"k": np.zeros((5, 3))}, r"k: expected shape \(B, T, d_k\)"),
        ({"v": np.zeros((2, 4, 2))}, r"v: expected shape \(B, T, d_v\)"),
        ({"eta": np.zeros((2, 5, 1))}, r"eta: expected shape \(B, T\)"),
        ({"alpha": np.zeros((2, 6))}, r"alpha: expected shape \(B, T\)"),
        ({"M0": np.zeros((2, 3, 2))}, r"M0: expected shape \(B, d_v, d_k\)"),
        ({"M0": np.zeros((2, 2, 3), dtype=np.float32)}, r"M0: expected dtype float64"),
        ({"v": np.zeros((2, 5, 2), dtype=np.int64)}, r"v: expected a float32/float64 array of shape \(B, T, d_v\)"),
    ],
)
@pytest.mark.parametrize("rule", ["hebbian", "delta_chunked", "dgd", "oja"])
def test_bad_input_raises(change, match, rule):
    x = dict(_good(rule), **change)
    static = {"chunk_size": 2} if rule.endswith("chunked") else {}
    with pytest.raises(ValueError, match=match):
        _run(rule, x, **static)


def test_bad_omega_arguments_raise():
    x = _good("omega")
    with pytest.raises(ValueError, match=r"gamma: expected shape \(B, T\)"):
        memory.omega_forward(**dict(x, gamma=np.zeros((2, 4))), window=2)
    with pytest.raises(ValueError, match=r"gamma: expected an array of shape \(B, T\)"):
        memory.omega_chunked_forward(**dict(x, gamma=None), window=2, chunk_size=2)
    with pytest.raises(ValueError, match=r"window: expected an integer >= 1"):
        memory.omega_forward(**x, window=0)
    with pytest.raises(ValueError, match=r"chunk_size: expected an integer >= 1"):
        memory.omega_chunked_forward(**x, window=2, chunk_size=1.5)
    with pytest.raises(ValueError, match=r"chunk_size: expected an integer >= 1"):
        memory.hebbian_chunked_forward(**_good("hebbian"), chunk_size=0)


def test_bad_upstream_gradients_raise():
    y, _, cache = memory.delta_forward(**_good())
    with pytest.raises(ValueError, match=r"dy: expected shape \(B, T, d_v\)"):
        memory.delta_backward(y[:, :-1], None, cache)
    with pytest.raises(ValueError, match=r"dM_T: expected shape \(B, d_v, d_k\)"):
        memory.delta_backward(y, np.zeros((2, 3, 2)), cache)


@pytest.mark.parametrize("rule", sorted(memory.RULES))
def test_inputs_are_not_mutated(rule):
    """Read-only inputs and upstream gradients: any in-place write would raise; values unchanged."""
    x = _inputs(9, rule, 2, 7, 3, 2)
    originals = {n: a.copy() for n, a in x.items()}
    for a in x.values():
        a.setflags(write=False)
    static = {}
    if rule.startswith("omega"):
        static["window"] = 3
    if rule.endswith("chunked") or rule == "omega":
        static["chunk_size"] = 3
    y, M_T, cache = _run(rule, x, **static)
    assert not np.shares_memory(M_T, x["M0"])
    dy, dM = np.ones_like(y), np.ones_like(M_T)
    dy.setflags(write=False)
    dM.setflags(write=False)
    grads = memory.RULES[rule][1](dy, dM, cache)
    for n, a in x.items():
        np.testing.assert_array_equal(a, originals[n])
        assert not np.shares_memory(grads[n], a)
    np.testing.assert_array_equal(dM, np.ones_like(M_T))
