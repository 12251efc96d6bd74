"""The language model on the CPU: the one model driver over the compiled primitives, CMS and layers.

Paper: §7-§8.3, Eqs. (70)-(74), (94)-(97), arXiv 2512.24695v1 (Titans: Titans Eqs. 9-18).
SPEC: SPEC.md#backends (one driver), SPEC.md#fast-cpu (the port), SPEC.md#hope, SPEC.md#cms.

The same functions as ``reference/model.py`` with the same names, signatures, return structures
and dtypes: ``init_params``, ``init_state``, ``forward(params, tokens, cfg, state=None)``,
``loss_and_grads(params, tokens, cfg)``, ``cms_increments``, ``loss_with_increments``. They are
the reference's own driver (reference/model.py, reference/blocks.py) called with this port's
ops, ``CPU``: ``fast.cpu.primitives``, ``fast.cpu.cms`` and the compiled sequence-memory layers
(``fast.cpu.titans``, ``fast.cpu.selfmod``; the linear families' layer is the reference's, an
explicit fallback counted in ``primitives.FALLBACKS["model.<family>_layer"]``, see
``PORTED_LAYERS``). Nothing of the driver is copied here; a semantic fix to the reference is a fix
here. The parameter layout, initialisation, validation and state layout are the reference's, so
a state or a parameter dict moves freely between backends.

What this module adds (SPEC.md#fast-cpu):
    - the savings of the driver's ``Ops`` switches, all on: a level whose period is the processing
      chunk takes its write's gradient from the chunk's own forward (``reuse_chunk_forward``); a
      write's re-run stops its backward at block 0's CMS (``cms_grads_only``); the hope family's
      whole-sequence pass re-uses the chunk-major pass's self-modifying layer caches merged by
      ``fast.cpu.selfmod.merge_caches`` (``reuse_layer_caches``: block 0 bitwise; a higher block's
      input differs by rounding only, measured 2.5e-16 (float64) and 1.7e-7 (float32) of the
      gradient's scale at hope-small); a slower level's write re-runs its span with the layers
      taken from the span's processing chunks' merged caches (``reuse_span_layers``: the
      hope-small step 0.85x, float64 bitwise); history records keep the memory states by reference
      (``copy_history=False``: no layer of this port writes a state in place);
    - ``loss_and_grads`` splits the batch into ``NL_CPU_GROUPS`` groups run on the caller and worker
      threads or processes (``NL_CPU_THREADS``, ``NL_CPU_WORKERS``; see ``WORKERS`` below): the
      sequences are independent and the loss is their mean; the grouping fixes the rounding, the
      workers never change a result;
    - BLAS runs single-threaded inside the public functions (``NL_CPU_BLAS_THREADS``, default 1,
      applied with threadpoolctl): a step is hundreds of small products (16-token chunks), where
      OpenBLAS's spinning worker threads cost more than they give, catastrophically on a loaded
      machine (docs/performance.md). Results do not depend on the setting beyond rounding.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os

import numpy as np

from ...reference import model as driver
from ...reference.config import ModelConfig
from ...reference.contract import Ops, check_params, check_tokens, reference_layer
from ...reference.model import (  # noqa: F401  (re-exported: the backend-independent part of the API)
    init_params,
    param_counts,
    param_shapes,
    state_size,
)
from . import blas, cms
from . import primitives as P

BLAS_THREADS = int(os.environ.get("NL_CPU_BLAS_THREADS", "1"))


def _blas_limited(fn):
    """Run ``fn`` with BLAS limited to ``BLAS_THREADS`` threads (``fast.cpu.blas.limited``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with blas.limited(BLAS_THREADS):
            return fn(*args, **kwargs)

    return wrapper


PORTED_LAYERS: dict[str, str | None] = {"titans": "titans", "hope": "selfmod",
                                        "titans-mag": "titans",  # MAG's memory branch: the compiled Titans layer
                                        "titans-mal": "titans",  # MAL's memory layer: the compiled Titans layer
                                        "titans-mac": "titans",  # MAC's memory and its retrieval (read_forward)
                                        # the reference's layer over the compiled token-loop rules
                                        "linear-attention": "linear_layers", "deltanet": "linear_layers",
                                        "gated-deltanet": "linear_layers", "dgd": "linear_layers"}
"""family -> the fast.cpu module of its sequence-memory layer (None: the reference's layer, an
explicit fallback). Set once the port has landed and its equivalence tests pass."""


def layer(family: str):
    """The module that computes ``family``'s sequence-memory layer on this port: its compiled port
    (``PORTED_LAYERS``), or the reference's module, an explicit fallback counted in
    ``primitives.FALLBACKS["model.<family>_layer"]``."""
    if PORTED_LAYERS.get(family) is not None:
        return importlib.import_module(f"{__package__}.{PORTED_LAYERS[family]}")
    key = f"model.{family}_layer"
    P.FALLBACKS[key] = P.FALLBACKS.get(key, 0) + 1
    return reference_layer(family)


CPU = Ops(name="cpu", np=np, primitives=P, cms=cms, layer=layer, reuse_chunk_forward=True, cms_grads_only=True,
          reuse_layer_caches=True, reuse_span_layers=True, copy_history=False, cms_grads_needed=True,
          cms_group_lists=True, reuse_min_chunk=8, cms_factored_writes=True, lowest_layer_once=True)
"""This port's ops for the one model driver (reference/contract.py ``Ops``)."""


@_blas_limited
def init_state(params, cfg: ModelConfig, batch: int) -> dict:
    """The reference's fresh state (the same layout on every backend)."""
    return driver.init_state(params, cfg, batch, ops=CPU)


@_blas_limited
def forward(params, tokens, cfg: ModelConfig, state=None):
    """Logits (B, T, V) of tokens (B, T) and the state that continues the sequences (as the
    reference: one call equals any chain of calls; the input state is not modified)."""
    return driver.forward(params, tokens, cfg, state, ops=CPU)


@_blas_limited
def cms_increments(params, tokens, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The in-context CMS increments of a fresh pass over tokens (reference/model.py)."""
    return driver.cms_increments(params, tokens, cfg, ops=CPU)


@_blas_limited
def loss_with_increments(params, tokens, cfg: ModelConfig, increments) -> float:
    """The mean next-token loss with the in-context CMS increments frozen at ``increments``."""
    return driver.loss_with_increments(params, tokens, cfg, increments, ops=CPU)


# ---------------------------------------------------------------------------------------------
# The batch split over cores (SPEC.md#fast-cpu: groups and threads)
# ---------------------------------------------------------------------------------------------

def _env_setting(name: str, default: str, allowed=None, minimum=None):
    """The environment variable ``name`` (``default`` when unset), checked: an int >= ``minimum`` or
    one of ``allowed``; anything else is a ValueError that names the variable and the choices."""
    raw = os.environ.get(name, default)
    if allowed is not None:
        if raw not in allowed:
            raise ValueError(f"{name}={raw!r}: must be one of {', '.join(allowed)}")
        return raw
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}={raw!r}: must be an integer >= {minimum}")
    return value


GROUPS = _env_setting("NL_CPU_GROUPS", "2", minimum=1)
"""``loss_and_grads`` splits the batch into this many contiguous groups of sequences (at most B; sizes
differ by at most one) and combines their results in a fixed order. The grouping, not the thread
count, decides the rounding, so a result is the same on any machine with the same setting."""
THREADS = _env_setting("NL_CPU_THREADS", "0", minimum=0)
"""Workers that run the groups, the calling thread included (0: one per group, at most the cores
this process may use; 1: the groups run one after the other). Never changes a result."""
WORKERS = _env_setting("NL_CPU_WORKERS", "thread", allowed=("thread", "process"))
"""What runs the groups other than the caller's first: ``"thread"`` (threads of this process: the
compiled kernels and BLAS release the GIL, the Python glue does not) or ``"process"`` (worker
processes started once from a forkserver that has imported this module; the parameters and
gradients cross a pipe each call, ~10 ms for 4 MB each way). Never changes a result (the same code
on the same numbers; tested bitwise). Processes win where the step is glue-heavy (the hope
family): measured on the 2-core machine, batch 4 x 256 float32, tokens/s serial / threads /
processes: hope-small 830 / 1,046 / 1,460, titans-small 5,406 / 7,301 / 8,289. The command line
(``nested-learning``, ``python -m nlref``) uses processes unless ``NL_CPU_WORKERS`` says
otherwise; the library default is threads, because a worker process imports the parent's main
script (multiprocessing's rule), which a script without an ``if __name__ == "__main__":`` guard
does not survive."""
_POOLS: dict = {}  # (kind, n) -> executor


@atexit.register
def _close_pools():
    """Shut the worker pools down while the interpreter is whole (a process pool collected during
    the interpreter's teardown prints an ignored AttributeError from concurrent.futures)."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown(wait=True)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def batch_groups(B: int) -> list[slice]:
    """The contiguous groups of a batch of B sequences: ``min(GROUPS, B)`` slices whose sizes differ
    by at most one, the larger first."""
    g = max(1, min(GROUPS, B))
    sizes = [B // g + (1 if i < B % g else 0) for i in range(g)]
    starts = np.cumsum([0] + sizes)
    return [slice(int(starts[i]), int(starts[i + 1])) for i in range(g)]


def worker_threads(n_groups: int) -> int:
    """Workers (the caller included) that run ``n_groups`` groups now: ``THREADS``, or one per
    group up to the usable cores."""
    want = THREADS if THREADS > 0 else usable_cores()
    return max(1, min(n_groups, want))


def _group_step(params, tokens, cfg):
    """One group's ``loss_and_grads`` (checked inputs), in a worker thread or process."""
    with blas.limited(BLAS_THREADS):
        return _loss_and_grads(params, tokens, cfg)


def _die_with_parent(parent_pid: int) -> None:
    """Worker-process initializer: end this worker as soon as ``parent_pid`` (the process that made
    the pool) exits, however it exits (SIGKILL included; SPEC.md#run-directories). A forkserver
    worker's OS parent is the forkserver, which lives as long as its workers do, and the workers
    hold their own queue's pipe open, so neither a parent-death signal nor an EOF would come: a
    daemon thread waits on a pidfd of ``parent_pid`` (readable when it exits; polled every 0.5 s
    where pidfds are missing) and ends the process. It also applies the heap settings of
    fast/cpu/allocator.py (a worker computes steps like its parent; ``NL_CPU_MALLOC``)."""
    import threading

    from . import allocator

    allocator.tune()

    def watch():
        import select
        import time

        try:
            fd = os.pidfd_open(parent_pid)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])
            os._exit(1)
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.5)

    import signal

    # a terminal's Ctrl-C reaches the whole process group: the parent stops the run at a step
    # boundary (SPEC.md#run-directories), so the worker must live to finish the step in flight
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:  # the parent died before this worker started
        os._exit(1)
    threading.Thread(target=watch, name="nl-cpu-parent-watch", daemon=True).start()


def _pool(kind: str, n: int):
    """The executor of ``n`` workers of ``kind``, kept between calls; one per (kind, n), so that
    switching settings back and forth does not restart worker processes."""
    key = (kind, n)
    if key in _POOLS:
        return _POOLS[key]
    if kind == "thread":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nl-cpu")
    elif kind == "process":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload([__name__])  # the workers start with the port imported
        pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_die_with_parent,
                                   initargs=(os.getpid(),))  # the workers end with this process
    else:
        raise ValueError(f"NL_CPU_WORKERS must be 'thread' or 'process', got {kind!r}")
    _POOLS[key] = pool
    return pool


