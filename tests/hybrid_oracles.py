"""Oracles of the Titans hybrids' parts, written from their definitions (SPEC.md#titans-mag,
SPEC.md#titans-mal): the sliding-window attention by loops, RoPE and RMSNorm written out, the
Titans layer alone over x~. tests/reference/test_titans_mag.py and test_titans_mal.py build their
mixers' oracles from these."""

from __future__ import annotations

import numpy as np

from nlref.reference import titans as RT


def window_oracle(q, k, v, window, persistent):
    """Query t at key index i_t = T_k - T_q + t attends to the persistent keys i < persistent with
    i <= i_t and to the keys i_t - window < i <= i_t: the softmax over those alone, by loops."""
    B, H, Tq, dh = q.shape
    Tk = k.shape[2]
    y = np.zeros(q.shape[:3] + v.shape[3:])
    for b in range(B):
        for h in range(H):
            for t in range(Tq):
                it = Tk - Tq + t
                seen = [i for i in range(Tk) if i <= it and (i < persistent or it - i < window)]
                s = np.array([q[b, h, t] @ k[b, h, i] / np.sqrt(dh) for i in seen])
                w = np.exp(s - s.max())
                y[b, h, t] = (w[:, None] * v[b, h, seen]).sum(0) / w.sum()
    return y


def rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def rope(z, pos, base):  # z (B, H, T, dh): interleaved pairs (SPEC.md#primitives)
    dh = z.shape[-1]
    ang = pos[:, None] * base ** (-2.0 * np.arange(dh // 2) / dh)
    c, s_ = np.cos(ang), np.sin(ang)
    out = np.empty_like(z)
    out[..., 0::2] = z[..., 0::2] * c - z[..., 1::2] * s_
    out[..., 1::2] = z[..., 0::2] * s_ + z[..., 1::2] * c
    return out


def with_persistent(a, params, key, Np):
    """x~ = [p] || a (a: (B, n, D); p = params[key] (Np, D))."""
    B, _, D = a.shape
    return np.concatenate([np.broadcast_to(params[key], (B, Np, D)), a], axis=1) if Np else a


def sw_attention(x, params, b, cfg, persistent):
    """The block's attention over x (B, T, D) from a sequence start: the projections, RoPE at positions
    0..T-1, the window of ``cfg.attn_window`` keys (the first ``persistent`` always visible) by loops,
    then Wo. Returns (B, T, D)."""
    B, T, D = x.shape
    H = cfg.n_heads

    def heads(W):
        return (x @ W.T).reshape(B, T, H, D // H).transpose(0, 2, 1, 3)

    pos = np.arange(T, dtype=np.float64)
    q = rope(heads(params[b + "attn.Wq"]), pos, cfg.rope_base)
    k = rope(heads(params[b + "attn.Wk"]), pos, cfg.rope_base)
    v = heads(params[b + "attn.Wv"])
    o = window_oracle(q, k, v, cfg.attn_window, persistent)
    return o.transpose(0, 2, 1, 3).reshape(B, T, D) @ params[b + "attn.Wo"].T


def titans_alone(x, params, b, cfg):
    """The block's Titans layer alone (reference/titans.py, configured from cfg) over x from a fresh state."""
    lp = {key[len(b) + 4:]: w for key, w in params.items() if key.startswith(b + "mem.")}
    lcfg = RT.TitansConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, chunk=cfg.mem_chunk, memory=cfg.mem_kind,
                           hidden=cfg.mem_hidden, eta_max=cfg.mem_eta_max, eps=cfg.norm_eps)
    return RT.titans_forward(x, lp, lcfg)[0]


def memory_read(W, q, cfg):
    """M*(q) written out, per head: a matrix memory M q, or the residual MLP memory q + W1 gelu(W2 q)
    (fast weights W {name: (B, H, ., .)}, q (B, H, n, dh))."""
    from nlref.reference import primitives as P

    assert not cfg.mem_layernorm, "the oracle writes out the memory without its LayerNorm"
    if cfg.mem_kind == "matrix":
        return np.einsum("bhij,bhnj->bhni", W["M"], q)
    hidden = np.einsum("bhmd,bhnd->bhnm", W["W2"], q)
    return q + np.einsum("bhdm,bhnm->bhnd", W["W1"], P.gelu_forward(hidden)[0])


def mac_oracle(a, params, cfg, b="blocks.0."):
    """The MAC mixer from its definition, at a sequence start (SPEC.md#titans-mac): per segment of
    C = attn_window tokens, M_s = the Titans layer's fast weights after every earlier segment's
    outputs (the layer alone over them, from a fresh state; the initial memory for the first);
    h = RMSNorm_h(M_s*(l2(W_q a))) by ``memory_read``; causal attention by loops over
    [p, h_1, a_1, h_2, a_2, ...] at positions 0, 1, ...; y = its outputs at the a_i; then
    o = W_out (RMSNorm_a(y) * sigmoid(RMSNorm_m(M(y)))) with M the Titans layer alone over every y."""
    import dataclasses

    B, T, D = a.shape
    H, C, Np = cfg.n_heads, cfg.attn_window, cfg.mem_persistent
    dh = D // H
    lp = {key[len(b) + 4:]: w for key, w in params.items() if key.startswith(b + "mem.")}
    lcfg = RT.TitansConfig(d_model=D, n_heads=H, chunk=cfg.mem_chunk, memory=cfg.mem_kind,
                           hidden=cfg.mem_hidden, eta_max=cfg.mem_eta_max, eps=cfg.norm_eps)
    names = ("M",) if cfg.mem_kind == "matrix" else ("W1", "W2")
    ys = []
    for s0 in range(0, T, C):
        x = a[:, s0:s0 + C]
        n = x.shape[1]
        if ys:
            state = RT.titans_forward(np.concatenate(ys, axis=1), lp, lcfg)[2]
            W = {m: state[m] for m in names}
        else:
            W = {m: np.broadcast_to(lp["M0" if m == "M" else m + "_0"], (B,) + lp["M0" if m == "M" else m + "_0"].shape)
                 for m in names}
        q = (x @ params[b + "mac.W_q"].T).reshape(B, n, H, dh)
        q = (q / np.sqrt((q * q).sum(-1, keepdims=True) + cfg.norm_eps)).transpose(0, 2, 1, 3)
        h = rms(memory_read(W, q, cfg).transpose(0, 2, 1, 3).reshape(B, n, D), params[b + "mac.norm_h.g"],
                cfg.norm_eps)
        z = np.empty((B, 2 * n, D))
        z[:, 0::2], z[:, 1::2] = h, x
        z = with_persistent(z, params, b + "mac.persist", Np)
        yz = sw_attention(z, params, b, dataclasses.replace(cfg, attn_window=z.shape[1]), 0)
        ys.append(yz[:, Np + 1::2])
    y = np.concatenate(ys, axis=1)
    m = titans_alone(y, params, b, cfg)
    ya = rms(y, params[b + "mac.norm_a.g"], cfg.norm_eps)
    ym = rms(m, params[b + "mac.norm_m.g"], cfg.norm_eps)
    return (ya / (1 + np.exp(-ym))) @ params[b + "mac.W_out"].T
