"""Byte-level training data: corpus loading, the train/validation split, and batch sampling.

Paper: none (infrastructure for the training runs of SPEC.md#training; byte tokens, V = 256,
follow SPEC.md#hope). arXiv 2512.24695v1.

Symbols:

| meaning                       | code name        | shape / type          |
| ----------------------------- | ---------------- | --------------------- |
| B (batch)                     | ``batch_size``   | int                   |
| T (tokens per sequence)       | ``seq_len``      | int                   |
| a batch of windows            | ``tokens``       | (B, T + 1) int64      |
| one split's bytes, end to end | ``Split.stream`` | (N,) uint8            |
| document d's bytes            | ``Split.doc(d)`` | (n_d,) uint8          |

Decisions (each recorded in SPEC.md#data):

- The default corpus is the Python standard library's ``*.py`` files that ship with the running
  interpreter, read as bytes, without ``site-packages`` and without the test-suite folders
  (``test/``, ``tests/``, ``idle_test/``: large, and full of deliberately odd encodings).
- The split is **by file** and deterministic: files are ordered by the SHA-256 of their path
  relative to the corpus root, and the first ``ceil(val_fraction * n)`` (at least one, at most
  ``n - 1``) go to validation. It depends only on the relative paths, so the same interpreter
  version gives the same split on every machine. A single file is split by bytes instead: its
  last ``val_fraction`` goes to validation. The split is recorded in the run (``data.json``).
- A file is binary when its first 8 KiB hold a NUL byte or more than 30% control bytes. A
  single binary file is an error; a directory or glob skips binary files and reports how many,
  and is an error when nothing textual remains. Hidden files and folders are skipped.
- Batches are non-overlapping windows of T + 1 bytes of the training stream (documents
  concatenated in split order), visited in a random order without replacement, one epoch after
  another; each epoch draws a random phase (the offset of the first window) and a permutation
  from one ``numpy`` Generator. The **data position** is ``(epoch, index)`` plus the Generator's
  state at the start of the epoch: it restores the sampler exactly (SPEC.md#training, resume).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256  # byte-level tokens (SPEC.md#hope)
TEST_DIRS = ("test", "tests", "idle_test")
BINARY_PROBE = 8192  # bytes examined by the binary check
BINARY_CONTROL_FRACTION = 0.30
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\b\x1b")


class DataError(ValueError):
    """A data path that cannot be used (missing, empty, binary, too small): the message says why."""


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------


def is_binary(content: bytes) -> bool:
    """True when the first 8 KiB hold a NUL byte or more than 30% control bytes."""
    head = content[:BINARY_PROBE]
    if not head:
        return False
    if b"\x00" in head:
        return True
    controls = sum(1 for b in head if b < 32 and b not in _TEXT_CONTROLS)
    return controls / len(head) > BINARY_CONTROL_FRACTION


def stdlib_root() -> Path:
    """The folder holding the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(root: Path | None = None) -> tuple[Path, list[str]]:
    """The default corpus: (root, sorted relative paths of the stdlib's ``*.py`` files)."""
    root = stdlib_root() if root is None else Path(root)
    rels = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts[:-1]
        if any(p in ("site-packages", "dist-packages", "__pycache__") for p in parts):
            continue
        if any(p in TEST_DIRS for p in parts):
            continue
        if path.is_file():
            rels.append(rel.as_posix())
    return root, sorted(rels)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def resolve_data_path(data: str) -> tuple[Path, list[str], str]:
    """A file, a directory (recursive) or a glob -> (root, sorted relative paths, kind)."""
    path = Path(data).expanduser()
    if path.is_file():
        return path.parent, [path.name], "file"
    if path.is_dir():
        rels = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file() and not _hidden(p.relative_to(path))
        )
        if not rels:
            raise DataError(f"--data {data}: the directory holds no files")
        return path, rels, "directory"
    if glob.has_magic(data):
        matches = sorted(m for m in glob.glob(os.path.expanduser(data), recursive=True) if os.path.isfile(m))
        if not matches:
            raise DataError(f"--data {data}: the glob matches no files")
        root = Path(os.path.commonpath([os.path.abspath(m) for m in matches]))
        if root.is_file():
            root = root.parent
        return root, sorted(Path(os.path.abspath(m)).relative_to(root).as_posix() for m in matches), "glob"
    raise DataError(f"--data {data}: no such file or directory (give a text file, a directory or a glob)")


