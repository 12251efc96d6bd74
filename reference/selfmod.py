"""Self-modifying Titans: a sequence layer whose key, value, gate and output memories all learn in context.

Paper: §8.1-8.2, Eqs. (83)-(93), arXiv 2512.24695v1 (DGD: §4.5, Eqs. (56)-(57); chunks: Eq. (90)).
SPEC: SPEC.md#selfmod (semantics: SPEC.md#chunks, SPEC.md#outer-gradient).

Every projection except q is a memory ``M_box`` (box in k, v, eta, alpha, memory; and q when
``adaptive_q``) that is read at its chunk-start state, generates its own target
``v_hat_box = M_box(v)`` and is written by DGD with retention and momentum (Eq. 88):

    k_t = l2(conv_k(M_k(x_t))),  v_t = l2(conv_v(M_v(x_t))),  q_t = l2(conv_q(x_t W_q^T))    Eq. (83)
    eta_t = eta_max sigmoid(w_eta . M_eta(x_t) + b_eta),  alpha_t = sigmoid(w_alpha . M_alpha(x_t) + b_alpha)
    v_hat_box,t = M_box(v_t)                                                                Eq. (84)
    G_box,t = grad_W ||M_box(k_t) - v_hat_box,t||^2  at the chunk-start state, v_hat constant  Eq. (86)
    eta'_t = eta_t / (1 + eta_t ||k_t||^2)                                                   Eq. (57)
    S <- beta_box S - eta'_t G_box,t                                          (momentum, pinned)
    W_key <- W_key (alpha_t I - eta'_t k_t k_t^T) + S_key,  W_other <- alpha_t W_other + S_other   Eq. (88)
    o_t = M_memory(q_t) at its chunk-start state                                             Eq. (83)
    y_t = W_o (RMSNorm_head(o_t) * silu(W_g x_t))

Symbols (per head; B batch, T tokens, D width, H heads, dh = D / H, Hm the MLP hidden width, n the
tokens of one segment):

| paper                    | code                    | shape                      |
| ------------------------ | ----------------------- | -------------------------- |
| x_t                      | ``x``                   | (B, T, D)                  |
| q_t, k_t, v_t            | ``q, k, v``             | (B, H, T, dh)              |
| eta_t, alpha_t           | ``eta, alpha``          | (B, H, T)                  |
| eta'_t (prox step)       | ``ep``                  | (B, H, T)                  |
| momentum decay           | ``beta`` (per memory)   | (H,)                       |
| M_box (matrix)           | ``M``                   | (B, H, dh, dh)             |
| M_box (MLP) W_1, W_2     | ``W1, W2``              | (B, H, dh, Hm), (B, H, Hm, dh) |
| M_box,0 (meta-learned)   | ``{box}.M0``, ``{box}.W1_0``, ``{box}.W2_0`` | (H, ., .) |
| momentum S_box           | ``S``                   | like the memory weight     |
| chunk-start state        | ``Bst``                 | like the memory weight     |
| v_hat_box,t              | ``vhat``                | (B, H, n, dh)              |
| grad of the inner loss   | ``G``                   | (B, H, n, ., .)            |
| o_t                      | ``o``                   | (B, H, T, dh)              |

Decisions where the paper is open (each recorded in SPEC.md#selfmod):
- memories act per head on dh-dim slices; M_k, M_v, M_eta, M_alpha (and M_q) read the head's slice of
  x_t; the residual MLP ``z + W1 s(W2 z)`` (Eqs. 89, 91), a matrix ``M z`` as an option;
- eta, alpha: static per-head readouts of M_eta(x), M_alpha(x) through sigmoids, eta_max = 0.1
  (SPEC.md#selfmod);
- conv (width 4) after every read of k, v, q, then l2 normalisation of q, k and v (v too: the
  self-generated targets M(v) otherwise grow with the memory and the recurrence diverges; option
  ``normalize_v``), no SiLU;
- DGD as printed in Eq. (88): the key-side weight (W2, or the whole matrix) gets the k k^T shrink,
  W1 plain retention; eta' the exact prox step; the single-shrink reading (normalised delta rule onto
  v_hat) is ``single_shrink=True``, matrix memory only (SPEC.md#selfmod);
- momentum on by default, a static per-head, per-memory decay beta = sigmoid(b_beta): S <- beta S -
  eta' G, W <- W (alpha I - eta' k k^T) + S (momentum off: S = -eta' G);
- chunks: every read and inner gradient at the chunk-start state of its memory, writes in token
  order; ``chunk_memory`` for M_memory, ``chunk_other`` for the rest (SPEC.md#chunks);
- output: per-head RMSNorm (gain shared by heads) times silu(x W_g^T), then W_o, as in titans.py;
- the outer gradient goes through every write; ``stop_grad_writes`` is the first-order variant
  W_t = W_{t-1} + sg(W_t - W_{t-1}) (SPEC.md#outer-gradient).

Two implementations of one function: ``forward_loop`` (the token loop that applies the definition:
the oracle) and ``forward`` (per segment of a chunk: reads and inner gradients batched over the
segment, the momentum recurrence as a decay-masked matrix product and the retention/DGD recurrence as
a suffix-product scan, Titans Eqs. (16)-(18) generalised to DGD). Each has its own hand-written
backward of the writes (``write_chunk_backward``: the closed form's VJP, the scan reversed; the
token loop: one token at a time, states recomputed from the segment start); the rest of
``backward`` (reads, targets, second-order inner gradients, gates, convs) is shared, segment by
segment. Derivation: docs/selfmod-backward.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import mlp_memory as MM
from . import primitives as P

# ---------------------------------------------------------------------------------------------
# Configuration, parameters, state
# ---------------------------------------------------------------------------------------------


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


def _weights(cfg: SelfModConfig) -> tuple[str, ...]:
    """Fast weights of one memory; the first listed is the key-side weight that gets the DGD shrink."""
    return ("M",) if cfg.memory == "matrix" else ("W2", "W1")


def _keyside(w: str) -> bool:
    return w in ("M", "W2")  # the weight that multiplies the key (Eq. 88's right factor)


def _init_key(m: str, w: str) -> str:
    return f"{m}.M0" if w == "M" else f"{m}.{w}_0"


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
        for w in _weights(cfg):
            w0 = np.broadcast_to(params[_init_key(m, w)], (batch,) + params[_init_key(m, w)].shape)
            state[f"{m}.{w}"] = np.array(w0, dtype=dtype)  # (B, H, ., .)
            state[f"{m}.{w}_b"] = np.array(w0, dtype=dtype)
            if cfg.momentum:
                state[f"{m}.S_{w}"] = np.zeros(w0.shape, dtype=dtype)
    state["pos_other"] = 0
    state["pos_memory"] = 0
    for c in ("conv_q", "conv_k", "conv_v"):
        state[c] = np.zeros((batch, cfg.conv_width - 1, cfg.d_model), dtype=dtype)
    return state


def _check_inputs(x, params, cfg, state):
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


# ---------------------------------------------------------------------------------------------
# One memory: read, inner gradient, write (and their backwards)
# ---------------------------------------------------------------------------------------------


def _heads(a, H):
    """(B, T, D) -> (B, H, T, dh)."""
    B, T, D = a.shape
    return a.reshape(B, T, H, D // H).transpose(0, 2, 1, 3)


def _merge(a):
    """(B, H, T, dh) -> (B, T, D)."""
    B, H, T, dh = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * dh)


def read_forward(cfg, st, z):
    """y = M(z) for every token at the state ``st`` ({w: (B, H, ., .)}); z (B, H, n, dh)."""
    if cfg.memory == "matrix":
        return MM.matrix_memory_forward(st["M"], z)  # Eq. (83)   M z
    return MM.mlp_memory_forward(st["W1"], st["W2"], z, act=cfg.act, layernorm=cfg.layernorm)  # Eq. (89)


def read_backward(cfg, dy, cache):
    """-> ({w: dW}, dz)."""
    if cfg.memory == "matrix":
        dM, dz = MM.matrix_memory_backward(dy, cache)
        return {"M": dM}, dz
    dW1, dW2, dz = MM.mlp_memory_backward(dy, cache)
    return {"W1": dW1, "W2": dW2}, dz


def inner_grad(cfg, st, k, vhat):
    """Per-token gradients G[w] (B, H, n, ., .) of ||M(k_n) - vhat_n||^2 at ``st``, vhat constant (Eq. 93).

    With ``single_shrink`` (matrix only) the direction is the delta rule's onto vhat: G = -vhat k^T.
    """
    if cfg.memory == "matrix":
        if cfg.single_shrink:
            u, c = -vhat, None  # (B, H, n, dh)   the write becomes + eta' vhat k^T
        else:
            u, c = MM.matrix_inner_grad(st["M"], k, vhat)  # Eq. (93)   u = 2 (M k - vhat)
        G = {"M": np.einsum("bhnv,bhnk->bhnvk", u, k)}  # (B, H, n, dh, dh)   u k^T
        return G, (k, u, c)
    u1, a, u2, c = MM.inner_grad(st["W1"], st["W2"], k, vhat, act=cfg.act, layernorm=cfg.layernorm)
    G = {
        "W1": np.einsum("bhnd,bhnm->bhndm", u1, a),  # (B, H, n, dh, Hm)   u1 a^T
        "W2": np.einsum("bhnm,bhnd->bhnmd", u2, k),  # (B, H, n, Hm, dh)   u2 k^T
    }
    return G, (k, u1, a, u2, c)


def inner_grad_backward(cfg, dG, cache):
    """VJP of (st, k, vhat) -> G: -> ({w: dW}, dk, dvhat), through the second-order terms."""
    if cfg.memory == "matrix":
        k, u, c = cache
        du = np.einsum("bhnvk,bhnk->bhnv", dG["M"], k)  # (B, H, n, dh)
        dk = np.einsum("bhnvk,bhnv->bhnk", dG["M"], u)  # (B, H, n, dh)   the explicit k of u k^T
        if cfg.single_shrink:
            return {"M": None}, dk, -du
        dM, dk2, dvhat = MM.matrix_inner_grad_backward(du, c)
        return {"M": dM}, dk + dk2, dvhat
    k, u1, a, u2, c = cache
    du1 = np.einsum("bhndm,bhnm->bhnd", dG["W1"], a)  # (B, H, n, dh)
    da = np.einsum("bhndm,bhnd->bhnm", dG["W1"], u1)  # (B, H, n, Hm)
    du2 = np.einsum("bhnmd,bhnd->bhnm", dG["W2"], k)  # (B, H, n, Hm)
    dk = np.einsum("bhnmd,bhnm->bhnd", dG["W2"], u2)  # (B, H, n, dh)   the explicit k of u2 k^T
    dW1, dW2, dk2, dvhat = MM.inner_grad_backward(du1, da, du2, c)
    return {"W1": dW1, "W2": dW2}, dk + dk2, dvhat


def write(Pw, S, G, k, ep, alpha, beta, keyside):
    """One token's DGD step with retention and momentum for one weight (Eq. 88, momentum pinned).

    Pw, S, G (B, H, a, b); k (B, H, dh); ep, alpha (B, H); beta (H,) or None (no momentum).
    """
    e = ep[..., None, None]
    S_new = -e * G if beta is None else beta[:, None, None] * S - e * G  # momentum (SPEC.md#selfmod)
    P_new = alpha[..., None, None] * Pw + S_new  # Eq. (88)   alpha W - eta' grad (+ momentum)
    if keyside:
        P_new = P_new - e * np.einsum("bhak,bhk,bhl->bhal", Pw, k, k)  # Eq. (88)   - eta' W k k^T
    return P_new, S_new


def write_chunk(Pw, S, G, k, ep, alpha, beta, keyside):
    """n token writes in closed form (the chunk-parallel form of ``write``).

    G (B, H, n, a, b), k (B, H, n, dh), ep, alpha (B, H, n). The momenta of all n tokens come from one
    decay-masked matrix product (Titans Eq. 18: S_j = beta^(j+1) S_0 - sum_{i<=j} beta^(j-i) eta'_i G_i);
    the state from W_n = W_0 A_1..A_n + sum_j S_j A_{j+1}..A_n with A_j = alpha_j I - eta'_j k_j k_j^T
    on the key side (a suffix-product scan) or the scalar alpha_j elsewhere (Titans Eqs. 16-17).
    """
    n = G.shape[2]
    idx = np.arange(n)
    lag = idx[:, None] - idx[None, :]  # (n, n)   j - i
    step = -ep[..., None, None] * G  # (B, H, n, a, b)   - eta'_i G_i
    if beta is None:
        S_all = step
    else:
        decay = np.where(lag >= 0, beta[:, None, None] ** np.maximum(lag, 0), 0).astype(G.dtype)  # (H, n, n)
        powers = (beta[:, None] ** (idx + 1)).astype(G.dtype)  # (H, n)   beta^(j+1)
        S_all = np.einsum("hji,bhiuv->bhjuv", decay, step) + np.einsum(
            "hj,bhuv->bhjuv", powers, S
        )  # (B, H, n, a, b)   Titans Eq. (18)
    if keyside:
        dh = k.shape[-1]
        eye = np.eye(dh, dtype=G.dtype)
        A = alpha[..., None, None] * eye - ep[..., None, None] * np.einsum("bhnk,bhnl->bhnkl", k, k)
        R = suffix_products(A)  # (B, H, n, dh, dh)   R_j = A_{j+1} ... A_{n-1}
        full = A[:, :, 0] @ R[:, :, 0]  # (B, H, dh, dh)
        P_new = Pw @ full + np.einsum("bhjak,bhjkl->bhal", S_all, R)  # Eq. (88) over the segment
    else:
        rev = np.cumprod(alpha[..., ::-1], axis=-1)[..., ::-1]  # (B, H, n)   prod_{i>=j} alpha_i
        r = np.concatenate([rev[..., 1:], np.ones_like(rev[..., :1])], axis=-1)  # prod_{i>j} alpha_i
        P_new = rev[..., 0, None, None] * Pw + np.einsum("bhj,bhjuv->bhuv", r, S_all)  # Eq. (88)
    return P_new, S_all[:, :, -1]


def suffix_products(A):
    """The suffix-product scan of the key-side writes: R_j = A_{j+1} ... A_{n-1} (R_{n-1} = I).

    A (B, H, n, d, d) -> R (B, H, n, d, d). One matrix product per token, in sequence (the GPU
    port runs this scan as one kernel: SPEC.md#fast-gpu)."""
    n = A.shape[2]
    R = np.empty_like(A)
    R[:, :, n - 1] = np.eye(A.shape[-1], dtype=A.dtype)
    for j in range(n - 2, -1, -1):
        R[:, :, j] = A[:, :, j + 1] @ R[:, :, j + 1]  # suffix-product scan
    return R


def suffix_products_backward(A, R, dR, dfull):
    """VJP of A -> (R = suffix_products(A), full = A_0 R_0): dA (B, H, n, d, d).

    dR (B, H, n, d, d) is the adjoint reaching each R_j (updated in place: on return it holds each
    R_j's whole adjoint), dfull (B, H, d, d) the adjoint of full. The scan reversed: a prefix scan
    of adjoints, dR_{j+1} += A_{j+1}^T dR_j, and dA_{j+1} = dR_j R_{j+1}^T."""
    n = A.shape[2]
    dA = np.zeros_like(A)
    dA[:, :, 0] = dfull @ np.swapaxes(R[:, :, 0], -1, -2)
    dR[:, :, 0] += np.swapaxes(A[:, :, 0], -1, -2) @ dfull
    for j in range(n - 1):  # R_j = A_{j+1} R_{j+1}, reversed
        dA[:, :, j + 1] += dR[:, :, j] @ np.swapaxes(R[:, :, j + 1], -1, -2)
        dR[:, :, j + 1] += np.swapaxes(A[:, :, j + 1], -1, -2) @ dR[:, :, j]
    return dA


def scalar_suffix_products(alpha):
    """The scalar retention's suffix products: R_j = alpha_{j+1} ... alpha_{n-1} (R_{n-1} = 1).

    alpha (B, H, n) -> R (B, H, n)."""
    n = alpha.shape[-1]
    R = np.empty_like(alpha)
    R[..., n - 1] = 1
    for j in range(n - 2, -1, -1):
        R[..., j] = alpha[..., j + 1] * R[..., j + 1]
    return R


def scalar_suffix_products_backward(alpha, R, dR, dfull):
    """VJP of alpha -> (R = scalar_suffix_products(alpha), full = alpha_0 R_0): dalpha (B, H, n).

    dR (B, H, n) the adjoint of each R_j (updated in place), dfull (B, H) that of full."""
    n = alpha.shape[-1]
    dalpha = np.zeros_like(alpha)
    dalpha[..., 0] = dfull * R[..., 0]
    dR[..., 0] += alpha[..., 0] * dfull
    for j in range(n - 1):
        dalpha[..., j + 1] += dR[..., j] * R[..., j + 1]
        dR[..., j + 1] += alpha[..., j + 1] * dR[..., j]
    return dalpha


def write_chunk_backward(dP_new, dS_new, Pw, S, G, k, ep, alpha, beta, keyside):
    """VJP of ``write_chunk`` (the chunk-parallel backward of the writes).

    dP_new, dS_new (B, H, a, b) the adjoints of the returned state and momentum (dS_new None or
    ignored without momentum). Returns (dPw, dS, dG, dk, dep, dalpha, dbeta): dS and dbeta (H,) are
    None without momentum. The suffix-product scan is reversed as a prefix scan of adjoints.
    """
    n = G.shape[2]
    idx = np.arange(n)
    lag = idx[:, None] - idx[None, :]  # (n, n)   j - i
    step = -ep[..., None, None] * G  # (B, H, n, a, b)
    if beta is None:
        S_all = step
    else:
        decay = np.where(lag >= 0, beta[:, None, None] ** np.maximum(lag, 0), 0).astype(G.dtype)  # (H, n, n)
        powers = (beta[:, None] ** (idx + 1)).astype(G.dtype)  # (H, n)
        S_all = np.einsum("hji,bhiuv->bhjuv", decay, step) + np.einsum("hj,bhuv->bhjuv", powers, S)
    if keyside:
        eye = np.eye(k.shape[-1], dtype=G.dtype)
        A = alpha[..., None, None] * eye - ep[..., None, None] * np.einsum("bhnk,bhnl->bhnkl", k, k)
        R = suffix_products(A)  # (B, H, n, dh, dh)
        full = A[:, :, 0] @ R[:, :, 0]
        # P_new = P0 full + sum_j S_j R_j
        dS_all = np.einsum("bhuw,bhjvw->bhjuv", dP_new, R)  # (B, H, n, a, b)   dP R_j^T
        dPw = np.einsum("bhuw,bhvw->bhuv", dP_new, full)  # dP full^T
        dfull = np.einsum("bhuk,bhul->bhkl", Pw, dP_new)  # P0^T dP
        dR = np.einsum("bhjuk,bhul->bhjkl", S_all, dP_new)  # S_j^T dP
        dA = suffix_products_backward(A, R, dR, dfull)
        dalpha = np.einsum("bhnkk->bhn", dA)  # A = alpha I - ...
        dep = -np.einsum("bhnk,bhnkl,bhnl->bhn", k, dA, k)
        dk = -ep[..., None] * (np.einsum("bhnkl,bhnl->bhnk", dA, k) + np.einsum("bhnlk,bhnl->bhnk", dA, k))
    else:
        R = scalar_suffix_products(alpha)  # (B, H, n)   prod_{i>j} alpha_i
        full = alpha[..., 0] * R[..., 0]
        dS_all = R[..., None, None] * dP_new[:, :, None]  # (B, H, n, a, b)
        dPw = full[..., None, None] * dP_new
        dfull = np.einsum("bhuv,bhuv->bh", Pw, dP_new)
        dR = np.einsum("bhjuv,bhuv->bhj", S_all, dP_new)
        dalpha = scalar_suffix_products_backward(alpha, R, dR, dfull)
        dep = np.zeros_like(ep)
        dk = np.zeros_like(k)
    if beta is None:
        dstep, dS, dbeta = dS_all, None, None
    else:
        if dS_new is not None:
            dS_all[:, :, -1] += dS_new
        dstep = np.einsum("hji,bhjuv->bhiuv", decay, dS_all)
        dS = np.einsum("hj,bhjuv->bhuv", powers, dS_all)
        ddecay = np.einsum("bhjuv,bhiuv->hji", dS_all, step)  # (H, n, n)
        dpowers = np.einsum("bhjuv,bhuv->hj", dS_all, S)  # (H, n)
        slope = np.where(lag >= 1, lag * beta[:, None, None] ** np.maximum(lag - 1, 0), 0)  # d beta^lag
        dbeta = np.einsum("hji,hji->h", ddecay, slope) + np.einsum(
            "hj,hj->h", dpowers, (idx + 1) * beta[:, None] ** idx
        )
        dbeta = dbeta.astype(G.dtype)
    dG = -ep[..., None, None] * dstep
    dep = dep - np.einsum("bhnuv,bhnuv->bhn", dstep, G)
    return dPw, dS, dG, dk, dep, dalpha, dbeta


# ---------------------------------------------------------------------------------------------
# The layer: segments, forward (chunk-parallel and token loop), backward
# ---------------------------------------------------------------------------------------------


def _segments(cfg, T, pos_other, pos_memory):
    """Token ranges [t0, t1) in which no memory starts a chunk, with the memories starting at t0."""
    def starts(t):
        return tuple(
            m for m in cfg.memories
            if ((pos_memory if m == "memory" else pos_other) + t) % cfg.chunk(m) == 0
        )  # fmt: skip

    if T == 0:
        return []
    bounds = [0] + [t for t in range(1, T) if starts(t)] + [T]
    return [(t0, t1, starts(t0)) for t0, t1 in zip(bounds[:-1], bounds[1:], strict=True)]


def _betas(params, cfg, m):
    return P.sigmoid(params[f"{m}.b_beta"]) if cfg.momentum else None  # (H,)


def _gates(params, cfg, pre_eta, pre_alpha, k):
    """eta, alpha, eta' (B, H, n) from the gate memories' reads (SPEC.md#selfmod)."""
    s_eta = np.einsum("bhnd,hd->bhn", pre_eta, params["w_eta"]) + params["b_eta"][:, None]
    s_alpha = np.einsum("bhnd,hd->bhn", pre_alpha, params["w_alpha"]) + params["b_alpha"][:, None]
    eta = cfg.eta_max * P.sigmoid(s_eta)  # (B, H, n)   Eq. (83) with a pinned squashing
    alpha = P.sigmoid(s_alpha)  # (B, H, n)
    ep = eta / (1 + eta * np.einsum("bhnd,bhnd->bhn", k, k))  # Eq. (57)   exact prox step
    return s_eta, s_alpha, eta, alpha, ep


def _run(x, params, cfg, state, loop):
    _check_inputs(x, params, cfg, state)
    B, T, D = x.shape
    H = cfg.n_heads
    had_state = state is not None
    st = init_state(params, cfg, B) if state is None else state
    W = {m: {w: st[f"{m}.{w}"] for w in _weights(cfg)} for m in cfg.memories}
    Bst = {m: {w: st[f"{m}.{w}_b"] for w in _weights(cfg)} for m in cfg.memories}
    S = {m: {w: st.get(f"{m}.S_{w}") for w in _weights(cfg)} for m in cfg.memories}
    conv = {c: st[f"conv_{c}"] for c in ("q", "k", "v")}
    pos0 = (int(st["pos_other"]), int(st["pos_memory"]))
    betas = {m: _betas(params, cfg, m) for m in cfg.memories}
    xh = _heads(x, H)  # (B, H, T, dh)
    qlin = None if cfg.adaptive_q else P.linear_forward(x, params["W_q"])[0]  # (B, T, D)

    full = {name: np.zeros((B, H, T, cfg.head_dim), dtype=x.dtype) for name in ("k", "q", "v", "o")}
    pre = {m: np.zeros((B, H, T, cfg.head_dim), dtype=x.dtype) for m in cfg.readers}
    for name in ("eta", "alpha", "ep"):
        full[name] = np.zeros((B, H, T), dtype=x.dtype)
    vhat = {m: np.zeros((B, H, T, cfg.head_dim), dtype=x.dtype) for m in cfg.memories}
    conv0 = dict(conv)
    segs = []
    for t0, t1, starts in _segments(cfg, T, *pos0):
        for m in starts:
            Bst[m] = dict(W[m])  # a chunk starts: its reads and gradients use this state
        segs.append({"t0": t0, "t1": t1, "starts": starts,
                     "B": {m: dict(Bst[m]) for m in cfg.memories},
                     "W": {m: dict(W[m]) for m in cfg.memories},
                     "S": {m: dict(S[m]) for m in cfg.memories}})  # fmt: skip
        pieces = [(t, t + 1) for t in range(t0, t1)] if loop else [(t0, t1)]
        for a, b in pieces:
            xs = xh[:, :, a:b]  # (B, H, n, dh)
            for m in cfg.readers:
                pre[m][:, :, a:b] = read_forward(cfg, Bst[m], xs)[0]  # Eq. (83) at the chunk start
            kc, _, conv["k"] = P.conv1d_forward(_merge(pre["k"][:, :, a:b]), params["conv_k"], None, conv["k"])
            vc, _, conv["v"] = P.conv1d_forward(_merge(pre["v"][:, :, a:b]), params["conv_v"], None, conv["v"])
            qin = _merge(pre["q"][:, :, a:b]) if cfg.adaptive_q else qlin[:, a:b]
            qc, _, conv["q"] = P.conv1d_forward(qin, params["conv_q"], None, conv["q"])
            k = P.l2norm_forward(_heads(kc, H), cfg.eps)[0]  # (B, H, n, dh)
            q = P.l2norm_forward(_heads(qc, H), cfg.eps)[0]  # (B, H, n, dh)
            v = _heads(vc, H)  # (B, H, n, dh)
            if cfg.normalize_v:
                v = P.l2norm_forward(v, cfg.eps)[0]  # pinned: bounded targets (SPEC.md#selfmod)
            _, _, eta, alpha, ep = _gates(params, cfg, pre["eta"][:, :, a:b], pre["alpha"][:, :, a:b], k)
            full["o"][:, :, a:b] = read_forward(cfg, Bst["memory"], q)[0]  # Eq. (83)   o = M_memory(q)
            for name, val in (("k", k), ("q", q), ("v", v), ("eta", eta), ("alpha", alpha), ("ep", ep)):
                full[name][:, :, a:b] = val
            for m in cfg.memories:
                vh = read_forward(cfg, Bst[m], v)[0]  # Eq. (84)   vhat = M_box(v)
                vhat[m][:, :, a:b] = vh
                G = inner_grad(cfg, Bst[m], k, vh)[0]
                for w in _weights(cfg):
                    if loop:  # the definition: one token at a time
                        W[m][w], S[m][w] = write(W[m][w], S[m][w], G[w][:, :, 0], k[:, :, 0], ep[:, :, 0],
                                                 alpha[:, :, 0], betas[m], _keyside(w))  # fmt: skip
                    else:
                        W[m][w], S[m][w] = write_chunk(W[m][w], S[m][w], G[w], k, ep, alpha, betas[m], _keyside(w))
    y, out_cache = _output_forward(full["o"], x, params, cfg)
    new_state: dict = {}
    for m in cfg.memories:
        for w in _weights(cfg):
            new_state[f"{m}.{w}"] = W[m][w].copy()  # copies: the new state never aliases the input
            new_state[f"{m}.{w}_b"] = Bst[m][w].copy()
            if cfg.momentum:
                new_state[f"{m}.S_{w}"] = S[m][w].copy()
    new_state["pos_other"] = (pos0[0] + T) % cfg.chunk_other
    new_state["pos_memory"] = (pos0[1] + T) % cfg.chunk_memory
    for c in ("q", "k", "v"):
        new_state[f"conv_{c}"] = conv[c].copy()
    cache = {"x": x, "params": params, "cfg": cfg, "had_state": had_state, "segs": segs, "pre": pre, "loop": loop,
             "qlin": qlin, "conv0": conv0, "vhat": vhat, "out": out_cache, **full}  # fmt: skip
    return y, cache, new_state


def _output_forward(o, x, params, cfg):
    """y = W_o (RMSNorm_head(o) * silu(W_g x)) (SPEC.md#selfmod, as titans.py)."""
    on, c_norm = P.rmsnorm_forward(o, params["g_o"], cfg.eps)  # (B, H, T, dh)
    gl, c_g = P.linear_forward(x, params["W_g"])  # (B, T, D)
    g, c_silu = P.silu_forward(gl)  # (B, T, D)
    h = _merge(on) * g  # (B, T, D)
    y, c_o = P.linear_forward(h, params["W_o"])  # (B, T, D)
    return y, (c_norm, c_g, c_silu, c_o, on, g)


def _output_backward(dy, cache, H):
    c_norm, c_g, c_silu, c_o, on, g = cache
    dh_, dW_o, _ = P.linear_backward(dy, c_o)
    dg = dh_ * _merge(on)
    don = _heads(dh_ * g, H)
    dgl = P.silu_backward(dg, c_silu)
    dx, dW_g, _ = P.linear_backward(dgl, c_g)
    do, dg_o = P.rmsnorm_backward(don, c_norm)
    return do, dx, {"W_o": dW_o, "W_g": dW_g, "g_o": dg_o}


def forward(x, params, cfg, state=None):
    """Chunk-parallel self-modifying Titans. x (B, T, D) -> (y (B, T, D), cache, state).

    ``state`` (from ``init_state`` or a previous call) continues a stream at any split point."""
    return _run(x, params, cfg, state, loop=False)


def forward_loop(x, params, cfg, state=None):
    """The token-loop oracle: the same function, applying the definition one token at a time."""
    return _run(x, params, cfg, state, loop=True)


def _conv_state_at(conv0, pre_full, t0, K):
    """The conv history (B, K-1, D) before token t0: the last K-1 rows of concat(conv0, pre[:t0])."""
    xp = np.concatenate([conv0, pre_full[:, :t0]], axis=1)
    return xp[:, xp.shape[1] - (K - 1):]


def backward(dy, cache, dstate=None):
    """Hand-written VJP of ``forward``/``forward_loop`` (the writes of a chunk-form cache are reversed
    by ``write_chunk_backward``, those of a token-loop cache one token at a time; everything else is
    shared). dy (B, T, D); ``dstate`` the gradient reaching
    the returned state (None: zero). Returns (dx, dparams, dstate0): dparams has every key of params;
    dstate0 the gradient w.r.t. the input state (zeros-like init_state when the call had none; then
    the initial-state gradients are in dparams)."""
    x, params, cfg = cache["x"], cache["params"], cache["cfg"]
    B, T, D = x.shape
    H, K = cfg.n_heads, cfg.conv_width
    if not isinstance(dy, np.ndarray) or dy.shape != x.shape:
        raise ValueError(f"dy: expected an array of shape (B, T, D) = {x.shape}, got {getattr(dy, 'shape', None)}")
    sg = cfg.stop_grad_writes
    wn = _weights(cfg)
    grads = {name: np.zeros(shape, dtype=x.dtype) for name, shape in param_shapes(cfg).items()}
    do, dx, g_out = _output_backward(dy, cache["out"], H)
    for key, val in g_out.items():
        grads[key] += val
    dxh = np.zeros((B, H, T, cfg.head_dim), dtype=x.dtype)
    betas = {m: _betas(params, cfg, m) for m in cfg.memories}
    ds = dstate or {}

    def zero_like(a):
        return np.zeros(a.shape, dtype=x.dtype)

    ref = init_state(params, cfg, B)
    dW = {m: {w: np.array(ds.get(f"{m}.{w}", zero_like(ref[f"{m}.{w}"])), dtype=x.dtype) for w in wn}
          for m in cfg.memories}  # fmt: skip
    dB = {m: {w: np.array(ds.get(f"{m}.{w}_b", zero_like(ref[f"{m}.{w}"])), dtype=x.dtype) for w in wn}
          for m in cfg.memories}  # fmt: skip
    dS = {m: {w: np.array(ds.get(f"{m}.S_{w}", zero_like(ref[f"{m}.{w}"])), dtype=x.dtype) for w in wn}
          for m in cfg.memories}  # fmt: skip
    dconv = {c: np.array(ds.get(f"conv_{c}", zero_like(ref[f"conv_{c}"])), dtype=x.dtype) for c in "qkv"}
    pre_full = {m: _merge(cache["pre"][m]) for m in cfg.readers}
    conv_in = {"k": pre_full["k"], "v": pre_full["v"], "q": pre_full["q"] if cfg.adaptive_q else cache["qlin"]}
    dqin = np.zeros((B, T, D), dtype=x.dtype)

    for seg in reversed(cache["segs"]):
        t0, t1 = seg["t0"], seg["t1"]
        n = t1 - t0
        k, q, v = (cache[c][:, :, t0:t1] for c in ("k", "q", "v"))  # (B, H, n, dh)
        eta, alpha, ep = (cache[c][:, :, t0:t1] for c in ("eta", "alpha", "ep"))  # (B, H, n)
        dk, dv = np.zeros_like(k), np.zeros_like(v)
        dalpha, dep = np.zeros_like(alpha), np.zeros_like(ep)
        for m in cfg.memories:
            Bm, beta = seg["B"][m], betas[m]
            if sg:  # W_t = W_{t-1} + sg(increment): the adjoint passes straight through the writes
                continue
            vh, c_read = read_forward(cfg, Bm, v)
            G, c_grad = inner_grad(cfg, Bm, k, vh)
            dG = {}
            for w in wn:
                keyside = _keyside(w)
                Pw, Sw = seg["W"][m][w], seg["S"][m][w]
                if not cache["loop"]:  # the chunk form's own backward: VJP of the closed form
                    dPw, dSw, dG[w], dk_w, dep_w, dal_w, dbeta_w = write_chunk_backward(
                        dW[m][w], dS[m][w], Pw, Sw, G[w], k, ep, alpha, beta, keyside
                    )
                    dk += dk_w
                    dep += dep_w
                    dalpha += dal_w
                    if beta is not None:
                        grads[f"{m}.b_beta"] += dbeta_w * beta * (1 - beta)
                        dS[m][w] = dSw
                    dW[m][w] = dPw
                    continue
                # the token loop's backward: reverse the writes one token at a time
                hist = []  # the state before each token of the segment (recomputed)
                for j in range(n):
                    hist.append((Pw, Sw))
                    Pw, Sw = write(Pw, Sw, G[w][:, :, j], k[:, :, j], ep[:, :, j], alpha[:, :, j], beta, keyside)
                dGw = np.zeros_like(G[w])
                dPw, dSw = dW[m][w], dS[m][w]
                dbeta_w = np.zeros_like(beta) if beta is not None else None  # summed over the segment
                for j in range(n - 1, -1, -1):
                    Pp, Sp = hist[j]
                    e, a_, kj = ep[:, :, j], alpha[:, :, j], k[:, :, j]
                    dSt = dPw + (dSw if beta is not None else 0)  # adjoint of S_j (P_j = ... + S_j)
                    dGw[:, :, j] = -e[..., None, None] * dSt
                    dep_j = -np.einsum("bhuv,bhuv->bh", dSt, G[w][:, :, j])  # a write's eta' terms, summed
                    if beta is not None:
                        dbeta_w += np.einsum("bhuv,bhuv->h", dSt, Sp)
                    dalpha[:, :, j] += np.einsum("bhuv,bhuv->bh", dPw, Pp)
                    dP_prev = a_[..., None, None] * dPw
                    if keyside:
                        Pk = np.einsum("bhak,bhk->bha", Pp, kj)  # (B, H, a)
                        dPk = np.einsum("bhak,bhk->bha", dPw, kj)  # (B, H, a)
                        dep_j = dep_j - np.einsum("bha,bha->bh", dPk, Pk)
                        dk[:, :, j] -= e[..., None] * (
                            np.einsum("bhak,bha->bhk", Pp, dPk) + np.einsum("bhak,bha->bhk", dPw, Pk)
                        )
                        dP_prev = dP_prev - e[..., None, None] * np.einsum("bha,bhk->bhak", dPk, kj)
                    dep[:, :, j] += dep_j  # (then added to dep, as the chunk form's write_chunk_backward)
                    dPw = dP_prev
                    dSw = beta[:, None, None] * dSt if beta is not None else dSw
                if beta is not None:  # (then scaled and added once, as the chunk form's)
                    grads[f"{m}.b_beta"] += dbeta_w * beta * (1 - beta)
                dW[m][w], dS[m][w] = dPw, dSw
                dG[w] = dGw
            dst, dk_g, dvh = inner_grad_backward(cfg, dG, c_grad)
            dk += dk_g
            dst_r, dv_r = read_backward(cfg, dvh, c_read)
            dv += dv_r
            for w in wn:
                for part in (dst[w], dst_r[w]):
                    if part is not None:
                        dB[m][w] += part
        # o = M_memory(q) at the chunk start
        _, c_o = read_forward(cfg, seg["B"]["memory"], q)
        dst_o, dq = read_backward(cfg, do[:, :, t0:t1], c_o)
        for w in wn:
            dB["memory"][w] += dst_o[w]
        # eta' = eta / (1 + eta ||k||^2)
        den = 1 + eta * np.einsum("bhnd,bhnd->bhn", k, k)
        deta = dep / den**2
        dk += (-2 * dep * ep**2)[..., None] * k
        # l2 norms and convs (the conv adjoint is carried backwards across segments)
        dc = {}
        for c, dpost in (("k", dk), ("q", dq), ("v", dv)):
            if c == "v" and not cfg.normalize_v:
                dc["v"] = _merge(dv)
                continue
            _, c_l2 = P.l2norm_forward(_heads(_conv_replay(cache, conv_in, c, params, t0, t1, K)[0], H), cfg.eps)
            dc[c] = _merge(P.l2norm_backward(dpost, c_l2))
        dpre_seg = {}
        for c in ("k", "v", "q"):
            _, c_conv = _conv_replay(cache, conv_in, c, params, t0, t1, K)
            dpre_c, dwc, _, dconv[c] = P.conv1d_backward(dc[c], c_conv, dnew_state=dconv[c])
            grads[f"conv_{c}"] += dwc
            dpre_seg[c] = dpre_c
        if not cfg.adaptive_q:
            dqin[:, t0:t1] = dpre_seg["q"]
        # gates: eta = eta_max sigmoid(w_eta . pre_eta + b_eta), alpha = sigmoid(w_alpha . pre_alpha + b_alpha)
        dpre = {"k": _heads(dpre_seg["k"], H), "v": _heads(dpre_seg["v"], H)}
        if cfg.adaptive_q:
            dpre["q"] = _heads(dpre_seg["q"], H)
        for gname, dgate in (("eta", deta), ("alpha", dalpha)):
            pe = cache["pre"][gname][:, :, t0:t1]
            s = np.einsum("bhnd,hd->bhn", pe, params[f"w_{gname}"]) + params[f"b_{gname}"][:, None]
            scale = cfg.eta_max if gname == "eta" else 1.0
            dsig = dgate * scale * P.dsigmoid(s)  # (B, H, n)
            grads[f"w_{gname}"] += np.einsum("bhn,bhnd->hd", dsig, pe)
            grads[f"b_{gname}"] += np.einsum("bhn->h", dsig)
            dpre[gname] = dsig[..., None] * params[f"w_{gname}"][None, :, None, :]
        # the reads of x at each reader's chunk-start state
        xs = cache["x"]
        xs_h = _heads(xs, H)[:, :, t0:t1]
        for m in cfg.readers:
            _, c_r = read_forward(cfg, seg["B"][m], xs_h)
            dst_x, dxs = read_backward(cfg, dpre[m], c_r)
            dxh[:, :, t0:t1] += dxs
            for w in wn:
                dB[m][w] += dst_x[w]
        # a chunk that starts here took its chunk-start state from the running state
        for m in seg["starts"]:
            for w in wn:
                dW[m][w] = dW[m][w] + dB[m][w]
                dB[m][w] = np.zeros_like(dB[m][w])

    dx = dx + _merge(dxh)
    if not cfg.adaptive_q:
        dxq, dW_q, _ = P.linear_backward(dqin, (x, params["W_q"], False))
        dx = dx + dxq
        grads["W_q"] += dW_q
    dstate0: dict = {}
    for m in cfg.memories:
        for w in wn:
            if cache["had_state"]:
                dstate0[f"{m}.{w}"], dstate0[f"{m}.{w}_b"] = dW[m][w], dB[m][w]
                if cfg.momentum:
                    dstate0[f"{m}.S_{w}"] = dS[m][w]
            else:  # W_0 = B_0 = the broadcast meta-learned state
                grads[_init_key(m, w)] += np.einsum("bh...->h...", dW[m][w] + dB[m][w])
    for c in "qkv":
        dstate0[f"conv_{c}"] = dconv[c]
    return dx, grads, dstate0


def _conv_replay(cache, conv_in, c, params, t0, t1, K):
    """Recompute the conv of segment [t0, t1) -> (output (B, n, D), conv cache)."""
    state = _conv_state_at(cache["conv0"][c], conv_in[c], t0, K)
    y, c_conv, _ = P.conv1d_forward(conv_in[c][:, t0:t1], params[f"conv_{c}"], None, state)
    return y, c_conv


# ---------------------------------------------------------------------------------------------
# Gradient-check cases (float64, tiny) run by `nested-learning check`.
# ---------------------------------------------------------------------------------------------


def example_params(cfg: SelfModConfig, rng: np.random.Generator, dtype=np.float64, spread: float = 0.3):
    """init_params perturbed by ``spread`` N(0, 1) noise, with strong writes that are remembered
    (eta ~ 0.5 eta_max, alpha ~ 0.9, beta ~ 0.5, gate readouts of size ~0.5): every parameter then
    moves the output by a visible amount (gradient checks)."""
    p = init_params(cfg, rng, dtype)
    p["b_eta"] = np.zeros_like(p["b_eta"])
    p["b_alpha"] = np.full_like(p["b_alpha"], 2.0)  # alpha ~ 0.9: the writes are remembered
    p["w_eta"] = (0.5 * rng.standard_normal(p["w_eta"].shape)).astype(dtype)
    p["w_alpha"] = (0.5 * rng.standard_normal(p["w_alpha"].shape)).astype(dtype)
    for m in cfg.memories:
        if cfg.momentum:
            p[f"{m}.b_beta"] = np.zeros_like(p[f"{m}.b_beta"])
    return {k: (v + spread * rng.standard_normal(v.shape)).astype(dtype) for k, v in p.items()}


def _case(T=5, B=1, with_state=False, **kw):
    cfg = SelfModConfig(d_model=2, n_heads=1, hidden=2, eta_max=1.0, **kw)  # strong writes

    def case(rng):
        params = example_params(cfg, rng)
        x = rng.standard_normal((B, T, cfg.d_model))
        state = None
        if with_state:  # continue a stream from inside a chunk
            state = forward(rng.standard_normal((B, 3, cfg.d_model)), params, cfg)[2]
        y, cache, _ = forward(x, params, cfg, state)
        u = rng.standard_normal(y.shape)
        dx, dparams, _ = backward(u, cache)

        def loss(inputs):
            inputs = dict(inputs)
            xx = inputs.pop("x")
            st = None if state is None else {k: v.astype(xx.dtype) if isinstance(v, np.ndarray) else v
                                             for k, v in state.items()}  # fmt: skip
            return np.sum(forward(xx, inputs, cfg, st)[0] * u)

        grads = {"x": dx, **dparams}
        return loss, {"x": x, **params}, grads

    # Every key, entry by entry, by the complex step (the forward is analytic): central differences
    # at e = 1e-6 carry ~1e-10 x (loss scale) of rounding per entry and cannot resolve a key whose
    # gradient is < ~1e-4 of the largest (measured: a gate memory's momentum decay, ~1e-7 of the
    # loss, gave 1e-4..1 relative error). `nested-learning check` reads this attribute.
    case.method = "complex"
    return case


GRADCHECKS: dict[str, Callable[[np.random.Generator], tuple]] = {
    "selfmod.mlp": _case(chunk_memory=2, chunk_other=3),
    "selfmod.mlp_no_momentum": _case(chunk_memory=3, chunk_other=1, momentum=False),
    "selfmod.mlp_adaptive_q": _case(chunk_memory=1, chunk_other=2, adaptive_q=True),
    "selfmod.matrix": _case(memory="matrix", chunk_memory=2, chunk_other=1),
    "selfmod.matrix_single_shrink": _case(memory="matrix", chunk_memory=1, chunk_other=2, single_shrink=True),
    "selfmod.mlp_streaming": _case(T=3, chunk_memory=2, chunk_other=2, with_state=True),
}
