"""The language model on the GPU: the reference model's API over CuPy (``device="gpu"``).

Paper: §7-§8.3, Eqs. (70)-(74), (94)-(97), arXiv 2512.24695v1 (as reference/model.py).
SPEC: SPEC.md#fast-gpu (the port, its arrays and its checks), SPEC.md#hope, SPEC.md#cms.

The same functions as ``reference/model.py`` with the same names, signatures, return structures
and dtypes: ``init_params``, ``init_state``, ``forward(params, tokens, cfg, state=None)``,
``loss_and_grads(params, tokens, cfg)``, ``cms_increments``, ``loss_with_increments``. The
computation is the reference's own vectorised code run on CuPy arrays (``fast/gpu/namespace.py``
says how), so the GPU computes the function the reference specifies, step for step except for
the overrides listed there (the planned einsum, the scan and activation kernels: the same
quantities in another summation order); results differ from the reference's by rounding only
(the ("float32" | "float64", "gpu") rows of tests/tolerances.py).

Arrays: parameters, tokens and states are accepted as NumPy or CuPy arrays (NumPy ones are
uploaded); results are NumPy unless ``as_numpy=False``, which returns device arrays, so a training
loop keeps its parameters, optimizer state and streaming state on the device across steps
(``to_device`` / ``to_host`` move whole trees: dicts, lists, tuples of arrays).

``NAMESPACE`` ("cupy", or "numpy" from the environment variable ``NL_GPU_NAMESPACE``) picks the
array namespace: "numpy" runs this module's whole logic on the CPU (the conversion of trees, the
loaded modules), which is how CI without a GPU tests it.
"""

from __future__ import annotations

import os

import numpy as np

from ...reference.model import (  # noqa: F401  (re-exported: the shared, non-numeric part of the API)
    init_params,
    param_counts,
    param_shapes,
    state_size,
)
from . import namespace

NAMESPACE = os.environ.get("NL_GPU_NAMESPACE", "cupy")
FAMILIES = ("transformer", "hope-attention", "titans", "hope")
"""The model families this port computes (the modules ``namespace.MODULES`` loads); another family
is a ValueError naming the backends that compute it (SPEC.md#fast-gpu)."""


def _check_family(cfg) -> None:
    if getattr(cfg, "family", None) not in FAMILIES:
        raise ValueError(f"the GPU port does not compute the {getattr(cfg, 'family', cfg)!r} family yet (it computes "
                         f"{', '.join(FAMILIES)}); the reference and the CPU port do")


def _ns():
    return namespace.load(NAMESPACE)


def xp():
    """The array module the GPU port computes with (cupy, or numpy under NL_GPU_NAMESPACE=numpy)."""
    return _ns().xp


def to_device(tree):
    """A copy of ``tree`` (dicts, lists, tuples; other leaves unchanged) with every NumPy array
    uploaded to the device; device arrays pass through uncopied."""
    x = xp()
    if isinstance(tree, dict):
        return {k: to_device(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to_device(v) for v in tree)
    if isinstance(tree, np.ndarray):
        return x.asarray(tree)
    return tree


def to_host(tree):
    """``tree`` with every device array copied to a NumPy array (NumPy leaves pass through)."""
    if isinstance(tree, dict):
        return {k: to_host(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to_host(v) for v in tree)
    if hasattr(tree, "get") and hasattr(tree, "device") and hasattr(tree, "shape"):  # a cupy.ndarray
        return tree.get()
    return tree


def _tokens(tokens):
    return to_device(np.asarray(tokens) if isinstance(tokens, list | tuple) else tokens)


def _out(tree, as_numpy: bool):
    return to_host(tree) if as_numpy else tree


def init_state(params, cfg, batch: int, as_numpy: bool = True) -> dict:
    """The reference's fresh state (the same layout on every backend)."""
    _check_family(cfg)
    return _out(_ns().model.init_state(to_device(params), cfg, batch), as_numpy)


def forward(params, tokens, cfg, state=None, as_numpy: bool = True):
    """Logits (B, T, V) and the state that continues the sequences (pass it back to continue)."""
    _check_family(cfg)
    logits, new_state = _ns().model.forward(to_device(params), _tokens(tokens), cfg,
                                            None if state is None else to_device(state))
    return _out(logits, as_numpy), _out(new_state, as_numpy)


def loss_and_grads(params, tokens, cfg, as_numpy: bool = True):
    """Mean next-token loss on tokens[:, 1:] (a float) and its gradient (the keys of ``params``)."""
    _check_family(cfg)
    loss, grads = _ns().model.loss_and_grads(to_device(params), _tokens(tokens), cfg)
    return float(loss), _out(grads, as_numpy)


def cms_increments(params, tokens, cfg, as_numpy: bool = True) -> dict:
    """The in-context CMS increments of a fresh pass (reference.model.cms_increments)."""
    _check_family(cfg)
    return _out(_ns().model.cms_increments(to_device(params), _tokens(tokens), cfg), as_numpy)


def loss_with_increments(params, tokens, cfg, increments) -> float:
    """The loss with the in-context CMS increments frozen (reference.model.loss_with_increments)."""
    _check_family(cfg)
    return float(_ns().model.loss_with_increments(to_device(params), _tokens(tokens), cfg,
                                                  to_device(increments)))


def optimizers():
    """reference/optimizers.py over the device namespace: ``make(...).update`` keeps the
    parameters and the optimizer state on the device (the same rules, the same state keys)."""
    return _ns().optimizers


def synchronize() -> None:
    """Wait for the device's queued work (for timing); a no-op on the NumPy namespace."""
    x = xp()
    if x is not np:
        x.cuda.Device().synchronize()
