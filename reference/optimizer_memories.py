"""More optimizers as associative memories: the learned preconditioner, Newton-Schulz as inner
gradient descent, higher-order feature maps of the gradient, and the outer-product AdaGrad.

Paper: §4.2-§4.4 and Appendix B, Eqs. (38), (40)-(41), (43)-(44), (51), (101)-(111),
arXiv 2512.24695v1. SPEC: SPEC.md#optimizer-memories.

The three optimizers share ``reference/optimizers.py``'s interface and conventions (pure
``init`` / ``update`` over parameter dicts, flat state ``"step"`` and ``"<slot>/<param>"``)::

    opt = make(name, **hparams)   # optimizer_memories.make (not optimizers.make: SPEC.md#optimizer-memories)
    state = opt.init(params)
    params, state = opt.update(params, grads, state)

Symbols (g = vec(G) is a parameter's gradient flattened, n = its size):

| paper                                   | code                 | shape          |
| --------------------------------------- | -------------------- | -------------- |
| P (preconditioner memory, Eqs. 38-41)   | state["P/key"]       | (n, n)         |
| g-hat (key: the preconditioned step)    | s = W_t - W_{t-1}    | (n,)           |
| g (value: the gradient change)          | y = g_t - g_{t-1}    | (n,)           |
| zeta (inner step of Eq. 41)             | zeta / ||s||^2       | scalar         |
| O_i (Newton-Schulz iterate, Eq. 44)     | O                    | like G         |
| phi (feature map, Eq. 51)               | feature_map          | like G         |
| H (outer-product memory, Eq. 106)       | state["H/key"]       | (n, n)         |
| M~ (momentum memory, Eq. 102)           | state["m/key"]       | (n,)           |

Decisions where the paper is open (all in SPEC.md#optimizer-memories):
- Learned preconditioner: P is a linear memory over vec(G) with the l2 objective
  ``1/2 ||P s - y||^2``; its key is the last step s (the preconditioned gradient, scaled) and its
  value the gradient change y (the secant pair); the normalised step ``zeta / ||s||^2`` (zeta = 1
  is Broyden's update); ``W <- W - lr P^{-1} g`` (Eq. 38).
- Newton-Schulz: Eq. (44) is the GD step on ``1/2 ||O - g||^2 + 1/2 ||O^T O - I||^2`` (Eq. 43
  lacks the first term); ``anchor=0`` drops it, and then zeta = 1/4 is the cubic NS iteration.
  The input is Frobenius-normalised and wide matrices are transposed (the Gram is the small one).
- Feature map: an odd polynomial applied entry-wise to G / max|G|, rescaled by max|G| (degree 1
  in G, so the step keeps momentum's units); the default is the identity (Eq. 51 = momentum).
- Outer-product AdaGrad: the memory objective ``1/2 m^T (H + lam) m - <m, P M~>`` (Eq. 101 with
  the diagonal ``sum g^2`` replaced by ``sum g g^T``); P = H^{1/2}, lam = eps H^{1/2} gives
  ``W <- W - lr (H^{1/2} + eps I)^{-1} M~``; ``M~ <- momentum M~ + g`` (momentum = 0: AdaGrad).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from . import optimizers as O_

# ---------------------------------------------------------------------------------------------
# The learned preconditioner (Eqs. 38, 40-41).
# ---------------------------------------------------------------------------------------------


def precond_inner_loss(P, S, Y):
    """Eq. (40)'s l2 objective over k key/value pairs (columns): ``1/2 ||P S - Y||_F^2``."""
    R = P @ S - Y  # (n, k)
    return 0.5 * np.sum(R * R)


def precond_inner_grad(P, S, Y):
    """``d/dP 1/2 ||P S - Y||^2 = (P S - Y) S^T``; Eq. (41) steps along it. (n, n)."""
    return (P @ S - Y) @ S.T


def _vec(x):
    return x.reshape(-1)


def _check_size(name, params, max_dim):
    for k, p in params.items():
        if p.size > max_dim:
            raise ValueError(f"{name}: parameter {k!r} has {p.size} entries > max_dim={max_dim}; its (n, n) "
                             f"memory would hold {p.size ** 2} numbers (use adagrad / momentum for it)")


