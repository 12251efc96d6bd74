"""The PyTorch eager oracle (torch_model.py) vs the reference model, every family (SPEC.md#fast-cpu).

``torch_model`` is written from SPEC.md, never calling the reference's forward or backward; its
gradients come from torch autograd: through the memory writes the inner gradients are built by
``torch.autograd.grad(..., create_graph=True)``, so the outer gradient includes their second
derivatives. In-context CMS is first order by definition (SPEC.md#cms, semantics §5): the oracle
runs the chunk-major pass on *detached* parameters and states, takes each chunk's summed
next-token-loss gradient with respect to the per-sequence level weights by autograd, applies
Eq. (71), and keeps the cumulative increments as ``.detach()``-ed constants; the outer loss is
one whole-sequence pass with weights theta_0 + increments, differentiated by autograd.
``test_first_order_is_the_definition`` shows both halves: the gradient is exact for the frozen
increments and differs from the derivative of the unfrozen forward.

Errors are relative to the tensor's largest entry; a key whose exact gradient is zero (e.g. an
attention ``Wq`` when every query's visible values are equal) is rounding noise in both
implementations (~1e-17), so its scale is floored at 1e-6 of the largest gradient entry.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from fake_clock import use_fake_clock
from hypothesis import given, note
from hypothesis import strategies as st
from tolerances import tol

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs the 'oracle' extra (torch==2.13.0)")

from nlref import bench, config  # noqa: E402
from nlref import torch_model as TM  # noqa: E402
from nlref.reference import model as R  # noqa: E402

FAMILIES = ("transformer", "hope-attention", "titans", "hope")
TOL = tol("float64", "torch_model_oracle")


def _errors(grads_a, grads_b):
    """Per-key relative error, scale floored at 1e-6 of the largest gradient entry."""
    floor = 1e-6 * max(float(np.max(np.abs(g))) for g in grads_b.values())
    out = {}
    for k, b in grads_b.items():
        a = grads_a[k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), floor)
        out[k] = float(np.max(np.abs(a - b))) / scale
    return out


def _compare(cfg, params, tokens, note=lambda msg: None):
    lr, gr = R.loss_and_grads(params, tokens, cfg)
    lt, gt = TM.loss_and_grads(params, tokens, cfg)
    assert set(gt) == set(gr)
    errs = _errors(gt, gr)
    worst = max(errs, key=errs.get)
    note(f"loss rel {abs(lt - lr) / abs(lr):.2e}; worst grad {worst} {errs[worst]:.2e}")
    assert abs(lt - lr) <= TOL * abs(lr), (lt, lr)
    assert errs[worst] <= TOL, (worst, errs[worst])
    return errs


@pytest.mark.parametrize("name,in_context,over", [("transformer-tiny", False, {}), ("hope-attention-tiny", True, {}),
                                                  ("hope-attention-tiny", False, {}), ("titans-tiny", False, {}),
                                                  ("titans-tiny", False, {"mem_layernorm": True}),  # Titans §3.3
                                                  ("hope-tiny", True, {}), ("hope-tiny", False, {})])
def test_tiny_presets_match_reference(name, in_context, over):
    cfg = dataclasses.replace(config.preset(name), cms_in_context=in_context, **over)
    params = R.init_params(cfg, seed=3)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 11))  # 11: periods 2, 4 do not divide
    _compare(cfg, params, tokens)
    logits_t, _ = TM.forward(params, tokens, cfg)
    logits_r, _ = R.forward(params, tokens, cfg)
    assert np.max(np.abs(logits_t - logits_r)) <= TOL * np.max(np.abs(logits_r))


@st.composite
def configs(draw, family):
    H = draw(st.integers(1, 2))
    dh = draw(st.sampled_from([2, 4]))
    kw = dict(name="drawn", family=family, vocab_size=draw(st.integers(3, 12)), d_model=H * dh,
              n_layers=draw(st.integers(1, 2)), n_heads=H, mlp_hidden=draw(st.integers(2, 6)), dtype="float64",
              init_std=0.3, mem_chunk=draw(st.integers(1, 3)), mem_chunk_other=draw(st.integers(1, 3)),
              mem_kind=draw(st.sampled_from(["matrix", "mlp"])), mem_hidden=draw(st.integers(2, 4)),
              mem_eta_max=draw(st.sampled_from([0.1, 1.0])))  # 1.0: writes that matter
    if family in ("hope", "hope-attention"):
        c = draw(st.integers(1, 3))
        levels = tuple(config.CMSLevel(hidden=draw(st.integers(2, 5)), period=draw(st.sampled_from([None, c, 2 * c])),
                                       eta=draw(st.sampled_from([0.0, 0.05, 0.2])))
                       for _ in range(draw(st.integers(1, 3))))
        kw.update(cms_levels=levels, cms_variant=draw(st.sampled_from(["sequential", "independent"])),
                  cms_activation=draw(st.sampled_from(["gelu", "silu"])), cms_in_context=draw(st.booleans()))
    if family == "titans" and kw["mem_kind"] == "mlp":
        kw.update(mem_layernorm=draw(st.booleans()))  # Titans §3.3's z + LN(W1 s(W2 z)) (SPEC.md#titans)
    return config.ModelConfig(**kw)


@pytest.mark.parametrize("family", FAMILIES)
@given(data=st.data())
def test_random_configs_match_reference(family, data):
    """Matrix/MLP memories, momentum (always on in the model), chunk sizes and CMS periods that do
    not divide T, in-context CMS on and off, both CMS variants and activations, float64."""
    cfg = data.draw(configs(family))
    B, T = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 9))
    seed = data.draw(st.integers(0, 1000))
    note(repr(cfg))
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))
    _compare(cfg, R.init_params(cfg, seed), tokens, note)


@pytest.mark.parametrize("name", ["hope-attention-tiny", "hope-tiny"])
def test_in_context_increments_match_reference(name):
    cfg = config.preset(name)
    params = R.init_params(cfg, seed=5)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 9))
    it, ir = TM.cms_increments(params, tokens, cfg), R.cms_increments(params, tokens, cfg)
    assert set(it) == set(ir) and ir
    for k in ir:
        assert it[k].shape == ir[k].shape
        assert np.max(np.abs(it[k] - ir[k])) <= TOL * np.max(np.abs(ir[k])), k
    assert max(np.max(np.abs(v)) for v in ir.values()) > 1e-4  # the writes are not trivially zero


def test_first_order_is_the_definition():
    """The oracle's gradient is the exact derivative of the loss with the increments frozen
    (central differences of torch's own forward along a random direction), and measurably not the
    derivative of the forward that recomputes them (the O(eta) first-order gap of SPEC.md#cms)."""
    cfg = config.preset("hope-attention-tiny")
    params = R.init_params(cfg, seed=2)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 9))
    _, g = TM.loss_and_grads(params, tokens, cfg)
    rng = np.random.default_rng(0)
    v = {k: rng.standard_normal(p.shape) for k, p in params.items()}
    inc = {k: torch.tensor(a) for k, a in TM.cms_increments(params, tokens, cfg).items()}
    tok = torch.tensor(tokens)

    def frozen(e):
        P = TM.init_from_params({k: params[k] + e * v[k] for k in params}, cfg)
        with torch.no_grad():
            return float(TM._loss(P, cfg, tok, inc))

    def unfrozen(e):
        return TM.loss_and_grads({k: params[k] + e * v[k] for k in params}, tokens, cfg)[0]

    e = 1e-5
    dot = sum(float(np.sum(g[k] * v[k])) for k in params)
    fd_frozen = (frozen(e) - frozen(-e)) / (2 * e)
    fd_full = (unfrozen(e) - unfrozen(-e)) / (2 * e)
    assert abs(fd_frozen - dot) <= tol("float64", "gradcheck") * abs(dot)
    assert abs(fd_full - dot) > 100 * tol("float64", "gradcheck") * abs(dot)


