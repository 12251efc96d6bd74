"""The GPU port's array namespaces: the reference's vectorised modules run over CuPy (or NumPy).

SPEC: SPEC.md#fast-gpu. The GPU port is single-source: it is the reference's own code (the
chunk-parallel forms of reference/titans.py, selfmod.py, cms.py, optimizers.py and the
primitives under them), executed with its array module ``np`` bound to an array namespace
instead of NumPy. ``load("cupy")`` gives a package of those modules whose function bodies call
CuPy (cuBLAS for every matrix product and ``einsum``, CUDA kernels for the element-wise work);
``load("numpy")`` gives the same package over NumPy, which is how the GPU port's logic runs on a
machine without a GPU (CI): there it must equal the reference bit for bit.

How a module is loaded (``_load_module``): its source file is compiled under its own file name (so
tracebacks and line numbers are the reference's) and executed as a fresh module of the package
``nlref.fast.gpu._xp_<namespace>_<einsum>_<kernels>``; module-level code (constants,
dataclasses, dtype tables) runs with NumPy, then the module's global ``np`` is rebound to the
namespace, so every function body computes on the namespace's arrays, and every class it defines
(``TitansConfig``, ``SelfModConfig``) is rebound to the reference's own class, so a config passes
either way. ``from . import x`` inside those modules resolves to the sibling in the same package,
and ``config`` is the reference's own module (one ModelConfig class for every backend). Nothing is
copied or edited: the replacements below are the only differences (SPEC.md#fast-gpu lists them
with their reasons).

The CuPy namespace (a ``Namespace`` over ``cupy``) forwards every name to ``cupy`` except:
    - ``random``: NumPy's (initialisation draws on the host; the drawn arrays are uploaded);
    - ``shape``, ``size``: read the attribute (CuPy arrays refuse NumPy's implicit conversion);
    - ``add``: ``cupy.add`` whose ``.at`` (the embedding gradient's scatter-add) is a one-hot
      matrix product for the (V, D) / (N,) / (N, D) pattern (no float64 atomics needed; the same
      sums in another order);
    - ``einsum``: ``fast/gpu/einsum.py``'s planned contraction (one cached plan per subscripts and
      shapes, one batched matrix product per operand pair) unless ``NL_GPU_EINSUM=native`` (CuPy's
      own); ``load("numpy", einsum="planned")`` runs it over NumPy for the CPU tests.
Module globals replaced after loading (``_overrides``): primitives' ``_erf`` is
``cupyx.scipy.special.erf`` (scipy's erf takes no device array); with ``kernels="cuda"`` the
activations (``fast/gpu/activations.py``) and the self-modifying layer's scans
(``fast/gpu/scans.py``) are custom kernels.
TF32 stays off (CuPy's default) unless ``NL_GPU_TF32=1`` is set before the first load, which sets
``CUPY_TF32=1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import numpy

from .einsum import PlannedEinsum

# The reference modules the GPU port runs, in dependency order (each imports only earlier ones).
# The model driver (reference/model.py, blocks.py) is not among them: it runs on the host with these
# modules as its ops (``pkg.model``, reference/contract.py ``Ops``), as it does for the CPU port.
MODULES = ("array_checks", "sequence_ops", "primitives", "mlp_memory", "memory", "titans", "selfmod_memory",
           "selfmod_config", "selfmod", "cms", "classic_optimizers", "deep_optimizers", "optimizers")
_REF = "nlref.reference"
_LOADED: dict[tuple[str, str, str], types.ModuleType] = {}


def cupy_available() -> tuple[bool, str]:
    """(True, device name) when CuPy imports and sees a CUDA device, else (False, the reason)."""
    if importlib.util.find_spec("cupy") is None:
        return False, "CuPy is not installed (pip install 'nested-learning-reference[gpu]' on a CUDA machine)"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "CuPy sees no CUDA device"
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        return True, name.decode() if isinstance(name, bytes) else str(name)
    except Exception as exc:  # no driver, no device, a broken CUDA install: all mean "no GPU here"
        return False, f"CuPy cannot use a CUDA device: {type(exc).__name__}: {exc}"


class _AddWithAt:
    """``cupy.add`` with an ``at`` that needs no atomics for the embedding-gradient pattern."""

    def __init__(self, xp_add, xp):
        self._add, self._xp = xp_add, xp

    def __call__(self, *args, **kwargs):
        return self._add(*args, **kwargs)

    def at(self, a, indices, values):
        xp = self._xp
        if a.ndim == 2 and getattr(indices, "ndim", None) == 1 and values.ndim == 2:
            onehot = (indices[:, None] == xp.arange(a.shape[0])[None, :]).astype(a.dtype)  # (N, V)
            a += onehot.T @ values.astype(a.dtype, copy=False)  # (V, D)   sum over the rows of each index
            return None
        return self._add.at(a, indices, values)


class Namespace(types.ModuleType):
    """An array module (``base``) with some names replaced; every other name is the base's."""

    def __init__(self, name: str, base, **replaced):
        super().__init__(f"nlref.fast.gpu.{name}_namespace")
        self._base = base
        for key, value in replaced.items():
            setattr(self, key, value)

    def __getattr__(self, name):  # only reached for names not set in __init__
        return getattr(self._base, name)


