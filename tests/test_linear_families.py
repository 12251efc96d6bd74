"""The linear-attention, DeltaNet and Gated DeltaNet layers (reference/linear_layers.py) and families.

SPEC.md#linear-families. The layer: float64 gradient checks of every parameter, the input and the
incoming state; the chunk form equals the token-loop rules of reference/memory.py; streaming.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nested_learning.reference import linear_layers as LL
from nested_learning.reference import memory as MEM
from nested_learning.reference.gradcheck import check_gradients

# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LL.GRADCHECKS))
def test_registered_gradchecks(name, rng):
    loss, inputs, grads = LL.GRADCHECKS[name](rng)
    errors = check_gradients(loss, inputs, grads, rng)
    assert max(errors.values()) <= tol("float64", "gradcheck"), errors


def _layer_oracle(x, params, cfg):
    """The layer written from the definition with memory.py's token loops (not the chunk forms)."""
    B, T, D = x.shape
    H, dh = cfg.n_heads, cfg.head_dim

    def heads(z, norm):
        z = z.reshape(B, T, H, dh)
        if norm:
            z = z / np.sqrt(np.sum(z * z, axis=-1, keepdims=True) + cfg.eps)
        return z.transpose(0, 2, 1, 3).reshape(B * H, T, dh)

    q, k, v = (heads(x @ params["W_" + n].T, n != "v") for n in ("q", "k", "v"))

    def gate(n):
        z = np.einsum("btd,hd->bht", x, params["w_" + n]) + params["b_" + n][None, :, None]
        return (1 / (1 + np.exp(-z))).reshape(B * H, T)

    eta = np.ones((B * H, T)) if cfg.rule == "hebbian" else gate("beta")
    alpha = gate("alpha") if cfg.rule == "gated_delta" else None
    fwd = MEM.hebbian_forward if cfg.rule == "hebbian" else MEM.delta_forward
    o, M_T, _ = fwd(q, k, v, eta, alpha, np.zeros((B * H, dh, dh)))
    o = o.reshape(B, H, T, dh).transpose(0, 2, 1, 3)
    o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + cfg.eps) * params["g_o"]
    return o.reshape(B, T, D) @ params["W_o"].T, M_T.reshape(B, H, dh, dh)


@settings(max_examples=25, deadline=None)
@given(rule=st.sampled_from(LL.RULES), H=st.integers(1, 2), dh=st.integers(1, 3), chunk=st.integers(1, 4),
       B=st.integers(1, 2), T=st.integers(1, 9), cuts=st.lists(st.integers(1, 8), max_size=3, unique=True),
       seed=st.integers(0, 2**16))
def test_layer_equals_token_loop_and_streams(rule, H, dh, chunk, B, T, cuts, seed):
    """The layer (chunk form) equals the token-loop oracle, and chained calls carrying the state
    equal one call at any split points (inside a chunk included)."""
    cfg = LL.LinearLayerConfig(d_model=H * dh, n_heads=H, rule=rule, chunk=chunk)
    rng = np.random.default_rng(seed)
    params = LL.init_params(cfg, rng)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    x = rng.standard_normal((B, T, H * dh))
    y, _, st_ = LL.forward(x, params, cfg)
    y_ref, M_ref = _layer_oracle(x, params, cfg)
    assert_close(y, y_ref, "float64", "rewrite", "layer vs token loop")
    assert_close(st_["M"], M_ref, "float64", "rewrite", "state vs token loop")
    cuts = sorted(c for c in cuts if c < T)
    pieces, s = [], None
    for a, b in zip([0] + cuts, cuts + [T], strict=True):
        yp, _, s = LL.forward(x[:, a:b], params, cfg, s)
        pieces.append(yp)
    assert_close(np.concatenate(pieces, axis=1), y, "float64", "rewrite", "streamed")
    assert_close(s["M"], st_["M"], "float64", "rewrite", "streamed state")


def test_layer_bad_input():
    cfg = LL.LinearLayerConfig(d_model=4, n_heads=2, rule="gated_delta")
    params = LL.init_params(cfg, np.random.default_rng(0))
    x = np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="rule must be one of"):
        LL.LinearLayerConfig(d_model=4, rule="oja")
    with pytest.raises(ValueError, match=r"params\['w_alpha'\]: missing"):
        LL.forward(x, {k: v for k, v in params.items() if k != "w_alpha"}, cfg)
    with pytest.raises(ValueError, match=r"state\['M'\]: expected shape \(1, 2, 2, 2\)"):
        LL.forward(x, params, cfg, {"M": np.zeros((1, 2, 2))})
    with pytest.raises(ValueError, match="x: expected shape"):
        LL.forward(np.zeros((1, 3, 5)), params, cfg)
