"""Titans neural long-term memory as a sequence layer: surprise with momentum and retention, chunked.

Paper: Titans §3-§4 (arXiv 2501.00663), Titans Eqs. (9)-(18), App. C; NL §5 and §8 for the
conventions (arXiv 2512.24695v1). SPEC: SPEC.md#titans (semantics: SPEC.md#chunks,
SPEC.md#outer-gradient).

Symbols (per head; B batch, T tokens, D width, H heads, dh = D / H, Hm the MLP hidden width):

| paper (Titans)   | NL convention | code            | shape                    |
| ---------------- | ------------- | --------------- | ------------------------ |
| x_t              | x_t           | ``x``           | (B, T, D)                |
| q_t, k_t, v_t    | q, k, v       | ``q, k, v``     | (B, H, T, dh)            |
| theta_t (lr)     | eta_t         | ``eta``         | (B, H, T)                |
| eta_t (momentum) | beta_t        | ``beta``        | (B, H, T)                |
| 1 - alpha_t      | alpha_t       | ``alpha``       | (B, H, T) retention      |
| M_t (matrix)     | M_t           | ``M``           | (B, H, dh, dh)           |
| M_t (MLP)        | W1, W2        | ``W1, W2``      | (B, H, dh, Hm), (B, H, Hm, dh) |
| S_t              | S_t           | ``S_M`` ...     | like the memory weight   |
| M_{t'}           | chunk start   | ``M_b`` ...     | like the memory weight   |
| grad l(M_t'; x_t)| u k^T factors | ``L, R``        | (B, H, n, .) each        |

Decisions where the papers are open (each recorded in SPEC.md#titans):
- gate parameterisation: alpha = sigmoid(x w_alpha + b_alpha), beta = sigmoid(x w_beta + b_beta),
  eta = eta_max sigmoid(x w_eta + b_eta), one scalar per token and head (SPEC.md#titans);
- surprise in the NL convention: S_t = beta_t S_{t-1} - eta_t grad l(M_b; k_t, v_t),
  M_t = alpha_t M_{t-1} + S_t; momentum off means S_t = -eta_t grad l (SPEC.md#titans);
- chunks: reads and inner gradients at the chunk-start state M_b, writes in token order; the
  streaming state carries the partial chunk (SPEC.md#chunks, SPEC.md#titans);
- inner loss l = ||M(k) - v||^2 (factor 2 in the gradient), v the conv-SiLU value, no norm;
- output: per-head RMSNorm with a gain shared by the heads, times silu(x W_g^T), then W_o;
- the outer gradient goes through every write; ``stop_grad_writes`` is the first-order
  variant M_t = M_{t-1} + sg(M_t - M_{t-1}) (SPEC.md#outer-gradient, SPEC.md#titans).

Two implementations of one function: ``memory_loop_forward`` (the token loop that applies the
definition: the oracle) and ``memory_chunked_forward`` (per chunk, the inner gradients as batched
rank-1 factors and the momentum/retention recurrences folded into scalar weights computed from
cumulative products, Titans Eqs. (16)-(18)). Each has its own hand-written backward; the
derivation is docs/titans-backward.md.

CuPy-safe (SPEC.md#backends): NumPy only through the name ``np``; the GPU port runs this module's
source with ``np`` rebound to CuPy (fast/gpu/namespace.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import mlp_memory as MM
from . import primitives as P

# ---------------------------------------------------------------------------------------------
# Configuration, parameters, state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TitansConfig:
    """Hyper-parameters of the Titans layer (SPEC.md#titans)."""

    d_model: int
    n_heads: int = 1
    chunk: int = 16  # C, tokens per chunk (Titans' b = 16)
    memory: str = "matrix"  # "matrix" or "mlp"
    hidden: int = 0  # Hm of the MLP memory; 0 means 4 * dh
    act: str = "gelu"  # sigma of the MLP memory
    layernorm: bool = False  # M(z) = z + LN(W1 sigma(W2 z)) when True
    momentum: bool = True  # surprise momentum S (Titans Eqs. 10, 14)
    retention: bool = True  # data-dependent retention alpha (else alpha = 1)
    eta_max: float = 0.1  # eta = eta_max * sigmoid(.)
    conv_width: int = 4
    stop_grad_writes: bool = False  # first-order outer gradient; never the default
    impl: str = "chunked"  # "chunked" (parallel form) or "loop" (token-loop oracle)
    eps: float = 1e-6  # of the l2 and RMS norms

    def __post_init__(self):
        if self.d_model <= 0 or self.n_heads <= 0 or self.d_model % self.n_heads:
            raise ValueError(
                f"TitansConfig: d_model ({self.d_model}) must be a positive multiple of n_heads ({self.n_heads})"
            )
        if self.chunk < 1:
            raise ValueError(f"TitansConfig: chunk must be >= 1, got {self.chunk}")
        if self.memory not in ("matrix", "mlp"):
            raise ValueError(f"TitansConfig: memory must be 'matrix' or 'mlp', got {self.memory!r}")
        if self.impl not in ("chunked", "loop"):
            raise ValueError(f"TitansConfig: impl must be 'chunked' or 'loop', got {self.impl!r}")
        if self.act not in P.ACTIVATIONS:
            raise ValueError(f"TitansConfig: act must be one of {sorted(P.ACTIVATIONS)}, got {self.act!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return self.hidden if self.hidden > 0 else 4 * self.head_dim


def weight_names(cfg: TitansConfig) -> tuple[str, ...]:
    """Names of the fast memory weights: the matrix M, or the MLP's W1 and W2.
    Public: the CPU port uses it (fast/cpu/titans.py).
    """
    return ("M",) if cfg.memory == "matrix" else ("W1", "W2")


def init_name(n: str) -> str:
    """The outer parameter holding the meta-learned initial value of fast weight ``n``.
    Public: the CPU port uses it (fast/cpu/titans.py).
    """
    return "M0" if n == "M" else n + "_0"


def param_shapes(cfg: TitansConfig) -> dict[str, tuple[int, ...]]:
    """Every outer parameter and its shape; gradients use the same keys."""
    D, H, dh, K = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.conv_width
    shapes = {
        "W_q": (D, D), "W_k": (D, D), "W_v": (D, D),
        "conv_q": (D, K), "conv_k": (D, K), "conv_v": (D, K),
        "w_eta": (H, D), "b_eta": (H,),
    }
    if cfg.retention:
        shapes.update(w_alpha=(H, D), b_alpha=(H,))
    if cfg.momentum:
        shapes.update(w_beta=(H, D), b_beta=(H,))
    if cfg.memory == "matrix":
        shapes["M0"] = (H, dh, dh)  # meta-learned initial memory (d_v, d_k) per head
    else:
        shapes["W1_0"] = (H, dh, cfg.mlp_hidden)
        shapes["W2_0"] = (H, cfg.mlp_hidden, dh)
    shapes.update(g_o=(dh,), W_g=(D, D), W_o=(D, D))
    return shapes


def init_params(cfg: TitansConfig, rng: np.random.Generator, dtype=np.float64) -> dict[str, np.ndarray]:
    """Random initial outer parameters; gate biases give alpha ~ 0.98, beta ~ 0.73, eta ~ 0.12 eta_max
    (stable over thousands of tokens: SPEC.md#titans)."""
    D = cfg.d_model
    p = {}
    for name, shape in param_shapes(cfg).items():
        if name.startswith("conv_"):
            w = 0.1 * rng.standard_normal(shape)
            w[:, -1] += 1.0  # start near the identity on the current token
        elif name.startswith("b_"):
            w = np.full(shape, {"b_alpha": 4.0, "b_beta": 1.0, "b_eta": -2.0}[name])
        elif name.startswith("w_"):
            w = rng.standard_normal(shape) / (4 * np.sqrt(D))
        elif name == "g_o":
            w = np.ones(shape)
        else:  # projections and initial memories (M0 not zero: RMSNorm of a zero read is singular)
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        p[name] = w.astype(dtype)
    return p


def init_state(params: dict[str, np.ndarray], cfg: TitansConfig, batch: int) -> dict:
    """The state at the start of a sequence: the meta-learned memory broadcast to the batch, zero
    momentum, position 0 in the chunk, zero convolution history.

    Keys: per memory weight n ("M", or "W1" and "W2"): ``n`` the running state, ``n + "_b"`` the
    chunk-start state, ``"S_" + n`` the momentum (when ``cfg.momentum``); ``"pos"`` (int) the
    position in the current chunk; ``"conv_q"``, ``"conv_k"``, ``"conv_v"`` (B, K-1, D)."""
    dtype = params["W_q"].dtype
    state: dict = {}
    for n in weight_names(cfg):
        p0 = params[init_name(n)]  # (H, ., .)
        # order="C": NumPy's default ("K") would put the broadcast's zero-stride batch axis innermost
        w0 = np.broadcast_to(p0, (batch,) + p0.shape).astype(dtype, order="C")  # (B, H, ., .)
        state[n] = w0.copy()
        state[n + "_b"] = w0.copy()
        if cfg.momentum:
            state["S_" + n] = np.zeros(w0.shape, dtype=dtype)
    state["pos"] = 0
    for c in ("conv_q", "conv_k", "conv_v"):
        state[c] = np.zeros((batch, cfg.conv_width - 1, cfg.d_model), dtype=dtype)
    return state


def mem_keys(cfg: TitansConfig) -> list[str]:
    """The memory-state keys: per fast weight n, n, n_b (the chunk-start copy) and, with momentum, S_n.
    Public: the CPU port uses it (fast/cpu/titans.py)."""
    keys = []
    for n in weight_names(cfg):
        keys += [n, n + "_b"] + (["S_" + n] if cfg.momentum else [])
    return keys


# ---------------------------------------------------------------------------------------------
# The memory: reads M_b(q) and the per-token inner-gradient factors at M_b
# ---------------------------------------------------------------------------------------------


def _read_forward(cfg, Wb, q):
    """o = M_b(q): one batched memory forward at the chunk-start state. q (B, H, n, dh)."""
    if cfg.memory == "matrix":
        return MM.matrix_memory_forward(Wb["M"], q)  # (B, H, n, dh)
    return MM.mlp_memory_forward(Wb["W1"], Wb["W2"], q, act=cfg.act, layernorm=cfg.layernorm)


def _read_backward(cfg, do, cache):
    """VJP of the read: (dWb, dq)."""
    if cfg.memory == "matrix":
        dM, dq = MM.matrix_memory_backward(do, cache)
        return {"M": dM}, dq
    dW1, dW2, dq = MM.mlp_memory_backward(do, cache)
    return {"W1": dW1, "W2": dW2}, dq


def read_forward(cfg, W, q):
    """A read-only retrieval M*(q) at fast weights ``W`` ({name: (B, H, ., .)}, the keys of
    ``weight_names``), q (B, H, n, dh): the layer's read, without a write. Returns (o, cache).
    Public: Titans' memory as context reads the memory so at each segment's start (reference/blocks.py
    ``mac_forward``, SPEC.md#titans-mac); the CPU port has the same function."""
    return _read_forward(cfg, W, q)


def read_backward(cfg, do, cache):
    """VJP of ``read_forward``: ({name: dW}, dq)."""
    return _read_backward(cfg, do, cache)


def inner_grad(cfg, Wb, k, v):
    """Per-token gradients of l_n = ||M_b(k_n) - v_n||^2 at the chunk-start state (Titans Eq. 12)
    as rank-1 factors: grad_n = L_n R_n^T per memory weight. Returns ({name: (L, R)}, cache)."""
    if cfg.memory == "matrix":
        u, cache = MM.matrix_inner_grad(Wb["M"], k, v)  # u = 2 (M_b k - v)   # Titans Eq. (12)
        return {"M": (u, k)}, cache
    u1, a, u2, cache = MM.inner_grad(Wb["W1"], Wb["W2"], k, v, cfg.act, cfg.layernorm)  # Titans Eq. (12)
    return {"W1": (u1, a), "W2": (u2, k)}, cache


def inner_grad_backward(cfg, dfac, cache):
    """VJP of ``inner_grad``: {name: (dL, dR)} -> (dWb, dk, dv), second-order terms included; the
    explicit key in the right factor R = k adds dR to dk."""
    if cfg.memory == "matrix":
        du, dR = dfac["M"]
        dM, dk, dv = MM.matrix_inner_grad_backward(du, cache)
        return {"M": dM}, dk + dR, dv
    (du1, da), (du2, dk_direct) = dfac["W1"], dfac["W2"]
    dW1, dW2, dk, dv = MM.inner_grad_backward(du1, da, du2, cache)
    return {"W1": dW1, "W2": dW2}, dk + dk_direct, dv


def _outer(L, R):
    """sum_n L_n R_n^T per (B, H), or per token when L, R have one token."""
    return np.einsum("bhni,bhnj->bhij", L, R)


def _inner(a, b):
    """<a, b> over the last two axes: (B, H, i, j) x (B, H, i, j) -> (B, H)."""
    return np.einsum("bhij,bhij->bh", a, b)


# ---------------------------------------------------------------------------------------------
# The token loop: the definition, the oracle
# ---------------------------------------------------------------------------------------------


def memory_loop_forward(q, k, v, alpha, beta, eta, mem, cfg):
    """Token loop over the surprise recurrence with chunk-start reads and gradients.

    q, k, v (B, H, T, dh); alpha, beta, eta (B, H, T) (beta ignored when momentum is off);
    mem: the memory part of the state (``mem_keys`` plus ``pos``). Returns (o, cache, mem_out)."""
    C, names = cfg.chunk, weight_names(cfg)
    T = q.shape[2]
    W = {n: mem[n] for n in names}  # running state M_{t-1}
    Wb = {n: mem[n + "_b"] for n in names}  # chunk-start state M_b
    S = {n: mem["S_" + n] for n in names} if cfg.momentum else None
    pos = mem["pos"]
    o = np.empty_like(q)
    tape = []
    for t in range(T):
        sl = slice(t, t + 1)
        o[:, :, sl], rcache = _read_forward(cfg, Wb, q[:, :, sl])  # o_t = M_b(q_t)   # Titans Eq. (15)
        fac, fcache = inner_grad(cfg, Wb, k[:, :, sl], v[:, :, sl])
        G = {n: _outer(*fac[n]) for n in names}  # (B, H, ., .)
        a_t, b_t, e_t = (g[:, :, t, None, None] for g in (alpha, beta, eta))
        W_prev, S_prev = W, S
        if cfg.momentum:
            S = {n: b_t * S[n] - e_t * G[n] for n in names}  # Titans Eq. (14)
            W = {n: a_t * W[n] + S[n] for n in names}  # Titans Eq. (13)
        else:
            W = {n: a_t * W[n] - e_t * G[n] for n in names}  # Titans Eq. (13), S_t = -eta_t grad
        pos += 1
        boundary = pos == C
        if boundary:
            Wb, pos = W, 0
        tape.append((rcache, fac, fcache, G, W_prev, S_prev, boundary))
    mem_out = {"pos": pos}
    for n in names:
        mem_out[n], mem_out[n + "_b"] = W[n], Wb[n]
        if cfg.momentum:
            mem_out["S_" + n] = S[n]
    return o, (tape, alpha, beta, eta, cfg), mem_out


def memory_loop_backward(do, cache, dmem=None):
    """Reverse of ``memory_loop_forward``: (dq, dk, dv, dalpha, dbeta, deta, dmem0)."""
    tape, alpha, beta, eta, cfg = cache
    names = weight_names(cfg)
    B, H, T, dh = do.shape
    dq, dk, dv = (np.zeros_like(do) for _ in range(3))
    dalpha, dbeta, deta = (np.zeros_like(alpha) for _ in range(3))
    W_last = tape[-1][4]
    dW = {n: dmem_get(dmem, n, W_last[n]) for n in names}
    dWb = {n: dmem_get(dmem, n + "_b", W_last[n]) for n in names}
    dS = {n: dmem_get(dmem, "S_" + n, W_last[n]) for n in names} if cfg.momentum else None
    for t in range(T - 1, -1, -1):
        rcache, fac, fcache, G, W_prev, S_prev, boundary = tape[t]
        sl = slice(t, t + 1)
        if boundary:  # M_b of the next chunk was set to M_t
            dW = {n: dW[n] + dWb[n] for n in names}
            dWb = {n: np.zeros_like(dWb[n]) for n in names}
        dWb_r, dq[:, :, sl] = _read_backward(cfg, do[:, :, sl], rcache)
        dWb = {n: dWb[n] + dWb_r[n] for n in names}
        if cfg.stop_grad_writes:  # M_t = M_{t-1} + sg(increment): straight through
            continue
        a_t, b_t, e_t = (g[:, :, t, None, None] for g in (alpha, beta, eta))
        dalpha[:, :, t] = sum(_inner(dW[n], W_prev[n]) for n in names)
        dS_t = {n: dW[n] + dS[n] for n in names} if cfg.momentum else dW  # dL/dS_t
        if cfg.momentum:
            dbeta[:, :, t] = sum(_inner(dS_t[n], S_prev[n]) for n in names)
            dS = {n: b_t * dS_t[n] for n in names}
        deta[:, :, t] = -sum(_inner(dS_t[n], G[n]) for n in names)
        dG = {n: -e_t * dS_t[n] for n in names}
        dfac = {n: (np.einsum("bhij,bhnj->bhni", dG[n], fac[n][1]),
                    np.einsum("bhij,bhni->bhnj", dG[n], fac[n][0])) for n in names}
        dWb_g, dk[:, :, sl], dv[:, :, sl] = inner_grad_backward(cfg, dfac, fcache)
        dWb = {n: dWb[n] + dWb_g[n] for n in names}
        dW = {n: a_t * dW[n] for n in names}
    dmem0 = {}
    for n in names:
        dmem0[n], dmem0[n + "_b"] = dW[n], dWb[n]
        if cfg.momentum:
            dmem0["S_" + n] = dS[n] if not cfg.stop_grad_writes else np.zeros_like(dW[n])
    return dq, dk, dv, dalpha, dbeta, deta, dmem0


def dmem_get(dmem, key, like):
    """dmem[key] in ``like``'s dtype, zeros when absent or None. Public: the CPU port uses it."""
    if dmem is None or dmem.get(key) is None:
        return np.zeros_like(like)
    return np.asarray(dmem[key], dtype=like.dtype)


# ---------------------------------------------------------------------------------------------
# The chunk-parallel form (Titans Eqs. 16-18)
# ---------------------------------------------------------------------------------------------


def chunk_coefficients(alpha, beta, eta, momentum):
    """Scalar weights that fold a chunk's writes into one step (Titans Eqs. 16-18).

    For a chunk of c tokens starting from running state (M_r, S_r), with a_i = prod_{j>i} alpha_j
    and P[i, m] = prod_{m<j<=i} beta_j (the cumulative products, i.e. the two scans):
        M_end = A M_r + s S_r - sum_m w_m G_m,   A = a_0, s = sum_i a_i P[i, 0],
                                                 w_m = eta_m sum_{i>=m} a_i P[i, m]
        S_end = Bc S_r - sum_m e_m G_m,          Bc = P[c, 0], e_m = eta_m P[c, m]
    alpha, beta, eta (B, H, c). Without momentum P = I (S_t = -eta_t G_t) and s = Bc = e = 0.
    """
    B, H, c = alpha.shape
    la = np.concatenate([np.zeros((B, H, 1), alpha.dtype), np.cumsum(np.log(alpha), axis=-1)], -1)
    a = np.exp(la[..., -1:] - la)  # (B, H, c+1): a_i = prod_{j=i+1..c} alpha_j
    tril = np.tril(np.ones((c + 1, c + 1), dtype=bool))
    if momentum:
        lb = np.concatenate([np.zeros((B, H, 1), beta.dtype), np.cumsum(np.log(beta), axis=-1)], -1)
        diff = lb[..., :, None] - lb[..., None, :]  # (B, H, i, m)
        Pm = np.exp(np.where(tril, diff, -np.inf))  # P[i, m], zero above the diagonal
    else:
        Pm = np.broadcast_to(np.eye(c + 1, dtype=alpha.dtype), (B, H, c + 1, c + 1))
    K = np.einsum("bhi,bhim->bhm", a[..., 1:], Pm[..., 1:, 1:])  # (B, H, c): sum_{i>=m} a_i P[i, m]
    w = eta * K
    A = a[..., 0]
    if momentum:
        s = np.einsum("bhi,bhi->bh", a[..., 1:], Pm[..., 1:, 0])
        Bc = Pm[..., c, 0]
        e = eta * Pm[..., c, 1:]
    else:
        s = Bc = np.zeros((B, H), alpha.dtype)
        e = np.zeros_like(eta)
    return (A, s, w, Bc, e), (a, Pm, K, alpha, beta, eta, momentum)


def chunk_coefficients_backward(dA, ds, dw, dBc, de, cache):
    """VJP of ``chunk_coefficients``: (dalpha, dbeta, deta), through the logs of the products."""
    a, Pm, K, alpha, beta, eta, momentum = cache
    B, H, c = alpha.shape
    deta = dw * K + de * Pm[..., c, 1:]
    # Every coefficient is a sum of terms a_i P[i, m] (times eta_m); Q[i, m] is its upstream weight.
    Q = np.zeros((B, H, c + 1, c + 1), dtype=alpha.dtype)
    Q[..., 1:, 1:] = (dw * eta)[..., None, :]
    if momentum:
        Q[..., 1:, 0] = ds[..., None]
    terms = a[..., :, None] * Pm * Q  # (B, H, i, m), zero where i = 0 or m > i
    r = terms.sum(-1)  # (B, H, i)
    # d log a_i / d log alpha_j = [j > i]; A = a_0 depends on every alpha_j.
    dla = np.cumsum(r, axis=-1)[..., :-1] + (dA * a[..., 0])[..., None]  # index j = 1..c
    dalpha = dla / alpha
    dbeta = np.zeros_like(beta)
    if momentum:
        idx = np.arange(c + 1)
        # d log P[i, m] / d log beta_j = [m < j <= i], j = 1..c
        mask = (idx[None, None, :] < idx[1:, None, None]) & (idx[1:, None, None] <= idx[None, :, None])
        dlb = np.einsum("jim,bhim->bhj", mask.astype(alpha.dtype), terms)
        dlb = dlb + (dBc * Pm[..., c, 0])[..., None]
        e_full = eta * Pm[..., c, 1:]  # e_m, m = 1..c; depends on beta_j for j > m
        dlb = dlb + np.cumsum((de * e_full), axis=-1) - de * e_full  # sum_{m<j} de_m e_m
        dbeta = dlb / beta
    return dalpha, dbeta, deta


def segments(T, pos, C):
    """Token ranges [t0, t1) of the chunks: the first completes a partial chunk at ``pos``.
    Public: the CPU port uses it (fast/cpu/titans.py).
    """
    out, t0 = [], 0
    while t0 < T:
        t1 = min(T, t0 + C - pos)
        out.append((t0, t1, pos + (t1 - t0) == C))
        pos, t0 = (pos + t1 - t0) % C, t1
    return out


def memory_chunked_forward(q, k, v, alpha, beta, eta, mem, cfg):
    """Chunk-parallel form of ``memory_loop_forward`` (same function, same arguments)."""
    names = weight_names(cfg)
    W = {n: mem[n] for n in names}  # running state, (B, H, ., .) per weight
    Wb = {n: mem[n + "_b"] for n in names}  # chunk-start state
    S = {n: mem["S_" + n] for n in names} if cfg.momentum else None  # momentum
    segs = segments(q.shape[2], mem["pos"], cfg.chunk)  # the first may complete a partial chunk
    o = np.empty_like(q)
    tape = []
    for t0, t1, boundary in segs:
        sl = slice(t0, t1)
        o[:, :, sl], rcache = _read_forward(cfg, Wb, q[:, :, sl])  # all reads at M_b   # Titans Eq. (15)
        fac, fcache = inner_grad(cfg, Wb, k[:, :, sl], v[:, :, sl])  # all gradients at M_b
        # (B, H), (B, H), (B, H, c), (B, H), (B, H, c): the scans of the gates
        (A, s, w, Bc, e), ccache = chunk_coefficients(alpha[..., sl], beta[..., sl], eta[..., sl], cfg.momentum)
        W_start, S_start = W, S
        W = {n: A[..., None, None] * W[n]
             - np.einsum("bhm,bhmi,bhmj->bhij", w, *fac[n]) for n in names}  # Titans Eqs. (16)-(17)
        if cfg.momentum:
            W = {n: W[n] + s[..., None, None] * S[n] for n in names}  # Titans Eq. (18), momentum scan
            S = {n: Bc[..., None, None] * S[n]
                 - np.einsum("bhm,bhmi,bhmj->bhij", e, *fac[n]) for n in names}  # Titans Eq. (18)
        if boundary:
            Wb = W
        tape.append((sl, rcache, fac, fcache, (A, s, w, Bc, e), ccache, W_start, S_start, boundary))
    mem_out = {"pos": (mem["pos"] + q.shape[2]) % cfg.chunk}
    for n in names:
        mem_out[n], mem_out[n + "_b"] = W[n], Wb[n]
        if cfg.momentum:
            mem_out["S_" + n] = S[n]
    return o, (tape, alpha, beta, eta, cfg), mem_out


def memory_chunked_backward(do, cache, dmem=None):
    """Reverse of ``memory_chunked_forward``: (dq, dk, dv, dalpha, dbeta, deta, dmem0)."""
    tape, alpha, beta, eta, cfg = cache
    names = weight_names(cfg)
    dq, dk, dv = (np.zeros_like(do) for _ in range(3))
    dalpha, dbeta, deta = (np.zeros_like(alpha) for _ in range(3))
    W_like = tape[-1][6]
    dW = {n: dmem_get(dmem, n, W_like[n]) for n in names}
    dWb = {n: dmem_get(dmem, n + "_b", W_like[n]) for n in names}
    dS = {n: dmem_get(dmem, "S_" + n, W_like[n]) for n in names} if cfg.momentum else None
    for sl, rcache, fac, fcache, coef, ccache, W_start, S_start, boundary in reversed(tape):
        if boundary:
            dW = {n: dW[n] + dWb[n] for n in names}
            dWb = {n: np.zeros_like(dWb[n]) for n in names}
        dWb_r, dq[:, :, sl] = _read_backward(cfg, do[:, :, sl], rcache)
        dWb = {n: dWb[n] + dWb_r[n] for n in names}
        if cfg.stop_grad_writes:
            continue
        A, s, w, Bc, e = coef
        dA = sum(_inner(dW[n], W_start[n]) for n in names)
        # upstream of each G_m = L_m R_m^T: -(w_m dW + e_m dS)
        dw = -sum(np.einsum("bhij,bhmi,bhmj->bhm", dW[n], *fac[n]) for n in names)
        dfac = {}
        for n in names:
            L, R = fac[n]
            dL = -np.einsum("bhm,bhij,bhmj->bhmi", w, dW[n], R)
            dR = -np.einsum("bhm,bhij,bhmi->bhmj", w, dW[n], L)
            if cfg.momentum:
                dL = dL - np.einsum("bhm,bhij,bhmj->bhmi", e, dS[n], R)
                dR = dR - np.einsum("bhm,bhij,bhmi->bhmj", e, dS[n], L)
            dfac[n] = (dL, dR)
        if cfg.momentum:
            ds = sum(_inner(dW[n], S_start[n]) for n in names)
            dBc = sum(_inner(dS[n], S_start[n]) for n in names)
            de = -sum(np.einsum("bhij,bhmi,bhmj->bhm", dS[n], *fac[n]) for n in names)
            dS_new = {n: s[..., None, None] * dW[n] + Bc[..., None, None] * dS[n] for n in names}
        else:
            ds = dBc = np.zeros_like(dA)
            de = np.zeros_like(dw)
        da, db, de_ = chunk_coefficients_backward(dA, ds, dw, dBc, de, ccache)
        dalpha[..., sl], dbeta[..., sl], deta[..., sl] = da, db, de_
        dWb_g, dk[:, :, sl], dv[:, :, sl] = inner_grad_backward(cfg, dfac, fcache)
        dWb = {n: dWb[n] + dWb_g[n] for n in names}
        dW = {n: A[..., None, None] * dW[n] for n in names}
        if cfg.momentum:
            dS = dS_new
    dmem0 = {}
    for n in names:
        dmem0[n], dmem0[n + "_b"] = dW[n], dWb[n]
        if cfg.momentum:
            dmem0["S_" + n] = dS[n] if not cfg.stop_grad_writes else np.zeros_like(dW[n])
    return dq, dk, dv, dalpha, dbeta, deta, dmem0


# ---------------------------------------------------------------------------------------------
# The layer: projections, gates, memory, output
# ---------------------------------------------------------------------------------------------


def check_layer_inputs(x, params, cfg, cfg_type, shapes):
    """The checks every sequence layer's forward shares (ValueError naming the argument and the
    expected shape): ``cfg`` a ``cfg_type``, x (B, T, D) float32/float64 with T >= 1, and every
    parameter of ``shapes`` present with its shape and x's dtype. Returns x as an array."""
    if not isinstance(cfg, cfg_type):
        raise ValueError(f"cfg: expected a {cfg_type.__name__}, got {type(cfg).__name__}")
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[-1] != cfg.d_model or x.shape[1] < 1:
        raise ValueError(f"x: expected shape (B, T, D) with D = {cfg.d_model} and T >= 1, got {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"x: expected dtype float32 or float64, got {x.dtype}")
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"params[{name!r}]: missing; expected shape {shape}")
        p = np.asarray(params[name])
        if p.shape != shape:
            raise ValueError(f"params[{name!r}]: expected shape {shape}, got {p.shape}")
        if p.dtype != x.dtype:
            raise ValueError(f"params[{name!r}]: expected dtype {x.dtype} (that of x), got {p.dtype}")
    return x


def check_inputs(x, params, cfg, state):
    """ValueError naming the argument and the expected shape for bad input.
    Public: the CPU port uses it (fast/cpu/titans.py).
    """
    x = check_layer_inputs(x, params, cfg, TitansConfig, param_shapes(cfg) if isinstance(cfg, TitansConfig) else {})
    if state is not None:
        B = x.shape[0]
        wshape = {"M": (cfg.n_heads, cfg.head_dim, cfg.head_dim),
                  "W1": (cfg.n_heads, cfg.head_dim, cfg.mlp_hidden),
                  "W2": (cfg.n_heads, cfg.mlp_hidden, cfg.head_dim)}
        expected = {key: (B,) + wshape[key.removeprefix("S_").removesuffix("_b")] for key in mem_keys(cfg)}
        expected.update({c: (B, cfg.conv_width - 1, cfg.d_model) for c in ("conv_q", "conv_k", "conv_v")})
        for key, shape in expected.items():
            if key not in state or np.shape(state[key]) != shape:
                got = np.shape(state[key]) if key in state else "nothing"
                raise ValueError(f"state[{key!r}]: expected shape {shape}, got {got}")
        pos = state.get("pos")
        if not isinstance(pos, int | np.integer) or not 0 <= pos < cfg.chunk:
            raise ValueError(f"state['pos']: expected an int in [0, {cfg.chunk}), got {pos!r}")
    return x


def _gate_forward(x, w, b):
    """sigmoid(x w^T + b) per token and head: (B, T, D), (H, D), (H,) -> (B, H, T)."""
    z = np.einsum("btd,hd->bht", x, w) + b[None, :, None]  # (B, H, T)
    return P.sigmoid_forward(z)


def _gate_backward(dg, cache, x, w):
    dz = P.sigmoid_backward(dg, cache)  # (B, H, T)
    return np.einsum("bht,hd->btd", dz, w), np.einsum("bht,btd->hd", dz, x), dz.sum(axis=(0, 2))


def titans_forward(x, params, cfg: TitansConfig, state=None):
    """The Titans layer over x (B, T, D). Returns (y, cache, state): y (B, T, D); the returned state
    continues the sequence in a later call (``state=None``: a fresh sequence from the
    meta-learned initial memory). Inputs are not mutated."""
    x = check_inputs(x, params, cfg, state)
    B, T, D = x.shape
    H, dh = cfg.n_heads, cfg.head_dim
    fresh = state is None
    if fresh:
        state = init_state(params, cfg, B)
    new_state, c_proj, heads = {}, {}, {}
    for n in ("q", "k", "v"):
        p, c_lin = P.linear_forward(x, params["W_" + n])  # (B, T, D)
        c, c_conv, new_state["conv_" + n] = P.conv1d_forward(p, params["conv_" + n], None, state["conv_" + n])
        s, c_act = P.silu_forward(c)  # (B, T, D)
        s = s.reshape(B, T, H, dh)  # (B, T, H, dh)
        c_norm = None
        if n != "v":
            s, c_norm = P.l2norm_forward(s, cfg.eps)  # per head (Titans §4.4)
        heads[n] = s.transpose(0, 2, 1, 3)  # (B, H, T, dh)
        c_proj[n] = (c_lin, c_conv, c_act, c_norm)
    s_eta, c_eta = _gate_forward(x, params["w_eta"], params["b_eta"])
    eta = cfg.eta_max * s_eta  # (B, H, T) inner learning rate (Titans' theta)
    alpha, c_alpha = (_gate_forward(x, params["w_alpha"], params["b_alpha"]) if cfg.retention
                      else (np.ones((B, H, T), x.dtype), None))  # retention (1 - Titans' alpha)
    beta, c_beta = (_gate_forward(x, params["w_beta"], params["b_beta"]) if cfg.momentum
                    else (np.zeros((B, H, T), x.dtype), None))  # momentum decay (Titans' eta)
    mem = {key: state[key] for key in mem_keys(cfg)}
    mem["pos"] = int(state["pos"])
    scan = memory_chunked_forward if cfg.impl == "chunked" else memory_loop_forward
    o, c_mem, mem_out = scan(heads["q"], heads["k"], heads["v"], alpha, beta, eta, mem, cfg)
    for key, val in mem_out.items():
        new_state[key] = val if key == "pos" else np.array(val, copy=True)
    o_n, c_rms = P.rmsnorm_forward(o.transpose(0, 2, 1, 3), params["g_o"], cfg.eps)  # (B, T, H, dh)
    zg, c_g = P.linear_forward(x, params["W_g"])  # (B, T, D)
    g, c_gs = P.silu_forward(zg)  # output gate
    h = o_n.reshape(B, T, D) * g  # (B, T, D)
    y, c_o = P.linear_forward(h, params["W_o"])  # (B, T, D)
    cache = dict(x=x, params=params, cfg=cfg, fresh=fresh, c_proj=c_proj, gates=(c_eta, c_alpha, c_beta),
                 c_mem=c_mem, c_rms=c_rms, o_n=o_n, c_g=c_g, g=g, c_gs=c_gs, c_o=c_o)
    return y, cache, new_state


def titans_backward(dy, cache, dstate=None):
    """Hand-written VJP of ``titans_forward``: (dx, dparams, dstate0).

    ``dstate`` (optional): gradient reaching the returned state from a later call (any subset of
    its array keys). ``dstate0``: gradient w.r.t. the state passed in (None for a fresh sequence,
    whose initial memory is the parameter M0 / W1_0, W2_0 and gets the gradient instead)."""
    x, params, cfg = cache["x"], cache["params"], cache["cfg"]
    B, T, D = x.shape
    H, dh = cfg.n_heads, cfg.head_dim
    dy = np.asarray(dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected shape (B, T, D) = {x.shape}, got {dy.shape}")
    dstate = {} if dstate is None else dstate
    grads = {}
    dh_, grads["W_o"], _ = P.linear_backward(dy, cache["c_o"])
    dg = dh_ * cache["o_n"].reshape(B, T, D)
    do_n = (dh_ * cache["g"]).reshape(B, T, H, dh)
    dx, grads["W_g"], _ = P.linear_backward(P.silu_backward(dg, cache["c_gs"]), cache["c_g"])
    do, grads["g_o"] = P.rmsnorm_backward(do_n, cache["c_rms"])
    scan_backward = memory_chunked_backward if cfg.impl == "chunked" else memory_loop_backward
    dmem = {key: dstate.get(key) for key in mem_keys(cfg)}
    dq, dk, dv, dalpha, dbeta, deta, dmem0 = scan_backward(do.transpose(0, 2, 1, 3), cache["c_mem"], dmem)
    c_eta, c_alpha, c_beta = cache["gates"]
    for name, dgate, c in (("eta", deta * cfg.eta_max, c_eta), ("alpha", dalpha, c_alpha), ("beta", dbeta, c_beta)):
        if c is None:
            continue
        dx_g, grads["w_" + name], grads["b_" + name] = _gate_backward(dgate, c, x, params["w_" + name])
        dx = dx + dx_g
    dstate0 = None if cache["fresh"] else {}
    for n, dhead in (("q", dq), ("k", dk), ("v", dv)):
        c_lin, c_conv, c_act, c_norm = cache["c_proj"][n]
        ds = dhead.transpose(0, 2, 1, 3)  # (B, T, H, dh)
        if c_norm is not None:
            ds = P.l2norm_backward(ds, c_norm)
        dc = P.silu_backward(ds.reshape(B, T, D), c_act)
        dp, grads["conv_" + n], _, dconv_state = P.conv1d_backward(dc, c_conv, dstate.get("conv_" + n))
        dx_p, grads["W_" + n], _ = P.linear_backward(dp, c_lin)
        dx = dx + dx_p
        if dstate0 is not None:
            dstate0["conv_" + n] = dconv_state
    for n in weight_names(cfg):
        if cache["fresh"]:  # M_b and M both start at the broadcast meta-learned initial state
            grads[init_name(n)] = (dmem0[n] + dmem0[n + "_b"]).sum(axis=0)
        else:  # the initial memory was not used: the incoming state replaced it
            grads[init_name(n)] = np.zeros_like(params[init_name(n)])
            dstate0.update({key: dmem0[key] for key in mem_keys(cfg) if key.removeprefix("S_").removesuffix("_b") == n})
    grads = {key: grads[key] for key in param_shapes(cfg)}  # same keys and order as params
    return dx, grads, dstate0
