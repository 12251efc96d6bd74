"""The Titans "memory as a gate" family (MAG, Titans §4.2) and its sliding-window attention.

SPEC.md#primitives (the window). The primitive: the sliding window with persistent keys (Titans' SW-Attn*)
against its mask written out, its float64 gradient check (central differences, dot product and the
complex step), the reduction to plain causal attention when the window covers every key, and the
CPU port's kernel equal to the reference.
"""

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref.fast.cpu import primitives as FP
from nlref.reference import primitives as P
from nlref.reference.cases import primitives as P_cases
from nlref.reference.gradcheck import check_gradients, numerical_gradient, rel_error

# ---------------------------------------------------------------------------------------------
# The sliding-window attention primitive (SW-Attn*)
# ---------------------------------------------------------------------------------------------


def _qkv(rng, b=2, h=2, tq=5, tk=7, dh=3, dv=2, dtype=np.float64):
    return tuple(rng.standard_normal(s).astype(dtype) for s in ((b, h, tq, dh), (b, h, tk, dh), (b, h, tk, dv)))


def _window_oracle(q, k, v, window, persistent):
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


@given(seed=st.integers(0, 2**16), tq=st.integers(1, 6), extra=st.integers(0, 4), window=st.integers(1, 8),
       data=st.data())
def test_window_attention_matches_its_mask_written_out(seed, tq, extra, window, data):
    q, k, v = _qkv(np.random.default_rng(seed), tq=tq, tk=tq + extra)
    persistent = data.draw(st.integers(0, tq + extra), label="persistent")
    y, _ = P.attention_forward(q, k, v, window=window, persistent=persistent)
    assert_close(y, _window_oracle(q, k, v, window, persistent), "float64", "rewrite", "SW-Attn*")


@given(seed=st.integers(0, 2**16), tq=st.integers(1, 6), extra=st.integers(0, 3), over=st.integers(0, 3),
       data=st.data())
def test_window_covering_every_key_is_plain_causal_attention(seed, tq, extra, over, data):
    """The reduction: a window of T_k keys or more is causal attention (any persistent count), bit for
    bit; and a window hides exactly the keys it should (changing a hidden key changes nothing)."""
    q, k, v = _qkv(np.random.default_rng(seed), tq=tq, tk=tq + extra)
    Tk = tq + extra
    persistent = data.draw(st.integers(0, Tk), label="persistent")
    plain, _ = P.attention_forward(q, k, v)
    y, _ = P.attention_forward(q, k, v, window=Tk + over, persistent=persistent)
    np.testing.assert_array_equal(y, plain)
    if Tk >= 3:  # window 1, no persistent key: every query reads its own value
        y1, _ = P.attention_forward(q, k, v, window=1)
        np.testing.assert_array_equal(y1, v[:, :, Tk - tq:])
        mask = P.attention_mask(tq, Tk, 2, 1)
        hidden = [i for i in range(Tk) if not mask[:, i].any()]
        v2 = v.copy()
        v2[:, :, hidden] += 1.0
        np.testing.assert_array_equal(P.attention_forward(q, k, v2, window=2, persistent=1)[0],
                                      P.attention_forward(q, k, v, window=2, persistent=1)[0])


@given(seed=st.integers(0, 2**16), data=st.data())
def test_window_attention_gradients(seed, data):
    """float64: central differences and the dot-product test, and the complex step (exact to
    rounding), of the registered case at drawn sizes (what ``nested-learning check`` runs)."""
    tq = data.draw(st.integers(1, 4), label="tq")
    tk = tq + data.draw(st.integers(0, 3), label="extra")
    sizes = dict(b=data.draw(st.integers(1, 2)), tq=tq, tk=tk, window=data.draw(st.integers(1, 4), label="window"),
                 persistent=data.draw(st.integers(0, tk), label="persistent"))
    loss, inputs, grads = P_cases.GRADCHECKS["primitives.attention_window"](np.random.default_rng(seed), **sizes)
    errors = check_gradients(loss, inputs, grads, np.random.default_rng(seed + 1))
    note(f"errors {errors}")
    assert max(errors.values()) <= tol("float64", "gradcheck"), errors
    exact = numerical_gradient(loss, inputs, keys=list(grads), method="complex")
    cs = {k: rel_error(np.asarray(grads[k]), exact[k]) for k in grads}
    assert max(cs.values()) <= tol("float64", "complex_step"), cs


def test_window_attention_bad_arguments():
    q, k, v = _qkv(np.random.default_rng(0))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="window must be None or an int >= 1"):
            P.attention_forward(q, k, v, window=bad)
    with pytest.raises(ValueError, match="window needs causal=True"):
        P.attention_forward(q, k, v, causal=False, window=2)
    with pytest.raises(ValueError, match=r"persistent must be an int in \[0, T_k\]"):
        P.attention_forward(q, k, v, window=2, persistent=8)
    with pytest.raises(ValueError, match="window must be None"):
        FP.attention_forward(q, k, v, window=0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(seed=st.integers(0, 2**16), tq=st.integers(1, 6), extra=st.integers(0, 4), window=st.integers(1, 8),
       data=st.data())
def test_cpu_port_window_attention_matches_reference(dtype, seed, tq, extra, window, data):
    """fast/cpu's compiled masked softmax (no reference fallback) = the reference, forward and backward."""
    q, k, v = _qkv(np.random.default_rng(seed), tq=tq, tk=tq + extra, dtype=np.dtype(dtype))
    persistent = data.draw(st.integers(0, tq + extra), label="persistent")
    before = dict(FP.FALLBACKS)
    yf, cf = FP.attention_forward(q, k, v, window=window, persistent=persistent)
    yr, cr = P.attention_forward(q, k, v, window=window, persistent=persistent)
    assert yf.dtype == np.dtype(dtype)
    assert_close(yf, yr, dtype, "port", "y")
    dy = np.random.default_rng(seed + 1).standard_normal(yr.shape).astype(dtype)
    for name, gf, gr in zip("qkv", FP.attention_backward(dy, cf), P.attention_backward(dy, cr), strict=True):
        assert_close(gf, gr, dtype, "port", f"d{name}")
    assert FP.FALLBACKS == before
