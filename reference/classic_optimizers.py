"""The classic optimizers as associative memories (sgd, momentum, adagrad, adam, adamw), and the
input checks and flat-state helpers that every optimizer of reference/optimizers.py shares.

Paper: §4 and §7.2, Eqs. (1), (10)-(13), (33), and Appendix B, Eqs. (100)-(111), arXiv 2512.24695v1.
SPEC: SPEC.md#optimizers.

Part of ``reference/optimizers.py`` (its docstring has the interface, the symbols and the
decisions; ``optimizers.make`` is the way in, and every name here is re-exported there). The
paper's new optimizers (delta and deep momentum, Muon, M3) are in reference/deep_optimizers.py.

Each optimizer is a pair ``_<name>_init(hp, params)`` / ``_<name>_update(hp, params, grads, state)``
over parameter dicts; ``hp`` is the full hyperparameter dict that ``make`` checked. State is a
flat dict: ``"step"`` and ``"<slot>/<param>"`` arrays (``_pack``).

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

import numpy as np

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


# ---------------------------------------------------------------------------------------------
# The dot-product objective of momentum and Appendix B's optimum (Adam's memory); gradient-checked
# in reference/cases/optimizers.py.
# ---------------------------------------------------------------------------------------------


def dot_inner_loss(m, G, PG=None):
    """Dot-product objective of momentum, ``<m, P G>`` (Eqs. 13, 34, 46 with P = I: ``<m, G>``)."""
    return np.sum(m * (G if PG is None else PG))


def dot_inner_grad(m, G, PG=None):
    """``d/dm <m, P G> = P G``; one GD step with retention, ``alpha m - eta P G``, is Eq. (33)/(47)."""
    return G if PG is None else PG

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
    if hp["momentum"]:
        return _pack(0, buf=_zeros(params))
    return {"step": 0}


def _sgd_update(hp, params, grads, state):
    """torch.optim.SGD: ``W <- W - lr (G + weight_decay W)`` (Eq. 1; weight decay coupled), and
    with ``momentum`` mu > 0 its buffer in gradient units::

        b <- mu b + (1 - dampening) G    (b <- G at the first step)
        W <- W - lr b                    (nesterov: W - lr (G + mu b))

    The learning rate multiplies the buffer at each step, so under a schedule this is torch's
    SGD, not ``momentum`` (whose memory m holds lr-weighted gradients, Eq. 33: the two agree at a
    constant lr without dampening). State slot ``buf``: torch's momentum buffer."""
    _check_params(params)
    _check_grads(params, grads)
    mu = hp["momentum"]
    _check_state(state, params, {"buf": params} if mu else {})
    new, bufs = {}, {}
    for k, W in params.items():
        g = grads[k] + hp["weight_decay"] * W if hp["weight_decay"] else grads[k]
        if mu:
            b = g if state["step"] == 0 else mu * state[f"buf/{k}"] + (1 - hp["dampening"]) * g
            bufs[k] = b
            g = g + mu * b if hp["nesterov"] else b
        new[k] = W - hp["lr"] * g  # Eq. (1)
    if mu:
        return _arrays(new, params), _pack(state["step"] + 1, buf=bufs)
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
