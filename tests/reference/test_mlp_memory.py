"""The residual MLP memory, its inner gradient and the second-order pieces (SPEC.md#mlp-memory).

Every hand-written derivative is checked in float64 against central differences (and the complex
step where stated) plus the dot-product test, over random shapes, leading dims, activations and
the LayerNorm option.
"""

import numpy as np
import pytest
from cases_reference import mlp_all_outputs as _all_outputs
from cases_reference import mlp_opts as opts
from cases_reference import mlp_reference_inputs as make_inputs
from hypothesis import currently_in_test_context, given, note
from hypothesis import strategies as st
from strategies import mlp_memory_reference_configs as configs
from tolerances import assert_close, tol

from nlref.reference import mlp_memory as mm
from nlref.reference.cases import mlp_memory as mm_cases
from nlref.reference.gradcheck import check_gradients, numerical_gradient

GTOL = tol("float64", "gradcheck")


def assert_errors(errors, t=GTOL, dot_t=GTOL):
    if currently_in_test_context():
        note(f"relative errors: {errors}")
    for key, err in errors.items():
        limit = dot_t if key == "<dot>" else t
        assert err <= limit, f"{key}: relative error {err:.3e} > {limit:.0e} (all: {errors})"


# ---------------------------------------------------------------------------------------------
# A plain per-token oracle: NL §1.4 / digest §5.5 written with vectors, one token at a time.
# ---------------------------------------------------------------------------------------------


def oracle_token(W1, W2, k, v, act, layernorm, eps=1e-5):
    """(M(k), dl/dW1, dl/dW2) for one token (vectors k, v; matrices W1, W2) by plain backprop."""
    f, df, _ = mm.ACTIVATIONS[act]
    h = W2 @ k
    a = f(h)
    b = W1 @ a
    if layernorm:
        D = b.size
        mu = b.sum() / D
        var = ((b - mu) ** 2).sum() / D
        c = (b - mu) / np.sqrt(var + eps)
        # explicit Jacobian of LN, built entry by entry from its definition
        J = (np.eye(D) - np.ones((D, D)) / D - np.outer(c, c) / D) / np.sqrt(var + eps)
    else:
        c, J = b, np.eye(b.size)
    y = k + c
    g = 2 * (y - v)
    gb = J.T @ g
    gz = (W1.T @ gb) * df(h)
    return y, np.outer(gb, a), np.outer(gz, k)


@given(configs())
def test_inner_grad_dense_matches_token_oracle(cfg):
    x, _ = make_inputs(cfg)
    G1, G2 = mm.inner_grad_dense(**x, **opts(cfg))
    y, _ = mm.mlp_memory_forward(x["W1"], x["W2"], x["k"], **opts(cfg))
    for idx in np.ndindex(*cfg["lead"], cfg["N"]):
        lead = idx[:-1]
        yo, g1, g2 = oracle_token(x["W1"][lead], x["W2"][lead], x["k"][idx], x["v_hat"][idx], **opts(cfg))
        assert_close(y[idx], yo, "float64", "rewrite", f"y{idx}")
        assert_close(G1[idx], g1, "float64", "rewrite", f"G1{idx}")
        assert_close(G2[idx], g2, "float64", "rewrite", f"G2{idx}")


