"""Run directories: the writer's lock, orphaned temp files, the memory a step needs, edited configs.

Paper: none (infrastructure for the training runs of SPEC.md#training). arXiv 2512.24695v1.

Decisions (SPEC.md#run-directories):

- **One writer**: ``train`` holds an exclusive ``fcntl.flock`` on ``RUN_DIR/train.lock`` for its
  whole life and writes its pid into the file. A second ``train`` on the same directory fails at
  once naming that pid. The lock is advisory and belongs to the open file, so the OS drops it when
  the holder exits or is killed: a killed run never leaves a stale lock. The file itself stays
  (removing it would let a third process lock a different inode while the second still holds the
  old one).
- **Orphaned temp files**: an atomic write (``checkpoint.atomic_write_bytes``) killed before its
  ``os.replace`` leaves ``.NAME.XXXX.tmp``; the next ``train`` on the directory, holding the lock,
  removes those of the run's own files and says how many bytes it freed.
- **Memory**: before the first step the memory a training step needs is estimated (parameters,
  gradients and optimizer state, plus the activations the backward keeps) and compared with the
  memory this process can get (MemAvailable, the cgroup limit, RLIMIT_AS); a step that cannot fit
  is refused with both numbers. The estimate counts only what a step certainly holds, so it
  errs low: it never refuses a run that would fit.
- **Ctrl-C stops at a step boundary**: while a run trains, SIGINT and SIGTERM set a flag
  (``StopOnSignal``); after the step in flight, the loop writes a checkpoint and stops with
  ``training.Interrupted`` (the CLI exits 130, or 143 for SIGTERM), so ``--resume`` continues
  exactly. A second SIGINT aborts at once (KeyboardInterrupt: the last checkpoint stays). Under
  MPI the flag goes through ``distributed.any_rank``, so every rank stops after the same step.
- **Resume compares the whole config**: every key of ``train`` (but the ones that may change on
  resume), ``model`` and ``optimizer_hparams`` in the run's ``config.toml`` must equal the
  checkpoint's; the error names each changed key with both values.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

LOCK_NAME = "train.lock"
CHECKPOINT_NAME = "checkpoint.safetensors"
# The files a run writes; --overwrite removes exactly these (never anything else in the folder).
RUN_FILES = ("config.toml", "config.json", "data.json", "metrics.jsonl", CHECKPOINT_NAME, "summary.json",
             "tokenizer.json")  # tokenizer.json: a BPE or user tokenizer's copy (SPEC.md#data)
# Training keys that may change when a run is resumed (they do not change the loss trajectory,
# or, for steps, change it only from the resumed step on: SPEC.md#training).
RESUME_OK = ("steps", "eval_every", "checkpoint_every", "log_every", "early_stop_patience")


class TrainingError(Exception):
    """A run that cannot start or go on; the message says why and what to do (re-exported as
    ``training.TrainingError``, defined here so this module needs nothing from training.py)."""


class RunDirError(TrainingError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------
# The writer's lock
# ------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive advisory lock on ``run_dir`` (``train.lock``), held until ``release``.

    ``acquire`` fails at once (never waits) with a ``RunDirError`` naming the holder's pid.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented in SPEC.md#run-directories)
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        except OSError as exc:
            raise RunDirError(f"{self.path.parent}: cannot create the lock file {LOCK_NAME} "
                              f"({exc.strerror or exc}); choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process (pid not yet written)"
            raise RunDirError(f"{self.path.parent} is in use: another train ({who}) is writing to it. "
                              "Wait for it to end or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_pid(fd: int, wait_s: float = 2.0) -> int | None:
    """The pid the lock's holder wrote (it writes it just after locking: wait for it, at most
    ``wait_s`` seconds; None if it never appears)."""
    deadline = time.monotonic() + wait_s
    while True:
        raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if raw.isdigit():
            return int(raw)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# The directory's files
# ------------------------------------------------------------------------------------------------


class StopOnSignal:
    """SIGINT / SIGTERM as a request to stop at the next step boundary (module docstring), for the
    life of a ``with`` block; the handlers before it come back after. In a thread other than the
    main one (where Python allows no handler) it installs nothing and never asks to stop."""

    NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}

    def __init__(self, echo):
        self.echo, self.signum, self.remote, self._old = echo, None, False, {}

    @property
    def name(self) -> str:
        if self.remote:
            return "a stop signal on another rank"
        return self.NAMES.get(self.signum, f"signal {self.signum}")

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        self.signum = signum
        self.echo(f"\n{self.name}: stopping after this step and writing a checkpoint "
                  "(Ctrl-C again to abort without it)")

    def asked(self) -> bool:
        """Whether to stop after the step just done: on every rank when any rank got the signal (collective).
        A rank that got none stops as if by SIGINT (exit 130), named as another rank's signal."""
        from nlref import distributed

        if not distributed.any_rank(self.signum is not None):
            return False
        if self.signum is None:
            self.signum, self.remote = signal.SIGINT, True
        return True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.NAMES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