def _precond_init(hp, params):
    O_._check_params(params)
    _check_size("learned_preconditioner", params, hp["max_dim"])
    P = {k: hp["init"] * np.eye(p.size, dtype=p.dtype) for k, p in params.items()}
    return O_._pack(0, P=P, w=O_._zeros(params), g=O_._zeros(params))


def _precond_update(hp, params, grads, state):
    """The learned preconditioner (Eqs. 38, 40-41), per parameter, g = vec(G)::

        s = W_t - W_{t-1},  y = g_t - g_{t-1}          (from step 2 on; skipped when s = 0)
        P <- P - zeta/||s||^2 (P s - y) s^T            # Eq. (41) on Eq. (40)'s 1/2||P s - y||^2
        W <- W - lr P^{-1} g_t                          # Eq. (38)

    With zeta = 1, ``P s = y`` after the write (the secant condition): Broyden's update.
    State slots ``P`` (n, n), ``w`` and ``g`` (the previous parameter and gradient).
    """
    O_._check_params(params)
    O_._check_grads(params, grads)
    O_._check_state(state, params, {"P": params, "w": params, "g": params})
    new, P_new = {}, {}
    for k, W in params.items():
        P, g = state[f"P/{k}"], _vec(grads[k])
        if state["step"] > 0:
            s = _vec(W - state[f"w/{k}"])[:, None]  # key (n, 1)
            y = (g - _vec(state[f"g/{k}"]))[:, None]  # value (n, 1)
            ss = float(np.sum(s * s))
            if ss > 0:
                zeta = hp["zeta"] / ss if hp["normalize"] else hp["zeta"]
                P = P - zeta * precond_inner_grad(P, s, y)  # Eq. (41)
        try:
            step = np.linalg.solve(P, g)
        except np.linalg.LinAlgError:
            raise ValueError(f"learned_preconditioner: the memory P of {k!r} became singular") from None
        new[k] = W - hp["lr"] * step.reshape(W.shape)  # Eq. (38)
        P_new[k] = P
    return O_._arrays(new, params), O_._pack(state["step"] + 1, P=P_new,
                                                  w={k: np.array(v) for k, v in params.items()},
                                                  g={k: np.array(v) for k, v in grads.items()})


# ---------------------------------------------------------------------------------------------
# Newton-Schulz as inner gradient descent (Eqs. 43-44).
# ---------------------------------------------------------------------------------------------


def ns_inner_loss(O, g, anchor=1.0):
    """``anchor/2 ||O - g||^2 + 1/2 ||O^T O - I||^2`` (O, g: (a, b) with a >= b): the objective
    whose GD step is Eq. (44) (anchor = 1); anchor = 0 is Eq. (43) (up to its factor 2)."""
    D = O - g
    E = O.T @ O - np.eye(O.shape[1], dtype=O.dtype)
    return 0.5 * anchor * np.sum(D * D) + 0.5 * np.sum(E * E)


def ns_inner_grad(O, g, anchor=1.0):
    """``anchor (O - g) + 2 O (O^T O - I)``, the bracket of Eq. (44)."""
    return anchor * (O - g) + 2 * O @ (O.T @ O - np.eye(O.shape[1], dtype=O.dtype))


def newton_schulz_gd(G, steps=5, zeta=0.25, anchor=1.0, normalize=True, eps=1e-7):
    """Eq. (44): ``O_0 = g``, ``O_{i+1} = O_i - zeta (anchor (O_i - g) + 2 O_i (O_i^T O_i - I))``.

    ``g = G / max(||G||_F, eps)`` when ``normalize`` (the printed O_0 = G diverges for a spectral
    norm above sqrt(3)); wide G is transposed so that O^T O is the smaller Gram matrix. With
    anchor = 0 and zeta = 1/4 each step is the cubic ``O <- O (3 I - O^T O) / 2``; with anchor = 1
    the first step is that cubic too (O_0 = g makes the anchor term vanish).
    """
    if G.ndim != 2:
        raise ValueError(f"newton_schulz_gd: G must be a matrix, got shape {G.shape}")
    wide = G.shape[0] < G.shape[1]
    g = G.T if wide else G
    if normalize:
        g = g / max(float(np.linalg.norm(g)), eps)
    O = g
    for _ in range(steps):
        O = O - zeta * ns_inner_grad(O, g, anchor)  # Eq. (44)
    return O.T if wide else O


