"""A ``torch.nn.Module`` around torch_model.py: the model's parameters as ``nn.Parameter``s, the
checkpoint's keys as its ``state_dict`` keys, and torch_model's forward as its ``forward``.

Paper: §7-§8.3 (the models), arXiv 2512.24695v1. SPEC: SPEC.md#python-api (this module),
SPEC.md#weights (the file ``load_safetensors`` reads), SPEC.md#fast-cpu ("PyTorch eager oracle":
the function torch_model.py computes, the same as every backend's).

    from nlref.torch_module import NestedLearningModule
    net = NestedLearningModule.from_safetensors("tiny.safetensors")   # nested-learning export ... --weights-only
    logits = net(torch.tensor([[104, 105]]))                          # (B, T, V)
    sorted(net.state_dict())[:2]                                      # ['blocks.0.attn.Wk', 'blocks.0.attn.Wo']

No model is written here: ``forward`` is ``torch_model.forward_tensors`` (the chunk-major pass,
in-context CMS writes included, without autograd, as every backend's forward), ``loss`` is the
differentiable training loss of ``torch_model.Trainer.step`` (the in-context CMS increments as
constants, then one whole-sequence pass; SPEC.md#cms). A parameter key ``blocks.0.attn.Wq`` is
the parameter ``Wq`` of the submodule ``blocks.0.attn`` (plain ``nn.Module`` containers), so
``state_dict()`` keys, ``named_parameters()`` names and the weights file's tensor names coincide,
and ``load_state_dict(safetensors.torch.load_file(path))`` works as well.

torch_model.py computes the families ``FAMILIES`` in their default configuration; for any other
(the linear-attention families, nested CMS, a self-modifying layer with an ablation switch that
changes its forward) the constructor raises ``NotImplementedError`` naming it.
"""

from __future__ import annotations

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised where torch is missing
    raise ImportError(
        "nlref.torch_module needs PyTorch, which is not installed: install the 'oracle' extra "
        "(pip install 'nested-learning-reference[oracle]', which pins torch==2.13.0)"
    ) from exc

from nlref import torch_model as TM
from nlref.config import ModelConfig
from nlref.reference.config import SELFMOD_SWITCHES

FAMILIES = ("transformer", "hope-attention", "titans", "hope")
"""The families torch_model.py computes (its block: attention, the Titans layer, the self-modifying layer)."""
FORWARD_SWITCHES = tuple(k for k in SELFMOD_SWITCHES if k != "mem_stop_grad_writes")
"""The self-modifying layer's switches that change its forward; torch_model.py computes their
defaults only (``mem_stop_grad_writes`` changes the gradient alone)."""


def unsupported(cfg: ModelConfig) -> str | None:
    """Why torch_model.py does not compute ``cfg`` (None: it does)."""
    if cfg.family not in FAMILIES:
        return (f"config {cfg.name!r}: torch_model.py does not compute the {cfg.family!r} family (it computes "
                f"{', '.join(FAMILIES)}); use nlref.Model with backend 'cpu' or 'reference'")
    if cfg.cms_nested:
        return (f"config {cfg.name!r}: torch_model.py does not compute nested CMS (cms_nested, Eq. 72); use "
                "nlref.Model with backend 'cpu' or 'reference'")
    changed = [f"{k}={getattr(cfg, k)}" for k in FORWARD_SWITCHES if getattr(cfg, k) != SELFMOD_SWITCHES[k]]
    if changed:
        return (f"config {cfg.name!r}: torch_model.py computes the self-modifying layer with its default switches "
                f"only, not {', '.join(changed)}; use nlref.Model with backend 'cpu' or 'reference'")
    return None


