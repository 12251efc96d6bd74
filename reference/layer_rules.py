"""Update rules of a linear layer as associative memories: GGD, DGD as an optimizer, generalised
momentum, and the orthogonal-task demonstration of momentum's short memory.

Paper: §4.1-§4.5, Eqs. (7)-(9), (33)-(37), (45), (56)-(60) and Definition 5, arXiv 2512.24695v1.
SPEC: SPEC.md#layer-rules.

A linear layer ``y = W x`` trained on a loss L memorises the map from its inputs ``x`` to their
local surprise signal ``u = -grad_y L(W_t; x)`` (Eqs. 8-9). Each rule here is a GD (or exact
proximal) step on an inner objective over that key/value pair, so every rule needs the layer's
*inputs* as well as ``grad_y L``: the plain ``opt.update(params, grads, state)`` interface of
``reference/optimizers.py`` cannot express them (its gradient ``sum_n g_n x_n^T`` has lost x).

Symbols (a batch of N samples seen at one step; rows are samples):

| paper                            | code              | shape              |
| -------------------------------- | ----------------- | ------------------ |
| W_t (layer weights, y = W x)     | W                 | (d_out, d_in)      |
| x_t (layer input, the key)       | X                 | (N, d_in)          |
| grad_y L(W_t; x_t)               | dY                | (N, d_out)         |
| u_t = -grad_y L (LSS, the value) | U                 | (N, d_out)         |
| eta_t (inner learning rate)      | lr                | scalar >= 0        |
| eta'_t = eta / (1 + eta ||x||^2) | memory.prox_step_size | per sample     |
| {W_i}_{i=t-c+1..t} (Def. 5 Ret)  | history           | list of c (d_out, d_in) |
| m (momentum memory, Eq. 37)      | M, W1, W2         | (d_out,d_in), (d_out,h), (h,d_in) |
| alpha (retention)                | momentum          | scalar in [0, 1]   |

Decisions where the paper is open (all in SPEC.md#layer-rules):
- GGD's retention over the window of c past states is uniform, ``sum_i 1/(2 eta c) ||W - W_i||^2``,
  i.e. a proximal term around the window's mean (Def. 5 gives no weights); c = 1 is Eqs. 8/56.
- The values ``U`` are computed once per batch at the batch-start weights (SPEC.md#chunks) and are
  held fixed inside the step. ``form="batch"`` is the exact argmin over all N samples;
  ``form="sequential"`` applies Eq. (57) sample by sample in order (memory.dgd_forward).
- DGD's target is Eq. (56)'s ``u = -grad_y L`` (``target="lss"``). Its fixed points satisfy
  ``W x = -grad_y L(W x)``, so on the MSE loss it converges to ``W x = y*/2``, not to y*;
  ``target="output"`` regresses onto ``W_t x + u`` instead, which turns the prox step into a
  normalised GD step (no decay term).
- Generalised momentum's MLP memory ``m(x) = M x + W1 tanh(W2 x)`` is read at the unit keys, as
  deep momentum is (SPEC.md#optimizers): ``Delta W = M + W1 tanh(W2)``.
"""

from __future__ import annotations

import numpy as np

from . import memory, optimizers

OBJECTIVES = ("dot", "l2")


def _check(W, X, dY):
    W, X, dY = np.asarray(W), np.asarray(X), np.asarray(dY)
    if W.ndim != 2 or X.ndim != 2 or dY.ndim != 2:
        raise ValueError(f"expected W (d_out, d_in), X (N, d_in), dY (N, d_out); got {W.shape}, {X.shape}, {dY.shape}")
    if X.shape != (X.shape[0], W.shape[1]) or dY.shape != (X.shape[0], W.shape[0]):
        raise ValueError(f"X must be (N, {W.shape[1]}) and dY (N, {W.shape[0]}); got {X.shape} and {dY.shape}")
    return W, X, dY


def _objective(objective):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


# ---------------------------------------------------------------------------------------------
# Generalised gradient descent (Def. 5, Eqs. 58-60) and DGD as an optimizer (Eqs. 56-57).
# ---------------------------------------------------------------------------------------------


def ggd_inner_loss(W, X, U, objective="dot"):
    """The inner objective L~(W; x, u) over the batch: ``"dot"``: ``-sum_n <W x_n, u_n>``
    (Eq. 9 with u = -grad_y L); ``"l2"``: ``1/2 sum_n ||W x_n - u_n||^2`` (Eq. 56)."""
    _objective(objective)
    Y = X @ W.T  # (N, d_out)
    if objective == "dot":
        return -np.sum(Y * U)  # Eq. (9)
    R = Y - U
    return 0.5 * np.sum(R * R)  # Eq. (56)


def ggd_inner_grad(W, X, U, objective="dot"):
    """``grad_W L~``: ``-U^T X`` (dot) or ``(X W^T - U)^T X`` (l2). (d_out, d_in)."""
    _objective(objective)
    E = -U if objective == "dot" else X @ W.T - U  # dL~/dy_n, (N, d_out)
    return E.T @ X


