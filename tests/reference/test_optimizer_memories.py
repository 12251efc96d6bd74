"""Tests of reference/optimizer_memories.py (SPEC.md#optimizer-memories).

The classical rules are written here independently of the module: Broyden's method, the cubic
Newton-Schulz iteration, the polar factor by SVD, the per-singular-value fixed point of Eq. (44)
by np.roots, and the diagonal AdaGrad of reference/optimizers.py (itself checked against torch).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref.reference import optimizer_memories as OM
from nlref.reference import optimizers
from nlref.reference.cases import optimizer_memories as OM_cases
from nlref.reference.gradcheck import check_gradients, numerical_gradient

seeds = st.integers(0, 2**16)


def spd(rng, n):
    A = rng.standard_normal((n, n))
    return A @ A.T + n * np.eye(n)


@pytest.mark.parametrize("case", sorted(OM_cases.GRADCHECKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradchecks(case, seed):
    rng = np.random.default_rng(seed)
    loss, inputs, grads = OM_cases.GRADCHECKS[case](rng)
    errors = check_gradients(loss, inputs, grads, rng)
    assert max(errors.values()) < tol("float64", "gradcheck"), errors


# ---------------------------------------------------------------------------------------------
# The learned preconditioner (Eqs. 38, 40-41).
# ---------------------------------------------------------------------------------------------


def test_preconditioner_with_zero_inner_step_is_gd():
    rng = np.random.default_rng(0)
    params = {"W": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}
    ours, sgd = OM.make("learned_preconditioner", lr=0.1, zeta=0.0), optimizers.make("sgd", lr=0.1)
    p, s, q, r = params, ours.init(params), params, sgd.init(params)
    for _ in range(5):
        g = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        p, s = ours.update(p, g, s)
        q, r = sgd.update(q, g, r)
        for k in params:
            assert_close(p[k], q[k], "float64", "rewrite")


@given(seeds, st.integers(1, 4))
def test_preconditioner_is_broydens_method(seed, n):
    """zeta = 1 (normalised): P <- P + (y - P s) s^T / s^T s, x <- x - lr P^{-1} g (Broyden's
    'good' update), here on the gradient of a non-quadratic function."""
    rng = np.random.default_rng(seed)
    A, c = spd(rng, n), rng.standard_normal(n)

    def grad(x):
        return A @ x + 0.1 * np.tanh(x) - c

    opt = OM.make("learned_preconditioner", lr=0.5)
    p, state = {"x": np.zeros(n)}, None
    state = opt.init(p)
    B, x, x_prev, g_prev = np.eye(n), np.zeros(n), None, None
    for t in range(6):
        g = grad(x)
        if t:
            s, y = x - x_prev, g - g_prev
            B = B + np.outer(y - B @ s, s) / (s @ s)
        x_prev, g_prev, x = x, g, x - 0.5 * np.linalg.solve(B, g)
        p, state = opt.update(p, {"x": grad(p["x"])}, state)
        assert_close(p["x"], x, "float64", "rewrite", name=f"step {t}")
        assert_close(state["P/x"], B, "float64", "rewrite", name=f"P step {t}")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_preconditioner_solves_a_quadratic_in_2n_steps(seed, n):
    """Gay (1979): Broyden's method with full steps solves a nonsingular n x n linear system in at
    most 2n steps; here the system is grad f = A x - b = 0 and P learns A's action."""
    rng = np.random.default_rng(seed)
    A, b = spd(rng, n), rng.standard_normal(n)
    opt = OM.make("learned_preconditioner", lr=1.0)
    p = {"x": np.zeros(n)}
    state = opt.init(p)
    for _ in range(2 * n):
        p, state = opt.update(p, {"x": A @ p["x"] - b}, state)
    assert np.linalg.norm(A @ p["x"] - b) < 1e-10 * np.linalg.norm(b)
    s, y = p["x"] - state["w/x"], (A @ p["x"] - b) - state["g/x"]
    assert_close(A @ s, y, "float64", "rewrite")  # the secant pairs of a quadratic: y = A s


