"""Tests of reference/layer_rules.py (SPEC.md#layer-rules): GGD, DGD as a layer optimizer,
generalised momentum and the Eq. (45) demonstration.

The classical rules and closed forms here are written independently of the module: plain GD from
a complex-step gradient of the layer's loss, Eq. (57) letter for letter, the exact prox checked by
a numerical gradient of its own objective, and the momentum recurrence on orthogonal tasks solved
through the eigendecomposition of its 2x2 transfer matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref.reference import layer_rules as LR
from nlref.reference import optimizers
from nlref.reference.cases import layer_rules as LR_cases
from nlref.reference.gradcheck import check_gradients, numerical_gradient

shapes = st.tuples(st.integers(0, 2**16), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5))


def layer_problem(seed, d_out, d_in, N):
    """A linear layer y = W x on the loss L = sum log cosh(X W^T - T): grad_y L = tanh(X W^T - T)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in))
    X = rng.standard_normal((N, d_in))
    T = rng.standard_normal((N, d_out))

    def loss(W):
        return np.sum(np.log(np.cosh(X @ W.T - T)))

    def dY(W):
        return np.tanh(X @ W.T - T)

    return W, X, loss, dY


# ---------------------------------------------------------------------------------------------
# Gradient checks.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(LR_cases.GRADCHECKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradchecks(case, seed):
    rng = np.random.default_rng(seed)
    loss, inputs, grads = LR_cases.GRADCHECKS[case](rng)
    errors = check_gradients(loss, inputs, grads, rng)
    assert max(errors.values()) < tol("float64", "gradcheck"), errors


@given(shapes, st.integers(1, 4), st.sampled_from(LR.OBJECTIVES))
def test_momentum_inner_grad_property(shape, h, objective):
    seed, d_out, d_in, N = shape
    rng = np.random.default_rng(seed)
    X, U = rng.standard_normal((N, d_in)), rng.standard_normal((N, d_out))
    inputs = {"M": rng.standard_normal((d_out, d_in)), "W1": rng.standard_normal((d_out, h)),
              "W2": rng.standard_normal((h, d_in))}
    dM, dW1, dW2 = LR.momentum_inner_grad(inputs["M"], inputs["W1"], inputs["W2"], X, U, objective)
    errors = check_gradients(lambda x: LR.momentum_inner_loss(x["M"], x["W1"], x["W2"], X, U, objective),
                             inputs, {"M": dM, "W1": dW1, "W2": dW2}, rng, method="complex")
    dot = errors.pop("<dot>")  # the dot-product test is a central difference
    assert max(errors.values()) < tol("float64", "complex_step") and dot < tol("float64", "gradcheck"), errors


# ---------------------------------------------------------------------------------------------
# GGD (Def. 5) and DGD (Eqs. 56-57).
# ---------------------------------------------------------------------------------------------


@given(shapes, st.floats(0.0, 0.5))
def test_ggd_with_the_dot_product_objective_is_plain_gd(shape, lr):
    W, X, loss, dY = layer_problem(*shape)
    grad_W = numerical_gradient(lambda x: loss(x["W"]), {"W": W}, method="complex")["W"]
    sgd = optimizers.make("sgd", lr=lr)
    expected, _ = sgd.update({"W": W}, {"W": grad_W}, sgd.init({"W": W}))
    assert_close(LR.ggd_update(W, X, dY(W), lr, objective="dot"), expected["W"], "float64", "complex_step")


@pytest.mark.parametrize("objective", LR.OBJECTIVES)
@pytest.mark.parametrize("window", [1, 3])
def test_ggd_is_the_argmin_of_its_objective_plus_retention(objective, window):
    """Def. 5: the new W minimises L~(W; x, u) + sum_i 1/(2 lr c) ||W - W_i||^2 over the window
    (checked by a central-difference gradient of that objective, not by the module's inner grad)."""
    rng = np.random.default_rng(7)
    hist = [rng.standard_normal((3, 4)) for _ in range(window)]
    X, dY, lr = rng.standard_normal((5, 4)), rng.standard_normal((5, 3)), 0.3
    W_new = LR.ggd_update(hist, X, dY, lr, objective=objective)

    def objective_fn(x):
        W = x["W"]
        if objective == "dot":
            fit = -np.sum((X @ W.T) * -dY)
        else:
            fit = 0.5 * np.sum((X @ W.T + dY) ** 2)
        return fit + sum(np.sum((W - Wi) ** 2) for Wi in hist) / (2 * lr * window)

    g = numerical_gradient(objective_fn, {"W": W_new})["W"]
    assert np.max(np.abs(g)) < 1e-7 * max(1.0, float(np.max(np.abs(W_new))) / lr)


