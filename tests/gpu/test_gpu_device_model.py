"""The whole model on the GPU (fast/gpu/model.py) vs the reference, every family (SPEC.md#fast-gpu).

The CPU port's model property test (tests/cpu/test_cpu_model.py: its config strategy,
tests/strategies.py's model_configs, is shared) run against backend "gpu", float32 and float64:
the loss, every gradient, the logits and state of a one-call forward, a two-call stream (= the one
call), a GPU state continued on the reference, the in-context CMS increments and the loss with
them frozen. A 10-step AdamW trajectory keeps
parameters and optimizer state on the device (``optimizers()`` over the device namespace, gradients
with ``as_numpy=False``) and agrees with the reference's. Results are NumPy by default and device
arrays with ``as_numpy=False``; ``fast.model`` dispatches ``device="gpu"`` here. Tolerances: the
("float32" | "float64", "gpu") rows; every error is recorded in $NL_GPU_ERRORS.

Skipped without CuPy and a CUDA device (NL_REQUIRE_GPU=1: an error instead);
NL_GPU_TESTS_ON_NUMPY=1 runs it on NumPy to check the tests themselves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gpu_helpers import check_close, check_tree, require_gpu
from hypothesis import given, note, settings
from hypothesis import strategies as st
from strategies import FAMILIES, model_configs
from tolerances import tol

from nlref import config
from nlref.fast import model as fast_model
from nlref.fast.gpu import model as G
from nlref.reference import model as R
from nlref.reference import optimizers as RO

pytestmark = pytest.mark.gpu
DEVICE = require_gpu()


def _check_grads(gg, gr, dtype):
    """Every gradient: per key in float64; in float32 on the scale of the whole gradient (as
    test_cpu_model._assert_grads_close: a key whose exact gradient is 0 is rounding noise)."""
    assert list(gg) == list(gr)
    whole = max(float(np.max(np.abs(g))) for g in gr.values() if g.size)
    for k in gr:
        assert isinstance(gg[k], np.ndarray) and gg[k].dtype == gr[k].dtype == np.dtype(dtype), k
        if dtype == "float64":
            check_close(gg[k], gr[k], dtype, f"grad {k}")
        else:
            check_close(gg[k], gr[k], dtype, f"grad {k} (on the whole gradient's scale)", scale=whole)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8)
@given(data=st.data())
def test_model_matches_reference(family, data):
    cfg = data.draw(model_configs(family))
    seed = data.draw(st.integers(0, 2**20))
    B, T = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 9))
    split = data.draw(st.integers(1, T - 1))
    note(f"{cfg} B={B} T={T} split={split}")
    dtype = cfg.dtype
    params = R.init_params(cfg, seed)
    before = {k: v.copy() for k, v in params.items()}
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))

    lg, gg = G.loss_and_grads(params, tokens, cfg)
    lr, gr = R.loss_and_grads(params, tokens, cfg)
    assert isinstance(lg, float)
    check_close(lg, lr, dtype, "loss")
    _check_grads(gg, gr, dtype)

    yg, sg = G.forward(params, tokens, cfg)
    yr, sr = R.forward(params, tokens, cfg)
    check_tree(yg, yr, dtype, "logits")
    check_tree(sg, sr, dtype, "state")
    y1, s1 = G.forward(params, tokens[:, :split], cfg)
    y2, _ = G.forward(params, tokens[:, split:], cfg, s1)
    check_close(np.concatenate([y1, y2], axis=1), yr, dtype, "streamed logits", same_call=False)
    y2r, _ = R.forward(params, tokens[:, split:], cfg, s1)  # a GPU state continues on the reference
    check_close(y2r, yr[:, split:], dtype, "gpu state on the reference", same_call=False)
    for k, v in params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_in_context_increments_and_frozen_loss_match(dtype, rng):
    cfg = dataclasses.replace(config.preset("hope-attention-tiny"), dtype=dtype)
    params = R.init_params(cfg, 5)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 9))
    ig, ir = G.cms_increments(params, tokens, cfg), R.cms_increments(params, tokens, cfg)
    assert ir and any(np.any(v != 0) for v in ir.values())
    check_tree(ig, ir, dtype, "increments")
    check_close(G.loss_with_increments(params, tokens, cfg, ir), R.loss_with_increments(params, tokens, cfg, ir),
                dtype, "loss with increments")  # fmt: skip


def _is_device(a) -> bool:
    return isinstance(a, G.xp().ndarray) and (G.xp() is np or not isinstance(a, np.ndarray))


@pytest.mark.parametrize("name", ["hope-attention-tiny", "transformer-tiny"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ten_step_adamw_trajectory_on_the_device(name, dtype):
    """10 AdamW steps with parameters and optimizer state on the device agree with the reference's."""
    cfg = dataclasses.replace(config.preset(name), dtype=dtype)
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 2, 8))[np.arange(10) % 2]
    opt_r = RO.make("adamw", lr=1e-2)
    opt_g = G.optimizers().make("adamw", lr=1e-2)
    pr = R.init_params(cfg, 0)
    sr = opt_r.init(pr)
    pg = G.to_device(pr)
    sg = opt_g.init(pg)
    losses_r, losses_g = [], []
    for step in range(10):
        loss, grads = R.loss_and_grads(pr, data[step], cfg)
        losses_r.append(loss)
        pr, sr = opt_r.update(pr, grads, sr)
        loss, grads = G.loss_and_grads(pg, data[step], cfg, as_numpy=False)
        assert all(_is_device(g) for g in grads.values())
        losses_g.append(loss)
        pg, sg = opt_g.update(pg, grads, sg)
        assert all(_is_device(v) for v in pg.values()), f"step {step}: a parameter left the device"
    assert losses_r[-1] < losses_r[0]
    check_close(np.array(losses_g), np.array(losses_r), dtype, "losses")
    check_tree(G.to_host(pg), pr, dtype, "params")
    check_tree(G.to_host(sg), sr, dtype, "optimizer state")