def test_preconditioner_errors():
    with pytest.raises(ValueError, match="max_dim"):
        OM.make("learned_preconditioner", max_dim=4).init({"W": np.zeros((2, 3))})
    opt = OM.make("learned_preconditioner", init=1.0)
    state = opt.init({"x": np.zeros(2)})
    state["P/x"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="singular"):
        opt.update({"x": np.zeros(2)}, {"x": np.ones(2)}, state)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        OM.make("learned_preconditioner", beta=1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        OM.make("shampoo")
    with pytest.raises(ValueError, match="invalid"):
        OM.make("feature_momentum", coefficients=())


# ---------------------------------------------------------------------------------------------
# Newton-Schulz as inner gradient descent (Eqs. 43-44).
# ---------------------------------------------------------------------------------------------


def cubic(X):
    return 0.5 * X @ (3 * np.eye(X.shape[1]) - X.T @ X)


@given(seeds, st.integers(1, 5), st.integers(1, 5))
def test_ns_gd_first_step_and_anchorless_steps_are_the_cubic_iteration(seed, a, b):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((a, b))
    X = (G.T if a < b else G) / np.linalg.norm(G)
    one = OM.newton_schulz_gd(G, steps=1, zeta=0.25, anchor=1.0)
    assert_close(one, cubic(X).T if a < b else cubic(X), "float64", "rewrite")
    Y = X
    for _ in range(4):
        Y = cubic(Y)
    assert_close(OM.newton_schulz_gd(G, steps=4, zeta=0.25, anchor=0.0), Y.T if a < b else Y, "float64", "rewrite")
    assert_close(OM.newton_schulz_gd(G.T, steps=3), OM.newton_schulz_gd(G, steps=3).T, "float64", "rewrite")


@pytest.mark.parametrize("shape", [(4, 3), (3, 5)])
def test_ns_gd_limits(shape):
    """anchor = 0: the polar factor U V^T (by SVD). anchor = 1: same singular vectors as g, and
    each singular value the positive root of 2 s^3 - s - s_g = 0 (the stationary point of Eq. 44)."""
    rng = np.random.default_rng(11)
    U, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
    V, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    k = min(shape)
    sv = np.linspace(0.4, 1.0, k)
    G = U[:, :k] @ np.diag(sv) @ V[:, :k].T
    assert_close(OM.newton_schulz_gd(G, steps=200, anchor=0.0), U[:, :k] @ V[:, :k].T, "float64", "rewrite")
    g_sv = sv / np.linalg.norm(sv)
    roots = [max(r.real for r in np.roots([2, 0, -1, -s]) if abs(r.imag) < 1e-12) for s in g_sv]
    want = U[:, :k] @ np.diag(roots) @ V[:, :k].T
    assert_close(OM.newton_schulz_gd(G, steps=400, zeta=0.1, anchor=1.0), want, "float64", "rewrite")


# ---------------------------------------------------------------------------------------------
# Higher-order feature maps (Eq. 51).
# ---------------------------------------------------------------------------------------------


def test_feature_momentum_with_the_identity_map_is_momentum():
    rng = np.random.default_rng(2)
    params = {"W": rng.standard_normal((2, 3)), "s": np.array(0.5)}
    ours, mom = OM.make("feature_momentum", lr=0.1, momentum=0.8), optimizers.make("momentum", lr=0.1, momentum=0.8)
    p, s, q, r = params, ours.init(params), params, mom.init(params)
    for _ in range(4):
        g = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        p, s = ours.update(p, g, s)
        q, r = mom.update(q, g, r)
        for k in params:
            assert_close(p[k], q[k], "float64", "rewrite")
    cubic_map = OM.make("feature_momentum", lr=0.1, momentum=0.8, coefficients=(1.0, 1.0))
    p2, _ = cubic_map.update(params, g, cubic_map.init(params))
    assert np.max(np.abs(p2["W"] - (params["W"] - 0.1 * g["W"]))) > 1e-3  # a real cubic term


@given(seeds, st.integers(1, 4), st.integers(1, 4), st.floats(0.01, 100.0))
def test_feature_map_is_odd_degree_one_and_its_vjp_checks(seed, a, b, scale):
    rng = np.random.default_rng(seed)
    coefficients = tuple(rng.standard_normal(3))
    G = rng.standard_normal((a, b))
    assert_close(OM.feature_map(-G, coefficients), -OM.feature_map(G, coefficients), "float64", "rewrite")
    assert_close(OM.feature_map(scale * G, coefficients), scale * OM.feature_map(G, coefficients), "float64", "rewrite")
    up = rng.standard_normal((a, b))
    grads = {"G": OM.feature_map_backward(up, G, coefficients)}
    errors = check_gradients(lambda x: np.sum(OM.feature_map(x["G"], coefficients) * up), {"G": G}, grads, rng)
    assert max(errors.values()) < tol("float64", "gradcheck"), errors


# ---------------------------------------------------------------------------------------------
# The outer-product AdaGrad (Eqs. 106-111).
# ---------------------------------------------------------------------------------------------


def run(opt, params, grads):
    state, path = opt.init(params), []
    for g in grads:
        params, state = opt.update(params, g, state)
        path.append(params)
    return path, state


def test_outer_adagrad_with_a_diagonal_memory_is_adagrad():
    """Gradients along single coordinates keep H diagonal; a 1-entry parameter always has one."""
    rng = np.random.default_rng(4)
    params = {"x": rng.standard_normal(4), "s": np.array(0.3)}
    grads = []
    for _ in range(8):
        gx = np.zeros(4)
        gx[rng.integers(4)] = rng.standard_normal()
        grads.append({"x": gx, "s": np.array(rng.standard_normal())})
    a, _ = run(OM.make("outer_adagrad", lr=0.1), params, grads)
    b, _ = run(optimizers.make("adagrad", lr=0.1), params, grads)
    for pa, pb in zip(a, b, strict=True):
        for k in params:
            assert_close(pa[k], pb[k], "float64", "rewrite")


@given(seeds, st.integers(2, 4), st.floats(0.0, 0.9))
def test_outer_adagrad_is_rotation_equivariant(seed, n, momentum):
    """Full-matrix AdaGrad commutes with rotations: gradients Q g give iterates Q x (diagonal
    AdaGrad does not, which the last line checks)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    x0 = rng.standard_normal(n)
    grads = [rng.standard_normal(n) for _ in range(n + 2)]
    opt = OM.make("outer_adagrad", lr=0.1, momentum=momentum)
    a, _ = run(opt, {"x": x0}, [{"x": g} for g in grads])
    b, _ = run(opt, {"x": Q @ x0}, [{"x": Q @ g} for g in grads])
    for pa, pb in zip(a, b, strict=True):
        assert_close(pb["x"], Q @ pa["x"], "float64", "rewrite")
    c, _ = run(optimizers.make("adagrad", lr=0.1), {"x": Q @ x0}, [{"x": Q @ g} for g in grads])
    d, _ = run(optimizers.make("adagrad", lr=0.1), {"x": x0}, [{"x": g} for g in grads])
    assert np.max(np.abs(c[-1]["x"] - Q @ d[-1]["x"])) > 1e-6


def test_outer_adagrad_step_is_the_memory_optimum():
    """The step solves the memory objective with P = H^{1/2} and lam = eps H^{1/2} (checked by a
    central-difference gradient of that objective), and with momentum M~ <- momentum M~ + g."""
    rng = np.random.default_rng(8)
    n, eps, mom = 3, 0.05, 0.7
    grads = [rng.standard_normal((1, n)) for _ in range(5)]
    x0 = {"W": rng.standard_normal((1, n))}
    path, state = run(OM.make("outer_adagrad", lr=1.0, eps=eps, momentum=mom), x0, [{"W": g} for g in grads])
    H = sum(np.outer(g, g) for g in grads)
    Mt = np.zeros(n)
    for g in grads:
        Mt = mom * Mt + g.ravel()
    assert_close(state["H/W"], H, "float64", "rewrite")
    lam_, V = np.linalg.eigh(H)
    root = (V * np.sqrt(lam_)) @ V.T
    m_star = (path[-2]["W"] - path[-1]["W"]).ravel()

    def objective(x):
        return OM.outer_inner_loss(x["m"], H, root @ Mt, eps * root)

    g = numerical_gradient(objective, {"m": m_star})["m"]
    assert np.max(np.abs(g)) < 1e-8 * np.max(np.abs(H))
    assert_close(root @ root, H, "float64", "rewrite")


@pytest.mark.parametrize("name", OM.NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pure_dtype_preserving_and_refuses_non_finite(name, dtype):
    rng = np.random.default_rng(9)
    params = {"W": rng.standard_normal((2, 3)).astype(dtype), "b": rng.standard_normal(3).astype(dtype)}
    grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
    keep_p, keep_g = {k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in grads.items()}
    opt = OM.make(name, lr=0.1)
    state = opt.init(params)
    for _ in range(3):
        new, state = opt.update(params, grads, state)
    for k in params:
        assert new[k].dtype == dtype and new[k].shape == params[k].shape
        assert np.array_equal(params[k], keep_p[k]) and np.array_equal(grads[k], keep_g[k])
        assert not np.shares_memory(new[k], params[k])
    assert all(v.dtype == dtype for key, v in state.items() if key != "step") and state["step"] == 3
    bad = dict(grads, b=np.full(3, np.nan, dtype=dtype))
    with pytest.raises(ValueError, match="refusing to update parameter 'b'"):
        opt.update(params, bad, state)
