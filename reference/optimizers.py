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

Where things live: this module is the interface (``Optimizer``, ``DEFAULTS``, ``NAMES``, ``make``
and its hyperparameter checks); the input checks, the flat-state helpers and sgd, momentum,
adagrad, adam, adamw are in reference/classic_optimizers.py; preconditioned, delta and deep
momentum, Newton-Schulz, Muon and M3 in reference/deep_optimizers.py. Every name stays
importable from here (re-exported below).

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np

# The classic optimizers and the shared checks live in reference/classic_optimizers.py; re-exported.
from .classic_optimizers import (  # noqa: F401
    _adagrad_init,
    _adagrad_update,
    _adam_init,
    _adam_update,
    _arrays,
    _check_grads,
    _check_params,
    _check_state,
    _momentum_init,
    _momentum_update,
    _pack,
    _sgd_init,
    _sgd_update,
    _slots,
    _zeros,
    appendix_b_optimum,
    as_matrix,
    dot_inner_grad,
    dot_inner_loss,
)

# The paper's new optimizers live in reference/deep_optimizers.py; re-exported.
from .deep_optimizers import (  # noqa: F401
    NS_COEFFICIENTS,
    _deep_momentum_init,
    _deep_momentum_update,
    _delta_momentum_init,
    _delta_momentum_update,
    _dtanh,
    _m3_init,
    _m3_orthogonalise,
    _m3_update,
    _muon_adjust_lr,
    _muon_init,
    _muon_update,
    _precond_momentum_init,
    _precond_momentum_update,
    _precondition,
    _tanh,
    deep_inner_grad,
    deep_inner_loss,
    deep_memory_read,
    delta_inner_grad,
    delta_inner_loss,
    newton_schulz,
)


class Optimizer(NamedTuple):
    """An optimizer: its name, its full hyperparameters, and two pure functions."""

    name: str
    hparams: dict
    init: Callable[[dict], dict]
    update: Callable[[dict, dict, dict], tuple[dict, dict]]


# ---------------------------------------------------------------------------------------------
# The registry and make().
# ---------------------------------------------------------------------------------------------

_MOMENTUM_FAMILY = {"lr": 1e-3, "momentum": 0.9}
DEFAULTS: dict[str, dict] = {
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
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
        if key in ("momentum", "alpha", "beta2", "dampening") and not (isinstance(value, int | float) and 0 <= value <= 1):
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
    if name in ("sgd", "momentum", "muon") and hp.get("nesterov") and hp["momentum"] == 0:
        bad("nesterov", "False when momentum is 0")
    if name == "sgd" and hp["nesterov"] and hp["dampening"] != 0:
        bad("nesterov", "False when dampening is not 0 (torch.optim.SGD's rule)")


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
