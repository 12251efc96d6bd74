"""``nested-learning bench``: training-step and streaming-decode timings per backend, in one run.

SPEC: SPEC.md#fast-cpu (what is measured and how), SPEC.md#fast-gpu (the GPU rows). Every number
of one run comes from the same machine and process, with the same BLAS thread limit for every
backend (``NL_CPU_BLAS_THREADS``, default 1: the CPU port's setting, applied to the reference too
so the ratio compares code, not thread settings). The rows: the package's backends (``reference``,
``cpu``, ``gpu``: backends.py, SPEC.md#backends, each timed through its ``Backend``) and the
PyTorch peers ``torch`` and ``torch-cuda`` (torch_model.py; ``backends.PEERS``).

- training step: ``loss_and_grads`` + one AdamW update (reference/optimizers.py) on a batch of
  random bytes; the first call is timed on its own (for the CPU port it includes Numba's
  compilation or cache load, for the GPU rows CUDA's start-up and kernel compilation), then
  ``repeats`` steps whose median gives tokens/s;
- achieved GFLOP/s: a model-FLOP estimate (6 x matmul parameters x tokens, plus 6 T^2 D per layer
  and sequence for causal attention, plus 3 x the memory layers' inner products per token:
  ``memory_layer_flops``, their reads, inner gradients and writes; the in-context CMS levels'
  re-runs are NOT counted, so for hope families this still understates the work) over the step time,
  and its fraction of the matrix-product rate of the row's device measured at the start of the
  run (CPU: a 512^3 product in the run's dtype under the same thread limit; GPU: an
  ``GPU_MATMUL_N``^3 product in the run's dtype on the card, TF32 off unless ``CUPY_TF32=1``);
- ``vs <base>``: tokens/s over those of the run's first backend on the same preset (``vs ref``
  when that is the reference; ``vs_reference`` in the JSON rows is always against the reference);
- streaming decode: a batch-1 context of ``context`` random tokens fed through ``forward`` in
  pieces of ``PREFILL_PIECE`` tokens carrying the streaming state (the same state one call would
  produce; pieces bound the prefill's temporaries), then ``DECODE_WARMUP`` untimed tokens, then
  ``decode_tokens`` single-token ``forward`` calls carrying the state, each timed: the median and
  the mean per token (the mean includes the in-context CMS writes that fall every ``period``
  tokens; the median mostly does not), and the state's size in bytes after the decode (O(1) in
  the context for the memory families, the KV cache for attention; measured after the decode so
  that every context has been through several calls: from its second call on, a state also holds
  the memory states at the start of the current chunk);
- a context is skipped, with its reason, when its prefill is predicted to take longer than
  ``prefill_seconds`` (default ``PREFILL_BUDGET`` x ``max_seconds``; predicted from the previous
  context's prefill rate, linear in the context for the memory families and quadratic for
  attention; from the training step's tokens/s for the first), when a prefill overruns twice that,
  and for attention families beyond ``ATTENTION_MAX_CONTEXT``
  tokens (their KV cache and per-token cost grow with the context: that is not a flat decode);
- a (preset, backend) whose first step took longer than ``max_seconds`` reports that first call
  as its step time (marked ``*``; no further step and no decode is run);
- ``time_budget`` (seconds from the start of the run): once spent, no further (preset, backend)
  and no further decode context is started (each is reported skipped, with that reason); a step
  or a prefill already running is not interrupted;
- the PyTorch peer ``torch`` keeps every token's memory states in its autograd graph (its hope
  step at 4 x 256 needs ~12 GB, hope-medium ~25 GB): before its row a child process times one
  step at the run's batch and ``MEMORY_PROBE_T`` tokens, and the row is skipped, with the
  prediction, when that per-token peak times batch x seq_len exceeds the budget (``MEMORY_SHARE``
  of the memory available then, at most ``max_memory_gb``): an out-of-memory kill would end the
  whole run (measured: hope-medium's row took the 24 GB machine and the kernel killed the bench);
- a (preset, backend) that raises is reported ``error: ...`` with its traceback, and the run goes
  on (the CLI then exits 1); JSON rows (``json_out``) are written as each row ends, so a run
  killed from outside keeps the rows it finished.

The GPU rows (SPEC.md#fast-gpu). ``gpu`` is the GPU port (fast/gpu/model.py: the reference's code
over CuPy): parameters, tokens and AdamW state (fast.gpu.model.optimizers(): reference/optimizers.py
over the device namespace) stay on the device across steps, ``loss_and_grads(..., as_numpy=False)``
and ``forward(..., as_numpy=False)`` return device arrays, and the clock is read only after
``synchronize()``. Under ``NL_GPU_NAMESPACE=numpy`` the same code path runs on the CPU (no card:
the rate is the CPU's; that is how CI exercises it). ``torch-cuda`` is ``torch_model`` (PyTorch
eager, gradients by autograd) on ``TORCH_CUDA_DEVICE`` with its parameters and optimizer state on
the device across steps (``torch_model.Trainer``); THIS ROW'S UPDATE IS ``torch.optim.AdamW``
(the same hyperparameters as reference/optimizers.py's AdamW: lr 1e-3, betas (0.9, 0.999), eps
1e-8, decoupled weight decay 1e-2), its decode is ``torch_model.forward_tensors``, TF32 is off,
and the clock is read after ``torch.cuda.synchronize()``. CUDA's context and cuBLAS start before
either GPU row's first call (in gpu_info's matrix product; in the torch-cuda backend's set-up), so
a first call holds kernel compilation and first-use costs, not the context's creation. Without
CuPy or a CUDA device these rows say ``no GPU: <reason>`` and the other backends still run.

``startup_times`` (``python -m nlref.bench startup [PRESET]``) measures the cached
compile: two fresh Python processes, one after the other, with the same ``NUMBA_CACHE_DIR`` (a new
empty directory unless given), each timed from its launch to the end of its first CPU-port training
step at batch 4 x 256 (imports, parameters, compile or cache load, the step).

``--backend torch`` times ``torch_model`` (PyTorch eager on CPU, the ``oracle`` extra; gradients
by autograd) under ``torch.set_num_threads`` = the CPU port's thread count (``cpu_threads``: its batch
groups run on that many threads, SPEC.md#fast-cpu) times the BLAS limit; its gradients come back as
NumPy and take the same AdamW update (reference/optimizers.py) as every other host backend.
Without torch the row says so.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import time
import traceback

import numpy as np

from . import backends as backends_mod

DEFAULT_PRESETS = ("transformer-tiny", "hope-attention-tiny", "titans-tiny", "hope-tiny", "transformer-small",
                   "hope-attention-small", "titans-small", "hope-small")
CHOICES = backends_mod.NAMES + backends_mod.PEERS  # the package's backends (backends.py) and the PyTorch peers
TORCH_CUDA_DEVICE = "cuda"  # the torch-cuda row's device (the tests run that code path on "cpu")
GPU_MATMUL_N = 8192  # the card's matrix-product rate: an N^3 product (2 N^3 flops)
ADAMW_LR = 1e-3


class NotAvailable(Exception):
    """A backend cannot run here; the message says why."""


class NoGPU(NotAvailable):
    """A GPU backend cannot run here; the message says why."""


def _device(name: str) -> str:
    """Where the rows of ``name`` compute: "cpu" or "gpu"."""
    if name in backends_mod.PEERS:
        return "gpu" if name == "torch-cuda" else "cpu"
    return backends_mod.get(name).device


def _blas_threads() -> int:
    return int(os.environ.get("NL_CPU_BLAS_THREADS", "1"))


def cpu_threads(batch_size: int) -> tuple[int, int]:
    """(groups, threads) of the CPU port's training step at this batch size (SPEC.md#fast-cpu:
    ``NL_CPU_GROUPS``, ``NL_CPU_THREADS``). The torch peer gets the same number of threads."""
    from .fast.cpu import model as cpu

    groups = len(cpu.batch_groups(batch_size))
    return groups, cpu.worker_threads(groups)


# ---------------------------------------------------------------------------------------------
# Backends: what the timing loops need from each (arrays on its device, its AdamW step, a barrier)
# ---------------------------------------------------------------------------------------------


class _AdamWSteps:
    """Calling it does one training step: ``loss_and_grads`` then the AdamW ``update`` of the
    optimizers module given (reference/optimizers.py, over NumPy or over the device namespace)."""

    def __init__(self, loss_and_grads, optimizers, params, tokens, cfg):
        self.loss_and_grads, self.tokens, self.cfg = loss_and_grads, tokens, cfg
        self.opt = optimizers.make("adamw", lr=ADAMW_LR)
        self.params, self.state = params, self.opt.init(params)

    def __call__(self):
        _, grads = self.loss_and_grads(self.params, self.tokens, self.cfg)
        self.params, self.state = self.opt.update(self.params, grads, self.state)


class _Timed:
    """A backend of the package (backends.py ``Backend``) as the timing loops use it: parameters,
    tokens, AdamW state and the streaming state on its device (the GPU port's stay there), its
    AdamW (reference/optimizers.py over its arrays), its barrier."""

    def __init__(self, be: backends_mod.Backend):
        self.be, self.device = be, be.device

    def params(self, cfg):
        return self.be.to_device(self.be.model.init_params(cfg, 0))

    def forward(self, params, tokens, cfg, state=None):
        return self.be.forward(params, tokens, cfg, state)

    def stepper(self, params, tokens, cfg):
        return _AdamWSteps(self.be.loss_and_grads, self.be.optimizers(), params, self.be.to_device(tokens), cfg)

    def device_tokens(self, tokens):
        return self.be.to_device(tokens)

    def synchronize(self):
        self.be.synchronize()


class _TorchBackend:
    """torch_model on the CPU: NumPy in and out, the reference's AdamW, nothing to wait for."""

    device = "cpu"

    def __init__(self, model):
        self.model = model

    def params(self, cfg):
        return self.model.init_params(cfg, 0)

    def forward(self, params, tokens, cfg, state=None):
        return self.model.forward(params, tokens, cfg, state)

    def stepper(self, params, tokens, cfg):
        from .reference import optimizers

        return _AdamWSteps(self.model.loss_and_grads, optimizers, params, tokens, cfg)

    def device_tokens(self, tokens):
        return tokens

    def synchronize(self):
        pass


class _TorchStep:
    def __init__(self, trainer, tokens):
        self.trainer, self.tokens = trainer, tokens

    def __call__(self):
        self.trainer.step(self.tokens)


class _TorchDeviceBackend:
    """torch_model on ``TORCH_CUDA_DEVICE``: tensors stay there; torch.optim.AdamW (see the module
    docstring)."""

    device = "gpu"

    def __init__(self, device: str):
        try:
            from . import torch_model
        except ImportError as exc:
            raise NoGPU(f"PyTorch is not installed ({exc})") from None
        torch = torch_model.torch
        self.dev = torch.device(device)
        if self.dev.type == "cuda":
            if not torch.cuda.is_available():
                raise NoGPU(f"torch {torch.__version__} sees no CUDA device")
            torch_model.no_tf32()
            a = torch.ones((8, 8), device=self.dev)  # CUDA's context and cuBLAS start here, not in the
            float((a @ a).sum())  # first call (see the module docstring)
        self.tm, self.torch = torch_model, torch

    def _tensor(self, tokens):
        return self.torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.dev)

    def params(self, cfg):
        return self.tm.init_from_params(self.tm.init_params(cfg, 0), cfg, self.dev)

    def forward(self, params, tokens, cfg, state=None):
        return self.tm.forward_tensors(params, self._tensor(tokens), cfg, state)

    def stepper(self, params, tokens, cfg):
        host = {k: v.detach().cpu().numpy() for k, v in params.items()}  # the Trainer keeps its own copy
        return _TorchStep(self.tm.Trainer(host, cfg, self.dev, lr=ADAMW_LR), self._tensor(tokens))

    def device_tokens(self, tokens):
        return self._tensor(tokens)

    def synchronize(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)


