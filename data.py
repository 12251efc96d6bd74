"""Training data: corpus loading (text files, JSONL, CSV, Parquet), the train/validation split,
tokenization into token streams, and batch sampling.

Paper: none (infrastructure for the training runs of SPEC.md#training; byte tokens, V = 256, are
the default, SPEC.md#hope; the tokenizers are tokenization.py's, SPEC.md#data). arXiv 2512.24695v1.

Symbols:

| meaning                          | code name         | shape / type               |
| -------------------------------- | ----------------- | -------------------------- |
| B (batch)                        | ``batch_size``    | int                        |
| T (tokens per sequence)          | ``seq_len``       | int                        |
| a batch of windows               | ``tokens``        | (B, T + 1) int64           |
| one split's tokens, end to end   | ``Split.stream``  | (N,) uint8 (bytes) / uint16 / int32 |
| document d's tokens              | ``Split.doc(d)``  | (n_d,) same dtype          |
| one split's text bytes           | ``Split.n_bytes`` | int                        |

Decisions (each recorded in SPEC.md#data):

- The default corpus is the Python standard library's ``*.py`` files that ship with the running
  interpreter, read as bytes, without ``site-packages`` and without the test-suite folders
  (``test/``, ``tests/``, ``idle_test/``: large, and full of deliberately odd encodings).
- A *document* is a text file, or one record of a JSONL (``.jsonl``, ``.ndjson``), CSV (``.csv``,
  ``.tsv``) or Parquet (``.parquet``, ``.pq``) file: the record's ``text_field`` (default
  ``"text"``), named ``FILE:LINE`` (JSONL, CSV: the line the record starts on) or ``FILE:ROW``
  (Parquet, 1-based). JSONL and CSV are read with the standard library, streamed one line / row
  at a time (``iter_jsonl``, ``iter_csv`` are generators); Parquet with pyarrow, one row group at
  a time (``iter_parquet``; the optional ``parquet`` extra). A bad record (invalid JSON, not an
  object, missing field, non-string or null value) is a ``DataError`` naming the file and the
  line (row); empty texts are skipped; no text at all is an error.
- The split is **by document** and deterministic: documents are ordered by the SHA-256 of their
  name (the path relative to the corpus root, ``:LINE`` for a record), and the first
  ``ceil(val_fraction * n)`` (at least one, at most ``n - 1``) go to validation. It depends only on
  the names, so the same data gives the same split on every machine. A single document is split
  by bytes instead: its last ``val_fraction`` (the cut moved back to a UTF-8 character start) goes
  to validation. The split is recorded in the run (``data.json``).
- A file is binary when its first 8 KiB hold a NUL byte or more than 30% control bytes. A
  single binary file is an error; a directory or glob skips binary files and reports how many,
  and is an error when nothing textual remains. Hidden files and folders are skipped.
- Tokens: each split's documents are encoded one by one and concatenated in split order (bytes by
  default: the stream is the bytes themselves). ``Split.n_bytes`` counts the text bytes the
  tokens decode to, for bits per byte (SPEC.md#training).
- Batches are non-overlapping windows of T + 1 tokens of the training stream, visited in a random
  order without replacement, one epoch after another; each epoch draws a random phase (the
  offset of the first window) and a permutation from one ``numpy`` Generator. The **data
  position** is ``(epoch, index)`` plus the Generator's state at the start of the epoch: it
  restores the sampler exactly (SPEC.md#training, resume).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
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
# Records: JSONL, CSV (the standard library, streamed) and Parquet (pyarrow, by row group)
# ------------------------------------------------------------------------------------------------

RECORD_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
                  ".pq": "parquet"}
PARQUET_INSTALL = "pip install 'nested-learning-reference[parquet]'"


def record_format(path: str | os.PathLike) -> str | None:
    """"jsonl", "csv", "tsv" or "parquet" for a file whose name ends so (any case), else None (text)."""
    return RECORD_FORMATS.get(Path(path).suffix.lower())


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object",
            bytes: "bytes"}.get(type(value), type(value).__name__)


def _field_hint(field: str, have, what: str = "field") -> str:
    names = [str(k) for k in have]
    shown = ", ".join(repr(k) for k in names[:10]) + (", ..." if len(names) > 10 else "")
    return (f"no {what} {field!r} (it has {shown or 'none'}); name the {what} that holds the text with "
            "--text-field")


def iter_jsonl(path: str | os.PathLike, text_field: str = "text"):
    """Yield (line number, text) for each record of a JSONL file, reading one line at a time.

    Blank lines are skipped. Raises ``DataError`` naming the file and the line for a line that is
    not UTF-8, not valid JSON or not an object, has no ``text_field``, or whose value is not a
    string. A generator: a large file is never held whole in memory, only the texts yielded.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} line {lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                f"{exc.start + 1}); JSONL is UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {lineno}: a JSON object is expected, got {_type_name(record)}")
            if text_field not in record:
                raise DataError(f"{path} line {lineno}: {_field_hint(text_field, record)}")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path} line {lineno}: field {text_field!r} is {_type_name(text)}, not a string")
            yield lineno, text


