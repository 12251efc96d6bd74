"""Optimizers as associative memories: pure ``init`` / ``update`` functions over parameter dicts.

Paper: §4 and §7.2, Eqs. (10)-(13), (33), (42), (46)-(50), (75), Algorithm 1, and Appendix B,
Eqs. (100)-(105), arXiv 2512.24695v1. SPEC: SPEC.md#optimizers.

Every optimizer here is a memory that compresses the gradients it sees, trained online by one
gradient step on its own inner objective; the parameter update reads the memory::

    opt = make(name, **hparams)        # unknown name / hparam / bad value: ValueError listing valid ones
    state = opt.init(params)           # params: dict[str, np.ndarray] (float32 or float64)
    params, state = opt.update(params, grads, state)   # new dicts; inputs are never mutated

Hyperparameters use ``torch.optim``'s names where the concept exists (``lr``, ``momentum``,
``betas``, ``eps``, ``weight_decay``, ``nesterov``, ``ns_steps``); SPEC.md#optimizers maps each
to its paper symbol. State is a flat dict: ``"step"`` (int, updates done) and ``"<slot>/<param>"``
arrays in the parameter's dtype (safetensors-ready); the slots of each optimizer are listed in
its docstring and in SPEC.md#optimizers.

Symbols (a parameter W and its gradient G are viewed as a matrix ``(d_out, d_in)``: 0-d as
``(1, 1)``, 1-d ``(n,)`` as a row ``(1, n)``, k-d as ``(shape[0], prod(rest))``):

| paper                          | code                     | shape                |
| ------------------------------ | ------------------------ | -------------------- |
| W_t (parameter)                | params[key]              | any                  |
| G_t = grad L(W_t) (Eq. 33)     | grads[key], G            | like W / (d_out,d_in) |
| m_t (momentum memory, Eq. 33)  | state["m/key"]           | like W               |
| alpha (retention, Eq. 33)      | momentum                 | scalar in [0, 1]     |
| eta (inner learning rate)      | lr                       | scalar >= 0          |
| P_i (value / preconditioner)   | preconditioner           | "identity" or "rms"  |
| beta1, beta2 (Eq. 102)         | betas                    | scalars              |
| M~ (momentum memory, Eq. 102)  | state["m/key"]           | like W               |
| H (second-moment memory)       | state["v/key"]           | like W               |
| m(.) deep memory (Eq. 50)      | M, W1, W2                | (d_out,d_in), (d_out,h), (h,d_in) |
| NewtonSchulz_k (Eq. 42)        | newton_schulz            | (d_out, d_in)        |
| M1, M2, V, O1, O2 (Alg. 1)     | state["m1","m2","v","o2"] | like W              |
| beta1, beta2, beta3, alpha, f  | betas, alpha, f          | scalars, int         |

Decisions where the paper is open (all in SPEC.md#optimizers):
- Sign convention: the paper's ``W <- W + m`` with ``m`` tracking minus the gradient (Eq. 33);
  ``momentum`` stores that ``m`` (parameter units). Muon and M3 store gradient-unit sums.
- Delta momentum: right multiplication ``m (alpha I - zeta G^T G)`` (arXiv Eq. 49, dimensionally
  correct), with the normalised step ``zeta = delta / ||G||_F^2`` by default so that ``zeta G^T G``
  is dimensionless; ``normalize=False`` is the printed form with ``zeta = delta`` (``delta=1``).
- Deep momentum: a memory ``m(x) = M x + W1 tanh(W2 x)`` over the gradient's rows (shared weights),
  inner objective ``sum_r <m(g_r), e_r>`` (Eq. 50's ``<m(u^T), 1>``), read at the unit keys.
- Muon: ``lr`` outside the Newton-Schulz map (Eq. 42 printed inside, where it would cancel);
  parameters with fewer than 2 dims go to AdamW; torch.optim.Muon's conventions are options.
- M3: Algorithm 1's signs and ``f`` (not Eq. 75's), sums as printed (EMAs an option), the slow
  momentum takes exactly the f gradients of the chunk that just ended, ``sqrt(V) + eps``.
- Non-finite gradients raise ValueError naming the parameter (no silent skip).

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The Muon quintic (a, b, c): X <- a X + b (X X^T) X + c (X X^T)^2 X (SPEC.md#optimizers)."""


class Optimizer(NamedTuple):
    """An optimizer: its name, its full hyperparameters, and two pure functions."""

    name: str
    hparams: dict
    init: Callable[[dict], dict]
    update: Callable[[dict, dict, dict], tuple[dict, dict]]


# ---------------------------------------------------------------------------------------------
# Input checks and small helpers.
# ---------------------------------------------------------------------------------------------


def _check_params(params) -> None:
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict[str, np.ndarray], got {type(params).__name__}")
    for key, p in params.items():
        if not isinstance(p, np.ndarray | np.generic):  # a 0-d NumPy scalar is accepted too
            raise ValueError(f"params[{key!r}] must be a numpy array, got {type(p).__name__}")
        if p.dtype not in (np.float32, np.float64):
            raise ValueError(f"params[{key!r}] must be float32 or float64, got {p.dtype}")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"params[{key!r}] contains NaN or infinite values")