@given(shapes, st.floats(0.01, 2.0))
def test_dgd_sequential_is_eq57_sample_by_sample(shape, lr):
    W, X, _, dY_fn = layer_problem(*shape)
    dY = dY_fn(W)  # the values are taken at the batch-start weights (SPEC.md#layer-rules)
    expected = W.copy()
    for x, dy in zip(X, dY, strict=True):
        lr_p = lr / (1 + lr * x @ x)
        expected = expected @ (np.eye(len(x)) - lr_p * np.outer(x, x)) - lr_p * np.outer(dy, x)  # Eq. (57)
    assert_close(LR.dgd_update(W, X, dY, lr), expected, "float64", "rewrite")
    if len(X) == 1:  # one sample: the batch prox is the same step (Sherman-Morrison)
        assert_close(LR.dgd_update(W, X, dY, lr, form="batch"), expected, "float64", "rewrite")


def test_dgd_on_the_mse_loss_converges_to_half_the_target():
    """Eq. (56) regresses W x onto u = -grad_y L. On L = 1/2 ||W x - y*||^2 that is u = y* - W x,
    whose fixed point is W x = y*/2 (solve W x = y* - W x); target="output" reaches y* itself."""
    rng = np.random.default_rng(3)
    W_true = rng.standard_normal((2, 3))
    X = rng.standard_normal((8, 3))
    Ystar = X @ W_true.T
    for target, want in (("lss", Ystar / 2), ("output", Ystar)):
        W = np.zeros((2, 3))
        for _ in range(400):
            W = LR.dgd_update(W, X, X @ W.T - Ystar, 0.2, form="batch", target=target)
        assert_close(X @ W.T, want, "float64", "rewrite", name=target)


def test_bad_inputs():
    W = np.zeros((2, 3))
    with pytest.raises(ValueError, match="objective"):
        LR.ggd_update(W, np.zeros((1, 3)), np.zeros((1, 2)), 0.1, objective="huber")
    with pytest.raises(ValueError, match=r"X must be \(N, 3\)"):
        LR.ggd_update(W, np.zeros((1, 2)), np.zeros((1, 2)), 0.1)
    with pytest.raises(ValueError, match="sequential"):
        LR.ggd_update(W, np.zeros((1, 3)), np.zeros((1, 2)), 0.1, objective="dot", form="sequential")
    with pytest.raises(ValueError, match="target"):
        LR.dgd_update(W, np.zeros((1, 3)), np.zeros((1, 2)), 0.1, target="y")


# ---------------------------------------------------------------------------------------------
# Generalised momentum (Eqs. 33-37).
# ---------------------------------------------------------------------------------------------


@given(shapes, st.floats(0.0, 1.0), st.floats(0.0, 0.5))
def test_generalised_momentum_with_a_linear_memory_is_momentum(shape, alpha, lr):
    seed, d_out, d_in, N = shape
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in))
    opt = optimizers.make("momentum", lr=lr, momentum=alpha)
    ref, ref_state = {"W": W}, opt.init({"W": W})
    ours, state = W, LR.momentum_init(W)
    for _ in range(4):
        X, dY = rng.standard_normal((N, d_in)), rng.standard_normal((N, d_out))
        ref, ref_state = opt.update(ref, {"W": dY.T @ X}, ref_state)  # grad_W L = sum_n dy_n x_n^T
        ours, state = LR.momentum_update(ours, state, X, dY, lr, alpha)
        assert_close(ours, ref["W"], "float64", "rewrite")
        assert_close(state["M"], ref_state["m/W"], "float64", "rewrite")


def test_generalised_momentum_l2_objective_is_a_delta_rule_on_the_inputs():
    rng = np.random.default_rng(5)
    W, M = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    X, dY, lr, alpha = rng.standard_normal((2, 4)), rng.standard_normal((2, 3)), 0.1, 0.8
    W_new, state = LR.momentum_update(W, {"M": M}, X, dY, lr, alpha, objective="l2")
    M_ref = M @ (alpha * np.eye(4) - lr * X.T @ X) - lr * dY.T @ X  # m (alpha I - lr X^T X) + lr U^T X
    assert_close(state["M"], M_ref, "float64", "rewrite")
    assert_close(W_new, W + M_ref, "float64", "rewrite")


