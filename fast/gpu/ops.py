"""The GPU port's ops with a host interface: NumPy in, NumPy out (for the op table and the tests).

SPEC: SPEC.md#fast-gpu. ``primitives``, ``mlp_memory``, ``titans``, ``selfmod``, ``cms`` and
``model`` here are views of the loaded modules (``fast/gpu/namespace.py``): ``ops.titans.titans_forward``
is the reference's function run on the device, with its array arguments (nested in dicts, lists,
tuples) uploaded and its results (caches included) copied back. A backward then uploads the cache
again: this interface is for checking ops one at a time (conformance vectors, property tests);
the model API (``fast/gpu/model.py``) keeps everything on the device.
"""

from __future__ import annotations

import functools
import importlib

from . import model as _model

__all__ = ["primitives", "mlp_memory", "titans", "selfmod", "cms", "model"]


class _HostView:
    """Attribute access returns the module's function wrapped with to_device / to_host. The
    namespace is loaded at the first call, not at attribute access (the op table resolves every
    op on machines without a GPU too)."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        reference = importlib.import_module(f"nlref.reference.{self._module}")
        if not callable(getattr(reference, name)):  # AttributeError for a name the reference lacks
            raise AttributeError(f"{name!r} of reference.{self._module} is not a function")

        @functools.wraps(getattr(reference, name))
        def wrapper(*args, **kwargs):
            fn = getattr(getattr(_model._ns(), self._module), name)
            args = _model.to_device(list(args))
            kwargs = _model.to_device(kwargs)
            return _model.to_host(fn(*args, **kwargs))

        return wrapper

    def __repr__(self) -> str:
        return f"<GPU host view of reference.{self._module}>"


primitives = _HostView("primitives")
mlp_memory = _HostView("mlp_memory")
titans = _HostView("titans")
selfmod = _HostView("selfmod")
cms = _HostView("cms")
model = _HostView("model")