def _check_grads(params, grads) -> None:
    """Same keys, same shape and dtype as the parameter, every entry finite."""
    if not isinstance(grads, dict):
        raise ValueError(f"grads must be a dict[str, np.ndarray], got {type(grads).__name__}")
    missing = sorted(set(params) - set(grads))
    extra = sorted(set(grads) - set(params))
    if missing or extra:
        raise ValueError(f"grads keys must equal params keys: missing {missing}, unexpected {extra}")
    for key, p in params.items():
        g = grads[key]
        if not isinstance(g, np.ndarray | np.generic):
            raise ValueError(f"grads[{key!r}] must be a numpy array, got {type(g).__name__}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{key!r}] has shape {g.shape}, expected {p.shape} (the shape of params[{key!r}])")
        if g.dtype != p.dtype:
            raise ValueError(f"grads[{key!r}] has dtype {g.dtype}, expected {p.dtype} (the dtype of params[{key!r}])")
        bad = int(np.size(g) - np.count_nonzero(np.isfinite(g)))
        if bad:
            raise ValueError(
                f"grads[{key!r}] has {bad} NaN or infinite entries: refusing to update parameter {key!r}"
            )


def _check_state(state, params, slots) -> None:
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError("state must be the dict returned by opt.init(params) (it has no 'step')")
    for slot, keys in slots.items():
        for key in keys:
            name = f"{slot}/{key}"
            if name not in state:
                raise ValueError(f"state has no {name!r}: was it made by opt.init for these params?")
            if state[name].dtype != params[key].dtype:
                raise ValueError(f"state[{name!r}] has dtype {state[name].dtype}, expected {params[key].dtype}")


def as_matrix(x: np.ndarray) -> np.ndarray:
    """The matrix view ``(d_out, d_in)`` of a parameter: 0-d -> (1, 1), (n,) -> (1, n),
    (a, b, ...) -> (a, b*...). A view, not a copy (SPEC.md#optimizers)."""
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        return x.reshape(1, -1)
    return x.reshape(x.shape[0], -1)


def _zeros(params, keys=None) -> dict:
    keys = params if keys is None else keys
    return {k: np.zeros_like(params[k]) for k in keys}


def _slots(state, slot, keys) -> dict:
    return {k: state[f"{slot}/{k}"] for k in keys}


def _pack(step, **slots) -> dict:
    """The flat state dict: ``"step"`` and ``"<slot>/<param>"`` arrays (0-d results stay arrays)."""
    state = {"step": int(step)}
    for slot, arrays in slots.items():
        for k, a in arrays.items():
            state[f"{slot}/{k}"] = np.asarray(a)
    return state


def _arrays(new, params) -> dict:
    """New parameters as arrays in the caller's key order (NumPy turns 0-d results into scalars)."""
    return {k: np.asarray(new[k]) for k in params}


def newton_schulz(G: np.ndarray, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7) -> np.ndarray:
    """Approximate orthogonalisation ``U V^T`` of ``G = U S V^T`` by the Muon quintic.

    Paper: Eq. (42)-(44) name the map; the coefficients are Muon's (SPEC.md#optimizers).
    ``X = G / max(||G||_F, eps)`` (transposed when tall, so ``X X^T`` is the small Gram matrix),
    then ``steps`` times ``X <- a X + (b A + c A A) X`` with ``A = X X^T``. Computes in G's dtype;
    ``newton_schulz(0) = 0``; odd in G and invariant to G's scale (up to eps).
    """
    if G.ndim != 2:
        raise ValueError(f"newton_schulz: G must be a matrix (d_out, d_in), got shape {G.shape}")
    a, b, c = coefficients
    tall = G.shape[0] > G.shape[1]
    X = G.T if tall else G
    X = X / max(float(np.linalg.norm(X)), eps)  # Frobenius norm, so the spectral norm is <= 1
    for _ in range(steps):
        A = X @ X.T  # (n, n), n = min(d_out, d_in)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


# ---------------------------------------------------------------------------------------------
# Inner objectives of the momentum memories and their gradients (the pieces of a forward that
# are themselves gradient steps; each is gradient-checked in reference/cases/optimizers.py).
# ---------------------------------------------------------------------------------------------


def dot_inner_loss(m, G, PG=None):
    """Dot-product objective of momentum, ``<m, P G>`` (Eqs. 13, 34, 46 with P = I: ``<m, G>``)."""
    return np.sum(m * (G if PG is None else PG))


def dot_inner_grad(m, G, PG=None):
    """``d/dm <m, P G> = P G``; one GD step with retention, ``alpha m - eta P G``, is Eq. (33)/(47)."""
    return G if PG is None else PG


