"""Nested CMS (Eq. 72, SPEC.md#cms "Nested CMS"): a slower in-context level meta-learns a faster
one's initial state and restarts it from there at its own chunk ends.

Checked by reductions the paper's definition gives (a child that never writes itself is a level
with its parent's period and rate; a frozen parent restarts the child from the outer parameter),
streaming at any split, the first-order gradient against central differences, and the CPU port."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from model_checks import spot_check

from nlref.reference import config, model
from nlref.reference.config import CMSLevel
from nlref.reference.contract import meta_parents


def _nested(family="hope-attention", eta=(0.05, 0.02), **kw):
    base = config.preset(f"{family}-tiny")
    levels = (CMSLevel(hidden=8, period=2, eta=eta[0]), CMSLevel(hidden=8, period=4, eta=eta[1]),
              CMSLevel(hidden=8, period=None))
    return dataclasses.replace(base, name=f"{family}-tiny-nested", cms_levels=levels, cms_nested=True, **kw)


def _tokens(cfg, B=2, T=13, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


def test_config_refuses_nesting_without_two_in_context_periods():
    base = config.preset("hope-attention-tiny")
    one = (CMSLevel(hidden=8, period=2, eta=0.1), CMSLevel(hidden=8, period=None))
    with pytest.raises(ValueError, match="cms_nested needs at least two CMS levels"):
        dataclasses.replace(base, cms_levels=one, cms_nested=True)
    with pytest.raises(ValueError, match="cms_nested needs at least two CMS levels"):
        dataclasses.replace(base, cms_nested=True, cms_in_context=False)
    odd = (CMSLevel(hidden=8, period=2, eta=0.1), CMSLevel(hidden=8, period=4, eta=0.1),
           CMSLevel(hidden=8, period=6, eta=0.1))
    with pytest.raises(ValueError, match="multiple of the next shorter"):
        dataclasses.replace(base, cms_levels=odd, cms_nested=True)
    assert config.from_dict({**_nested().to_dict()}).cms_nested is True


def test_the_parent_is_the_next_slower_in_context_level():
    assert meta_parents(_nested()) == {0: 1}
    three = dataclasses.replace(_nested(), cms_levels=(CMSLevel(8, 8, 0.1), CMSLevel(8, 2, 0.1),
                                                       CMSLevel(8, 4, 0.1), CMSLevel(8, 4, 0.1)))
    assert meta_parents(three) == {1: 2, 2: 0, 3: 0}  # the first in config order among equal periods
    assert meta_parents(config.preset("hope-tiny")) == {}


@pytest.mark.parametrize("family", ["hope-attention", "hope"])
def test_a_child_that_never_writes_is_a_level_of_its_parents_period_and_rate(family):
    nested = _nested(family, eta=(0.0, 0.03))  # the child's own writes are no-ops
    # the same child as a plain sequential level written every 4 tokens at the parent's rate
    plain = dataclasses.replace(nested, cms_nested=False, cms_levels=(
        CMSLevel(hidden=8, period=4, eta=0.03), CMSLevel(hidden=8, period=4, eta=0.03), CMSLevel(hidden=8, period=None)))
    params = model.init_params(nested, seed=1)
    tokens = _tokens(nested)
    a, sa = model.forward(params, tokens, nested)
    b, sb = model.forward(params, tokens, plain)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    moved = sa["cms"][0]["0.W1"] - params["blocks.0.cms.0.W1"]
    assert np.abs(moved).max() > 1e-6  # the parent really moved the child (through theta_0)
    np.testing.assert_allclose(sa["cms"][0]["0.W1"], sb["cms"][0]["0.W1"], rtol=1e-12, atol=1e-13)


def test_a_frozen_parent_restarts_the_child_from_the_outer_parameter():
    cfg = _nested(eta=(0.05, 0.0))
    params = model.init_params(cfg, seed=2)
    tokens = _tokens(cfg, T=9)
    _, state = model.forward(params, tokens[:, :5], cfg)  # the writes at 4 are done when token 4 came
    np.testing.assert_array_equal(state["cms"][1]["0.W2"], np.broadcast_to(params["blocks.1.cms.0.W2"], (2, 8, 8)))
    _, plain = model.forward(params, tokens[:, :5], dataclasses.replace(cfg, cms_nested=False))
    assert np.abs(plain["cms"][1]["0.W2"] - params["blocks.1.cms.0.W2"]).max() > 1e-6  # sequential keeps it
    _, state = model.forward(params, tokens[:, :7], cfg)  # the child's own write at 6 is back
    assert np.abs(state["cms"][1]["0.W2"] - params["blocks.1.cms.0.W2"]).max() > 1e-6


@pytest.mark.parametrize("family", ["hope-attention", "hope"])
@pytest.mark.parametrize("cuts", [(1,), (4,), (3, 8), (5, 6, 11)])
def test_streaming_equals_one_call(family, cuts):
    cfg = _nested(family)
    params = model.init_params(cfg, seed=3)
    tokens = _tokens(cfg)
    whole, _ = model.forward(params, tokens, cfg)
    parts, state, t0 = [], None, 0
    for t in (*cuts, tokens.shape[1]):
        logits, state = model.forward(params, tokens[:, t0:t], cfg, state)
        parts.append(logits)
        t0 = t
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("family", ["hope-attention", "hope"])
def test_first_order_gradient_against_central_differences(family):
    cfg = _nested(family)
    params = model.init_params(cfg, seed=4)
    tokens = _tokens(cfg, T=10)
    increments = model.cms_increments(params, tokens, cfg)
    loss, grads = model.loss_and_grads(params, tokens, cfg)
    assert loss == pytest.approx(model.loss_with_increments(params, tokens, cfg, increments), rel=1e-13)
    err, worst = spot_check(lambda p: model.loss_with_increments(p, tokens, cfg, increments), params, grads,
                            np.random.default_rng(0), n_spots=2)
    assert err < 1e-6, (err, worst)


def test_the_cpu_port_computes_the_same_function():
    pytest.importorskip("numba")
    from nlref import backends

    cfg = _nested("hope")
    params = model.init_params(cfg, seed=5)
    tokens = _tokens(cfg, T=12)
    loss, grads = model.loss_and_grads(params, tokens, cfg)
    cpu_loss, cpu_grads = backends.get("cpu").model.loss_and_grads(params, tokens, cfg)
    assert cpu_loss == pytest.approx(loss, rel=1e-12)
    for k in grads:
        np.testing.assert_allclose(cpu_grads[k], grads[k], rtol=1e-9, atol=1e-12, err_msg=k)
