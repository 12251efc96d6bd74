"""The language model behind one API: Hope, Hope-attention, Titans and Transformer++ blocks.

Paper: §7-§8.3, Eqs. (70)-(74), (94)-(97), arXiv 2512.24695v1 (Titans: Titans Eqs. 9-18).
SPEC: SPEC.md#hope (block families, processing order, presets), SPEC.md#cms (the first-order
in-context CMS), SPEC.md#public-api.

Symbols (paper symbol -> code name, shape; B batch, T tokens, D width, H heads, dh = D / H,
V vocabulary, C the processing chunk, L CMS levels):

    x_t (tokens)         tokens                 (B, T) ints in [0, V)
    embedding            params["embed.E"]      (V, D)
    W_q, W_k, W_v, W_o   blocks.i.attn.Wq ...   (D, D)   (linear convention W (D_out, D_in))
    RMSNorm gains        blocks.i.norm1.g ...   (D,)
    MLP^(f_l)            blocks.i.cms.l.W1/W2   (D, Hm), (Hm, D)   initial (meta-learned) state
    theta^(f_l)_t        state["cms"][i]        (B, D, Hm), (B, Hm, D) per sequence, in context
    SwiGLU MLP           blocks.i.mlp.W_gate/W_up/W_down   (F, D), (F, D), (D, F)
    Titans memory layer  blocks.i.mem.*         see reference/titans.py
    head                 params["head.W"]       (V, D)
    logits               logits                 (B, T, V)

Decisions where the paper is open (each in SPEC.md#hope unless noted):
    - every block is pre-norm residual with RMSNorm: h = x + mixer(norm1(x)); the second
      sublayer adds SwiGLU(norm2(h)) (transformer, titans) or the CMS chain's change
      CMS(u) - u with u = norm2(h) (hope, hope-attention); a final RMSNorm and an untied head;
    - chunk-major processing where CMS is in context (the processing chunk C is the shortest
      in-context period): each chunk runs all blocks with the fast states from before it;
      a level's CMS write happens when the token after its chunk arrives (it is the last
      position's target), so one call over T tokens equals any chain of streaming calls;
    - a level's write (Eq. 71) is the gradient of the summed next-token loss of its own C^(l)
      tokens, from a re-run of its own chunk with everything before that chunk held fixed
      (SPEC.md#cms, spec 0.2): no level's write depends on another level's period;
    - the outer gradient treats the in-context CMS increments as constants (first order,
      SPEC.md#cms); ``cms_increments`` / ``loss_with_increments`` are the test hook;
    - initialisation: ``np.random.SeedSequence(seed).spawn`` gives one generator per component
      (embedding, each block, head), parameters are drawn in float64 and cast to ``cfg.dtype``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from . import cms
from . import primitives as P
from .config import LINEAR_FAMILIES, SELFMOD_SWITCHES, ModelConfig

# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _has_cms(cfg: ModelConfig) -> bool:
    return cfg.family in ("hope", "hope-attention")


def _has_attention(cfg: ModelConfig) -> bool:
    return cfg.family in ("transformer", "hope-attention")


def _mem_layer(cfg: ModelConfig):
    """The sequence-memory layer of the titans / hope families: (module, layer config, forward,
    backward). Imported lazily so the attention families never need those modules."""
    if cfg.family == "titans":
        from . import titans

        tcfg = titans.TitansConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, chunk=cfg.mem_chunk,
                                   memory=cfg.mem_kind, hidden=cfg.mem_hidden, eta_max=cfg.mem_eta_max,
                                   eps=cfg.norm_eps)
        return titans, tcfg, titans.titans_forward, titans.titans_backward
    if cfg.family in LINEAR_FAMILIES:  # SPEC.md#linear-families
        from . import linear_layers as LL

        lcfg = LL.LinearLayerConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, rule=LL.FAMILY_RULES[cfg.family],
                                    chunk=cfg.mem_chunk, eps=cfg.norm_eps)
        return LL, lcfg, LL.forward, LL.backward
    if cfg.family == "hope":
        from . import selfmod

        return selfmod, *_selfmod_adapter(selfmod, cfg)
    raise ValueError(f"family {cfg.family!r} has no memory layer")


def selfmod_switches(cfg: ModelConfig) -> dict[str, bool]:
    """The ablation switches of ``cfg`` as SelfModConfig keywords (``mem_momentum`` -> ``momentum``,
    ...; SPEC.md#hope "Ablation switches"). The CPU port's adapter passes the same dict."""
    return {key.removeprefix("mem_"): getattr(cfg, key) for key in SELFMOD_SWITCHES}


def _selfmod_adapter(selfmod, cfg: ModelConfig):
    scfg = selfmod.SelfModConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, chunk_memory=cfg.mem_chunk,
                                 chunk_other=cfg.mem_chunk_other, memory=cfg.mem_kind,
                                 hidden=cfg.mem_hidden, eta_max=cfg.mem_eta_max, eps=cfg.norm_eps,
                                 **selfmod_switches(cfg))
    return scfg, selfmod.forward, selfmod.backward


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every outer parameter and its shape, in a fixed order; gradients use the same keys."""
    D, V, F = cfg.d_model, cfg.vocab_size, cfg.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {"embed.E": (V, D)}
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        shapes[b + "norm1.g"] = (D,)
        if _has_attention(cfg):
            for n in ("Wq", "Wk", "Wv", "Wo"):
                shapes[b + "attn." + n] = (D, D)
        else:
            module, lcfg, _, _ = _mem_layer(cfg)
            for n, s in module.param_shapes(lcfg).items():
                shapes[b + "mem." + n] = tuple(s)
        shapes[b + "norm2.g"] = (D,)
        if _has_cms(cfg):
            for n, s in cms.param_shapes(D, cfg.cms_levels, cfg.cms_variant).items():
                shapes[b + "cms." + n] = s
        else:
            shapes.update({b + "mlp.W_gate": (F, D), b + "mlp.W_up": (F, D), b + "mlp.W_down": (D, F)})
    shapes["final_norm.g"] = (D,)
    shapes["head.W"] = (V, D)
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random initial parameters in ``cfg.dtype``: the same seed gives the same arrays.

    One generator per component from ``SeedSequence(seed).spawn`` (embedding, each block, head),
    drawn in float64: N(0, init_std^2) for matrices, output projections (attention Wo, SwiGLU
    W_down, CMS W1) scaled by 1/sqrt(2 n_layers), norm gains 1, CMS ``agg`` 1; the memory layer
    uses its own module's initialisation (SPEC.md#hope).
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig (config.preset(name)), got {type(cfg).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    dtype = np.dtype(cfg.dtype)
    shapes = param_shapes(cfg)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(cfg.n_layers + 2)]
    std, out_std = cfg.init_std, cfg.init_std / np.sqrt(2 * cfg.n_layers)
    params: dict[str, np.ndarray] = {}
    params["embed.E"] = std * rngs[0].standard_normal(shapes["embed.E"])
    for i in range(cfg.n_layers):
        rng, b = rngs[1 + i], f"blocks.{i}."
        if not _has_attention(cfg):
            module, lcfg, _, _ = _mem_layer(cfg)
            for n, w in module.init_params(lcfg, rng, dtype=np.float64).items():
                params[b + "mem." + n] = w
        for key, shape in shapes.items():
            if not key.startswith(b) or key in params:
                continue
            name = key[len(b):]
            if name.endswith(".g") or name.endswith("agg"):
                params[key] = np.ones(shape)
            elif name in ("attn.Wo", "mlp.W_down") or name.endswith(".W1"):
                params[key] = out_std * rng.standard_normal(shape)
            else:
                params[key] = std * rng.standard_normal(shape)
    params["final_norm.g"] = np.ones(shapes["final_norm.g"])
    params["head.W"] = std * rngs[-1].standard_normal(shapes["head.W"])
    return {k: np.asarray(params[k], dtype=np.float64).astype(dtype) for k in shapes}


def _check_params(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """ValueError naming the key and the expected shape; returns the arrays cast to cfg.dtype."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig (config.preset(name)), got {type(cfg).__name__}")
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict[str, np.ndarray] from model.init_params, got {type(params).__name__}")
    dtype = np.dtype(cfg.dtype)
    out = {}
    for key, shape in param_shapes(cfg).items():
        if key not in params:
            raise ValueError(f"params[{key!r}] is missing: expected an array of shape {shape}")
        a = np.asarray(params[key])
        if a.dtype.kind not in "fc":
            raise ValueError(f"params[{key!r}] must be a float array of shape {shape}, got dtype {a.dtype}")
        if a.shape != shape:
            raise ValueError(f"params[{key!r}] must have shape {shape}, got {a.shape}")
        out[key] = a if a.dtype == dtype or a.dtype.kind == "c" else a.astype(dtype)
    extra = sorted(set(params) - set(out))
    if extra:
        raise ValueError(f"params has keys {extra} that config {cfg.name!r} does not use")
    return out


