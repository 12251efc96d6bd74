"""Self-modifying Titans: a sequence layer whose key, value, gate and output memories all learn in context.

Paper: §8.1-8.2, Eqs. (83)-(93), arXiv 2512.24695v1 (DGD: §4.5, Eqs. (56)-(57); chunks: Eq. (90)).
SPEC: SPEC.md#selfmod (semantics: SPEC.md#chunks, SPEC.md#outer-gradient). One memory's read,
target, inner gradient and write (Eqs. 84-88, 93) with their backwards: reference/selfmod_memory.py
(its public names are re-exported here).

Every projection except q is a memory ``M_box`` (box in k, v, eta, alpha, memory; and q when
``adaptive_q``) that is read at its chunk-start state, generates its own target
``v_hat_box = M_box(v)`` and is written by DGD with retention and momentum (Eq. 88). With
``adaptive_k`` / ``adaptive_v`` False (Table 6 "w/o inner-projection k" / "v") k / v are static like
q, ``l2(conv_k(x_t W_k^T))``, and M_k / M_v do not exist:

    k_t = l2(conv_k(M_k(x_t))),  v_t = l2(conv_v(M_v(x_t))),  q_t = l2(conv_q(x_t W_q^T))    Eq. (83)
    eta_t = eta_max sigmoid(w_eta . M_eta(x_t) + b_eta),  alpha_t = sigmoid(w_alpha . M_alpha(x_t) + b_alpha)
    eta'_t = eta_t / (1 + eta_t ||k_t||^2)                     Eq. (57), memory.prox_step_size
    v_hat_box,t = M_box(v_t);  G_box,t = grad_W ||M_box(k_t) - v_hat_box,t||^2    Eqs. (84)-(86), (93)
    S <- beta_box S - eta'_t G_box,t;  W_key <- W_key (alpha_t I - eta'_t k_t k_t^T) + S_key,
    W_other <- alpha_t W_other + S_other                                                     Eq. (88)
    o_t = M_memory(q_t) at its chunk-start state                                             Eq. (83)
    y_t = W_o (RMSNorm_head(o_t) * silu(W_g x_t))

Symbols (per head; B batch, T tokens, D width, H heads, dh = D / H, n the tokens of one segment):

| paper                    | code                    | shape                      |
| ------------------------ | ----------------------- | -------------------------- |
| x_t                      | ``x``                   | (B, T, D)                  |
| q_t, k_t, v_t, o_t       | ``q, k, v, o``          | (B, H, T, dh)              |
| M_box(x_t) (box reads x) | ``pre[box]``            | (B, H, T, dh)              |
| eta_t, alpha_t, eta'_t   | ``eta, alpha, ep``      | (B, H, T)                  |
| momentum decay           | ``beta`` (per memory)   | (H,)                       |
| M_box,0 (meta-learned)   | ``{box}.M0``, ``{box}.W1_0``, ``{box}.W2_0`` | (H, ., .) |
| running / chunk-start state, momentum | ``W``, ``Bst``, ``S`` | {box: {weight: (B, H, ., .)}} |
| v_hat_box,t              | ``vhat[box]``           | (B, H, T, dh)              |

Decisions where the paper is open (each recorded in SPEC.md#selfmod): memories act per head on
dh-dim slices, M_k, M_v, M_eta, M_alpha (and M_q) read the head's slice of x_t; eta, alpha are
static per-head readouts through sigmoids, eta_max = 0.1; conv (width 4) after every read of k, v,
q, then l2 normalisation of q, k and v (v too: the self-generated targets otherwise grow with the
memory; option ``normalize_v``), no SiLU; DGD as printed in Eq. (88), eta' the exact prox step,
``single_shrink`` the normalised delta rule (matrix only); momentum on by default with a static
decay beta = sigmoid(b_beta); every read and inner gradient at its memory's chunk-start state,
``chunk_memory`` for M_memory, ``chunk_other`` for the rest (SPEC.md#chunks); the output as in
titans.py; the outer gradient through every write, ``stop_grad_writes`` its first-order variant
(SPEC.md#outer-gradient); ``step_norm`` (off by default, not in the paper) multiplies every G_t by
``step_scale``'s 1 / (1 + eta_t C lambda_t), a bound of its chunk's summed curvature
(SPEC.md#hope-stability).

CuPy-safe (SPEC.md#backends): the GPU port executes this source with ``np`` rebound to CuPy, so NumPy
is imported once, as ``np``, and every array function is called through it.

Two implementations of one function, built from the same named steps: ``forward_loop`` (the token
loop that applies the definition: the oracle) and ``forward`` (per segment: reads and inner
gradients batched, the writes in closed form by ``write_chunk``). ``backward`` reverses either,
segment by segment: the output, then per segment each memory's writes (``write_chunk_backward``
or, for a token-loop cache, ``write_tokens_backward``), inner gradients and targets, the read of
o, the prox step, norms and convs, the gates and the reads of x. Derivation: docs/selfmod-backward.md.
"""