def _backend(name: str, batch_size: int = 4):
    """The backend ``name`` (one of ``CHOICES``); ImportError (a missing extra), NoGPU (why a GPU
    row cannot run) or NotAvailable (why another cannot)."""
    if name == "torch":
        from . import torch_model as model  # ImportError naming the oracle extra without torch

        # the CPU port's thread count (its batch groups run on that many threads; BLAS inside each
        # stays at the run's limit), so both use the same cores
        model.torch.set_num_threads(cpu_threads(batch_size)[1] * _blas_threads())
        return _TorchBackend(model)
    if name == "torch-cuda":
        return _TorchDeviceBackend(TORCH_CUDA_DEVICE)
    if name not in CHOICES:
        raise ValueError(f"backend {name!r} is not implemented (choose one of {', '.join(CHOICES)})")
    be = backends_mod.get(name)
    ok, why = be.available()
    if not ok:
        raise (NoGPU if be.on_device else NotAvailable)(why)
    return _Timed(be)


# ---------------------------------------------------------------------------------------------
# The memory guard of the PyTorch peer
# ---------------------------------------------------------------------------------------------

MEMORY_PROBE_T = 32  # tokens per sequence of the probe's step (at most the run's seq_len), at the run's batch
MEMORY_SHARE = 0.9  # of the memory available when a row starts: the default budget