def _utf8_lines(f, path: Path, what: str):
    """The lines of a binary file as text (line endings kept), decoded one by one, so that a byte
    that is not UTF-8 is named with its line."""
    for lineno, raw in enumerate(f, 1):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} line {lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                            f"{exc.start + 1}); {what} files are read as UTF-8") from None


def iter_csv(path: str | os.PathLike, text_field: str = "text", delimiter: str = ","):
    """Yield (line number, text) for each row of a CSV file with a header row, one row at a time.

    The line number is the line the row starts on (a quoted field may span lines). Raises
    ``DataError`` naming the file and the line for a file without a ``text_field`` column, a row
    without a value in it, text that is not UTF-8, or CSV the ``csv`` module cannot parse.
    """
    path = Path(path)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a document is longer than 128 KiB
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    with f:
        reader = csv.reader(_utf8_lines(f, path, "CSV"), delimiter=delimiter)
        line = 1
        try:
            header = next(reader, None)
            if header is None:
                return
            if text_field not in header:
                raise DataError(f"{path} line 1 (the header): {_field_hint(text_field, header, 'column')}")
            col = header.index(text_field)
            line = reader.line_num + 1
            for row in reader:
                start, line = line, reader.line_num + 1
                if not row:  # a blank line
                    continue
                if col >= len(row):
                    raise DataError(f"{path} line {start}: the row has {len(row)} values, none in column "
                                    f"{text_field!r} (column {col + 1} of the header)")
                yield start, row[col]
        except csv.Error as exc:
            raise DataError(f"{path} line {line}: not valid CSV ({exc})") from None


def _pyarrow_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed: {PARQUET_INSTALL}") from None
    return pq


def iter_parquet(path: str | os.PathLike, text_field: str = "text"):
    """Yield (row number, text) for each row of a Parquet file (rows 1-based), one row group at a time.

    Raises ``DataError`` naming the file (and the row) for a file pyarrow cannot read, a missing
    column, or a null or non-string value; without pyarrow, naming the extra to install.
    """
    path = Path(path)
    pq = _pyarrow_parquet(path)
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a Parquet file pyarrow can read ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: {_field_hint(text_field, names, 'column')}")
    row = 0
    with pf:
        for group in range(pf.num_row_groups):
            try:
                column = pf.read_row_group(group, columns=[text_field]).column(0)
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"{path} row group {group}: cannot read it ({exc})") from None
            for value in column.to_pylist():
                row += 1
                if not isinstance(value, str):
                    raise DataError(f"{path} row {row}: column {text_field!r} is {_type_name(value)} "
                                    f"({column.type}), not a string")
                yield row, value
            del column


def iter_records(path: str | os.PathLike, text_field: str = "text"):
    """(number, text) of each record of a JSONL, CSV, TSV or Parquet file (``record_format``)."""
    kind = record_format(path)
    if kind == "jsonl":
        return iter_jsonl(path, text_field)
    if kind in ("csv", "tsv"):
        return iter_csv(path, text_field, "," if kind == "csv" else "\t")
    if kind == "parquet":
        return iter_parquet(path, text_field)
    raise ValueError(f"{path}: not a record file (JSONL, CSV, TSV or Parquet)")


# ------------------------------------------------------------------------------------------------
# Splits and the corpus
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One split: documents' tokens concatenated end to end, with their offsets.

    ``n_text_bytes``: the UTF-8 bytes the tokens decode to (None: one token is one byte)."""

    names: tuple[str, ...]
    stream: np.ndarray  # (N,) tokens: uint8 bytes, or uint16 / int32 token ids
    offsets: np.ndarray  # (n_docs + 1,) int64; document d is stream[offsets[d]:offsets[d+1]]
    n_text_bytes: int | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.stream.shape[0])

    @property
    def n_bytes(self) -> int:
        return self.n_tokens if self.n_text_bytes is None else int(self.n_text_bytes)

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
    """Deterministic split by document name: (train, validation), each in the given order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(rels) < 2:
        raise ValueError("split_files needs at least two files")
    by_hash = sorted(rels, key=path_hash)
    n_val = min(max(1, math.ceil(val_fraction * len(rels))), len(rels) - 1)
    val = set(by_hash[:n_val])
    return [r for r in rels if r not in val], [r for r in rels if r in val]