from __future__ import annotations

import numpy as np

from . import memory as DGD
from . import primitives as P
from .selfmod_config import SelfModConfig, check_inputs, init_params, init_state, param_shapes  # noqa: F401
from .selfmod_memory import (  # noqa: F401  (one memory's pieces: part of this module's public API)
    init_key,
    inner_grad,
    inner_grad_backward,
    keyside,
    read_backward,
    read_forward,
    scalar_suffix_products,
    scalar_suffix_products_backward,
    shrinks,
    step_scale,
    step_scale_backward,
    suffix_products,
    suffix_products_backward,
    weights,
    write,
    write_backward,
    write_chunk,
    write_chunk_backward,
    write_chunk_cache,
    write_tokens,
    write_tokens_backward,
    write_tokens_cache,
)

# ---------------------------------------------------------------------------------------------
# Shared steps of the two forms: heads, segments, gates, the reads of a piece of tokens
# ---------------------------------------------------------------------------------------------


def heads(a, H):
    """(B, T, D) -> (B, H, T, dh). Part of the contract the ports use."""
    B, T, D = a.shape
    return a.reshape(B, T, H, D // H).transpose(0, 2, 1, 3)


def merge(a):
    """(B, H, T, dh) -> (B, T, D). Part of the contract the ports use."""
    B, H, T, dh = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * dh)


def segments(cfg, T, pos_other, pos_memory):
    """Token ranges [t0, t1) in which no memory starts a chunk, with the memories starting at t0
    (SPEC.md#chunks). Part of the contract the ports use."""

    def starts(t):
        return tuple(
            m for m in cfg.memories
            if ((pos_memory if m == "memory" else pos_other) + t) % cfg.chunk(m) == 0
        )  # fmt: skip

    if T == 0:
        return []
    bounds = [0] + [t for t in range(1, T) if starts(t)] + [T]
    return [(t0, t1, starts(t0)) for t0, t1 in zip(bounds[:-1], bounds[1:], strict=True)]


def betas(params, cfg, m):
    """Memory m's momentum decay beta = sigmoid(b_beta) (H,), None without momentum. Part of the
    contract the ports use."""
    return P.sigmoid(params[f"{m}.b_beta"]) if cfg.momentum else None  # (H,)


def gates(params, cfg, pre_eta, pre_alpha, k):
    """(s_eta, s_alpha, eta, alpha, eta') (B, H, n) from the gate memories' reads (SPEC.md#selfmod).
    Part of the contract the ports use."""
    s_eta = np.einsum("bhnd,hd->bhn", pre_eta, params["w_eta"]) + params["b_eta"][:, None]
    eta = cfg.eta_max * P.sigmoid(s_eta)  # (B, H, n)   Eq. (83) with a pinned squashing
    if cfg.retention:
        s_alpha = np.einsum("bhnd,hd->bhn", pre_alpha, params["w_alpha"]) + params["b_alpha"][:, None]
        alpha = P.sigmoid(s_alpha)  # (B, H, n)
    else:  # Table 6 "w/o weight decay": no retention gate, alpha = 1 (pre_alpha is None)
        s_alpha, alpha = None, np.ones_like(eta)
    # Eq. (57): the exact prox step of memory.py's DGD; without DGD (Table 6) the plain rate eta
    ep = DGD.prox_step_size(eta, k) if cfg.dgd else eta
    return s_eta, s_alpha, eta, alpha, ep