def _shape(a):
    return tuple(a.shape) if hasattr(a, "shape") else numpy.shape(a)


def _size(a):
    return int(a.size) if hasattr(a, "size") else numpy.size(a)


EINSUMS = ("planned", "native")


def _namespace(name: str, einsum: str):
    if einsum not in EINSUMS:
        raise ValueError(f"einsum must be one of {EINSUMS}, got {einsum!r}")
    if name == "numpy":
        if einsum == "native":
            return numpy
        return Namespace(name, numpy, einsum=PlannedEinsum(numpy))
    if name == "cupy":
        ok, why = cupy_available()
        if not ok:
            raise RuntimeError(f"the GPU backend needs CuPy and a CUDA device: {why}")
        if os.environ.get("NL_GPU_TF32") == "1":
            os.environ.setdefault("CUPY_TF32", "1")
        import cupy
        import cupyx.scipy.special

        replaced = {"erf": cupyx.scipy.special.erf, "random": numpy.random, "add": _AddWithAt(cupy.add, cupy),
                    "shape": _shape, "size": _size}
        if einsum == "planned":
            replaced["einsum"] = PlannedEinsum(cupy)
        return Namespace(name, cupy, **replaced)
    raise ValueError(f"array namespace must be 'numpy' or 'cupy', got {name!r}")


def _overrides(name: str, xp, kernels: str) -> dict:
    """module -> (loaded module -> {global: replacement}): what the reference takes from outside
    NumPy, and the scans that run as custom kernels (``fast/gpu/scans.py``)."""
    out = {}
    if name == "cupy":
        out["primitives"] = lambda mod: {"_erf": xp.erf, **(_activations(mod) if kernels == "cuda" else {})}
    if kernels != "off":
        out["selfmod_memory"] = lambda mod: _scans(mod, xp, kernels)  # the scans live there (selfmod re-exports)
    return out


def _activations(mod) -> dict:
    import cupy

    from . import activations

    return activations.overrides(mod, cupy)


def _scans(mod, xp, kernels: str) -> dict:
    from . import scans

    fallback = {n: getattr(mod, n) for n in ("suffix_products", "suffix_products_backward",
                                              "scalar_suffix_products", "scalar_suffix_products_backward")}
    impl = scans.CudaKernels() if kernels == "cuda" else scans.LoopKernels(xp)
    return scans.Scans(xp, fallback, impl).overrides()