def peak_rss_kib() -> float:
    """This process's peak resident memory in KiB: ``VmHWM`` of /proc/self/status (the high-water
    mark of its own address space, new at exec), else ``ru_maxrss``. Not ``ru_maxrss`` first: Linux
    carries it across fork and exec, so a child started by a large process would report the
    parent's size as its own peak (measured: a probe started after a hope-small CPU row read
    7.5 MB per token instead of 11.9)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def step_kib_per_token(preset: str, backend: str, batch: int, seq_len: int, dtype: str) -> float:
    """KiB of peak resident memory per token of one training step of ``batch`` x ``seq_len``
    tokens, measured in this process from before the step (run by ``probe_step_memory`` in a fresh
    child, so the high-water mark is the step's own). For the PyTorch peer, which compiles nothing
    and keeps its autograd graph of every token's state."""
    from . import config
    from .fast.cpu import allocator

    allocator.tune()  # as the bench's own process (the command line's)
    timed = _backend(backend, batch)
    cfg = dataclasses.replace(config.preset(preset), dtype=dtype)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, seq_len))
    step = timed.stepper(timed.params(cfg), tokens, cfg)
    base = peak_rss_kib()
    step()
    timed.synchronize()
    return (peak_rss_kib() - base) / (batch * seq_len)


def probe_step_memory(preset: str, backend: str, batch: int, seq_len: int, dtype: str, timeout: float):
    """(KiB per token from ``step_kib_per_token`` in a fresh process, None, False) or (None, why it
    failed, killed): ``killed`` when a signal ended the child (most often the kernel's OOM killer, so
    the row itself would be killed too and take the run's later rows with it)."""
    import subprocess
    import sys

    code = ("import sys; from nlref.bench import step_kib_per_token; "
            "print(step_kib_per_token(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))")
    try:
        r = subprocess.run([sys.executable, "-c", code, preset, backend, str(batch), str(seq_len), dtype],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"the memory probe ran past {timeout:.0f} s", False
    if r.returncode < 0:
        return None, (f"the memory probe of one {batch} x {seq_len}-token step was killed by signal {-r.returncode} "
                      "(out of memory?)"), True
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or [f"the memory probe exited {r.returncode}"])[-1], False
    return float(r.stdout.strip().splitlines()[-1]), None, False