def delta_inner_loss(m, G, PG, c):
    """L2-regression objective of delta momentum (Eq. 48), matrix views: ``1/2 ||m G^T + c P||^2``
    written through its gradient-relevant part, ``1/2 ||m G^T||^2 + c <m, P G>`` (the two differ by
    a constant in m). Its GD step with step ``zeta`` and ``c = eta / zeta`` is Eq. (49)."""
    mG = m @ G.T  # (d_out, d_out)
    return 0.5 * np.sum(mG * mG) + c * np.sum(m * PG)


def delta_inner_grad(m, G, PG, c):
    """``d/dm [1/2 ||m G^T||^2 + c <m, P G>] = (m G^T) G + c P G``."""
    return (m @ G.T) @ G + c * PG


def _tanh(x):
    return np.tanh(x)


def _dtanh(x):
    t = np.tanh(x)
    return 1 - t * t


def deep_memory_read(M, W1, W2):
    """The deep momentum memory ``m(x) = M x + W1 tanh(W2 x)`` read at the unit keys ``e_j``:
    ``Delta W[:, j] = m(e_j)``, i.e. ``Delta W = M + W1 tanh(W2)`` (SPEC.md#optimizers). For a
    linear memory (no hidden units) this is M itself, the momentum of Eq. (33)."""
    if W1 is None:
        return M
    return M + W1 @ _tanh(W2)  # (d_out, d_in)


def deep_inner_loss(M, W1, W2, G):
    """Eq. (50)'s inner objective ``<m(G^T), I> = sum_r <m(g_r), e_r>``: the memory maps each
    gradient row g_r (key) towards the unit vector e_r (value 1); matrix views."""
    out = G @ M.T  # (d_out rows r, d_out outputs): row r is m_lin(g_r)
    if W1 is not None:
        out = out + _tanh(G @ W2.T) @ W1.T  # (d_out, h) @ (h, d_out)
    return np.trace(out)


def deep_inner_grad(M, W1, W2, G):
    """Hand-written gradient of ``deep_inner_loss`` w.r.t. (M, W1, W2), with ``Z = G W2^T``:
    ``dM = G``, ``dW1 = tanh(Z)``, ``dW2 = (tanh'(Z) * W1)^T G``. Returns (dM, dW1, dW2)."""
    dM = G  # (d_out, d_in)
    if W1 is None:
        return dM, None, None
    Z = G @ W2.T  # (d_out, h)
    dW1 = _tanh(Z)  # (d_out, h)
    dW2 = (_dtanh(Z) * W1).T @ G  # (h, d_in)
    return dM, dW1, dW2


def appendix_b_optimum(Mtilde, H, P, lam):
    """Eq. (102): the minimiser ``m* = (H + lam)^{-1} * M~ * P`` (element-wise) of Eq. (101),
    ``sum_i ||m * g_i - P||^2 + lam ||m||^2`` with ``M~ = sum_i g_i`` and ``H = sum_i g_i^2``.
    With ``P = H^{1/2}`` (Eq. 105) it is Adam's ``M~ / H^{1/2}``."""
    return Mtilde * P / (H + lam)  # Eq. (102)


# ---------------------------------------------------------------------------------------------
# sgd, momentum, adagrad, adam, adamw.
# ---------------------------------------------------------------------------------------------


def _sgd_init(hp, params):
    _check_params(params)
    return {"step": 0}


def _sgd_update(hp, params, grads, state):
    """W <- W - lr (G + weight_decay W)  (Eq. 1; weight decay coupled, as torch.optim.SGD)."""
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {})
    new = {}
    for k, W in params.items():
        g = grads[k] + hp["weight_decay"] * W if hp["weight_decay"] else grads[k]
        new[k] = W - hp["lr"] * g  # Eq. (1)
    return _arrays(new, params), {"step": state["step"] + 1}


def _momentum_init(hp, params):
    _check_params(params)
    return _pack(0, m=_zeros(params))


def _momentum_update(hp, params, grads, state):
    """Momentum as a memory with the dot-product objective (Eqs. 10-13, 33)::

        m <- alpha m - eta d/dm <m, G> = alpha m - eta G      # Eq. (33)
        W <- W + m                                           # (nesterov: W + alpha m - eta G)

    ``G`` includes ``weight_decay * W`` (coupled). State slot ``m``: the paper's m (parameter
    units; torch's momentum buffer is ``-m / lr``).
    """
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {"m": params})
    alpha, eta = hp["momentum"], hp["lr"]
    new, m_new = {}, {}
    for k, W in params.items():
        g = grads[k] + hp["weight_decay"] * W if hp["weight_decay"] else grads[k]
        m = alpha * state[f"m/{k}"] - eta * dot_inner_grad(state[f"m/{k}"], g)  # Eq. (33)
        m_new[k] = m
        new[k] = W + (alpha * m - eta * g if hp["nesterov"] else m)  # Eq. (33)
    return _arrays(new, params), _pack(state["step"] + 1, m=m_new)


