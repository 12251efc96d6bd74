"""The fast model API: the reference model's ``loss_and_grads`` and ``forward`` on a compiled backend.

SPEC: SPEC.md#fast-cpu, SPEC.md#fast-gpu, SPEC.md#public-api, SPEC.md#backends. ``device="cpu"`` runs
``fast/cpu/model.py`` (Numba + BLAS); ``device="gpu"`` runs ``fast/gpu/model.py`` (the reference's
code over CuPy; NumPy in and out here). The functions compute the same values as
``reference/model.py`` (within the ("float32" | "float64", "port" | "gpu") rows of
tests/tolerances.py) with the same arguments and return structures. Numba and CuPy are imported
only when a function of their device is first called, never by ``import nlref.fast.model``.

    from nlref.fast import model
    loss, grads = model.loss_and_grads(params, tokens, cfg, device="cpu")
    logits, state = model.forward(params, tokens, cfg, state=None, device="cpu")
"""

from __future__ import annotations

from .. import backends

DEVICES = backends.PORTS  # the compiled ports (backends.py names the backends once)


def _backend(device: str):
    """The model module of the port ``device`` (imported now; a ValueError naming the choices)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    return backends.get(device).model


def init_params(cfg, seed: int = 0, device: str = "cpu"):
    """The reference's initial parameters (identical on every device: drawn on the host)."""
    return _backend(device).init_params(cfg, seed)


def loss_and_grads(params, tokens, cfg, device: str = "cpu"):
    """Mean next-token loss on tokens[:, 1:] and its gradient (the keys of ``params``)."""
    return _backend(device).loss_and_grads(params, tokens, cfg)


def forward(params, tokens, cfg, state=None, device: str = "cpu"):
    """Logits (B, T, V) and the state that continues the sequences (pass it back to continue)."""
    return _backend(device).forward(params, tokens, cfg, state)