def available_mib():
    """MemAvailable of /proc/meminfo in MiB, or None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory_verdict(kib_per_token: float, batch_size: int, seq_len: int, budget_mib, probe_t: int = MEMORY_PROBE_T):
    """(predicted MiB of the step, None) when it fits ``budget_mib`` (or there is no budget), else
    (predicted, the reason to skip): the step's memory is linear in batch x tokens (each sequence
    and token keeps its own states in the peer's graph; measured linear in T, docs/performance.md)."""
    need = kib_per_token * batch_size * seq_len / 1024
    if budget_mib is None or need <= budget_mib:
        return need, None
    return need, (f"predicted peak {need / 1024:.1f} GB > the {budget_mib / 1024:.1f} GB budget (--max-memory; "
                  f"{kib_per_token / 1024:.1f} MB per token measured at {batch_size} x {probe_t} tokens in a child process)")


# ---------------------------------------------------------------------------------------------
# Matrix-product rates
# ---------------------------------------------------------------------------------------------


def matmul_gflops(dtype: str, n: int = 512, reps: int = 10) -> float:
    """The machine's matrix-product rate (GFLOP/s) in ``dtype`` under the run's BLAS limit."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    with threadpool_limits(limits=_blas_threads(), user_api="blas"):
        a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def _cupy_matmul_gflops(dtype: str, n: int, reps: int) -> float:
    import cupy as cp

    a = cp.sin(cp.arange(n * n, dtype=dtype)).reshape(n, n)  # any values will do (no denormals); no cuRAND
    b = cp.cos(cp.arange(n * n, dtype=dtype)).reshape(n, n)
    a @ b  # cuBLAS start-up
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    del a, b
    cp.get_default_memory_pool().free_all_blocks()
    return 2 * n**3 / min(times) / 1e9


def _torch_matmul_gflops(dtype: str, n: int, reps: int) -> float:
    import torch

    from .torch_model import no_tf32

    no_tf32()
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn((n, n), dtype=getattr(torch, dtype), device="cuda", generator=g)
    b = torch.randn((n, n), dtype=getattr(torch, dtype), device="cuda", generator=g)
    a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / min(times) / 1e9


def gpu_info(dtype: str, backends, n: int = GPU_MATMUL_N, reps: int = 5) -> dict:
    """The card the GPU rows run on and its matrix-product rate, measured now.

    ``{"card": name or None, "why": reason when None, "gflops": rate or None, "what": how it was
    measured}``: CuPy when it sees a device, else torch when it sees one; under
    ``NL_GPU_NAMESPACE=numpy`` (the GPU port's code on the CPU) the CPU's rate."""
    if "gpu" in backends:
        from .fast.gpu import model as gpu

        if gpu.NAMESPACE == "numpy":
            return {"card": None, "why": "NL_GPU_NAMESPACE=numpy: the GPU port's code runs on the CPU",
                    "gflops": matmul_gflops(dtype), "what": f"the CPU's: 512^3 {dtype}"}
    from .fast.gpu import namespace

    ok, why = namespace.cupy_available()
    if ok:
        import cupy

        tf32 = "on" if os.environ.get("CUPY_TF32") == "1" else "off"
        return {"card": why, "gflops": _cupy_matmul_gflops(dtype, n, reps),
                "what": f"CuPy {cupy.__version__} {n}^3 {dtype}, TF32 {tf32}"}
    try:
        import torch
    except ImportError:
        return {"card": None, "why": why, "gflops": None, "what": None}
    if not torch.cuda.is_available():
        return {"card": None, "why": f"{why}; torch {torch.__version__} sees no CUDA device", "gflops": None,
                "what": None}
    return {"card": torch.cuda.get_device_name(), "gflops": _torch_matmul_gflops(dtype, n, reps),
            "what": f"torch {torch.__version__} {n}^3 {dtype}, TF32 off"}


def memory_layer_flops(cfg) -> float:
    """Forward FLOPs per token of one block's sequence-memory layer in its fast weights: the
    matrix products of the memories' reads, inner gradients and writes (the layer's outer weight
    matrices are the 6 N rule's). 0 for the attention families. Per head, with dh the head width,
    Hm the MLP memories' hidden width, s = 2 dh Hm (MLP: W1 and W2) or dh^2 (matrix) the state's
    size, a read costs 2 s (MLP: W2 z, W1 act(.); matrix: M z):

    - ``hope`` (SPEC.md#selfmod, Eqs. 83-93): reads of x by each of ``readers`` (Eq. 83), of q by
      M_memory, of v by every memory (v_hat, Eq. 84), of k by every memory's inner gradient (Eq. 93),
      whose backward through the MLP adds W1^T u1 (2 dh Hm); each memory's write: the gradient's
      rank-1 factors into every weight (2 x its size) and, with DGD, the key-side shrink
      W (alpha I - eta' k k^T) (W k, then its rank-1 update: 4 x the key-side weight's size, Eq. 88);
    - ``titans`` and its hybrids (SPEC.md#titans, Titans Eqs. 9-18): the read at q, the inner
      gradient at k (a read, plus W1^T u1 for the MLP), the write (2 x the state's size); titans-mac's
      retrieval reads once more per token (SPEC.md#titans-mac);
    - the linear families (SPEC.md#linear-families): the read S q (2 dh^2) and the write: Hebbian
      2 dh^2, the delta rules S k and its rank-1 correction 4 dh^2.

    The backward is counted as twice the forward (``model_flops``: 3 x), as the 6 N rule counts a
    weight's product; element-wise work (activations, gates, decays, momentum) is not counted, nor
    the in-context CMS levels' re-runs of their chunks (SPEC.md#hope: a backward of the blocks above
    each level over its period, per write)."""
    from .reference import config as config_mod

    if cfg.family in ("transformer", "hope-attention"):
        return 0.0
    H, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    if cfg.family in config_mod.LINEAR_FAMILIES:
        return float(H * (2 * dh * dh + (2 if cfg.family == "linear-attention" else 4) * dh * dh))
    mlp = cfg.mem_kind == "mlp"
    Hm = cfg.mem_hidden if cfg.mem_hidden > 0 else 4 * dh
    size = 2 * dh * Hm if mlp else dh * dh  # the state's entries (W1 and W2, or M)
    key_side = dh * Hm if mlp else dh * dh  # W2 (Hm x dh) or M
    read = 2 * size
    back = 2 * dh * Hm if mlp else 0  # W1^T u1 of an MLP memory's inner gradient (a dh x Hm product)
    if cfg.family == "hope":
        from .reference import selfmod
        from .reference.contract import layer_config

        lc = layer_config(selfmod, cfg)
        n_mem = len(lc.memories)
        reads = len(lc.readers) + 1 + 2 * n_mem  # x by the readers, q by M_memory, v and k by every memory
        write = 2 * size + (4 * key_side if lc.dgd else 0)
        return float(H * (reads * read + n_mem * (back + write)))
    reads = 2 + (cfg.family == "titans-mac")
    return float(H * (reads * read + back + 2 * size))


def model_flops(cfg, B: int, T: int) -> float:
    """Forward + backward FLOPs estimate of one step (see the module docstring): 6 x the matmul
    parameters x tokens, 6 T^2 D per attention layer and sequence, and 3 x ``memory_layer_flops``
    per layer and token."""
    from .reference import model as ref

    n_matmul = sum(int(np.prod(s)) for k, s in ref.param_shapes(cfg).items()
                   if len(s) >= 2 and not k.startswith("embed."))
    flops = 6.0 * n_matmul * B * T
    if cfg.family in ("transformer", "hope-attention"):
        flops += 6.0 * cfg.n_layers * B * T * T * cfg.d_model
    return flops + 3.0 * memory_layer_flops(cfg) * cfg.n_layers * B * T


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

# The clock of every timing and every time-based decision below (the first-step budget, the
# predicted and abandoned prefills, the run's time budget). Read through the module at each call,
# so a test can put a fake one here (tests/fake_clock.py) and assert the decisions without
# depending on the machine's speed or load. (matmul_gflops and startup_times only report.)
CLOCK = time.perf_counter

PREFILL_PIECE = 1024  # tokens per prefill call
DECODE_WARMUP = 2  # untimed decode tokens before the timed ones
ATTENTION_MAX_CONTEXT = 8192
PREFILL_BUDGET = 3.0  # a context's prefill may take this many times --max-seconds (64K tokens of hope-small on
# the CPU port take ~75 s: the flat-decode measurement must fit the default budget of a 60 s run)


def _nothing():
    pass


def _time_steps(step, repeats: int, max_seconds: float, sync=_nothing):
    """(first call s, median step s, steps timed) of ``step()`` (one training step); the clock is
    read after ``sync()``. A first call over ``max_seconds`` is the step time itself (0 steps timed)."""
    t = CLOCK()
    step()
    sync()
    first = CLOCK() - t
    if first > max_seconds:
        return first, first, 0
    times = []
    for _ in range(repeats):
        t = CLOCK()
        step()
        sync()
        times.append(CLOCK() - t)
    return first, statistics.median(times), repeats


def state_bytes(state, _seen=None) -> int:
    """Bytes held by the arrays (NumPy, CuPy or torch) of a streaming state, each array counted once
    (the records of the open CMS level chunks share arrays with the current weights, SPEC.md#hope)."""
    seen = set() if _seen is None else _seen
    if isinstance(state, dict):
        return sum(state_bytes(v, seen) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v, seen) for v in state)
    n = getattr(state, "nbytes", None)
    if not isinstance(n, (int, np.integer)) or id(state) in seen:
        return 0
    seen.add(id(state))
    return int(n)


def _time_decode(model, params, cfg, context: int, n_tokens: int, abort_after: float = float("inf"),
                 piece: int = PREFILL_PIECE, sync=_nothing):
    """Prefill ``context`` tokens in pieces, then time ``n_tokens`` decode steps (batch 1); the
    clock is read after ``sync()`` (the device's queued work).

    Returns a dict (prefill_s, median_s, mean_s, state_bytes), or None when the prefill ran past
    ``abort_after`` seconds."""
    rng = np.random.default_rng(1)
    state = None
    t0 = CLOCK()
    done = 0
    while done < context:
        n = min(piece, context - done)
        _, state = model.forward(params, rng.integers(0, cfg.vocab_size, size=(1, n)), cfg, state)
        sync()
        done += n
        if CLOCK() - t0 > abort_after and done < context:
            return None
    prefill = CLOCK() - t0
    gc.collect()  # the prefill's temporaries are freed before decode is timed
    for _ in range(DECODE_WARMUP):
        _, state = model.forward(params, rng.integers(0, cfg.vocab_size, size=(1, 1)), cfg, state)
    sync()
    times = []
    for _ in range(n_tokens):
        tok = rng.integers(0, cfg.vocab_size, size=(1, 1))
        t = CLOCK()
        _, state = model.forward(params, tok, cfg, state)
        sync()
        times.append(CLOCK() - t)
    size = state_bytes(state)
    return dict(prefill_s=prefill, median_s=float(np.median(times)), mean_s=float(np.mean(times)), state_bytes=size)


def _predict_prefill(cfg, c, last, tokens_per_s):
    """Predicted prefill seconds of context c from the last measured (context, seconds), else
    from the training step's tokens/s."""
    if last is None:
        return c / tokens_per_s
    c0, s0 = last
    power = 2 if cfg.family in ("transformer", "hope-attention") else 1
    return s0 * (c / c0) ** power


def _measure(be, row, cfg, tokens, rate, repeats, decode_contexts, decode_tokens, max_seconds, prefill_seconds,
             out_of_time):
    """Fill ``row`` with one (preset, backend)'s step and decode timings; returns the step's
    marks for the table (first, tps, gflops, decode results, steps timed)."""
    batch_size, seq_len = tokens.shape
    params = be.params(cfg)
    step = be.stepper(params, tokens, cfg)
    first, step_s, n = _time_steps(step, repeats, max_seconds, be.synchronize)
    del step
    tps = batch_size * seq_len / step_s
    gflops = model_flops(cfg, batch_size, seq_len) / step_s / 1e9
    row.update(first_call_s=first, step_s=step_s, steps_timed=n, tokens_per_s=tps, gflops=gflops,
               of_peak=gflops / rate if rate else None)
    attention = cfg.family in ("transformer", "hope-attention")
    decode, skipped, last = {}, {}, None
    for c in decode_contexts:
        decode[c] = None
        if n == 0:
            skipped[c] = f"first step over {max_seconds:g} s"
            continue
        if attention and c > ATTENTION_MAX_CONTEXT:
            skipped[c] = f"attention beyond {ATTENTION_MAX_CONTEXT} tokens"
            continue
        if out_of_time():
            skipped[c] = out_of_time()
            continue
        predicted = _predict_prefill(cfg, c, last, tps)
        if predicted > prefill_seconds:
            skipped[c] = f"prefill predicted {predicted:.0f} s > {prefill_seconds:g} s"
            continue
        res = _time_decode(be, params, cfg, c, decode_tokens, abort_after=2 * prefill_seconds, sync=be.synchronize)
        if res is None:
            skipped[c] = f"prefill over {2 * prefill_seconds:g} s"
            continue
        decode[c] = res
        last = (c, res["prefill_s"])
        row[f"prefill_{c}_s"] = res["prefill_s"]
    row["decode_s_per_token"] = {str(c): (v["median_s"] if v else None) for c, v in decode.items()}
    row["decode_mean_s_per_token"] = {str(c): (v["mean_s"] if v else None) for c, v in decode.items()}
    row["decode_state_bytes"] = {str(c): (v["state_bytes"] if v else None) for c, v in decode.items()}
    if skipped:
        row["decode_skipped"] = {str(c): why for c, why in skipped.items()}
    return first, tps, gflops, decode, n


def _torch_memory_check(row, cfg, dtype, batch_size, seq_len, max_memory_gb, max_seconds):
    """Why the torch row must not run (its predicted peak over the budget, or a probe step that a
    signal killed), or None; fills ``row``
    with the probe's figures. Budget: ``MEMORY_SHARE`` of the memory available now, at most
    ``max_memory_gb`` (None: no cap; without /proc/meminfo only the cap)."""
    avail = available_mib()
    budget = None if avail is None else MEMORY_SHARE * avail
    if max_memory_gb is not None:
        budget = max_memory_gb * 1024 if budget is None else min(budget, max_memory_gb * 1024)
    if budget is None:
        return None
    probe_t = min(seq_len, MEMORY_PROBE_T)
    kib, failed, killed = probe_step_memory(cfg.name, "torch", batch_size, probe_t, dtype, max(60.0, max_seconds))
    if failed:
        row["memory_probe"] = failed
        # killed: a step of the probe's size did not survive, so the full row would not either; any
        # other failure: the row itself meets the same error and reports it
        return failed if killed else None
    need, why = memory_verdict(kib, batch_size, seq_len, budget, probe_t)
    row.update(probe_kib_per_token=kib, predicted_step_mib=need, memory_budget_mib=budget)
    return why


def _short(backend: str) -> str:
    return "ref" if backend == "reference" else backend


def run(presets=(), backends=(), batch_size=4, seq_len=256, dtype="float32", repeats=3, decode_contexts=(1024,),
        decode_tokens=8, max_seconds=60.0, json_out=None, echo=print, prefill_seconds=None,
        time_budget=None, max_memory_gb=None) -> list[dict]:
    """Run the benchmark and print its table; returns the rows (see the module docstring)."""
    from threadpoolctl import threadpool_limits

    from . import config

    t_start = CLOCK()
    presets = presets or DEFAULT_PRESETS
    if not backends:
        backends = ("reference", "cpu")
    for name in backends:
        if name not in CHOICES:
            raise ValueError(f"backend {name!r} is not implemented (choose one of {', '.join(CHOICES)})")
    decode_contexts = sorted(set(decode_contexts))
    if prefill_seconds is None:
        prefill_seconds = PREFILL_BUDGET * max_seconds
    cfgs = [dataclasses.replace(config.preset(p), dtype=dtype) for p in presets]  # ValueError names bad ones

    def out_of_time():
        if time_budget is not None and CLOCK() - t_start > time_budget:
            return f"the run's time budget ({time_budget:g} s) is spent"
        return None

    rate = matmul_gflops(dtype)
    echo(f"nested-learning bench  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} {platform.processor() or ''}"
         f" {os.cpu_count()} cores  python {platform.python_version()}  numpy {np.__version__}"
         f"  load {_load()}")
    groups, threads = cpu_threads(batch_size)
    echo(f"batch {batch_size} x {seq_len} tokens, {dtype}, AdamW; BLAS threads {_blas_threads()} (every backend); "
         f"matrix-product rate {rate:.1f} GFLOP/s (512^3 {dtype}, one core)")
    from .fast.cpu import allocator
    from .fast.cpu import model as cpu_model

    heap = allocator.tune()  # what the command line's processes run with (SPEC.md#fast-cpu, "The allocator")
    echo(f"cpu: the batch in {groups} group(s) on {threads} worker(s): the caller and {threads - 1} "
         f"{cpu_model.WORKERS} worker(s) (NL_CPU_GROUPS, NL_CPU_THREADS, NL_CPU_WORKERS); torch: "
         f"{threads * _blas_threads()} intra-op thread(s); reference: one thread; malloc {'heap' if heap else 'default'} "
         f"(NL_CPU_MALLOC, every backend)")
    gpu = None
    if any(_device(b) == "gpu" for b in backends):
        try:
            gpu = gpu_info(dtype, backends)
        except Exception as exc:  # a broken card or driver: the GPU rows will say so too
            gpu = {"card": None, "why": f"{type(exc).__name__}: {exc}", "gflops": None, "what": None}
            echo(traceback.format_exc().rstrip())
        if gpu["gflops"]:
            echo(f"GPU: {gpu['card'] or gpu['why']}; matrix-product rate {gpu['gflops'] / 1e3:.2f} TFLOP/s "
                 f"({gpu['what']}); the GPU rows' GFLOP/s and 'of peak' are against it")
        else:
            echo(f"GPU: none ({gpu['why']})")
    echo(f"decode: batch 1, context prefilled in pieces of {PREFILL_PIECE}, {decode_tokens} timed tokens after "
         f"{DECODE_WARMUP} warm-up; median (mean) ms per token")
    base = backends[0]
    rows = []
    vs = f"vs {_short(base)}"
    header = (f"{'preset':<22} {'backend':<10} {'tokens/s':>9} {vs:>7} {'GFLOP/s':>8} {'of peak':>7} "
              f"{'first call s':>12} " + " ".join(f"{'decode@' + _ctx(c):>15}" for c in decode_contexts))
    echo(header)
    fh = open(json_out, "w") if json_out else None  # closed below; rows are written as they end

    def emit(row):
        rows.append(row)
        if fh is not None:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    try:
        for cfg in cfgs:
            ref_tps = base_tps = None
            tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch_size, seq_len))
            for backend in backends:
                row = {"preset": cfg.name, "backend": backend, "dtype": dtype, "batch": batch_size, "seq_len": seq_len}
                if _device(backend) == "cpu":
                    row["threads"] = 1 if backend == "reference" else threads * (_blas_threads() if backend == "torch" else 1)
                why = out_of_time()
                be = None
                if why:
                    row["status"] = f"skipped: {why}"
                else:
                    try:
                        be = _backend(backend, batch_size)
                    except ImportError as exc:  # torch without the oracle extra
                        row["status"] = f"not available: {exc}"
                    except NoGPU as exc:
                        row["status"] = f"no GPU: {exc}"
                    except NotAvailable as exc:  # the CPU port without Numba or with a bad NL_CPU_* setting
                        row["status"] = f"not available: {exc}"
                if be is not None and backend == "torch":  # its graph keeps every token's state: probe first
                    why = _torch_memory_check(row, cfg, dtype, batch_size, seq_len, max_memory_gb, max_seconds)
                    if why:
                        row["status"] = f"skipped: {why}"
                        be = None
                if be is None:
                    echo(f"{cfg.name:<22} {backend:<10} {row['status']}")
                    emit(row)
                    continue
                row_rate, row["peak"] = rate, f"CPU 512^3 {dtype}, {_blas_threads()} BLAS thread(s)"
                if be.device == "gpu":
                    row["device"] = gpu["card"] or gpu["why"]
                    row_rate, row["peak"] = gpu["gflops"], gpu["what"]
                row["peak_gflops"] = row_rate
                try:
                    with threadpool_limits(limits=_blas_threads(), user_api="blas"):
                        first, tps, gflops, decode, n = _measure(
                            be, row, cfg, tokens, row_rate, repeats, decode_contexts, decode_tokens, max_seconds,
                            prefill_seconds, out_of_time)
                except NotImplementedError as exc:  # a peer that does not compute this family (torch_model)
                    row["status"] = f"not available: {exc}"
                    echo(f"{cfg.name:<22} {backend:<10} {row['status']}")
                    emit(row)
                    continue
                except Exception as exc:  # reported, and the run goes on (the CLI exits 1)
                    row["status"] = f"error: {type(exc).__name__}: {exc}"
                    echo(f"{cfg.name:<22} {backend:<10} {row['status']}")
                    echo(traceback.format_exc().rstrip())
                    emit(row)
                    continue
                finally:
                    del be
                    gc.collect()
                if backend == "reference":
                    ref_tps = tps
                if backend == base:
                    base_tps = tps
                row["vs_reference"] = tps / ref_tps if ref_tps else None
                row["vs_base"] = tps / base_tps if base_tps else None
                row["base"] = base
                ratio = f"{row['vs_base']:>6.2f}x" if row["vs_base"] else f"{'-':>7}"
                peak = f"{100 * row['of_peak']:>6.1f}%" if row["of_peak"] else f"{'-':>7}"
                dec = " ".join(f"{_fmt_decode(v):>15}" for v in decode.values())
                mark = "*" if n == 0 else " "
                echo(f"{cfg.name:<22} {backend:<10} {tps:>8.0f}{mark} {ratio} {gflops:>8.2f} {peak} "
                     f"{first:>12.2f} {dec}")
                emit(row)
    finally:
        if fh is not None:
            fh.close()
    if any(r.get("steps_timed") == 0 for r in rows):
        echo(f"* first step over {max_seconds:g} s: its time is the step time (no further step, no decode)")
    notes = [f"{r['preset']} {r['backend']} @{_ctx(int(c))}: {why}" for r in rows
             for c, why in r.get("decode_skipped", {}).items() if not why.startswith(("attention", "first step"))]
    if any(why.startswith("attention") for r in rows for why in r.get("decode_skipped", {}).values()):
        notes.insert(0, f"attention families beyond {ATTENTION_MAX_CONTEXT} tokens (the KV cache grows with the context)")
    if notes:
        echo("decode skipped: " + "; ".join(notes))
    return rows


def _ctx(c: int) -> str:
    return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def _fmt_decode(v) -> str:
    return "skipped" if v is None else f"{1e3 * v['median_s']:.2f} ({1e3 * v['mean_s']:.2f})"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


_STARTUP_SCRIPT = """
import time
t0 = time.perf_counter()
import numpy as np
from nlref import config
from nlref.fast.cpu import model
from nlref.reference import optimizers
cfg = config.preset({preset!r})
params = model.init_params(cfg, 0)
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=({batch}, {seq_len}))
opt = optimizers.make("adamw", lr=1e-3)
t1 = time.perf_counter()
_, grads = model.loss_and_grads(params, tokens, cfg)
params, st = opt.update(params, grads, opt.init(params))
t2 = time.perf_counter()
_, grads = model.loss_and_grads(params, tokens, cfg)
params, st = opt.update(params, grads, st)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def startup_times(preset: str = "hope-small", runs: int = 2, cache_dir=None, batch_size: int = 4, seq_len: int = 256,
                  echo=print) -> list[dict]:
    """Cached compile: ``runs`` fresh processes in turn with one ``NUMBA_CACHE_DIR`` (a new empty
    directory unless given), each timed from launch to the end of its first CPU-port training
    step. Per run: ``to_first_step_s`` (launch -> first step done, wall clock of the parent),
    ``imports_s`` (imports and parameters, inside the child), ``first_step_s`` (first
    ``loss_and_grads`` + AdamW: compile or cache load included), ``warm_step_s`` (the second step)."""
    import subprocess
    import sys
    import tempfile

    from . import config

    config.preset(preset)  # ValueError naming the known presets
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nl-numba-cache-")
        cache_dir = tmp.name
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    code = _STARTUP_SCRIPT.format(preset=preset, batch=batch_size, seq_len=seq_len)
    out = []
    try:
        for i in range(runs):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if res.returncode:
                raise RuntimeError(f"startup run {i + 1} failed:\n{res.stderr}")
            imports, first, warm = (float(x) for x in res.stdout.split()[-3:])
            row = dict(preset=preset, run=i + 1, to_first_step_s=wall - warm, imports_s=imports, first_step_s=first,
                       warm_step_s=warm, numba_cache_dir=str(cache_dir))
            out.append(row)
            echo(f"process {i + 1} ({'empty' if i == 0 and tmp else 'same'} NUMBA_CACHE_DIR): launch -> first step "
                 f"done {row['to_first_step_s']:.2f} s (imports + params {imports:.2f} s, first step {first:.2f} s; "
                 f"a warm step takes {warm:.2f} s; start-up overhead {row['to_first_step_s'] - warm:.2f} s)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


if __name__ == "__main__":  # python -m nlref.bench startup [PRESET]
    import sys

    if len(sys.argv) >= 2 and sys.argv[1] == "startup":
        startup_times(sys.argv[2] if len(sys.argv) > 2 else "hope-small")
    else:
        sys.exit("usage: python -m nlref.bench startup [PRESET]")
