"""The model's blocks over a segment of tokens: attention, the sequence-memory layers, CMS, the stack.

Paper: §7-§8.3, Eqs. (63), (70)/(74), (94)-(97), arXiv 2512.24695v1 (Titans: Titans Eqs. 9-18).
SPEC: SPEC.md#hope (block families), SPEC.md#backends (the ops every function takes).

Part of the one model driver (with reference/model.py): every function takes the backend's
``ops`` (reference/contract.py ``Ops``) and computes with ``ops.primitives``, ``ops.cms`` and the
family's layer module, so the reference, the CPU port and the GPU port run this same code.

Symbols (B batch, n tokens of the segment at absolute positions [p0, p0 + n), D width, H heads,
dh = D / H, V vocabulary, G_l level l's weight groups in the segment):

    embedding            params["embed.E"]      (V, D)
    W_q, W_k, W_v, W_o   blocks.i.attn.Wq ...   (D, D)   (linear convention W (D_out, D_in))
    RMSNorm gains        blocks.i.norm1.g ...   (D,)
    theta^(f_l)          cms_w[i][l]            (B, G_l, D, Hm), (B, G_l, Hm, D)  weights in force
    SwiGLU MLP           blocks.i.mlp.W_gate/W_up/W_down   (F, D), (F, D), (D, F)
    memory layer         blocks.i.mem.*         its module's parameters (reference/titans.py, selfmod.py)
    attention cache      past[i]                (K, V) of shape (B, H, p0, dh), constants
    logits               logits                 (B, n, V)

Decisions (SPEC.md#hope): every block is pre-norm residual with RMSNorm, h = x + mixer(norm1(x)),
then y = h + SwiGLU(norm2(h)) (transformer, titans, linear families, titans-mag, titans-mal and
titans-mac: their mixers are ``mag_forward``, SPEC.md#titans-mag, ``mal_forward``,
SPEC.md#titans-mal, and ``mac_forward``, SPEC.md#titans-mac) or y = h + (CMS(u) - u) with
u = norm2(h) (hope, hope-attention); a final RMSNorm and an untied head.
"""

from __future__ import annotations

from .contract import has_attention, has_cms, is_hybrid, memory_layer


def layer_of(ops, cfg):
    """The block's sequence-memory layer (contract.MemoryLayer) on this backend."""
    return memory_layer(ops.layer(cfg.family), cfg)


def layer_params(params, b):
    """The sequence-memory layer's parameters of the block with key prefix ``b`` ("blocks.i."), without the prefix."""
    return {k[len(b) + 4:]: v for k, v in params.items() if k.startswith(b + "mem.")}


def attn_forward(ops, a, params, b, cfg, p0, past, window=None, persistent=0):
    """Causal RoPE softmax attention (Eq. 63) of tokens at positions [p0, p0 + n) over the cache
    ``past`` (constants) and themselves. Returns (y, cache, (K, V)).

    ``window`` (SW-Attn*, SPEC.md#titans-mag): each query sees the ``window`` keys up to itself and
    the first ``persistent`` keys of the cache; the returned cache keeps only those (the persistent
    keys and the last window - 1 keys), all a later query can see."""
    P, np = ops.primitives, ops.np
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
    if window is None:
        o, c_att = P.attention_forward(heads["q"], K, V, causal=True)  # (B, H, n, dh)
        new_past = (K, V)
    else:
        o, c_att = P.attention_forward(heads["q"], K, V, causal=True, window=window, persistent=persistent)
        recent = min(window - 1, K.shape[2] - persistent)  # the window's keys a later query sees
        new_past = tuple(np.concatenate([Z[:, :, :persistent], Z[:, :, Z.shape[2] - recent:]], axis=2)
                         for Z in (K, V))
    y, c_o = P.linear_forward(o.transpose(0, 2, 1, 3).reshape(Bn, n, D), params[b + "attn.Wo"])
    return y, (caches, c_att, c_o, n), new_past