def _adagrad_init(hp, params):
    _check_params(params)
    return _pack(0, sum={k: np.full_like(p, hp["initial_accumulator_value"]) for k, p in params.items()})


def _adagrad_update(hp, params, grads, state):
    """AdaGrad, the outer-product memory of Appendix B (Eqs. 106-111) with beta1 = 1, diagonal::

        H <- H + G^2;   W <- W - lr_t G / (sqrt(H) + eps),   lr_t = lr / (1 + (t - 1) lr_decay)

    State slot ``sum``: H. Weight decay coupled, as torch.optim.Adagrad.
    """
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {"sum": params})
    t = state["step"] + 1
    clr = hp["lr"] / (1 + (t - 1) * hp["lr_decay"])
    new, H_new = {}, {}
    for k, W in params.items():
        g = grads[k] + hp["weight_decay"] * W if hp["weight_decay"] else grads[k]
        H = state[f"sum/{k}"] + g * g  # Eq. (102), H memory (beta2 = 1)
        H_new[k] = H
        new[k] = W - clr * g / (np.sqrt(H) + hp["eps"])  # Eq. (102) with P = H^{1/2}
    return _arrays(new, params), _pack(t, sum=H_new)


def _adam_init(hp, params):
    _check_params(params)
    return _pack(0, m=_zeros(params), v=_zeros(params))


def _adam_update(hp, params, grads, state, decoupled):
    """Adam / AdamW as the Appendix B memory (Eqs. 100-105).

    The memory ``m*`` minimises Eq. (101); its optimum (Eq. 102) with ``P = H^{1/2}`` (Eq. 105) is
    ``M~ / H^{1/2}``, with ``eps`` added to the denominator (equivalently ``lam = eps H^{1/2}``).

    ``form="standard"`` (default): EMAs with bias correction (torch.optim.Adam/AdamW)::

        M~ <- beta1 M~ + (1 - beta1) G;   H <- beta2 H + (1 - beta2) G^2
        W  <- W - lr / (1 - beta1^t) * M~ / (sqrt(H / (1 - beta2^t)) + eps)

    (``bias_correction=False`` drops both corrections.) ``form="paper"``: Eqs. (102), (105) as
    printed: ``M~ <- M~ + beta1 G``, ``H <- H + beta2 G^2``, ``W <- W - lr/sqrt(beta2) M~/(sqrt(H) + eps)``.

    Weight decay: Adam adds ``weight_decay W`` to G; AdamW first does ``W <- W (1 - lr weight_decay)``.
    State slots ``m`` (M~) and ``v`` (H).
    """
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {"m": params, "v": params})
    b1, b2 = hp["betas"]
    lr, eps, wd = hp["lr"], hp["eps"], hp["weight_decay"]
    t = state["step"] + 1
    new, m_new, v_new = {}, {}, {}
    for k, W in params.items():
        g = grads[k]
        if wd and decoupled:
            W = W * (1 - lr * wd)
        elif wd:
            g = g + wd * W
        if hp["form"] == "paper":
            Mt = state[f"m/{k}"] + b1 * g  # Eq. (102), M~ memory
            H = state[f"v/{k}"] + b2 * g * g  # Eq. (102), H memory
            new[k] = W - (lr / float(np.sqrt(b2))) * Mt / (np.sqrt(H) + eps)  # Eq. (105)
        else:
            Mt = state[f"m/{k}"] + (1 - b1) * (g - state[f"m/{k}"])  # Eq. (102) as an EMA
            H = b2 * state[f"v/{k}"] + (1 - b2) * g * g  # Eq. (102) as an EMA
            bc1 = 1 - b1**t if hp["bias_correction"] else 1.0
            bc2 = 1 - b2**t if hp["bias_correction"] else 1.0
            denom = np.sqrt(H) / bc2**0.5 + eps  # P = H^{1/2}, Eq. (105)
            new[k] = W - (lr / bc1) * Mt / denom  # Eq. (102)-(105): W - lr m*
        m_new[k], v_new[k] = Mt, H
    return _arrays(new, params), _pack(t, m=m_new, v=v_new)


# ---------------------------------------------------------------------------------------------
# preconditioned_momentum, delta_momentum, deep_momentum.
# ---------------------------------------------------------------------------------------------


def _precondition(hp, g, v, t):
    """The value ``P_i G_i`` of Eqs. (46)-(49) and the new second-moment memory.

    ``identity``: P = I. ``rms``: the diagonal ``P = diag(1 / (sqrt(v_hat) + eps))`` acting on vec(G),
    ``v <- beta2 v + (1 - beta2) G^2``, ``v_hat = v / (1 - beta2^t)`` (SPEC.md#optimizers).
    """
    if hp["preconditioner"] == "identity":
        return g, v
    v = hp["beta2"] * v + (1 - hp["beta2"]) * g * g
    v_hat = v / (1 - hp["beta2"] ** t)
    return g / (np.sqrt(v_hat) + hp["eps"]), v