# ---------------------------------------------------------------------------------------------
# Higher-order feature maps of the gradient (Eq. 51).
# ---------------------------------------------------------------------------------------------


def feature_map(G, coefficients=(1.0,)):
    """``phi(G) = s sum_j c_j (G / s)^(2j+1)`` entry-wise, ``s = max|G|`` (phi(0) = 0). Odd and
    of degree 1 in G; ``coefficients=(1,)`` is the identity."""
    s = float(np.max(np.abs(G))) if G.size else 0.0
    if s == 0.0:
        return np.zeros_like(G)
    Z = G / s
    return s * sum(c * Z ** (2 * j + 1) for j, c in enumerate(coefficients))  # Eq. (51)'s phi


def feature_map_backward(dphi, G, coefficients=(1.0,)):
    """VJP of ``feature_map`` w.r.t. G (away from ties of max|G|): with p(z) = sum c_j z^(2j+1),
    ``dG = dphi p'(Z) + e_k sign(G_k) sum (dphi (p(Z) - Z p'(Z)))``, k = argmax |G|."""
    s = float(np.max(np.abs(G))) if G.size else 0.0
    if s == 0.0:
        return np.zeros_like(G)
    Z = G / s
    p = sum(c * Z ** (2 * j + 1) for j, c in enumerate(coefficients))
    dp = sum(c * (2 * j + 1) * Z ** (2 * j) for j, c in enumerate(coefficients))
    dG = dphi * dp
    k = np.unravel_index(np.argmax(np.abs(G)), G.shape)
    dG[k] += np.sign(G[k]) * np.sum(dphi * (p - Z * dp))  # through s = |G_k|
    return dG


def _feature_init(hp, params):
    O_._check_params(params)
    return O_._pack(0, m=O_._zeros(params))


def _feature_update(hp, params, grads, state):
    """Momentum over a higher-order feature map of the gradient (Eq. 51, P = I)::

        m <- alpha m - lr phi(G)          # Eq. (51)
        W <- W + m

    ``coefficients=(1,)`` (the default) is momentum. State slot ``m``.
    """
    O_._check_params(params)
    O_._check_grads(params, grads)
    O_._check_state(state, params, {"m": params})
    new, m_new = {}, {}
    for k, W in params.items():
        m = hp["momentum"] * state[f"m/{k}"] - hp["lr"] * feature_map(grads[k], hp["coefficients"])  # Eq. (51)
        m_new[k] = m
        new[k] = W + m
    return O_._arrays(new, params), O_._pack(state["step"] + 1, m=m_new)


# ---------------------------------------------------------------------------------------------
# The outer-product AdaGrad (Appendix B, Eqs. 106-111).
# ---------------------------------------------------------------------------------------------


def _reg(lam, m):
    return lam @ m if np.ndim(lam) == 2 else lam * m  # a scalar lam I or a symmetric matrix


def outer_inner_loss(m, H, PM, lam):
    """The memory objective ``1/2 m^T (H + lam) m - <m, P M~>`` (``PM`` = P M~; lam a scalar times
    I or a symmetric matrix): Eq. (101) with the diagonal ``sum_i g_i^2`` replaced by the
    outer-product memory ``H = sum_i g_i g_i^T``."""
    return 0.5 * m @ (H @ m) + 0.5 * m @ _reg(lam, m) - m @ PM


def outer_inner_grad(m, H, PM, lam):
    """``(H + lam) m - P M~``; zero at the optimum ``m* = (H + lam)^{-1} P M~`` (Eq. 102's analogue)."""
    return H @ m + _reg(lam, m) - PM


