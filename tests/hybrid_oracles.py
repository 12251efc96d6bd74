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