class NestedLearningModule(nn.Module):
    """The model of ``config`` (a ModelConfig) as a ``torch.nn.Module``; ``params`` (NumPy arrays
    under the keys of ``reference.model.param_shapes``) default to ``init_params(config, seed)``."""

    def __init__(self, config: ModelConfig, params: dict | None = None, seed: int = 0):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig (nlref.config.preset(name), Model.config), got "
                            f"{type(config).__name__}")
        reason = unsupported(config)
        if reason:
            raise NotImplementedError(reason)
        self.config = config
        tensors = TM.init_from_params(TM.init_params(config, seed) if params is None else params, config,
                                      device="cpu")  # keys, shapes and dtypes checked there
        for key, t in tensors.items():
            *path, name = key.split(".")
            owner = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            owner.register_parameter(name, nn.Parameter(t))

    # -- weights files (SPEC.md#weights) --------------------------------------------------------

    @classmethod
    def from_safetensors(cls, path) -> NestedLearningModule:
        """A module with the config and the weights of a weights file (``nested-learning export``)."""
        from nlref import api

        params, cfg, _ = api.load_weights(path)
        return cls(cfg, params)

    def load_safetensors(self, path) -> NestedLearningModule:
        """Copy a weights file's parameters into this module (same config; ``CheckpointError``
        naming the fields that differ otherwise); returns the module."""
        from nlref import api, checkpoint

        params, cfg, _ = api.load_weights(path)
        checkpoint.check_same_model(cfg.to_dict(), self.config.to_dict(), path)
        with torch.no_grad():
            for key, p in self.named_parameters():
                p.copy_(torch.from_numpy(params[key]))
        return self

    def save_safetensors(self, path, overwrite: bool = False):
        """Write this module's parameters as a weights file (``api.save_weights``); returns its path."""
        from nlref import api

        return api.save_weights(path, self.numpy_params(), self.config, overwrite=overwrite,
                                source={"torch_module": True})

    def numpy_params(self) -> dict:
        """The parameters as NumPy arrays under their keys (``nlref.Model(module.config, ...)`` takes them)."""
        return {k: p.detach().cpu().numpy() for k, p in self.named_parameters()}

    # -- computing ------------------------------------------------------------------------------

    def _inputs(self, tokens):
        P = dict(self.named_parameters())
        want = getattr(torch, self.config.dtype)
        bad = sorted({str(p.dtype) for p in P.values() if p.dtype != want})
        if bad:
            raise ValueError(f"the parameters are {', '.join(bad)} but config {self.config.name!r} computes in "
                             f"{self.config.dtype}; build the module from dataclasses.replace(config, dtype=...)")
        device = P["embed.E"].device
        tok = torch.as_tensor(tokens, device=device)
        squeeze = tok.ndim == 1
        tok = tok[None] if squeeze else tok
        if tok.dtype.is_floating_point or tok.dtype.is_complex or tok.dtype == torch.bool:
            raise ValueError(f"tokens must be integers of shape (B, T) or (T,), got dtype {tok.dtype}")
        if tok.ndim != 2 or tok.shape[0] < 1 or tok.shape[1] < 1:
            raise ValueError(f"tokens must have shape (B, T) or (T,) with B, T >= 1, got {tuple(tok.shape)}")
        lo, hi = int(tok.min()), int(tok.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"tokens must lie in [0, {self.config.vocab_size}), got [{lo}, {hi}]")
        return P, tok.to(torch.int64), squeeze

    def forward(self, tokens) -> torch.Tensor:
        """Next-token logits (B, T, V) of ``tokens`` (B, T) ((T, V) for (T,)) read from a fresh state,
        on the parameters' device (``torch_model.forward_tensors``; no autograd: ``loss`` is the
        differentiable training loss)."""
        logits, _ = self.stream(tokens)
        return logits

    def stream(self, tokens, state=None):
        """``(logits, state)``: ``tokens`` read as the continuation of ``state`` (None: fresh
        sequences); one call on a sequence equals chained calls on its pieces (SPEC.md#hope)."""
        P, tok, squeeze = self._inputs(tokens)
        if state is not None and (not isinstance(state, dict) or state.get("batch") != tok.shape[0]):
            raise ValueError(f"state must be the one stream returned for a batch of {tok.shape[0]}")
        logits, state = TM.forward_tensors(P, tok, self.config, state)
        return (logits[0] if squeeze else logits), state

    def loss(self, tokens) -> torch.Tensor:
        """The mean next-token cross-entropy of ``tokens`` (B, T >= 2) as ``loss_and_grads`` defines
        it, differentiable with respect to the parameters (as ``torch_model.Trainer.step``)."""
        P, tok, _ = self._inputs(tokens)
        if tok.shape[1] < 2:
            raise ValueError(f"a loss needs T >= 2 tokens per sequence, got {tok.shape[1]}")
        return TM._loss(P, self.config, tok, TM._increments(P, self.config, tok))


__all__ = ["FAMILIES", "FORWARD_SWITCHES", "NestedLearningModule", "unsupported"]