def _begin(x, params, cfg, state):
    """The running states (from ``state`` or ``init_state``) and the per-token arrays a forward fills."""
    check_inputs(x, params, cfg, state)
    B, T, D = x.shape
    st = init_state(params, cfg, B) if state is None else state
    r = {"x": x, "params": params, "cfg": cfg, "had_state": state is not None, "segs": [],
         "W": {m: {w: st[f"{m}.{w}"] for w in weights(cfg)} for m in cfg.memories},
         "Bst": {m: {w: st[f"{m}.{w}_b"] for w in weights(cfg)} for m in cfg.memories},
         "S": {m: {w: st.get(f"{m}.S_{w}") for w in weights(cfg)} for m in cfg.memories},
         "conv": {c: st[f"conv_{c}"] for c in ("q", "k", "v")},
         "pos0": (int(st["pos_other"]), int(st["pos_memory"])),
         "betas": {m: betas(params, cfg, m) for m in cfg.memories},
         "xh": heads(x, cfg.n_heads),  # (B, H, T, dh)
         # the static projections x W_c^T (q unless adaptive_q; k, v when not adaptive) (B, T, D)
         "lin": {c: P.linear_forward(x, params[f"W_{c}"])[0] for c in cfg.static_projections}}  # fmt: skip
    per_token = (B, cfg.n_heads, T, cfg.head_dim)
    r["full"] = {name: np.zeros(per_token, dtype=x.dtype) for name in ("k", "q", "v", "o")}
    r["pre"] = {m: np.zeros(per_token, dtype=x.dtype) for m in cfg.readers}
    for name in ("eta", "alpha", "ep"):
        r["full"][name] = np.zeros(per_token[:3], dtype=x.dtype)
    r["vhat"] = {m: np.zeros(per_token, dtype=x.dtype) for m in cfg.memories}
    r["conv0"] = dict(r["conv"])
    return r


def _enter_segment(r, t0, t1, starts):
    """A chunk that starts at t0 reads and differentiates at this state; the segment's start kept."""
    for m in starts:
        r["Bst"][m] = dict(r["W"][m])
    r["segs"].append({"t0": t0, "t1": t1, "starts": starts,
                      "B": {m: dict(r["Bst"][m]) for m in r["cfg"].memories},
                      "W": {m: dict(r["W"][m]) for m in r["cfg"].memories},
                      "S": {m: dict(r["S"][m]) for m in r["cfg"].memories}})  # fmt: skip