def _precond_momentum_init(hp, params):
    _check_params(params)
    return _pack(0, m=_zeros(params), v=_zeros(params))


def _precond_momentum_update(hp, params, grads, state):
    """Preconditioned momentum (Eqs. 46-47; retention as the text says)::

        m <- alpha m - eta d/dm <m G^T, P> = alpha m - eta P G     # Eq. (47)
        W <- W + m

    State slots ``m`` and ``v`` (the rms preconditioner's memory; zeros for ``identity``).
    """
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {"m": params, "v": params})
    t = state["step"] + 1
    new, m_new, v_new = {}, {}, {}
    for k, W in params.items():
        PG, v_new[k] = _precondition(hp, grads[k], state[f"v/{k}"], t)
        m = hp["momentum"] * state[f"m/{k}"] - hp["lr"] * dot_inner_grad(state[f"m/{k}"], grads[k], PG)  # Eq. (47)
        m_new[k] = m
        new[k] = W + m
    return _arrays(new, params), _pack(t, m=m_new, v=v_new)


def _delta_momentum_init(hp, params):
    _check_params(params)
    return _pack(0, m=_zeros(params), v=_zeros(params))


def _delta_momentum_update(hp, params, grads, state):
    """Delta momentum: momentum with the L2-regression objective (Eqs. 48-49), matrix views::

        zeta = delta / (||G||_F^2 + eps)     (normalize=True; printed form: zeta = delta)
        m <- m (alpha I - zeta G^T G) - eta P G                      # Eq. (49)
        W <- W + m

    This is ``alpha m - zeta * delta_inner_grad(m, G, P G, c)`` with ``c = eta / zeta``: one GD step
    of size zeta on Eq. (48)'s ``1/2 ||m G^T + c P||^2`` plus the retention of Eq. (33). With
    ``delta = 0`` it is ``momentum`` (``preconditioned_momentum`` for another P). The decay
    ``zeta G^T G`` removes the part of the momentum along the current gradient's row space.
    State slots ``m`` and ``v`` (as preconditioned_momentum).
    """
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {"m": params, "v": params})
    t = state["step"] + 1
    alpha, eta, delta = hp["momentum"], hp["lr"], hp["delta"]
    new, m_new, v_new = {}, {}, {}
    for k, W in params.items():
        PG, v_new[k] = _precondition(hp, grads[k], state[f"v/{k}"], t)
        m = as_matrix(state[f"m/{k}"])  # (d_out, d_in)
        G = as_matrix(grads[k])  # (d_out, d_in)
        zeta = delta / (float(np.sum(G * G)) + hp["eps"]) if hp["normalize"] else delta
        decay = (m @ G.T) @ G  # m G^T G, (d_out, d_in)
        m = alpha * m - zeta * decay - eta * as_matrix(PG)  # Eq. (49)
        m_new[k] = m.reshape(W.shape)
        new[k] = W + m_new[k]
    return _arrays(new, params), _pack(t, m=m_new, v=v_new)


def _deep_momentum_init(hp, params):
    """Memory per parameter: M = 0 (d_out, d_in), W1 = 0 (d_out, h) (so the first read is 0, as
    momentum's), W2 ~ N(0, init_scale^2 / h) (h, d_in) drawn from seed and the parameter's name."""
    _check_params(params)
    Ms, W1s, W2s = {}, {}, {}
    h = hp["hidden"]
    for k, p in params.items():
        d_out, d_in = as_matrix(p).shape
        Ms[k] = np.zeros((d_out, d_in), dtype=p.dtype)
        if h:
            rng = np.random.default_rng([hp["seed"], zlib.crc32(k.encode())])
            W1s[k] = np.zeros((d_out, h), dtype=p.dtype)
            W2s[k] = (rng.standard_normal((h, d_in)) * (hp["init_scale"] / np.sqrt(h))).astype(p.dtype)
    if h:
        return _pack(0, M=Ms, W1=W1s, W2=W2s)
    return _pack(0, M=Ms)


