"""PyTorch eager CPU implementation of the whole model: an autograd oracle and a benchmark peer.

Paper: §7-§8.3, Eqs. (70)-(74), (83)-(97), arXiv 2512.24695v1 (Titans: Titans Eqs. 9-18).
SPEC: SPEC.md#fast-cpu ("PyTorch eager oracle"); the function it computes is the one of
SPEC.md#hope, SPEC.md#cms, SPEC.md#titans, SPEC.md#selfmod, SPEC.md#chunks and
SPEC.md#outer-gradient. It is written from those definitions, never by calling the reference's
forward or backward: the gradients come from torch autograd, so agreement with
``reference.model.loss_and_grads`` checks the hand-written backward independently.

Symbols (paper symbol -> code name, shape; B batch, T tokens, D width, H heads, dh = D / H,
Hm a memory's or a level's hidden width, V vocabulary, n tokens of one segment):

    x_t (tokens)              tokens                 (B, T) int64
    embedding, head           P["embed.E"], P["head.W"]   (V, D)
    q_t, k_t, v_t             q, k, v                (B, H, n, dh)
    eta_t, alpha_t, beta_t    eta, alpha, beta       (B, H, n) (selfmod: beta (H,) per memory)
    eta'_t (prox step)        ep                     (B, H, n)
    M_t (matrix) / W1, W2     W["M"] / W["W1"], W["W2"]   (B, H, dh, dh) / (B, H, dh, Hm), (B, H, Hm, dh)
    chunk-start state M_b     Wb (titans), Bst (selfmod)  like the weight
    surprise momentum S_t     S                      like the weight
    grad l(M_b; k_t, v_t)     G                      (B, H, n, ., .)   per token, from autograd
    v_hat_box                 vhat                   (B, H, n, dh)
    theta^(f_l) (CMS level)   cms_w[i][l] = (W1, W2) (B, G_l, D, Hm), (B, G_l, Hm, D)
    logits                    logits                 (B, T, V)

Decisions (none new: each follows the SPEC section it names):
    - the inner gradients G of every memory are built by ``torch.autograd.grad(...,
      create_graph=True)`` of the inner loss with respect to a per-token copy of the chunk-start
      weights, so the outer gradient goes through them exactly (second order through the MLP
      memory); the target ``v_hat = M(B; v)`` is computed from the chunk-start weights, not from
      the copy, so it is a constant inside the inner gradient and an ordinary function of the
      parameters outside it (SPEC.md#outer-gradient, SPEC.md#selfmod);
    - the writes are applied by a token loop inside each chunk (the definition, SPEC.md#chunks),
      not by the reference's closed chunk forms: an independent route to the same function;
    - in-context CMS is first order (SPEC.md#cms): a chunk-major pass computes each level's write,
      the summed next-token-loss gradient of its own chunk (re-run from the states before it),
      with ``torch.autograd.grad`` from *detached* states and parameters, applies Eq. (71), and keeps the increments as constants (``.detach()``); the outer loss is
      then one whole-sequence pass with the weights theta_0 + increments, differentiated by
      autograd (SPEC.md#hope, "Outer loss");
    - parameters are the reference's (``reference.model.init_params`` / ``param_shapes``: one
      interface for every backend, SPEC.md#fast-cpu); NumPy in, NumPy out, in ``cfg.dtype``.

Devices: the NumPy-interface functions (``forward``, ``loss_and_grads``, ``cms_increments``) build
their tensors on the module's device, CPU unless ``set_device("cuda")``; every other tensor is made
on the device of the tensors it derives from. On CUDA, TF32 is switched off (matrix products and
cuDNN), so float32 means float32 as on every other backend. The device-resident interface, for a
benchmark that keeps everything on the GPU across steps (bench.py's ``torch-cuda`` row):
``init_from_params(params, cfg, device=...)`` (tensors), ``forward_tensors`` (tensors in, tensors
out, no validation, no host copy) and ``Trainer`` (parameters and ``torch.optim.AdamW`` state on
the device; one ``step(tokens)`` = loss, autograd gradients, AdamW update).

Only the model configurations reachable from ``config.ModelConfig`` are implemented (memory
layers with momentum, retention, GELU memories, no LayerNorm, static q, l2-normalised v).
"""

from __future__ import annotations

import math

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "nlref.torch_model needs PyTorch, which is not installed: install the 'oracle' extra "
        "(pip install 'nested-learning-reference[oracle]', which pins torch==2.13.0)"
    ) from exc

from .config import ModelConfig

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DEVICE = torch.device("cpu")


def set_device(device) -> torch.device:
    """The device of the NumPy-interface functions' tensors ("cpu", "cuda", "cuda:1", ...); returns it.
    A CUDA device switches TF32 off (matrix products and cuDNN): float32 stays float32."""
    global _DEVICE
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        no_tf32()
    _DEVICE = dev
    return dev


def get_device() -> torch.device:
    """The device set by ``set_device`` (CPU by default)."""
    return _DEVICE