def ggd_prox(anchor, X, U, lr, objective="dot"):
    """The exact minimiser of ``L~(W; X, U) + 1/(2 lr) ||W - anchor||^2`` (Def. 5 / Eq. 56)::

        dot: W = anchor + lr U^T X                                   # Eq. (8)
        l2:  W = (anchor + lr U^T X) (I + lr X^T X)^{-1}             # Eq. (56); N = 1: Eq. (57)
    """
    _objective(objective)
    A = anchor + lr * (U.T @ X)  # (d_out, d_in)
    if objective == "dot":
        return A  # Eq. (8)
    S = np.eye(X.shape[1], dtype=X.dtype) + lr * (X.T @ X)  # symmetric positive definite
    return np.linalg.solve(S, A.T).T  # Eq. (56): W S = A


def _values(W, X, dY, target):
    if target == "lss":
        return -dY  # u_t = -grad_y L(W_t; x_t)  (Eqs. 9, 56)
    if target == "output":
        return X @ W.T - dY  # W_t x + u_t: the prox step is then normalised GD (SPEC.md#layer-rules)
    raise ValueError(f"target must be 'lss' or 'output', got {target!r}")


def ggd_update(history, X, dY, lr, objective="dot", form="batch", target="lss"):
    """One GGD step of a linear layer (Def. 5): the new weights from the last c states.

    ``history``: the weights ``[W_{t-c+1}, ..., W_t]`` (a single array means c = 1); ``X`` the
    layer's inputs and ``dY = grad_y L(W_t; X)`` at the current weights ``W_t``. The values are
    ``U = -dY`` (``target="lss"``); the retention is the proximal term around the mean of the
    window. ``form="sequential"`` (c = 1, l2 only) applies Eq. (57) sample by sample in order.
    With ``objective="dot"`` this is plain GD, ``W - lr sum_n grad_y L_n x_n^T`` (Eq. 8).
    """
    history = [history] if isinstance(history, np.ndarray) else list(history)
    W, X, dY = _check(history[-1], X, dY)
    U = _values(W, X, dY, target)
    if form == "batch":
        return ggd_prox(np.mean(history, axis=0), X, U, lr, objective)
    if form != "sequential":
        raise ValueError(f"form must be 'batch' or 'sequential', got {form!r}")
    if objective != "l2" or len(history) != 1:
        raise ValueError("form='sequential' is DGD (objective='l2') with a window of one state")
    N = X.shape[0]
    eta = np.full((1, N), lr, dtype=W.dtype)
    _, W_new, _ = memory.dgd_forward(X[None], X[None], U[None], eta, None, W[None])  # Eq. (57) per sample
    return W_new[0]


def dgd_update(W, X, dY, lr, form="sequential", target="lss"):
    """DGD as the optimizer of a linear layer's weights (§4.5, Eqs. 56-57)::

        W <- W (I - lr' x x^T) - lr' grad_y L(W; x) x^T,   lr' = lr / (1 + lr ||x||^2)

    per sample in order (``form="sequential"``), or the exact batch prox (``form="batch"``).
    """
    return ggd_update(W, X, dY, lr, objective="l2", form=form, target=target)


# ---------------------------------------------------------------------------------------------
# Generalised momentum (Eqs. 33-37): momentum is a memory from layer inputs x to u = -delta.
# ---------------------------------------------------------------------------------------------


def momentum_memory_read(M, W1, W2):
    """The memory's weight update read at the unit keys: ``M`` (linear) or ``M + W1 tanh(W2)``."""
    return optimizers.deep_memory_read(M, W1, W2)


def momentum_inner_loss(M, W1, W2, X, U, objective="dot"):
    """Eq. (37)'s ``L~(m; x, -delta)`` for ``m(x) = M x + W1 tanh(W2 x)`` (W1 = None: linear)."""
    _objective(objective)
    Y = X @ M.T  # (N, d_out)
    if W1 is not None:
        Y = Y + np.tanh(X @ W2.T) @ W1.T  # (N, h) @ (h, d_out)
    if objective == "dot":
        return -np.sum(Y * U)  # Eq. (34): -<m(x), u>
    R = Y - U
    return 0.5 * np.sum(R * R)


def momentum_inner_grad(M, W1, W2, X, U, objective="dot"):
    """Hand-written gradient of ``momentum_inner_loss`` w.r.t. (M, W1, W2); with E = dL~/dm(x_n)
    (``-U`` or the residual) and Z = X W2^T: ``dM = E^T X``, ``dW1 = E^T tanh(Z)``,
    ``dW2 = (tanh'(Z) * (E W1))^T X``."""
    _objective(objective)
    Y = X @ M.T
    if W1 is not None:
        Z = X @ W2.T  # (N, h)
        H = np.tanh(Z)
        Y = Y + H @ W1.T
    E = -U if objective == "dot" else Y - U  # (N, d_out)
    dM = E.T @ X
    if W1 is None:
        return dM, None, None
    return dM, E.T @ H, ((1 - H * H) * (E @ W1)).T @ X


