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

from . import model as _model

__all__ = ["primitives", "mlp_memory", "titans", "selfmod", "cms", "model"]


class _HostView:
    """Attribute access returns the module's function wrapped with to_device / to_host."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, name: str):
        fn = getattr(getattr(_model._ns(), self._module), name)
        if not callable(fn) or isinstance(fn, type):
            return fn

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
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
