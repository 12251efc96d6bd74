"""The Python API: load a run, a checkpoint, a weights file or a preset; score text, sample, stream, export.

Paper: none (a convenience layer over the runs of SPEC.md#training). arXiv 2512.24695v1.
SPEC: SPEC.md#python-api (``Model``, ``load``), SPEC.md#weights (the weights-only file that
``Model.save`` and ``nested-learning export --weights-only`` write), SPEC.md#training (what
``loss``, ``generate`` and ``stream`` compute), SPEC.md#backends (``backend=``).

    import nlref
    m = nlref.load("runs/tiny")                    # a run directory, a checkpoint or a weights file
    m = nlref.Model.from_preset("hope-small", seed=0, backend="cpu")   # or fresh parameters
    m.loss("def f(x):\\n    return x\\n")           # {"loss": nats per token, "bits_per_byte", ...}
    m.generate("import os", max_new=80, seed=1)    # the sampled continuation, a str
    m.save("tiny.safetensors")                     # the weights only (about a third of a checkpoint)

Nothing here computes the model: ``loss`` is ``training.evaluate``, ``generate`` is
``training.generate``, ``stream`` is the backend's ``forward`` with the carried state (as
``training.stream_losses`` reads it), loading is ``training.load_model_checkpoint``. Tokens are
bytes (V = 256, ``data.encode`` / ``data.decode``), or the tokens of the run's ``tokenizer.json``
(tokenization.py, SPEC.md#data) when its directory holds one; a weights file then carries that
tokenizer in its metadata.

Decisions:

- ``loss(text)`` reads the whole text as one sequence from a fresh state (every position after the
  first scored); ``loss(text, seq_len=T)`` scores its consecutive (T + 1)-token windows, each a
  fresh sequence, as ``nested-learning eval --data FILE --seq-len T`` does (the same numbers).
- ``stream`` carries the fast state across calls, and the last logits with it, so the first token
  of a later call is scored too: calls on the pieces of a text return, concatenated, what one call
  on the whole text returns (logits; losses, which skip only the very first token).
- A weights file is refused, like a checkpoint, when written under another spec version (the
  model may compute another function), when any byte of it changed (per-tensor SHA-256 and a
  checksum of the metadata) or when its parameters are not finite.
- With a tokenizer other than bytes, ``loss``'s ``bits_per_byte`` counts the bytes of text the
  scored tokens stand for (``tokenization.bits_per_byte``), so it compares across tokenizers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nlref import backends as backends_mod
from nlref import checkpoint as ckpt
from nlref import data as data_mod
from nlref import training

WEIGHTS_FORMAT = "nested-learning-weights"
WEIGHTS_FORMAT_VERSION = "1"

WeightsError = ckpt.CheckpointError  # an unusable weights file; the message says why


# ------------------------------------------------------------------------------------------------
# The weights-only file (SPEC.md#weights)
# ------------------------------------------------------------------------------------------------


def save_weights(path: str | os.PathLike, params: dict, config, *, overwrite: bool = False,
                 source: dict | None = None, tokenizer=None) -> Path:
    """Write ``params`` (the flat parameter dict) and ``config`` (a ModelConfig) to a safetensors
    file atomically (``checkpoint.atomic_write_bytes``); an existing ``path`` is refused unless
    ``overwrite``. ``source``: what the weights came from (JSON, recorded in the metadata);
    ``tokenizer``: a tokenization.Tokenizer whose tokenizer.json goes into the metadata (None or
    bytes: nothing, the tokens are bytes)."""
    from safetensors.numpy import save

    from nlref import SPEC_VERSION
    from nlref.reference import contract

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it, "
                              "or choose another path")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name such as model.safetensors")
    try:
        arrays = contract.check_params(params, config)
    except ValueError as exc:
        raise WeightsError(f"cannot save these parameters: {exc}") from None
    tensors = {k: np.array(v, dtype=config.dtype, order="C") for k, v in arrays.items()}
    metadata = {
        "format": WEIGHTS_FORMAT,
        "format_version": WEIGHTS_FORMAT_VERSION,
        "spec_version": SPEC_VERSION,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "dtype": config.dtype,
        "n_params": json.dumps(int(sum(a.size for a in tensors.values()))),
        "source": json.dumps(source or {}, sort_keys=True),
        "checksums": json.dumps({k: ckpt._checksum(a) for k, a in tensors.items()}, sort_keys=True),
    }
    if getattr(tokenizer, "json_text", None):
        metadata["tokenizer"] = tokenizer.json_text  # tokenizer.json's text (SPEC.md#data)
    metadata["metadata_sha256"] = ckpt._metadata_checksum(metadata)
    ckpt.atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The string metadata of a safetensors file (its header only), or None when the file cannot
    be read as one (the loaders then say why)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own error types for a file that is not one
        return None


def _tokenization():
    try:
        from nlref import tokenization
    except ImportError:  # pragma: no cover - tokenization.py ships with the package
        raise WeightsError("this model has a tokenizer.json, and reading it needs nlref.tokenization "
                           "(and the tokenizers package)") from None
    return tokenization


def checkpoint_tokenizer(rc, ck):
    """The tokenizer of a checkpoint: None for bytes; else the run directory's tokenizer.json
    (``tokenization.for_checkpoint``, which checks it is the run's own)."""
    kind = getattr(rc.train, "tokenizer", None)
    path = Path(ck.path).parent / "tokenizer.json"
    if kind == "byte" or (kind is None and not path.is_file()):
        return None
    tokenization = _tokenization()
    return tokenization.for_checkpoint(rc.train, ck) if kind is not None else tokenization.load_file(path)


def weights_tokenizer(metadata: dict, path):
    """The tokenizer a weights file carries (None: bytes)."""
    if not metadata.get("tokenizer"):
        return None
    return _tokenization().BPETokenizer(metadata["tokenizer"], f"{path} (its tokenizer)")


def load_weights(path: str | os.PathLike):
    """(params, ModelConfig, metadata) of a weights file, fully checked; ``WeightsError`` (a
    ``checkpoint.CheckpointError``) saying what is wrong otherwise."""
    from nlref import COMPATIBLE_SPECS, SPEC_VERSION
    from nlref import config as model_config
    from nlref.reference import model as ref

    path = Path(path)
    tensors, metadata = ckpt._read_raw(path)  # the header and the file's size checked first
    fmt = metadata.get("format")
    if fmt == ckpt.FORMAT:
        raise WeightsError(f"{path}: a training checkpoint, not a weights file: load it with nlref.load, or "
                           f"write its weights with nested-learning export {path} --weights-only OUT.safetensors")
    if fmt != WEIGHTS_FORMAT:
        raise WeightsError(f"{path}: not a nested-learning weights file (format {fmt!r})")
    if metadata.get("format_version") != WEIGHTS_FORMAT_VERSION:
        raise WeightsError(f"{path}: weights format version {metadata.get('format_version')!r}; this code reads "
                           f"version {WEIGHTS_FORMAT_VERSION}")
    if metadata.get("metadata_sha256") != ckpt._metadata_checksum(metadata):
        raise WeightsError(f"{path}: the weights file's metadata does not match its checksum (edited or corrupt); "
                           "export it again")
    if metadata.get("spec_version") not in COMPATIBLE_SPECS:
        raise WeightsError(f"{path}: written under spec version {metadata.get('spec_version')!r}, this code "
                           f"implements {SPEC_VERSION}: the model may compute a different function; retrain")
    checksums = ckpt._meta_json(metadata, "checksums", path)
    if not isinstance(checksums, dict) or set(checksums) != set(tensors):
        raise WeightsError(f"{path}: the file's tensors do not match its metadata (corrupt file)")
    for name, digest in checksums.items():
        if ckpt._checksum(tensors[name]) != digest:
            raise WeightsError(f"{path}: checksum mismatch in tensor {name!r}: the file is corrupt; export it again")
    try:
        cfg = model_config.from_dict(ckpt._meta_json(metadata, "config", path))
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ckpt.CheckpointError):
            raise
        raise WeightsError(f"{path}: the file's model config is not one this version understands ({exc})") from None
    expected = {k: np.zeros(s, dtype=cfg.dtype) for k, s in ref.param_shapes(cfg).items()}  # (untouched pages)
    ckpt.check_params_match(tensors, expected, path)
    training.check_finite_params(tensors, path)
    return dict(tensors), cfg, metadata


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """What ``Model.stream`` carries between calls: the backend's streaming state (fast weights,
    caches, open CMS chunks), the logits of the last token read (they score the next call's first
    token) and the tokens read so far. Pass it back unchanged; it is never modified in place."""

    state: object
    last_logits: np.ndarray
    position: int
    owner: int