def momentum_init(W, hidden=0, init_scale=1.0, seed=0):
    """Memory state ``{"M", "W1", "W2"}``: M = 0 and W1 = 0 (the first read is 0, as momentum),
    W2 ~ N(0, init_scale^2 / hidden) (only when hidden > 0)."""
    state = {"M": np.zeros_like(W)}
    if hidden:
        rng = np.random.default_rng(seed)
        state["W1"] = np.zeros((W.shape[0], hidden), dtype=W.dtype)
        state["W2"] = (rng.standard_normal((hidden, W.shape[1])) * init_scale / np.sqrt(hidden)).astype(W.dtype)
    return state


def momentum_update(W, state, X, dY, lr, momentum=0.9, objective="dot"):
    """Generalised momentum (Eqs. 35-37): one GD step with retention on the memory, then the read::

        theta <- alpha theta - lr grad_theta L~(m; X, U = -dY)      # Eq. (37), theta = (M, W1, W2)
        W <- W + m_read                                            # Eq. (33)

    A linear memory with the dot objective is momentum: ``M <- alpha M - lr dY^T X``. Returns
    ``(W_new, state_new)``; nothing is mutated.
    """
    W, X, dY = _check(W, X, dY)
    W1, W2 = state.get("W1"), state.get("W2")
    dM, dW1, dW2 = momentum_inner_grad(state["M"], W1, W2, X, -dY, objective)
    new = {"M": momentum * state["M"] - lr * dM}  # Eq. (37)
    if W1 is not None:
        new["W1"] = momentum * W1 - lr * dW1  # Eq. (37)
        new["W2"] = momentum * W2 - lr * dW2  # Eq. (37)
    return W + momentum_memory_read(new["M"], new.get("W1"), new.get("W2")), new  # Eq. (33)


# ---------------------------------------------------------------------------------------------
# Eq. (45): continual learning on tasks whose gradients live in orthogonal subspaces.
# ---------------------------------------------------------------------------------------------


def orthogonal_tasks(n_tasks=3, dim=2, seed=0):
    """Eq. (45)'s tasks ``L_i(W) = E[(W^T x - y)^2]``, y = w_i^T x, with inputs of task i in its
    own subspace and whitened there, ``E[x x^T] = Q_i Q_i^T`` (e.g. x = sqrt(dim) q_j for a
    uniformly drawn column q_j of Q_i). The expectation is exact: ``L_i(W) = ||Q_i^T (W - w_i)||^2``,
    gradient ``2 Q_i Q_i^T (W - w_i)``, so the task gradients lie in orthogonal subspaces.
    Returns Q (n_tasks, d, dim), orthonormal blocks of one random rotation, and w (n_tasks, d)."""
    rng = np.random.default_rng(seed)
    d = n_tasks * dim
    R, _ = np.linalg.qr(rng.standard_normal((d, d)))
    Q = np.stack([R[:, i * dim:(i + 1) * dim] for i in range(n_tasks)])  # (n_tasks, d, dim)
    w = np.einsum("ndk,nk->nd", Q, rng.standard_normal((n_tasks, dim)))  # w_i in subspace i
    return Q, w


def orthogonal_tasks_demo(n_tasks=3, dim=2, steps_per_task=20, lr=0.1, momentum=0.9, seed=0):
    """Train ``W`` (from 0) with ``optimizers.make("momentum")`` on the tasks of Eq. (45), one after
    the other, ``steps_per_task`` steps each. Returns a dict of arrays over the steps (row t is
    after t updates, row 0 the start):

    - ``loss`` (n_steps + 1, n_tasks): every task's loss;
    - ``memory`` (n_steps + 1, n_tasks): ``||Q_i^T m||``, the part of the momentum memory in task
      i's subspace. After task i ends it decays exactly like ``momentum ** s``: the optimizer's
      memory of a finished task is gone after a few dozen steps (§4.3).
    """
    Q, w = orthogonal_tasks(n_tasks, dim, seed)
    opt = optimizers.make("momentum", lr=lr, momentum=momentum)
    params = {"W": np.zeros(Q.shape[1])}
    state = opt.init(params)

    def measure(p, s):
        err = np.einsum("ndk,nd->nk", Q, p["W"][None] - w)
        mem = np.einsum("ndk,d->nk", Q, s["m/W"])
        return np.sum(err * err, axis=1), np.linalg.norm(mem, axis=1)

    losses, memories = zip(*[measure(params, state)], strict=True)
    losses, memories = list(losses), list(memories)
    for i in range(n_tasks):
        for _ in range(steps_per_task):
            grad = 2 * Q[i] @ (Q[i].T @ (params["W"] - w[i]))  # grad L_i (Eq. 45)
            params, state = opt.update(params, {"W": grad}, state)
            loss, mem = measure(params, state)
            losses.append(loss)
            memories.append(mem)
    return {"loss": np.array(losses), "memory": np.array(memories)}