def test_known_values_without_branch():
    """W1 = 0: M(k) = k, so u1 = 2 (k - v_hat) (factor 2, ||.||^2 convention) and u2 = 0 for any s."""
    rng = np.random.default_rng(0)
    W1 = np.zeros((2, 3, 4))
    W2 = rng.standard_normal((2, 4, 3))
    k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3))
    u1, a, u2, _ = mm.inner_grad(W1, W2, k, v, act="silu")
    np.testing.assert_array_equal(u1, 2 * (k - v))
    np.testing.assert_array_equal(u2, np.zeros_like(u2))
    np.testing.assert_allclose(a, mm.ACTIVATIONS["silu"][0](np.einsum("bhd,bnd->bnh", W2, k)), rtol=1e-15)
    np.testing.assert_allclose(mm.inner_loss(W1, W2, k, v), np.sum((k - v) ** 2, axis=-1), rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# Gradient checks (float64): read, inner gradient, inner-gradient VJP, matrix memory.
# ---------------------------------------------------------------------------------------------


@given(configs())
def test_forward_backward_gradcheck(cfg):
    x, rng = make_inputs(cfg)
    inputs = {"W1": x["W1"], "W2": x["W2"], "z": x["k"]}
    up = rng.standard_normal(x["k"].shape)
    y, cache = mm.mlp_memory_forward(**inputs, **opts(cfg))
    dW1, dW2, dz = mm.mlp_memory_backward(up, cache)

    def loss(d):
        return np.sum(mm.mlp_memory_forward(d["W1"], d["W2"], d["z"], **opts(cfg))[0] * up)

    assert_errors(check_gradients(loss, inputs, {"W1": dW1, "W2": dW2, "z": dz}, rng))


@given(configs())
def test_inner_grad_is_gradient_of_inner_loss(cfg):
    """sum_n c_n u1_n a_n^T and sum_n c_n u2_n k_n^T are the gradients of sum_n c_n l_n (v_hat fixed)."""
    x, rng = make_inputs(cfg)
    cw = rng.standard_normal((*cfg["lead"], cfg["N"]))
    u1, a, u2, _ = mm.inner_grad(**x, **opts(cfg))
    grads = {
        "W1": np.einsum("...n,...nd,...nh->...dh", cw, u1, a),
        "W2": np.einsum("...n,...nh,...ne->...he", cw, u2, x["k"]),
    }

    def loss(d):
        return np.sum(cw * mm.inner_loss(d["W1"], d["W2"], d["k"], d["v_hat"], **opts(cfg)))

    assert_errors(check_gradients(loss, x, grads, rng))


@given(configs(acts=["gelu", "silu"]))
def test_inner_grad_dense_per_token(cfg):
    """Each token's G1_n, G2_n separately equals the complex-step gradient of that token's loss
    (exact to rounding; a token's gradient can be small next to its loss, where central
    differences lose digits)."""
    x, _ = make_inputs(cfg)
    G1, G2 = mm.inner_grad_dense(**x, **opts(cfg))
    for n in range(cfg["N"]):

        def loss(d, n=n):
            return np.sum(mm.inner_loss(d["W1"], d["W2"], d["k"], d["v_hat"], **opts(cfg))[..., n])

        num = numerical_gradient(loss, x, keys=["W1", "W2"], method="complex")
        assert_close(G1[..., n, :, :], num["W1"], "float64", "complex_step", f"G1[{n}]")
        assert_close(G2[..., n, :, :], num["W2"], "float64", "complex_step", f"G2[{n}]")


def _factor_vjp_case(x, rng, cfg):
    u1, a, u2, cache = mm.inner_grad(**x, **opts(cfg))
    c1, c2, c3 = (rng.standard_normal(t.shape) for t in (u1, a, u2))
    dW1, dW2, dk, dv = mm.inner_grad_backward(c1, c2, c3, cache)

    def loss(d):
        f1, f2, f3, _ = mm.inner_grad(d["W1"], d["W2"], d["k"], d["v_hat"], **opts(cfg))
        return np.sum(f1 * c1) + np.sum(f2 * c2) + np.sum(f3 * c3)

    return loss, {"W1": dW1, "W2": dW2, "k": dk, "v_hat": dv}


@given(configs())
def test_inner_grad_backward_gradcheck(cfg):
    x, rng = make_inputs(cfg)
    loss, grads = _factor_vjp_case(x, rng, cfg)
    assert_errors(check_gradients(loss, x, grads, rng))


@given(configs(acts=["gelu", "silu"]))
def test_inner_grad_backward_complex_step(cfg):
    """The factor map is analytic: the complex step checks the second-order VJP to rounding."""
    x, rng = make_inputs(cfg)
    loss, grads = _factor_vjp_case(x, rng, cfg)
    errors = check_gradients(loss, x, grads, rng, method="complex")
    assert_errors(errors, t=tol("float64", "complex_step"), dot_t=GTOL)


@given(configs(acts=["gelu", "silu"]))
def test_dense_gradient_vjp_composes_with_explicit_key(cfg):
    """How callers use the factors: for L = sum_n <G1_n, C1_n> + <G2_n, C2_n> with G2_n = u2_n k_n^T,
    du1 = C1 a, da = C1^T u1, du2 = C2 k, and the caller adds the explicit-key term C2^T u2 to dk."""
    x, rng = make_inputs(cfg)
    G1, G2 = mm.inner_grad_dense(**x, **opts(cfg))
    C1, C2 = rng.standard_normal(G1.shape), rng.standard_normal(G2.shape)
    u1, a, u2, cache = mm.inner_grad(**x, **opts(cfg))
    du1 = np.einsum("...ndh,...nh->...nd", C1, a)
    da = np.einsum("...ndh,...nd->...nh", C1, u1)
    du2 = np.einsum("...nhe,...ne->...nh", C2, x["k"])
    dW1, dW2, dk, dv = mm.inner_grad_backward(du1, da, du2, cache)
    dk = dk + np.einsum("...nhe,...nh->...ne", C2, u2)

    def loss(d):
        g1, g2 = mm.inner_grad_dense(d["W1"], d["W2"], d["k"], d["v_hat"], **opts(cfg))
        return np.sum(g1 * C1) + np.sum(g2 * C2)

    assert_errors(check_gradients(loss, x, {"W1": dW1, "W2": dW2, "k": dk, "v_hat": dv}, rng))


@st.composite
def matrix_configs(draw):
    return {
        "lead": tuple(draw(st.lists(st.integers(1, 2), max_size=2))),
        "N": draw(st.integers(1, 3)),
        "Dv": draw(st.integers(1, 3)),
        "Dk": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def make_matrix_inputs(cfg, dtype=np.float64):
    rng = np.random.default_rng(cfg["seed"])
    lead, N, Dv, Dk = cfg["lead"], cfg["N"], cfg["Dv"], cfg["Dk"]
    x = {
        "M": rng.standard_normal((*lead, Dv, Dk)),
        "k": rng.standard_normal((*lead, N, Dk)),
        "v_hat": rng.standard_normal((*lead, N, Dv)),
    }
    return {key: v.astype(dtype) for key, v in x.items()}, rng


@given(matrix_configs())
def test_matrix_memory_gradchecks(cfg):
    x, rng = make_matrix_inputs(cfg)
    # the read
    up = rng.standard_normal(x["v_hat"].shape)
    _, cache = mm.matrix_memory_forward(x["M"], x["k"])
    dM, dk = mm.matrix_memory_backward(up, cache)

    def read_loss(d):
        return np.sum(mm.matrix_memory_forward(d["M"], d["k"])[0] * up)

    assert_errors(check_gradients(read_loss, {"M": x["M"], "k": x["k"]}, {"M": dM, "k": dk}, rng))
    # the inner gradient: u k^T is the gradient of sum_n c_n l_n
    cw = rng.standard_normal((*cfg["lead"], cfg["N"]))
    u, cache = mm.matrix_inner_grad(**x)
    np.testing.assert_allclose(u, 2 * (np.einsum("...vk,...nk->...nv", x["M"], x["k"]) - x["v_hat"]))

    def inner(d):
        return np.sum(cw * mm.matrix_inner_loss(d["M"], d["k"], d["v_hat"]))

    gM = np.einsum("...n,...nvk->...vk", cw, mm.matrix_inner_grad_dense(**x))
    assert_errors(check_gradients(inner, x, {"M": gM}, rng))
    # the VJP of (M, k, v_hat) -> u
    cu = rng.standard_normal(u.shape)
    dM, dk, dv = mm.matrix_inner_grad_backward(cu, cache)

    def vjp_loss(d):
        return np.sum(mm.matrix_inner_grad(d["M"], d["k"], d["v_hat"])[0] * cu)

    assert_errors(check_gradients(vjp_loss, x, {"M": dM, "k": dk, "v_hat": dv}, rng))


# ---------------------------------------------------------------------------------------------
# Sanity of sign, LayerNorm, dtypes, mutation, bad input, registered cases.
# ---------------------------------------------------------------------------------------------


@given(configs())
def test_gd_step_decreases_inner_loss(cfg):
    """W <- W - lr sum_n dl_n/dW lowers sum_n l_n, by lr ||grad||^2 to first order. The step is
    sized to a 1e-6 relative decrease (LN with a small branch variance has a steep landscape)."""
    x, _ = make_inputs(cfg)
    G1, G2 = mm.inner_grad_dense(**x, **opts(cfg))
    g1, g2 = G1.sum(axis=-3), G2.sum(axis=-3)  # sum over tokens
    gg = float(np.sum(g1 * g1) + np.sum(g2 * g2))
    before = np.sum(mm.inner_loss(**x, **opts(cfg)))
    if gg < 1e-12 * before:
        return  # already at a stationary point of this tiny problem
    lr = 1e-6 * before / gg
    after = np.sum(mm.inner_loss(x["W1"] - lr * g1, x["W2"] - lr * g2, x["k"], x["v_hat"], **opts(cfg)))
    note(f"before {before!r}, after {after!r}, predicted decrease {lr * gg!r}")
    assert after < before
    assert abs((before - after) - lr * gg) <= 1e-2 * lr * gg


@given(matrix_configs())
def test_gd_step_decreases_matrix_inner_loss(cfg):
    x, _ = make_matrix_inputs(cfg)
    g = mm.matrix_inner_grad_dense(**x).sum(axis=-3)
    if np.sum(g * g) < 1e-12:
        return
    before = np.sum(mm.matrix_inner_loss(**x))
    after = np.sum(mm.matrix_inner_loss(x["M"] - 1e-4 * g, x["k"], x["v_hat"]))
    assert after < before


@given(configs())
def test_layernorm_branch_is_normalised(cfg):
    """With layernorm=True the branch M(z) - z has zero mean and mean square var/(var + eps) per token."""
    x, _ = make_inputs(cfg)
    eps = 1e-5
    y, _ = mm.mlp_memory_forward(x["W1"], x["W2"], x["k"], act=cfg["act"], layernorm=True, eps=eps)
    y0, _ = mm.mlp_memory_forward(x["W1"], x["W2"], x["k"], act=cfg["act"], layernorm=False)
    b = y0 - x["k"]
    var = b.var(axis=-1)
    c = y - x["k"]
    np.testing.assert_allclose(c.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose((c * c).mean(axis=-1), var / (var + eps), rtol=1e-10, atol=1e-14)


@given(configs())
def test_float32_in_float32_out_and_close_to_float64(cfg):
    x32, rng = make_inputs(cfg, np.float32)
    x64 = {k: v.astype(np.float64) for k, v in x32.items()}
    o32, o64 = _all_outputs(x32, cfg), _all_outputs(x64, cfg)
    for name in o32:
        assert o32[name].dtype == np.float32, f"{name}: dtype {o32[name].dtype}"
        assert_close(o32[name], o64[name].astype(np.float32), "float32", "mlp_memory_vs_float64", name)


def test_float32_matrix_memory():
    x, _ = make_matrix_inputs({"lead": (2,), "N": 3, "Dv": 2, "Dk": 3, "seed": 0}, np.float32)
    u, cache = mm.matrix_inner_grad(**x)
    outs = [mm.matrix_memory_forward(x["M"], x["k"])[0], u, *mm.matrix_inner_grad_backward(u, cache)]
    outs += [mm.matrix_inner_loss(**x), mm.matrix_inner_grad_dense(**x)]
    assert all(o.dtype == np.float32 for o in outs)


@pytest.mark.parametrize("layernorm", [False, True])
def test_inputs_not_mutated_and_outputs_do_not_alias(layernorm):
    cfg = {"lead": (2,), "N": 3, "D": 3, "Hm": 4, "act": "gelu", "layernorm": layernorm, "seed": 3}
    x, rng = make_inputs(cfg)
    before = {k: v.copy() for k, v in x.items()}
    for v in x.values():
        v.setflags(write=False)
    outs = _all_outputs(x, cfg)
    for k in x:
        np.testing.assert_array_equal(x[k], before[k])
    for name, o in outs.items():
        for k, v in x.items():
            assert not np.shares_memory(o, v), f"output {name} aliases input {k}"
    m, _ = make_matrix_inputs({"lead": (), "N": 2, "Dv": 2, "Dk": 3, "seed": 1})
    mb = {k: v.copy() for k, v in m.items()}
    for v in m.values():
        v.setflags(write=False)
    u, cache = mm.matrix_inner_grad(**m)
    for o in (u, *mm.matrix_inner_grad_backward(u, cache)):
        assert not any(np.shares_memory(o, v) for v in m.values())
    for k in m:
        np.testing.assert_array_equal(m[k], mb[k])


def test_bad_input_raises_value_error_naming_argument_and_shape():
    W1, W2 = np.zeros((2, 3, 4)), np.zeros((2, 4, 3))
    k, v = np.zeros((2, 5, 3)), np.zeros((2, 5, 3))
    with pytest.raises(ValueError, match=r"W2: expected shape \(\.\.\., Hm, D\)"):
        mm.mlp_memory_forward(W1, np.zeros((2, 3, 4)), k)
    with pytest.raises(ValueError, match=r"z: expected shape \(\.\.\., N, D\)"):
        mm.mlp_memory_forward(W1, W2, np.zeros((5, 3)))  # missing leading dim
    with pytest.raises(ValueError, match=r"z: expected shape \(\.\.\., N, D\)"):
        mm.mlp_memory_forward(W1, W2, np.zeros((3, 5, 3)))  # leading dims differ (no broadcasting)
    with pytest.raises(ValueError, match=r"k: expected shape \(\.\.\., N, D\)"):
        mm.inner_grad(W1, W2, np.zeros((2, 5, 4)), v)
    with pytest.raises(ValueError, match=r"v_hat: expected shape \(2, 5, 3\)"):
        mm.inner_loss(W1, W2, k, np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match=r"W1: expected shape \(\.\.\., D, Hm\)"):
        mm.inner_grad(np.zeros(3), W2, k, v)
    with pytest.raises(ValueError, match=r"v_hat: expected dtype float64"):
        mm.inner_grad(W1, W2, k, v.astype(np.float32))
    with pytest.raises(ValueError, match=r"k: expected a float32/float64 array"):
        mm.inner_grad(W1, W2, k.astype(np.int64), v)
    with pytest.raises(ValueError, match=r"act: expected one of"):
        mm.inner_grad(W1, W2, k, v, act="relu")
    _, _, _, cache = mm.inner_grad(W1, W2, k, v)
    with pytest.raises(ValueError, match=r"du2: expected shape \(2, 5, 4\)"):
        mm.inner_grad_backward(np.zeros((2, 5, 3)), np.zeros((2, 5, 4)), np.zeros((2, 5, 3)), cache)
    _, cache = mm.mlp_memory_forward(W1, W2, k)
    with pytest.raises(ValueError, match=r"dy: expected shape"):
        mm.mlp_memory_backward(np.zeros((2, 5, 4)), cache)
    M = np.zeros((2, 2, 3))
    with pytest.raises(ValueError, match=r"k: expected shape \(\.\.\., N, D\)"):
        mm.matrix_inner_grad(M, np.zeros((2, 5, 2)), np.zeros((2, 5, 2)))
    with pytest.raises(ValueError, match=r"v_hat: expected shape \(\.\.\., N, Dv\) = \(2, 5, 2\)"):
        mm.matrix_inner_grad(M, k, np.zeros((2, 5, 3)))
    u, cache = mm.matrix_inner_grad(M, k, np.zeros((2, 5, 2)))
    with pytest.raises(ValueError, match=r"du: expected shape"):
        mm.matrix_inner_grad_backward(np.zeros((2, 5, 3)), cache)


REQUIRED_CASES = {
    "mlp_memory.forward",
    "mlp_memory.forward_layernorm",
    "mlp_memory.inner_grad",
    "mlp_memory.inner_grad_layernorm",
    "mlp_memory.inner_grad_backward",
    "mlp_memory.inner_grad_backward_layernorm",
    "mlp_memory.matrix_inner_grad_backward",
}


@pytest.mark.parametrize("name", sorted(mm_cases.GRADCHECKS))
def test_registered_gradchecks_pass_fast(name):
    assert REQUIRED_CASES <= set(mm_cases.GRADCHECKS)
    rng = np.random.default_rng([0, 7])
    loss, inputs, grads = mm_cases.GRADCHECKS[name](rng)
    calls = []
    errors = check_gradients(lambda x: calls.append(1) or loss(x), inputs, grads, rng)
    # "fast" as work, not wall-clock time (which depends on the machine's load): `nested-learning
    # check` runs every registered case, so each stays small (most today: 170 evaluations)
    assert len(calls) <= 200, f"{name}: {len(calls)} loss evaluations"
    assert_errors(errors)


def test_gradcheck_catches_a_wrong_second_order_term():
    """Dropping the s'' term from the VJP must be caught: the check can fail."""
    cfg = {"lead": (2,), "N": 3, "D": 3, "Hm": 4, "act": "gelu", "layernorm": True, "seed": 5}
    x, rng = make_inputs(cfg)
    u1, a, u2, cache = mm.inner_grad(**x, **opts(cfg))
    c3 = rng.standard_normal(u2.shape)
    broken = dict(cache, spp=np.zeros_like(cache["spp"]))
    dW1, dW2, dk, dv = mm.inner_grad_backward(np.zeros_like(u1), np.zeros_like(a), c3, broken)

    def loss(d):
        return np.sum(mm.inner_grad(d["W1"], d["W2"], d["k"], d["v_hat"], **opts(cfg))[2] * c3)

    errors = check_gradients(loss, x, {"W1": dW1, "W2": dW2, "k": dk, "v_hat": dv}, rng)
    assert errors["W2"] > 1e-3 and errors["<dot>"] > 1e-4
