"""Training runs: the loop, the learning-rate schedule, evaluation, continual evaluation, sampling.

Paper: §7-§8 (the models), Eq. (71) (CMS levels keep learning in context), arXiv 2512.24695v1;
the run machinery itself is not in the paper. SPEC.md#training pins every choice below.

Symbols:

| meaning                             | code name                 | shape / type        |
| ----------------------------------- | ------------------------- | ------------------- |
| B, T                                | ``batch_size``, ``seq_len`` | ints              |
| a training batch                    | ``tokens``                | (B, T + 1) int64    |
| outer parameters / their gradients  | ``params`` / ``grads``    | nested dicts        |
| next-token logits                   | ``logits``                | (B, T, V)           |
| learning rate at step s             | ``lr_at(s, tc)``          | float               |

Decisions where the paper is open (SPEC.md#training):

- Loss: mean next-token cross-entropy in nats over the T predicted positions of B windows of
  T + 1 tokens; perplexity ``exp(loss)``; bits per byte per byte of text: the summed losses / ln 2
  / the UTF-8 bytes the target tokens decode to (``loss / ln 2`` for bytes; SPEC.md#tokenizers).
- Learning rate: linear warmup from ``lr / warmup`` to ``lr`` over ``warmup_steps`` updates, then
  cosine decay to ``min_lr_ratio * lr`` at the last step. The gradient's global L2 norm is
  clipped to ``grad_clip`` (0 turns clipping off) before the optimizer sees it.
- The model's vocab_size is the tokenizer's size (SPEC.md#tokenizers): 256 for bytes (a preset
  with a smaller vocabulary, the tiny test presets, is run with ``vocab_size = 256``), the BPE's
  or the tokenizer.json's size otherwise; the resolved config records it.
- A checkpoint (``checkpoint.safetensors`` in the run directory, replaced atomically) holds the
  parameters, the optimizer state, the sampler position and its generator state; resuming from
  it reproduces the uninterrupted run's losses exactly (same machine, same BLAS threads).
  ``metrics.jsonl`` is cut back to the checkpoint's step on resume.
- A non-finite loss or gradient stops the run at that step, before the update, without writing
  a checkpoint: the last good checkpoint stays.
- Validation: the first ``eval_batches`` batches of consecutive (T + 1)-byte windows of the
  validation split, each window a fresh sequence (every fast state at its initial value).
- Continual evaluation: the validation documents are read one after another by one stream whose
  fast states (memories, in-context CMS levels) are never reset; the same documents read with a
  reset before each document are the baseline, so the per-document difference is what the model
  learned in context from the earlier documents.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nlref import backends as backends_mod
from nlref import checkpoint as ckpt
from nlref import data as data_mod
from nlref import distributed, rundir
from nlref import progress as progress_mod

CHECKPOINT_NAME = "checkpoint.safetensors"


def default_backend() -> str:
    """The default backend: the Numba port ("cpu") where numba imports, else the reference. The GPU
    port runs only when asked for (``--backend gpu``; README.md#benchmarks has its measured speed).
    backends.py ``default``."""
    return backends_mod.default()

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "adamw", "preconditioned_momentum",
              "delta_momentum", "deep_momentum", "muon", "m3")
SCHEDULES = ("cosine", "linear", "constant")


TrainingError = rundir.TrainingError  # a run that cannot start or go on; the message says why and what to do


class Interrupted(TrainingError):
    """SIGINT or SIGTERM stopped the run at a step boundary, after a checkpoint at ``step``
    (SPEC.md#run-directories): ``--resume`` continues it exactly."""

    def __init__(self, message: str, step: int, signum: int):
        super().__init__(message)
        self.step, self.signum = step, signum


class NonFiniteLoss(TrainingError):
    """The loss or gradient became NaN or infinite at ``step``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run besides the model config (SPEC.md#training)."""

    preset: str = "hope-small"
    steps: int = 300
    batch_size: int = 4
    seq_len: int = 128
    optimizer: str = "adamw"
    lr: float = 3e-3  # 1e-2 drove hope-small to a non-finite gradient at step 49 (4x128, seed 0)
    warmup_steps: int | None = None  # None: steps // 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches of batch_size per step: one step of a batch grad_accum times larger
    schedule: str = "cosine"  # after the warmup: cosine or linear decay to min_lr_ratio * lr, or constant
    early_stop_patience: int = 0  # stop after this many validations without a new best (0: never)
    init_from: str | None = None  # a weights file (export / stack): the run starts from its weights and model
    backend: str = field(default_factory=default_backend)
    dtype: str | None = None  # None: the preset's
    seed: int = 0
    data: str | None = None  # None: the default corpus (the Python standard library)
    val_fraction: float = 0.05
    text_field: str = "text"  # the field (column) holding the text in JSONL, CSV and Parquet data
    tokenizer: str = "byte"  # "byte" (V = 256), "bpe" (trained on the training split) or a tokenizer.json path
    tokenizer_vocab_size: int | None = None  # tokenizer = "bpe": its size (None: [model] vocab_size, else 4096)
    blas_threads: int = 1  # 1: bit-reproducible runs (threaded BLAS sums in a varying order); 0: BLAS default
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    checkpoint_every: int = 50  # 0: only at the end
    log_every: int = 10

    def __post_init__(self):
        def bad(key, msg):
            raise ValueError(f"{key}: {msg}")

        for key in ("steps", "batch_size", "seq_len", "eval_batches", "log_every", "grad_accum"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, f"must be a positive integer, got {v!r}")
        for key in ("eval_every", "checkpoint_every", "seed", "blas_threads", "early_stop_patience"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(key, f"must be an integer >= 0, got {v!r}")
        w = self.warmup_steps
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
            bad("warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.early_stop_patience and not self.eval_every:
            bad("early_stop_patience", "needs eval_every > 0 (it counts periodic validations without a new best)")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.backend not in backends_mod.NAMES:
            bad("backend", f"must be one of {', '.join(backends_mod.NAMES)}; got {self.backend!r}")
        if self.dtype not in (None, "float32", "float64"):
            bad("dtype", f"must be float32 or float64, got {self.dtype!r}")
        for key in ("preset", "optimizer", "backend", "dtype", "data", "init_from"):
            v = getattr(self, key)
            if not (isinstance(v, str) or (v is None and key in ("dtype", "data", "init_from"))):
                bad(key, f"must be a string, got {v!r}")
        for key in ("lr", "min_lr_ratio", "grad_clip", "val_fraction"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float):
                bad(key, f"must be a number, got {v!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            bad("lr", f"must be a positive number, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        if not self.grad_clip >= 0:
            bad("grad_clip", f"must be >= 0, got {self.grad_clip!r}")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        for key in ("text_field", "tokenizer"):  # SPEC.md#data
            v = getattr(self, key)
            if not isinstance(v, str) or not v:
                bad(key, f"must be a non-empty string, got {v!r}")
        tv = self.tokenizer_vocab_size
        if tv is not None and (not isinstance(tv, int) or isinstance(tv, bool) or tv < 256):
            bad("tokenizer_vocab_size", f"must be an integer >= 256 (a byte-level BPE holds the 256 bytes), got {tv!r}")
        if tv is not None and self.tokenizer != "bpe":
            bad("tokenizer_vocab_size", f"sets the size of a BPE trained on the data (--vocab-size goes with "
                f"--tokenizer bpe), but the tokenizer is {self.tokenizer!r}")

    @property
    def warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


# ------------------------------------------------------------------------------------------------
# Configuration: defaults <- TOML file <- flags
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    train: TrainConfig
    model: object  # config.ModelConfig
    optimizer_hparams: dict
    # [model] vocab_size was given (not recorded): a BPE that comes out smaller is then an error,
    # not the model's new vocab_size (SPEC.md#data)
    vocab_size_given: bool = field(default=False, compare=False)

    def to_dict(self) -> dict:
        return {"train": dataclasses.asdict(self.train), "model": self.model.to_dict(),
                "optimizer_hparams": dict(self.optimizer_hparams)}


def read_toml(path: str | os.PathLike) -> dict:
    """Parse a run config file: top-level training keys, ``[model]`` and ``[optimizer_hparams]`` tables."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise TrainingError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainingError(f"--config {path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise TrainingError(f"--config {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                            f"{exc.start}); TOML files are UTF-8") from None
    except OSError as exc:
        raise TrainingError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    valid = set(TRAIN_KEYS) | {"model", "optimizer_hparams"}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise TrainingError(f"--config {path}: unknown keys {unknown}; valid top-level keys are "
                            f"{sorted(TRAIN_KEYS)} and the tables [model] and [optimizer_hparams]")
    for table in ("model", "optimizer_hparams"):
        if table in raw and not isinstance(raw[table], dict):
            raise TrainingError(f"--config {path}: {table} must be a table ([{table}])")
    return raw


def resolve_config(file: dict | None = None, flags: dict | None = None) -> RunConfig:
    """Defaults, then the TOML file's values, then the command-line flags (``None`` = not given)."""
    from nlref import config as model_config

    file = dict(file or {})
    model_overrides = dict(file.pop("model", {}))
    optimizer_hparams = dict(file.pop("optimizer_hparams", {}))
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if "weight_decay" in flags:  # --weight-decay: the optimizer's own hyper-parameter
        optimizer_hparams["weight_decay"] = flags.pop("weight_decay")
    values = {**file, **flags}
    if values.get("data") is not None and not isinstance(values["data"], str):
        raise TrainingError(f"bad run config: data: must be a path (a string), got {values['data']!r}")
    for key in ("data", "init_from"):  # recorded absolute, so a resume from elsewhere finds them
        if isinstance(values.get(key), str):
            values[key] = os.path.abspath(os.path.expanduser(values[key]))
    if isinstance(values.get("tokenizer"), str) and values["tokenizer"] not in ("", "byte", "bpe"):
        values["tokenizer"] = os.path.abspath(os.path.expanduser(values["tokenizer"]))  # a tokenizer.json
    unknown = sorted(set(values) - set(TRAIN_KEYS))
    if unknown:
        raise TrainingError(f"unknown training keys {unknown}; valid keys are {sorted(TRAIN_KEYS)}")
    try:
        tc = TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"bad run config: {exc}") from None
    try:
        base = _init_config(tc.init_from) if tc.init_from else model_config.preset(tc.preset).to_dict()
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    for key, value in model_overrides.items():  # the preset's value gives the type (TOML has no schema)
        want = type(base.get(key))
        ok = (key not in base or base[key] is None or isinstance(base[key], list | tuple | dict)
              or (isinstance(value, want) and isinstance(value, bool) == isinstance(base[key], bool))
              or (want is float and isinstance(value, int) and not isinstance(value, bool)))
        if not ok:
            kind = {float: "a number", bool: "true or false", int: "an integer", str: "a string"}.get(want, want.__name__)
            raise TrainingError(f"bad [model] config: {key} must be {kind}, got {value!r}")
    given = model_overrides.get("vocab_size")
    vocab, bpe_size = _tokenizer_vocab(tc, base["vocab_size"], given)  # SPEC.md#data
    if bpe_size != tc.tokenizer_vocab_size:
        tc = dataclasses.replace(tc, tokenizer_vocab_size=bpe_size)
    merged = {**base, **model_overrides, "vocab_size": vocab}
    if tc.dtype is not None:
        merged["dtype"] = tc.dtype
    try:
        mc = model_config.from_dict(merged)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"bad [model] config: {exc}") from None
    return RunConfig(tc, mc, optimizer_hparams, vocab_size_given=given is not None)


def _init_config(path: str) -> dict:
    """The model config of the weights file a run starts from (``init_from``, SPEC.md#training):
    it replaces the preset (``[model]`` keys still override it)."""
    from nlref import api

    if not Path(path).is_file():
        raise TrainingError(f"--init-from {path}: no such file")
    meta = api.read_metadata(path) or {}
    if meta.get("format") != api.WEIGHTS_FORMAT:
        raise TrainingError(f"--init-from {path}: not a weights file (format {meta.get('format')!r}); a run or a "
                            f"checkpoint continues with --resume, or write its weights with nested-learning export "
                            f"{path} --weights-only OUT.safetensors")
    try:
        return json.loads(meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"--init-from {path}: not a weights file this version reads ({exc}); write one with "
                            "nested-learning export RUN --weights-only OUT or nested-learning stack") from None


def _init_params(tc: TrainConfig, mc, model):
    """The parameters a new run starts from: ``init_from``'s weights (checked against the model's
    shapes, cast to its dtype), else ``model.init_params(mc, seed)``."""
    if not tc.init_from:
        return model.init_params(mc, seed=tc.seed)
    from nlref import api

    params, _, _ = api.load_weights(tc.init_from)
    params = {k: np.asarray(v, dtype=mc.dtype) for k, v in params.items()}
    shapes = {k: np.zeros(sh, dtype=mc.dtype) for k, sh in model.param_shapes(mc).items()}  # names and shapes only
    ckpt.check_params_match(params, shapes, tc.init_from)
    return params


def _tokenizer_vocab(tc: TrainConfig, preset_vocab: int, given: int | None) -> tuple[int, int | None]:
    """(the model's vocab_size, the BPE's size) for ``tc.tokenizer`` (SPEC.md#data): 256 for bytes
    (a tiny preset's smaller vocabulary is raised to it); for "bpe" ``tokenizer_vocab_size``, else
    the given [model] vocab_size, else 4096; for a tokenizer.json its size (read from the file only
    when [model] vocab_size is not given: a resumed run reads its own copy, checked by ``bind_tokenizer``)."""
    from nlref import tokenization

    if tc.tokenizer == "byte":
        vocab = given if given is not None else max(preset_vocab, data_mod.VOCAB_SIZE)
        if vocab != data_mod.VOCAB_SIZE:
            raise TrainingError(f"vocab_size must be {data_mod.VOCAB_SIZE} for byte-level data (tokenizer byte), got "
                                f"{vocab}; another vocabulary needs a tokenizer of that size: --tokenizer bpe "
                                f"--vocab-size {vocab}, or --tokenizer PATH/tokenizer.json")
        return vocab, None
    if tc.tokenizer == "bpe":
        size = tc.tokenizer_vocab_size or given or tokenization.DEFAULT_BPE_VOCAB
        if given is not None and given != size:
            raise TrainingError(f"[model] vocab_size = {given} does not match the BPE tokenizer's size {size} "
                                "(tokenizer_vocab_size, --vocab-size): give one of them, or the same number to both")
        return size, size
    if given is not None:
        return given, None
    try:
        return tokenization.load_file(tc.tokenizer, f"--tokenizer {tc.tokenizer}").vocab_size, None
    except tokenization.TokenizerError as exc:
        raise TrainingError(str(exc)) from None


def bind_tokenizer(rc: RunConfig, tok, echo: Callable[[str], None] = print) -> RunConfig:
    """``rc`` with the model's vocab_size checked against the tokenizer's size (SPEC.md#data). A
    BPE trained by this run that came out smaller than asked (the training split had no more pairs
    to merge) sets the model's vocab_size, unless [model] vocab_size was given; any other
    difference is a TrainingError saying what to change."""
    from nlref import config as model_config

    mc, tc = rc.model, rc.train
    if tok.vocab_size == mc.vocab_size:
        return rc
    if getattr(tok, "origin", "") == "trained" and tok.vocab_size < mc.vocab_size and not rc.vocab_size_given:
        echo(f"the BPE tokenizer has {tok.vocab_size:,} tokens, fewer than the {mc.vocab_size:,} asked (the training "
             f"split has no more pairs seen twice to merge): the model's vocab_size is {tok.vocab_size:,}")
        model = model_config.from_dict({**mc.to_dict(), "vocab_size": tok.vocab_size})
        return dataclasses.replace(rc, model=model, train=dataclasses.replace(tc, tokenizer_vocab_size=tok.vocab_size))
    what = "a BPE trained on the training split" if tc.tokenizer == "bpe" else tok.source
    raise TrainingError(f"[model] vocab_size = {mc.vocab_size:,} does not match the tokenizer's size "
                        f"{tok.vocab_size:,} ({what}): the model must have one output per token; remove vocab_size "
                        f"from [model] (the tokenizer sets it) or use a tokenizer of {mc.vocab_size:,} tokens")


def run_config_from_dict(d: dict) -> RunConfig:
    """Rebuild a RunConfig from ``RunConfig.to_dict()`` (a checkpoint's or a run's config)."""
    from nlref import config as model_config

    try:
        return RunConfig(TrainConfig(**d["train"]), model_config.from_dict(d["model"]), dict(d.get("optimizer_hparams", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"the run config is not one this version understands ({exc})") from None


def _drop_none(v):
    """TOML has no null: a key whose value is None is left out (it reads back as its default)."""
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list | tuple):
        return [_drop_none(x) for x in v]
    return v


def to_toml(rc: RunConfig) -> str:
    """The resolved config as TOML that ``--config`` reads back to the same RunConfig (written by
    tomli-w: any Unicode in a path or name is valid TOML, SPEC.md#run-directories)."""
    import tomli_w

    d = rc.to_dict()
    doc = {**_drop_none(d["train"]), "model": _drop_none(d["model"]),
           "optimizer_hparams": _drop_none(d["optimizer_hparams"])}
    return "# resolved run config (nested-learning train); reusable with --config\n" + tomli_w.dumps(doc)


# ------------------------------------------------------------------------------------------------
# Small helpers: trees, schedule, loss
# ------------------------------------------------------------------------------------------------


def _is_array(x) -> bool:
    """A NumPy array or scalar, or a device array (CuPy: ``__cuda_array_interface__``)."""
    return isinstance(x, np.ndarray | np.generic) or hasattr(x, "__cuda_array_interface__")


def tree_leaves(tree) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in tree_leaves(v)]
    if isinstance(tree, list | tuple):
        return [x for v in tree for x in tree_leaves(v)]
    if _is_array(tree):
        return [tree]
    return []


def tree_map(fn: Callable, tree):
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree_map(fn, v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(tree_map(fn, v) for v in tree)
    if _is_array(tree):
        return fn(tree)
    return tree


def global_norm(tree) -> float:
    return math.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in tree_leaves(tree)))


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate of the update taken at ``step`` (0-based): linear warmup, then ``tc.schedule``:
    cosine or linear decay from ``lr`` to ``min_lr_ratio * lr`` at the last step, or constant
    (SPEC.md#training)."""
    warmup = tc.warmup
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    if tc.schedule == "constant":
        return tc.lr
    span = max(1, tc.steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    floor = tc.min_lr_ratio * tc.lr
    if tc.schedule == "linear":
        return tc.lr - (tc.lr - floor) * progress
    return floor + 0.5 * (tc.lr - floor) * (1.0 + math.cos(math.pi * progress))


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position next-token cross-entropy in nats, computed in float64.  (..., V), (...) -> (...)"""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=-1))
    picked = np.take_along_axis(z, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return logsumexp - picked


def metrics_from_loss(loss: float, tokens: int | None = None, n_bytes: int | None = None) -> dict:
    """Loss per token (nats), perplexity and bits per byte of text: with ``tokens`` and ``n_bytes``
    (the UTF-8 bytes those tokens decode to) ``loss * tokens / ln 2 / n_bytes``, else one token is
    one byte (SPEC.md#training)."""
    bpb = loss / math.log(2.0) if not (tokens and n_bytes) else loss * tokens / math.log(2.0) / n_bytes
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": bpb}


def _backend(backend: str = "reference") -> backends_mod.Backend:
    """The ``backends.Backend`` called ``backend``, checked to run here (TrainingError otherwise)."""
    check_backend(backend)
    return backends_mod.get(backend)


def _model(backend: str = "reference"):
    """The model module of ``backend``: the reference, the Numba port or the CuPy port, with the
    same API (``init_params``, ``forward``, ``loss_and_grads``; SPEC.md#fast-cpu, SPEC.md#fast-gpu)."""
    return _backend(backend).model


def check_backend(backend: str, family: str | None = None) -> None:
    """TrainingError unless ``backend`` can run here (and computes ``family``, when given):
    ``backends.Backend.check``'s message (the choices, or why not and what to use instead)."""
    try:
        backends_mod.get(backend).check(family)
    except backends_mod.BackendError as exc:
        raise TrainingError(str(exc)) from None


def make_optimizer(rc: RunConfig, lr: float):
    optimizers = backends_mod.get(rc.train.backend).optimizers()
    try:
        return optimizers.make(rc.train.optimizer, lr=lr, **rc.optimizer_hparams)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"optimizer {rc.train.optimizer!r}: bad hyper-parameters "
                            f"{sorted(rc.optimizer_hparams)} ({exc})") from None


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def evaluate(params, mc, stream: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None,
             backend: str = "reference", tokenizer=None) -> dict:
    """Mean next-token loss over the first windows of ``stream``, each a fresh sequence; bits per
    byte per byte of text: the summed losses over the UTF-8 bytes the target tokens decode to
    (``tokenizer`` None: bytes, one token per byte). ``tokens`` and ``bytes`` count the targets."""
    model = _model(backend)
    total, count, n_bytes = 0.0, 0, 0
    for tokens in data_mod.eval_batches(stream, batch_size, seq_len, max_batches):  # (b, T + 1)
        logits, _ = model.forward(params, tokens, mc)  # (b, T + 1, V): as loss_and_grads reads it
        losses = cross_entropy(logits[:, :-1], tokens[:, 1:])  # (b, T)
        total += float(losses.sum())
        count += losses.size
        n_bytes += losses.size if tokenizer is None else tokenizer.n_bytes(tokens[:, 1:])
    out = metrics_from_loss(total / count, count, n_bytes)
    out["tokens"] = count
    out["bytes"] = n_bytes
    out["unit"] = "bytes" if tokenizer is None or tokenizer.kind == "byte" else "tokens"
    return out


def size_text(ev: dict) -> str:
    """"2,048 bytes", or "512 tokens, 2,048 bytes" when a token is not one byte (the report lines)."""
    if ev.get("unit", "bytes") == "bytes":
        return f"{ev['tokens']:,} bytes"
    return f"{ev['tokens']:,} tokens, {ev['bytes']:,} bytes"


def _stream_forward(be: backends_mod.Backend, params, tokens, mc, state):
    """``forward`` whose logits come back as NumPy; on the GPU the streaming state stays on the
    device between calls (the callers upload the parameters once)."""
    logits, state = be.forward(params, tokens, mc, state)
    return be.to_host(logits), state


def stream_losses(params, mc, doc: np.ndarray, piece: int, state=None, backend: str = "reference"):
    """Per-byte losses of one document read in pieces of ``piece`` bytes, carrying ``state``.

    Every byte is read once; position i's logits score byte i + 1 (the last byte's logits are
    not scored). Returns (losses (n - 1,), state after the whole document).
    """
    be = _backend(backend)
    params = be.to_device(params)  # uploaded once (the GPU port)
    doc = np.asarray(doc, dtype=np.int64)
    losses = []
    for start in range(0, doc.shape[0], piece):
        part = doc[start : start + piece]
        logits, state = _stream_forward(be, params, part[None, :], mc, state)  # (1, t, V)
        nxt = doc[start + 1 : start + 1 + part.shape[0]]
        losses.append(cross_entropy(logits[0, : nxt.shape[0]], nxt))
    return np.concatenate(losses) if losses else np.zeros(0), state


def evaluate_continual(params, mc, split, max_docs: int, doc_bytes: int, piece: int,
                       backend: str = "reference", tokenizer=None) -> dict:
    """Read the documents in order with a never-reset state and, as the baseline, with resets.

    Returns per-document rows (position, name, bytes, continual loss, reset loss) and totals.
    ``doc_bytes`` and ``piece`` count tokens (bytes with the byte tokenizer, ``tokenizer`` None);
    bits per byte are per byte of the scored tokens' text.
    """
    rows, state = [], None
    tot_c = tot_r = 0.0
    n_tok = n_bytes = 0
    for d in range(min(max_docs, split.n_docs)):
        doc = split.doc(d)[:doc_bytes]
        if doc.shape[0] < 2:
            continue
        cont, state = stream_losses(params, mc, doc, piece, state=state, backend=backend)  # never reset
        reset, _ = stream_losses(params, mc, doc, piece, state=None, backend=backend)  # the baseline
        rows.append({"position": len(rows) + 1, "document": split.names[d], "bytes": int(doc.shape[0]),
                     "continual_loss": float(cont.mean()), "reset_loss": float(reset.mean())})
        tot_c += float(cont.sum())
        tot_r += float(reset.sum())
        n_tok += cont.shape[0]
        n_bytes += cont.shape[0] if tokenizer is None else tokenizer.n_bytes(doc[1:])
    if not rows:
        raise TrainingError("continual evaluation found no document with at least 2 tokens")
    return {"documents": rows, "continual": metrics_from_loss(tot_c / n_tok, n_tok, n_bytes),
            "reset": metrics_from_loss(tot_r / n_tok, n_tok, n_bytes), "tokens": n_tok, "bytes": n_bytes}


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def sample_next(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator,
                top_p: float = 1.0) -> int:
    """One token from (V,) logits: greedy at temperature 0, else softmax(logits / temperature)
    restricted to the ``top_k`` largest (0: all), then to the nucleus of ``top_p``: the fewest most
    probable tokens whose probability sums to at least ``top_p`` (1: all; ties at the edge kept),
    renormalised (SPEC.md#training)."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(z))
    z = z / temperature
    if 0 < top_k < z.shape[0]:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.sort(p)[::-1]
        need = int(np.searchsorted(np.cumsum(order), top_p)) + 1  # the nucleus' size
        cut = order[min(need, order.shape[0]) - 1]
        p = np.where(p >= cut, p, 0.0)
        p /= p.sum()
    return int(rng.choice(z.shape[0], p=p))


def generate(params, mc, prompt: np.ndarray, max_new: int, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0, on_token: Callable[[int], bool | None] | None = None,
             backend: str = "reference", top_p: float = 1.0) -> np.ndarray:
    """Sample ``max_new`` tokens (bytes) after ``prompt``, carrying the streaming state: the prompt
    is read once, then each new token is fed alone (the context is never re-read). ``on_token``
    sees each token as it is drawn; returning True stops the sampling there."""
    be = _backend(backend)
    rng = np.random.default_rng(seed)
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 1 or prompt.shape[0] == 0:
        raise TrainingError("the prompt must hold at least one byte")
    if not 0 < top_p <= 1:
        raise TrainingError(f"top_p must be in (0, 1], got {top_p!r}")
    params = be.to_device(params)  # uploaded once (the GPU port)
    logits, state = _stream_forward(be, params, prompt[None, :], mc, None)  # (1, n, V)
    out = []
    for _ in range(max_new):
        tok = sample_next(logits[0, -1], temperature, top_k, rng, top_p)
        out.append(tok)
        if on_token is not None and on_token(tok) is True:  # the caller has enough (generate --max-bytes)
            break
        logits, state = _stream_forward(be, params, np.array([[tok]], dtype=np.int64), mc, state)
    return np.array(out, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# Runs on disk
# ------------------------------------------------------------------------------------------------


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise TrainingError(f"{run_dir}: no metrics.jsonl (is this a run directory written by train?)")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
        if not p.is_file():
            raise ckpt.CheckpointError(f"{path}: the run directory holds no {CHECKPOINT_NAME} "
                                       "(the run wrote no checkpoint yet)")
    return p


def load_model_checkpoint(path: str | os.PathLike):
    """(params, RunConfig, Checkpoint) from a checkpoint file or run directory, fully checked."""
    ck = ckpt.load_checkpoint(find_checkpoint(path))
    if not isinstance(ck.config, dict) or "model" not in ck.config:
        raise ckpt.CheckpointError(f"{ck.path}: the checkpoint carries no model config")
    rc = run_config_from_dict(ck.config)
    expected = _model().init_params(rc.model, seed=0)
    ckpt.check_params_match(ck.params, expected, ck.path)
    check_finite_params(ck.params, ck.path)
    return ck.params, rc, ck


class Patience:
    """Early stopping (``early_stop_patience``, SPEC.md#training): exhausted once ``patience``
    periodic validations in a row bring no new best loss. Rebuilt from the metrics on resume."""

    def __init__(self, patience: int, losses=()):
        self.patience, self.best, self.since = patience, math.inf, 0
        for v in losses:
            self.add(v)

    def add(self, loss: float) -> None:
        if loss < self.best:
            self.best, self.since = loss, 0
        else:
            self.since += 1

    @property
    def exhausted(self) -> bool:
        return bool(self.patience) and self.since >= self.patience

    @property
    def why(self) -> str:
        return f"{self.since} validations without a new best (best {self.best:.4f}, patience {self.patience})"


def _val_row(step: int, ev: dict) -> dict:
    """A validation row of metrics.jsonl (SPEC.md#run-directories)."""
    return {"step": step, "split": "validation", "val_loss": ev["loss"], "val_perplexity": ev["perplexity"],
            "val_bits_per_byte": ev["bits_per_byte"], "time": round(time.time(), 3)}


def train(rc: RunConfig, run_dir: str | os.PathLike, resume: bool = False,
          echo: Callable[[str], None] = print, tty: bool = False, overwrite: bool = False) -> dict:
    """Train (or resume) the run in ``run_dir``; return the final summary (SPEC.md#run-directories).

    Everything that can be checked before the first step is checked before anything is written
    (the data and both splits against ``seq_len``, the optimizer's hyper-parameters, the memory a
    step needs). The run directory is then locked for the life of the call (``rundir.RunLock``; a
    second writer fails at once naming this pid). ``overwrite`` replaces a run already in
    ``run_dir``; ``resume`` continues it (from step 0 when it stopped before its first checkpoint).

    Raises ``NonFiniteLoss`` at the first non-finite loss or gradient or diverged parameter (the
    last good checkpoint stays), ``TrainingError`` / ``DataError`` / ``CheckpointError`` /
    ``rundir.RunDirError`` for unusable inputs. BLAS runs on ``blas_threads`` threads (1 by
    default: multi-threaded BLAS sums in an order that varies from run to run, which breaks
    bit-exact resume; measured on hope-small float32).
    """
    if resume and overwrite:
        raise TrainingError("resume and overwrite exclude each other: resume continues the run, overwrite replaces it")
    if rc.train.blas_threads:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=rc.train.blas_threads, user_api="blas"):
            return _train(rc, run_dir, resume, echo, tty, overwrite)
    return _train(rc, run_dir, resume, echo, tty, overwrite)


DIVERGED_ABS = 1e6
"""A parameter whose magnitude exceeds this has diverged (SPEC.md#run-directories): trained weights
of these models stay within about 10; the run stops before such a state is ever checkpointed."""


def preflight(rc: RunConfig, corpus) -> None:
    """The checks that need no step and no file written (SPEC.md#run-directories): the training
    split holds a window, the validation split holds a window, the optimizer accepts its
    hyper-parameters, one step fits in memory."""
    tc = rc.train
    check_backend(tc.backend, rc.model.family)
    data_mod.BatchSampler(corpus.train.stream, tc.batch_size * tc.grad_accum, tc.seq_len, seed=[tc.seed, 1])
    if corpus.val.n_tokens < tc.seq_len + 1:
        raise data_mod.DataError(
            f"the validation split holds {corpus.val.n_tokens:,} {getattr(corpus, 'unit', 'bytes')}, fewer than "
            f"seq_len + 1 = {tc.seq_len + 1}, "
            f"so the run could never be validated; lower --seq-len, raise val_fraction (now {tc.val_fraction:g}) "
            "or give more data")
    make_optimizer(rc, tc.lr)
    if tc.init_from:  # the weights fit the model (a [model] override may have changed a shape)
        try:
            _init_params(tc, rc.model, _model("reference"))
        except (ValueError, OSError) as exc:
            raise TrainingError(f"--init-from {tc.init_from}: {exc}") from None
    rundir.check_fits_in_memory(rc)


def load_run_corpus(rc: RunConfig, run_dir, resume: bool, echo: Callable[[str], None] = print):
    """(``rc`` bound to the run's tokenizer, the run's corpus as token streams) (SPEC.md#data):
    the documents split, then the tokenizer (bytes; the run directory's tokenizer.json on resume;
    the user's file; or a BPE trained on the training split alone), then both splits encoded."""
    from nlref import tokenization

    tc = rc.train
    docs = data_mod.read_corpus(tc.data, tc.val_fraction, tc.text_field)
    t0 = time.perf_counter()
    tok = tokenization.for_run(tc, run_dir, resume, docs.train.texts(), len(docs.train.names))
    if getattr(tok, "origin", "") == "trained":
        echo(f"tokenizer: a byte-level BPE of {tok.vocab_size:,} tokens trained on the training split "
             f"({len(docs.train.names):,} documents, {docs.train.n_bytes:,} bytes) in {time.perf_counter() - t0:.1f} s")
    rc = bind_tokenizer(rc, tok, echo)
    return rc, data_mod.tokenize(docs, tok)


def _train(rc: RunConfig, run_dir, resume: bool, echo: Callable[[str], None], tty: bool, overwrite: bool) -> dict:
    tc = rc.train
    run_dir = Path(run_dir)
    rc, corpus = load_run_corpus(rc, run_dir, resume, echo)  # the tokenizer may set the model's vocab_size
    preflight(rc, corpus)
    if not resume:
        rundir.make_run_dir(run_dir)
    elif not run_dir.is_dir():
        raise rundir.RunDirError(f"--resume {run_dir}: no such run directory")
    lock = rundir.RunLock(run_dir).acquire()
    step_box = [0]
    try:
        return _train_locked(rc, run_dir, corpus, resume, echo, tty, overwrite, step_box)
    except MemoryError:
        raise TrainingError(f"out of memory at step {step_box[0] + 1} (batch {tc.batch_size} x {tc.seq_len} bytes of "
                            f"{rc.model.name}); {_kept(run_dir / CHECKPOINT_NAME, run_dir)}; lower --batch-size or "
                            "--seq-len") from None
    finally:
        lock.release()


def _occupied(run_dir: Path, ck_path: Path) -> str:
    """Why a new run cannot start in ``run_dir``, and the three ways on."""
    if ck_path.exists():
        try:
            what = f"a run with a checkpoint at step {ckpt.load_checkpoint(ck_path).step}"
            hint = f"resume it with --resume {run_dir}, "
        except ckpt.CheckpointError as exc:
            what, hint = f"a run whose checkpoint cannot be used ({exc})", ""
    else:
        what = (f"a run that stopped before its first checkpoint ({len(_train_rows(run_dir))} steps logged, "
                "nothing to resume from)")
        hint = f"restart it with --resume {run_dir} (from step 0, with its config), "
    return (f"{run_dir} already holds {what}; {hint}start over with --overwrite (deletes the run's checkpoint and "
            "metrics), or choose another --out")


def _train_rows(run_dir: Path) -> list[dict]:
    try:
        return [r for r in read_metrics(run_dir) if "loss" in r]
    except TrainingError:
        return []


def _metrics_up_to(rows: list[dict], step: int, tc: TrainConfig) -> list[dict]:
    """The metrics of an uninterrupted run up to its checkpoint at ``step``: one training row per
    step, one validation row per validated step; a validation at ``step`` itself only when it is a
    periodic one of this config (a final validation is redone at the end)."""
    seen_train, seen_val, kept = set(), set(), []
    for r in rows:
        s = r.get("step")
        if not isinstance(s, int) or s > step:
            continue
        if "loss" in r:
            if s in seen_train:
                continue
            seen_train.add(s)
        elif "val_loss" in r:
            periodic = bool(tc.eval_every) and s % tc.eval_every == 0 and s < tc.steps
            if s in seen_val or (s == step and not periodic):
                continue
            seen_val.add(s)
        kept.append(r)
    return kept


def _largest_abs(tree) -> float:
    """max |x| over the tree's leaves (NaN when any is NaN); works on NumPy and CuPy arrays."""
    m = 0.0
    for x in tree_leaves(tree):
        if x.size:
            v = float(abs(x).max())
            if not v <= m:
                m = v
                if math.isnan(v):
                    return v
    return m


def check_finite_params(params, path) -> float:
    """Raise CheckpointError unless every parameter is finite and below DIVERGED_ABS; return the largest."""
    m = _largest_abs(params)
    if not (math.isfinite(m) and m <= DIVERGED_ABS):
        n_bad = sum(int(np.sum(~np.isfinite(np.asarray(x)))) for x in tree_leaves(params))
        what = f"{n_bad:,} non-finite values" if n_bad else f"largest |parameter| {m:.3g} > {DIVERGED_ABS:g}: diverged"
        raise ckpt.CheckpointError(f"{path}: the checkpoint's parameters are not usable ({what}); use an earlier "
                                   "checkpoint or retrain")
    return m


def _kept(ck_path: Path, run_dir: Path) -> str:
    """What the run keeps after a stop: the last good checkpoint, or nothing yet."""
    if not ck_path.exists():
        return (f"no checkpoint was written before it: start again with --overwrite --out {run_dir} "
                "(or --resume, which restarts from step 0)")
    try:
        ck = ckpt.load_checkpoint(ck_path)
        m = check_finite_params(ck.params, ck_path)
    except ckpt.CheckpointError as exc:
        return f"the checkpoint at {ck_path} is not usable ({exc})"
    return f"the last good checkpoint (finite, largest |parameter| {m:.3g}, step {ck.step}) is kept at {ck_path}"


def _train_locked(rc: RunConfig, run_dir: Path, corpus, resume: bool, echo, tty: bool, overwrite: bool,
                  step_box: list) -> dict:
    tc, mc = rc.train, rc.model
    be = _backend(tc.backend)  # on the GPU, parameters, gradients and optimizer state stay on the device
    model = be.model
    ck_path = run_dir / CHECKPOINT_NAME
    n_tmp, tmp_bytes = rundir.remove_orphaned_temp_files(run_dir)
    if n_tmp:
        echo(f"removed {n_tmp} orphaned temp file(s) ({rundir.fmt_bytes(tmp_bytes)}) left by an interrupted write")
    metrics_path = run_dir / "metrics.jsonl"
    restart = resume and not ck_path.exists()  # stopped before its first checkpoint: step 0, same config
    if resume:
        recorded = {}
        if (run_dir / "data.json").exists():
            try:
                recorded = json.loads((run_dir / "data.json").read_text())
            except (ValueError, UnicodeDecodeError):
                recorded = {}
        if recorded.get("sha256") not in (None, corpus.info["sha256"]):
            raise TrainingError(f"{run_dir}: the data changed since the run started (sha256 "
                                f"{str(recorded.get('sha256', ''))[:12]} vs {corpus.info['sha256'][:12]}); "
                                "resume needs the same data")
    if not resume or restart:
        if not resume and rundir.has_run(run_dir):
            if not overwrite:
                raise rundir.RunDirError(_occupied(run_dir, ck_path))
            echo(f"--overwrite: removed the earlier run's {', '.join(rundir.remove_run_files(run_dir))}")
        if restart:
            echo(f"{run_dir} holds no checkpoint (the run stopped before its first one): restarting it from step 0 "
                 "with its config")
        params = be.to_device(_init_params(tc, mc, model))  # init_from's weights, or a fresh init
        opt_state = make_optimizer(rc, tc.lr).init(params)
        sampler = data_mod.BatchSampler(corpus.train.stream, tc.batch_size * tc.grad_accum, tc.seq_len, seed=[tc.seed, 1])
        step = 0
        kept_rows: list[dict] = []
        if getattr(corpus.tokenizer, "json_text", None) is not None:  # what --resume, eval, generate reload
            ckpt.atomic_write_text(run_dir / "tokenizer.json", corpus.tokenizer.json_text)
        ckpt.atomic_write_text(run_dir / "config.toml", to_toml(rc))
        ckpt.atomic_write_text(run_dir / "config.json", json.dumps(rc.to_dict(), indent=2) + "\n")
        ckpt.atomic_write_text(run_dir / "data.json", json.dumps(corpus.info, indent=1) + "\n")
        ckpt.atomic_write_text(metrics_path, "")
    else:
        ck = ckpt.load_checkpoint(ck_path)
        if not isinstance(ck.config, dict):
            raise ckpt.CheckpointError(f"{ck_path}: the checkpoint carries no run config")
        # the checkpoint's config as this version reads it: a field added since (e.g. the ablation
        # switches of SPEC.md#hope) takes its default, which is the model the run was trained as
        saved = json.loads(json.dumps(run_config_from_dict(ck.config).to_dict()))
        changes = rundir.config_changes(saved, json.loads(json.dumps(rc.to_dict())))
        if changes:
            raise ckpt.CheckpointError(
                f"{run_dir}/config.toml describes another model or other training settings than its checkpoint "
                f"({'; '.join(changes)}); a resumed run keeps the settings it was trained with (only "
                f"{', '.join(rundir.RESUME_OK)} may change). Undo the edit to resume, or start a new run with "
                f"these settings: nested-learning train --config {run_dir}/config.toml --out NEW_DIR")
        if tc.steps < ck.step:
            raise rundir.RunDirError(
                f"steps {tc.steps} is below the checkpoint's step {ck.step}: a run cannot go back; give --steps "
                f"{ck.step} or more, or start a new run: nested-learning train --config {run_dir}/config.toml "
                "--steps N --out NEW_DIR")
        ckpt.check_params_match(ck.params, model.init_params(mc, seed=0), ck_path)
        check_finite_params(ck.params, ck_path)
        summary_path = run_dir / "summary.json"
        if tc.steps == ck.step and summary_path.exists():
            try:
                done = json.loads(summary_path.read_text())
            except (ValueError, UnicodeDecodeError):
                done = {}
            if isinstance(done, dict) and done.get("steps") == ck.step:
                echo(f"{run_dir} is complete at step {ck.step}/{tc.steps}: nothing to do (give --steps above "
                     f"{ck.step} to train further)")
                return done
        params, opt_state, step = ck.params, ck.opt_state, ck.step
        sampler = data_mod.BatchSampler(corpus.train.stream, tc.batch_size * tc.grad_accum, tc.seq_len, seed=[tc.seed, 1],
                                        state=ck.data_position)
        # Cut metrics.jsonl back to the checkpoint, so the file is the uninterrupted run's.
        kept_rows = _metrics_up_to(read_metrics(run_dir) if metrics_path.exists() else [], step, tc)
        ckpt.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept_rows))
        ckpt.atomic_write_text(run_dir / "config.toml", to_toml(rc))  # the resumable keys may have changed
        ckpt.atomic_write_text(run_dir / "config.json", json.dumps(rc.to_dict(), indent=2) + "\n")
        echo(f"resuming {run_dir} at step {step}/{tc.steps}")
    params, opt_state = be.to_device(params), be.to_device(opt_state)
    if step == 0 and not resume:
        echo(f"training {mc.name} ({mc.family}, {_count(params):,} parameters, {mc.dtype}) on "
             f"{corpus.info['source']}: {corpus.train.n_bytes:,} train / {corpus.val.n_bytes:,} validation "
             f"bytes{_token_counts(corpus)}; {tc.steps} steps of {tc.batch_size}x{tc.seq_len} {corpus.unit}, "
             f"{tc.optimizer} lr {tc.lr:g}")
        echo(f"run directory: {run_dir}")

    def save(at_step: int) -> None:
        ckpt.save_checkpoint(ck_path, params=be.to_host(params), opt_state=be.to_host(opt_state), config=rc.to_dict(), step=at_step,
                             rng_state=_jsonable(sampler._rng.bit_generator.state),
                             data_position=sampler.state(), extra={"data_sha256": corpus.info["sha256"],
                                                                   "tokenizer_sha256": getattr(corpus.tokenizer, "sha256", None)})

    patience = Patience(tc.early_stop_patience, [r["val_loss"] for r in kept_rows if "val_loss" in r])
    if patience.exhausted:  # resumed after an early stop: the run is complete
        echo(f"{run_dir} stopped early at step {step}: {patience.why}; nothing to do")
        try:
            return json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return {"steps": step, "early_stopped_at": step, "run_dir": str(run_dir), "checkpoint": str(ck_path)}
    progress = progress_mod.StepProgress(tc.steps, step, tc.log_every, echo, tty)
    start_step = step
    loss, early = None, None
    t_start = time.perf_counter()
    with open(metrics_path, "a") as metrics, rundir.StopOnSignal(echo) as stop:
        while step < tc.steps:
            step_box[0] = step
            tokens = sampler.next_batch()  # (B, T + 1)
            t0 = time.perf_counter()
            # this rank's rows (as grad_accum micro-batches), all-reduced once; the first step says
            # so when it is slow (the CPU port's kernels compiling or loading, SPEC.md#fast-cpu)
            with progress_mod.slow_start(echo, tty, tc.backend, active=step == start_step):
                loss, grads = distributed.loss_and_grads(be, params, tokens, mc, micro=tc.grad_accum)
            loss = float(loss)
            gnorm = global_norm(grads)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                what = "loss" if not math.isfinite(loss) else "gradient"
                raise NonFiniteLoss(f"step {step + 1}: the {what} is not finite (loss {loss}, gradient norm "
                                    f"{gnorm}); training stopped, {_kept(ck_path, run_dir)}", step + 1)
            if tc.grad_clip > 0 and gnorm > tc.grad_clip:
                scale = tc.grad_clip / gnorm
                grads = tree_map(lambda g, s=scale: g * g.dtype.type(s), grads)
            lr = lr_at(step, tc)
            params, opt_state = make_optimizer(rc, lr).update(params, grads, opt_state)
            largest = _largest_abs(params)
            if not (math.isfinite(largest) and largest <= DIVERGED_ABS):  # never checkpoint a diverged state
                raise NonFiniteLoss(f"step {step + 1}: the parameters diverged (largest |parameter| {largest:.3g}, "
                                    f"above {DIVERGED_ABS:g}); training stopped, {_kept(ck_path, run_dir)}", step + 1)
            step += 1
            dt = time.perf_counter() - t0
            tok_s = tokens[:, 1:].size / dt if dt > 0 else float("inf")
            record = {"step": step, "split": "train", "loss": loss, "lr": lr, "grad_norm": gnorm,
                      "tokens": step * tokens[:, 1:].size, "step_time_s": round(dt, 6), "time": round(time.time(), 3)}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            progress.update(step, loss, tok_s)
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                ev = evaluate(params, mc, corpus.val.stream, tc.batch_size, tc.seq_len, tc.eval_batches,
                              backend=tc.backend, tokenizer=corpus.tokenizer)
                metrics.write(json.dumps(_val_row(step, ev)) + "\n")
                metrics.flush()
                progress.note(f"step {step}: validation loss {ev['loss']:.4f}, bits/byte {ev['bits_per_byte']:.3f}")
                patience.add(ev["loss"])
                if patience.exhausted:
                    progress.close()
                    echo(f"early stop at step {step}: {patience.why}")
                    save(step)
                    early = step
                    break
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
                metrics.flush()
                save(step)
            if stop.asked():
                metrics.flush()
                save(step)
                progress.close()
                raise Interrupted(f"{stop.name} at step {step}/{tc.steps}: stopped after the step, checkpoint "
                                  f"written at {ck_path}; continue exactly with nested-learning train --resume "
                                  f"{run_dir}", step, stop.signum)
        step_box[0] = step
        if step > start_step or not ck_path.exists():
            save(step)
        progress.close()
        ev = evaluate(params, mc, corpus.val.stream, tc.batch_size, tc.seq_len, tc.eval_batches, backend=tc.backend,
                      tokenizer=corpus.tokenizer)
        metrics.write(json.dumps(_val_row(step, ev)) + "\n")
    if loss is None:  # nothing trained in this call (resumed at the last step): the run's last loss
        earlier = [r for r in kept_rows if "loss" in r]
        loss = earlier[-1]["loss"] if earlier else None
    summary = {"steps": step, "final_train_loss": loss, "early_stopped_at": early,
               "validation": ev, "wall_time_s": round(time.perf_counter() - t_start, 3),
               "run_dir": str(run_dir), "checkpoint": str(ck_path)}
    ckpt.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    echo(f"done: {step} steps in {summary['wall_time_s']:.1f} s; validation loss {ev['loss']:.4f}, "
         f"perplexity {ev['perplexity']:.2f}, bits per byte {ev['bits_per_byte']:.3f} "
         f"({size_text(ev)}); checkpoint {ck_path}")
    return summary


def _token_counts(corpus) -> str:
    """" (812,345 / 92,001 tokens, bpe 4,096)" when a token is not one byte, else ""."""
    tok = corpus.tokenizer
    if tok is None or tok.kind == "byte":
        return ""
    return f" ({corpus.train.n_tokens:,} / {corpus.val.n_tokens:,} tokens, {tok.kind} {tok.vocab_size:,})"


def _ck_step(path: Path) -> int | str:
    try:
        return ckpt.load_checkpoint(path).step
    except ckpt.CheckpointError:
        return "?"


def _count(params) -> int:
    return sum(int(x.size) for x in tree_leaves(params))


def _jsonable(obj):
    return data_mod._jsonable(obj)
