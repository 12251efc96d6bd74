"""Corpus loading, the by-file split and the batch sampler (SPEC.md#data)."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nlref import data


def _write_docs(tmp_path, n=6, size=300, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "memory", "chunk", "level", "\n"]
    for i in range(n):
        text = " ".join(rng.choice(words, size=size // 6))
        (tmp_path / f"doc{i}.txt").write_text(text)
    return tmp_path


def test_default_corpus_is_the_stdlib_split_by_file():
    corpus = data.load_corpus(None)
    info = corpus.info
    assert info["kind"] == "python-stdlib"
    train, val = set(info["train"]["files"]), set(info["validation"]["files"])
    assert train and val and not train & val
    assert "os.py" in train | val and not any(f.startswith("test/") for f in train | val)
    assert info["train"]["n_bytes"] + info["validation"]["n_bytes"] == info["n_bytes"]
    # The split is a function of the relative paths alone (stable across machines).
    t2, v2 = data.split_files(sorted(train | val), info["val_fraction"])
    assert set(t2) == train and set(v2) == val
    # Every document is exactly its file's bytes.
    root = data.stdlib_root()
    d = corpus.val.names.index(sorted(val)[0])
    assert corpus.val.doc(d).tobytes() == (root / corpus.val.names[d]).read_bytes()
    json.dumps(info)  # the recorded split is JSON


@given(st.lists(st.text("abcdef/", min_size=1, max_size=8), min_size=2, max_size=30, unique=True),
       st.floats(0.01, 0.99))
def test_split_files_is_a_partition_with_both_sides_non_empty(rels, frac):
    train, val = data.split_files(rels, frac)
    assert sorted(train + val) == sorted(rels)
    # validation: the fewest files that reach the fraction, at least one and leaving one for train,
    # taken from the front of the path-hash order
    n = len(rels)
    assert len(val) == next((k for k in range(1, n) if k >= frac * n), n - 1)
    assert set(val) == set(sorted(rels, key=data.path_hash)[:len(val)])
    assert len(train) == len(rels) - len(val) >= 1
    # The split does not depend on the order the files were listed in.
    t2, v2 = data.split_files(list(reversed(rels)), frac)
    assert set(t2) == set(train) and set(v2) == set(val)
    # Adding a file keeps the old files' hash order and never shrinks the validation count, so the
    # old files in validation are a prefix of that order: one set holds the other, and unless the
    # new file took a validation place, no old file leaves validation.
    t3, v3 = data.split_files(rels + ["zz-new-file"], frac)
    old_val = set(v3) - {"zz-new-file"}
    assert old_val <= set(val) or set(val) <= old_val
    if "zz-new-file" not in v3:
        assert set(val) <= old_val


def test_directory_glob_and_single_file(tmp_path):
    _write_docs(tmp_path)
    by_dir = data.load_corpus(str(tmp_path), val_fraction=0.3)
    by_glob = data.load_corpus(str(tmp_path / "doc*.txt"), val_fraction=0.3)
    assert by_dir.info["kind"] == "directory" and by_glob.info["kind"] == "glob"
    assert by_dir.info["validation"]["files"] == by_glob.info["validation"]["files"]
    assert by_dir.info["sha256"] == by_glob.info["sha256"]
    assert len(by_dir.info["validation"]["files"]) == 2
    one = data.load_corpus(str(tmp_path / "doc0.txt"), val_fraction=0.1)
    content = (tmp_path / "doc0.txt").read_bytes()
    assert one.train.stream.tobytes() + one.val.stream.tobytes() == content
    assert one.val.n_bytes == round(0.1 * len(content))


def test_directory_skips_binary_and_hidden_files(tmp_path):
    _write_docs(tmp_path, n=3)
    (tmp_path / "image.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden text")
    corpus = data.load_corpus(str(tmp_path), val_fraction=0.3)
    assert corpus.info["skipped_binary"] == ["image.bin"]
    assert corpus.info["n_files"] == 3


def _make(kind, p):
    if kind == "missing":
        return str(p / "missing.txt")
    if kind == "empty":
        (p / "empty.txt").write_text("")
        return str(p / "empty.txt")
    if kind == "binary":
        (p / "b.dat").write_bytes(b"\x00\x01\x02" * 100)
        return str(p / "b.dat")
    if kind == "empty-dir":
        (p / "d").mkdir()
        return str(p / "d")
    if kind == "glob":
        return str(p / "*.nothing")
    (p / "e").mkdir()  # a directory of binary files only
    (p / "e" / "a.bin").write_bytes(b"\x00" * 9)
    return str(p / "e")


@pytest.mark.parametrize(
    "kind, message",
    [("missing", "no such file or directory"), ("empty", "empty"), ("binary", "binary"),
     ("empty-dir", "no files"), ("glob", "matches no files"), ("binary-dir", "binary")],
)
def test_bad_data_paths_give_clear_errors(tmp_path, kind, message):
    with pytest.raises(data.DataError, match=message):
        data.load_corpus(_make(kind, tmp_path))


@pytest.mark.parametrize("content, binary", [
    (b"plain text\n", False), (b"caf\xc3\xa9 \xff\xfe latin", False), (b"a\x00b", True),
    (bytes(range(1, 32)) * 10, True), (b"", False)])
def test_is_binary(content, binary):
    assert data.is_binary(content) is binary


@given(st.integers(1, 5), st.integers(1, 9), st.integers(10, 200), st.integers(0, 3))
def test_sampler_covers_each_window_once_per_epoch(B, T, N, seed):
    if N < T + 1:
        with pytest.raises(data.DataError, match="seq_len"):
            data.BatchSampler(np.zeros(N, np.uint8), B, T, seed)
        return
    stream = (np.arange(N) % 251).astype(np.uint8)
    sampler = data.BatchSampler(stream, B, T, seed)
    n_windows = len(sampler.order)
    phase0 = sampler.phase
    assert n_windows == (N - sampler.phase) // (T + 1)
    starts = []
    for _ in range(-(-n_windows // B)):  # enough batches to cover epoch 0
        state = sampler.state()
        batch = sampler.next_batch()
        assert batch.shape == (B, T + 1) and batch.dtype == np.int64
        for row in batch:  # every row is a window of the stream on the epoch's grid
            start = int(np.flatnonzero(stream == row[0])[0])
            assert np.array_equal(row, stream[start : start + T + 1])
            starts.append(start)
        # Restoring a saved position reproduces the same next batch exactly.
        again = data.BatchSampler(stream, B, T, seed=99, state=json.loads(json.dumps(state)))
        assert np.array_equal(again.next_batch(), batch)
    first_epoch = starts[:n_windows]
    assert len(set(first_epoch)) == n_windows  # without replacement
    assert all((s - phase0) % (T + 1) == 0 for s in first_epoch)


def test_sampler_resume_mid_run_matches_uninterrupted():
    stream = np.frombuffer(b"".join(bytes([i % 256]) * 3 for i in range(400)), np.uint8)
    a = data.BatchSampler(stream, 3, 7, seed=5)
    batches = [a.next_batch() for _ in range(60)]  # several epochs
    b = data.BatchSampler(stream, 3, 7, seed=5)
    for _ in range(37):
        b.next_batch()
    c = data.BatchSampler(stream, 3, 7, seed=0, state=json.loads(json.dumps(b.state())))
    assert all(np.array_equal(c.next_batch(), batches[i]) for i in range(37, 60))
    d = data.BatchSampler(stream, 3, 7, seed=6)
    assert not np.array_equal(d.next_batch(), batches[0])


def test_eval_batches_are_consecutive_windows():
    stream = np.arange(50, dtype=np.uint8)
    batches = data.eval_batches(stream, 2, 4, max_batches=None)
    flat = np.concatenate(batches)
    assert flat.shape == (10, 5) and np.array_equal(flat.ravel(), np.arange(50))
    assert len(data.eval_batches(stream, 2, 4, max_batches=2)) == 2
    with pytest.raises(data.DataError, match="validation"):
        data.eval_batches(stream[:3], 2, 4, None)


def test_encode_decode_roundtrip():
    text = "héllo\nwörld ✓"
    tokens = data.encode(text)
    assert tokens.dtype == np.int64 and tokens.max() < data.VOCAB_SIZE
    assert data.decode(tokens) == text