def _project(r, a, b):
    """Tokens [a, b): the reads of x, convs, norms, gates and o at the chunk-start states (Eq. 83).
    Fills the per-token arrays and returns (k, v, eta', alpha) (B, H, n, .) for the writes."""
    cfg, params, Bst, pre, conv, H = r["cfg"], r["params"], r["Bst"], r["pre"], r["conv"], r["cfg"].n_heads
    xs = r["xh"][:, :, a:b]  # (B, H, n, dh)
    for m in cfg.readers:
        pre[m][:, :, a:b] = read_forward(cfg, Bst[m], xs)[0]  # Eq. (83) at the chunk start
    # the convs' inputs: a memory's read, or the static projection x W_c^T
    cin = {c: merge(pre[c][:, :, a:b]) if cfg.adaptive(c) else r["lin"][c][:, a:b] for c in ("k", "v", "q")}
    kc, _, conv["k"] = P.conv1d_forward(cin["k"], params["conv_k"], None, conv["k"])
    vc, _, conv["v"] = P.conv1d_forward(cin["v"], params["conv_v"], None, conv["v"])
    qc, _, conv["q"] = P.conv1d_forward(cin["q"], params["conv_q"], None, conv["q"])
    k = P.l2norm_forward(heads(kc, H), cfg.eps)[0]  # (B, H, n, dh)
    q = P.l2norm_forward(heads(qc, H), cfg.eps)[0]  # (B, H, n, dh)
    v = heads(vc, H)  # (B, H, n, dh)
    if cfg.normalize_v:
        v = P.l2norm_forward(v, cfg.eps)[0]  # pinned: bounded targets (SPEC.md#selfmod)
    _, _, eta, alpha, ep = gates(params, cfg, pre["eta"][:, :, a:b],
                                 pre["alpha"][:, :, a:b] if cfg.retention else None, k)
    r["full"]["o"][:, :, a:b] = read_forward(cfg, Bst["memory"], q)[0]  # Eq. (83)   o = M_memory(q)
    for name, val in (("k", k), ("q", q), ("v", v), ("eta", eta), ("alpha", alpha), ("ep", ep)):
        r["full"][name][:, :, a:b] = val
    return k, v, ep, alpha


def _target_grads(r, m, a, b, k, v):
    """Memory m's self-generated targets (Eq. 84) and inner gradients (Eq. 93) for tokens [a, b);
    with ``step_norm`` each token's gradient times its ``step_scale`` (SPEC.md#hope-stability)."""
    cfg = r["cfg"]
    vh = read_forward(cfg, r["Bst"][m], v)[0]  # Eq. (84)   vhat = M_box(v)
    r["vhat"][m][:, :, a:b] = vh
    G = inner_grad(cfg, r["Bst"][m], k, vh)[0]
    if cfg.step_norm:
        s = step_scale(cfg, r["Bst"][m], k, r["full"]["eta"][:, :, a:b], cfg.chunk(m))[0]  # (B, H, n)
        G = {w: s[..., None, None] * G[w] for w in G}
    return G


def _finish(r, writes):
    """The output (``_output_forward``), the new state (copies) and the cache of either form."""
    cfg, x = r["cfg"], r["x"]
    T = x.shape[1]
    y, out_cache = _output_forward(r["full"]["o"], x, r["params"], cfg)
    new_state: dict = {}
    for m in cfg.memories:
        for w in weights(cfg):
            new_state[f"{m}.{w}"] = r["W"][m][w].copy()  # copies: the new state never aliases the input
            new_state[f"{m}.{w}_b"] = r["Bst"][m][w].copy()
            if cfg.momentum:
                new_state[f"{m}.S_{w}"] = r["S"][m][w].copy()
    new_state["pos_other"] = (r["pos0"][0] + T) % cfg.chunk_other
    new_state["pos_memory"] = (r["pos0"][1] + T) % cfg.chunk_memory
    for c in ("q", "k", "v"):
        new_state[f"conv_{c}"] = r["conv"][c].copy()
    cache = {"x": x, "params": r["params"], "cfg": cfg, "had_state": r["had_state"], "segs": r["segs"],
             "pre": r["pre"], "writes": writes, "lin": r["lin"], "conv0": r["conv0"], "vhat": r["vhat"],
             "out": out_cache, **r["full"]}  # fmt: skip
    return y, cache, new_state


def _output_forward(o, x, params, cfg):
    """y = W_o (RMSNorm_head(o) * silu(W_g x)) (SPEC.md#selfmod, as titans.py)."""
    on, c_norm = P.rmsnorm_forward(o, params["g_o"], cfg.eps)  # (B, H, T, dh)
    gl, c_g = P.linear_forward(x, params["W_g"])  # (B, T, D)
    g, c_silu = P.silu_forward(gl)  # (B, T, D)
    h = merge(on) * g  # (B, T, D)
    y, c_o = P.linear_forward(h, params["W_o"])  # (B, T, D)
    return y, (c_norm, c_g, c_silu, c_o, on, g)


