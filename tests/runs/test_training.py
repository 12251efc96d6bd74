"""The training loop, schedule, config resolution, evaluation and sampling (SPEC.md#training)."""

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nlref import checkpoint, data, training
from nlref.fast.gpu import namespace
from nlref.reference import model

WORDS = "the memory learns to compress its context into weights while the optimizer learns gradients".split()


def write_corpus(path, n_docs=6, n_words=300, seed=0):
    """A small text corpus with learnable structure (a few repeated words)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (path / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=n_words)))
    return path


def tiny_run(corpus, **kw):
    # The loop's logic is tested on the reference (some tests patch reference.model); the CPU
    # port's agreement with it is test_cpu_backend_trains_like_the_reference.
    flags = dict(preset="transformer-tiny", backend="reference", data=str(corpus), steps=30, batch_size=4, seq_len=24, lr=1e-2,
                 eval_batches=2, checkpoint_every=10, log_every=10, val_fraction=0.3)
    flags.update(kw)
    return training.resolve_config({}, flags)


def losses(run_dir):
    return [r["loss"] for r in training.read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


# ------------------------------------------------------------------------------------------------
# Schedule and config
# ------------------------------------------------------------------------------------------------


@given(st.integers(1, 300), st.integers(0, 50), st.floats(1e-5, 1.0), st.floats(0.0, 1.0))
def test_lr_schedule_warmup_then_cosine(steps, warmup, lr, ratio):
    tc = training.TrainConfig(steps=steps, warmup_steps=min(warmup, steps), lr=lr, min_lr_ratio=ratio)
    lrs = [training.lr_at(s, tc) for s in range(steps)]
    w = tc.warmup
    assert all(0 < x <= lr * (1 + 1e-12) for x in lrs[:w])
    assert all(ratio * lr * (1 - 1e-12) <= x <= lr * (1 + 1e-12) for x in lrs[w:])
    assert all(b >= a for a, b in zip(lrs[:w], lrs[1:w], strict=False))  # warmup rises
    if w:
        assert math.isclose(lrs[w - 1], lr)
    tail = lrs[w:]
    assert all(b <= a + 1e-15 for a, b in zip(tail, tail[1:], strict=False))  # then decays
    if len(tail) >= 2:
        assert math.isclose(tail[0], lr) and math.isclose(tail[-1], ratio * lr, rel_tol=1e-9, abs_tol=1e-15)


def test_flags_override_file_and_unknown_keys_are_listed(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "transformer-tiny"\nsteps = 7\nlr = 0.5\n[model]\nd_model = 12\nn_heads = 3\n'
                 "[optimizer_hparams]\nweight_decay = 0.0\n")
    rc = training.resolve_config(training.read_toml(f), {"steps": 9, "seed": None})
    assert rc.train.steps == 9 and rc.train.lr == 0.5 and rc.model.d_model == 12
    assert rc.model.vocab_size == data.VOCAB_SIZE  # byte tokens, even for the tiny preset
    assert rc.optimizer_hparams == {"weight_decay": 0.0}
    f.write_text("stepz = 3\n")
    with pytest.raises(training.TrainingError, match=r"unknown keys \['stepz'\].*steps"):
        training.read_toml(f)
    f.write_text('preset = "transformer-tiny"\n[model]\nwidth = 3\n')
    with pytest.raises(training.TrainingError, match="width.*d_model"):
        training.resolve_config(training.read_toml(f))
    f.write_text("steps = [\n")
    with pytest.raises(training.TrainingError, match="not valid TOML"):
        training.read_toml(f)
    for bad in ({"steps": 0}, {"optimizer": "rmsprop"}, {"preset": "nope"}, {"lr": -1.0}):
        with pytest.raises(training.TrainingError):
            training.resolve_config({}, bad)


@given(st.sampled_from(["transformer-tiny", "hope-attention-tiny", "titans-tiny", "hope-small"]),
       st.integers(1, 500), st.floats(1e-4, 1.0), st.sampled_from(["float32", "float64", None]),
       st.sampled_from([None, "some dir/with \"quotes\""]))
def test_resolved_config_toml_round_trip(tmp_path_factory, preset, steps, lr, dtype, data_path):
    rc = training.resolve_config({}, dict(preset=preset, steps=steps, lr=lr, dtype=dtype, data=data_path))
    path = tmp_path_factory.mktemp("toml") / "config.toml"
    path.write_text(training.to_toml(rc))
    again = training.resolve_config(training.read_toml(path))
    assert again == rc
    assert training.run_config_from_dict(json.loads(json.dumps(rc.to_dict()))) == rc


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def test_loss_decreases_and_same_seed_same_losses(tmp_path, corpus):
    a = losses(training.train(tiny_run(corpus), tmp_path / "a", echo=lambda s: None)["run_dir"])
    b = losses(training.train(tiny_run(corpus), tmp_path / "b", echo=lambda s: None)["run_dir"])
    c = losses(training.train(tiny_run(corpus, seed=1), tmp_path / "c", echo=lambda s: None)["run_dir"])
    assert len(a) == 30 and a == b  # bit-identical
    assert a != c
    assert np.mean(a[-5:]) < np.mean(a[:5]) - 0.5, a
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["validation"]["loss"] < a[0]
    assert math.isclose(summary["validation"]["bits_per_byte"], summary["validation"]["loss"] / math.log(2))
    info = json.loads((tmp_path / "a" / "data.json").read_text())
    assert info["validation"]["files"] and not set(info["validation"]["files"]) & set(info["train"]["files"])


def test_loss_decreases_on_the_default_corpus(tmp_path):
    rc = training.resolve_config({}, dict(preset="transformer-tiny", steps=40, batch_size=8, seq_len=32, lr=2e-2,
                                          eval_batches=1, checkpoint_every=0))
    got = losses(training.train(rc, tmp_path / "run", echo=lambda s: None)["run_dir"])
    assert np.mean(got[-8:]) < np.mean(got[:8]) - 0.5, got


def test_evaluate_matches_the_training_loss(corpus):
    rc = tiny_run(corpus)
    params = model.init_params(rc.model, seed=3)
    split = data.load_corpus(str(corpus), 0.3).val
    tokens = data.eval_batches(split.stream, 2, 16, 1)[0]
    ev = training.evaluate(params, rc.model, split.stream, 2, 16, 1)
    loss, _ = model.loss_and_grads(params, tokens, rc.model)
    assert math.isclose(ev["loss"], loss, rel_tol=1e-12)
    assert ev["tokens"] == tokens[:, 1:].size


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, corpus, monkeypatch):
    real = model.loss_and_grads
    calls = {"n": 0}

    def poisoned(params, tokens, cfg):
        calls["n"] += 1
        loss, grads = real(params, tokens, cfg)
        return (float("nan") if calls["n"] == 14 else loss), grads

    monkeypatch.setattr(model, "loss_and_grads", poisoned)
    run = tmp_path / "run"
    with pytest.raises(training.NonFiniteLoss, match=r"step 14: the loss is not finite.*step 10\) is kept") as info:
        training.train(tiny_run(corpus), run, echo=lambda s: None)
    assert info.value.step == 14
    ck = checkpoint.load_checkpoint(run / training.CHECKPOINT_NAME)
    assert ck.step == 10 and all(np.isfinite(v).all() for v in ck.params.values())
    assert [r["step"] for r in training.read_metrics(run) if "loss" in r] == list(range(1, 14))

    def inf_grads(params, tokens, cfg):
        loss, grads = real(params, tokens, cfg)
        grads = dict(grads)
        grads["head.W"] = grads["head.W"] * np.inf
        return loss, grads

    monkeypatch.setattr(model, "loss_and_grads", inf_grads)
    with pytest.raises(training.NonFiniteLoss, match="step 1: the gradient.*no checkpoint"):
        training.train(tiny_run(corpus), tmp_path / "run2", echo=lambda s: None)


def test_resume_after_interruption_reproduces_the_trajectory(tmp_path, corpus, monkeypatch):
    rc = tiny_run(corpus, steps=25, checkpoint_every=10, eval_every=5)
    whole = training.read_metrics(training.train(rc, tmp_path / "whole", echo=lambda s: None)["run_dir"])
    real = model.loss_and_grads
    calls = {"n": 0}

    def crash(params, tokens, cfg):
        calls["n"] += 1
        if calls["n"] == 17:
            raise KeyboardInterrupt("simulated kill")
        return real(params, tokens, cfg)

    monkeypatch.setattr(model, "loss_and_grads", crash)
    with pytest.raises(KeyboardInterrupt):
        training.train(rc, tmp_path / "cut", echo=lambda s: None)
    monkeypatch.setattr(model, "loss_and_grads", real)
    assert len([r for r in training.read_metrics(tmp_path / "cut") if "loss" in r]) == 16
    training.train(rc, tmp_path / "cut", resume=True, echo=lambda s: None)
    resumed = training.read_metrics(tmp_path / "cut")
    key = ("step", "loss", "lr", "grad_norm", "val_loss")
    assert [{k: r.get(k) for k in key} for r in resumed] == [{k: r.get(k) for k in key} for r in whole]


def test_run_errors(tmp_path, corpus):
    if not namespace.cupy_available()[0]:  # no GPU here: a clear error before anything is written
        with pytest.raises(training.TrainingError, match="needs CuPy and a CUDA device"):
            training.train(tiny_run(corpus, backend="gpu"), tmp_path / "x")
        assert not (tmp_path / "x").exists()
    training.train(tiny_run(corpus, steps=2), tmp_path / "run", echo=lambda s: None)
    with pytest.raises(training.TrainingError, match="already holds a run.*--resume"):
        training.train(tiny_run(corpus, steps=2), tmp_path / "run", echo=lambda s: None)
    rc = training.RunConfig(tiny_run(corpus, steps=4).train, training.resolve_config(
        {"model": {"d_model": 12}}, {"preset": "transformer-tiny"}).model, {})
    with pytest.raises(checkpoint.CheckpointError, match="another model"):
        training.train(rc, tmp_path / "run", resume=True, echo=lambda s: None)
    (corpus / "doc0.txt").write_text((corpus / "doc0.txt").read_text() + " more")
    try:
        with pytest.raises(training.TrainingError, match="data changed"):
            training.train(tiny_run(corpus, steps=4), tmp_path / "run", resume=True, echo=lambda s: None)
    finally:
        (corpus / "doc0.txt").write_text((corpus / "doc0.txt").read_text()[: -len(" more")])
    with pytest.raises(data.DataError, match="fewer than seq_len"):
        training.train(tiny_run(corpus, seq_len=100000), tmp_path / "big", echo=lambda s: None)


# ------------------------------------------------------------------------------------------------
# Continual evaluation and sampling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["transformer-tiny", "hope-attention-tiny"])
def test_continual_never_resets_state(preset):
    rc = training.resolve_config({}, {"preset": preset})
    params = model.init_params(rc.model, seed=0)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=n).astype(np.uint8) for n in (9, 7, 6)]
    split = data._make_split(["a", "b", "c"], [d.tobytes() for d in docs])
    res = training.evaluate_continual(params, rc.model, split, max_docs=3, doc_bytes=100, piece=4)
    rows = res["documents"]
    assert [r["bytes"] for r in rows] == [9, 7, 6] and res["tokens"] == 8 + 6 + 5
    assert rows[0]["continual_loss"] == pytest.approx(rows[0]["reset_loss"], rel=1e-12)  # nothing read before
    # Never resetting is reading the concatenation: document 2's losses are those positions of it.
    whole, _ = training.stream_losses(params, rc.model, np.concatenate(docs[:2]), piece=5)
    assert rows[1]["continual_loss"] == pytest.approx(float(whole[9:].mean()), rel=1e-10)
    alone, _ = training.stream_losses(params, rc.model, docs[1], piece=3)
    assert rows[1]["reset_loss"] == pytest.approx(float(alone.mean()), rel=1e-10)
    assert rows[1]["continual_loss"] != pytest.approx(rows[1]["reset_loss"], rel=1e-9)


@given(st.lists(st.floats(-20, 20), min_size=2, max_size=12), st.integers(1, 12), st.integers(0, 50))
def test_sample_next_respects_top_k_and_temperature(logits, k, seed):
    z = np.array(logits)
    rng = np.random.default_rng(seed)
    assert training.sample_next(z, 0.0, 0, rng) == int(np.argmax(z))
    assert z[training.sample_next(z, 1.0, 1, rng)] == z.max()
    picks = [training.sample_next(z, 1.5, k, rng) for _ in range(20)]
    kth = np.sort(z)[-min(k, z.size)]
    assert all(z[p] >= kth for p in picks)


@pytest.mark.parametrize("preset", ["transformer-tiny", "titans-tiny", "hope-attention-tiny"])
def test_generate_carries_state_and_matches_rereading_the_context(preset, monkeypatch):
    rc = training.resolve_config({}, {"preset": preset})
    params = model.init_params(rc.model, seed=1)
    prompt = data.encode("def f(x):")
    streamed = training.generate(params, rc.model, prompt, 6, temperature=0.0)
    # The oracle: re-read the whole context for every new byte (what generate must never do).
    ctx = list(prompt)
    for _ in range(6):
        logits, _ = model.forward(params, np.array([ctx]), rc.model)
        ctx.append(int(np.argmax(logits[0, -1])))
    assert streamed.tolist() == ctx[len(prompt):]
    seen = []
    real = model.forward

    def spy(params, tokens, cfg, state=None):
        seen.append(tokens.shape[1])
        return real(params, tokens, cfg, state=state)

    monkeypatch.setattr(model, "forward", spy)
    a = training.generate(params, rc.model, prompt, 5, temperature=1.0, top_k=5, seed=3)
    assert seen == [len(prompt)] + [1] * 5
    b = training.generate(params, rc.model, prompt, 5, temperature=1.0, top_k=5, seed=3)
    assert a.tolist() == b.tolist()
    with pytest.raises(training.TrainingError, match="at least one byte"):
        training.generate(params, rc.model, prompt[:0], 3)


def test_progress_bar_on_a_terminal_and_lines_otherwise(capsys):
    from nlref import progress

    lines = []
    bar = progress.StepProgress(total=8, start=0, every=4, echo=lines.append, tty=False)
    for step in range(1, 9):
        bar.update(step, 2.5, 1000.0)
    assert [ln.split()[1] for ln in lines] == ["4/8", "8/8"]
    assert all("loss 2.5000" in ln and "tok/s" in ln and "ETA" in ln for ln in lines)
    bar = progress.StepProgress(total=3, start=0, every=4, echo=lines.append, tty=True)  # tqdm
    for step in range(1, 4):
        bar.update(step, 1.0, 10.0)
    bar.note("step 3: validation loss 1.0")
    bar.close()
    out = capsys.readouterr().out
    assert "3/3" in out and "loss 1.0000, 10 tok/s" in out and "step 3: validation loss 1.0" in out
    assert len(lines) == 2  # the bar wrote to the terminal, not through echo


def test_training_pins_blas_threads_for_reproducibility(tmp_path, corpus, monkeypatch):
    from threadpoolctl import threadpool_info

    real = model.loss_and_grads
    seen = []

    def spy(params, tokens, cfg):
        seen.append({p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"})
        return real(params, tokens, cfg)

    monkeypatch.setattr(model, "loss_and_grads", spy)
    training.train(tiny_run(corpus, steps=2), tmp_path / "run", echo=lambda s: None)
    assert seen and all(s <= {1} for s in seen)
    assert "blas_threads = 1" in (tmp_path / "run" / "config.toml").read_text()


def test_cpu_backend_trains_like_the_reference(tmp_path, corpus):
    """--backend cpu (the Numba port) follows the reference's trajectory, and eval/generate run on it."""
    ref = tiny_run(corpus, steps=6, checkpoint_every=3, dtype="float64")
    cpu = tiny_run(corpus, steps=6, checkpoint_every=3, dtype="float64", backend="cpu")
    training.train(ref, tmp_path / "ref", echo=lambda s: None)
    training.train(cpu, tmp_path / "cpu", echo=lambda s: None)
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "cpu")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-9)  # float64: the port agrees to ~1e-12 per step
    params, rc, _ = training.load_model_checkpoint(tmp_path / "cpu")
    assert rc.train.backend == "cpu"
    split = data.load_corpus(rc.train.data, rc.train.val_fraction).val
    ev_ref = training.evaluate(params, rc.model, split.stream, 2, 16, 2, backend="reference")
    ev_cpu = training.evaluate(params, rc.model, split.stream, 2, 16, 2, backend="cpu")
    assert abs(ev_ref["loss"] - ev_cpu["loss"]) < 1e-9
    prompt = np.frombuffer(b"def ", dtype=np.uint8).astype(np.int64)
    g_ref = training.generate(params, rc.model, prompt, 8, temperature=0.0, backend="reference")
    g_cpu = training.generate(params, rc.model, prompt, 8, temperature=0.0, backend="cpu")
    np.testing.assert_array_equal(g_cpu, g_ref)


