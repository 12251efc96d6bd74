"""Tokenizers of the training runs: bytes (V = 256, the default) and byte-level BPE.

Paper: none (the paper's language models read tokens; the runs' tokenizers are infrastructure,
pinned in SPEC.md#data, and the bits-per-byte report in SPEC.md#training). arXiv 2512.24695v1.
Named ``tokenization`` so that it never shadows the ``tokenizers`` library it wraps.

Symbols:

| meaning                                  | code name              | shape / type      |
| ---------------------------------------- | ---------------------- | ----------------- |
| V (vocabulary size)                      | ``Tokenizer.vocab_size`` | int             |
| token i's bytes                          | ``token_bytes[i]``     | bytes             |
| UTF-8 bytes of each token                | ``token_nbytes``       | (V,) int64        |
| a document's tokens                      | ``encode(...)``        | (n,) int64        |

Decisions (each recorded in SPEC.md#tokenizers, within SPEC.md#data):

- ``byte`` (the default): one token per byte, V = 256, the stream is the bytes themselves.
- ``bpe``: a byte-level BPE (the Hugging Face ``tokenizers`` library: its ``ByteLevel``
  pre-tokenizer and decoder, no normalizer, no special tokens, merges seen at least twice) trained
  on the **training split only** (``train_bpe``), so no validation text shapes the vocabulary.
  Training is deterministic (same texts, same file: measured). The run saves it as
  ``tokenizer.json`` in the run directory.
- ``PATH/tokenizer.json``: a file the user brings; it must be **byte-level**: every token stands
  for fixed bytes (the model's tokens through the GPT-2 byte alphabet, added tokens for their
  text), and encoding the corpus must give back its exact bytes (checked on every split). Then
  the bits per byte of any tokenizer count the same bytes. Truncation and padding are switched
  off; special tokens are never added.
- Bits per byte are per byte of text: ``sum of token losses (nats) / ln 2 / sum of
  token_nbytes[target tokens]`` (``n_bytes``; training.evaluate); for bytes this is ``loss / ln 2``.
- A run records its choice (``byte``, ``bpe`` or the path) in its config; ``--resume``, ``eval``
  and ``generate`` reload ``tokenizer.json`` from the run directory and check its SHA-256
  against the one the run recorded (``data.json``, the checkpoint), so the tokens are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nlref.data import DataError

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_BPE_VOCAB = 4096
KINDS = ("byte", "bpe")  # a tokenizer setting that is neither is the path of a tokenizer.json
BPE_MIN_FREQUENCY = 2  # a pair seen once is no pattern
INSTALL = "pip install 'tokenizers>=0.19,<1' (a dependency of nested-learning-reference)"
_ENCODE_BATCH_BYTES = 1 << 20  # documents encoded per call to the library (bounds its memory)


class TokenizerError(DataError):
    """A tokenizer that cannot be used (unreadable, not byte-level, lossy): the message says why."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet (the ``ByteLevel`` pre-tokenizer's): byte -> the character standing for it."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


_CHAR_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