def test_generalised_momentum_mlp_memory_is_trained_and_read_at_unit_keys():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((3, 4))
    state = LR.momentum_init(W, hidden=5, seed=1)
    X, dY = rng.standard_normal((2, 4)), rng.standard_normal((2, 3))
    W1, s1 = LR.momentum_update(W, state, X, dY, 0.1, 0.9)
    W2, s2 = LR.momentum_update(W1, s1, X, dY, 0.1, 0.9)
    assert np.max(np.abs(s2["W1"])) > 0 and np.max(np.abs(s2["W2"] - 0.81 * state["W2"])) > 0
    assert_close(W2 - W1, s2["M"] + s2["W1"] @ np.tanh(s2["W2"]), "float64", "rewrite")
    same, kept = LR.momentum_update(W, s1, X, dY, 0.0, 1.0)  # lr = 0, alpha = 1: the memory is unchanged
    assert_close(kept["W2"], s1["W2"], "float64", "rewrite")


# ---------------------------------------------------------------------------------------------
# Eq. (45): orthogonal tasks.
# ---------------------------------------------------------------------------------------------


def closed_form(n_tasks, dim, T, lr, beta, seed):
    """Per task, every coordinate of (e, m) = (Q_i^T (W - w_i), Q_i^T m) follows one scalar linear
    recurrence: while task i trains, (e, m) <- A (e, m) with A = [[1 - 2 lr, beta], [-2 lr, beta]];
    otherwise (e, m) <- F (e, m), F = [[1, beta], [0, beta]]. From e0 = -Q_i^T w_i, m0 = 0:
    A^t by its eigendecomposition, F^s = [[1, beta (1 - beta^s) / (1 - beta)], [0, beta^s]]."""
    Q, w = LR.orthogonal_tasks(n_tasks, dim, seed)
    A = np.array([[1 - 2 * lr, beta], [-2 * lr, beta]])
    lam, V = np.linalg.eig(A)
    steps = n_tasks * T
    loss, mem = np.zeros((steps + 1, n_tasks)), np.zeros((steps + 1, n_tasks))
    for i in range(n_tasks):
        e0 = np.linalg.norm(Q[i].T @ w[i])
        for t in range(steps + 1):
            k = min(max(t - i * T, 0), T)  # steps of task i done by time t
            a, b = np.real(V @ np.diag(lam ** k) @ np.linalg.inv(V))[:, 0]
            s = max(t - (i + 1) * T, 0)  # steps since task i ended
            geo = beta * (1 - beta ** s) / (1 - beta) if beta < 1 else s
            a, b = a + geo * b, beta ** s * b
            loss[t, i], mem[t, i] = (a * e0) ** 2, abs(b) * e0
    return loss, mem


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_orthogonal_tasks_demo_matches_the_closed_form(beta):
    n_tasks, dim, T, lr = 3, 2, 20, 0.1
    out = LR.orthogonal_tasks_demo(n_tasks, dim, T, lr, beta, seed=4)
    loss, mem = closed_form(n_tasks, dim, T, lr, beta, seed=4)
    assert_close(out["loss"], loss, "float64", "rewrite")
    assert_close(out["memory"], mem, "float64", "rewrite")


def test_momentum_forgets_a_finished_task_geometrically():
    """§4.3 with Eq. (45): s steps after task 0 ends its share of the momentum is beta^s of what it
    was (0.9^6 = 0.53, 0.9^43 = 0.011), and its loss keeps moving with the momentum's drift, while
    plain GD (beta = 0) leaves a finished orthogonal task's loss exactly where it was."""
    T = 20
    out = LR.orthogonal_tasks_demo(3, 2, T, 0.1, 0.9, seed=4)
    ratio = out["memory"][T + 1:, 0] / out["memory"][T, 0]
    assert_close(ratio, 0.9 ** np.arange(1, len(ratio) + 1), "float64", "rewrite")
    assert abs(out["loss"][-1, 0] - out["loss"][T, 0]) > 1e-3
    gd = LR.orthogonal_tasks_demo(3, 2, T, 0.1, 0.0, seed=4)
    assert_close(gd["loss"][T:, 0], np.full(2 * T + 1, gd["loss"][T, 0]), "float64", "rewrite")


def test_numerical_gradient_sees_a_fortran_ordered_input():
    """Regression: the prox returns a transposed (F-ordered) solve; numerical_gradient used to
    perturb a reshape copy of such an input and return zeros, which made the argmin test vacuous."""
    W = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    g = numerical_gradient(lambda x: np.sum(x["W"] ** 2), {"W": W})["W"]
    assert_close(g, 2 * W, "float64", "gradcheck")