class Model:
    """A model (its ``config`` and ``params``) bound to a ``backend``, with the run's config and step
    when it came from a run. Build one with ``load``, ``Model.from_preset``, ``Model.from_checkpoint``
    or ``Model.from_weights``; or ``Model(config, params, backend)`` from arrays (the keys and shapes
    of ``reference.model.param_shapes``)."""

    def __init__(self, config, params: dict, backend: str | None = None, *, run_config=None, step: int | None = None,
                 source: dict | None = None, tokenizer=None):
        from nlref.reference import contract

        backend = backend or backends_mod.default()
        training.check_backend(backend, config.family)  # TrainingError: not here, or not this family
        try:
            params = contract.check_params(params, config)
        except ValueError as exc:
            raise ValueError(f"params do not fit config {config.name!r}: {exc}") from None
        self.config = config
        self.params = {k: np.asarray(v) for k, v in params.items()}
        self.backend = backend
        self.run_config = run_config
        self.step = step
        self.source = dict(source or {})
        if tokenizer is not None and getattr(tokenizer, "kind", "byte") == "byte":
            tokenizer = None
        if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                             f"({config.vocab_size})")
        self.tokenizer = tokenizer  # None: bytes; else a tokenization.Tokenizer (the run's tokenizer.json)
        self._device_params = None

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, backend: str | None = None, dtype: str | None = None,
                    **model_overrides) -> Model:
        """Fresh parameters (``init_params(cfg, seed)``, the same on every backend) of preset ``name``,
        resolved as ``nested-learning train --preset name`` resolves it (byte vocabulary V = 256);
        ``dtype`` and other ModelConfig fields override the preset's."""
        backend = backend or backends_mod.default()
        rc = training.resolve_config({"model": model_overrides}, {"preset": name, "seed": seed, "dtype": dtype,
                                                                  "backend": backend})
        params = backends_mod.get("reference").model.init_params(rc.model, seed=seed)
        return cls(rc.model, params, backend, source={"preset": name, "seed": seed})

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, backend: str | None = None) -> Model:
        """A training checkpoint or a run directory (its ``checkpoint.safetensors``), checked by
        ``training.load_model_checkpoint``."""
        params, rc, ck = training.load_model_checkpoint(path)
        return cls(rc.model, params, backend, run_config=rc, step=ck.step,
                   source={"checkpoint": str(ck.path), "step": ck.step}, tokenizer=checkpoint_tokenizer(rc, ck))

    @classmethod
    def from_weights(cls, path: str | os.PathLike, backend: str | None = None) -> Model:
        """A weights-only file written by ``Model.save`` or ``nested-learning export`` (SPEC.md#weights)."""
        params, cfg, metadata = load_weights(path)
        try:
            source = json.loads(metadata.get("source", "{}"))
        except ValueError:
            source = {}
        return cls(cfg, params, backend, step=source.get("step"), source={"weights": str(path), **source},
                   tokenizer=weights_tokenizer(metadata, path))

    # -- what it is ------------------------------------------------------------------------------

    @property
    def n_params(self) -> int:
        return int(sum(a.size for a in self.params.values()))

    def __repr__(self) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        return (f"Model({self.config.name}: {self.config.family}, {self.n_params:,} parameters, {self.config.dtype}, "
                f"backend {self.backend!r}{step})")

    def encode(self, text) -> np.ndarray:
        """Tokens (int64) of ``text``: a str or bytes (their bytes, or the model's tokenizer's tokens),
        or a sequence of token ids."""
        if self.tokenizer is not None and isinstance(text, str | bytes | bytearray | memoryview):
            tokens = np.asarray(self.tokenizer.encode(text if isinstance(text, str) else bytes(text)), dtype=np.int64)
        elif isinstance(text, str):
            tokens = data_mod.encode(text)
        elif isinstance(text, bytes | bytearray | memoryview):
            tokens = np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int64)
        else:
            tokens = np.asarray(text)
            if tokens.size == 0:
                tokens = tokens.astype(np.int64)
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise TypeError(f"text must be a str, bytes or a 1-D sequence of token ids, got "
                                f"{type(text).__name__} of shape {tokens.shape}")
            tokens = tokens.astype(np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        return tokens

    def decode(self, tokens) -> str:
        """Text of ``tokens`` (invalid UTF-8 as the replacement character)."""
        return data_mod.decode(tokens) if self.tokenizer is None else self.tokenizer.decode(tokens)

    # -- computing -------------------------------------------------------------------------------

    def loss(self, text, seq_len: int | None = None, batch_size: int = 1, max_batches: int | None = None) -> dict:
        """Mean next-token loss of ``text``: ``{"loss"`` (nats per token), ``"perplexity"``,
        ``"bits_per_byte"``, ``"tokens"`` (positions scored)``}`` by ``training.evaluate``.

        Without ``seq_len``: the whole text as one sequence. With it: its consecutive windows of
        ``seq_len + 1`` tokens, each a fresh sequence, ``batch_size`` windows per forward, at most
        ``max_batches`` batches (``nested-learning eval``'s ``--seq-len``, ``--batch-size``,
        ``--max-batches`` on a file holding ``text``)."""
        tokens = self.encode(text)
        if tokens.shape[0] < 2:
            raise ValueError(f"the text holds {tokens.shape[0]} token(s); a loss needs at least 2")
        if seq_len is None:
            seq_len, batch_size, max_batches = tokens.shape[0] - 1, 1, 1
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("max_batches", max_batches)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        try:
            # bits per byte of text: training.evaluate counts the bytes the scored tokens stand for
            return training.evaluate(self.params, self.config, tokens, batch_size, seq_len, max_batches,
                                     backend=self.backend, tokenizer=self.tokenizer)
        except data_mod.DataError as exc:
            raise ValueError(str(exc)) from None

    def generate(self, prompt, max_new: int = 200, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                 top_p: float = 1.0) -> str:
        """``max_new`` tokens sampled after ``prompt`` by ``training.generate`` (the prompt read once,
        then one token at a time with the carried state); returns the continuation only. Temperature
        0 samples greedily; ``top_k`` > 0 keeps the k likeliest; ``top_p`` < 1 samples in the
        nucleus (SPEC.md#training); the same ``seed``, the same text."""
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 0:
            raise ValueError(f"max_new must be an integer >= 0, got {max_new!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: all tokens), got {top_k!r}")
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        tokens = self.encode(prompt)
        if tokens.shape[0] == 0:
            raise ValueError("the prompt is empty; give at least one character")
        if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1: all tokens), got {top_p!r}")
        out = training.generate(self._params_on_device(), self.config, tokens, max_new, temperature, top_k, seed,
                                backend=self.backend, top_p=top_p)
        return self.decode(out)

    def stream(self, text, state: StreamState | None = None, losses: bool = False):
        """Read ``text`` as the continuation of the sequence ``state`` ended (None: a fresh one).

        Returns ``(logits, state)``: logits (n, V), row i the next-token logits after token i; or,
        with ``losses=True``, ``(losses, state)``: the next-token loss in nats of every token read,
        the first token of a fresh stream excepted (nothing predicts it). The new state continues
        the sequence; calls on consecutive pieces return, concatenated, what one call on the whole
        text returns (SPEC.md#python-api)."""
        be = backends_mod.get(self.backend)
        tokens = self.encode(text)
        if state is not None and (not isinstance(state, StreamState) or state.owner != id(self)):
            raise ValueError("state must be the StreamState a previous stream call of this Model returned (or None)")
        if tokens.shape[0] == 0:
            empty = np.zeros((0,) if losses else (0, self.config.vocab_size))
            return empty, state
        logits, new = training._stream_forward(be, self._params_on_device(), tokens[None, :], self.config,
                                               None if state is None else state.state)
        logits = np.asarray(logits[0])  # (n, V)
        out = StreamState(new, logits[-1].copy(), tokens.shape[0] + (0 if state is None else state.position), id(self))
        if not losses:
            return logits, out
        scoring = logits[:-1] if state is None else np.concatenate([state.last_logits[None], logits[:-1]])
        targets = tokens[1:] if state is None else tokens
        return training.cross_entropy(scoring, targets), out

    def _params_on_device(self):
        if self._device_params is None:
            self._device_params = backends_mod.get(self.backend).to_device(self.params)  # the GPU port: once
        return self._device_params

    # -- saving ----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the weights only (no optimizer state) with the model config in the metadata
        (SPEC.md#weights), atomically; an existing file is refused unless ``overwrite``."""
        source = {k: v for k, v in self.source.items() if k != "weights"}
        return save_weights(path, self.params, self.config, overwrite=overwrite, source=source,
                            tokenizer=self.tokenizer)


def load(path: str | os.PathLike, backend: str | None = None) -> Model:
    """A ``Model`` from a run directory, a training checkpoint or a weights-only file (told apart by
    the file's metadata); ``backend`` defaults to the fastest available (``backends.default``)."""
    p = Path(path)
    if p.is_file() and (read_metadata(p) or {}).get("format") == WEIGHTS_FORMAT:
        return Model.from_weights(p, backend)
    return Model.from_checkpoint(p, backend)


__all__ = ["WEIGHTS_FORMAT", "Model", "StreamState", "WeightsError", "checkpoint_tokenizer", "load", "load_weights",
           "read_metadata", "save_weights", "weights_tokenizer"]
