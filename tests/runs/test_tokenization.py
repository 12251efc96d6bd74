"""Tokenizers of the training runs (SPEC.md#data): bytes, a BPE trained on the training split, a
tokenizer.json the user brings; bits per byte per byte of text; any vocabulary size per family."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import WORDS, write_corpus

from nlref import backends, config, data, tokenization, training
from nlref.cli import cli
from nlref.reference import model

TINY = ["--preset", "transformer-tiny", "--backend", "reference", "--seq-len", "16", "--batch-size", "4",
        "--lr", "0.01"]
SECRET = "zqxjkvzqxjkv"  # letters in no training word: only the validation files hold it


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(result, *fragments):
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def corpus_with_secret(path, val_fraction=0.3):
    """write_corpus's files, with SECRET repeated in each validation file (and in no training file)."""
    write_corpus(path)
    names = sorted(p.name for p in path.iterdir())
    _, val = data.split_files(names, val_fraction)
    for name in val:
        (path / name).write_text((path / name).read_text() + (" " + SECRET) * 200)
    return path, val


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A 4-step BPE run (checkpoint at 2), shared by the tests that read it."""
    base = tmp_path_factory.mktemp("bpe")
    corpus, val = corpus_with_secret(base / "corpus")
    result = invoke("train", *TINY, "--data", corpus, "--tokenizer", "bpe", "--vocab-size", 300, "--steps", 4,
                    "--checkpoint-every", 2, "--out", base / "run", "--config", _cfg(base))
    assert result.exit_code == 0, result.output
    return base, corpus, val, base / "run", result.output


def _cfg(base):
    cfg = base / "run.toml"
    cfg.write_text("val_fraction = 0.3\n")
    return cfg


def test_bpe_is_trained_on_the_training_files_only(bpe_run):
    base, corpus, val, run, output = bpe_run
    assert "tokenizer: a byte-level BPE of 300 tokens trained on the training split" in output
    tok = tokenization.load_file(run / "tokenizer.json")
    assert tok.vocab_size == 300
    # every learned merge (a token of 2+ bytes) occurs in a training file; the validation-only
    # word is read byte by byte
    train_text = b"".join((corpus / n).read_bytes() for n in sorted(p.name for p in corpus.iterdir()) if n not in val)
    merges = [b for b in tok.token_bytes if len(b) > 1]
    assert merges and all(m in train_text for m in merges)
    assert not any(m in SECRET.encode() for m in merges)
    assert len(tok.encode(SECRET)) == len(SECRET)
    # the check has teeth: the same BPE trained on every file (validation included) learns the word
    every = data.read_corpus(str(corpus), 0.3)
    leaky = tokenization.train_bpe((c.decode() for c in every.train.contents + every.val.contents), 300)
    assert len(leaky.encode(SECRET)) < len(SECRET) // 2
    # the run records the tokenizer: config (choice, size), data.json (its sha256), the checkpoint
    rc = training.run_config_from_dict(json.loads((run / "config.json").read_text()))
    assert (rc.train.tokenizer, rc.train.tokenizer_vocab_size, rc.model.vocab_size) == ("bpe", 300, 300)
    info = json.loads((run / "data.json").read_text())
    assert info["tokenizer"]["sha256"] == tok.sha256 and info["validation"]["files"] == val
    params, rc2, ck = training.load_model_checkpoint(run)
    assert ck.extra["tokenizer_sha256"] == tok.sha256 and params["embed.E"].shape[0] == 300


def test_tokenizer_json_is_written_atomically_and_is_a_run_file(bpe_run, tmp_path):
    _, corpus, _, run, _ = bpe_run
    assert "tokenizer.json" in training.rundir.RUN_FILES  # --overwrite removes it, MPI ranks receive it
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "train.lock").unlink(missing_ok=True)
    result = invoke("train", *TINY, "--data", corpus, "--steps", 2, "--out", copy, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (copy / "tokenizer.json").exists()  # the byte run that replaced it has none
    assert not list(copy.glob(".tokenizer.json.*.tmp"))


def test_resume_eval_and_generate_use_the_runs_tokenizer(bpe_run, tmp_path, monkeypatch):
    base, corpus, _, run, _ = bpe_run
    # killed after its checkpoint at step 2, then resumed: the uninterrupted run, bit for bit
    half = tmp_path / "half"
    rc = training.resolve_config(training.read_toml(run / "config.toml"))
    real, calls = model.loss_and_grads, []

    def crash(params, tokens, cfg):
        calls.append(tokens)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(params, tokens, cfg)

    monkeypatch.setattr(model, "loss_and_grads", crash)
    with pytest.raises(KeyboardInterrupt):
        training.train(rc, half, echo=lambda s: None)
    monkeypatch.setattr(model, "loss_and_grads", real)
    assert calls[0].max() >= 256  # BPE ids, not bytes
    assert (half / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()  # deterministic
    result = invoke("train", "--resume", half)
    assert result.exit_code == 0, result.output

    def losses(d):
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in training.read_metrics(d)]
    assert losses(half) == losses(run)
    # eval reloads tokenizer.json and gives the training run's final validation exactly
    summary = json.loads((run / "summary.json").read_text())
    ev = invoke("eval", run, "--backend", "reference")
    assert ev.exit_code == 0, ev.output
    assert f"loss {summary['validation']['loss']:.4f} nats/token" in ev.output
    assert f"bits per byte {summary['validation']['bits_per_byte']:.3f}" in ev.output
    assert f"({summary['validation']['tokens']:,} tokens, {summary['validation']['bytes']:,} bytes)" in ev.output
    # the same tokens: the reloaded tokenizer encodes the validation split as the run did
    tok = tokenization.load_file(run / "tokenizer.json")
    docs = data.read_corpus(str(corpus), 0.3)
    split = data.encode_split(docs.val, tok)
    params, rc, _ = training.load_model_checkpoint(run)
    again = training.evaluate(params, rc.model, split.stream, 4, 16, 4, tokenizer=tok)
    assert again["loss"] == summary["validation"]["loss"]
    # generate: the prompt encoded and the sample decoded with the run's tokenizer
    out = invoke("generate", run, "--prompt", "the memory", "--max-bytes", 12, "--temperature", 0,
                 "--backend", "reference")
    assert out.exit_code == 0, out.output
    ids = training.generate(params, rc.model, tok.encode("the memory"), 12, temperature=0)
    text = b""
    for i in ids:
        text += tok.token_bytes[i]
        if len(text) >= 12:
            break
    assert out.output.rstrip("\n") == "the memory" + text.decode("utf-8", errors="replace")
    # without its tokenizer.json the run says which file is missing and what to do
    (half / "tokenizer.json").unlink()
    assert_clean_error(invoke("eval", half, "--backend", "reference"), f"{half / 'tokenizer.json'}: missing")
    assert_clean_error(invoke("generate", half, "--backend", "reference"), "tokenizer.json: missing")
    assert_clean_error(invoke("train", "--resume", half, "--steps", 6), "tokenizer.json: missing", "--overwrite")
    # another tokenizer.json in its place is refused (its sha256 differs from the recorded one)
    leaky = tokenization.train_bpe(iter(["something else entirely " * 50]), 300)
    (half / "tokenizer.json").write_text(leaky.json_text)
    assert_clean_error(invoke("eval", half, "--backend", "reference"), "not the tokenizer")
    assert_clean_error(invoke("train", "--resume", half, "--steps", 6), "changed since the run started")


def test_a_user_tokenizer_json_is_copied_into_the_run(bpe_run, tmp_path):
    _, corpus, _, run, _ = bpe_run
    mine = tmp_path / "mine" / "tokenizer.json"
    mine.parent.mkdir()
    shutil.copy(run / "tokenizer.json", mine)
    out = tmp_path / "run"
    result = invoke("train", *TINY, "--data", corpus, "--tokenizer", mine, "--steps", 2, "--checkpoint-every", 1,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").read_bytes() == mine.read_bytes()
    rc = training.run_config_from_dict(json.loads((out / "config.json").read_text()))
    assert rc.train.tokenizer == str(mine) and rc.model.vocab_size == 300
    mine.unlink()  # resume, eval and generate read the run's own copy
    assert invoke("train", "--resume", out, "--steps", 3).exit_code == 0
    assert invoke("eval", out, "--backend", "reference").exit_code == 0
    assert invoke("generate", out, "--max-bytes", 4, "--backend", "reference").exit_code == 0


def _word_level_json():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def test_a_tokenizer_that_cannot_be_used_names_the_file(bpe_run, tmp_path):
    _, corpus, _, run, _ = bpe_run
    cases = {"garbage.json": "{not json", "list.json": "[1, 2]", "words.json": _word_level_json()}
    spec = json.loads((run / "tokenizer.json").read_text())
    spec["model"]["dropout"] = 0.1
    cases["dropout.json"] = json.dumps(spec)
    expect = {"garbage.json": "not a tokenizer file", "list.json": "not a tokenizer file",
              "words.json": "not a byte-level tokenizer", "dropout.json": "dropout"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        result = invoke("train", *TINY, "--data", corpus, "--tokenizer", tmp_path / name, "--steps", 2,
                        "--out", tmp_path / f"run-{name}")
        assert_clean_error(result, str(tmp_path / name), expect[name])
        assert not (tmp_path / f"run-{name}").exists()  # refused before anything is written
    assert_clean_error(invoke("train", *TINY, "--data", corpus, "--tokenizer", tmp_path / "none.json"),
                       str(tmp_path / "none.json"), "no such tokenizer file")
    assert_clean_error(invoke("train", *TINY, "--data", corpus, "--vocab-size", 300), "--tokenizer bpe")
    assert_clean_error(invoke("train", *TINY, "--data", corpus, "--tokenizer", "bpe", "--vocab-size", 100),
                       ">= 256")


def gpt2_sized_tokenizer(base_json: str, size: int = 50257) -> str:
    """A byte-level BPE of ``size`` tokens (GPT-2's count, its last one the added <|endoftext|>):
    ``base_json``'s vocabulary and merges, then merges of two alphabet characters up to the size."""
    spec = json.loads(base_json)
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    alphabet = sorted(tokenization.bytes_to_unicode().values())
    pairs = ((a, b) for a in alphabet for b in alphabet if a + b not in vocab)
    while len(vocab) < size - 1:
        a, b = next(pairs)
        vocab[a + b] = len(vocab)
        merges.append([a, b] if merges and isinstance(merges[0], list) else f"{a} {b}")
    spec["added_tokens"] = [{"id": size - 1, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}]
    vocab["<|endoftext|>"] = size - 1
    return json.dumps(spec)


def test_model_vocab_size_must_match_the_tokenizer(bpe_run, tmp_path):
    _, corpus, _, run, _ = bpe_run
    big = tmp_path / "gpt2-sized.json"
    big.write_text(gpt2_sized_tokenizer((run / "tokenizer.json").read_text()))
    assert tokenization.load_file(big).vocab_size == 50257
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nvocab_size = 50257\n")
    out = tmp_path / "run"
    result = invoke("train", *TINY, "--data", corpus, "--tokenizer", big, "--config", cfg, "--steps", 2,
                    "--seq-len", 8, "--out", out)
    assert result.exit_code == 0, result.output
    params, rc, _ = training.load_model_checkpoint(out)
    assert rc.model.vocab_size == 50257 and params["embed.E"].shape[0] == 50257
    # the text "<|endoftext|>" is the added token, which stands for its 13 bytes
    tok = tokenization.load_file(big)
    ids = tok.encode("a<|endoftext|>b")
    assert 50256 in ids.tolist() and tok.decode_bytes(ids) == b"a<|endoftext|>b" and tok.n_bytes(ids) == 15
    # a [model] vocab_size that is not the tokenizer's size is refused, naming both
    cfg.write_text("[model]\nvocab_size = 50000\n")
    assert_clean_error(invoke("train", *TINY, "--data", corpus, "--tokenizer", big, "--config", cfg, "--out",
                              tmp_path / "r2"), "vocab_size = 50,000", "50,257", "remove vocab_size")
    cfg.write_text("[model]\nvocab_size = 50257\n")  # bytes are 256 tokens
    assert_clean_error(invoke("train", *TINY, "--data", corpus, "--config", cfg, "--out", tmp_path / "r3"),
                       "vocab_size must be 256", "--tokenizer bpe")
    # a BPE asked for by [model] vocab_size that the data cannot fill is refused, not shrunk
    assert_clean_error(invoke("train", *TINY, "--data", corpus, "--config", cfg, "--tokenizer", "bpe",
                              "--out", tmp_path / "r4"), "vocab_size = 50,257", "does not match")
    assert_clean_error(invoke("train", *TINY, "--data", corpus, "--config", cfg, "--tokenizer", "bpe",
                              "--vocab-size", 4096, "--out", tmp_path / "r5"), "does not match")
    assert not any((tmp_path / r).exists() for r in ("r2", "r3", "r4", "r5"))


def test_a_bpe_smaller_than_asked_sets_the_vocab_size(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=3, n_words=60)
    out = tmp_path / "run"
    result = invoke("train", *TINY, "--data", corpus, "--tokenizer", "bpe", "--steps", 2, "--out", out,
                    "--seq-len", 8)
    assert result.exit_code == 0, result.output
    rc = training.run_config_from_dict(json.loads((out / "config.json").read_text()))
    n = tokenization.load_file(out / "tokenizer.json").vocab_size
    assert 256 < n < tokenization.DEFAULT_BPE_VOCAB, n
    assert rc.model.vocab_size == rc.train.tokenizer_vocab_size == n and "fewer than the 4,096 asked" in result.output
    assert invoke("train", "--resume", out, "--steps", 3).exit_code == 0  # config.toml is consistent


def test_bits_per_byte_for_bytes_is_loss_over_ln2(tmp_path):
    rc = training.resolve_config({}, {"preset": "transformer-tiny", "backend": "reference"})
    params = training._model().init_params(rc.model, seed=0)
    stream = data.load_corpus(str(write_corpus(tmp_path / "c")), 0.3).val.stream
    ev = training.evaluate(params, rc.model, stream, 4, 16, 2)
    assert ev["bits_per_byte"] == ev["loss"] / math.log(2.0) and ev["bytes"] == ev["tokens"] == 2 * 4 * 16
    same = training.evaluate(params, rc.model, stream, 4, 16, 2, tokenizer=tokenization.ByteTokenizer())
    assert same == ev  # the byte tokenizer is the default's definition exactly


def test_bits_per_byte_for_bpe_counts_the_decoded_bytes(tmp_path):
    from tokenizers import Tokenizer

    corpus = write_corpus(tmp_path / "c")
    docs = data.read_corpus(str(corpus), 0.3)
    tok = tokenization.train_bpe(docs.train.texts(), 300)
    (tmp_path / "tokenizer.json").write_text(tok.json_text)
    val = data.encode_split(docs.val, tok)
    rc = training.resolve_config({}, {"preset": "transformer-tiny", "backend": "reference", "tokenizer": "bpe",
                                      "tokenizer_vocab_size": 300})
    params = training._model().init_params(rc.model, seed=1)
    ev = training.evaluate(params, rc.model, val.stream, 4, 16, 3, tokenizer=tok)
    # independent count: the library's own decoding of each window's target tokens (ASCII text, so
    # every window decodes to whole characters)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    windows = np.concatenate(data.eval_batches(val.stream, 4, 16, 3))
    n_bytes = sum(len(hf.decode(w[1:].tolist()).encode("utf-8")) for w in windows)
    assert ev["bytes"] == n_bytes > ev["tokens"] == windows.shape[0] * 16
    assert ev["bits_per_byte"] == pytest.approx(ev["loss"] * ev["tokens"] / math.log(2.0) / n_bytes, rel=1e-15)
    # the split records the text bytes its tokens decode to: the whole split's bytes
    assert val.n_bytes == docs.val.n_bytes and val.n_tokens < val.n_bytes
    # multi-byte text: token bytes, not characters (a token may hold part of a character)
    text = "naïve café ✓ 日本語 " * 3
    ids = tok.encode(text)
    assert tok.decode_bytes(ids) == text.encode() and tok.n_bytes(ids) == len(text.encode())
    assert tok.n_bytes(ids[:1]) + tok.n_bytes(ids[1:]) == len(text.encode())


def test_bpe_training_is_deterministic_and_invalid_utf8_is_replaced(tmp_path):
    texts = [" ".join(WORDS) * 5, "café " * 40]
    a, b = tokenization.train_bpe(iter(texts), 280), tokenization.train_bpe(iter(texts), 280)
    assert a.json_text == b.json_text and a.sha256 == b.sha256
    docs, n = a.encode_docs([b"caf\xe9 latin-1", "café".encode()], ["a", "b"])
    assert a.decode_bytes(docs[0]) == "caf\ufffd latin-1".encode() and n == len("caf\ufffd latin-1".encode()) + 5


@pytest.mark.parametrize("family", config.FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_every_family_takes_a_vocabulary_of_300(family, backend):
    be = backends.get(backend)
    try:
        be.check(family)
    except backends.BackendError as exc:
        pytest.skip(str(exc))
    mc = dataclasses.replace(config.preset(f"{family}-tiny"), vocab_size=300)
    params = be.model.init_params(mc, seed=0)
    tokens = np.random.default_rng(0).integers(0, 300, size=(2, 9))
    tokens[0, :3] = [299, 256, 0]  # ids past the bytes
    logits, _ = be.model.forward(params, tokens, mc)
    assert logits.shape == (2, 9, 300) and np.isfinite(logits).all()
    loss, grads = be.model.loss_and_grads(params, tokens, mc)
    assert math.isfinite(float(loss))
    assert grads["embed.E"].shape == grads["head.W"].shape == (300, mc.d_model)


def _mpi_missing():
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec("mpi4py") is None:
        return None, "mpi4py is not installed (pip install -e '.[mpi]')"
    here = Path(sys.executable).parent / "mpiexec"
    exe = str(here) if here.exists() else shutil.which("mpiexec")
    return exe, None if exe else "no mpiexec (pip install -e '.[mpi]' brings MPICH's)"


def test_a_bpe_run_on_two_mpi_ranks_equals_one_process(bpe_run, tmp_path):
    """Each rank trains the BPE itself (deterministic), so the ranks draw the same token batches
    (the fused all-reduce's batch check) and the run equals the one-process run (SPEC.md#distributed)."""
    import os
    import subprocess
    import sys

    exe, missing = _mpi_missing()
    if missing:
        pytest.skip(missing)
    base, corpus, _, run, _ = bpe_run
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_", "PMIX_"))}
    env.update({"NL_CPU_WORKERS": "thread", "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"})
    out = tmp_path / "mpi"
    args = [exe, "-n", "2", sys.executable, "-m", "nlref", "train", *TINY, "--data", str(corpus), "--tokenizer", "bpe",
            "--vocab-size", "300", "--steps", "4", "--checkpoint-every", "2", "--config", str(_cfg(base)),
            "--out", str(out)]
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "distributed: 2 MPI ranks" in res.stdout, res.stdout
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    one = [r for r in training.read_metrics(run) if "loss" in r]
    two = [r for r in training.read_metrics(out) if "loss" in r]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-12 for a, b in zip(one, two, strict=True))