def no_tf32() -> None:
    """Float32 matrix products and convolutions in float32 (no TF32) on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ---------------------------------------------------------------------------------------------
# Parameters and input validation
# ---------------------------------------------------------------------------------------------


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The outer parameters and their shapes: the reference's interface (SPEC.md#hope)."""
    from .reference import model as ref

    return ref.param_shapes(cfg)


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The reference's initial parameters (NumPy, ``cfg.dtype``): every backend starts alike."""
    from .reference import model as ref

    return ref.init_params(cfg, seed)


def init_from_params(params, cfg: ModelConfig, device=None) -> dict[str, torch.Tensor]:
    """Torch copies (never views) of ``params`` in ``cfg.dtype`` on ``device`` (default: the module's,
    ``set_device``); ValueError names a bad key, NotImplementedError a config this oracle does not compute."""
    device = _DEVICE if device is None else torch.device(device)
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig (config.preset(name)), got {type(cfg).__name__}")
    _check_computes(cfg)  # NotImplementedError before any computing: every entry point comes here
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict[str, np.ndarray] from init_params, got {type(params).__name__}")
    shapes = param_shapes(cfg)
    out = {}
    for key, shape in shapes.items():
        if key not in params:
            raise ValueError(f"params[{key!r}] is missing: expected an array of shape {shape}")
        a = np.asarray(params[key])
        if a.dtype.kind != "f":
            raise ValueError(f"params[{key!r}] must be a float array of shape {shape}, got dtype {a.dtype}")
        if a.shape != shape:
            raise ValueError(f"params[{key!r}] must have shape {shape}, got {a.shape}")
        out[key] = torch.tensor(np.array(a, dtype=cfg.dtype, copy=True), device=device)
    extra = sorted(set(params) - set(shapes))
    if extra:
        raise ValueError(f"params has keys {extra} that config {cfg.name!r} does not use")
    return out


def _tokens(tokens, cfg: ModelConfig, min_T: int = 1) -> torch.Tensor:
    a = np.asarray(tokens)
    if a.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an integer array of shape (B, T), got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < min_T:
        raise ValueError(f"tokens must have shape (B, T) with B >= 1 and T >= {min_T}, got shape {a.shape}")
    if a.min() < 0 or a.max() >= cfg.vocab_size:
        raise ValueError(f"tokens must lie in the vocabulary [0, {cfg.vocab_size}), got [{a.min()}, {a.max()}]")
    return torch.tensor(a.astype(np.int64), device=_DEVICE)


# ---------------------------------------------------------------------------------------------
# Primitives (SPEC.md#primitives)
# ---------------------------------------------------------------------------------------------


def _rmsnorm(x, g, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * g  # (..., D)


def _l2norm(x, eps):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)  # (..., D)


def _act(name):
    return {"gelu": F.gelu, "silu": F.silu}[name]  # F.gelu is the exact erf GELU


def _conv(x, w, hist):
    """Causal depthwise conv: x (B, n, D), w (D, K), hist (B, K-1, D) -> (y, new history)."""
    n, K = x.shape[1], w.shape[1]
    xp = torch.cat([hist, x], dim=1)  # (B, K-1+n, D)
    y = sum(w[:, j] * xp[:, j:j + n] for j in range(K))  # w[:, K-1] on the current token
    return y, xp[:, n:]


