"""Linear attention, DeltaNet and Gated DeltaNet as multi-head sequence layers over memory.py's rules.

Paper: NL §1-§2 and §5, Eqs. (14)-(18), (64)-(65), arXiv 2512.24695v1; DeltaNet: Schlag et al.
2021, Yang et al. 2024 (arXiv 2406.06484); Gated DeltaNet as Titans App. C / MIRAS Eq. 9 write it.
SPEC: SPEC.md#linear-families (the rules themselves: SPEC.md#memory).

Symbols (B batch, T tokens, D width, H heads, dh = D / H):

| paper                      | code                     | shape           |
| -------------------------- | ------------------------ | --------------- |
| x_t                        | ``x``                    | (B, T, D)       |
| q_t, k_t (l2-normalised)   | ``q, k``                 | (B, H, T, dh)   |
| v_t                        | ``v``                    | (B, H, T, dh)   |
| beta_t (DeltaNet's rate)   | ``beta`` (memory's eta)  | (B, H, T)       |
| alpha_t (retention gate)   | ``alpha``                | (B, H, T)       |
| M_t (S_t in DeltaNet)      | ``state["M"]``           | (B, H, dh, dh)  |
| W_q, W_k, W_v, W_o         | ``W_q, W_k, W_v, W_o``   | (D, D)          |

The layer projects x to per-head q, k, v, computes the gates, runs one rule of reference/memory.py
in its chunk form (``hebbian_chunked`` / ``delta_chunked``, exact rewrites of the token
recurrences, so the chunk size changes rounding only), normalises each head's read with RMSNorm
(a gain shared by the heads) and mixes the heads with W_o. The backward is the rules' own
hand-written chunk backward plus the projections' VJPs; no autograd.

Decisions where the papers are open (each in SPEC.md#linear-families):
- ``linear-attention``: M_t = M_{t-1} + v_t k_t^T (NL Eqs. 14-18: Hebbian, eta = alpha = 1);
  ``deltanet``: M_t = M_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T (Eq. 65 on the key side);
  ``gated-deltanet``: M_t = M_{t-1} (alpha_t I - beta_t k_t k_t^T) + beta_t v_t k_t^T, i.e.
  alpha_t M_{t-1} - beta_t grad 1/2 ||M_{t-1} k_t - v_t||^2 (Titans App. C with eta = 0, MIRAS
  Eq. 9, memory.py's gated delta rule); Yang et al.'s Gated DeltaNet writes
  alpha_t M_{t-1} (I - beta_t k k^T), which differs by alpha_t on the k k^T term;
  ``dgd`` (NL §4.5, Delta Gradient Descent as a layer): the gated delta rule at the exact proximal
  step, M_t = M_{t-1} (alpha_t I - beta'_t k_t k_t^T) + beta'_t v_t k_t^T with beta' = beta / (1 +
  beta ||k||^2) (Eqs. 56-57, memory.py's dgd rule): with alpha = 1, M_t is the exact minimiser of
  1/2 ||M k_t - v_t||^2 + 1/(2 beta_t) ||M - M_{t-1}||^2 (with unit keys beta' = beta / (1 + beta));
- q and k l2-normalised per head (DeltaNet's choice; for linear attention too, so that the
  three families differ in the rule alone); no feature map, no short convolution;
- beta_t = sigmoid(x_t . w_beta + b_beta), alpha_t = sigmoid(x_t . w_alpha + b_alpha), one scalar
  per token and head (the Titans layer's gate parameterisation); init b_beta = 0, b_alpha = 4;
- the initial memory is zero (not meta-learned: the published baselines' choice; NL's "Linear
  Attention++" M_0 is not built here); the streaming state is M alone;
- output: per-head RMSNorm with a gain shared by the heads, then W_o (no output gate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import memory as MEM
from . import primitives as P
from . import titans as T
from .titans import _gate_backward, _gate_forward

RULES = ("hebbian", "delta", "gated_delta", "dgd")
FAMILY_RULES = {"linear-attention": "hebbian", "deltanet": "delta", "gated-deltanet": "gated_delta", "dgd": "dgd"}
"""model family -> the rule of its sequence layer."""


@dataclass(frozen=True)
class LinearLayerConfig:
    """Hyper-parameters of the linear-attention / DeltaNet / Gated DeltaNet layer."""

    d_model: int
    n_heads: int = 1
    rule: str = "delta"  # "hebbian" (linear attention), "delta" (DeltaNet), "gated_delta", "dgd" (NL §4.5)
    chunk: int = 16  # chunk size of the chunk form (changes rounding only)
    eps: float = 1e-6  # of the l2 and RMS norms

    def __post_init__(self):
        if self.d_model <= 0 or self.n_heads <= 0 or self.d_model % self.n_heads:
            raise ValueError(f"LinearLayerConfig: d_model ({self.d_model}) must be a positive multiple "
                             f"of n_heads ({self.n_heads})")
        if self.rule not in RULES:
            raise ValueError(f"LinearLayerConfig: rule must be one of {RULES}, got {self.rule!r}")
        if self.chunk < 1:
            raise ValueError(f"LinearLayerConfig: chunk must be >= 1, got {self.chunk}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def param_shapes(cfg: LinearLayerConfig) -> dict[str, tuple[int, ...]]:
    """Every outer parameter and its shape; gradients use the same keys."""
    D, H = cfg.d_model, cfg.n_heads
    shapes = {"W_q": (D, D), "W_k": (D, D), "W_v": (D, D)}
    if cfg.rule != "hebbian":
        shapes.update(w_beta=(H, D), b_beta=(H,))
    if cfg.rule in ("gated_delta", "dgd"):
        shapes.update(w_alpha=(H, D), b_alpha=(H,))
    shapes.update(g_o=(cfg.head_dim,), W_o=(D, D))
    return shapes


def init_params(cfg: LinearLayerConfig, rng: np.random.Generator, dtype=np.float64) -> dict[str, np.ndarray]:
    """Random initial parameters: projections N(0, 1/D), gate weights N(0, 1/(16 D)), b_beta = 0
    (beta ~ 0.5), b_alpha = 4 (alpha ~ 0.98), g_o = 1."""
    D = cfg.d_model
    p = {}
    for name, shape in param_shapes(cfg).items():
        if name.startswith("b_"):
            w = np.full(shape, {"b_beta": 0.0, "b_alpha": 4.0}[name])
        elif name.startswith("w_"):
            w = rng.standard_normal(shape) / (4 * np.sqrt(D))
        elif name == "g_o":
            w = np.ones(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        p[name] = w.astype(dtype)
    return p


def init_state(params: dict[str, np.ndarray], cfg: LinearLayerConfig, batch: int) -> dict:
    """The state at the start of a sequence: the zero memory ``M`` (B, H, dh, dh)."""
    dh = cfg.head_dim
    return {"M": np.zeros((batch, cfg.n_heads, dh, dh), dtype=params["W_q"].dtype)}


def _check_inputs(x, params, cfg, state):
    """ValueError naming the argument and the expected shape for bad input."""
    x = T.check_layer_inputs(x, params, cfg, LinearLayerConfig,
                             param_shapes(cfg) if isinstance(cfg, LinearLayerConfig) else {})
    if state is not None:
        shape = (x.shape[0], cfg.n_heads, cfg.head_dim, cfg.head_dim)
        if not isinstance(state, dict) or "M" not in state or np.shape(state["M"]) != shape:
            got = np.shape(state["M"]) if isinstance(state, dict) and "M" in state else "nothing"
            raise ValueError(f"state['M']: expected shape {shape}, got {got}")
    return x


def _rule(cfg):
    """(chunk forward, chunk backward) of memory.py for the layer's rule."""
    if cfg.rule == "hebbian":
        return MEM.hebbian_chunked_forward, MEM.hebbian_chunked_backward
    if cfg.rule == "dgd":  # the gated delta rule at the exact prox step eta' (Eqs. 56-57)
        return MEM.dgd_chunked_forward, MEM.dgd_chunked_backward
    return MEM.delta_chunked_forward, MEM.delta_chunked_backward