def _load_module(package: str, module: str, xp, overrides) -> types.ModuleType:
    spec = importlib.util.find_spec(f"{_REF}.{module}")
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the reference module {_REF}.{module}")
    with open(spec.origin, encoding="utf-8") as f:
        code = compile(f.read(), spec.origin, "exec")
    mod = types.ModuleType(f"{package}.{module}")
    mod.__file__ = spec.origin
    mod.__package__ = package
    sys.modules[mod.__name__] = mod  # before exec: dataclasses look their module up
    exec(code, mod.__dict__)  # module-level code runs with NumPy
    if getattr(mod, "np", None) is not numpy:
        raise ImportError(f"{spec.origin} must import numpy as np (the namespace rebinds that name)")
    mod.np = xp  # every function body now computes on the namespace
    reference = importlib.import_module(f"{_REF}.{module}")
    for key, value in list(vars(mod).items()):  # one class per name for every backend (TitansConfig, ...)
        if isinstance(value, type) and value.__module__ == mod.__name__:
            setattr(mod, key, getattr(reference, key))
    for key, value in (overrides(mod) if overrides else {}).items():
        if not hasattr(mod, key):
            raise ImportError(f"{spec.origin} has no {key!r} to override")
        setattr(mod, key, value)
    setattr(sys.modules[package], module, mod)
    return mod


def _model(pkg, label: str):
    """The one model driver (reference/model.py) with the loaded modules as its ops: the model API
    (``forward``, ``loss_and_grads``, ...) computing on the namespace ``pkg.xp``."""
    from ...reference import model
    from ...reference.contract import Ops

    layers = {"titans": pkg.titans, "hope": pkg.selfmod}

    def layer(family: str):
        if family not in layers:
            raise ValueError(f"the GPU port has no {family!r} memory layer (it computes titans and hope)")
        return layers[family]

    return model.bind(Ops(name=label, np=pkg.xp, primitives=pkg.primitives, cms=pkg.cms, layer=layer))


def load(name: str = "cupy", einsum: str | None = None, kernels: str | None = None) -> types.ModuleType:
    """The package of the reference's modules over the namespace ``name`` ("cupy" or "numpy"),
    loaded once per process and combination of:

    - ``einsum``: "planned" or "native" (default: "planned" for cupy unless ``NL_GPU_EINSUM`` says
      otherwise; "native" for numpy, which is then bitwise the reference);
    - ``kernels``: the custom kernels: "cuda" (the default for cupy unless ``NL_GPU_KERNELS=0``:
      the self-modifying layer's scans, ``fast/gpu/scans.py``, and the fused activations,
      ``fast/gpu/activations.py``), "loops" (the scans' host logic over whole-array loops, for CPU
      tests) or "off" (the reference's own code; the default for numpy).

    Its attributes are the modules of ``MODULES`` plus ``xp``, ``config`` and ``model`` (the one
    model driver with these modules as its ops: ``reference.model.bind``)."""
    if einsum is None:
        einsum = os.environ.get("NL_GPU_EINSUM", "planned") if name == "cupy" else "native"
    if kernels is None:
        kernels = ("off" if os.environ.get("NL_GPU_KERNELS") == "0" else "cuda") if name == "cupy" else "off"
    if kernels not in ("cuda", "loops", "off") or (kernels == "cuda" and name != "cupy"):
        raise ValueError(f"kernels must be 'cuda' (cupy only), 'loops' or 'off', got {kernels!r}")
    if (name, einsum, kernels) in _LOADED:
        return _LOADED[(name, einsum, kernels)]
    xp = _namespace(name, einsum)
    package = f"nlref.fast.gpu._xp_{name}_{einsum}_{kernels}"
    pkg = types.ModuleType(package)
    pkg.__path__ = []  # a package that finds nothing on disk: only the modules set below
    pkg.__package__ = package
    sys.modules[package] = pkg
    config = importlib.import_module(f"{_REF}.config")
    sys.modules[f"{package}.config"] = config
    pkg.config = config
    overrides = _overrides(name, xp, kernels)
    try:
        for module in MODULES:
            _load_module(package, module, xp, overrides.get(module))
    except BaseException:
        for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
            del sys.modules[key]
        raise
    pkg.xp = xp
    pkg.model = _model(pkg, f"gpu:{name}:{einsum}:{kernels}")
    _LOADED[(name, einsum, kernels)] = pkg
    return pkg