def _output_backward(dy, cache, H):
    """VJP of ``_output_forward``: -> (do (B, H, T, dh), dx (B, T, D), {W_o, W_g, g_o})."""
    c_norm, c_g, c_silu, c_o, on, g = cache
    dh_, dW_o, _ = P.linear_backward(dy, c_o)
    dg = dh_ * merge(on)
    don = heads(dh_ * g, H)
    dgl = P.silu_backward(dg, c_silu)
    dx, dW_g, _ = P.linear_backward(dgl, c_g)
    do, dg_o = P.rmsnorm_backward(don, c_norm)
    return do, dx, {"W_o": dW_o, "W_g": dW_g, "g_o": dg_o}


# ---------------------------------------------------------------------------------------------
# The two forms
# ---------------------------------------------------------------------------------------------


def forward(x, params, cfg, state=None):
    """Chunk-parallel self-modifying Titans. x (B, T, D) -> (y (B, T, D), cache, state).

    Per segment: every read and inner gradient batched at the chunk-start states, each weight's
    writes in closed form (``write_chunk``, Eqs. 88, 90). ``state`` (from ``init_state`` or a
    previous call) continues a stream at any split point."""
    r = _begin(x, params, cfg, state)
    for t0, t1, starts in segments(cfg, x.shape[1], *r["pos0"]):
        _enter_segment(r, t0, t1, starts)
        k, v, ep, alpha = _project(r, t0, t1)
        for m in cfg.memories:
            G = _target_grads(r, m, t0, t1, k, v)
            for w in weights(cfg):
                r["W"][m][w], r["S"][m][w], _ = write_chunk(
                    r["W"][m][w], r["S"][m][w], G[w], k, ep, alpha, r["betas"][m], shrinks(cfg, w)
                )
    return _finish(r, "chunk")


def forward_loop(x, params, cfg, state=None):
    """The token-loop oracle: the same function, applying the definition one token at a time
    (``write`` per token; with both chunk sizes 1, the fully recurrent model)."""
    r = _begin(x, params, cfg, state)
    for t0, t1, starts in segments(cfg, x.shape[1], *r["pos0"]):
        _enter_segment(r, t0, t1, starts)
        for t in range(t0, t1):
            k, v, ep, alpha = _project(r, t, t + 1)
            for m in cfg.memories:
                G = _target_grads(r, m, t, t + 1, k, v)
                for w in weights(cfg):
                    r["W"][m][w], r["S"][m][w], _ = write(r["W"][m][w], r["S"][m][w], G[w][:, :, 0], k[:, :, 0],
                                                          ep[:, :, 0], alpha[:, :, 0], r["betas"][m], shrinks(cfg, w))  # fmt: skip
    return _finish(r, "loop")


# ---------------------------------------------------------------------------------------------
# backward: the output, then per segment (last first) the steps below
# ---------------------------------------------------------------------------------------------

# Each form's segment writes reversed: their cache recomputed from the segment's start (not the new
# state: the backward never needs it), then their backward
_WRITES = {
    "chunk": (write_chunk_cache, write_chunk_backward),
    "loop": (write_tokens_cache, write_tokens_backward),
}


