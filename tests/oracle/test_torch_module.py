"""torch_module.NestedLearningModule: torch_model.py's forward as a torch.nn.Module (SPEC.md#python-api).

Its parameters are registered under the checkpoint's keys, its ``forward`` is
``torch_model.forward_tensors`` and must agree with the CPU port's forward within the float32 port
tolerance (the row the torch oracle's float32 test uses), and it reads and writes the weights-only
files of SPEC.md#weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tolerances import assert_close

torch = pytest.importorskip("torch", reason="the torch module needs the 'oracle' extra (torch==2.13.0)")

import nlref  # noqa: E402
from nlref import api, backends, checkpoint, config  # noqa: E402
from nlref import torch_model as TM  # noqa: E402
from nlref.reference import model as ref  # noqa: E402
from nlref.torch_module import FAMILIES, NestedLearningModule  # noqa: E402


def _model(preset, dtype="float32", backend="cpu", seed=0):
    return nlref.Model.from_preset(preset, seed=seed, backend=backend, dtype=dtype)


@pytest.mark.parametrize("preset", ["transformer-tiny", "hope-tiny"])
def test_state_dict_keys_are_the_checkpoint_parameter_keys(preset):
    m = _model(preset, backend="reference")
    net = NestedLearningModule(m.config, m.params)
    shapes = ref.param_shapes(m.config)
    keys = list(net.state_dict())  # grouped by submodule (a module's own parameters first)
    assert len(keys) == len(shapes) and sorted(keys) == sorted(shapes) == sorted(m.params)
    assert [k for k, _ in net.named_parameters()] == keys
    for key, p in net.named_parameters():
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad and tuple(p.shape) == shapes[key]
        assert p.dtype == torch.float32 and np.array_equal(p.detach().numpy(), m.params[key])
    assert dict(net.named_parameters())["blocks.0.norm1.g"] is net.blocks._modules["0"].norm1.g
    fresh = NestedLearningModule(m.config)  # params default to init_params(config, seed=0): the same
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values(), strict=True))
    assert "blocks.0.cms.0.W1" in keys if preset == "hope-tiny" else "blocks.1.mlp.W_down" in keys


@pytest.mark.parametrize("preset", [f"{f}-tiny" for f in FAMILIES])
def test_forward_matches_the_cpu_port(preset):
    m = _model(preset, dtype="float32", backend="cpu")
    net = NestedLearningModule(m.config, m.params)
    tokens = np.random.default_rng(1).integers(0, 256, size=(2, 37))
    want, _ = backends.get("cpu").forward(m.params, tokens, m.config)
    got = net(torch.tensor(tokens))
    assert got.dtype == torch.float32 and tuple(got.shape) == (2, 37, 256) and not got.requires_grad
    assert_close(got.numpy(), want, "float32", "port", f"{preset} logits")
    assert_close(net(tokens[0]).numpy(), want[0], "float32", "port", f"{preset} logits of a 1-D input")
    # streaming: the module's state carries the sequence on, as the ports' does
    first, state = net.stream(tokens[:, :20])
    second, _ = net.stream(tokens[:, 20:], state)
    assert_close(torch.cat([first, second], dim=1).numpy(), want, "float32", "port", f"{preset} streamed logits")


def test_loss_is_differentiable_and_is_torch_models_training_loss():
    cfg = dataclasses.replace(config.preset("hope-attention-tiny"), vocab_size=256, dtype="float64")
    params = ref.init_params(cfg, seed=2)
    tokens = np.random.default_rng(2).integers(0, 256, size=(1, 12))
    net = NestedLearningModule(cfg, params)
    loss = net.loss(torch.tensor(tokens))
    loss.backward()
    want_loss, want_grads = TM.loss_and_grads(params, tokens, cfg)
    assert abs(float(loss.detach()) - want_loss) <= 1e-12 * want_loss
    for key, p in net.named_parameters():
        g = np.zeros(p.shape) if p.grad is None else p.grad.numpy()
        assert np.allclose(g, want_grads[key], rtol=1e-10, atol=1e-14), key


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    m = _model("titans-tiny", dtype="float32", backend="reference", seed=5)
    path = m.save(tmp_path / "titans.safetensors")
    net = NestedLearningModule.from_safetensors(path)
    assert net.config == m.config
    assert all(np.array_equal(net.numpy_params()[k], m.params[k]) for k in m.params)
    other = NestedLearningModule(m.config, seed=9)
    assert not torch.equal(other.embed.E, net.embed.E)
    assert other.load_safetensors(path) is other and torch.equal(other.embed.E, net.embed.E)
    third = NestedLearningModule(m.config, seed=9)
    third.load_state_dict(load_file(str(path)))  # the file's tensor names are a state_dict's keys
    assert all(torch.equal(a, b) for a, b in zip(third.state_dict().values(), net.state_dict().values(), strict=True))
    out = net.save_safetensors(tmp_path / "again.safetensors")
    params, cfg, _ = api.load_weights(out)
    assert cfg == m.config and all(np.array_equal(params[k], m.params[k]) for k in m.params)
    other_cfg = NestedLearningModule(_model("titans-tiny", dtype="float64", backend="reference").config)
    with pytest.raises(checkpoint.CheckpointError, match="another model.*dtype"):
        other_cfg.load_safetensors(path)
    with pytest.raises(ValueError, match="float64 but config"):
        net.double()(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("preset, overrides, named", [
    ("linear-attention-tiny", {}, "'linear-attention' family"),
    ("deltanet-tiny", {}, "'deltanet' family"),
    ("gated-deltanet-tiny", {}, "'gated-deltanet' family"),
    ("hope-small-nested", {}, "nested CMS"),
    ("hope-tiny", {"mem_momentum": False}, "mem_momentum=False"),
    ("hope-tiny", {"mem_adaptive_q": True}, "mem_adaptive_q=True"),
])
def test_configs_torch_model_does_not_compute_raise_not_implemented(preset, overrides, named):
    cfg = dataclasses.replace(config.preset(preset), **overrides)
    with pytest.raises(NotImplementedError, match=named):
        NestedLearningModule(cfg)
    # a switch that changes the gradient alone is computed
    NestedLearningModule(dataclasses.replace(config.preset("hope-tiny"), mem_stop_grad_writes=True))