def make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents); an OS error becomes one clear RunDirError."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"--out {run_dir}: a file of that name exists; choose a directory path") from None
    except OSError as exc:
        raise RunDirError(f"--out {run_dir}: cannot create the run directory ({exc.strerror or exc}); "
                          "choose a writable place") from None


def has_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


def remove_run_files(run_dir: Path) -> list[str]:
    """``--overwrite``: delete the run's own files (RUN_FILES), nothing else; return their names."""
    removed = []
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_file():
            p.unlink()
            removed.append(name)
    return removed


def orphaned_temp_files(run_dir: Path) -> list[Path]:
    """Temp files an interrupted atomic write of one of the run's files left (``.NAME.*.tmp``)."""
    out = []
    for name in RUN_FILES:
        out += sorted(p for p in run_dir.glob(f".{name}.*.tmp") if p.is_file())
    return out


def remove_orphaned_temp_files(run_dir: Path) -> tuple[int, int]:
    """Remove the orphaned temp files (call with the lock held); return (count, bytes)."""
    n = size = 0
    for p in orphaned_temp_files(run_dir):
        try:
            size += p.stat().st_size
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n, size


# ------------------------------------------------------------------------------------------------
# Memory: estimate a training step, compare with what the process can get
# ------------------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} bytes"


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of MemAvailable, the cgroup's free
    memory and RLIMIT_AS (None where none of them is known)."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw.isdigit() and int(raw) < 2**60:
                limits.append(int(raw) - int(Path(usage_file).read_text().strip()))
                break
        except (OSError, ValueError):
            continue
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return max(0, min(limits)) if limits else None


def estimate_step_bytes(rc) -> dict:
    """A lower estimate of the bytes one training step of ``rc`` holds at its peak.

    Parameters, gradients and two optimizer buffers (4 copies of the parameters); the logits and
    their float64 softmax and gradient (3 B(T+1)V floats, 8 bytes each); per block the residual
    stream, its norm and the mixer's and MLP's inputs (4 B T D) plus the widest hidden layer
    (B T F); attention's scores (B H T^2 per block). Returns the parts and their sum.
    """
    from nlref.reference import model
    from nlref.reference.contract import has_kv_cache

    mc, tc = rc.model, rc.train
    item = 8 if mc.dtype == "float64" else 4
    B, T = tc.batch_size, tc.seq_len
    n_params = sum(model.param_counts(mc).values())
    hidden = max([mc.mlp_hidden] + [lv.hidden for lv in mc.cms_levels])
    weights = 4 * n_params * item
    acts = 3 * B * (T + 1) * mc.vocab_size * 8 + mc.n_layers * B * T * (4 * mc.d_model + hidden) * item
    if has_kv_cache(mc):  # titans-mag's window masks the full score matrix too (SPEC.md#primitives)
        acts += mc.n_layers * B * mc.n_heads * T * T * item
    return {"parameters": n_params, "weights": weights, "activations": acts, "total": weights + acts}


def check_fits_in_memory(rc, available: int | None = None) -> None:
    """Refuse (RunDirError) a run whose training step cannot fit in the memory available."""
    available = available_memory() if available is None else available
    if available is None:
        return
    est = estimate_step_bytes(rc)
    if est["total"] > available:
        tc, mc = rc.train, rc.model
        raise RunDirError(
            f"a training step of {mc.name} (d_model {mc.d_model}, {est['parameters']:,} parameters) at batch "
            f"{tc.batch_size} x seq_len {tc.seq_len} needs at least {fmt_bytes(est['total'])} of memory "
            f"(estimate: {fmt_bytes(est['weights'])} for parameters, gradients and optimizer state, "
            f"{fmt_bytes(est['activations'])} for activations), more than the {fmt_bytes(available)} "
            "available; lower --seq-len or --batch-size, or the model's width")


# ------------------------------------------------------------------------------------------------
# Resume: the run's config against its checkpoint's
# ------------------------------------------------------------------------------------------------


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, now: dict) -> list[str]:
    """'key: checkpoint X, config.toml Y' for every key of the resolved run configs that differs,
    except the training keys that may change on resume (RESUME_OK). Both are ``RunConfig.to_dict()``
    after a JSON round trip (tuples as lists)."""
    a, b = _flat(saved), _flat(now)
    skip = {f"train.{k}" for k in RESUME_OK}
    out = []
    for key in sorted(set(a) | set(b)):
        if key in skip:
            continue
        x, y = a.get(key, "<missing>"), b.get(key, "<missing>")
        if x != y and not (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            out.append(f"{key.removeprefix('train.')}: checkpoint {x!r}, config.toml {y!r}")
    return out