def outer_step(H, M, eps):
    """``(H^{1/2} + eps I)^{-1} M`` on the range of H. M~ is a combination of the gradients H holds,
    so it lies in range(H); eigenvalues below ``n * machine-eps * max eigenvalue`` are rounding and
    get no step (dividing their rounding-level components by ``sqrt(1e-17) + eps`` would not)."""
    lam, V = np.linalg.eigh(0.5 * (H + H.T))
    keep = lam > H.shape[0] * np.finfo(H.dtype).eps * max(float(lam[-1]), 0.0)
    V, lam = V[:, keep], lam[keep]
    return V @ ((V.T @ M) / (np.sqrt(lam) + eps))


def _outer_init(hp, params):
    O_._check_params(params)
    _check_size("outer_adagrad", params, hp["max_dim"])
    return O_._pack(0, H={k: np.zeros((p.size, p.size), dtype=p.dtype) for k, p in params.items()},
                    m=O_._zeros(params))


def _outer_update(hp, params, grads, state):
    """Full-matrix AdaGrad with momentum (Eqs. 106-111), per parameter, g = vec(G)::

        H <- H + g g^T;   M~ <- momentum M~ + g                 # Eqs. (106)-(107)
        W <- W - lr (H^{1/2} + eps I)^{-1} M~                    # the optimum with P = H^{1/2}

    momentum = 0 is AdaGrad's full-matrix form; a diagonal H gives ``optimizers.make("adagrad")``.
    State slots ``H`` (n, n) and ``m`` (M~, shaped like W).
    """
    O_._check_params(params)
    O_._check_grads(params, grads)
    O_._check_state(state, params, {"H": params, "m": params})
    new, H_new, m_new = {}, {}, {}
    for k, W in params.items():
        g = _vec(grads[k])
        H = state[f"H/{k}"] + np.outer(g, g)  # Eq. (106): H <- H + g g^T
        M = hp["momentum"] * _vec(state[f"m/{k}"]) + g
        step = outer_step(H, M, hp["eps"])  # the optimum with P = H^{1/2}, lam = eps H^{1/2}
        new[k] = W - hp["lr"] * step.reshape(W.shape)
        H_new[k], m_new[k] = H, M.reshape(W.shape)
    return O_._arrays(new, params), O_._pack(state["step"] + 1, H=H_new, m=m_new)


# ---------------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------------

DEFAULTS: dict[str, dict] = {
    "learned_preconditioner": {"lr": 1.0, "zeta": 1.0, "normalize": True, "init": 1.0, "max_dim": 4096},
    "feature_momentum": {"lr": 1e-3, "momentum": 0.9, "coefficients": (1.0,)},
    "outer_adagrad": {"lr": 1e-2, "momentum": 0.0, "eps": 1e-10, "max_dim": 4096},
}
_FUNCTIONS = {
    "learned_preconditioner": (_precond_init, _precond_update),
    "feature_momentum": (_feature_init, _feature_update),
    "outer_adagrad": (_outer_init, _outer_update),
}
NAMES = tuple(DEFAULTS)


def make(name: str, **hparams) -> O_.Optimizer:
    """The optimizer ``name`` with ``hparams`` over ``DEFAULTS[name]``; bad input: ValueError."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(NAMES)}")
    unknown = sorted(set(hparams) - set(DEFAULTS[name]))
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {unknown}; valid: {', '.join(sorted(DEFAULTS[name]))}")
    hp = {**DEFAULTS[name], **hparams}
    for key, value in hp.items():
        ok = True
        if key in ("lr", "zeta", "eps", "init"):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value) and value >= 0
            ok = ok and (key != "init" or value > 0)
        elif key == "momentum":
            ok = isinstance(value, int | float) and 0 <= value <= 1
        elif key == "normalize":
            ok = isinstance(value, bool)
        elif key == "max_dim":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        elif key == "coefficients":
            ok = isinstance(value, tuple | list) and len(value) >= 1 and all(
                isinstance(c, int | float) and np.isfinite(c) for c in value)
            hp[key] = tuple(float(c) for c in value) if ok else value
        if not ok:
            raise ValueError(f"{name}: hyperparameter {key}={value!r} is invalid")
    init, update = _FUNCTIONS[name]
    return O_.Optimizer(name, dict(hp), partial(init, hp), partial(update, hp))
