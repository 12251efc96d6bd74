"""Self-modifying Titans' configuration, outer parameters and streaming state (the layer's interface).

Paper: §8.1-8.2, Eqs. (83)-(93), arXiv 2512.24695v1. SPEC: SPEC.md#selfmod (the fields, the parameter
layout, the initialisation and the state). The layer that computes with them is reference/selfmod.py
(which re-exports every name here).

CuPy-safe (SPEC.md#backends): the GPU port executes this source with ``np`` rebound to CuPy, so NumPy
is imported once, as ``np``, and every array function is called through it.

Parameters (per memory ``m`` in ``cfg.memories``; H heads, dh = D / H, Hm the MLP hidden width, K the
conv width): ``m.M0`` (H, dh, dh) or ``m.W1_0`` (H, dh, Hm), ``m.W2_0`` (H, Hm, dh) the meta-learned
initial state; ``m.b_beta`` (H,) the momentum decay's logit; ``W_q`` (D, D) unless ``adaptive_q``;
``conv_q/k/v`` (D, K); ``w_eta, w_alpha`` (H, dh), ``b_eta, b_alpha`` (H,) the gate readouts; ``g_o``
(dh,), ``W_g``, ``W_o`` (D, D) the output. Decisions (SPEC.md#selfmod): initial states near the
identity read (matrix) or small (MLP), gate biases giving alpha ~ 0.98, eta ~ 0.12 eta_max, beta ~ 0.73.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import primitives as P
from .selfmod_memory import init_key, weights


@dataclass(frozen=True)
class SelfModConfig:
    """Hyper-parameters of the self-modifying Titans layer (SPEC.md#selfmod)."""

    d_model: int
    n_heads: int = 1
    memory: str = "mlp"  # "mlp" (z + W1 s(W2 z), Eqs. 89/91) or "matrix" (M z)
    hidden: int = 0  # Hm of the MLP memories; 0 means 4 * dh
    act: str = "gelu"  # s of the MLP memories
    layernorm: bool = False  # z + LN(W1 s(W2 z)) when True (not in NL's equations)
    chunk_memory: int = 16  # chunk size of M_memory
    chunk_other: int = 16  # chunk size of M_k, M_v, M_eta, M_alpha (and M_q)
    momentum: bool = True  # S <- beta S - eta' G (pinned: the ablation's momentum)
    adaptive_q: bool = False  # q from a memory M_q (the text says q is static)
    normalize_v: bool = True  # l2-normalise v too: the self-generated targets M(v) then stay bounded
    single_shrink: bool = False  # normalised delta rule onto v_hat (matrix memory only)
    eta_max: float = 0.1  # eta = eta_max sigmoid(.) (as titans.py; 1.0 diverges with momentum at C = 16)
    conv_width: int = 4
    stop_grad_writes: bool = False  # first-order outer gradient; never the default
    dgd: bool = True  # Eq. 88's DGD write (k k^T shrink, eta'); False: Table 6 "w/o DGD", alpha W - eta grad
    eps: float = 1e-6  # of the l2 and RMS norms

    def __post_init__(self):
        if self.d_model <= 0 or self.n_heads <= 0 or self.d_model % self.n_heads:
            raise ValueError(
                f"SelfModConfig: d_model ({self.d_model}) must be a positive multiple of n_heads ({self.n_heads})"
            )
        if self.memory not in ("mlp", "matrix"):
            raise ValueError(f"SelfModConfig: memory must be 'mlp' or 'matrix', got {self.memory!r}")
        if self.chunk_memory < 1 or self.chunk_other < 1:
            raise ValueError(
                f"SelfModConfig: chunk_memory and chunk_other must be >= 1, got {self.chunk_memory}, {self.chunk_other}"
            )
        if self.act not in P.ACTIVATIONS:
            raise ValueError(f"SelfModConfig: act must be one of {sorted(P.ACTIVATIONS)}, got {self.act!r}")
        if self.single_shrink and self.memory != "matrix":
            raise ValueError("SelfModConfig: single_shrink needs memory='matrix' (SPEC.md#selfmod)")
        if self.conv_width < 1:
            raise ValueError(f"SelfModConfig: conv_width must be >= 1, got {self.conv_width}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return self.hidden if self.hidden > 0 else 4 * self.head_dim

    @property
    def memories(self) -> tuple[str, ...]:
        """The in-context memories, in the order they are written."""
        return ("k", "v", "eta", "alpha", "memory") + (("q",) if self.adaptive_q else ())

    @property
    def readers(self) -> tuple[str, ...]:
        """The memories that read x_t (all but M_memory, which reads q_t)."""
        return ("k", "v", "eta", "alpha") + (("q",) if self.adaptive_q else ())

    def chunk(self, m: str) -> int:
        return self.chunk_memory if m == "memory" else self.chunk_other


def param_shapes(cfg: SelfModConfig) -> dict[str, tuple[int, ...]]:
    """Every outer parameter and its shape; gradients use the same keys."""
    D, H, dh, Hm, K = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.mlp_hidden, cfg.conv_width
    shapes: dict[str, tuple[int, ...]] = {}
    for m in cfg.memories:
        if cfg.memory == "matrix":
            shapes[f"{m}.M0"] = (H, dh, dh)
        else:
            shapes[f"{m}.W1_0"] = (H, dh, Hm)
            shapes[f"{m}.W2_0"] = (H, Hm, dh)
        if cfg.momentum:
            shapes[f"{m}.b_beta"] = (H,)
    if not cfg.adaptive_q:
        shapes["W_q"] = (D, D)
    shapes.update(conv_q=(D, K), conv_k=(D, K), conv_v=(D, K))
    shapes.update(w_eta=(H, dh), b_eta=(H,), w_alpha=(H, dh), b_alpha=(H,))
    shapes.update(g_o=(dh,), W_g=(D, D), W_o=(D, D))
    return shapes


def init_params(cfg: SelfModConfig, rng: np.random.Generator, dtype=np.float64) -> dict[str, np.ndarray]:
    """Random initial outer parameters. Gate biases give alpha ~ 0.98, eta ~ 0.12 eta_max and
    beta ~ 0.73 (with the default eta_max = 0.1, stable over thousands of tokens: SPEC.md#selfmod)."""
    D, dh = cfg.d_model, cfg.head_dim
    p = {}
    for name, shape in param_shapes(cfg).items():
        if name.startswith("conv_"):
            w = 0.1 * rng.standard_normal(shape)
            w[:, -1] += 1.0  # start near the identity on the current token
        elif name.endswith(".b_beta"):
            w = np.full(shape, 1.0)
        elif name == "b_eta":
            w = np.full(shape, -2.0)
        elif name == "b_alpha":
            w = np.full(shape, 4.0)
        elif name in ("w_eta", "w_alpha"):
            w = rng.standard_normal(shape) / (4 * np.sqrt(dh))
        elif name == "g_o":
            w = np.ones(shape)
        elif name.endswith(".M0"):
            w = np.eye(dh) + 0.1 * rng.standard_normal(shape) / np.sqrt(dh)  # near the identity read
        elif name.endswith(".W1_0"):
            w = 0.5 * rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif name.endswith(".W2_0"):
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        else:
            w = rng.standard_normal(shape) / np.sqrt(D)
        p[name] = w.astype(dtype)
    return p


def init_state(params: dict[str, np.ndarray], cfg: SelfModConfig, batch: int) -> dict:
    """The state at the start of a sequence: every memory at its meta-learned initial value (running
    and chunk-start copies), zero momentum, position 0 in both chunk clocks, zero conv history.

    Keys: per memory ``m`` and weight ``w``: ``"m.w"`` running, ``"m.w_b"`` chunk start, ``"m.S_w"``
    momentum (when ``cfg.momentum``); ``"pos_other"``, ``"pos_memory"`` (int) positions inside the
    current chunks; ``"conv_q"``, ``"conv_k"``, ``"conv_v"`` (B, K-1, D) the conv histories."""
    dtype = params["g_o"].dtype
    state: dict = {}
    for m in cfg.memories:
        for w in weights(cfg):
            w0 = np.broadcast_to(params[init_key(m, w)], (batch,) + params[init_key(m, w)].shape)
            state[f"{m}.{w}"] = np.array(w0, dtype=dtype)  # (B, H, ., .)
            state[f"{m}.{w}_b"] = np.array(w0, dtype=dtype)
            if cfg.momentum:
                state[f"{m}.S_{w}"] = np.zeros(w0.shape, dtype=dtype)
    state["pos_other"] = 0
    state["pos_memory"] = 0
    for c in ("conv_q", "conv_k", "conv_v"):
        state[c] = np.zeros((batch, cfg.conv_width - 1, cfg.d_model), dtype=dtype)
    return state


def check_inputs(x, params, cfg, state):
    """The argument checks of ``forward``/``forward_loop`` (ValueError naming the argument). Part of the
    contract the ports use."""
    if not isinstance(cfg, SelfModConfig):
        raise ValueError(f"cfg: expected a SelfModConfig, got {type(cfg).__name__}")
    if not isinstance(x, np.ndarray) or x.ndim != 3 or x.shape[2] != cfg.d_model:
        shape = getattr(x, "shape", None)
        raise ValueError(f"x: expected an array of shape (B, T, D) with D = {cfg.d_model}, got {shape}")
    if x.dtype not in (np.float32, np.float64, np.complex64, np.complex128):
        # complex input exists for the complex-step gradient check only (every op here is analytic)
        raise ValueError(f"x: expected dtype float32 or float64 for shape (B, T, D), got {x.dtype}")
    for name, shape in param_shapes(cfg).items():
        if name not in params:
            raise ValueError(f"params[{name!r}]: missing; expected an array of shape {shape}")
        a = params[name]
        if not isinstance(a, np.ndarray) or a.shape != shape:
            raise ValueError(f"params[{name!r}]: expected shape {shape}, got {getattr(a, 'shape', None)}")
        if a.dtype != x.dtype:
            raise ValueError(f"params[{name!r}]: expected dtype {x.dtype} (that of x), got {a.dtype}")
    if state is not None:
        ref = init_state(params, cfg, x.shape[0])
        for key, r in ref.items():
            if key not in state:
                raise ValueError(f"state[{key!r}]: missing (see init_state)")
            if isinstance(r, np.ndarray):
                s = state[key]
                if not isinstance(s, np.ndarray) or s.shape != r.shape or s.dtype != x.dtype:
                    raise ValueError(
                        f"state[{key!r}]: expected shape {r.shape} and dtype {x.dtype}, "
                        f"got {getattr(s, 'shape', None)}, {getattr(s, 'dtype', None)}"
                    )
