"""The GPU port's planned einsum (fast/gpu/einsum.py) against np.einsum, and the whole model over
the NumPy namespace with it against the reference. SPEC: SPEC.md#fast-gpu. Runs on every machine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from nlref import config
from nlref.fast.gpu import namespace
from nlref.fast.gpu.einsum import PlannedEinsum
from nlref.reference import model as R


@st.composite
def contractions(draw):
    """Two or three operands over random index sets (batch, kept, contracted, summed-out indices),
    optionally written with "..." and with size-1 broadcast batch dimensions."""
    letters = "abcdefgh"
    n_idx = draw(st.integers(2, 6))
    idx = letters[:n_idx]
    sizes = {c: draw(st.integers(1, 4)) for c in idx}
    n_ops = draw(st.integers(2, 3))
    ops = []
    for _ in range(n_ops):
        chosen = draw(st.lists(st.sampled_from(idx), min_size=1, max_size=n_idx, unique=True))
        ops.append("".join(chosen))
    used = sorted(set("".join(ops)))
    out = "".join(draw(st.permutations([c for c in used if draw(st.booleans())])))
    shapes = []
    for o in ops:
        shape = [sizes[c] for c in o]
        shapes.append(shape)
    subs = ",".join(ops) + "->" + out
    ellipsis = draw(st.booleans()) and n_ops == 2 and out[:1] and all(o[:1] == out[:1] for o in ops)
    if ellipsis:  # the shared leading index becomes "..."
        lead = out[0]
        subs = ",".join("..." + o[1:] for o in ops) + "->..." + out[1:]
        if draw(st.booleans()) and sizes[lead] > 1:  # broadcast it in one operand
            shapes[draw(st.integers(0, 1))][0] = 1
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays = [rng.standard_normal(s) for s in shapes]
    return subs, arrays


@settings(max_examples=200)
@given(contractions())
def test_planned_einsum_equals_numpy_einsum(case):
    subs, arrays = case
    expected = np.einsum(subs, *arrays)
    got = PlannedEinsum(np)(subs, *arrays)
    assert got.dtype == expected.dtype
    assert_close(got, expected, "float64", "rewrite", name=subs)


def test_plans_cover_the_reference_contractions_and_fall_back_otherwise():
    E = PlannedEinsum(np)
    a = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    np.testing.assert_allclose(E("bhkk->bh", a), np.einsum("bhkk->bh", a))  # a diagonal: native
    assert E.fallbacks == 1
    x, W = np.ones((2, 5, 3), np.float32), np.ones((4, 3), np.float32)
    y = E("...i,oi->...o", x, W, optimize=True)  # optimize is accepted and ignored
    assert y.dtype == np.float32 and y.shape == (2, 5, 4) and E.fallbacks == 1
    assert list(E._plans) == [("...i,oi->...o", (2, 5, 3), (4, 3))]  # one operand: never planned
    b = np.ones((3, 3))
    np.testing.assert_allclose(E("ij,ij->ij", b, b), b * b)  # no contraction: still one product
    np.testing.assert_allclose(E("ii,ij->j", b, b), np.einsum("ii,ij->j", b, b))  # a diagonal: native
    assert E.fallbacks == 2


@pytest.mark.parametrize("name", ["hope-tiny", "titans-tiny", "hope-attention-tiny", "transformer-tiny"])
def test_model_over_numpy_with_planned_einsum_equals_reference(name):
    cfg = dataclasses.replace(config.preset(name), dtype="float64")
    ns = namespace.load("numpy", einsum="planned")
    params = R.init_params(cfg, 3)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 29))
    loss, grads = R.loss_and_grads(params, tokens, cfg)
    loss2, grads2 = ns.model.loss_and_grads(params, tokens, cfg)
    assert_close(loss2, loss, "float64", "rewrite", name="loss")
    for k in grads:
        assert grads2[k].dtype == grads[k].dtype
        assert_close(grads2[k], grads[k], "float64", "rewrite", name=k)
    logits, _ = R.forward(params, tokens, cfg)
    assert_close(ns.model.forward(params, tokens, cfg)[0], logits, "float64", "rewrite", name="logits")
    E = ns.xp.einsum
    assert E.fallbacks < 0.05 * E.calls, (E.fallbacks, E.calls)  # the plans do the work