def backward(dy, cache, dstate=None):
    """Hand-written VJP of ``forward``/``forward_loop``. dy (B, T, D); ``dstate`` the gradient reaching
    the returned state (None: zero; missing keys: zero). Returns (dx, dparams, dstate0): dparams has
    every key of params; dstate0 the gradient w.r.t. the input state (zeros-like init_state when the
    call had none; then the initial-state gradients are in dparams)."""
    x, params, cfg = cache["x"], cache["params"], cache["cfg"]
    B, T, D = x.shape
    if not isinstance(dy, np.ndarray) or dy.shape != x.shape:
        raise ValueError(f"dy: expected an array of shape (B, T, D) = {x.shape}, got {getattr(dy, 'shape', None)}")
    grads = {name: np.zeros(shape, dtype=x.dtype) for name, shape in param_shapes(cfg).items()}
    do, dx, g_out = _output_backward(dy, cache["out"], cfg.n_heads)
    for key, val in g_out.items():
        grads[key] += val
    adj = _state_adjoints(cache, dstate)
    dxh = np.zeros((B, cfg.n_heads, T, cfg.head_dim), dtype=x.dtype)
    dlin = {c: np.zeros((B, T, D), dtype=x.dtype) for c in cfg.static_projections}  # of x W_c^T
    # the convs' inputs (B, T, D): a memory's read, or the static projection
    conv_in = {c: merge(cache["pre"][c]) if cfg.adaptive(c) else cache["lin"][c] for c in ("k", "v", "q")}
    beta = {m: betas(params, cfg, m) for m in cfg.memories}
    for seg in reversed(cache["segs"]):
        t0, t1 = seg["t0"], seg["t1"]
        d = {c: np.zeros_like(cache[c][:, :, t0:t1]) for c in ("k", "v", "alpha", "ep", "eta")}
        for m in cfg.memories:
            if not cfg.stop_grad_writes:  # W_t = W_{t-1} + sg(increment): the adjoint skips the writes
                _memory_backward(cache, seg, m, beta[m], d, adj, grads)
        _, c_o = read_forward(cfg, seg["B"]["memory"], cache["q"][:, :, t0:t1])  # o = M_memory(q)
        dst_o, dq = read_backward(cfg, do[:, :, t0:t1], c_o)
        for w in weights(cfg):
            adj["B"]["memory"][w] += dst_o[w]
        if cfg.dgd:
            deta, dk_prox = DGD.prox_step_size_backward(d["ep"], cache["eta"][:, :, t0:t1], cache["k"][:, :, t0:t1])
            d["k"] += dk_prox  # Eq. (57)   eta' = eta / (1 + eta ||k||^2)
        else:
            deta = d["ep"]  # eta' = eta
        deta = deta + d["eta"]  # eta's own uses: step_norm's scale (zero without it)
        dpre_seg = _norms_convs_backward(cache, conv_in, t0, t1, d["k"], dq, d["v"], adj, grads)  # (B, n, D)
        dpre = {c: heads(dpre_seg[c], cfg.n_heads) for c in ("k", "v", "q") if cfg.adaptive(c)}
        for c in cfg.static_projections:
            dlin[c][:, t0:t1] = dpre_seg[c]
        dpre.update(_gates_backward(cache, t0, t1, deta, d["alpha"], grads))
        _reads_backward(cache, seg, dpre, dxh, adj)
        for m in seg["starts"]:  # a chunk that starts here took its chunk-start state from the running state
            for w in weights(cfg):
                adj["W"][m][w] = adj["W"][m][w] + adj["B"][m][w]
                adj["B"][m][w] = np.zeros_like(adj["B"][m][w])
    dx = dx + merge(dxh)
    for c in cfg.static_projections:  # c = x W_c^T (static: q unless adaptive_q; k, v when not adaptive)
        dxc, dW_c, _ = P.linear_backward(dlin[c], (x, params[f"W_{c}"], False))
        dx = dx + dxc
        grads[f"W_{c}"] += dW_c
    return dx, grads, _state0_gradient(cache, adj, grads)