def forward(x, params, cfg: LinearLayerConfig, state=None, *, rule=_rule):
    """The layer over x (B, T, D). Returns (y, cache, new_state); ``state=None`` starts from the
    zero memory, the returned state continues the sequence in a later call. Inputs are not mutated.
    ``rule``: cfg -> (forward, backward) of the memory rule (default: memory.py's chunk forms; the
    CPU port passes its compiled token loops, the same function)."""
    x = _check_inputs(x, params, cfg, state)
    B, T, D = x.shape
    H, dh = cfg.n_heads, cfg.head_dim
    fresh = state is None
    M0 = np.zeros((B * H, dh, dh), dtype=x.dtype) if fresh else np.asarray(state["M"]).reshape(B * H, dh, dh)
    heads, c_proj = {}, {}
    for n in ("q", "k", "v"):
        z, c_lin = P.linear_forward(x, params["W_" + n])  # (B, T, D)
        z = z.reshape(B, T, H, dh)
        c_norm = None
        if n != "v":
            z, c_norm = P.l2norm_forward(z, cfg.eps)  # per head (DeltaNet)
        heads[n] = z.transpose(0, 2, 1, 3).reshape(B * H, T, dh)  # (B H, T, dh): memory.py's batch
        c_proj[n] = (c_lin, c_norm)
    c_beta = c_alpha = None
    if cfg.rule == "hebbian":
        eta = np.ones((B * H, T), dtype=x.dtype)  # NL Eqs. (14)-(18): learning rate 1
    else:
        beta, c_beta = _gate_forward(x, params["w_beta"], params["b_beta"])  # (B, H, T)
        eta = beta.reshape(B * H, T)
    alpha = None
    if cfg.rule in ("gated_delta", "dgd"):
        a, c_alpha = _gate_forward(x, params["w_alpha"], params["b_alpha"])
        alpha = a.reshape(B * H, T)
    fwd, _ = rule(cfg)
    o, M_T, c_mem = fwd(heads["q"], heads["k"], heads["v"], eta, alpha, M0, cfg.chunk)  # Eqs. (15), (64)/(65)
    o = o.reshape(B, H, T, dh).transpose(0, 2, 1, 3)  # (B, T, H, dh)
    o_n, c_rms = P.rmsnorm_forward(o, params["g_o"], cfg.eps)
    y, c_o = P.linear_forward(o_n.reshape(B, T, D), params["W_o"])
    new_state = {"M": np.array(M_T.reshape(B, H, dh, dh), copy=True)}
    cache = dict(x=x, params=params, cfg=cfg, fresh=fresh, c_proj=c_proj, c_beta=c_beta, c_alpha=c_alpha,
                 c_mem=c_mem, c_rms=c_rms, c_o=c_o)
    return y, cache, new_state