def _deep_momentum_update(hp, params, grads, state):
    """Deep momentum gradient descent, DMGD (Eq. 50), on the matrix view of each parameter::

        m(x) = M x + W1 tanh(W2 x)                         memory (R^d_in -> R^d_out), shared by rows
        L2(m; G) = sum_r <m(g_r), e_r>                     inner objective (Eq. 50: <m(u^T), 1>)
        (M, W1, W2) <- alpha (M, W1, W2) - eta grad L2     # Eq. (50), deep_inner_grad
        W <- W + [m(e_1) ... m(e_d_in)] = W + M + W1 tanh(W2)

    With ``hidden = 0`` (a linear memory) this is ``momentum``: ``M <- alpha M - eta G``, W + M.
    State slots ``M``, ``W1``, ``W2`` (the last two only when hidden > 0).
    """
    _check_params(params)
    _check_grads(params, grads)
    h = hp["hidden"]
    slots = {"M": params, "W1": params, "W2": params} if h else {"M": params}
    for key in params:
        if f"M/{key}" in state and state[f"M/{key}"].shape != as_matrix(params[key]).shape:
            raise ValueError(f"state['M/{key}'] has shape {state[f'M/{key}'].shape}, expected {as_matrix(params[key]).shape}")
    _check_state(state, params, slots)
    alpha, eta = hp["momentum"], hp["lr"]
    new, Ms, W1s, W2s = {}, {}, {}, {}
    for k, W in params.items():
        G = as_matrix(grads[k])  # (d_out, d_in)
        M = state[f"M/{k}"]
        W1 = state[f"W1/{k}"] if h else None
        W2 = state[f"W2/{k}"] if h else None
        dM, dW1, dW2 = deep_inner_grad(M, W1, W2, G)
        Ms[k] = alpha * M - eta * dM  # Eq. (50)
        if h:
            W1s[k] = alpha * W1 - eta * dW1  # Eq. (50)
            W2s[k] = alpha * W2 - eta * dW2  # Eq. (50)
        read = deep_memory_read(Ms[k], W1s.get(k), W2s.get(k))  # m_{i+1} at the unit keys
        new[k] = W + read.reshape(W.shape)  # Eq. (50)
    if h:
        return _arrays(new, params), _pack(state["step"] + 1, M=Ms, W1=W1s, W2=W2s)
    return _arrays(new, params), _pack(state["step"] + 1, M=Ms)


# ---------------------------------------------------------------------------------------------
# muon and m3.
# ---------------------------------------------------------------------------------------------


def _muon_adjust_lr(lr, fn, shape):
    """torch.optim.Muon's learning-rate adjustment; ``None`` leaves lr as it is (the paper's)."""
    A, B = shape[0], int(np.prod(shape[1:]))
    if fn == "original":
        return lr * float(np.sqrt(max(1.0, A / B)))
    if fn == "match_rms_adamw":
        return lr * 0.2 * float(np.sqrt(max(A, B)))
    return lr


def _muon_init(hp, params):
    _check_params(params)
    mats = [k for k, p in params.items() if p.ndim >= 2]
    rest = [k for k, p in params.items() if p.ndim < 2]
    return _pack(0, m=_zeros(params), v=_zeros(params, rest)) if rest else _pack(0, m=_zeros(params, mats))


def _muon_update(hp, params, grads, state):
    """Muon (Eq. 42): momentum followed by Newton-Schulz, for parameters with >= 2 dims::

        B <- momentum B + G           (ema=True: B <- momentum B + (1 - momentum) G, torch's lerp)
        U  = B                        (nesterov=True: G + momentum B; ema: (1-momentum) G + momentum B)
        W <- W (1 - lr weight_decay) - adjust(lr) NewtonSchulz_k(U)       # Eq. (42)

    The paper's ``m = -lr B`` (Eq. 42 puts lr inside NS, where NS's scale invariance cancels it).
    Parameters with fewer than 2 dims (biases, gains) follow the usual Muon convention: AdamW with
    ``adamw_lr`` (default ``lr``), ``adamw_betas``, ``adamw_eps`` and the same ``weight_decay``.
    State slots ``m`` (B, or Adam's M~ for the AdamW parameters) and ``v`` (AdamW parameters only).
    """
    _check_params(params)
    _check_grads(params, grads)
    mats = {k: p for k, p in params.items() if p.ndim >= 2}
    rest = {k: p for k, p in params.items() if p.ndim < 2}
    _check_state(state, params, {"m": params, "v": rest})
    mu, lr, wd = hp["momentum"], hp["lr"], hp["weight_decay"]
    t = state["step"] + 1
    new, m_new, v_new = {}, {}, {}
    for k, W in mats.items():
        g = grads[k]
        B = state[f"m/{k}"]
        B = B + (1 - mu) * (g - B) if hp["ema"] else mu * B + g  # momentum memory, Eq. (42)
        if hp["nesterov"]:
            U = g + mu * (B - g) if hp["ema"] else g + mu * B
        else:
            U = B
        O = newton_schulz(as_matrix(U), hp["ns_steps"], hp["ns_coefficients"], hp["eps"]).reshape(W.shape)
        W = W * (1 - lr * wd) if wd else W
        new[k] = W - _muon_adjust_lr(lr, hp["adjust_lr_fn"], W.shape) * O  # Eq. (42)
        m_new[k] = B
    if rest:
        adam_hp = {"lr": lr if hp["adamw_lr"] is None else hp["adamw_lr"], "betas": hp["adamw_betas"],
                   "eps": hp["adamw_eps"], "weight_decay": wd, "form": "standard", "bias_correction": True}
        sub_state = _pack(state["step"], m=_slots(state, "m", rest), v=_slots(state, "v", rest))
        sub_new, sub_state = _adam_update(adam_hp, rest, {k: grads[k] for k in rest}, sub_state, decoupled=True)
        new.update(sub_new)
        m_new.update(_slots(sub_state, "m", rest))
        v_new.update(_slots(sub_state, "v", rest))
    new = {k: new[k] for k in params}  # keep the caller's key order
    return _arrays(new, params), _pack(t, m=m_new, v=v_new)