def _state_adjoints(cache, dstate):
    """The adjoints reaching the returned state: {W, B, S: {m: {w: (B, H, ., .)}}, conv: {c: (B, K-1, D)}}."""
    x, params, cfg = cache["x"], cache["params"], cache["cfg"]
    ds = dstate or {}
    ref = init_state(params, cfg, x.shape[0])

    def adjoint(key, like):
        return np.array(ds.get(key, np.zeros(ref[like].shape, dtype=x.dtype)), dtype=x.dtype)

    wn = weights(cfg)
    return {"W": {m: {w: adjoint(f"{m}.{w}", f"{m}.{w}") for w in wn} for m in cfg.memories},
            "B": {m: {w: adjoint(f"{m}.{w}_b", f"{m}.{w}") for w in wn} for m in cfg.memories},
            "S": {m: {w: adjoint(f"{m}.S_{w}", f"{m}.{w}") for w in wn} for m in cfg.memories},
            "conv": {c: adjoint(f"conv_{c}", f"conv_{c}") for c in "qkv"}}  # fmt: skip


def _memory_backward(cache, seg, m, beta, d, adj, grads):
    """Memory m (momentum decay ``beta``: ``betas``) over one segment, reversed: its writes (Eqs. 88,
    momentum; the form's cache, then its backward), inner gradients (Eq. 93, second order) and
    targets (Eq. 84). The write adjoints go to adj["W"], adj["S"], the chunk-start ones to adj["B"];
    dk, dv, dalpha, deta' accumulate into ``d``."""
    cfg, t0, t1 = cache["cfg"], seg["t0"], seg["t1"]
    k, v, ep, alpha = (cache[c][:, :, t0:t1] for c in ("k", "v", "ep", "alpha"))  # (B, H, n, .)
    Bm = seg["B"][m]
    vh, c_read = read_forward(cfg, Bm, v)  # Eq. (84) at the chunk-start state, recomputed
    G, c_grad = inner_grad(cfg, Bm, k, vh)  # Eq. (93)
    if cfg.step_norm:  # the writes take s_t G_t (SPEC.md#hope-stability)
        s, c_scale = step_scale(cfg, Bm, k, cache["eta"][:, :, t0:t1], cfg.chunk(m))
        G_raw, G = G, {w: s[..., None, None] * G[w] for w in G}
    write_segment_cache, write_segment_backward = _WRITES[cache["writes"]]
    dG = {}
    for w in weights(cfg):
        c_write = write_segment_cache(seg["W"][m][w], seg["S"][m][w], G[w], k, ep, alpha, beta, shrinks(cfg, w))
        dP, dS, dG[w], dk, dep, dalpha, dbeta = write_segment_backward(adj["W"][m][w], adj["S"][m][w], c_write)
        d["k"] += dk
        d["ep"] += dep
        d["alpha"] += dalpha
        if beta is not None:
            grads[f"{m}.b_beta"] += dbeta * beta * (1 - beta)  # beta = sigmoid(b_beta)
            adj["S"][m][w] = dS
        adj["W"][m][w] = dP
    if cfg.step_norm:  # G~ = s G: ds = <dG~, G>, dG = s dG~
        ds = sum(np.einsum("bhnij,bhnij->bhn", dG[w], G_raw[w]) for w in dG)
        dG = {w: s[..., None, None] * dG[w] for w in dG}
        dst_s, dk_s, deta_s = step_scale_backward(cfg, ds, c_scale)
        d["k"] += dk_s
        d["eta"] += deta_s
        for w in weights(cfg):
            if dst_s[w] is not None:
                adj["B"][m][w] += dst_s[w]
    dst, dk_g, dvh = inner_grad_backward(cfg, dG, c_grad)
    d["k"] += dk_g
    dst_r, dv_r = read_backward(cfg, dvh, c_read)
    d["v"] += dv_r
    for w in weights(cfg):
        for part in (dst[w], dst_r[w]):
            if part is not None:
                adj["B"][m][w] += part