def backward(dy, cache, dstate=None, *, rule=_rule):
    """Hand-written VJP of ``forward``: (dx, dparams, dstate0); ``rule`` as the forward's.

    ``dstate`` (optional): {"M": gradient reaching the returned state}. ``dstate0``: the gradient
    w.r.t. the state passed in (None for a fresh sequence: its zero memory is a constant)."""
    x, params, cfg = cache["x"], cache["params"], cache["cfg"]
    B, T, D = x.shape
    H, dh = cfg.n_heads, cfg.head_dim
    dy = np.asarray(dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected shape (B, T, D) = {x.shape}, got {dy.shape}")
    dM_T = None if not dstate or dstate.get("M") is None else np.asarray(dstate["M"]).reshape(B * H, dh, dh)
    grads = {}
    dh_, grads["W_o"], _ = P.linear_backward(dy, cache["c_o"])
    do, grads["g_o"] = P.rmsnorm_backward(dh_.reshape(B, T, H, dh), cache["c_rms"])
    _, bwd = rule(cfg)
    g = bwd(do.transpose(0, 2, 1, 3).reshape(B * H, T, dh), dM_T, cache["c_mem"])
    dx = np.zeros_like(x)
    for name, c in (("beta", cache["c_beta"]), ("alpha", cache["c_alpha"])):
        if c is None:
            continue
        dgate = g["eta" if name == "beta" else "alpha"].reshape(B, H, T)
        dx_g, grads["w_" + name], grads["b_" + name] = _gate_backward(dgate, c, x, params["w_" + name])
        dx = dx + dx_g
    for n in ("q", "k", "v"):
        c_lin, c_norm = cache["c_proj"][n]
        dz = g[n].reshape(B, H, T, dh).transpose(0, 2, 1, 3)  # (B, T, H, dh)
        if c_norm is not None:
            dz = P.l2norm_backward(dz, c_norm)
        dx_p, grads["W_" + n], _ = P.linear_backward(dz.reshape(B, T, D), c_lin)
        dx = dx + dx_p
    dstate0 = None if cache["fresh"] else {"M": g["M0"].reshape(B, H, dh, dh)}
    grads = {key: grads[key] for key in param_shapes(cfg)}  # same keys and order as params
    return dx, grads, dstate0