def test_streaming_equals_one_call():
    cfg = config.preset("hope-tiny")
    params = R.init_params(cfg, seed=4)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 9))
    one, _ = TM.forward(params, tokens, cfg)
    a, state = TM.forward(params, tokens[:, :3], cfg)
    b, state = TM.forward(params, tokens[:, 3:4], cfg, state)
    c, _ = TM.forward(params, tokens[:, 4:], cfg, state)
    np.testing.assert_allclose(np.concatenate([a, b, c], axis=1), one, rtol=0, atol=1e-12)
    np.testing.assert_allclose(one, R.forward(params, tokens, cfg)[0], rtol=0, atol=1e-12)


def test_float32_in_float32_out():
    cfg = dataclasses.replace(config.preset("titans-tiny"), dtype="float32")
    params = R.init_params(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 6))
    loss, grads = TM.loss_and_grads(params, tokens, cfg)
    _, g64 = TM.loss_and_grads(params, tokens, dataclasses.replace(cfg, dtype="float64"))
    assert all(g.dtype == np.float32 for g in grads.values())
    errs = _errors({k: g.astype(np.float64) for k, g in grads.items()}, g64)
    assert max(errs.values()) < tol("float32", "port")


def test_inputs_are_not_mutated():
    cfg = config.preset("hope-tiny")
    params = R.init_params(cfg, seed=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 5))
    ro = {k: v.copy() for k, v in params.items()}
    for v in ro.values():
        v.setflags(write=False)
    tokens.setflags(write=False)
    _, grads = TM.loss_and_grads(ro, tokens, cfg)
    TM.forward(ro, tokens, cfg)
    for k in params:
        np.testing.assert_array_equal(ro[k], params[k])
        assert not np.shares_memory(grads[k], ro[k])