@dataclass(frozen=True)
class TextSplit:
    """One split as text, before tokenization: document names and their bytes."""

    names: tuple[str, ...]
    contents: tuple[bytes, ...]

    @property
    def n_bytes(self) -> int:
        return sum(len(c) for c in self.contents)

    def texts(self):
        """The documents as ``str`` (invalid UTF-8 replaced by U+FFFD), for a tokenizer to train on."""
        return (c.decode("utf-8", errors="replace") for c in self.contents)


@dataclass(frozen=True)
class Documents:
    """The corpus split into train and validation documents, not yet tokenized (``tokenize``)."""

    train: TextSplit
    val: TextSplit
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Corpus:
    train: Split
    val: Split
    info: dict = field(default_factory=dict)  # the recorded split (data.json)
    tokenizer: object = None  # tokenization.Tokenizer; None: bytes

    @property
    def unit(self) -> str:
        """What one token is, for messages: "bytes" with the byte tokenizer, else "tokens"."""
        return "bytes" if self.tokenizer is None or self.tokenizer.kind == "byte" else "tokens"


MAX_LISTED_DOCS = 100_000  # data.json lists at most this many document names per split


def _read_texts(data: str | None, text_field: str = "text"):
    """(root, kind, source, names, contents, skipped binary files, record files) of ``data``."""
    if data is None:
        root, rels = default_corpus_files()
        kind, source = "python-stdlib", "python-stdlib"
        if not rels:
            raise DataError(f"the default corpus is empty: no *.py files under {root}")
    else:
        root, rels, kind = resolve_data_path(data)
        source = str(data)
    contents, names, skipped, record_files = [], [], [], {}
    for rel in rels:
        if kind != "python-stdlib" and record_format(rel) is not None:
            n_before = len(names)
            try:
                for number, text in iter_records(root / rel, text_field):
                    if not text:
                        continue
                    try:
                        contents.append(text.encode("utf-8"))
                    except UnicodeEncodeError:
                        raise DataError(f"{root / rel} {'row' if record_format(rel) == 'parquet' else 'line'} "
                                        f"{number}: the text is not valid Unicode (a lone surrogate)") from None
                    names.append(f"{rel}:{number}")
            except DataError as exc:
                raise DataError(str(exc) if kind == "file" else f"--data {source}: {exc}") from None
            record_files[rel] = len(names) - n_before
            continue
        try:
            content = (root / rel).read_bytes()
        except OSError as exc:
            raise DataError(f"--data {source}: cannot read {rel}: {exc.strerror or exc}") from None
        if is_binary(content):
            if kind == "file":
                raise DataError(f"--data {source}: this looks like a binary file (NUL or control bytes), "
                                "not text; give a text file (or a .jsonl, .csv or .parquet file of records)")
            skipped.append(rel)
            continue
        if content:
            contents.append(content)
            names.append(rel)
    if not names:
        if skipped:
            raise DataError(f"--data {source}: all {len(skipped)} files look binary; give text files")
        if record_files:
            raise DataError(f"--data {source}: the data is empty: no record has text in field {text_field!r} "
                            f"({sum(record_files.values())} non-empty records in {len(record_files)} file(s))")
        raise DataError(f"--data {source}: the data is empty (0 bytes of text)")
    return root, kind, source, names, contents, skipped, record_files


def _utf8_start(content: bytes, cut: int) -> int:
    """``cut`` moved back to the start of the UTF-8 character it falls in (at most 3 bytes)."""
    for back in range(min(3, cut)):
        if content[cut - back] & 0xC0 != 0x80:
            return cut - back
    return cut


def _split_record(names: list[str], contents: list[bytes]) -> dict:
    out = {"files": names[:MAX_LISTED_DOCS], "n_docs": len(names), "n_bytes": sum(len(c) for c in contents),
           "names_sha256": hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()}
    if len(names) > MAX_LISTED_DOCS:
        out["files_truncated"] = True
    return out