def test_results_are_numpy_by_default_and_device_arrays_on_request(rng):
    cfg = config.preset("hope-tiny")
    params = R.init_params(cfg, 2)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 6))
    _, grads = G.loss_and_grads(params, tokens, cfg)
    logits, state = G.forward(params, tokens, cfg)
    host = [*grads.values(), logits, *G.cms_increments(params, tokens, cfg).values()]
    assert all(type(a) is np.ndarray for a in host)
    _, grads = G.loss_and_grads(G.to_device(params), G.to_device(tokens), cfg, as_numpy=False)
    logits, state = G.forward(params, tokens, cfg, as_numpy=False)
    assert all(_is_device(a) for a in [*grads.values(), logits])
    # a device state continues a stream, and to_host gives NumPy arrays
    logits2, _ = G.forward(params, tokens[:, :2], cfg, state, as_numpy=False)
    assert _is_device(logits2) and type(G.to_host(logits2)) is np.ndarray
    fresh = G.init_state(params, cfg, 2, as_numpy=False)
    assert not any(type(v) is np.ndarray and G.xp() is not np for v in fresh.values() if hasattr(v, "shape"))
    G.synchronize()


def test_fast_model_dispatches_device_gpu(rng):
    cfg = config.preset("transformer-tiny")
    params = R.init_params(cfg, 1)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, 5))
    loss, grads = fast_model.loss_and_grads(params, tokens, cfg, device="gpu")
    lr, gr = R.loss_and_grads(params, tokens, cfg)
    check_close(loss, lr, "float64", "loss")
    assert set(grads) == set(gr)
    logits, state = fast_model.forward(params, tokens, cfg, device="gpu")
    assert type(logits) is np.ndarray and logits.shape == (1, 5, cfg.vocab_size) and state["pos"] == 5
    assert tol("float64", "gpu") > 0
