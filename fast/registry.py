"""The op table of the backends: op -> (reference, cpu, gpu) import strings.

SPEC: SPEC.md#fast-cpu, SPEC.md#fast-gpu, SPEC.md#backends. A literal table, read by the equivalence tests, the conformance vectors and
``nested-learning bench``: every op the reference defines and where each backend implements it.
An import string is ``"module:attribute"``; ``None`` means the backend has no port of that op
(callers then use the reference explicitly). Nothing here imports numba or cupy: ``load`` imports
the module on demand. The GPU column names the reference's op run on the device through
``fast/gpu/ops.py`` (every op: the GPU port is the reference's code over CuPy).
"""

from __future__ import annotations

import importlib

from .. import backends

_REF = "nlref.reference."
_CPU = "nlref.fast.cpu."
_GPU = "nlref.fast.gpu.ops:"  # + "module.function": the reference's op run on the device

# Ops of reference/primitives.py that fast/cpu/primitives.py compiles (forward and backward).
_PRIMITIVES = ("linear", "embedding", "rmsnorm", "l2norm", "silu", "gelu", "sigmoid", "swiglu", "conv1d",
               "rope", "attention", "cross_entropy")
# Ops whose fast/cpu name exists but forwards to the reference (not on the training path).
_PRIMITIVES_REFERENCE_ONLY = ("layernorm", "softplus", "softmax")

REGISTRY: dict[str, tuple[str, str | None, str | None]] = {
    **{f"primitives.{op}_{d}": (f"{_REF}primitives:{op}_{d}", f"{_CPU}primitives:{op}_{d}", f"{_GPU}primitives.{op}_{d}")
       for op in _PRIMITIVES for d in ("forward", "backward")},
    **{f"primitives.{op}_{d}": (f"{_REF}primitives:{op}_{d}", None, f"{_GPU}primitives.{op}_{d}")
       for op in _PRIMITIVES_REFERENCE_ONLY for d in ("forward", "backward")},
    "cms.level_forward": (f"{_REF}cms:level_forward", f"{_CPU}cms:level_forward", f"{_GPU}cms.level_forward"),
    "cms.level_backward": (f"{_REF}cms:level_backward", f"{_CPU}cms:level_backward", f"{_GPU}cms.level_backward"),
    "cms.forward": (f"{_REF}cms:forward", f"{_CPU}cms:forward", f"{_GPU}cms.forward"),
    "cms.backward": (f"{_REF}cms:backward", f"{_CPU}cms:backward", f"{_GPU}cms.backward"),
    # The MLP / matrix memory (fast/cpu/mlp_memory.py).
    **{f"mlp_memory.{op}": (f"{_REF}mlp_memory:{op}", f"{_CPU}mlp_memory:{op}", f"{_GPU}mlp_memory.{op}")
       for op in ("mlp_memory_forward", "mlp_memory_backward", "inner_loss", "inner_grad", "inner_grad_dense",
                  "inner_grad_backward", "matrix_memory_forward", "matrix_memory_backward", "matrix_inner_loss",
                  "matrix_inner_grad", "matrix_inner_grad_dense", "matrix_inner_grad_backward")},
    # The sequence-memory layers (fast/cpu/titans.py, selfmod.py; None until a port lands, and the
    # CPU model then uses the reference layer explicitly: fast/cpu/model.py PORTED_LAYERS).
    "titans.titans_forward": (f"{_REF}titans:titans_forward", f"{_CPU}titans:titans_forward", f"{_GPU}titans.titans_forward"),
    "titans.titans_backward": (f"{_REF}titans:titans_backward", f"{_CPU}titans:titans_backward", f"{_GPU}titans.titans_backward"),
    "selfmod.forward": (f"{_REF}selfmod:forward", f"{_CPU}selfmod:forward", f"{_GPU}selfmod.forward"),
    "selfmod.backward": (f"{_REF}selfmod:backward", f"{_CPU}selfmod:backward", f"{_GPU}selfmod.backward"),
    # The whole model.
    "model.forward": (f"{_REF}model:forward", f"{_CPU}model:forward", f"{_GPU}model.forward"),
    "model.loss_and_grads": (f"{_REF}model:loss_and_grads", f"{_CPU}model:loss_and_grads", f"{_GPU}model.loss_and_grads"),
    "model.cms_increments": (f"{_REF}model:cms_increments", f"{_CPU}model:cms_increments", f"{_GPU}model.cms_increments"),
    "model.loss_with_increments": (f"{_REF}model:loss_with_increments", f"{_CPU}model:loss_with_increments", f"{_GPU}model.loss_with_increments"),
}

BACKENDS = backends.NAMES  # the order of each row's columns (backends.py names the backends once)


def ported(backend: str) -> list[str]:
    """The ops that ``backend`` implements itself (every op for the reference)."""
    i = _index(backend)
    return [op for op, row in REGISTRY.items() if row[i] is not None]


def _index(backend: str) -> int:
    """The column of ``backend``; a ValueError naming the choices (``backends.get``)."""
    return BACKENDS.index(backends.get(backend).name)


def load(op: str, backend: str = "reference"):
    """The callable that implements ``op`` on ``backend``; a ValueError when the op is unknown or
    the backend has no port of it (the caller decides whether to fall back to the reference)."""
    if op not in REGISTRY:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(REGISTRY)}")
    target = REGISTRY[op][_index(backend)]
    if target is None:
        raise ValueError(f"op {op!r} has no {backend} port (use backend 'reference')")
    module, attr = target.split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):  # "ops:titans.titans_forward" on the GPU
        obj = getattr(obj, part)
    return obj
