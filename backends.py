"""The backends in one place: their names, and a ``Backend`` that says what each needs and does.

SPEC: SPEC.md#backends (one model driver; what each backend passes it), SPEC.md#fast-cpu (the
Numba port), SPEC.md#fast-gpu (the CuPy port). Training, evaluation and generation
(training.py), the benchmark (bench.py), the conformance check (conformance.py), the op table
(fast/registry.py) and the fast model API (fast/model.py) take their backend names and their
per-backend choices from here; nothing else lists the names.

| name        | model module                       | arrays on | needs                                 |
| ----------- | ---------------------------------- | --------- | ------------------------------------- |
| "reference" | ``nlref.reference.model`` | host      | NumPy                                 |
| "cpu"       | ``nlref.fast.cpu.model``  | host      | Numba (valid ``NL_CPU_*`` settings)   |
| "gpu"       | ``nlref.fast.gpu.model``  | device    | CuPy and a CUDA device (or ``NL_GPU_NAMESPACE=numpy``) |

Every model module has the same public functions (``init_params``, ``init_state``, ``forward``,
``loss_and_grads``, ``cms_increments``, ``loss_with_increments``, ``param_shapes``,
``state_size``; SPEC.md#public-api). A ``Backend`` adds what differs between them: whether it
can run here and why not (``available``, ``check``), the families it computes (``families``;
``reference_layers``: the families whose sequence-memory layer is the reference's, an explicit
fallback), where its arrays live (``to_device`` / ``to_host``; ``forward`` and
``loss_and_grads`` keep their results there), its optimizers (reference/optimizers.py over its
array namespace) and the barrier a timer reads the clock after (``synchronize``).

Importing this module imports neither NumPy, Numba nor CuPy (``nested-learning --help`` imports
it): a model module is imported on first use of ``Backend.model``, and ``available()`` of "cpu"
imports Numba (it has to, to know), of "gpu" CuPy.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

NAMES = ("reference", "cpu", "gpu")
"""The backends, in this order everywhere (``fast/registry.py``'s columns, the CLI's choices)."""
PORTS = tuple(n for n in NAMES if n != "reference")
"""The compiled ports (``fast.model``'s ``device=``)."""
PEERS = ("torch", "torch-cuda")
"""Not backends: the benchmark's PyTorch peers (torch_model.py, an independent implementation on
the CPU and on CUDA), timed beside the backends by ``nested-learning bench`` only."""


class BackendError(ValueError):
    """A backend that is not known, cannot run here, or does not compute a family; the message
    says why and which backend to use instead."""


def _in_order(names) -> str:
    """'--backend cpu or --backend reference': the ports first (the faster), the reference last."""
    return " or ".join(f"--backend {n}" for n in sorted(names, key=lambda n: n == "reference"))


@dataclass(frozen=True)
class Backend:
    """One backend: ``name`` (one of ``NAMES``), ``module`` (its model module's import path),
    ``device`` ("cpu" or "gpu": where its arrays live) and a one-line ``summary``."""

    name: str
    module: str
    device: str
    summary: str

    @property
    def model(self):
        """The model module (imported now if it was not yet)."""
        return importlib.import_module(self.module)

    @property
    def on_device(self) -> bool:
        """True when parameters, gradients and states live in device memory (the GPU port)."""
        return self.device == "gpu"

    # -- can it run here ------------------------------------------------------------------------

    def available(self) -> tuple[bool, str]:
        """(True, what it runs on) or (False, why it cannot run here)."""
        if self.name == "cpu":
            if importlib.util.find_spec("numba") is None:
                return False, "Numba is not installed (pip install numba)"
            try:  # reads the NL_CPU_* settings (SPEC.md#fast-cpu); a bad one is named with its choices
                self.model  # noqa: B018
            except ValueError as exc:
                return False, str(exc)
            return True, "Numba + BLAS on the CPU"
        if self.name == "gpu":
            if self.model.NAMESPACE == "numpy":
                return True, "NL_GPU_NAMESPACE=numpy: the GPU port's code runs on the CPU"
            from .fast.gpu import namespace

            return namespace.cupy_available()
        return True, "NumPy on the CPU"

    def families(self) -> tuple[str, ...]:
        """The model families this backend computes (``config.FAMILIES`` order)."""
        from .reference.config import FAMILIES

        if self.name == "gpu":
            from .fast.gpu.model import FAMILIES as GPU_FAMILIES  # no CuPy import

            return tuple(f for f in FAMILIES if f in GPU_FAMILIES)
        return FAMILIES  # the CPU port: every family, some layers by a counted fallback (reference_layers)

    def reference_layers(self) -> tuple[str, ...]:
        """The families whose sequence-memory layer this backend takes from the reference, an
        explicit fallback (the CPU port: ``PORTED_LAYERS``, counted in ``primitives.FALLBACKS``;
        imports the port). Empty for the reference itself and for the GPU port (which runs the
        reference's code over CuPy for every family it computes)."""
        if self.name != "cpu":
            return ()
        ported = self.model.PORTED_LAYERS
        return tuple(f for f in self.families() if f in ported and ported[f] is None)

    def check(self, family: str | None = None) -> None:
        """BackendError unless this backend can run here (and computes ``family``, when given)."""
        if family is not None and family not in self.families():
            others = [n for n in NAMES if n != self.name and family in get(n).families()]
            raise BackendError(f"backend {self.name!r} does not compute the {family!r} family yet (it computes "
                               f"{', '.join(self.families())}); use {_in_order(others)}")
        ok, why = self.available()
        if ok:
            return
        others = _in_order([n for n in NAMES if n != self.name and n != "gpu"])
        if self.name == "gpu":
            raise BackendError(f"backend 'gpu' needs CuPy and a CUDA device: {why}; use {others} here")
        if self.name == "cpu" and "not installed" in why:
            raise BackendError(f"backend 'cpu' needs Numba: {why}; use {others} here")
        raise BackendError(f"backend {self.name!r}: {why}")

    # -- arrays and the clock -------------------------------------------------------------------

    def to_device(self, tree):
        """``tree`` (dicts, lists, tuples of arrays) on this backend's device; host backends return
        it unchanged."""
        return self.model.to_device(tree) if self.on_device else tree

    def to_host(self, tree):
        """``tree`` with every array as NumPy; host backends return it unchanged."""
        return self.model.to_host(tree) if self.on_device else tree

    def forward(self, params, tokens, cfg, state=None):
        """``model.forward`` whose logits and state stay on the device (``to_host`` brings them
        back); params and state may already be there."""
        if self.on_device:
            return self.model.forward(params, tokens, cfg, state, as_numpy=False)
        return self.model.forward(params, tokens, cfg, state)

    def loss_and_grads(self, params, tokens, cfg):
        """``model.loss_and_grads``: a float and the gradients, on the device for the GPU port."""
        if self.on_device:
            return self.model.loss_and_grads(params, tokens, cfg, as_numpy=False)
        return self.model.loss_and_grads(params, tokens, cfg)

    def optimizers(self):
        """reference/optimizers.py over this backend's arrays (on the GPU its state stays on the
        device: the same rules, the same state keys)."""
        if self.on_device:
            return self.model.optimizers()
        from .reference import optimizers

        return optimizers

    def synchronize(self) -> None:
        """Wait for the backend's queued work, so a clock read after it has seen the work end
        (a no-op on the host)."""
        if self.on_device:
            self.model.synchronize()


_BACKENDS = {
    "reference": Backend("reference", "nlref.reference.model", "cpu",
                         "the NumPy reference, the executable specification"),
    "cpu": Backend("cpu", "nlref.fast.cpu.model", "cpu", "the Numba port (SPEC.md#fast-cpu)"),
    "gpu": Backend("gpu", "nlref.fast.gpu.model", "gpu",
                   "the CuPy port: the reference's code over CuPy (SPEC.md#fast-gpu)"),
}
assert tuple(_BACKENDS) == NAMES


def get(name: str) -> Backend:
    """The backend called ``name``; BackendError (a ValueError) naming the choices otherwise."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str) or name not in _BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(NAMES)}; got {name!r}")
    return _BACKENDS[name]


def default() -> str:
    """The default backend: the Numba port ("cpu") where numba imports, else the reference. The
    GPU port runs only when asked for (``--backend gpu``)."""
    return "cpu" if importlib.util.find_spec("numba") is not None else "reference"


__all__ = ["NAMES", "PEERS", "PORTS", "Backend", "BackendError", "default", "get"]


WARM_PRESETS = ("hope-small", "transformer-tiny", "hope-attention-tiny", "titans-tiny", "hope-tiny",
                "linear-attention-tiny", "deltanet-tiny", "gated-deltanet-tiny", "dgd-tiny", "titans-mag-tiny",
                "titans-mal-tiny", "titans-mac-tiny")
"""``nested-learning warmup``'s default: the default run's preset and one of every family (the
kernels compile per argument type, not per size, so a tiny preset warms its family's small and
medium presets too)."""


def warm(name: str, presets=WARM_PRESETS, dtypes=("float32",), echo=print) -> list[tuple[str, str, float]]:
    """Run each preset once on backend ``name`` in each dtype, the calls ``train``, ``eval`` and
    ``generate`` make (a training step, a streaming forward, one more token), so the compiled
    ports' kernels are compiled and cached before a run needs them (SPEC.md#fast-cpu). Returns
    (preset, dtype, seconds) rows; a family the backend does not compute is skipped with a line."""
    import dataclasses
    import time

    import numpy as np

    from .reference import config

    be = get(name)
    be.check()
    rows = []
    for preset in presets:
        for dtype in dtypes:
            cfg = dataclasses.replace(config.preset(preset), dtype=dtype)
            if cfg.family not in be.families():
                echo(f"{preset}: skipped ({name} does not compute family {cfg.family})")
                continue
            t0 = time.perf_counter()
            params = be.to_device(be.model.init_params(cfg, seed=0))
            tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 129))
            be.loss_and_grads(params, tokens, cfg)
            _, state = be.forward(params, tokens[:1, :17], cfg, None)
            be.forward(params, tokens[:1, 17:18], cfg, state)
            be.synchronize()
            dt = time.perf_counter() - t0
            rows.append((preset, dtype, dt))
            echo(f"{preset} {dtype}: {dt:.1f} s")
    return rows