class Tokenizer:
    """The interface both tokenizers share (``ByteTokenizer``, ``BPETokenizer``)."""

    kind: str
    vocab_size: int
    token_bytes: tuple[bytes, ...]
    token_nbytes: np.ndarray  # (V,) int64
    json_text: str | None = None  # tokenizer.json's text (None: nothing to save)
    sha256: str | None = None
    source: str = ""

    @property
    def stream_dtype(self):
        return np.uint8 if self.vocab_size <= 256 else np.uint16 if self.vocab_size <= 65536 else np.int32

    def encode(self, text: str | bytes) -> np.ndarray:
        raise NotImplementedError

    def encode_docs(self, contents: Iterable[bytes], names: Iterable[str] = ()) -> tuple[list[np.ndarray], int]:
        """Each document's tokens and the UTF-8 bytes they decode to in all."""
        raise NotImplementedError

    def decode_bytes(self, ids) -> bytes:
        """The bytes the tokens stand for, concatenated (exact; partial UTF-8 stays as it is)."""
        ids = self._check_ids(ids)
        return b"".join(self.token_bytes[i] for i in ids.tolist())

    def decode(self, ids) -> str:
        """The text of the tokens (invalid UTF-8 shown with the replacement character)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def n_bytes(self, ids) -> int:
        """The UTF-8 bytes the tokens decode to (the denominator of bits per byte)."""
        ids = self._check_ids(ids)
        return int(self.token_nbytes[ids].sum()) if ids.size else 0

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise TokenizerError(f"token ids must lie in [0, {self.vocab_size}), got values in "
                                 f"[{ids.min()}, {ids.max()}]")
        return ids

    def describe(self) -> dict:
        """What the run records about the tokenizer (data.json)."""
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class ByteTokenizer(Tokenizer):
    """One token per byte (V = 256)."""

    kind = "byte"
    vocab_size = 256
    source = "bytes"

    def __init__(self):
        self.token_bytes = tuple(bytes([b]) for b in range(256))
        self.token_nbytes = np.ones(256, np.int64)

    def encode(self, text: str | bytes) -> np.ndarray:
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def encode_docs(self, contents, names=()):
        docs = [np.frombuffer(bytes(c), dtype=np.uint8) for c in contents]
        return docs, sum(d.shape[0] for d in docs)

    def decode_bytes(self, ids) -> bytes:
        return self._check_ids(ids).astype(np.uint8).tobytes()

    def n_bytes(self, ids) -> int:
        return int(self._check_ids(ids).size)


def _tokenizers_lib():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"a BPE tokenizer needs the tokenizers package, which is not installed: {INSTALL}") from None
    return tokenizers


def _decoder_types(spec) -> list[str]:
    if not isinstance(spec, dict):
        return []
    if spec.get("type") == "Sequence":
        return [t for d in spec.get("decoders") or [] for t in _decoder_types(d)]
    return [spec.get("type")]


class BPETokenizer(Tokenizer):
    """A byte-level tokenizer of the Hugging Face ``tokenizers`` library (a tokenizer.json)."""

    kind = "bpe"

    def __init__(self, json_text: str, source: str, origin: str = "file"):
        lib = _tokenizers_lib()
        self.source, self.origin = source, origin  # origin: "trained" (this run) or "file"
        hint = ("give a tokenizer.json written by the Hugging Face tokenizers library (a byte-level BPE such as "
                "GPT-2's), or --tokenizer bpe to train one on the training split")
        try:
            spec = json.loads(json_text)
            tok = lib.Tokenizer.from_str(json_text)
        except Exception as exc:  # the library raises its own Exception type for any bad file
            raise TokenizerError(f"{source}: not a tokenizer file the tokenizers library can read "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); {hint}") from None
        if not isinstance(spec, dict):
            raise TokenizerError(f"{source}: not a tokenizer file (a JSON object is expected); {hint}")
        if "ByteLevel" not in _decoder_types(spec.get("decoder")):
            raise TokenizerError(
                f"{source}: not a byte-level tokenizer (its decoder is {_decoder_types(spec.get('decoder')) or 'none'}, "
                "not ByteLevel): bits per byte and generation need every token to stand for fixed bytes; "
                f"{hint}")
        model = spec.get("model") or {}
        if model.get("dropout") not in (None, 0, 0.0):
            raise TokenizerError(f"{source}: the BPE model has dropout {model['dropout']} (random merges), so the "
                                 "same text would give other tokens each time; set \"dropout\": null in the file")
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.json_text = json_text
        self.sha256 = hashlib.sha256(json_text.encode("utf-8")).hexdigest()
        added = {int(i): t.content for i, t in tok.get_added_tokens_decoder().items()}
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"{source}: the tokenizer has an empty vocabulary; {hint}")
        self.vocab_size = max(vocab.values()) + 1
        table = [b""] * self.vocab_size
        for token, i in vocab.items():
            if i in added:
                table[i] = added[i].encode("utf-8")
                continue
            try:
                table[i] = bytes(_CHAR_TO_BYTE[c] for c in token)
            except KeyError:
                raise TokenizerError(f"{source}: token {i} ({token!r}) is not in the byte-level alphabet, so it "
                                     f"stands for no fixed bytes; {hint}") from None
        self.token_bytes = tuple(table)
        self.token_nbytes = np.array([len(b) for b in table], dtype=np.int64)
        self._flat = np.frombuffer(b"".join(table), dtype=np.uint8)
        self._starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(self.token_nbytes)[:-1]])
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode("utf-8", errors="replace")
        return np.array(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode_bytes(self, ids) -> bytes:
        ids = self._check_ids(ids)
        if not ids.size:
            return b""
        lens = self.token_nbytes[ids]
        ends = np.cumsum(lens)
        # position j of the output is byte (j - start of its token in the output) of that token
        within = np.arange(int(ends[-1]), dtype=np.int64) - np.repeat(ends - lens, lens)
        return self._flat[np.repeat(self._starts[ids], lens) + within].tobytes()

    def encode_docs(self, contents, names=()):
        """Encode documents (UTF-8 bytes; invalid UTF-8 replaced by U+FFFD) in batches, and check
        that their tokens give back their bytes exactly (a lossy tokenizer is refused)."""
        contents, names = list(contents), list(names)
        out: list[np.ndarray] = []
        total = 0
        start = 0
        while start < len(contents):
            stop, size = start, 0
            while stop < len(contents) and (stop == start or size + len(contents[stop]) <= _ENCODE_BATCH_BYTES):
                size += len(contents[stop])
                stop += 1
            texts = [c.decode("utf-8", errors="replace") for c in contents[start:stop]]
            encs = self._encode_batch(texts, add_special_tokens=False)
            ids = [np.array(e.ids, dtype=np.int64) for e in encs]
            want = [t.encode("utf-8") for t in texts]
            got = self.decode_bytes(np.concatenate(ids)) if ids else b""
            if got != b"".join(want):
                for k, (i, w) in enumerate(zip(ids, want, strict=True)):
                    if self.decode_bytes(i) != w:
                        name = names[start + k] if start + k < len(names) else f"document {start + k + 1}"
                        raise TokenizerError(
                            f"{self.source}: the tokenizer does not give back the text of {name} (its tokens decode to "
                            "other bytes: a normalizer, an unknown token or a lossy pre-tokenizer); bits per byte and "
                            "generation need a lossless byte-level tokenizer (GPT-2's tokenizer.json, or --tokenizer bpe)")
            total += len(got)
            out.extend(ids)
            start = stop
        return out, total

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256, "source": self.source,
                "file": TOKENIZER_FILE}


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB, length: int | None = None,
              source: str = "a BPE tokenizer trained on the training split") -> BPETokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens (256 bytes + merges) trained on ``texts``."""
    if not isinstance(vocab_size, int) or vocab_size < 256:
        raise TokenizerError(f"a byte-level BPE holds at least the 256 bytes: vocab size must be >= 256, got {vocab_size!r}")
    lib = _tokenizers_lib()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = lib.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=BPE_MIN_FREQUENCY, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer, length=length)
    return BPETokenizer(tok.to_str(), source, origin="trained")


