"""The Python API (api.py, SPEC.md#python-api) and the weights-only export (SPEC.md#weights)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import write_corpus
from tolerances import assert_close

import nlref
from nlref import api, checkpoint, data, training
from nlref.cli import cli
from nlref.reference import model as ref

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A transformer-tiny run of 2 steps at seq-len 16 (the reference backend), and its corpus."""
    base = tmp_path_factory.mktemp("api")
    corpus = write_corpus(base / "corpus")
    rc = training.resolve_config({}, dict(preset="transformer-tiny", backend="reference", data=str(corpus), steps=2,
                                          batch_size=2, seq_len=16, eval_batches=1, val_fraction=0.3))
    training.train(rc, base / "run", echo=lambda s: None)
    return base, corpus, base / "run"


def test_import_nlref_is_cheap_and_the_api_names_load_on_first_use(tmp_path):
    code = ("import json, sys\n"
            "import nlref\n"
            "heavy = lambda names: sorted({m.split('.')[0] for m in sys.modules} & set(names))\n"
            "before = heavy(('numpy', 'numba', 'cupy', 'torch'))\n"
            "M, load = nlref.Model, nlref.load\n"
            "after = heavy(('numba', 'cupy', 'torch'))\n"
            "try:\n"
            "    nlref.no_such_name\n"
            "    missing = False\n"
            "except AttributeError:\n"
            "    missing = True\n"
            "print(json.dumps([before, after, M.__module__, load.__module__, 'Model' in dir(nlref), missing]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[], [], "nlref.api", "nlref.api", True, True]


def test_from_preset_resolves_like_train_and_seeds_the_parameters():
    m = nlref.Model.from_preset("transformer-tiny", seed=3, backend="reference")
    rc = training.resolve_config({}, {"preset": "transformer-tiny"})
    assert m.config == rc.model and m.config.vocab_size == 256 and m.backend == "reference" and m.step is None
    want = ref.init_params(rc.model, seed=3)
    assert list(m.params) == list(want) and all(np.array_equal(m.params[k], want[k]) for k in want)
    assert m.n_params == sum(a.size for a in want.values()) == 5224
    other = nlref.Model.from_preset("transformer-tiny", seed=4, backend="reference")
    assert not np.array_equal(other.params["embed.E"], m.params["embed.E"])
    assert nlref.Model.from_preset("transformer-tiny", backend="reference", dtype="float32").params["head.W"].dtype == np.float32
    with pytest.raises(training.TrainingError, match="unknown preset|preset"):
        nlref.Model.from_preset("no-such-preset", backend="reference")


def test_load_a_run_and_its_loss_equals_nested_learning_eval(run):
    _, corpus, run_dir = run
    m = nlref.load(run_dir, backend="reference")
    params, rc, ck = training.load_model_checkpoint(run_dir)
    assert m.step == ck.step == 2 and m.config == rc.model and m.run_config == rc
    assert all(np.array_equal(m.params[k], params[k]) for k in params) and m.n_params == 5224
    assert "transformer-tiny" in repr(m) and "step 2" in repr(m)
    doc = corpus / "doc0.txt"
    text = doc.read_text()
    got = m.loss(text, seq_len=16, batch_size=4, max_batches=2)
    assert got == training.evaluate(params, rc.model, np.frombuffer(text.encode(), np.uint8), 4, 16, 2,
                                    backend="reference")
    result = invoke("eval", run_dir, "--data", doc, "--seq-len", 16, "--batch-size", 4, "--max-batches", 2,
                    "--backend", "reference")
    assert result.exit_code == 0, result.output
    printed = re.search(r"loss (\S+) nats/byte .* bits per byte (\S+) +\(([\d,]+) bytes\)", result.output)
    assert printed, result.output
    assert printed.group(1) == f"{got['loss']:.4f}" and printed.group(2) == f"{got['bits_per_byte']:.3f}"
    assert int(printed.group(3).replace(",", "")) == got["tokens"] == 2 * 4 * 16
    # the whole text as one sequence: the mean of the per-byte losses of one stream call
    whole = m.loss(text[:200])
    losses, _ = m.stream(text[:200], losses=True)
    assert whole["tokens"] == 199 == losses.shape[0]
    assert abs(whole["loss"] - float(losses.mean())) <= 1e-12 * whole["loss"]
    assert m.loss(text[:200].encode()) == whole  # bytes as the str's UTF-8
    with pytest.raises(ValueError, match="at least 2"):
        m.loss("x")


def test_generate_is_deterministic_for_a_seed(run):
    m = nlref.load(run[2], backend="reference")
    a = m.generate("the ", max_new=30, temperature=1.0, top_k=0, seed=3)
    assert isinstance(a, str) and a == m.generate("the ", max_new=30, temperature=1.0, top_k=0, seed=3)
    assert a != m.generate("the ", max_new=30, seed=4)
    want = training.generate(m.params, m.config, m.encode("the "), 30, 1.0, 0, 3, backend="reference")
    assert a == data.decode(want)
    greedy = m.generate("the ", max_new=10, temperature=0)
    assert greedy == m.generate("the ", max_new=10, temperature=0, seed=99)  # greedy ignores the seed
    assert m.generate("the ", max_new=0) == ""
    for bad in (dict(max_new=-1), dict(top_k=-1), dict(temperature=float("nan")), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            m.generate("the ", **bad)
    with pytest.raises(ValueError, match="empty"):
        m.generate("")


@pytest.mark.parametrize("source", ["run", "hope-tiny"])
def test_stream_in_two_pieces_equals_one_piece(run, source):
    if source == "run":
        m = nlref.load(run[2], backend="reference")  # transformer-tiny: the attention cache carried
    else:
        m = nlref.Model.from_preset("hope-tiny", seed=0, backend="cpu")  # memories and in-context CMS carried
    text = (run[1] / "doc1.txt").read_text()[:53]
    cut = 21  # inside a CMS chunk of hope-tiny (period 4 .. 16) and a memory chunk
    whole, s_whole = m.stream(text)
    first, s1 = m.stream(text[:cut])
    second, s2 = m.stream(text[cut:], s1)
    assert whole.shape == (53, 256) and first.shape == (cut, 256) and s2.position == s_whole.position == 53
    assert_close(np.concatenate([first, second]), whole, m.config.dtype, "rewrite", "logits")
    again, _ = m.stream(text[cut:], s1)  # the state passed in is not modified
    assert np.array_equal(again, second)
    l_whole, _ = m.stream(text, losses=True)
    l1, t1 = m.stream(text[:cut], losses=True)
    l2, _ = m.stream(text[cut:], t1, losses=True)
    assert l_whole.shape == (52,) and l1.shape == (cut - 1,) and l2.shape == (53 - cut,)
    assert_close(np.concatenate([l1, l2]), l_whole, m.config.dtype, "rewrite", "losses")
    assert m.stream("", s1)[1] is s1
    with pytest.raises(ValueError, match="StreamState"):
        nlref.Model.from_preset("transformer-tiny", backend="reference").stream("abc", s1)


def test_export_is_weights_only_and_reloads_to_identical_arrays(run):
    from safetensors import safe_open

    base, _, run_dir = run
    out = base / "tiny.safetensors"
    result = invoke("export", run_dir, "--weights-only", out)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "5,224 parameters" in result.output and "step 2" in result.output
    params, rc, ck = training.load_model_checkpoint(run_dir)
    with safe_open(str(out), framework="numpy") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert sorted(keys) == sorted(params) == sorted(ref.param_shapes(rc.model))  # no opt.*, no prefix
    assert meta["format"] == api.WEIGHTS_FORMAT and meta["dtype"] == "float64" and meta["spec_version"] == nlref.SPEC_VERSION
    assert json.loads(meta["config"]) == rc.model.to_dict() and json.loads(meta["n_params"]) == 5224
    assert json.loads(meta["source"]) == {"checkpoint": str(run_dir / "checkpoint.safetensors"), "step": 2}
    ck_size = (run_dir / "checkpoint.safetensors").stat().st_size
    assert 0.25 * ck_size < out.stat().st_size < 0.4 * ck_size  # AdamW keeps two moments per parameter
    m = nlref.load(out, backend="reference")
    assert m.config == rc.model and m.step == 2 and m.source["weights"] == str(out)
    assert all(m.params[k].dtype == params[k].dtype and np.array_equal(m.params[k], params[k]) for k in params)
    assert m.loss("the memory learns") == nlref.load(run_dir, backend="reference").loss("the memory learns")
    again = m.save(base / "again.safetensors")  # a weights file saved again: the same tensors and config
    w2, cfg2, meta2 = api.load_weights(again)
    assert cfg2 == rc.model and all(np.array_equal(w2[k], params[k]) for k in params)
    assert json.loads(meta2["source"]) == json.loads(meta["source"])
    assert not [p for p in base.iterdir() if p.name.endswith(".tmp")]  # written through a renamed temp file


def test_export_refuses_overwrite_and_bad_input(run, tmp_path):
    _, _, run_dir = run
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    result = invoke("export", run_dir, "--weights-only", out)
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    assert out.read_bytes() == b"keep me"
    assert invoke("export", run_dir, "--weights-only", out, "--overwrite").exit_code == 0
    assert api.read_metadata(out)["format"] == api.WEIGHTS_FORMAT
    with pytest.raises(FileExistsError, match="already exists"):
        nlref.load(out, backend="reference").save(out)
    assert invoke("export", run_dir, "--weights-only", tmp_path / "out.safetensors").exit_code == 0
    # missing, truncated, foreign and corrupt inputs: one line each, exit 1, nothing written
    ck = run_dir / "checkpoint.safetensors"
    (tmp_path / "truncated.safetensors").write_bytes(ck.read_bytes()[:3000])
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    damaged = bytearray(out.read_bytes())
    damaged[-5] ^= 0x40  # a byte of the last tensor's data
    (tmp_path / "damaged.safetensors").write_bytes(bytes(damaged))
    cases = [(tmp_path / "missing", "no such checkpoint file"), (tmp_path / "truncated.safetensors", "truncated"),
             (tmp_path / "notes.txt", "not a safetensors file"), (tmp_path / "damaged.safetensors", "checksum mismatch"),
             (tmp_path, "holds no checkpoint.safetensors")]
    for target, fragment in cases:
        result = invoke("export", target, "--weights-only", tmp_path / "never.safetensors")
        assert result.exit_code == 1 and fragment in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "never.safetensors").exists()
    result = invoke("export", ck, "--weights-only", ck, "--overwrite")
    assert result.exit_code == 1 and "is the file being exported" in result.output
    assert checkpoint.load_checkpoint(ck).step == 2  # the checkpoint is untouched
    with pytest.raises(checkpoint.CheckpointError, match="a training checkpoint, not a weights file"):
        api.load_weights(ck)
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        nlref.load(tmp_path / "damaged.safetensors", backend="reference")
    assert "Missing option '--weights-only'" in invoke("export", run_dir).output


def test_a_run_with_a_tokenizer_json_reads_and_writes_its_tokens(run, tmp_path):
    tokenization = pytest.importorskip("nlref.tokenization")
    pytest.importorskip("tokenizers")
    _, corpus, run_dir = run
    tok = tokenization.train_bpe([p.read_text() for p in sorted(corpus.glob("*.txt"))], vocab_size=300)
    # a checkpoint of a model over those tokens, the run's tokenizer.json beside it
    _, rc, _ = training.load_model_checkpoint(run_dir)
    cfg = dataclasses.replace(rc.model, vocab_size=tok.vocab_size)
    run_cfg = {**rc.to_dict(), "model": cfg.to_dict()}
    if "tokenizer" in run_cfg["train"]:
        run_cfg["train"]["tokenizer"] = "bpe"
    bpe_run = tmp_path / "bpe-run"
    checkpoint.save_checkpoint(bpe_run / "checkpoint.safetensors", params=ref.init_params(cfg, seed=1), opt_state={},
                               config=run_cfg, step=1)
    (bpe_run / "tokenizer.json").write_text(tok.json_text)
    m = nlref.load(bpe_run, backend="reference")
    assert m.tokenizer.sha256 == tok.sha256 and m.config.vocab_size == tok.vocab_size
    text = "the memory learns to compress its context"
    ids = tok.encode(text)
    assert np.array_equal(m.encode(text), ids) and len(ids) < len(text.encode()) and m.decode(ids) == text
    got = m.loss(text)
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == tok.n_bytes(ids[1:])
    assert math.isclose(got["bits_per_byte"], got["loss"] * got["tokens"] / math.log(2) / got["bytes"])
    assert isinstance(m.generate("the ", max_new=5, seed=0), str)
    w = m.save(tmp_path / "bpe.safetensors")
    assert api.read_metadata(w)["tokenizer"] == tok.json_text
    again = nlref.load(w, backend="reference")
    assert again.tokenizer.sha256 == tok.sha256 and np.array_equal(again.encode(text), ids)
    assert again.loss(text) == got


def _readme_python_api_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"^```python\n(.*?)^```$", section, re.S | re.M).group(1)


def test_readme_python_api_block_runs_as_written(run, tmp_path):
    code = _readme_python_api_block()
    assert len(code.strip().splitlines()) == 5 and 'nlref.load("runs/tiny")' in code and ".save(" in code
    shutil.copytree(run[2], tmp_path / "runs" / "tiny")  # the README's runs/tiny: a transformer-tiny run
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Model(transformer-tiny") and "'bits_per_byte'" in lines[0], out.stdout
    params, cfg, _ = api.load_weights(tmp_path / "tiny.safetensors")
    assert cfg.name == "transformer-tiny" and len(params) == 21