def test_default_backend_is_the_fastest_available():
    import importlib.util

    expected = "cpu" if importlib.util.find_spec("numba") is not None else "reference"
    assert training.default_backend() == expected
    assert training.TrainConfig().backend == expected


def test_gpu_backend_loop_over_the_numpy_namespace_is_the_reference(tmp_path, corpus, monkeypatch):
    """--backend gpu's own logic (parameters, gradients and AdamW state kept as device arrays across
    steps, host copies in checkpoints, device-resident streaming state in eval --continual and
    generate) run over the NumPy namespace (SPEC.md#fast-gpu): bitwise the reference's run, and
    the checkpoint resumes. The CuPy path itself is checked on a GPU (tests/gpu/test_gpu_device_model.py)."""
    from nlref.fast.gpu import model as gpu_model

    monkeypatch.setattr(gpu_model, "NAMESPACE", "numpy")
    ref = tiny_run(corpus, preset="hope-tiny", steps=4, checkpoint_every=2, seq_len=20)
    gpu = tiny_run(corpus, preset="hope-tiny", steps=4, checkpoint_every=2, seq_len=20, backend="gpu")
    training.train(ref, tmp_path / "ref", echo=lambda s: None)
    training.train(gpu, tmp_path / "gpu", echo=lambda s: None)
    strip = [{k: v for k, v in r.items() if k not in ("step_time_s", "time")} for r in training.read_metrics(tmp_path / "ref")]
    assert strip == [{k: v for k, v in r.items() if k not in ("step_time_s", "time")} for r in training.read_metrics(tmp_path / "gpu")]
    p_ref, _, _ = training.load_model_checkpoint(tmp_path / "ref")
    p_gpu, rc, _ = training.load_model_checkpoint(tmp_path / "gpu")
    assert all(np.array_equal(p_ref[k], p_gpu[k]) and type(p_gpu[k]) is np.ndarray for k in p_ref)
    split = data.load_corpus(rc.train.data, rc.train.val_fraction).val
    c_ref = training.evaluate_continual(p_ref, rc.model, split, 2, 60, 16, backend="reference")
    c_gpu = training.evaluate_continual(p_gpu, rc.model, split, 2, 60, 16, backend="gpu")
    assert c_ref == c_gpu
    prompt = np.frombuffer(b"def ", dtype=np.uint8).astype(np.int64)
    np.testing.assert_array_equal(training.generate(p_gpu, rc.model, prompt, 6, temperature=0.0, backend="gpu"),
                                  training.generate(p_ref, rc.model, prompt, 6, temperature=0.0, backend="reference"))
    more = training.resolve_config(training.read_toml(tmp_path / "gpu" / "config.toml"), {"steps": 6})
    training.train(more, tmp_path / "gpu", resume=True, echo=lambda s: None)  # a GPU checkpoint resumes
    assert len(losses(tmp_path / "gpu")) == 6


@pytest.mark.parametrize("key", ["steps", "batch_size", "seq_len", "eval_batches", "log_every", "eval_every",
                                 "checkpoint_every", "seed", "blas_threads", "warmup_steps"])
def test_a_boolean_is_not_a_count(key):
    """TOML ``warmup_steps = true`` is not 1 (bool is an int subclass in Python): a ValueError naming
    the key (found by tests/runs/test_fuzz_runs.py on a fresh machine)."""
    with pytest.raises(ValueError, match=f"^{key}: must be"):
        training.TrainConfig(**{key: True})