def _check_tokens(tokens, cfg: ModelConfig, min_T: int = 1) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an integer array of shape (B, T), got dtype {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < min_T:
        raise ValueError(f"tokens must have shape (B, T) with B >= 1 and T >= {min_T}, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(
            f"tokens must lie in the vocabulary [0, {cfg.vocab_size}), got values in [{tokens.min()}, {tokens.max()}]"
        )
    return tokens.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Blocks over a segment of tokens at absolute positions [p0, p0 + n)
# ---------------------------------------------------------------------------------------------


def _attn_forward(a, params, b, cfg, p0, past):
    """Causal RoPE softmax attention of tokens at positions [p0, p0 + n) over the cache ``past``
    (K, V of shape (B, H, p0, dh), constants) and themselves. Returns (y, cache, (K, V))."""
    Bn, n, D = a.shape
    H, dh = cfg.n_heads, cfg.d_head
    pos = np.arange(p0, p0 + n)
    heads, caches = {}, {}
    for name in ("q", "k", "v"):
        z, c_lin = P.linear_forward(a, params[b + "attn.W" + name])  # (B, n, D)
        z = z.reshape(Bn, n, H, dh).transpose(0, 2, 1, 3)  # (B, H, n, dh)
        c_rope = None
        if name != "v":
            z, c_rope = P.rope_forward(z, pos, cfg.rope_base)
        heads[name], caches[name] = z, (c_lin, c_rope)
    K, V = heads["k"], heads["v"]
    if past is not None:
        K = np.concatenate([past[0], K], axis=2)  # (B, H, p0 + n, dh)
        V = np.concatenate([past[1], V], axis=2)
    o, c_att = P.attention_forward(heads["q"], K, V, causal=True)  # (B, H, n, dh)  # Eq. (63)
    y, c_o = P.linear_forward(o.transpose(0, 2, 1, 3).reshape(Bn, n, D), params[b + "attn.Wo"])
    return y, (caches, c_att, c_o, n), (K, V)


def _attn_backward(dy, cache, b):
    caches, c_att, c_o, n = cache
    grads = {}
    do, grads[b + "attn.Wo"], _ = P.linear_backward(dy, c_o)
    Bn, _, D = dy.shape
    H = c_att[0].shape[1]
    do = do.reshape(Bn, n, H, D // H).transpose(0, 2, 1, 3)  # (B, H, n, dh)
    dq, dK, dV = P.attention_backward(do, c_att)
    dheads = {"q": dq, "k": dK[:, :, -n:], "v": dV[:, :, -n:]}  # the cache is a constant
    da = 0
    for name in ("q", "k", "v"):
        c_lin, c_rope = caches[name]
        dz = dheads[name] if c_rope is None else P.rope_backward(dheads[name], c_rope)
        dz = dz.transpose(0, 2, 1, 3).reshape(Bn, n, D)
        dx, grads[b + "attn.W" + name], _ = P.linear_backward(dz, c_lin)
        da = da + dx
    return da, grads


def _block_forward(x, params, i, cfg, p0, past, mem_state, cms_w, cms_groups):
    """One block over a segment. Returns (y, cache, new_past, new_mem_state)."""
    b = f"blocks.{i}."
    a, c_n1 = P.rmsnorm_forward(x, params[b + "norm1.g"], cfg.norm_eps)  # (B, n, D)
    new_past = new_mem = None
    if _has_attention(cfg):
        o, c_mix, new_past = _attn_forward(a, params, b, cfg, p0, past)
    else:
        _, lcfg, fwd, _ = _mem_layer(cfg)
        lp = {k[len(b) + 4:]: v for k, v in params.items() if k.startswith(b + "mem.")}
        o, c_mix, new_mem = fwd(a, lp, lcfg, mem_state)
    h = x + o  # (B, n, D)
    u, c_n2 = P.rmsnorm_forward(h, params[b + "norm2.g"], cfg.norm_eps)
    if _has_cms(cfg):
        c, c_sec = cms.forward(u, cms_w, cms_groups, cfg.cms_variant, cfg.cms_activation,
                               params.get(b + "cms.agg"))  # Eqs. (70)/(74), (97)
        y = h + (c - u)
    else:
        m, c_sec = P.swiglu_forward(u, params[b + "mlp.W_gate"], params[b + "mlp.W_up"], params[b + "mlp.W_down"])
        y = h + m
    return y, (c_n1, c_mix, c_n2, c_sec), new_past, new_mem


def _block_backward(dy, cache, i, cfg):
    """Returns (dx, grads, dcms): dcms[l] = (dW1, dW2) per group and sequence (hope families)."""
    b = f"blocks.{i}."
    c_n1, c_mix, c_n2, c_sec = cache
    grads, dcms = {}, None
    if _has_cms(cfg):
        du, dcms, dagg = cms.backward(dy, c_sec)
        du = du - dy
        if dagg is not None:
            grads[b + "cms.agg"] = dagg
    else:
        du, grads[b + "mlp.W_gate"], grads[b + "mlp.W_up"], grads[b + "mlp.W_down"] = P.swiglu_backward(dy, c_sec)
    dh, grads[b + "norm2.g"] = P.rmsnorm_backward(du, c_n2)
    dh = dh + dy
    if _has_attention(cfg):
        da, g = _attn_backward(dh, c_mix, b)
    else:
        _, _, _, bwd = _mem_layer(cfg)
        da, g, _ = bwd(dh, c_mix)
        g = {b + "mem." + k: v for k, v in g.items()}
    grads.update(g)
    dx, grads[b + "norm1.g"] = P.rmsnorm_backward(da, c_n1)
    return dx + dh, grads, dcms


def _stack_forward(params, cfg, tokens, p0, past, mem, cms_w, cms_groups):
    """Embedding, blocks, final norm and head over tokens (B, n) at positions [p0, p0 + n).

    past[i]: block i's attention cache (or None); mem[i]: its memory-layer state (None: fresh);
    cms_w[i][l] = (W1, W2) of shapes (B, G_l, D, Hm), (B, G_l, Hm, D); cms_groups[l] tiles the
    segment into level l's chunks. Returns (logits (B, n, V), cache, new_past, new_mem).
    """
    x, c_emb = P.embedding_forward(tokens, params["embed.E"])  # (B, n, D)
    caches, new_past, new_mem = [], [], []
    for i in range(cfg.n_layers):
        x, c, np_i, nm_i = _block_forward(x, params, i, cfg, p0, past[i], mem[i],
                                          cms_w[i] if cms_w else None, cms_groups)
        caches.append(c)
        new_past.append(np_i)
        new_mem.append(nm_i)
    xf, c_fn = P.rmsnorm_forward(x, params["final_norm.g"], cfg.norm_eps)
    logits, c_head = P.linear_forward(xf, params["head.W"])  # (B, n, V)
    return logits, (c_emb, caches, c_fn, c_head), new_past, new_mem


def _stack_backward(dlogits, cache, cfg):
    """Returns (grads without the CMS weights, dcms[i][l] = (dW1, dW2) per group and sequence)."""
    c_emb, caches, c_fn, c_head = cache
    grads = {}
    dxf, grads["head.W"], _ = P.linear_backward(dlogits, c_head)
    dx, grads["final_norm.g"] = P.rmsnorm_backward(dxf, c_fn)
    dcms = [None] * cfg.n_layers
    for i in reversed(range(cfg.n_layers)):
        dx, g, dcms[i] = _block_backward(dx, caches[i], i, cfg)
        grads.update(g)
    grads["embed.E"] = P.embedding_backward(dx, c_emb)
    return grads, dcms


# ---------------------------------------------------------------------------------------------
# State and the chunk-major forward (SPEC.md#hope: the processing order)
# ---------------------------------------------------------------------------------------------


def _in_context_levels(cfg: ModelConfig) -> list[int]:
    if not _has_cms(cfg) or not cfg.cms_in_context:
        return []
    return [l for l, lv in enumerate(cfg.cms_levels) if lv.period is not None]


def init_state(params, cfg: ModelConfig, batch: int) -> dict:
    """The state at the start of B sequences: position 0, empty attention caches, fresh memory
    layers, every in-context CMS level at its meta-learned initial weights (one copy per
    sequence), and an empty record of the open level chunks (``window``, ``history``)."""
    params = _check_params(params, cfg)
    state: dict = {"batch": int(batch), "pos": 0, "past": [None] * cfg.n_layers, "mem": [None] * cfg.n_layers,
                   "cms": [], "window": np.zeros((batch, 0), dtype=np.int64), "history": []}
    for i in range(cfg.n_layers):
        fast = {}
        for l in _in_context_levels(cfg):
            for n in ("W1", "W2"):
                w0 = params[f"blocks.{i}.cms.{l}.{n}"]
                fast[f"{l}.{n}"] = np.broadcast_to(w0, (batch,) + w0.shape).copy()  # theta^(f_l)_0
        state["cms"].append(fast)
    return state


STATE_KEYS = ("batch", "pos", "past", "mem", "cms", "window", "history")
"""The keys of a streaming state (SPEC.md#hope: what the state carries)."""


def _copy(obj):
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_copy(v) for v in obj)
    return obj


def _check_state(state, cfg: ModelConfig, batch: int) -> dict:
    """A copy of ``state`` after checking its structure: TypeError for a value of the wrong kind,
    ValueError for a wrong batch, position or length, each naming the entry (SPEC.md#hope)."""
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise TypeError(f"state must be the dict returned by model.forward (keys {STATE_KEYS}), "
                        f"got {type(state).__name__}" + (f" with keys {sorted(map(str, state))}" if isinstance(state, dict) else ""))
    for key in ("batch", "pos"):
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise TypeError(f"state[{key!r}] must be a non-negative int, got {v!r}")
    if state["batch"] != batch:
        raise ValueError(f"state is for a batch of {state['batch']} sequences; tokens must have shape "
                         f"({state['batch']}, T), got batch {batch}")
    for key in ("past", "mem", "cms"):
        if not isinstance(state[key], list) or len(state[key]) != cfg.n_layers:
            raise TypeError(f"state[{key!r}] must be a list of {cfg.n_layers} entries (one per block), "
                            f"got {type(state[key]).__name__}")
    if any(not isinstance(f, dict) for f in state["cms"]):
        raise TypeError("state['cms'] must hold one dict of in-context CMS weights per block")
    w = state["window"]
    if not hasattr(w, "shape") or len(w.shape) != 2 or w.shape[0] != batch or w.shape[1] > state["pos"]:
        raise ValueError(f"state['window'] must be an int array of shape ({batch}, n) with n <= state['pos'] "
                         f"= {state['pos']}, got {getattr(w, 'shape', type(w).__name__)}")
    h = state["history"]
    if not isinstance(h, list) or any(not isinstance(r, dict) or not {"start", "mem", "cms"} <= set(r) for r in h):
        raise TypeError("state['history'] must be a list of records {'start', 'mem', 'cms'} from model.forward")
    return _copy(state)


def _level_weights(params, i, l, fasts, batch):
    """(W1, W2) of block i's CMS level l as (B, G, ...), one group per entry of ``fasts`` (each a
    ``state["cms"]``-like list: the in-context weights in force during that group), or the outer
    parameter shared by the batch (one group) for a level frozen in context."""
    if f"{l}.W1" not in fasts[0][i]:
        return tuple(np.broadcast_to(params[f"blocks.{i}.cms.{l}.{n}"],
                                     (batch, 1) + params[f"blocks.{i}.cms.{l}.{n}"].shape) for n in ("W1", "W2"))
    if len(fasts) == 1:
        return tuple(fasts[0][i][f"{l}.{n}"][:, None] for n in ("W1", "W2"))
    return tuple(np.stack([f[i][f"{l}.{n}"] for f in fasts], axis=1) for n in ("W1", "W2"))


def _cms_weights(params, cfg, state):
    """Per block, per level: the weights in force now as (B, 1, ...), for a segment inside one
    processing chunk (every level's weights are constant there)."""
    if not _has_cms(cfg):
        return None
    return [[_level_weights(params, i, l, [state["cms"]], state["batch"]) for l in range(len(cfg.cms_levels))]
            for i in range(cfg.n_layers)]


def open_chunk_start(cfg: ModelConfig, pos: int) -> int:
    """The earliest position whose tokens, memory-layer states and CMS weights the state must keep
    at position ``pos`` (after the writes due there): the start of the oldest open chunk of an
    in-context level, min_l floor(pos / C^(l)) C^(l)."""
    return min((pos // cfg.cms_levels[l].period) * cfg.cms_levels[l].period for l in _in_context_levels(cfg))


def _advance(params, cfg, state, seg):
    """Forward a segment that lies inside one processing chunk; update the state in place.

    At a processing chunk's start, the memory layers' states and the CMS weights in force are
    appended to ``state["history"]``: a level's write re-runs its chunk from them."""
    n = seg.shape[1]
    if cfg.cms_chunk is not None and state["pos"] % cfg.cms_chunk == 0:
        state["history"].append({"start": state["pos"], "mem": _copy(state["mem"]),
                                 "cms": [dict(fast) for fast in state["cms"]]})  # writes make new arrays
    groups = [[(0, n)] for _ in cfg.cms_levels]
    logits, _, new_past, new_mem = _stack_forward(params, cfg, seg, state["pos"], state["past"], state["mem"],
                                                  _cms_weights(params, cfg, state), groups)
    state["past"], state["mem"] = new_past, new_mem
    state["pos"] += n
    if cfg.cms_chunk is not None:
        state["window"] = np.concatenate([state["window"], seg], axis=1)
    return logits


def level_chunk_inputs(params, cfg: ModelConfig, state, start: int, next_token):
    """What re-running the level chunk [start, pos) needs, from the state at ``pos``: its tokens
    X (B, n) and targets (B, n) (the next tokens, ``next_token`` last), the attention cache prefix
    [0, start), the memory layers' states at ``start``, and per block and level the CMS weights
    in force in each of that level's chunks inside [start, pos) with those groups."""
    pos, window = state["pos"], state["window"]
    X = window[:, start - (pos - window.shape[1]):]
    n = X.shape[1]
    targets = np.concatenate([X[:, 1:], next_token[:, None]], axis=1)
    past = [None if pk is None else (pk[0][:, :, :start], pk[1][:, :, :start]) for pk in state["past"]]
    by_start = {h["start"]: h for h in state["history"]}
    groups, cms_w = [], []
    for lv in cfg.cms_levels:  # (only called with levels in context: cms_chunk is not None)
        groups.append(cms.groups_for(lv.period, start, n))
    for i in range(cfg.n_layers):
        cms_w.append([_level_weights(params, i, l, [by_start[start + s]["cms"] for s, _ in groups[l]],
                                     state["batch"]) for l in range(len(cfg.cms_levels))])
    return X, targets, past, by_start[start]["mem"], cms_w, groups


def _level_chunk_gradient(params, cfg, state, start, next_token):
    """Per block, per level: the gradient of the summed next-token loss of the tokens
    [start, pos) with respect to the CMS weights in force there, everything before ``start``
    held fixed (Eq. 71, SPEC.md#cms). Returns dcms[i][l] = (dW1, dW2) of shape (B, G_l, ...)."""
    X, targets, past, mem, cms_w, groups = level_chunk_inputs(params, cfg, state, start, next_token)
    logits, cache, _, _ = _stack_forward(params, cfg, X, start, past, mem, cms_w, groups)
    _, c_ce = P.cross_entropy_forward(logits, targets)
    dlogits = P.cross_entropy_backward(np.asarray(float(X.size), dtype=logits.dtype), c_ce)  # sum, not mean
    return _stack_backward(dlogits, cache, cfg)[1]


def apply_writes(cfg: ModelConfig, state, due_grads, record):
    """Eq. (71) for every level in ``due_grads`` ({l: dcms from its own chunk's re-run}), then
    forget the tokens, memory-layer states and CMS weights no open level chunk needs."""
    for l, dcms in due_grads.items():
        for i in range(cfg.n_layers):
            fast = state["cms"][i]
            for j, n in enumerate(("W1", "W2")):
                new = cms.write(fast[f"{l}.{n}"], dcms[i][l][j][:, 0], cfg.cms_levels[l].eta)  # Eq. (71)
                if record is not None:
                    record.setdefault(f"blocks.{i}.cms.{l}.{n}", []).append(new - fast[f"{l}.{n}"])
                fast[f"{l}.{n}"] = new
    pos, start = state["pos"], open_chunk_start(cfg, state["pos"])
    state["history"] = [h for h in state["history"] if h["start"] >= start]
    state["window"] = state["window"][:, start - (pos - state["window"].shape[1]):]


def complete_chunks(params, cfg: ModelConfig, state, next_token, record, chunk_gradient=None):
    """The CMS writes due at position pos (a multiple of the processing chunk), now that the target
    of position pos - 1 has arrived: each level whose period ends here re-runs its own chunk
    [pos - C^(l), pos) from the states before it and applies Eq. (71) with that chunk's summed
    next-token-loss gradient (levels with the same period share one re-run).

    ``chunk_gradient(params, cfg, state, start, next_token) -> dcms`` computes a chunk's gradient
    (default ``_level_chunk_gradient``; a port passes its own)."""
    chunk_gradient = chunk_gradient or _level_chunk_gradient
    pos = state["pos"]
    due = cms.updates_at(cfg.cms_levels, pos, cfg.cms_in_context)
    due_grads, by_period = {}, {}
    for l in due:
        period = cfg.cms_levels[l].period
        if period not in by_period:
            by_period[period] = chunk_gradient(params, cfg, state, pos - period, next_token)
        due_grads[l] = by_period[period]
    apply_writes(cfg, state, due_grads, record)


def writes_due(cfg: ModelConfig, state) -> bool:
    """Whether CMS writes are due before the next token: the position is a processing chunk's end
    (a multiple of ``cfg.cms_chunk``, > 0) and the last processed token's target is missing. A call
    never processes the token at such a position before its writes, so this is the position alone."""
    C = cfg.cms_chunk
    return C is not None and state["pos"] > 0 and state["pos"] % C == 0


def _run(params, tokens, cfg, state, record=None):
    T = tokens.shape[1]
    C = cfg.cms_chunk
    out, t = [], 0
    while t < T:
        if writes_due(cfg, state):
            complete_chunks(params, cfg, state, tokens[:, t], record)
        n = T - t if C is None else min(T - t, C - state["pos"] % C)
        out.append(_advance(params, cfg, state, tokens[:, t:t + n]))
        t += n
    return np.concatenate(out, axis=1)


def forward(params, tokens, cfg: ModelConfig, state=None):
    """Logits (B, T, V) of tokens (B, T) and the state that continues the sequences.

    ``state=None`` starts fresh sequences; passing the returned state back continues them (the
    attention cache, the memory layers' states, the in-context CMS weights, and what the open
    level chunks' writes will re-run: their tokens, and per processing chunk the memory layers'
    states and CMS weights at its start), so one call equals any chain of calls. The input state
    is not modified.
    """
    params = _check_params(params, cfg)
    tokens = _check_tokens(tokens, cfg)
    state = init_state(params, cfg, tokens.shape[0]) if state is None else _check_state(state, cfg, tokens.shape[0])
    logits = _run(params, tokens, cfg, state)
    return logits, state


# ---------------------------------------------------------------------------------------------
# The outer loss and its gradient (first order in the in-context CMS increments)
# ---------------------------------------------------------------------------------------------


def cms_increments(params, tokens, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The in-context CMS increments of a fresh pass over tokens: the test hook that freezes them.

    Returns {"blocks.i.cms.l.W1": (B, G_l, D, Hm), ...}: for each in-context level, the
    cumulative increment in force during each of its chunks g over [0, T) (zero for g = 0), so
    the weights used there are theta_0 + increments[:, g]. Empty without in-context levels.
    """
    params = _check_params(params, cfg)
    tokens = _check_tokens(tokens, cfg)
    if cfg.cms_chunk is None:
        return {}
    record: dict[str, list] = {}
    _run(params, tokens, cfg, init_state(params, cfg, tokens.shape[0]), record)
    B, T = tokens.shape
    out = {}
    for i in range(cfg.n_layers):
        for l in _in_context_levels(cfg):
            G = len(cms.groups_for(cfg.cms_levels[l].period, 0, T))
            for n in ("W1", "W2"):
                key = f"blocks.{i}.cms.{l}.{n}"
                deltas = record.get(key, [])
                cum = np.zeros((B, G) + params[key].shape, dtype=params[key].dtype)
                for g in range(1, G):
                    cum[:, g] = cum[:, g - 1] + deltas[g - 1]
                out[key] = cum
    return out


def _first_order_forward(params, tokens, cfg, increments):
    """The whole sequence in one pass with the CMS weights theta_0 + increments (constants)."""
    B, T = tokens.shape
    cms_w, groups = None, [[(0, T)] for _ in cfg.cms_levels]
    if _has_cms(cfg):
        live = _in_context_levels(cfg)
        for l in live:
            groups[l] = cms.groups_for(cfg.cms_levels[l].period, 0, T)
        cms_w = []
        for i in range(cfg.n_layers):
            ws = []
            for l in range(len(cfg.cms_levels)):
                pair = []
                for n in ("W1", "W2"):
                    key = f"blocks.{i}.cms.{l}.{n}"
                    w = np.broadcast_to(params[key], (B, len(groups[l])) + params[key].shape)
                    if l in live:
                        inc = increments.get(key)
                        if inc is None or inc.shape != w.shape:
                            raise ValueError(f"increments[{key!r}] must have shape {w.shape}, got "
                                             f"{None if inc is None else inc.shape}")
                        w = w + inc
                    pair.append(w)
                ws.append(tuple(pair))
            cms_w.append(ws)
    return _stack_forward(params, cfg, tokens, 0, [None] * cfg.n_layers, [None] * cfg.n_layers, cms_w, groups)


def loss_with_increments(params, tokens, cfg: ModelConfig, increments) -> float:
    """The mean next-token loss with the in-context CMS increments frozen at ``increments``
    (from ``cms_increments``): the function whose exact gradient ``loss_and_grads`` returns."""
    params = _check_params(params, cfg)
    tokens = _check_tokens(tokens, cfg, min_T=2)
    logits = _first_order_forward(params, tokens, cfg, increments)[0]
    return P.cross_entropy_forward(logits[:, :-1], tokens[:, 1:])[0]


def loss_and_grads(params, tokens, cfg: ModelConfig):
    """Mean next-token cross-entropy on tokens[:, 1:] and its gradient (keys of ``params``).

    Exact for every family with ``cms_in_context=False``; with in-context CMS the increments are
    constants (first order, SPEC.md#cms), i.e. the exact gradient of ``loss_with_increments`` at
    ``cms_increments(params, tokens, cfg)``.
    """
    params = _check_params(params, cfg)
    tokens = _check_tokens(tokens, cfg, min_T=2)
    increments = cms_increments(params, tokens, cfg)
    logits, cache, _, _ = _first_order_forward(params, tokens, cfg, increments)
    loss, c_ce = P.cross_entropy_forward(logits[:, :-1], tokens[:, 1:])
    dlogits = np.zeros_like(logits)
    dlogits[:, :-1] = P.cross_entropy_backward(np.asarray(1.0, dtype=logits.dtype), c_ce)
    grads, dcms = _stack_backward(dlogits, cache, cfg)
    if _has_cms(cfg):
        for i in range(cfg.n_layers):
            for l in range(len(cfg.cms_levels)):
                for j, n in enumerate(("W1", "W2")):
                    grads[f"blocks.{i}.cms.{l}.{n}"] = dcms[i][l][j].sum(axis=(0, 1))  # theta_0 + const
    return float(loss), {k: np.asarray(grads[k], dtype=params[k].dtype) for k in params}


# ---------------------------------------------------------------------------------------------
# Sizes (``nested-learning info --model``)
# ---------------------------------------------------------------------------------------------


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter count per component, summed over blocks (keys without the block index)."""
    counts: dict[str, int] = {}
    for key, shape in param_shapes(cfg).items():
        parts = key.split(".")
        comp = ".".join(["blocks.*"] + parts[2:-1]) if parts[0] == "blocks" else ".".join(parts[:-1])
        counts[comp] = counts.get(comp, 0) + int(np.prod(shape))
    return counts


def state_size(cfg: ModelConfig) -> dict[str, int]:
    """Floats of state per sequence, at their largest (when writes are due at the longest in-context
    period's end): ``fixed`` (the in-context CMS weights, with the versions the open level chunks'
    re-runs need, ceil(C_max / C^(l)) per level; the memory layers' states, with one copy per
    processing chunk of the open chunks, C_max / C), ``per_token`` (the attention cache grows by this
    much per token) and ``chunk_tokens`` (the tokens of the open level chunks kept, at most C_max)."""
    live = _in_context_levels(cfg)
    longest = max((cfg.cms_levels[l].period for l in live), default=0)
    fixed = 0
    for l in live:
        versions = -(-longest // cfg.cms_levels[l].period)
        fixed += 2 * cfg.d_model * cfg.cms_levels[l].hidden * cfg.n_layers * versions  # W1, W2
    if not _has_attention(cfg):
        module, lcfg, _, _ = _mem_layer(cfg)
        p = module.init_params(lcfg, np.random.default_rng(0))
        st = module.init_state(p, lcfg, 1)
        mem = cfg.n_layers * sum(int(np.size(v)) for v in st.values() if isinstance(v, np.ndarray))
        fixed += mem * (1 + (longest // cfg.cms_chunk if live else 0))  # + the chunk-start copies
    per_token = 2 * cfg.d_model * cfg.n_layers if _has_attention(cfg) else 0
    return {"fixed": fixed, "per_token": per_token, "chunk_tokens": longest}


# ---------------------------------------------------------------------------------------------
# Gradient-check cases (float64, tiny presets, a few parameter keys each)
# ---------------------------------------------------------------------------------------------


def _case(preset_name: str, in_context: bool, keys_like: tuple[str, ...], B0: int = 2, T0: int = 6):
    def make(rng, B=B0, T=T0):
        from .config import preset

        cfg = dataclasses.replace(preset(preset_name), dtype="float64", cms_in_context=in_context)
        params = init_params(cfg, seed=int(rng.integers(1 << 30)))
        tokens = rng.integers(0, cfg.vocab_size, size=(B, T))
        incs = cms_increments(params, tokens, cfg)
        _, grads = loss_and_grads(params, tokens, cfg)
        keys = [k for k in params if any(s in k for s in keys_like)]
        inputs = {k: params[k] for k in keys}
        return (lambda a: loss_with_increments(params | a, tokens, cfg, incs)), inputs, {k: grads[k] for k in keys}

    return make


GRADCHECKS: dict[str, Callable] = {
    "model.transformer_tiny": _case("transformer-tiny", False, ("blocks.1.attn.Wq", "blocks.0.norm2", "final_norm")),
    "model.hope_attention_tiny_static": _case("hope-attention-tiny", False,
                                              ("blocks.0.cms.0.W1", "blocks.1.norm1", "final_norm")),
    "model.hope_attention_tiny_in_context": _case("hope-attention-tiny", True,
                                                  ("blocks.0.cms.1.W2", "blocks.1.cms.0.W1", "final_norm")),
    "model.titans_tiny": _case("titans-tiny", False, ("blocks.1.mem.W1_0", "blocks.0.norm2.g",
                                                      "blocks.0.mem.g_o"), B0=1, T0=5),
    "model.hope_tiny_in_context": _case("hope-tiny", True, ("blocks.0.mem.memory.W1_0", "blocks.1.mem.g_o",
                                                            "blocks.0.norm1.g", "blocks.1.norm2.g"), B0=1, T0=5),
}
