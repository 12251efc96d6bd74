"""nlref: Nested Learning (Behrouz, Razaviyayn, Zhong, Mirrokni; arXiv 2512.24695v1).

A pure-NumPy reference with hand-written gradients (``nlref.reference``), the
executable specification, and a compiled port (``nlref.fast``). SPEC.md is normative.

``nlref.load(path)`` and ``nlref.Model.from_preset(name)`` are the Python API (``nlref.api``,
SPEC.md#python-api); they are imported on first use, so ``import nlref`` stays cheap (no NumPy,
Numba or CuPy).

Notation key (SPEC.md#notation): B batch, T tokens, D width, H heads (or MLP hidden width where
a module says so), C chunk size, L levels, V vocabulary. Column vectors: a read is ``M k``.
"""

__version__ = "0.1.0"
SPEC_VERSION = "0.3"
# Spec versions whose every model computes the same function under this code (SPEC.md "Changes"):
# a checkpoint or weights file written under one of them loads here.
COMPATIBLE_SPECS = ("0.2", "0.3")
PAPER = "arXiv 2512.24695v1"

_LAZY = {"Model": "api", "StreamState": "api", "load": "api"}  # name -> the submodule defining it


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