def _m3_init(hp, params):
    _check_params(params)
    return _pack(0, m1=_zeros(params), m2=_zeros(params), v=_zeros(params), gsum=_zeros(params), o2=_zeros(params))


def _m3_orthogonalise(hp, X):
    """Newton-Schulz on the matrix view of every parameter (SPEC.md#optimizers): for a vector,
    the (1, n) row, whose NS is its direction (up to the quintic's ~[0.7, 1.2] gain); an identity
    here would let sum(G) / sqrt(sum(G^2)) grow like sqrt(t), and M3 diverges on a quadratic."""
    return newton_schulz(as_matrix(X), hp["ns_steps"], NS_COEFFICIENTS, 1e-7).reshape(X.shape)


def _m3_update(hp, params, grads, state):
    """Multi-scale Momentum Muon, M3 (Algorithm 1; Eq. 75), per parameter, step t = 1, 2, ...::

        M1 <- M1 + beta1 G;  V <- V + beta2 G^2                   # Alg. 1 lines 7-8 (ema: EMAs)
        O1 = NS(M1)                                               # line 9
        W <- W - lr (O1 + alpha O2) / (sqrt(V) + eps)             # line 10
        if t % f == 0:  M2 <- M2 + beta3 sum_{s=t-f+1}^{t} G_s;  O2 = NS(M2)   # lines 3-4

    so steps ``kf+1 .. (k+1)f`` use the slow memory built from chunks ``0 .. k-1`` (O2 = 0 in the
    first chunk). ``ema=True``: ``M1 <- b1 M1 + (1-b1) G``, ``V <- b2 V + (1-b2) G^2``,
    ``M2 <- b3 M2 + (1-b3) sum``. NS (the Muon quintic) acts on every parameter's matrix view (a
    vector is a (1, n) row). Decoupled weight decay ``W (1 - lr weight_decay)`` first (0 default).
    State slots ``m1``, ``m2``, ``v``, ``gsum`` (this chunk's gradient sum) and ``o2`` (NS(M2)).
    """
    _check_params(params)
    _check_grads(params, grads)
    _check_state(state, params, {s: params for s in ("m1", "m2", "v", "gsum", "o2")})
    b1, b2, b3 = hp["betas"]
    lr, alpha, eps, wd = hp["lr"], hp["alpha"], hp["eps"], hp["weight_decay"]
    t = state["step"] + 1
    out = {s: {} for s in ("m1", "m2", "v", "gsum", "o2")}
    new = {}
    for k, W in params.items():
        g = grads[k]
        gsum = state[f"gsum/{k}"] + g
        if hp["ema"]:
            M1 = b1 * state[f"m1/{k}"] + (1 - b1) * g
            V = b2 * state[f"v/{k}"] + (1 - b2) * g * g
        else:
            M1 = state[f"m1/{k}"] + b1 * g  # Alg. 1 line 7 (Eq. 75, first level)
            V = state[f"v/{k}"] + b2 * g * g  # Alg. 1 line 8
        O1 = _m3_orthogonalise(hp, M1)  # Alg. 1 line 9
        O2 = state[f"o2/{k}"]
        W = W * (1 - lr * wd) if wd else W
        new[k] = W - lr * (O1 + alpha * O2) / (np.sqrt(V) + eps)  # Alg. 1 line 10 (Eq. 75 aggregation)
        M2 = state[f"m2/{k}"]
        if t % hp["f"] == 0:
            M2 = b3 * M2 + (1 - b3) * gsum if hp["ema"] else M2 + b3 * gsum  # Alg. 1 line 3 (Eq. 75)
            O2 = _m3_orthogonalise(hp, M2)  # Alg. 1 line 4
            gsum = np.zeros_like(gsum)
        for s, a in (("m1", M1), ("m2", M2), ("v", V), ("gsum", gsum), ("o2", O2)):
            out[s][k] = a
    return _arrays(new, params), _pack(t, **out)


# ---------------------------------------------------------------------------------------------
# The registry and make().
# ---------------------------------------------------------------------------------------------