def load_file(path: str | os.PathLike, what: str | None = None) -> BPETokenizer:
    """The tokenizer in a tokenizer.json file; ``TokenizerError`` naming the file and what to do."""
    path = Path(path)
    label = what or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{label}: no such tokenizer file (give the path of a tokenizer.json, or --tokenizer "
                             "bpe to train one on the training split)") from None
    except IsADirectoryError:
        raise TokenizerError(f"{label}: a directory, not a tokenizer file (give PATH/{TOKENIZER_FILE})") from None
    except UnicodeDecodeError:
        raise TokenizerError(f"{label}: not a tokenizer file (not UTF-8 text); give a tokenizer.json") from None
    except OSError as exc:
        raise TokenizerError(f"{label}: cannot read the tokenizer file ({exc.strerror or exc})") from None
    return BPETokenizer(text, label)


def is_file_setting(setting: str) -> bool:
    """True when a run's ``tokenizer`` setting is a path (not "byte" or "bpe")."""
    return setting not in KINDS


def for_run(tc, run_dir: str | os.PathLike, resume: bool, train_texts, n_train_docs: int | None = None) -> Tokenizer:
    """The tokenizer of a run (``tc``: its TrainConfig): bytes; on ``resume``, the run directory's
    tokenizer.json (checked against the SHA-256 its data.json recorded); else the user's file
    (``tc.tokenizer`` a path) or a BPE trained on ``train_texts`` (the training split only)."""
    if tc.tokenizer == "byte":
        return ByteTokenizer()
    run_dir = Path(run_dir)
    saved = run_dir / TOKENIZER_FILE
    if resume and saved.is_file():
        tok = load_file(saved)
        recorded = _recorded_sha256(run_dir)
        if recorded is not None and recorded != tok.sha256:
            raise TokenizerError(f"{saved}: the tokenizer changed since the run started (sha256 {tok.sha256[:12]} vs "
                                 f"{recorded[:12]} recorded in data.json), so the run's tokens would change; restore "
                                 "the run's tokenizer.json, or start over with --overwrite")
        return tok
    if resume and (run_dir / "checkpoint.safetensors").exists():
        raise TokenizerError(f"{saved}: missing; the run was trained with the {tc.tokenizer!r} tokenizer saved there, "
                             "and its tokens cannot be reproduced without it; restore the file, or start over with "
                             "--overwrite")
    if tc.tokenizer == "bpe":
        return train_bpe(train_texts, tc.tokenizer_vocab_size or DEFAULT_BPE_VOCAB, length=n_train_docs)
    return load_file(tc.tokenizer, f"--tokenizer {tc.tokenizer}")


def _recorded_sha256(run_dir: Path) -> str | None:
    try:
        info = json.loads((run_dir / "data.json").read_text())
        return info["tokenizer"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def for_checkpoint(tc, ck) -> Tokenizer:
    """The tokenizer of a checkpoint (``ck``: checkpoint.Checkpoint, ``tc``: its run's TrainConfig):
    bytes, or the tokenizer.json beside it, checked against the SHA-256 the checkpoint recorded."""
    if tc.tokenizer == "byte":
        return ByteTokenizer()
    path = Path(ck.path).parent / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"{path}: missing; {ck.path} was trained with the {tc.tokenizer!r} tokenizer its run saved "
                             f"as {TOKENIZER_FILE}: put that file beside the checkpoint")
    tok = load_file(path)
    want = (ck.extra or {}).get("tokenizer_sha256") if isinstance(ck.extra, dict) else None
    if want is not None and want != tok.sha256:
        raise TokenizerError(f"{path}: not the tokenizer {ck.path} was trained with (sha256 {tok.sha256[:12]} vs "
                             f"{want[:12]}); put the run's own {TOKENIZER_FILE} beside the checkpoint")
    return tok


__all__ = ["BPETokenizer", "ByteTokenizer", "DEFAULT_BPE_VOCAB", "TOKENIZER_FILE", "Tokenizer", "TokenizerError",
           "bytes_to_unicode", "for_checkpoint", "for_run", "load_file", "train_bpe"]
