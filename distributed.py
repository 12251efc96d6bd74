"""Data-parallel training over MPI: one global batch split across ranks, the outer gradients all-reduced.

Paper: none (the run machinery is not in the paper; arXiv 2512.24695v1). SPEC.md#distributed pins
every choice below.

Why data parallelism is only an all-reduce here: every fast state of these models (the memories,
the in-context CMS levels) is per sequence and never crosses sequences (SPEC.md#chunks), and the
loss is the mean over the batch's sequences. So rank r computes the mean loss and its gradient on
its own rows of the global batch, weights both by its share ``B_r / B``, and the sum over ranks is
the full batch's mean-loss gradient. The online (inner) updates run inside each sequence exactly as
on one process.

| meaning                                  | code name            | shape / type           |
| ---------------------------------------- | -------------------- | ---------------------- |
| ranks (MPI processes), this one's index  | ``size``, ``rank``   | ints                   |
| the global batch                         | ``tokens``           | (B, T + 1) int64       |
| rank r's rows, their count               | ``shares(B, N)[r]``  | slice, ``B_r``         |
| the fused buffer (all gradients, flat)   | ``buf``              | (sum of sizes,) dtype  |

Decisions (SPEC.md#distributed):

- **The engine is MPI** through mpi4py (the ``mpi`` extra brings MPICH's PyPI wheel and its
  ``mpiexec``; any system MPI works the same). Without a launcher, or without mpi4py, the world is
  one rank and nothing here imports mpi4py: the one-process run is the plain run.
- **The split**: every rank draws the same global batch from the same sampler (same seed, same
  position), so the data order never depends on N; rank r takes the contiguous rows
  ``shares(B, N)[r]``: sizes differ by at most one, the larger first (the CPU port's
  ``batch_groups`` rule). A batch smaller than N is refused before anything is written.
- **One fused all-reduce per step** (``MPI_SUM``): every gradient, already weighted by ``B_r / B``,
  packed into one contiguous buffer of the model's dtype; in float64 the loss and the batch check
  ride in the same buffer, in float32 they go in a second, 24-byte float64 reduction (the loss's
  float32 rounding would otherwise show in the logged loss).
- **Reduction order**: ``NL_MPI_REDUCE=sum`` (the default) uses ``MPI_Allreduce``, whose order is
  the MPI library's; ``NL_MPI_REDUCE=ordered`` gathers the shares on rank 0, sums them in rank
  order and broadcasts the sum (N times the traffic at rank 0): the same sum, term by term, as
  the CPU port's batch groups, so a run is bitwise the one-process run with ``NL_CPU_GROUPS=N``.
- **Every rank checks the batch**: a 20-bit digest of the global batch rides in the reduction; a
  rank that drew another batch (other data on its node, another seed) stops the run at once.
- **Rank 0 alone writes the run directory** (``train``); the other ranks run the same loop in a
  private temporary directory, started from rank 0's snapshot of the run's files (so a resume
  needs the run directory on rank 0 only), with their output silenced; it is removed at the end.
- **Failures**: an error on any rank prints one message (rank 0's, or the rank's own with its
  number) and ends the whole job with ``MPI_Abort`` (a rank left waiting in an all-reduce would
  hang); a rank killed outright is reported by the launcher, which ends the others. A rank that
  waits more than ``NL_MPI_TIMEOUT`` seconds (default 600) in one reduction stops the run too (a
  peer that hangs, or died under a launcher that does not end the job). Checkpoints are written
  atomically, so the last good one stays.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nlref.rundir import TrainingError

LAUNCHER_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK")
"""Variables one of which a launcher sets in every process it starts (MPICH / Intel MPI hydra,
Open MPI, MVAPICH, PMIx launchers such as Slurm's ``srun --mpi=pmix``): where one is set, the
process is a rank and mpi4py is imported."""

REDUCE_MODES = ("sum", "ordered")
FOLLOWER_GRACE_S = 3.0
"""A rank other than 0 that fails waits this long before it reports and aborts, so that an error
every rank meets (a non-finite loss, a bad setting) is reported once, by rank 0."""


class DistributedError(TrainingError):
    """A multi-process run that cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class World:
    """The processes of this run: ``rank`` of ``size``, the MPI communicator (None in a one-rank
    world without MPI) and the MPI library's name."""

    rank: int
    size: int
    comm: object = None
    library: str = ""

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def _launched_size() -> int | None:
    """The world size a launcher announced in the environment (None: not launched, or unknown)."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        raw = os.environ.get(name)
        if raw is not None:
            try:
                return int(raw)
            except ValueError:
                return None
    return None


def launched() -> bool:
    """True when a launcher (``mpiexec``, ``srun``) started this process (``LAUNCHER_ENV``)."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def mpi_setting() -> str:
    """``NL_MPI``: ``auto`` (the default: MPI when launched), ``on`` (always import mpi4py: a
    launcher this module does not know) or ``off`` (one rank even under a launcher)."""
    raw = os.environ.get("NL_MPI", "auto")
    if raw not in ("auto", "on", "off"):
        raise DistributedError(f"NL_MPI={raw!r}: must be auto, on or off")
    return raw


def reduce_mode() -> str:
    """``NL_MPI_REDUCE``: ``sum`` (MPI_Allreduce, the default) or ``ordered`` (a fixed rank order)."""
    raw = os.environ.get("NL_MPI_REDUCE", "sum")
    if raw not in REDUCE_MODES:
        raise DistributedError(f"NL_MPI_REDUCE={raw!r}: must be one of {', '.join(REDUCE_MODES)}")
    return raw


@functools.cache
def world() -> World:
    """This process's place in the run, discovered once: a one-rank world unless a launcher started
    it (or ``NL_MPI=on``); under a launcher, MPI_COMM_WORLD through mpi4py.

    DistributedError when a launcher started N > 1 processes and mpi4py is missing (N independent
    runs would otherwise race for one run directory)."""
    setting = mpi_setting()
    if setting == "off" or (setting == "auto" and not launched()):
        return World(0, 1)
    try:
        from mpi4py import MPI
    except ImportError as exc:
        n = _launched_size()
        if setting == "auto" and n == 1:
            return World(0, 1)
        raise DistributedError(
            f"this process was started by an MPI launcher ({n or 'several'} processes) but mpi4py cannot be "
            f"imported ({exc}); install it with pip install 'nested-learning-reference[mpi]', or run one "
            "process without mpiexec (NL_MPI=off ignores the launcher)") from None
    comm = MPI.COMM_WORLD
    library = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    return World(comm.Get_rank(), comm.Get_size(), comm, library)


# ------------------------------------------------------------------------------------------------
# The batch split
# ------------------------------------------------------------------------------------------------


def shares(B: int, size: int) -> list[slice]:
    """The contiguous rows of a batch of B sequences each of ``size`` ranks takes: sizes differ by
    at most one, the larger first (the CPU port's ``batch_groups`` rule). DistributedError when
    B < size (a rank would get no sequence)."""
    if size < 1:
        raise DistributedError(f"the world size must be >= 1, got {size}")
    if B < size:
        raise DistributedError(
            f"the global batch of {B} sequences cannot be split over {size} ranks (each needs at least one): "
            f"give --batch-size {size} or more, or start fewer ranks (mpiexec -n {B})")
    sizes = [B // size + (1 if i < B % size else 0) for i in range(size)]
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


def check_batch(batch_size: int, w: World | None = None) -> None:
    """DistributedError unless a batch of ``batch_size`` splits over the world (before any file is written)."""
    shares(batch_size, (w or world()).size)


def batch_digest(tokens) -> int:
    """A 20-bit digest of the global batch (CRC-32 of its bytes): equal on every rank that drew the
    same batch. 20 bits keep ``sum(d)`` and ``sum(d * d)`` exact in float64 for up to 4096 ranks."""
    import numpy as np

    return zlib.crc32(np.ascontiguousarray(tokens).tobytes()) & 0xFFFFF


# ------------------------------------------------------------------------------------------------
# The fused all-reduce
# ------------------------------------------------------------------------------------------------


def _xp(x):
    """The array namespace of ``x``: CuPy for a device array, else NumPy."""
    if hasattr(x, "__cuda_array_interface__"):
        import cupy

        return cupy
    import numpy

    return numpy


def cuda_aware() -> bool:
    """``NL_MPI_CUDA_AWARE=1``: hand CuPy buffers to MPI as they are (a CUDA-aware MPI reduces them
    in device memory); otherwise (the default) the fused buffer is copied to the host and back."""
    raw = os.environ.get("NL_MPI_CUDA_AWARE", "0")
    if raw not in ("0", "1"):
        raise DistributedError(f"NL_MPI_CUDA_AWARE={raw!r}: must be 0 or 1")
    return raw == "1"


def _reduce(w: World, buf, mode: str):
    """The sum over ranks of ``buf`` (one contiguous 1-D array), the same on every rank; an MPI
    failure (a peer that died under a launcher that does not end the job) is a DistributedError."""
    from mpi4py import MPI

    try:
        return _reduce_unchecked(w, buf, mode)
    except MPI.Exception as exc:
        raise DistributedError(
            f"the all-reduce failed on rank {w.rank} of {w.size} ({exc.Get_error_string()}): another rank died or "
            "the network failed; the run directory keeps its last good checkpoint: continue with mpiexec -n N "
            "nested-learning train --resume RUN_DIR") from None


def timeout_s() -> float:
    """``NL_MPI_TIMEOUT``: seconds a rank waits in one reduction for the others (default 600, longer
    than any first step with its compilation; 0 waits for ever) before it stops the run."""
    raw = os.environ.get("NL_MPI_TIMEOUT", "600")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise DistributedError(f"NL_MPI_TIMEOUT={raw!r}: must be a number of seconds >= 0 (0: no limit)")
    return value


def _wait(w: World, req) -> None:
    """Wait for the non-blocking collective ``req``, at most ``timeout_s()``: a peer that hangs, or
    died under a launcher that does not end the job (MPICH's hydra does end it, measured), would
    otherwise leave this rank waiting in the reduction for ever. Polls for 10 ms, then every 0.5 ms
    (on a machine with more ranks than cores the waiting rank leaves the core to the others)."""
    limit = timeout_s()
    if limit == 0:
        req.Wait()
        return
    t0 = time.monotonic()
    while not req.Test():
        waited = time.monotonic() - t0
        if waited > limit:
            raise DistributedError(
                f"rank {w.rank} of {w.size} waited {waited:.0f} s in the all-reduce for the other ranks "
                f"(NL_MPI_TIMEOUT={limit:g}): one died or hangs; the run directory keeps its last good checkpoint: "
                "continue with mpiexec -n N nested-learning train --resume RUN_DIR")
        if waited > 0.01:
            time.sleep(0.0005)


def _reduce_unchecked(w: World, buf, mode: str):
    from mpi4py import MPI

    if mode == "sum":
        _wait(w, w.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
        return buf
    xp = _xp(buf)
    rows = xp.empty((w.size, buf.shape[0]), dtype=buf.dtype) if w.is_root else None
    _wait(w, w.comm.Igather(buf, rows, root=0))
    if w.is_root:  # rank order, left to right: ((s0 + s1) + s2) + ...
        acc = rows[0].copy()
        for r in range(1, w.size):
            acc = acc + rows[r]
        buf[...] = acc
    _wait(w, w.comm.Ibcast(buf, root=0))
    return buf


def _reduce_any(w: World, buf, mode: str):
    """``_reduce`` of a NumPy or CuPy buffer: a CuPy one in place on a CUDA-aware MPI, else staged
    through the host."""
    if not hasattr(buf, "__cuda_array_interface__"):
        return _reduce(w, buf, mode)
    import cupy

    if cuda_aware():
        cupy.cuda.get_current_stream().synchronize()  # MPI reads the buffer outside CuPy's stream
        return _reduce(w, buf, mode)
    host = _reduce(w, cupy.asnumpy(buf), mode)
    return cupy.asarray(host)


def allreduce(w: World, grads: dict, loss: float, weight: float, digest: int = 0,
              timer: dict | None = None) -> tuple[dict, float]:
    """(sum over ranks of ``weight * grads``, sum of ``weight * loss``) by one fused reduction of
    the gradients (plus, in float32, one 24-byte float64 reduction of the loss and the digest).

    ``grads`` maps names to arrays of one dtype (NumPy, or CuPy on the GPU port); the result has
    the same names, shapes and dtype, views into the reduced buffer. ``digest`` (``batch_digest``
    of the global batch) must be the same on every rank: DistributedError otherwise. ``timer``, when
    given, gets ``"allreduce_s"`` added (the seconds spent packing, reducing and unpacking)."""
    import numpy as np

    t0 = time.perf_counter()
    names = list(grads)
    leaves = [grads[k] for k in names]
    dtype = leaves[0].dtype
    if any(x.dtype != dtype for x in leaves):
        raise DistributedError(f"the gradients mix dtypes ({sorted({str(x.dtype) for x in leaves})}); one fused "
                               "buffer needs one dtype")
    xp = _xp(leaves[0])
    sizes = [int(x.size) for x in leaves]
    n = sum(sizes)
    fused_control = dtype == np.float64
    control = [weight * float(loss), float(digest), float(digest) * float(digest)]
    buf = xp.empty(n + (3 if fused_control else 0), dtype=dtype)
    wt = dtype.type(weight)
    offset = 0
    for x, k in zip(leaves, sizes, strict=True):
        xp.multiply(x.reshape(-1), wt, out=buf[offset:offset + k])
        offset += k
    mode = reduce_mode()
    if fused_control:
        buf[n:] = xp.asarray(control, dtype=dtype)
        buf = _reduce_any(w, buf, mode)
        ctl = [float(v) for v in buf[n:].tolist()]
    else:
        buf = _reduce_any(w, buf, mode)
        ctl = _reduce(w, np.asarray(control, dtype=np.float64), mode).tolist()
    loss_sum, d_sum, d2_sum = ctl
    if d_sum * d_sum != w.size * d2_sum:  # equality holds iff every rank's digest is the same
        raise DistributedError(
            f"the ranks drew different batches (batch digests differ; this rank's {digest:#07x}): every rank "
            "must read the same --data at the same path with the same seed and sampler position")
    out, offset = {}, 0
    for name, x, k in zip(names, leaves, sizes, strict=True):
        out[name] = buf[offset:offset + k].reshape(x.shape)
        offset += k
    if timer is not None:
        timer["allreduce_s"] = timer.get("allreduce_s", 0.0) + time.perf_counter() - t0
    return out, loss_sum


def local_batch(tokens, w: World | None = None):
    """(this rank's rows of the global batch ``tokens`` (B, T + 1), their weight ``B_r / B``): what a
    loop that accumulates gradients over micro-batches splits further, before its one ``allreduce``
    (with ``batch_digest`` of the global batch). A one-rank world: (tokens, 1.0)."""
    w = w or world()
    if w.size == 1:
        return tokens, 1.0
    mine = shares(tokens.shape[0], w.size)[w.rank]
    return tokens[mine], (mine.stop - mine.start) / tokens.shape[0]


def accumulate(be, params, rows, mc, micro: int):
    """Gradient accumulation (SPEC.md#training): ``be.loss_and_grads`` of ``rows`` (n, T + 1) as
    ``micro`` micro-batches (``shares(n, micro)``, fewer when n < micro), combined with the weights
    ``n_i / n``: the mean loss and gradient of all n rows, as one call on them computes (to
    round-off), with the memory of one micro-batch."""
    n = rows.shape[0]
    parts = shares(n, min(micro, n))
    if len(parts) == 1:
        return be.loss_and_grads(params, rows, mc)
    loss, acc = 0.0, None
    for part in parts:
        l_i, g_i = be.loss_and_grads(params, rows[part], mc)
        wt = (part.stop - part.start) / n
        loss += wt * float(l_i)
        if acc is None:
            acc = {k: g * g.dtype.type(wt) for k, g in g_i.items()}
        else:
            for k, g in g_i.items():
                acc[k] += g * g.dtype.type(wt)
    return loss, acc


def loss_and_grads(be, params, tokens, mc, w: World | None = None, timer: dict | None = None, micro: int = 1):
    """``be.loss_and_grads`` of the global batch ``tokens`` (B, T + 1), computed over the world:
    this rank's rows ``shares(B, N)[rank]`` (as ``micro`` accumulated micro-batches, ``accumulate``),
    then the fused all-reduce, one per step. A one-rank world without accumulation is exactly
    ``be.loss_and_grads(params, tokens, mc)`` (no copy, no reduction)."""
    w = w or world()
    if w.size == 1:
        return accumulate(be, params, tokens, mc, micro)
    rows, weight = local_batch(tokens, w)
    t0 = time.perf_counter()
    loss, grads = accumulate(be, params, rows, mc, micro)
    if timer is not None:
        be.synchronize()
        timer["compute_s"] = timer.get("compute_s", 0.0) + time.perf_counter() - t0
    grads, loss = allreduce(w, grads, float(loss), weight, batch_digest(tokens), timer)
    return loss, grads


def any_rank(flag: bool, w: World | None = None) -> bool:
    """True on every rank when ``flag`` is true on any (a logical OR over the world; collective:
    every rank calls it at the same point of the step). A stop one rank decides alone (a SIGINT that
    reached it between two steps) goes through it, so every rank stops after the same step. A
    one-rank world: ``flag``."""
    w = w or world()
    if w.size == 1:
        return bool(flag)
    import numpy as np

    buf = np.array([1.0 if flag else 0.0])
    return bool(_reduce(w, buf, "sum")[0] > 0)


# ------------------------------------------------------------------------------------------------
# The layout
# ------------------------------------------------------------------------------------------------


def _cpu_layout(size: int) -> str:
    """The CPU port's local split (its groups and workers) under ``size`` ranks, without importing Numba."""
    groups = os.environ.get("NL_CPU_GROUPS", "2")
    workers = os.environ.get("NL_CPU_WORKERS", "thread")
    threads = os.environ.get("NL_CPU_THREADS", "0")
    return (f"cpu backend: {size} rank{'s' * (size != 1)} x NL_CPU_GROUPS={groups} batch groups, each rank's "
            f"groups on {workers} workers (NL_CPU_THREADS={threads})")


def layout(w: World | None = None, backend: str | None = None, batch_size: int | None = None) -> str:
    """One line: the ranks (and the hosts and cores they share), the split of a batch, the CPU port's
    groups per rank. Collective under MPI (every rank must call it: the hosts are gathered)."""
    w = w or world()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    host = socket.gethostname()
    if w.size == 1:
        where = "1 process (no MPI launcher" + (")" if _mpi4py_version() is None else
                                                f"; mpiexec -n N runs N ranks, mpi4py {_mpi4py_version()})")
        hosts = {host: (1, cores)}
    else:
        seen = w.comm.allgather((host, cores))
        hosts = {}
        for h, c in seen:
            n, _ = hosts.get(h, (0, c))
            hosts[h] = (n + 1, c)
        where = f"{w.size} MPI ranks ({w.library}; NL_MPI_REDUCE={reduce_mode()})"
    per_host = ", ".join(f"{h}: {n} rank{'s' * (n != 1)} on {c} cores" for h, (n, c) in hosts.items())
    line = f"{where}; {per_host}"
    if batch_size is not None and w.size > 1:
        sz = [s.stop - s.start for s in shares(batch_size, w.size)]
        line += f"; a batch of {batch_size} splits {'+'.join(map(str, sz))}"
    if backend in (None, "cpu"):
        line += f"; {_cpu_layout(w.size)}"
    return line


def local_rank(w: World | None = None) -> tuple[int, int]:
    """(this rank's index among the ranks on its node, their count); collective under MPI."""
    w = w or world()
    if w.size == 1:
        return 0, 1
    from mpi4py import MPI

    node = w.comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def pick_gpu(w: World, backend: str, echo: Callable[[str], None] = print) -> str | None:
    """One CUDA device per rank on a node (the ``torchrun`` habit): device ``local_rank % count`` of
    the devices this process sees (``CUDA_VISIBLE_DEVICES`` narrows them), made current before the
    GPU port allocates anything. Collective under MPI. Returns what was chosen (None: not the
    GPU port on CuPy, or one rank)."""
    local, per_node = local_rank(w)
    if backend != "gpu" or w.size == 1:
        return None
    from nlref import backends

    if backends.get("gpu").model.NAMESPACE != "cupy":
        return None
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    device = local % count
    cupy.cuda.Device(device).use()
    if per_node > count and local == 0:
        echo(f"distributed: {per_node} ranks share this node's {count} CUDA device(s); start at most {count} "
             "ranks per node for one device each")
    return f"rank {w.rank}: CUDA device {device} of {count}"


def _mpi4py_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("mpi4py")
    except md.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# A run over the world
# ------------------------------------------------------------------------------------------------


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """The run's own files (rundir.RUN_FILES) in ``run_dir`` as bytes (rank 0's view at the start)."""
    from nlref import rundir

    out = {}
    for name in rundir.RUN_FILES:
        p = run_dir / name
        if p.is_file():
            out[name] = p.read_bytes()
    return out


ABORT_FLUSH_S = 0.3
"""Seconds ``_fail`` waits between writing its line and MPI_Abort: the launcher (hydra) relays each
rank's output through a pipe, and an abort that lands first can drop the line (seen on a loaded
machine: a test's expected message never arrived)."""


def _fail(w: World, exc: BaseException, scratch: Path | None = None, code: int = 1) -> None:
    """Report ``exc`` once and end every rank (MPI_Abort): rank 0 at once; another rank after
    ``FOLLOWER_GRACE_S``, so that rank 0 reports an error every rank met. A run error (TrainingError:
    the message says what to do) is one line; anything else comes with its traceback."""
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    if not w.is_root:
        time.sleep(FOLLOWER_GRACE_S)
    who = "" if w.is_root else f" (rank {w.rank} of {w.size})"
    msg = "interrupted" if isinstance(exc, KeyboardInterrupt) else (str(exc) or type(exc).__name__)
    sys.stdout.flush()
    if not isinstance(exc, TrainingError | KeyboardInterrupt | OSError):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"Error{who}: {msg}; every rank stopped (MPI_Abort)\n")
    sys.stderr.flush()
    time.sleep(ABORT_FLUSH_S)  # the launcher relays a rank's output through a pipe: let the line through first
    w.comm.Abort(code)
    # MPI_Abort "does not return" by the standard, but MPICH's can return before the launcher's
    # kill lands (seen under load: the CLI then printed the error a second time): end here
    os._exit(code)


def train(rc, run_dir, resume: bool = False, echo: Callable[[str], None] = print, tty: bool = False,
          overwrite: bool = False) -> dict | None:
    """``training.train`` over the world (SPEC.md#distributed): on one rank, exactly it. On N ranks
    rank 0 runs it on ``run_dir``, the others on a private temporary copy of rank 0's run files
    with ``rc`` taken from rank 0 and their output silenced; every rank returns the summary.

    On one rank an exception propagates as usual; on N ranks any exception is reported once and
    the whole job aborted (``_fail``): a rank that returned alone would leave the others waiting."""
    from nlref import training

    w = world()
    if w.size == 1:
        return training.train(rc, run_dir, resume=resume, echo=echo, tty=tty, overwrite=overwrite)
    run_dir = Path(run_dir)
    scratch = None
    try:
        rc = w.comm.bcast(rc if w.is_root else None, root=0)
        check_batch(rc.train.batch_size * rc.train.grad_accum, w)  # the global batch of one step
        files = w.comm.bcast(_snapshot(run_dir) if w.is_root and resume and run_dir.is_dir() else None, root=0)
        where = layout(w, rc.train.backend, rc.train.batch_size)
        pick_gpu(w, rc.train.backend, echo if w.is_root else (lambda s: None))
        if w.is_root:
            echo(f"distributed: {where}")
            return training.train(rc, run_dir, resume=resume, echo=echo, tty=tty, overwrite=overwrite)
        scratch = Path(tempfile.mkdtemp(prefix=f"nl-rank{w.rank}-"))
        for name, payload in (files or {}).items():
            (scratch / name).write_bytes(payload)
        return training.train(rc, scratch, resume=resume and files is not None, echo=lambda s: None, tty=False,
                              overwrite=overwrite)
    except BaseException as exc:  # noqa: B036  (a rank that stops alone would leave the others waiting)
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        if isinstance(exc, training.Interrupted):  # every rank stopped after the same step (any_rank)
            raise
        _fail(w, exc, scratch)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


__all__ = ["DistributedError", "World", "allreduce", "any_rank", "batch_digest", "check_batch", "launched", "layout",
           "local_batch", "local_rank", "loss_and_grads", "pick_gpu", "shares", "train", "world"]