def _map_groups(params, tokens, cfg, groups):
    """[_loss_and_grads on each group], in the groups' order: the first in the calling thread, the
    others on ``worker_threads - 1`` workers of kind ``WORKERS``. An exception in any group is
    raised here; a worker process that died is reported and its pool re-made on the next call."""
    n = worker_threads(len(groups))
    if n == 1:
        return [_loss_and_grads(params, tokens[g], cfg) for g in groups]
    pool = _pool(WORKERS, n - 1)
    futures = [pool.submit(_group_step, params, tokens[g], cfg) for g in groups[1:]]
    try:
        first = _loss_and_grads(params, tokens[groups[0]], cfg)
        return [first] + [f.result() for f in futures]
    except Exception as exc:
        from concurrent.futures.process import BrokenProcessPool

        for f in futures:
            f.cancel()
        if isinstance(exc, BrokenProcessPool):
            _POOLS.pop((WORKERS, n - 1), None)
            pool.shutdown(wait=True)  # the dead pool's manager thread ends before we go on
            raise RuntimeError(f"a CPU-port worker process died ({exc}); the next call starts new ones. "
                               "NL_CPU_WORKERS=thread runs the groups in threads instead") from exc
        raise


@_blas_limited
def loss_and_grads(params, tokens, cfg: ModelConfig):
    """Mean next-token cross-entropy on tokens[:, 1:] and its gradient (keys of ``params``), the
    same function as reference/model.py::loss_and_grads.

    The sequences of a batch are independent (per-sequence fast state, in-context CMS included) and
    the loss is a mean over them, so the batch is split into ``batch_groups`` computed by
    ``worker_threads`` workers (``WORKERS``): loss = sum_g (B_g / B) loss_g, and the same for every gradient,
    summed in the groups' order."""
    params = check_params(params, cfg)
    tokens = check_tokens(tokens, cfg, min_T=2)
    B = tokens.shape[0]
    groups = batch_groups(B)
    if len(groups) == 1:
        return _loss_and_grads(params, tokens, cfg)
    results = _map_groups(params, tokens, cfg, groups)
    weights = [(g.stop - g.start) / B for g in groups]
    loss = sum(w * r[0] for w, r in zip(weights, results, strict=True))
    grads = {}
    for k in params:
        acc = weights[0] * results[0][1][k]
        for w, r in zip(weights[1:], results[1:], strict=True):
            acc = acc + w * r[1][k]
        grads[k] = np.asarray(acc, dtype=params[k].dtype)
    return float(loss), grads


def _loss_and_grads(params, tokens, cfg):
    """``loss_and_grads`` of checked inputs, in the calling thread (the one driver with ``CPU``)."""
    return driver.loss_and_grads_checked(CPU, params, tokens, cfg)


__all__ = ["GROUPS", "PORTED_LAYERS", "THREADS", "WORKERS", "batch_groups", "cms_increments", "forward", "init_params",
           "init_state", "loss_and_grads", "loss_with_increments", "param_counts", "param_shapes", "state_size", "usable_cores", "worker_threads"]