_MOMENTUM_FAMILY = {"lr": 1e-3, "momentum": 0.9}
DEFAULTS: dict[str, dict] = {
    "sgd": {"lr": 1e-3, "weight_decay": 0.0},
    "momentum": {**_MOMENTUM_FAMILY, "nesterov": False, "weight_decay": 0.0},
    "adagrad": {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10},
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "bias_correction": True,
             "form": "standard"},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "bias_correction": True,
              "form": "standard"},
    "preconditioned_momentum": {**_MOMENTUM_FAMILY, "preconditioner": "rms", "beta2": 0.999, "eps": 1e-8},
    "delta_momentum": {**_MOMENTUM_FAMILY, "delta": 1.0, "normalize": True, "preconditioner": "identity",
                       "beta2": 0.999, "eps": 1e-12},
    "deep_momentum": {**_MOMENTUM_FAMILY, "hidden": 8, "init_scale": 1.0, "seed": 0},
    "muon": {"lr": 1e-3, "momentum": 0.95, "nesterov": False, "ema": False, "weight_decay": 0.0,
             "ns_steps": 5, "ns_coefficients": NS_COEFFICIENTS, "eps": 1e-7, "adjust_lr_fn": None,
             "adamw_lr": None, "adamw_betas": (0.9, 0.999), "adamw_eps": 1e-8},
    "m3": {"lr": 1e-3, "betas": (0.9, 0.999, 0.9), "alpha": 0.5, "f": 10, "eps": 1e-8, "ns_steps": 5,
           "ema": False, "weight_decay": 0.0},
}
"""Every optimizer's hyperparameters and their defaults (SPEC.md#optimizers maps them to the paper)."""

_FUNCTIONS = {
    "sgd": (_sgd_init, _sgd_update),
    "momentum": (_momentum_init, _momentum_update),
    "adagrad": (_adagrad_init, _adagrad_update),
    "adam": (_adam_init, partial(_adam_update, decoupled=False)),
    "adamw": (_adam_init, partial(_adam_update, decoupled=True)),
    "preconditioned_momentum": (_precond_momentum_init, _precond_momentum_update),
    "delta_momentum": (_delta_momentum_init, _delta_momentum_update),
    "deep_momentum": (_deep_momentum_init, _deep_momentum_update),
    "muon": (_muon_init, _muon_update),
    "m3": (_m3_init, _m3_update),
}

NAMES = tuple(DEFAULTS)


def _check_hparams(name, hp) -> None:
    def bad(key, want):
        raise ValueError(f"{name}: hyperparameter {key}={hp[key]!r} is invalid: expected {want}")

    for key, value in hp.items():
        if key in ("lr", "weight_decay", "eps", "lr_decay", "initial_accumulator_value", "init_scale",
                   "adamw_eps", "delta") and not (isinstance(value, int | float) and not isinstance(value, bool)
                                                    and np.isfinite(value) and value >= 0):
            bad(key, "a finite number >= 0")
        if key in ("momentum", "alpha", "beta2") and not (isinstance(value, int | float) and 0 <= value <= 1):
            bad(key, "a number in [0, 1]")
        if key in ("nesterov", "ema", "bias_correction", "normalize") and not isinstance(value, bool):
            bad(key, "True or False")
        if key in ("ns_steps", "f", "hidden", "seed") and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= (0 if key in ("hidden", "seed") else 1)):
            bad(key, "an integer >= 1" if key in ("ns_steps", "f") else "an integer >= 0")
    if "betas" in hp:
        n = 3 if name == "m3" else 2
        if not (isinstance(hp["betas"], tuple | list) and len(hp["betas"]) == n
                and all(isinstance(b, int | float) and 0 <= b < 1 for b in hp["betas"])):
            bad("betas", f"a tuple of {n} numbers in [0, 1)")
        hp["betas"] = tuple(float(b) for b in hp["betas"])
    if "adamw_betas" in hp and not (len(hp["adamw_betas"]) == 2 and all(0 <= b < 1 for b in hp["adamw_betas"])):
        bad("adamw_betas", "a tuple of 2 numbers in [0, 1)")
    if "adamw_lr" in hp and hp["adamw_lr"] is not None and not hp["adamw_lr"] >= 0:
        bad("adamw_lr", "None or a number >= 0")
    if "ns_coefficients" in hp and len(hp["ns_coefficients"]) != 3:
        bad("ns_coefficients", "three numbers (a, b, c)")
    if hp.get("form", "standard") not in ("standard", "paper"):
        bad("form", "'standard' or 'paper'")
    if hp.get("preconditioner", "identity") not in ("identity", "rms"):
        bad("preconditioner", "'identity' or 'rms'")
    if hp.get("adjust_lr_fn") not in (None, "original", "match_rms_adamw"):
        bad("adjust_lr_fn", "None, 'original' or 'match_rms_adamw'")
    if name in ("momentum", "muon") and hp.get("nesterov") and hp["momentum"] == 0:
        bad("nesterov", "False when momentum is 0")


def make(name: str, **hparams) -> Optimizer:
    """The optimizer ``name`` with ``hparams`` over its defaults (``DEFAULTS[name]``).

    Unknown names, unknown hyperparameters and bad values raise ValueError listing the valid ones.
    """
    if name not in DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(NAMES)}")
    unknown = sorted(set(hparams) - set(DEFAULTS[name]))
    if unknown:
        raise ValueError(
            f"{name}: unknown hyperparameter(s) {unknown}; valid: {', '.join(sorted(DEFAULTS[name]))}"
        )
    hp = {**DEFAULTS[name], **hparams}
    _check_hparams(name, hp)
    init, update = _FUNCTIONS[name]
    return Optimizer(name, dict(hp), partial(init, hp), partial(update, hp))