# ------------------------------------------------------------------------------------------------
# Splits and the corpus
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One split: documents concatenated end to end, with their offsets."""

    names: tuple[str, ...]
    stream: np.ndarray  # (N,) uint8
    offsets: np.ndarray  # (n_docs + 1,) int64; document d is stream[offsets[d]:offsets[d+1]]

    @property
    def n_bytes(self) -> int:
        return int(self.stream.shape[0])

    @property
    def n_docs(self) -> int:
        return len(self.names)

    def doc(self, d: int) -> np.ndarray:
        return self.stream[self.offsets[d] : self.offsets[d + 1]]


def _make_split(names: list[str], contents: list[bytes]) -> Split:
    lengths = np.array([len(c) for c in contents], dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    stream = np.frombuffer(b"".join(contents), dtype=np.uint8).copy()
    stream.setflags(write=False)
    return Split(tuple(names), stream, offsets)


def path_hash(rel: str) -> str:
    return hashlib.sha256(rel.encode("utf-8")).hexdigest()


def split_files(rels: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by file: (train, validation), each in path order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(rels) < 2:
        raise ValueError("split_files needs at least two files")
    by_hash = sorted(rels, key=path_hash)
    n_val = min(max(1, math.ceil(val_fraction * len(rels))), len(rels) - 1)
    val = set(by_hash[:n_val])
    return [r for r in rels if r not in val], [r for r in rels if r in val]


@dataclass(frozen=True)
class Corpus:
    train: Split
    val: Split
    info: dict = field(default_factory=dict)  # the recorded split (data.json)


def _read_texts(data: str | None) -> tuple[Path, str, str, list[str], list[bytes], list[str]]:
    """(root, kind, source, names, contents, skipped binary files) of the text files of ``data``."""
    if data is None:
        root, rels = default_corpus_files()
        kind, source = "python-stdlib", "python-stdlib"
        if not rels:
            raise DataError(f"the default corpus is empty: no *.py files under {root}")
    else:
        root, rels, kind = resolve_data_path(data)
        source = str(data)
    contents, names, skipped = [], [], []
    for rel in rels:
        try:
            content = (root / rel).read_bytes()
        except OSError as exc:
            raise DataError(f"--data {source}: cannot read {rel}: {exc.strerror or exc}") from None
        if is_binary(content):
            if kind == "file":
                raise DataError(f"--data {source}: this looks like a binary file (NUL or control bytes), "
                                "not text; give a text file")
            skipped.append(rel)
            continue
        if content:
            contents.append(content)
            names.append(rel)
    if not names:
        if skipped:
            raise DataError(f"--data {source}: all {len(skipped)} files look binary; give text files")
        raise DataError(f"--data {source}: the data is empty (0 bytes of text)")
    return root, kind, source, names, contents, skipped


def load_documents(data: str | None) -> Split:
    """Every text file of ``data`` (no split), in path order: an evaluation set."""
    _, _, _, names, contents, _ = _read_texts(data)
    return _make_split(names, contents)


def load_corpus(data: str | None = None, val_fraction: float = 0.05) -> Corpus:
    """Load the default corpus (``data=None``) or a text file, directory or glob, and split it.

    Raises ``DataError`` for a missing, empty or binary path, or one with too little text.
    """
    root, kind, source, names, contents, skipped = _read_texts(data)
    total = sum(len(c) for c in contents)
    if len(names) == 1:
        content = contents[0]
        cut = len(content) - max(1, int(round(val_fraction * len(content))))
        if cut < 1:
            raise DataError(f"--data {source}: {len(content)} bytes are too few to split")
        train = _make_split([names[0]], [content[:cut]])
        val = _make_split([names[0]], [content[cut:]])
        split_rule = f"one file: the last {val_fraction:g} of its bytes are validation"
    else:
        train_names, val_names = split_files(names, val_fraction)
        lookup = dict(zip(names, contents, strict=True))
        train = _make_split(train_names, [lookup[n] for n in train_names])
        val = _make_split(val_names, [lookup[n] for n in val_names])
        split_rule = (f"by file: files sorted by sha256 of their relative path, the first "
                      f"ceil({val_fraction:g} * n) are validation")
    digest = hashlib.sha256()
    for name, content in zip(names, contents, strict=True):
        digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(content).digest())
    info = {
        "source": source,
        "kind": kind,
        "root": str(root),
        "val_fraction": val_fraction,
        "split_rule": split_rule,
        "n_files": len(names),
        "n_bytes": total,
        "skipped_binary": skipped,
        "sha256": digest.hexdigest(),
        "train": {"files": list(train.names), "n_bytes": train.n_bytes},
        "validation": {"files": list(val.names), "n_bytes": val.n_bytes},
    }
    if kind == "python-stdlib":
        info["python"] = sysconfig.get_python_version()
    return Corpus(train, val, info)


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


class BatchSampler:
    """Non-overlapping windows of ``seq_len + 1`` bytes, random order without replacement, by epoch.

    ``state()`` is JSON-serialisable; ``BatchSampler(..., state=s)`` continues exactly where the
    sampler that produced ``s`` stood (the data position of SPEC.md#training).
    """

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, seed: int, state: dict | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self.stream = np.asarray(stream, dtype=np.uint8)
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.window = self.seq_len + 1
        if self.stream.shape[0] < self.window:
            raise DataError(f"the training data holds {self.stream.shape[0]} bytes, fewer than "
                            f"seq_len + 1 = {self.window}: use a smaller --seq-len or more data")
        if state is None:
            self._rng = np.random.default_rng(seed)
            self.epoch = -1
            self._start_epoch()
        else:
            self._rng = np.random.default_rng()
            self._rng.bit_generator.state = state["epoch_start_rng"]
            self.epoch = int(state["epoch"]) - 1
            self._start_epoch()
            self.index = int(state["index"])

    def _start_epoch(self) -> None:
        self._epoch_start_rng = self._rng.bit_generator.state
        self.epoch += 1
        n = self.stream.shape[0]
        slack = (n - self.window) % self.window  # bytes left over after the last whole window
        self.phase = int(self._rng.integers(0, slack + 1))
        n_windows = (n - self.phase) // self.window
        self.order = self._rng.permutation(n_windows)
        self.index = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "epoch_start_rng": _jsonable(self._epoch_start_rng)}

    def next_batch(self) -> np.ndarray:
        """The next (B, T + 1) int64 batch of windows."""
        rows = []
        while len(rows) < self.batch_size:
            if self.index >= len(self.order):
                self._start_epoch()
            start = self.phase + int(self.order[self.index]) * self.window
            rows.append(self.stream[start : start + self.window])
            self.index += 1
        return np.stack(rows).astype(np.int64)  # (B, T + 1)


def eval_batches(stream: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None) -> list[np.ndarray]:
    """Validation windows: consecutive non-overlapping (T + 1)-byte windows from the start.

    Windows are cut at offsets 0, T + 1, 2(T + 1), ...; at most ``max_batches`` batches of B
    windows (the last batch may be smaller). Raises ``DataError`` if not one window fits.
    """
    window = seq_len + 1
    n_windows = stream.shape[0] // window
    if n_windows == 0:
        raise DataError(f"the validation data holds {stream.shape[0]} bytes, fewer than seq_len + 1 = "
                        f"{window}: use a smaller --seq-len or more data")
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    windows = np.asarray(stream[: n_windows * window], dtype=np.int64).reshape(n_windows, window)
    return [windows[i : i + batch_size] for i in range(0, n_windows, batch_size)]


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int64 tokens."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode(tokens) -> str:
    """Bytes back to text (invalid UTF-8 shown with the replacement character)."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