def _rope(x, p0, base):
    """Interleaved-pair RoPE of x (B, H, n, dh) at positions p0..p0+n-1 (angles in float64)."""
    n, dh = x.shape[-2:]
    theta = base ** (-2.0 * np.arange(dh // 2) / dh)
    ang = np.outer(np.arange(p0, p0 + n, dtype=np.float64), theta)  # (n, dh/2)
    cos, sin = (torch.tensor(f(ang), device=x.device).to(x.dtype) for f in (np.cos, np.sin))
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).reshape(x.shape)


def _attention(q, K, V):
    """Causal softmax attention (Eq. 63); query t sits at absolute position Tk - n + t."""
    n, dh = q.shape[-2:]
    Tk = K.shape[2]
    s = (q @ K.transpose(-1, -2)) * (1.0 / math.sqrt(dh))  # (B, H, n, Tk)
    mask = torch.arange(Tk, device=q.device)[None, :] <= torch.arange(Tk - n, Tk, device=q.device)[:, None]
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ V  # Eq. (63)


def _heads(a, H):
    B, n, D = a.shape
    return a.reshape(B, n, H, D // H).transpose(1, 2)  # (B, H, n, dh)


def _merge(a):
    B, H, n, dh = a.shape
    return a.transpose(1, 2).reshape(B, n, H * dh)  # (B, n, D)


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_detach(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------
# Memories: read M(z) and per-token inner gradients by autograd (SPEC.md#mlp-memory)
# ---------------------------------------------------------------------------------------------


def _read(W, z, per_token=False, ln=False):
    """M(z) for z (B, H, n, dh): matrix ``M z`` or residual MLP ``z + W1 gelu(W2 z)`` (Eqs. 89, 91), with
    ``ln`` ``z + LN(W1 gelu(W2 z))`` (Titans §3.3, SPEC.md#mlp-memory: no affine, eps 1e-5).
    ``per_token``: the weights carry a token axis (B, H, n, ., .)."""
    t = "n" if per_token else ""
    if "M" in W:
        return torch.einsum(f"bhnk,bh{t}vk->bhnv", z, W["M"])
    h = torch.einsum(f"bhnd,bh{t}md->bhnm", z, W["W2"])  # W2 z
    b = torch.einsum(f"bhnm,bh{t}dm->bhnd", F.gelu(h), W["W1"])
    return z + (F.layer_norm(b, (b.shape[-1],), eps=1e-5) if ln else b)


def _inner_grads(Wb, k, target, ln=False):
    """G[w] (B, H, n, ., .) = grad_w ||M(Wb; k_n) - target_n||^2 per token, at the chunk start.

    Autograd of the inner loss w.r.t. a per-token copy of ``Wb``; ``create_graph`` whenever the
    outer computation needs gradients, so G is differentiable (second order) in Wb, k and target.
    """
    n = k.shape[2]
    need = torch.is_grad_enabled() and (k.requires_grad or target.requires_grad
                                        or any(w.requires_grad for w in Wb.values()))
    with torch.enable_grad():
        rep = {}
        for name, w in Wb.items():
            r = w.unsqueeze(2).expand(-1, -1, n, -1, -1).clone()  # (B, H, n, ., .)
            if not need:
                r = r.detach()
            if not r.requires_grad:
                r.requires_grad_()
            rep[name] = r
        diff = _read(rep, k if need else k.detach(), per_token=True, ln=ln) - (target if need else target.detach())
        loss = (diff * diff).sum()  # Titans Eq. (12) / NL Eq. (86): ||M(k) - v||^2, summed over tokens
        grads = torch.autograd.grad(loss, list(rep.values()), create_graph=need)
    return dict(zip(rep, grads, strict=True))


# ---------------------------------------------------------------------------------------------
# Titans layer (SPEC.md#titans)
# ---------------------------------------------------------------------------------------------


def _titans_names(cfg):
    return ("M",) if cfg.mem_kind == "matrix" else ("W1", "W2")


def _titans_init(P, cfg, b, B):
    st = {"W": {}, "Wb": {}, "S": {}, "pos": 0}
    for n in _titans_names(cfg):
        w0 = P[b + ("mem.M0" if n == "M" else f"mem.{n}_0")]
        st["W"][n] = st["Wb"][n] = w0.expand((B,) + w0.shape)
        st["S"][n] = torch.zeros((B,) + w0.shape, dtype=w0.dtype, device=w0.device)
    z = torch.zeros((B, 3, cfg.d_model), dtype=P["embed.E"].dtype, device=P["embed.E"].device)
    st["conv"] = {c: z for c in "qkv"}
    return st


def _titans(x, P, b, cfg, st):
    """Titans memory layer over x (B, n, D) from state ``st`` (None: fresh). Returns (y, state)."""
    B, n, D = x.shape
    H, dh, eps = cfg.n_heads, cfg.d_head, cfg.norm_eps
    st = _titans_init(P, cfg, b, B) if st is None else st
    heads, conv = {}, {}
    for c in "qkv":
        z, conv[c] = _conv(x @ P[b + f"mem.W_{c}"].T, P[b + f"mem.conv_{c}"], st["conv"][c])
        s = F.silu(z).reshape(B, n, H, dh)  # Titans Eq. (11), §4.4
        heads[c] = (s if c == "v" else _l2norm(s, eps)).transpose(1, 2)  # (B, H, n, dh)

    def gate(name):
        return torch.sigmoid(torch.einsum("btd,hd->bht", x, P[b + f"mem.w_{name}"])
                             + P[b + f"mem.b_{name}"][:, None])  # (B, H, n)

    eta, alpha, beta = cfg.mem_eta_max * gate("eta"), gate("alpha"), gate("beta")
    ln = cfg.mem_layernorm and cfg.mem_kind == "mlp"  # Titans §3.3's memory (SPEC.md#titans)
    W, Wb, S, pos = dict(st["W"]), dict(st["Wb"]), dict(st["S"]), st["pos"]
    outs, t0, C = [], 0, cfg.mem_chunk
    while t0 < n:
        t1 = min(n, t0 + C - pos)
        q, k, v = (heads[c][:, :, t0:t1] for c in "qkv")
        outs.append(_read(Wb, q, ln=ln))  # o_t = M_b(q_t), read before write   # Titans Eq. (15)
        G = {name: g.unbind(2) for name, g in _inner_grads(Wb, k, v, ln).items()}  # at M_b   # Titans Eq. (12)
        for j in range(t1 - t0):
            a_t, b_t, e_t = (g[:, :, t0 + j, None, None] for g in (alpha, beta, eta))
            for name in W:
                S[name] = b_t * S[name] - e_t * G[name][j]  # Titans Eq. (14)
                W[name] = a_t * W[name] + S[name]  # Titans Eq. (13)
        pos += t1 - t0
        if pos == C:
            Wb, pos = dict(W), 0
        t0 = t1
    o = torch.cat(outs, dim=2)  # (B, H, n, dh)
    on = _rmsnorm(o.transpose(1, 2), P[b + "mem.g_o"], eps).reshape(B, n, D)
    y = (on * F.silu(x @ P[b + "mem.W_g"].T)) @ P[b + "mem.W_o"].T
    return y, {"W": W, "Wb": Wb, "S": S, "pos": pos, "conv": conv}


# ---------------------------------------------------------------------------------------------
# Self-modifying Titans layer (SPEC.md#selfmod)
# ---------------------------------------------------------------------------------------------

_MEMORIES = ("k", "v", "eta", "alpha", "memory")
_READERS = ("k", "v", "eta", "alpha")


def _sm_weights(cfg):
    return ("M",) if cfg.mem_kind == "matrix" else ("W2", "W1")  # first: the key-side weight


def _sm_init(P, cfg, b, B):
    st = {"W": {}, "B": {}, "S": {}, "pos_other": 0, "pos_memory": 0}
    for m in _MEMORIES:
        st["W"][m], st["S"][m] = {}, {}
        for w in _sm_weights(cfg):
            w0 = P[b + (f"mem.{m}.M0" if w == "M" else f"mem.{m}.{w}_0")]
            st["W"][m][w] = w0.expand((B,) + w0.shape)
            st["S"][m][w] = torch.zeros((B,) + w0.shape, dtype=w0.dtype, device=w0.device)
        st["B"][m] = dict(st["W"][m])
    z = torch.zeros((B, 3, cfg.d_model), dtype=P["embed.E"].dtype, device=P["embed.E"].device)
    st["conv"] = {c: z for c in "qkv"}
    return st


def _sm_segments(cfg, n, pos_other, pos_memory):
    """[t0, t1) ranges in which no memory starts a chunk, with the memories that start at t0."""
    def starts(t):
        return tuple(m for m in _MEMORIES if ((pos_memory if m == "memory" else pos_other) + t)
                     % (cfg.mem_chunk if m == "memory" else cfg.mem_chunk_other) == 0)

    bounds = [0] + [t for t in range(1, n) if starts(t)] + [n]
    return [(t0, t1, starts(t0)) for t0, t1 in zip(bounds[:-1], bounds[1:], strict=True)]


def _selfmod(x, P, b, cfg, st):
    """Self-modifying Titans over x (B, n, D) from ``st`` (None: fresh). Returns (y, state)."""
    B, n, D = x.shape
    H, eps = cfg.n_heads, cfg.norm_eps
    st = _sm_init(P, cfg, b, B) if st is None else st
    W = {m: dict(st["W"][m]) for m in _MEMORIES}
    Bst = {m: dict(st["B"][m]) for m in _MEMORIES}
    S = {m: dict(st["S"][m]) for m in _MEMORIES}
    conv = dict(st["conv"])
    xh = _heads(x, H)  # (B, H, n, dh)
    qlin = x @ P[b + "mem.W_q"].T  # q is the only static projection
    beta = {m: torch.sigmoid(P[b + f"mem.{m}.b_beta"])[:, None, None] for m in _MEMORIES}  # (H, 1, 1)
    outs = []
    for t0, t1, starts in _sm_segments(cfg, n, st["pos_other"], st["pos_memory"]):
        for m in starts:
            Bst[m] = dict(W[m])  # a chunk starts: reads and gradients use this state
        pre = {m: _read(Bst[m], xh[:, :, t0:t1]) for m in _READERS}  # Eq. (83) at the chunk start
        kc, conv["k"] = _conv(_merge(pre["k"]), P[b + "mem.conv_k"], conv["k"])
        vc, conv["v"] = _conv(_merge(pre["v"]), P[b + "mem.conv_v"], conv["v"])
        qc, conv["q"] = _conv(qlin[:, t0:t1], P[b + "mem.conv_q"], conv["q"])
        k, q, v = (_l2norm(_heads(c, H), eps) for c in (kc, qc, vc))  # (B, H, n, dh); v too (pinned)
        s_eta = torch.einsum("bhnd,hd->bhn", pre["eta"], P[b + "mem.w_eta"]) + P[b + "mem.b_eta"][:, None]
        s_alpha = torch.einsum("bhnd,hd->bhn", pre["alpha"], P[b + "mem.w_alpha"]) + P[b + "mem.b_alpha"][:, None]
        eta, alpha = cfg.mem_eta_max * torch.sigmoid(s_eta), torch.sigmoid(s_alpha)  # Eq. (83), pinned squashing
        ep = eta / (1 + eta * (k * k).sum(-1))  # Eq. (57): exact prox step
        outs.append(_read(Bst["memory"], q))  # Eq. (83): o = M_memory(q), read before write
        for m in _MEMORIES:
            vhat = _read(Bst[m], v)  # Eq. (84): self-generated target
            G = {w: g.unbind(2) for w, g in _inner_grads(Bst[m], k, vhat).items()}  # Eqs. (86), (93)
            for j in range(t1 - t0):
                e = ep[:, :, j, None, None]
                a = alpha[:, :, j, None, None]
                kj = k[:, :, j, :, None]  # (B, H, dh, 1)
                for w in _sm_weights(cfg):
                    S[m][w] = beta[m] * S[m][w] - e * G[w][j]  # momentum (SPEC.md#selfmod)
                    new = a * W[m][w] + S[m][w]  # Eq. (88): alpha W + S
                    if w in ("M", "W2"):  # key side: W (alpha I - eta' k k^T)
                        new = new - e * ((W[m][w] @ kj) @ kj.transpose(-1, -2))  # Eq. (88)
                    W[m][w] = new
    o = torch.cat(outs, dim=2)  # (B, H, n, dh)
    on = _merge(_rmsnorm(o, P[b + "mem.g_o"], eps))
    y = (on * F.silu(x @ P[b + "mem.W_g"].T)) @ P[b + "mem.W_o"].T
    new = {"W": W, "B": Bst, "S": S, "conv": conv, "pos_other": (st["pos_other"] + n) % cfg.mem_chunk_other,
           "pos_memory": (st["pos_memory"] + n) % cfg.mem_chunk}
    return y, new


# ---------------------------------------------------------------------------------------------
# Blocks and the stack (SPEC.md#hope)
# ---------------------------------------------------------------------------------------------


def _has_cms(cfg):
    return cfg.family in ("hope", "hope-attention")


def _has_attention(cfg):
    return cfg.family in ("transformer", "hope-attention")


def _check_computes(cfg):
    """NotImplementedError for what this oracle does not compute: a family outside its four, nested CMS, and a self-modifying
    layer switch that changes the forward away from its default (SPEC.md#hope "Ablation switches")."""
    from nlref.reference.config import SELFMOD_SWITCHES

    computed = ("transformer", "hope-attention", "titans", "hope")
    if cfg.family not in computed:  # never a block of another family (e.g. titans-mag, SPEC.md#titans-mag)
        raise NotImplementedError(f"config {cfg.name!r}: the torch oracle does not compute the {cfg.family!r} family "
                                  f"(it computes {', '.join(computed)}); the reference and the CPU port do")
    changed = [f"{k} = {getattr(cfg, k)}" for k, v in SELFMOD_SWITCHES.items()
               if k != "mem_stop_grad_writes" and cfg.family == "hope" and getattr(cfg, k) != v]
    if changed:
        raise NotImplementedError(f"config {cfg.name!r}: the torch oracle computes the self-modifying layer with its "
                                  f"default switches only, not {', '.join(changed)}; the reference and the ports "
                                  "do (SPEC.md#hope)")


def _live_levels(cfg):
    """In-context CMS levels (SPEC.md#cms); every model call goes through here, so it also refuses
    what this oracle does not compute (``_check_computes``)."""
    _check_computes(cfg)
    if cfg.cms_nested:
        raise NotImplementedError(f"config {cfg.name!r}: the torch oracle does not compute nested CMS "
                                  "(cms_nested, Eq. 72); the reference and the ports do (SPEC.md#cms)")
    if not _has_cms(cfg) or not cfg.cms_in_context:
        return []
    return [l for l, lv in enumerate(cfg.cms_levels) if lv.period is not None]


def _cms(u, P, b, cfg, weights, groups):
    """CMS chain (Eqs. 70, 73) or independent levels (Eq. 74). weights[l] = (W1, W2) of shapes
    (B, G_l, D, Hm), (B, G_l, Hm, D); groups[l] tiles the segment into level l's chunks."""
    act = _act(cfg.cms_activation)

    def level(z, W1, W2, gr):
        parts = []
        for g, (s, e) in enumerate(gr):
            pre = torch.einsum("btd,bhd->bth", z[:, s:e], W2[:, g])  # W2 z
            parts.append(z[:, s:e] + torch.einsum("bth,bdh->btd", act(pre), W1[:, g]))  # Eq. (70)
        return torch.cat(parts, dim=1)

    if cfg.cms_variant == "sequential":
        z = u
        for (W1, W2), gr in zip(weights, groups, strict=True):
            z = level(z, W1, W2, gr)  # Eq. (70)
        return z
    agg = P[b + "cms.agg"]
    return u + sum(agg[l] * (level(u, W1, W2, gr) - u)
                   for l, ((W1, W2), gr) in enumerate(zip(weights, groups, strict=True)))  # Eq. (74)


def _block(x, P, i, cfg, p0, past, mem, cms_w, groups):
    """One pre-norm residual block over tokens at positions [p0, p0 + n). -> (y, past, mem)."""
    b = f"blocks.{i}."
    B, n, D = x.shape
    a = _rmsnorm(x, P[b + "norm1.g"], cfg.norm_eps)
    new_past = new_mem = None
    if _has_attention(cfg):
        H = cfg.n_heads
        q, k, v = (_heads(a @ P[b + f"attn.W{c}"].T, H) for c in "qkv")
        q, k = _rope(q, p0, cfg.rope_base), _rope(k, p0, cfg.rope_base)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        o = _merge(_attention(q, k, v)) @ P[b + "attn.Wo"].T  # Eq. (63)
        new_past = (k, v)
    elif cfg.family == "titans":
        o, new_mem = _titans(a, P, b, cfg, mem)
    else:
        o, new_mem = _selfmod(a, P, b, cfg, mem)  # Eqs. (94)-(96)
    h = x + o
    u = _rmsnorm(h, P[b + "norm2.g"], cfg.norm_eps)
    if _has_cms(cfg):
        y = h + (_cms(u, P, b, cfg, cms_w, groups) - u)  # Eq. (97): the chain's change
    else:
        y = h + (F.silu(u @ P[b + "mlp.W_gate"].T) * (u @ P[b + "mlp.W_up"].T)) @ P[b + "mlp.W_down"].T
    return y, new_past, new_mem


def _stack(P, cfg, tokens, p0, past, mem, cms_w, groups):
    """Embedding, blocks, final norm, head over tokens (B, n). -> (logits, past, mem)."""
    x = P["embed.E"][tokens]  # (B, n, D)
    new_past, new_mem = [], []
    for i in range(cfg.n_layers):
        x, pk, mk = _block(x, P, i, cfg, p0, past[i], mem[i], cms_w[i] if cms_w else None, groups)
        new_past.append(pk)
        new_mem.append(mk)
    logits = _rmsnorm(x, P["final_norm.g"], cfg.norm_eps) @ P["head.W"].T  # (B, n, V)
    return logits, new_past, new_mem


# ---------------------------------------------------------------------------------------------
# The chunk-major pass: logits, streaming state and the in-context CMS writes (first order)
# ---------------------------------------------------------------------------------------------


def init_state(P, cfg: ModelConfig, batch: int) -> dict:
    """Fresh sequences: position 0, no caches, fresh memories, CMS levels at theta_0, no open
    level chunk recorded (``window``: their tokens; ``history``: per processing chunk, the memory
    states and CMS weights at its start)."""
    state = {"batch": batch, "pos": 0, "past": [None] * cfg.n_layers, "mem": [None] * cfg.n_layers, "cms": [],
             "window": torch.zeros((batch, 0), dtype=torch.int64, device=P["embed.E"].device), "history": []}
    for i in range(cfg.n_layers):
        fast = {}
        for l in _live_levels(cfg):
            for n in ("W1", "W2"):
                w0 = P[f"blocks.{i}.cms.{l}.{n}"].detach()
                fast[f"{l}.{n}"] = w0.expand((batch,) + w0.shape).clone()  # per sequence
        state["cms"].append(fast)
    return state


def _level_groups(period, start, n):
    """A level's chunks inside the tokens at absolute positions [start, start + n), relative."""
    if period is None:
        return [(0, n)]
    cuts = [start] + list(range((start // period + 1) * period, start + n, period)) + [start + n]
    return [(a - start, b - start) for a, b in zip(cuts, cuts[1:], strict=False)]


def _span_cms_weights(P, cfg, state, start, n, leaves=None):
    """Per block, per level, (W1, W2) as (B, G_l, ...) over the level's chunks in [start, start + n):
    the weights in force in each (from ``state["history"]``), ``leaves[i][l]`` instead where given
    (a level's weights as autograd leaves, one chunk), the outer parameter for a frozen level."""
    B = state["batch"]

    def in_force(p):  # the CMS weights of the processing chunk that holds position p
        return next(h["cms"] for h in reversed(state["history"]) if h["start"] <= p)

    groups = [_level_groups(lv.period if cfg.cms_in_context else None, start, n) for lv in cfg.cms_levels]
    out = []
    for i in range(cfg.n_layers):
        ws = []
        for l in range(len(cfg.cms_levels)):
            if leaves is not None and l in leaves[i]:
                ws.append(tuple(w[:, None] for w in leaves[i][l]))
            elif f"{l}.W1" in state["cms"][i]:
                ws.append(tuple(torch.stack([in_force(start + s)[i][f"{l}.{n}"] for s, _ in groups[l]], dim=1)
                                for n in ("W1", "W2")))
            else:  # frozen in context: the outer parameter, shared by the batch
                ws.append(tuple(P[f"blocks.{i}.cms.{l}.{n}"].expand((B, 1) + P[f"blocks.{i}.cms.{l}.{n}"].shape)
                                for n in ("W1", "W2")))
        out.append(ws)
    return out, groups


def _span_forward(P, cfg, state, X, start, past, mem, levels=(), targets=None):
    """Forward tokens X at [start, start + n) with the weights in force; with ``targets``, also the
    gradient of their summed next-token loss w.r.t. the weights of ``levels`` (each constant over
    the span), everything before ``start`` a constant: grads[i][l] = (dW1, dW2)."""
    leaves = None
    if targets is not None:
        leaves = [{l: tuple(state["cms"][i][f"{l}.{n}"].detach().clone().requires_grad_() for n in ("W1", "W2"))
                   for l in levels} for i in range(cfg.n_layers)]
    with torch.set_grad_enabled(targets is not None):  # (the weights' views are part of the graph)
        cms_w, groups = _span_cms_weights(P, cfg, state, start, X.shape[1], leaves) if _has_cms(cfg) else (None, None)
        groups = groups or [[(0, X.shape[1])] for _ in cfg.cms_levels]
        logits, new_past, new_mem = _stack(P, cfg, X, start, past, mem, cms_w, groups)
        grads = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), reduction="sum")
            flat = [w for blk in leaves for l in levels for w in blk[l]]
            grads = iter(torch.autograd.grad(loss, flat))
            grads = [{l: (next(grads), next(grads)) for l in levels} for _ in range(cfg.n_layers)]
    return logits.detach(), _detach(new_past), _detach(new_mem), grads


def _writes(P, cfg, state, next_token, record, fused):
    """The CMS writes due at ``pos`` (SPEC.md#cms): each due level's gradient of its own chunk's summed
    next-token loss, from a re-run of that chunk [pos - C^(l), pos) with everything before it
    constant (``fused``: the processing-chunk levels' gradients, taken during the chunk's forward);
    Eq. (71); then the records no open level chunk needs are dropped."""
    pos, C = state["pos"], cfg.cms_chunk
    due = [l for l in _live_levels(cfg) if pos % cfg.cms_levels[l].period == 0]
    grads = {}
    for period in sorted({cfg.cms_levels[l].period for l in due}):
        levels = [l for l in due if cfg.cms_levels[l].period == period]
        if fused is not None and period == C:
            g = fused
        else:
            start = pos - period
            X = state["window"][:, state["window"].shape[1] - period:]
            targets = torch.cat([X[:, 1:], next_token[:, None]], dim=1)
            past = [None if pk is None else (pk[0][:, :, :start], pk[1][:, :, :start]) for pk in state["past"]]
            mem = next(h["mem"] for h in state["history"] if h["start"] == start)
            *_, g = _span_forward(P, cfg, state, X, start, past, mem, levels, targets)
        grads.update({l: [g[i][l] for i in range(cfg.n_layers)] for l in levels})
    for l, per_block in grads.items():
        for i, pair in enumerate(per_block):
            fast = state["cms"][i]
            for n, grad in zip(("W1", "W2"), pair, strict=True):
                new = fast[f"{l}.{n}"] - cfg.cms_levels[l].eta * grad  # Eq. (71)
                if record is not None:
                    record.setdefault(f"blocks.{i}.cms.{l}.{n}", []).append(new - fast[f"{l}.{n}"])
                fast[f"{l}.{n}"] = new
    keep = min((pos // cfg.cms_levels[l].period) * cfg.cms_levels[l].period for l in _live_levels(cfg))
    state["history"] = [h for h in state["history"] if h["start"] >= keep]
    state["window"] = state["window"][:, state["window"].shape[1] - (pos - keep):]


def _run(P, cfg, tokens, state, record=None):
    """The chunk-major loop of SPEC.md#hope over tokens (B, T); updates ``state`` in place."""
    T, C = tokens.shape[1], cfg.cms_chunk
    out, t, fused = [], 0, None
    while t < T:
        pos = state["pos"]
        if C is not None and pos > 0 and pos % C == 0:  # the last chunk's target has arrived: the writes
            _writes(P, cfg, state, tokens[:, t], record, fused)
        n = T - t if C is None else min(T - t, C - pos % C)
        seg = tokens[:, t:t + n]
        if C is not None and pos % C == 0:
            state["history"].append({"start": pos, "mem": state["mem"], "cms": [dict(f) for f in state["cms"]]})
        # a whole processing chunk with its targets here: the processing-chunk levels' gradients now
        whole = C is not None and pos % C == 0 and n == C and t + n < T
        levels = [l for l in _live_levels(cfg) if cfg.cms_levels[l].period == C] if whole else ()
        targets = torch.cat([seg[:, 1:], tokens[:, t + n:t + n + 1]], dim=1) if whole else None
        logits, state["past"], state["mem"], fused = _span_forward(P, cfg, state, seg, pos, state["past"],
                                                                   state["mem"], levels, targets)
        state["pos"] += n
        if C is not None:
            state["window"] = torch.cat([state["window"], seg], dim=1)
        out.append(logits)
        t += n
    return torch.cat(out, dim=1)


def _copy_state(state):
    if isinstance(state, dict):
        return {k: _copy_state(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_copy_state(v) for v in state)
    return state  # tensors are never modified in place


def forward(params, tokens, cfg: ModelConfig, state=None):
    """Logits (B, T, V) as NumPy and the state that continues the sequences (SPEC.md#hope).

    ``state`` is this module's own (torch tensors), from a previous call; the input state is not
    modified. In-context CMS writes happen as in the reference (gradients by autograd)."""
    tok = _tokens(tokens, cfg)
    if state is not None and (not isinstance(state, dict) or state.get("batch") != tok.shape[0]):
        raise ValueError(f"state must be the dict returned by torch_model.forward for a batch of {tok.shape[0]}")
    logits, state = forward_tensors(init_from_params(params, cfg), tok, cfg, state)
    return logits.cpu().numpy(), state


def forward_tensors(P: dict, tokens: torch.Tensor, cfg: ModelConfig, state=None):
    """``forward`` on tensors: ``P`` from ``init_from_params`` and int64 ``tokens`` (B, T) on one
    device; logits (B, T, V) stay a tensor there. Nothing is validated or copied to the host (the
    device-resident interface); the input state is not modified."""
    state = init_state(P, cfg, tokens.shape[0]) if state is None else _copy_state(state)
    with torch.no_grad():
        logits = _run(P, cfg, tokens, state)
    return logits, state


def _increments(P, cfg, tok):
    """Cumulative in-context increments per level chunk, {key: (B, G_l, ...)} (constants)."""
    if cfg.cms_chunk is None:
        return {}
    Pd = {k: v.detach() for k, v in P.items()}
    record: dict = {}
    B, T = tok.shape
    with torch.no_grad():
        _run(Pd, cfg, tok, init_state(Pd, cfg, B), record)
    out = {}
    for i in range(cfg.n_layers):
        for l in _live_levels(cfg):
            G = -(-T // cfg.cms_levels[l].period)
            for n in ("W1", "W2"):
                key = f"blocks.{i}.cms.{l}.{n}"
                cum = [torch.zeros((B,) + P[key].shape, dtype=P[key].dtype, device=P[key].device)]
                for d in record.get(key, [])[:G - 1]:
                    cum.append(cum[-1] + d)
                out[key] = torch.stack(cum, dim=1).detach()  # (B, G, ...): constants (first order)
    return out


def cms_increments(params, tokens, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The in-context CMS increments of a fresh pass (as ``reference.model.cms_increments``)."""
    P = init_from_params(params, cfg)
    return {k: v.cpu().numpy() for k, v in _increments(P, cfg, _tokens(tokens, cfg)).items()}


def _groups(period, T):
    return [(s, min(s + period, T)) for s in range(0, T, period)] if period else [(0, T)]


def _loss(P, cfg, tok, increments):
    """Mean next-token cross-entropy of one whole-sequence pass with CMS weights theta_0 + D."""
    B, T = tok.shape
    cms_w, groups = None, [[(0, T)] for _ in cfg.cms_levels]
    if _has_cms(cfg):
        live = _live_levels(cfg)
        for l in live:
            groups[l] = _groups(cfg.cms_levels[l].period, T)
        cms_w = []
        for i in range(cfg.n_layers):
            ws = []
            for l in range(len(cfg.cms_levels)):
                pair = []
                for n in ("W1", "W2"):
                    key = f"blocks.{i}.cms.{l}.{n}"
                    w = P[key].expand((B, len(groups[l])) + P[key].shape)
                    pair.append(w + increments[key] if l in live else w)  # theta_0 + constant
                ws.append(tuple(pair))
            cms_w.append(ws)
    logits, _, _ = _stack(P, cfg, tok, 0, [None] * cfg.n_layers, [None] * cfg.n_layers, cms_w, groups)
    return F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), tok[:, 1:].reshape(-1))


def loss_and_grads(params, tokens, cfg: ModelConfig):
    """Mean next-token cross-entropy on tokens[:, 1:] and its gradient by torch autograd.

    Exact through attention and every memory write (second order through the MLP memories'
    inner gradients); first order in the in-context CMS increments (SPEC.md#cms). Returns
    (float, {key: np.ndarray in cfg.dtype}) with the keys of ``params``.
    """
    P = init_from_params(params, cfg)
    tok = _tokens(tokens, cfg, min_T=2)
    increments = _increments(P, cfg, tok)
    for v in P.values():
        v.requires_grad_()
    loss = _loss(P, cfg, tok, increments)
    keys = list(P)
    grads = torch.autograd.grad(loss, [P[k] for k in keys], allow_unused=True)
    out = {k: (np.zeros(P[k].shape, dtype=cfg.dtype) if g is None else g.cpu().numpy())
           for k, g in zip(keys, grads, strict=True)}
    return float(loss.detach()), out


class Trainer:
    """Training steps with the parameters and the optimizer state kept on one device.

    ``params`` (NumPy, as ``init_params``) are copied once to ``device`` as leaf tensors; each
    ``step(tokens)`` (int64 tensor (B, T) on that device) computes the loss of ``loss_and_grads``
    (in-context CMS increments as constants, then the whole-sequence pass), its gradients by
    autograd and one ``torch.optim.AdamW`` update, and returns the loss as a device tensor (no host
    synchronisation). ``adamw`` overrides torch's AdamW hyperparameters; the defaults are those of
    ``reference.optimizers.DEFAULTS["adamw"]`` (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight
    decay 1e-2: decoupled, on every parameter, as there).
    """

    def __init__(self, params, cfg: ModelConfig, device=None, **adamw):
        from .reference.optimizers import DEFAULTS

        self.cfg = cfg
        self.P = {k: v.requires_grad_() for k, v in init_from_params(params, cfg, device).items()}
        hp = {k: DEFAULTS["adamw"][k] for k in ("lr", "betas", "eps", "weight_decay")}
        hp.update(adamw)
        self.opt = torch.optim.AdamW(list(self.P.values()), **hp)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One AdamW step on ``tokens``; returns the loss before the update (a device tensor)."""
        increments = _increments(self.P, self.cfg, tokens)
        loss = _loss(self.P, self.cfg, tokens, increments)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        for p in self.P.values():  # a parameter the loss does not use: a zero gradient (AdamW still decays
            if p.grad is None:     # it), as loss_and_grads returns and the other backends' AdamW take
                p.grad = torch.zeros_like(p)
        self.opt.step()
        return loss.detach()

    def params(self) -> dict[str, np.ndarray]:
        """The current parameters as NumPy arrays."""
        return {k: v.detach().cpu().numpy() for k, v in self.P.items()}


__all__ = ["Trainer", "cms_increments", "forward", "forward_tensors", "get_device", "init_from_params", "init_params",
           "init_state", "loss_and_grads", "no_tf32", "param_shapes", "set_device"]