def _norms_convs_backward(cache, conv_in, t0, t1, dk, dq, dv, adj, grads):
    """Through the l2 norms and the causal convs of k, q, v (Eq. 83; their history adjoint carried
    backwards across segments in adj["conv"]): -> {c: the adjoint of the conv's input (B, n, D)}."""
    cfg, params, H, K = cache["cfg"], cache["params"], cache["cfg"].n_heads, cache["cfg"].conv_width
    dpre = {}
    for c, dpost in (("k", dk), ("q", dq), ("v", dv)):
        y, c_conv = _conv_replay(cache, conv_in, c, params, t0, t1, K)  # (B, n, D)
        if c == "v" and not cfg.normalize_v:
            dc = merge(dv)
        else:
            _, c_l2 = P.l2norm_forward(heads(y, H), cfg.eps)
            dc = merge(P.l2norm_backward(dpost, c_l2))
        dpre[c], dwc, _, adj["conv"][c] = P.conv1d_backward(dc, c_conv, dnew_state=adj["conv"][c])
        grads[f"conv_{c}"] += dwc
    return dpre


def _conv_replay(cache, conv_in, c, params, t0, t1, K):
    """Recompute the conv of segment [t0, t1) -> (output (B, n, D), conv cache)."""
    xp = np.concatenate([cache["conv0"][c], conv_in[c][:, :t0]], axis=1)
    state = xp[:, xp.shape[1] - (K - 1):]  # the conv history (B, K-1, D) before token t0
    y, c_conv, _ = P.conv1d_forward(conv_in[c][:, t0:t1], params[f"conv_{c}"], None, state)
    return y, c_conv


def _gates_backward(cache, t0, t1, deta, dalpha, grads):
    """eta = eta_max sigmoid(w_eta . pre_eta + b_eta), alpha = sigmoid(w_alpha . pre_alpha + b_alpha)
    (Eq. 83, pinned squashing): -> {eta, alpha: the adjoints of the gate memories' reads}."""
    params, cfg, dpre = cache["params"], cache["cfg"], {}
    for gname, dgate in (("eta", deta), ("alpha", dalpha))[:len(cfg.gate_names)]:  # alpha = 1 w/o retention
        pe = cache["pre"][gname][:, :, t0:t1]
        s = np.einsum("bhnd,hd->bhn", pe, params[f"w_{gname}"]) + params[f"b_{gname}"][:, None]
        scale = cfg.eta_max if gname == "eta" else 1.0
        dsig = dgate * scale * P.dsigmoid(s)  # (B, H, n)
        grads[f"w_{gname}"] += np.einsum("bhn,bhnd->hd", dsig, pe)
        grads[f"b_{gname}"] += np.einsum("bhn->h", dsig)
        dpre[gname] = dsig[..., None] * params[f"w_{gname}"][None, :, None, :]
    return dpre


def _reads_backward(cache, seg, dpre, dxh, adj):
    """The reads of x at each reader's chunk-start state (Eq. 83): into dxh and adj["B"]."""
    cfg, t0, t1 = cache["cfg"], seg["t0"], seg["t1"]
    xs_h = heads(cache["x"], cfg.n_heads)[:, :, t0:t1]
    for m in cfg.readers:
        _, c_r = read_forward(cfg, seg["B"][m], xs_h)
        dst_x, dxs = read_backward(cfg, dpre[m], c_r)
        dxh[:, :, t0:t1] += dxs
        for w in weights(cfg):
            adj["B"][m][w] += dst_x[w]


def _state0_gradient(cache, adj, grads):
    """The adjoint of the input state (dstate0); for a fresh sequence W_0 = B_0 = the broadcast
    meta-learned state, so its gradient goes to dparams instead."""
    cfg, dstate0 = cache["cfg"], {}
    for m in cfg.memories:
        for w in weights(cfg):
            if cache["had_state"]:
                dstate0[f"{m}.{w}"], dstate0[f"{m}.{w}_b"] = adj["W"][m][w], adj["B"][m][w]
                if cfg.momentum:
                    dstate0[f"{m}.S_{w}"] = adj["S"][m][w]
            else:
                grads[init_key(m, w)] += np.einsum("bh...->h...", adj["W"][m][w] + adj["B"][m][w])
    for c in "qkv":
        dstate0[f"conv_{c}"] = adj["conv"][c]
    return dstate0
