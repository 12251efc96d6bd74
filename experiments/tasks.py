"""Synthetic byte-level recall tasks with exact answers: passkey retrieval and MQAR.

Paper: §7.2 (RULER needle-in-a-haystack, NL Table 1: S-NIAH, MQ-NIAH) and §7.4 (in-context
recall), arXiv 2512.24695v1; MQAR is Zoology's multi-query associative recall (Arora et al.
2023), the synthetic form of the recall the paper measures.

Every example is exactly ``length`` bytes: the prompt followed by the answer bytes, so a
training window of ``length`` bytes is one example (no example's answer is visible from another
example's window) and an example scored at context length L is L bytes long.

**passkey** (single needle): filler of random lowercase letters and spaces, one needle
``#key=DDDDD#`` (``digits`` random digits) at a uniformly drawn position, and at the end the query
``#key=`` followed by the answer ``DDDDD``. The filler holds no digit and no ``#``, so the
needle is the only place the answer occurs.

**mqar** (multi-query associative recall): ``n_pairs`` distinct keys (two lowercase letters)
each bound to a value (two digits), written ``ab:37,``; then ``|``; then ``n_queries`` of the keys
in a random order, each ``ab:`` followed by its value and ``,``. ``.`` runs between the pairs pad
the example to ``length``. The answers are the value bytes of the query section; each query is scored on
its own (teacher forcing: the earlier answers are given).

``Example.answer_spans``: the (start, end) byte positions of each answer in the example; the
prediction of byte p is read from the logits at position p - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)
TASKS = ("passkey", "mqar")


@dataclass(frozen=True)
class Example:
    """One example: ``tokens`` (length,) uint8; ``answer_spans`` ((start, end), ...) of its answers;
    ``needle_spans``: where each answer was stated in the context (same order)."""

    tokens: np.ndarray
    answer_spans: tuple[tuple[int, int], ...]
    needle_spans: tuple[tuple[int, int], ...]

    @property
    def text(self) -> bytes:
        return bytes(self.tokens.tolist())


# ------------------------------------------------------------------------------------------------
# passkey
# ------------------------------------------------------------------------------------------------


def passkey_min_length(digits: int = 5) -> int:
    return len(b"#key=#") + digits + len(b"#key=") + digits + 1


def passkey(rng: np.random.Generator, length: int, digits: int = 5) -> Example:
    """One passkey example of exactly ``length`` bytes (see the module docstring)."""
    if length < passkey_min_length(digits):
        raise ValueError(f"passkey with {digits} digits needs length >= {passkey_min_length(digits)}, got {length}")
    key = rng.choice(DIGITS, size=digits)
    needle = np.concatenate([np.frombuffer(b"#key=", np.uint8), key, np.frombuffer(b"#", np.uint8)])
    query = np.frombuffer(b"#key=", np.uint8)
    n_filler = length - needle.size - query.size - digits
    filler = rng.choice(LETTERS, size=n_filler)
    at = int(rng.integers(0, n_filler + 1))  # the needle's start
    tokens = np.concatenate([filler[:at], needle, filler[at:], query, key]).astype(np.uint8)
    answer = (length - digits, length)
    stated = (at + 5, at + 5 + digits)
    return Example(tokens, (answer,), (stated,))


# ------------------------------------------------------------------------------------------------
# MQAR
# ------------------------------------------------------------------------------------------------


def mqar_sizes(length: int, max_queries: int = 16) -> tuple[int, int]:
    """(n_pairs, n_queries) of an example of ``length`` bytes: 6 bytes per pair and per query plus
    the separator; as many pairs as fit (at most 26 * 26 distinct keys) with min(pairs, max_queries)
    queries."""
    n = max(min((length - 1) // 12, max_queries), (length - 1 - 6 * max_queries) // 6)
    n = min(n, 26 * 26)
    if n < 1:
        raise ValueError(f"mqar needs length >= 13, got {length}")
    return n, min(n, max_queries)


def mqar(rng: np.random.Generator, length: int, max_queries: int = 16) -> Example:
    """One MQAR example of exactly ``length`` bytes (see the module docstring). Bytes left over
    (long contexts hold more than 676 pairs' worth) are ``.`` runs spread at random between the
    pairs, so the bindings lie across the whole context."""
    n_pairs, n_queries = mqar_sizes(length, max_queries)
    letters = LETTERS[:26]
    ids = rng.choice(26 * 26, size=n_pairs, replace=False)
    keys = np.stack([letters[ids // 26], letters[ids % 26]], axis=1)  # (n, 2)
    values = rng.choice(DIGITS, size=(n_pairs, 2))  # (n, 2)
    colon, comma, bar = (np.frombuffer(c, np.uint8) for c in (b":", b",", b"|"))
    pad = length - (6 * n_pairs + 1 + 6 * n_queries)
    gaps = rng.multinomial(pad, np.full(n_pairs + 1, 1.0 / (n_pairs + 1)))
    parts, stated, pos = [], {}, 0
    for i in range(n_pairs):
        parts.append(np.full(gaps[i], ord("."), np.uint8))
        pos += int(gaps[i])
        parts.append(np.concatenate([keys[i], colon, values[i], comma]))
        stated[i] = (pos + 3, pos + 5)
        pos += 6
    parts += [np.full(gaps[n_pairs], ord("."), np.uint8), bar]
    pos += int(gaps[n_pairs]) + 1
    asked = rng.choice(n_pairs, size=n_queries, replace=False)
    answers, needles = [], []
    for i in asked:
        parts.append(np.concatenate([keys[i], colon, values[i], comma]))
        answers.append((pos + 3, pos + 5))
        needles.append(stated[int(i)])
        pos += 6
    tokens = np.concatenate(parts).astype(np.uint8)
    assert tokens.size == length == pos
    return Example(tokens, tuple(answers), tuple(needles))


# ------------------------------------------------------------------------------------------------
# Sets of examples
# ------------------------------------------------------------------------------------------------


def make(task: str, rng: np.random.Generator, length: int) -> Example:
    if task == "passkey":
        return passkey(rng, length)
    if task == "mqar":
        return mqar(rng, length)
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def examples(task: str, seed: int, length: int, n: int, purpose: str) -> list[Example]:
    """``n`` examples of ``length`` bytes from ``SeedSequence([seed, task, length, purpose])``:
    ``purpose`` "train" or "eval" draws from separate streams, so evaluation never reuses a
    training example's random stream."""
    tag = {"train": 0, "eval": 1}[purpose]
    rng = np.random.default_rng(np.random.SeedSequence([seed, TASKS.index(task), length, tag]))
    return [make(task, rng, length) for _ in range(n)]


def chance(task: str) -> float:
    """Exact-match accuracy of uniform guessing among the answer alphabet (digits)."""
    return 10.0 ** -(5 if task == "passkey" else 2)