def read_corpus(data: str | None = None, val_fraction: float = 0.05, text_field: str = "text") -> Documents:
    """The documents of the default corpus (``data=None``) or of text / JSONL / CSV / Parquet files,
    a directory or a glob, split into train and validation (SPEC.md#data); not tokenized.

    Raises ``DataError`` for a missing, empty or binary path, a bad record, or too little text.
    """
    root, kind, source, names, contents, skipped, record_files = _read_texts(data, text_field)
    total = sum(len(c) for c in contents)
    if len(names) == 1:
        content = contents[0]
        cut = len(content) - max(1, int(round(val_fraction * len(content))))
        cut = _utf8_start(content, cut) if cut >= 1 else cut
        if cut < 1:
            raise DataError(f"--data {source}: {len(content)} bytes are too few to split")
        train = TextSplit((names[0],), (content[:cut],))
        val = TextSplit((names[0],), (content[cut:],))
        split_rule = f"one document: the last {val_fraction:g} of its bytes are validation"
    else:
        train_names, val_names = split_files(names, val_fraction)
        lookup = dict(zip(names, contents, strict=True))
        train = TextSplit(tuple(train_names), tuple(lookup[n] for n in train_names))
        val = TextSplit(tuple(val_names), tuple(lookup[n] for n in val_names))
        what = "document" if record_files else "file"
        split_rule = (f"by {what}: {what}s sorted by sha256 of their {'name' if record_files else 'relative path'}, "
                      f"the first ceil({val_fraction:g} * n) are validation")
    digest = hashlib.sha256()
    for name, content in zip(names, contents, strict=True):
        digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(content).digest())
    info = {
        "source": source,
        "kind": kind,
        "root": str(root),
        "val_fraction": val_fraction,
        "split_rule": split_rule,
        "n_files": len(names) - sum(record_files.values()) + len(record_files),
        "n_bytes": total,
        "skipped_binary": skipped,
        "sha256": digest.hexdigest(),
        "train": _split_record(list(train.names), list(train.contents)),
        "validation": _split_record(list(val.names), list(val.contents)),
    }
    if record_files:
        info["n_documents"] = len(names)
        info["text_field"] = text_field
        info["record_files"] = record_files
    if kind == "python-stdlib":
        info["python"] = sysconfig.get_python_version()
    return Documents(train, val, info)


def encode_split(split: TextSplit, tokenizer=None) -> Split:
    """The token stream of a text split: bytes (``tokenizer`` None or the byte tokenizer), else the
    documents encoded one by one and concatenated (``tokenization.Tokenizer.encode_docs``)."""
    if tokenizer is None or tokenizer.kind == "byte":
        return _make_split(list(split.names), list(split.contents))
    docs, n_text_bytes = tokenizer.encode_docs(split.contents, split.names)
    lengths = np.array([d.shape[0] for d in docs], dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    stream = np.concatenate(docs).astype(tokenizer.stream_dtype) if docs else np.zeros(0, tokenizer.stream_dtype)
    stream.setflags(write=False)
    return Split(tuple(split.names), stream, offsets, n_text_bytes)


def tokenize(docs: Documents, tokenizer=None) -> Corpus:
    """The corpus of ``docs`` as token streams (SPEC.md#data); ``tokenizer`` None: bytes."""
    train, val = encode_split(docs.train, tokenizer), encode_split(docs.val, tokenizer)
    info = json.loads(json.dumps(docs.info))
    if tokenizer is not None and tokenizer.kind != "byte":
        info["tokenizer"] = tokenizer.describe()
        for key, split in (("train", train), ("validation", val)):
            info[key]["n_tokens"] = split.n_tokens
            info[key]["n_text_bytes"] = split.n_bytes  # UTF-8 bytes the tokens decode to (bits per byte)
    return Corpus(train, val, info, tokenizer)


def load_documents(data: str | None, text_field: str = "text", tokenizer=None) -> Split:
    """Every document of ``data`` (no split), in path order: an evaluation set."""
    _, _, _, names, contents, _, _ = _read_texts(data, text_field)
    return encode_split(TextSplit(tuple(names), tuple(contents)), tokenizer)


def load_corpus(data: str | None = None, val_fraction: float = 0.05, text_field: str = "text",
                tokenizer=None) -> Corpus:
    """Load the default corpus (``data=None``) or text / JSONL / CSV / Parquet files, a directory or
    a glob, split it by document and tokenize it (``tokenizer`` None: bytes).

    Raises ``DataError`` for a missing, empty or binary path, a bad record, or too little text.
    """
    return tokenize(read_corpus(data, val_fraction, text_field), tokenizer)


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


class BatchSampler:
    """Non-overlapping windows of ``seq_len + 1`` tokens, random order without replacement, by epoch.

    ``state()`` is JSON-serialisable; ``BatchSampler(..., state=s)`` continues exactly where the
    sampler that produced ``s`` stood (the data position of SPEC.md#training).
    """

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, seed: int, state: dict | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        stream = np.asarray(stream)
        self.stream = stream if stream.dtype.kind in "ui" else stream.astype(np.int64)  # tokens as given
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.window = self.seq_len + 1
        if self.stream.shape[0] < self.window:
            raise DataError(f"the training data holds {self.stream.shape[0]} tokens, fewer than "
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
    """Validation windows: consecutive non-overlapping (T + 1)-token windows from the start.

    Windows are cut at offsets 0, T + 1, 2(T + 1), ...; at most ``max_batches`` batches of B
    windows (the last batch may be smaller). Raises ``DataError`` if not one window fits.
    """
    window = seq_len + 1
    n_windows = stream.shape[0] // window
    if n_windows == 0:
        raise DataError(f"the validation data holds {stream.shape[0]} tokens, fewer than seq_len + 1 = "
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