def attn_backward(ops, dy, cache, b):
    """(da, grads) of ``attn_forward``; the cache ``past`` is a constant."""
    P = ops.primitives
    caches, c_att, c_o, n = cache
    grads = {}
    do, grads[b + "attn.Wo"], _ = P.linear_backward(dy, c_o)
    Bn, _, D = dy.shape
    H = c_att[0].shape[1]
    do = do.reshape(Bn, n, H, D // H).transpose(0, 2, 1, 3)  # (B, H, n, dh)
    dq, dK, dV = P.attention_backward(do, c_att)
    dheads = {"q": dq, "k": dK[:, :, -n:], "v": dV[:, :, -n:]}
    da = 0
    for name in ("q", "k", "v"):
        c_lin, c_rope = caches[name]
        dz = dheads[name] if c_rope is None else P.rope_backward(dheads[name], c_rope)
        dz = dz.transpose(0, 2, 1, 3).reshape(Bn, n, D)
        dx, grads[b + "attn.W" + name], _ = P.linear_backward(dz, c_lin)
        da = da + dx
    return da, grads


def mag_forward(ops, a, params, b, cfg, p0, past, mem_state):
    """Titans' memory as a gate (MAG, Titans §4.2; SPEC.md#titans-mag) over tokens at positions
    [p0, p0 + n) of the sequence. Returns (o, cache, new_past, new_mem).

    At the sequence start (p0 = 0) the N_p persistent tokens are prepended, x~ = [p] || a; both
    branches read x~: y = SW-Attn*(x~) (window ``attn_window``, the persistent keys always
    visible; RoPE at the positions of x~) and m = M(x~) (the Titans layer). The outputs at the
    persistent positions are dropped, then o = W_out (RMSNorm_a(y) * sigmoid(RMSNorm_m(m))).
    Later calls continue both states: the KV cache (persistent keys + the window) and the
    memory layer's state, which has read the persistent tokens."""
    P, np = ops.primitives, ops.np
    Bn, n, D = a.shape
    Np = cfg.mem_persistent if p0 == 0 else 0  # prepended once, at the sequence start
    xt = a
    if Np:
        xt = np.concatenate([np.broadcast_to(params[b + "mag.persist"], (Bn, Np, D)), a], axis=1)  # x~
    start = 0 if p0 == 0 else p0 + cfg.mem_persistent  # x~'s position of xt's first token
    y, c_att, new_past = attn_forward(ops, xt, params, b, cfg, start, past, cfg.attn_window, cfg.mem_persistent)
    layer = layer_of(ops, cfg)
    lp = layer_params(params, b)
    m, c_mem, new_mem = layer.forward(xt, lp, layer.cfg, mem_state)  # the memory reads x~ too
    ya, c_na = P.rmsnorm_forward(y[:, Np:], params[b + "mag.norm_a.g"], cfg.norm_eps)  # (B, n, D)
    ym, c_nm = P.rmsnorm_forward(m[:, Np:], params[b + "mag.norm_m.g"], cfg.norm_eps)
    gate, c_s = P.sigmoid_forward(ym)  # sigma
    o, c_o = P.linear_forward(ya * gate, params[b + "mag.W_out"])  # y (x) M(x~)
    return o, (Np, c_att, c_mem, ya, c_na, c_nm, gate, c_s, c_o), new_past, new_mem


def mag_backward(ops, do, cache, b, cfg):
    """(da, grads) of ``mag_forward``; the incoming caches are constants."""
    P, np = ops.primitives, ops.np
    Np, c_att, c_mem, ya, c_na, c_nm, gate, c_s, c_o = cache
    grads = {}
    dg, grads[b + "mag.W_out"], _ = P.linear_backward(do, c_o)
    dya, grads[b + "mag.norm_a.g"] = P.rmsnorm_backward(dg * gate, c_na)
    dym, grads[b + "mag.norm_m.g"] = P.rmsnorm_backward(P.sigmoid_backward(dg * ya, c_s), c_nm)
    Bn, n, D = do.shape
    dy = np.zeros((Bn, Np + n, D), dtype=dya.dtype)  # the dropped persistent outputs: no gradient
    dm = np.zeros((Bn, Np + n, D), dtype=dym.dtype)
    dy[:, Np:], dm[:, Np:] = dya, dym
    dxt, g = attn_backward(ops, dy, c_att, b)
    grads.update(g)
    dxt_m, g, _ = layer_of(ops, cfg).backward(dm, c_mem)
    grads.update({b + "mem." + k: v for k, v in g.items()})
    dxt = dxt + dxt_m
    if cfg.mem_persistent:
        grads[b + "mag.persist"] = (dxt[:, :Np].sum(axis=0) if Np else
                                    np.zeros((cfg.mem_persistent, D), dtype=dxt.dtype))  # a later call: constant
    return dxt[:, Np:], grads


def mal_forward(ops, a, params, b, cfg, p0, past, mem_state):
    """Titans' memory as a layer (MAL, Titans §4.3; SPEC.md#titans-mal) over tokens at positions
    [p0, p0 + n) of the sequence. Returns (o, cache, new_past, new_mem).

    At the sequence start (p0 = 0) the N_p persistent tokens are prepended, x~ = [p] || a; the
    Titans layer reads x~, m = M(x~); the sliding-window attention reads its RMS-normalised output,
    y = SW-Attn(RMSNorm(m)) (window ``attn_window``, no key exempt from it; RoPE at the positions of
    x~). The outputs at the persistent positions are dropped, o = y at the positions of a. Later
    calls continue both states: the memory layer's (which has read the persistent tokens) and the
    KV cache of the last window - 1 positions of x~."""
    P, np = ops.primitives, ops.np
    Bn, n, D = a.shape
    Np = cfg.mem_persistent if p0 == 0 else 0  # prepended once, at the sequence start
    xt = a
    if Np:
        xt = np.concatenate([np.broadcast_to(params[b + "mal.persist"], (Bn, Np, D)), a], axis=1)  # x~
    layer = layer_of(ops, cfg)
    lp = layer_params(params, b)
    m, c_mem, new_mem = layer.forward(xt, lp, layer.cfg, mem_state)  # y = M(x~) (Titans §4.3)
    u, c_n = P.rmsnorm_forward(m, params[b + "mal.norm.g"], cfg.norm_eps)
    start = 0 if p0 == 0 else p0 + cfg.mem_persistent  # x~'s position of xt's first token
    y, c_att, new_past = attn_forward(ops, u, params, b, cfg, start, past, cfg.attn_window, 0)  # SW-Attn(.)
    return y[:, Np:], (Np, c_mem, c_n, c_att), new_past, new_mem


def mal_backward(ops, do, cache, b, cfg):
    """(da, grads) of ``mal_forward``; the incoming caches are constants."""
    P, np = ops.primitives, ops.np
    Np, c_mem, c_n, c_att = cache
    grads = {}
    Bn, n, D = do.shape
    dy = do
    if Np:  # the dropped persistent outputs: no gradient
        dy = np.concatenate([np.zeros((Bn, Np, D), dtype=do.dtype), do], axis=1)
    du, g = attn_backward(ops, dy, c_att, b)
    grads.update(g)
    dm, grads[b + "mal.norm.g"] = P.rmsnorm_backward(du, c_n)
    dxt, g, _ = layer_of(ops, cfg).backward(dm, c_mem)
    grads.update({b + "mem." + k: v for k, v in g.items()})
    if cfg.mem_persistent:
        grads[b + "mal.persist"] = (dxt[:, :Np].sum(axis=0) if Np else
                                    np.zeros((cfg.mem_persistent, D), dtype=dxt.dtype))  # a later call: constant
    return dxt[:, Np:], grads


def mac_forward(ops, a, params, b, cfg, p0, past, mem_state):
    """Titans' memory as context (MAC, Titans §4.1; SPEC.md#titans-mac) over tokens at positions
    [p0, p0 + n) of the sequence. Returns (o, cache, new_past, new_mem).

    The sequence is cut into segments of C = ``attn_window`` tokens; the call is processed in pieces,
    each inside one segment. Per piece, with M_s the memory's fast weights at its segment's start:
    the retrieval h_i = RMSNorm_h(M_s*(l2(W_q a_i))) (a read, no write); causal attention over the
    segment's [p, h_1, a_1, h_2, a_2, ...] (the persistent tokens opening each segment; a_i sees
    h_j, a_j for j <= i; RoPE at those positions); y_i = its output at a_i; the Titans layer over y
    (written with y, read at its chunk starts), m = M(y); o = W_out (RMSNorm_a(y) * sigmoid(RMSNorm_m(m))).
    ``past``: None at a segment's start, else (K, V, M_s) of the open segment."""
    P, np = ops.primitives, ops.np
    Bn, n, D = a.shape
    H, dh, C, Np = cfg.n_heads, cfg.d_head, cfg.attn_window, cfg.mem_persistent
    layer = layer_of(ops, cfg)
    names = layer.module.weight_names(layer.cfg)
    lp = layer_params(params, b)
    kv, snap = (None, None) if past is None else ((past[0], past[1]), past[2])
    pieces, ys, ms, t = [], [], [], 0
    while t < n:
        j0 = (p0 + t) % C  # the piece's first token's place in its segment
        w = min(n - t, C - j0)
        x = a[:, t:t + w]  # (B, w, D)
        if j0 == 0:  # a new segment: its attention starts empty, its retrieval reads M_{s-1} (Titans Eq. 21)
            kv, src = None, ("init" if mem_state is None else "state")
            snap = ({m: np.broadcast_to(lp[layer.module.init_name(m)], (Bn,) + lp[layer.module.init_name(m)].shape)
                     for m in names} if mem_state is None else {m: mem_state[m] for m in names})
        else:
            src = "const"  # the open segment's M_s from the incoming state: a constant, as every cache
        zq, c_q = P.linear_forward(x, params[b + "mac.W_q"])  # q = a W_q^T
        qn, c_l2 = P.l2norm_forward(zq.reshape(Bn, w, H, dh), cfg.norm_eps)  # per head
        r, c_read = layer.module.read_forward(layer.cfg, snap, qn.transpose(0, 2, 1, 3))  # M_s*(q) (Eq. 21)
        h, c_nh = P.rmsnorm_forward(r.transpose(0, 2, 1, 3).reshape(Bn, w, D), params[b + "mac.norm_h.g"],
                                    cfg.norm_eps)
        z = np.stack([h, x], axis=2).reshape(Bn, 2 * w, D)  # h_1, a_1, h_2, a_2, ...
        lead = Np if j0 == 0 else 0
        if lead:
            z = np.concatenate([np.broadcast_to(params[b + "mac.persist"], (Bn, Np, D)), z], axis=1)  # Eq. 22
        start = 0 if j0 == 0 else Np + 2 * j0  # the segment's position of z's first entry
        yz, c_att, kv = attn_forward(ops, z, params, b, cfg, start, kv)  # Attn(S~) (Eq. 23)
        y = yz[:, lead + 1::2]  # (B, w, D): the outputs at the segment's tokens
        m, c_mem, new_mem = layer.forward(y, lp, layer.cfg, mem_state)  # written with y (Eq. 24), M*(y)
        pieces.append((t, w, lead, src, c_q, c_l2, c_read, c_nh, c_att, c_mem))
        ys.append(y)
        ms.append(m)
        mem_state = new_mem
        t += w
    y, m = np.concatenate(ys, axis=1), np.concatenate(ms, axis=1)
    ya, c_na = P.rmsnorm_forward(y, params[b + "mac.norm_a.g"], cfg.norm_eps)
    ym, c_nm = P.rmsnorm_forward(m, params[b + "mac.norm_m.g"], cfg.norm_eps)
    gate, c_s = P.sigmoid_forward(ym)
    o, c_o = P.linear_forward(ya * gate, params[b + "mac.W_out"])  # y (x) M*(y) (Eq. 25)
    new_past = None if (p0 + n) % C == 0 else (kv[0], kv[1], snap)
    return o, (pieces, names, ya, c_na, c_nm, gate, c_s, c_o), new_past, mem_state


def mac_backward(ops, do, cache, b, cfg):
    """(da, grads) of ``mac_forward``; the incoming caches (the open segment's K, V and M_s) are
    constants. The pieces run backward in reverse, the memory's state adjoint carried between them;
    M_s's adjoint from the retrieval joins the state's (or the initial memory's, at a fresh start)."""
    P, np = ops.primitives, ops.np
    pieces, names, ya, c_na, c_nm, gate, c_s, c_o = cache
    Bn, n, D = do.shape
    H, dh, Np = cfg.n_heads, cfg.d_head, cfg.mem_persistent
    layer = layer_of(ops, cfg)
    grads = {}

    def add(key, g):
        grads[key] = g if key not in grads else grads[key] + g

    dg, grads[b + "mac.W_out"], _ = P.linear_backward(do, c_o)
    dy_all, grads[b + "mac.norm_a.g"] = P.rmsnorm_backward(dg * gate, c_na)
    dm_all, grads[b + "mac.norm_m.g"] = P.rmsnorm_backward(P.sigmoid_backward(dg * ya, c_s), c_nm)
    da = np.zeros((Bn, n, D), dtype=do.dtype)
    dpersist = np.zeros((Np, D), dtype=do.dtype)
    dstate = None  # the adjoint of the memory state after the piece being differentiated
    for t, w, lead, src, c_q, c_l2, c_read, c_nh, c_att, c_mem in reversed(pieces):
        dy, g, dstate0 = layer.backward(dm_all[:, t:t + w], c_mem, dstate)
        for k, v in g.items():
            add(b + "mem." + k, v)
        dy = dy + dy_all[:, t:t + w]
        dyz = np.zeros((Bn, lead + 2 * w, D), dtype=do.dtype)
        dyz[:, lead + 1::2] = dy  # the outputs at the persistent and retrieval positions are dropped
        dz, g = attn_backward(ops, dyz, c_att, b)
        for k, v in g.items():
            add(k, v)
        if lead:
            dpersist = dpersist + dz[:, :lead].sum(axis=0)
        dz = dz[:, lead:].reshape(Bn, w, 2, D)
        dr, g_nh = P.rmsnorm_backward(dz[:, :, 0], c_nh)
        add(b + "mac.norm_h.g", g_nh)
        dsnap, dqn = layer.module.read_backward(layer.cfg, dr.reshape(Bn, w, H, dh).transpose(0, 2, 1, 3), c_read)
        dzq = P.l2norm_backward(dqn.transpose(0, 2, 1, 3), c_l2).reshape(Bn, w, D)
        dx, g_q, _ = P.linear_backward(dzq, c_q)
        add(b + "mac.W_q", g_q)
        da[:, t:t + w] = dz[:, :, 1] + dx
        if src == "state":  # M_s is the running memory entering this piece's layer call
            dstate0 = dict(dstate0)
            for m in names:
                dstate0[m] = dstate0[m] + dsnap[m]
        elif src == "init":  # M_s is the meta-learned initial memory, broadcast to the batch
            for m in names:
                add(b + "mem." + layer.module.init_name(m), dsnap[m].sum(axis=0))
        dstate = dstate0
    if Np:
        grads[b + "mac.persist"] = dpersist
    return da, grads


HYBRID_MIXERS = {"titans-mag": (mag_forward, mag_backward), "titans-mal": (mal_forward, mal_backward),
                 "titans-mac": (mac_forward, mac_backward)}
"""family -> (forward, backward) of a Titans hybrid's mixer (SPEC.md#titans-mag, #titans-mal, #titans-mac)."""


def lowest_layer(ops, params, cfg, tokens):
    """Block 0's sequence-memory layer over tokens (B, n) from a fresh state: (o (B, n, D), cache),
    the ``mixer`` of ``block_forward``. Its input, RMSNorm of the embedding, does not depend on the
    CMS weights, so this one call computes what the chunk-major pass's calls per processing chunk
    compute (one call equals any chain of calls, SPEC.md#selfmod; ``Ops.lowest_layer_once``)."""
    P = ops.primitives
    x, _ = P.embedding_forward(tokens, params["embed.E"])
    a, _ = P.rmsnorm_forward(x, params["blocks.0.norm1.g"], cfg.norm_eps)
    layer = layer_of(ops, cfg)
    o, c_mix, _ = layer.forward(a, layer_params(params, "blocks.0."), layer.cfg, None)
    return o, c_mix


def block_forward(ops, x, params, i, cfg, p0, past, mem_state, cms_w, cms_groups, mixer=None):
    """One block over a segment. Returns (y, cache, new_past, new_mem_state).

    ``mixer``: (o, cache) of this block's sequence-memory layer already computed on the same input
    (``Ops.reuse_layer_caches``); the layer is not run again then."""
    P = ops.primitives
    b = f"blocks.{i}."
    a, c_n1 = P.rmsnorm_forward(x, params[b + "norm1.g"], cfg.norm_eps)  # (B, n, D)
    new_past = new_mem = None
    if mixer is not None:
        o, c_mix = mixer
    elif is_hybrid(cfg):
        o, c_mix, new_past, new_mem = HYBRID_MIXERS[cfg.family][0](ops, a, params, b, cfg, p0, past, mem_state)
    elif has_attention(cfg):
        o, c_mix, new_past = attn_forward(ops, a, params, b, cfg, p0, past)
    else:
        layer = layer_of(ops, cfg)
        o, c_mix, new_mem = layer.forward(a, layer_params(params, b), layer.cfg, mem_state)
    h = x + o  # (B, n, D)
    u, c_n2 = P.rmsnorm_forward(h, params[b + "norm2.g"], cfg.norm_eps)
    if has_cms(cfg):
        c, c_sec = ops.cms.forward(u, cms_w, cms_groups, cfg.cms_variant, cfg.cms_activation,
                                   params.get(b + "cms.agg"))  # Eqs. (70)/(74), (97)
        y = h + (c - u)
    else:
        m, c_sec = P.swiglu_forward(u, params[b + "mlp.W_gate"], params[b + "mlp.W_up"], params[b + "mlp.W_down"])
        y = h + m
    return y, (c_n1, c_mix, c_n2, c_sec), new_past, new_mem


def block_backward(ops, dy, cache, i, cfg, cms_only=False, cms_wanted=None):
    """Returns (dx, grads, dcms): dcms[l] = (dW1, dW2) per group and sequence (hope families), or
    as ``cms_wanted`` asks (reference/cms.py ``WANTED``, ``Ops.cms_grads_needed``).
    ``cms_only``: return (None, {}, dcms) right after the CMS backward (``Ops.cms_grads_only``)."""
    P = ops.primitives
    b = f"blocks.{i}."
    c_n1, c_mix, c_n2, c_sec = cache
    grads, dcms = {}, None
    if has_cms(cfg):
        du, dcms, dagg = ops.cms.backward(dy, c_sec, cms_wanted)
        if cms_only:
            return None, {}, dcms
        du = du - dy
        if dagg is not None:
            grads[b + "cms.agg"] = dagg
    else:
        du, grads[b + "mlp.W_gate"], grads[b + "mlp.W_up"], grads[b + "mlp.W_down"] = P.swiglu_backward(dy, c_sec)
    dh, grads[b + "norm2.g"] = P.rmsnorm_backward(du, c_n2)
    dh = dh + dy
    if is_hybrid(cfg):
        da, g = HYBRID_MIXERS[cfg.family][1](ops, dh, c_mix, b, cfg)
    elif has_attention(cfg):
        da, g = attn_backward(ops, dh, c_mix, b)
    else:
        da, g, _ = layer_of(ops, cfg).backward(dh, c_mix)
        g = {b + "mem." + k: v for k, v in g.items()}
    grads.update(g)
    dx, grads[b + "norm1.g"] = P.rmsnorm_backward(da, c_n1)
    return dx + dh, grads, dcms


def stack_forward(ops, params, cfg, tokens, p0, past, mem, cms_w, cms_groups, mixers=None):
    """Embedding, blocks, final norm and head over tokens (B, n) at positions [p0, p0 + n).

    past[i]: block i's attention cache (or None); mem[i]: its memory-layer state (None: fresh);
    cms_w[i][l] = (W1, W2) of shapes (B, G_l, D, Hm), (B, G_l, Hm, D); cms_groups[l] tiles the
    segment into level l's chunks; mixers[i]: see ``block_forward``.
    Returns (logits (B, n, V), cache, new_past, new_mem).
    """
    P = ops.primitives
    x, c_emb = P.embedding_forward(tokens, params["embed.E"])  # (B, n, D)
    caches, new_past, new_mem = [], [], []
    for i in range(cfg.n_layers):
        x, c, np_i, nm_i = block_forward(ops, x, params, i, cfg, p0, past[i], mem[i],
                                         cms_w[i] if cms_w else None, cms_groups, mixers[i] if mixers else None)
        caches.append(c)
        new_past.append(np_i)
        new_mem.append(nm_i)
    xf, c_fn = P.rmsnorm_forward(x, params["final_norm.g"], cfg.norm_eps)
    logits, c_head = P.linear_forward(xf, params["head.W"])  # (B, n, V)
    return logits, (c_emb, caches, c_fn, c_head), new_past, new_mem


def stack_backward(ops, dlogits, cache, cfg, cms_only=False, cms_wanted=None):
    """Returns (grads without the CMS weights, dcms[i][l] = (dW1, dW2) per group and sequence, or as
    ``cms_wanted`` (one ``WANTED`` entry per level, the same in every block) asks).

    ``cms_only`` (a CMS write's re-run, which uses only the CMS weights' gradients): block 0's
    mixer, norm and the embedding are not differentiated, since no CMS weight lies below them;
    the CMS gradients are the same numbers either way."""
    P = ops.primitives
    c_emb, caches, c_fn, c_head = cache
    grads = {}
    dxf, grads["head.W"], _ = P.linear_backward(dlogits, c_head)
    dx, grads["final_norm.g"] = P.rmsnorm_backward(dxf, c_fn)
    dcms = [None] * cfg.n_layers
    for i in reversed(range(cfg.n_layers)):
        dx, g, dcms[i] = block_backward(ops, dx, caches[i], i, cfg, cms_only=cms_only and i == 0,
                                        cms_wanted=cms_wanted)
        grads.update(g)
    if dx is not None:
        grads["embed.E"] = P.embedding_backward(dx, c_emb)
    return grads, dcms