def test_bad_input_raises_value_error_naming_the_argument():
    cfg = config.preset("transformer-tiny")
    params = R.init_params(cfg, seed=0)
    tokens = np.zeros((1, 4), dtype=np.int64)
    bad = dict(params)
    del bad["head.W"]
    with pytest.raises(ValueError, match=r"params\['head.W'\].*\(11, 8\)"):
        TM.loss_and_grads(bad, tokens, cfg)
    with pytest.raises(ValueError, match=r"params\['embed.E'\] must have shape \(11, 8\)"):
        TM.loss_and_grads(params | {"embed.E": np.zeros((11, 9))}, tokens, cfg)
    with pytest.raises(ValueError, match=r"tokens must be an integer array of shape \(B, T\)"):
        TM.loss_and_grads(params, tokens.astype(float), cfg)
    with pytest.raises(ValueError, match=r"tokens must lie in the vocabulary \[0, 11\)"):
        TM.forward(params, tokens + 11, cfg)
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T\) with B >= 1 and T >= 2"):
        TM.loss_and_grads(params, tokens[:, :1], cfg)
    with pytest.raises(ValueError, match="cfg must be a ModelConfig"):
        TM.loss_and_grads(params, tokens, "transformer-tiny")
    with pytest.raises(ValueError, match="state must be the dict returned by torch_model.forward"):
        TM.forward(params, tokens, cfg, state={"batch": 2})


def test_import_without_torch_names_the_oracle_extra():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import nlref.torch_model\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert "'oracle' extra" in out.stdout and "torch" in out.stdout


def test_package_never_imports_torch_model_at_module_level():
    code = ("import sys, nlref, nlref.cli, nlref.bench, nlref.fast.model\n"
            "import nlref.reference.model\n"
            "print('nlref.torch_model' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bench_torch_backend_times_a_step_and_decode(monkeypatch):
    use_fake_clock(monkeypatch)  # the decode is measured, not skipped, however slow the machine (test_bench.py)
    rows = bench.run(presets=("titans-tiny",), backends=("reference", "torch"), batch_size=1, seq_len=6, repeats=1,
                     decode_contexts=(4,), decode_tokens=1, echo=lambda *a: None)
    row = rows[1]
    assert row["backend"] == "torch" and row["tokens_per_s"] > 0 and row["vs_reference"] > 0
    assert row["decode_s_per_token"]["4"] > 0
