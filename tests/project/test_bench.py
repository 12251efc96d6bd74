"""``nested-learning bench``: the decode measurement (piecewise prefill, flat state), skip rules,
the first-step budget, the cached-start measurement and the medium presets (SPEC.md#fast-cpu,
SPEC.md#hope).

Timings are never asserted against targets (the machine is shared); the tests check what is
measured: how many tokens are fed, which state is timed, and that each skip says why. Every test
whose outcome a time-based decision could change (the first-step budget, the predicted and the
abandoned prefill, the run's time budget) reads a fake clock (tests/fake_clock.py in
``bench.CLOCK``), so no test depends on the machine's speed or load.
"""

import dataclasses
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from fake_clock import use_fake_clock
from hypothesis import given
from hypothesis import strategies as st

from nlref import bench, config
from nlref.cli import cli
from nlref.reference import model as ref


class _Recorder:
    """A stand-in model module that records every forward call's token count and carries a
    state holding the tokens seen so far (so the test sees exactly what was fed)."""

    def __init__(self):
        self.calls = []

    def forward(self, params, tokens, cfg, state=None):
        assert tokens.ndim == 2 and tokens.shape[0] == 1
        self.calls.append(tokens.shape[1])
        seen = 0 if state is None else state["seen"]
        return np.zeros((1, tokens.shape[1], cfg.vocab_size)), {"seen": seen + tokens.shape[1],
                                                                "w": np.zeros(3)}


@given(context=st.integers(1, 5000), piece=st.integers(1, 2048), n_tokens=st.integers(1, 5))
def test_decode_prefills_the_whole_context_in_pieces(context, piece, n_tokens):
    rec = _Recorder()
    cfg = config.preset("titans-tiny")
    res = bench._time_decode(rec, None, cfg, context, n_tokens, piece=piece)
    k = -(-context // piece)  # prefill calls
    assert rec.calls[:k] == [piece] * (k - 1) + [context - piece * (k - 1)]
    assert sum(rec.calls[:k]) == context
    assert rec.calls[k:] == [1] * (bench.DECODE_WARMUP + n_tokens)  # warm-up, then the timed tokens
    assert res["state_bytes"] == 3 * 8 and res["prefill_s"] >= 0
    assert 0 <= res["median_s"] <= max(res["mean_s"] * n_tokens, 1e-12)


class _TimedRecorder(_Recorder):
    """A _Recorder whose every forward call takes ``per_token`` seconds per token on the fake clock."""

    def __init__(self, clock, per_token):
        super().__init__()
        self.clock, self.per_token = clock, per_token

    def forward(self, params, tokens, cfg, state=None):
        self.clock.advance(self.per_token * tokens.shape[1])
        return super().forward(params, tokens, cfg, state)


def test_prefill_past_the_budget_is_abandoned_and_not_before(monkeypatch):
    clock = use_fake_clock(monkeypatch, tick=0.0)  # only the model's calls take time
    cfg, pt = config.preset("titans-tiny"), 2.0**-10  # 100 tokens: 0.0977 s a piece
    rec = _TimedRecorder(clock, pt)
    assert bench._time_decode(rec, None, cfg, 10_000, 4, abort_after=1.0, piece=100) is None
    assert rec.calls == [100] * 11  # the first piece past 1 s (11 x 0.0977 s), nothing decoded
    rec = _TimedRecorder(clock, pt)  # a budget the whole prefill fits: measured, not abandoned
    res = bench._time_decode(rec, None, cfg, 10_000, 4, abort_after=10_000 * pt, piece=100)
    assert rec.calls == [100] * 100 + [1] * (bench.DECODE_WARMUP + 4)
    assert res["prefill_s"] == 10_000 * pt and res["median_s"] == res["mean_s"] == pt


def test_memory_state_is_constant_in_the_context_and_attention_grows():
    from nlref.fast.cpu import model as cpu

    sizes = {}
    for name in ("titans-tiny", "hope-tiny", "transformer-tiny"):
        cfg = config.preset(name)
        params = cpu.init_params(cfg, 0)
        # 50 tokens: one call; 642: ten calls of 64 and one of 2. The same position modulo the longest
        # CMS period after the 2 decoded tokens (52, 644): the records of the open level chunks, and
        # so the state's size, are periodic in it (SPEC.md#hope)
        sizes[name] = [bench._time_decode(cpu, params, cfg, c, 2, piece=64)["state_bytes"] for c in (50, 642)]
    assert sizes["titans-tiny"][0] == sizes["titans-tiny"][1] > 0
    assert sizes["hope-tiny"][0] == sizes["hope-tiny"][1] > 0
    assert sizes["transformer-tiny"][1] > 5 * sizes["transformer-tiny"][0]  # the KV cache


def test_piecewise_prefill_gives_the_one_call_state():
    # what the benchmark decodes from is the state one call over the context would give
    from nlref.fast.cpu import model as cpu

    cfg = config.preset("hope-tiny")
    params = cpu.init_params(cfg, 0)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(1, 23))
    _, one = cpu.forward(params, tokens, cfg)
    state = None
    for a in range(0, 23, 5):
        _, state = cpu.forward(params, tokens[:, a:a + 5], cfg, state)
    nxt = np.array([[1]])
    l1, _ = cpu.forward(params, nxt, cfg, one)
    l2, _ = cpu.forward(params, nxt, cfg, state)
    np.testing.assert_allclose(l2, l1, rtol=1e-12, atol=1e-12)


def test_predicted_prefill_is_linear_for_memories_quadratic_for_attention():
    titans, attn = config.preset("titans-tiny"), config.preset("transformer-tiny")
    assert bench._predict_prefill(titans, 4096, (1024, 2.0), 1e9) == pytest.approx(8.0)
    assert bench._predict_prefill(attn, 4096, (1024, 2.0), 1e9) == pytest.approx(32.0)
    assert bench._predict_prefill(titans, 1000, None, 500.0) == pytest.approx(2.0)


def test_run_skips_with_reasons_and_reports_state_sizes(monkeypatch):
    use_fake_clock(monkeypatch)  # each reading 1/1024 s on: a first step or a piece of prefill takes a tick or two
    out = []
    rows = bench.run(presets=("titans-tiny", "transformer-tiny"), backends=("cpu",), batch_size=1, seq_len=6,
                     repeats=1, decode_contexts=(16, 16384, 32), decode_tokens=2, max_seconds=30.0, echo=out.append)
    titans, attn = rows
    assert list(titans["decode_s_per_token"]) == ["16", "32", "16384"]  # sorted contexts
    assert titans["decode_s_per_token"]["16"] > 0 and titans["decode_mean_s_per_token"]["32"] > 0
    assert titans["decode_state_bytes"]["16"] == titans["decode_state_bytes"]["32"]
    assert attn["decode_s_per_token"]["16384"] is None
    assert attn["decode_skipped"]["16384"] == "attention beyond 8192 tokens"
    assert attn["decode_state_bytes"]["32"] > attn["decode_state_bytes"]["16"]
    text = "\n".join(out)
    assert "decode@16K" in text and "median (mean) ms per token" in text
    assert "attention families beyond 8192 tokens" in text
    # a tiny budget: predicted prefills over it are skipped and named
    rows = bench.run(presets=("titans-tiny",), backends=("cpu",), batch_size=1, seq_len=6, repeats=1,
                     decode_contexts=(8, 1 << 22), decode_tokens=1, max_seconds=1.0, echo=out.append,
                     prefill_seconds=1.0)
    assert rows[0]["decode_s_per_token"]["8"] > 0
    predicted = rows[0]["prefill_8_s"] * (1 << 22) / 8  # linear in the context from the measured one
    assert rows[0]["decode_skipped"][str(1 << 22)] == f"prefill predicted {predicted:.0f} s > 1 s"
    assert "titans-tiny cpu @4096K: prefill predicted" in out[-1]
    rows = bench.run(presets=("titans-tiny",), backends=("cpu",), batch_size=1, seq_len=6, repeats=1,
                     decode_contexts=(1 << 22,), decode_tokens=1, max_seconds=1.0, echo=out.append)
    predicted = (1 << 22) / rows[0]["tokens_per_s"]  # the first context: from the training step's rate
    assert rows[0]["decode_skipped"][str(1 << 22)] == f"prefill predicted {predicted:.0f} s > 3 s"  # 3 x max


def test_first_step_over_the_budget_is_the_step_time(monkeypatch):
    clock = use_fake_clock(monkeypatch)  # a first call takes exactly one tick
    out = []
    rows = bench.run(presets=("titans-tiny",), backends=("reference",), batch_size=1, seq_len=6, repeats=3,
                     decode_contexts=(8,), decode_tokens=1, max_seconds=clock.tick, echo=lambda *a: None)
    assert rows[0]["steps_timed"] == 3 and rows[0]["decode_s_per_token"]["8"] > 0  # not over: timed
    rows = bench.run(presets=("titans-tiny",), backends=("reference",), batch_size=1, seq_len=6, repeats=3,
                     decode_contexts=(8,), decode_tokens=1, max_seconds=0.0, echo=out.append)
    row = rows[0]
    assert row["steps_timed"] == 0 and row["step_s"] == row["first_call_s"]
    assert row["tokens_per_s"] == pytest.approx(6 / row["first_call_s"])
    assert row["decode_s_per_token"]["8"] is None and "first step over 0 s" in row["decode_skipped"]["8"]
    assert row["threads"] == 1 and any(line.startswith("cpu: the batch in 1 group(s)") for line in out)
    row_line = next(line for line in out if line.startswith("titans-tiny"))
    assert re.search(r"titans-tiny +reference +\d+\* ", row_line) and out[-1].startswith("* first step over 0 s")


class _FakeBackend:
    """A host backend that takes ``step_s`` per training step and ``token_s`` per token of a forward
    call on the fake clock, and nothing else (no model runs)."""

    device = "cpu"

    def __init__(self, clock, step_s, token_s):
        self.clock, self.step_s, self.rec = clock, step_s, _TimedRecorder(clock, token_s)

    def params(self, cfg):
        return None

    def forward(self, params, tokens, cfg, state=None):
        return self.rec.forward(params, tokens, cfg, state)

    def stepper(self, params, tokens, cfg):
        return lambda: self.clock.advance(self.step_s)

    def synchronize(self):
        pass


def _fake_run(monkeypatch, token_s=2.0**-10, **kw):
    """One titans-tiny row (batch 1 x 8) on _FakeBackend: a step takes 1/8 s, a token of a forward
    call ``token_s`` (1/1024 s); the clock moves only then. Timeline: steps end at 2/8 s (first call + 1 repeat),
    context 64 at 2/8 + (64 + DECODE_WARMUP + 2)/1024 s, then context 128."""
    clock = use_fake_clock(monkeypatch, tick=0.0)
    monkeypatch.setattr(bench, "_backend", lambda name, batch_size=4: _FakeBackend(clock, 2.0**-3, token_s))
    args = dict(presets=("titans-tiny",), backends=("cpu",), batch_size=1, seq_len=8, repeats=1,
                decode_contexts=(64, 128), decode_tokens=2, echo=lambda *a: None) | kw
    return bench.run(**args)[0]


def test_time_based_skips_follow_the_clock_not_the_machine(monkeypatch):
    """Each time-based decision of the bench (module docstring; SPEC.md#fast-cpu), on a fake clock:
    a context is skipped exactly when the clock says its budget is spent, and measured otherwise."""
    after_64 = 2 * 2.0**-3 + (64 + bench.DECODE_WARMUP + 2) * 2.0**-10
    # the run's time budget: checked before each context
    row = _fake_run(monkeypatch, time_budget=after_64)  # not over when context 128 starts: measured
    assert row["decode_s_per_token"] == {"64": 2.0**-10, "128": 2.0**-10} and "decode_skipped" not in row
    assert row["prefill_64_s"] == 64 * 2.0**-10 and row["first_call_s"] == row["step_s"] == 2.0**-3
    row = _fake_run(monkeypatch, time_budget=after_64 - 2.0**-10)  # spent by then: 128 skipped, 64 measured
    assert row["decode_s_per_token"] == {"64": 2.0**-10, "128": None}
    assert row["decode_skipped"] == {"128": f"the run's time budget ({after_64 - 2.0**-10:g} s) is spent"}
    row = _fake_run(monkeypatch, time_budget=2 * 2.0**-3 - 2.0**-10)  # spent during the steps: both skipped
    assert list(row["decode_skipped"]) == ["64", "128"] and row["steps_timed"] == 1
    # the predicted prefill: 64 tokens at the step's 8 tokens per 1/8 s is 1 s
    assert "decode_skipped" not in _fake_run(monkeypatch, prefill_seconds=1.0)
    row = _fake_run(monkeypatch, prefill_seconds=1.0 - 2.0**-10)
    assert row["decode_skipped"]["64"] == f"prefill predicted 1 s > {1.0 - 2.0**-10:g} s"
    assert row["decode_skipped"]["128"].startswith("prefill predicted 2 s >")  # from the step again: nothing measured
    # a prefill that overruns twice its budget is abandoned between pieces (2048 tokens: two pieces)
    row = _fake_run(monkeypatch, token_s=2.0**-6, decode_contexts=(2048,), prefill_seconds=32.0)  # predicted 32 s
    assert "decode_skipped" not in row and row["prefill_2048_s"] == 32.0  # took 32 s: measured
    row = _fake_run(monkeypatch, token_s=2.0**-3, decode_contexts=(2048,), prefill_seconds=32.0)  # 128 s a piece
    assert row["decode_skipped"] == {"2048": "prefill over 64 s"}
    # the first-step budget: a first call of 1/8 s
    assert _fake_run(monkeypatch, max_seconds=2.0**-3)["steps_timed"] == 1
    row = _fake_run(monkeypatch, max_seconds=2.0**-3 - 2.0**-10)
    assert row["steps_timed"] == 0 and row["decode_skipped"]["64"].startswith("first step over")


def _cache_files(directory):
    """{path: (size, mtime_ns)} of every file under ``directory`` (Numba's index and data files)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


def test_startup_times_two_processes_share_the_cache(tmp_path):
    out, after = [], []

    def echo(line):  # called as each process ends: what the cache directory holds then
        out.append(line)
        after.append(_cache_files(tmp_path))

    rows = bench.startup_times("transformer-tiny", runs=2, cache_dir=tmp_path, batch_size=1, seq_len=4, echo=echo)
    assert [r["run"] for r in rows] == [1, 2]
    assert any(p.endswith(".nbi") for p in after[0])  # the first process wrote Numba's cache there
    for r in rows:
        assert r["to_first_step_s"] >= r["imports_s"] + r["first_step_s"] > 0
    # the second process loaded every function from the cache: it compiled (so wrote) nothing (a
    # check of what happened, not of how long it took, which depends on the machine's load)
    assert after[1] == after[0]
    assert "same NUMBA_CACHE_DIR" in out[1]
    with pytest.raises(ValueError, match="unknown preset"):
        bench.startup_times("nope")


MEDIUM = ("transformer-medium", "hope-attention-medium", "titans-medium", "hope-medium")


def test_medium_presets_are_larger_than_small():
    for name in MEDIUM:
        med, small = config.preset(name), config.preset(name.replace("medium", "small"))
        assert med.family == small.family and med.vocab_size == 256 and med.dtype == "float32"
        assert med.d_model == 256 and med.d_model > small.d_model and med.n_layers > small.n_layers
        n_med, n_small = sum(ref.param_counts(med).values()), sum(ref.param_counts(small).values())
        assert n_med > 3 * n_small, (name, n_med, n_small)
        assert (med.cms_chunk is None) == (small.cms_chunk is None)
        params = ref.init_params(dataclasses.replace(med, n_layers=1), 0)  # valid shapes
        assert all(np.isfinite(v).all() for v in params.values())


@pytest.mark.parametrize("name", MEDIUM)
def test_info_model_medium(name):
    res = CliRunner().invoke(cli, ["info", "--model", name])
    assert res.exit_code == 0, res.output
    assert name in res.output


# ------------------------------------------------------------------------------------------------
# GPU rows (SPEC.md#fast-gpu): what runs without a GPU. The gpu row's whole code path runs here
# over the NumPy namespace (NL_GPU_NAMESPACE=numpy), the torch-cuda row's on torch's CPU device.
# ------------------------------------------------------------------------------------------------

def _has_gpu() -> bool:
    from nlref.fast.gpu import namespace

    if namespace.cupy_available()[0]:
        return True
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: the GPU rows run (tests/gpu/test_gpu_device_*.py, scripts/gpu_check.sh)")
def test_gpu_rows_without_a_gpu_say_why_and_the_run_goes_on(tmp_path, monkeypatch):
    from nlref.fast.gpu import namespace

    use_fake_clock(monkeypatch)  # the cpu row's decode is not skipped however slow the machine
    out, js = [], tmp_path / "rows.jsonl"
    rows = bench.run(presets=("titans-tiny",), backends=("cpu", "gpu", "torch-cuda"), batch_size=1, seq_len=6,
                     repeats=1, decode_contexts=(8,), decode_tokens=1, echo=out.append, json_out=str(js))
    cpu, gpu, tcuda = rows
    assert cpu["tokens_per_s"] > 0 and cpu["vs_base"] == 1.0 and cpu["decode_s_per_token"]["8"] > 0
    assert gpu["status"] == f"no GPU: {namespace.cupy_available()[1]}" and "tokens_per_s" not in gpu
    assert tcuda["status"].startswith("no GPU: ") and "tokens_per_s" not in tcuda
    text = "\n".join(out)
    assert re.search(r"^GPU: none \(CuPy", text, re.M)
    assert re.search(r"titans-tiny +torch-cuda no GPU: ", text)
    assert [json.loads(line)["backend"] for line in js.read_text().splitlines()] == ["cpu", "gpu", "torch-cuda"]


def test_gpu_row_code_path_over_the_numpy_namespace(monkeypatch):
    from nlref.fast.gpu import model as gpu_model

    monkeypatch.setattr(gpu_model, "NAMESPACE", "numpy")
    use_fake_clock(monkeypatch)
    out = []
    rows = bench.run(presets=("hope-tiny",), backends=("reference", "gpu"), batch_size=2, seq_len=8, repeats=1,
                     decode_contexts=(8, 20), decode_tokens=2, echo=out.append)
    ref_row, gpu = rows
    assert "status" not in gpu, gpu.get("status")
    assert gpu["tokens_per_s"] > 0 and gpu["steps_timed"] == 1 and gpu["vs_reference"] == gpu["vs_base"] > 0
    assert gpu["decode_s_per_token"]["20"] > 0 and gpu["decode_state_bytes"]["8"] == gpu["decode_state_bytes"]["20"]
    assert gpu["decode_state_bytes"]["8"] == ref_row["decode_state_bytes"]["8"]  # the same state layout
    assert "NL_GPU_NAMESPACE=numpy" in gpu["device"] and gpu["peak_gflops"] > 0
    assert any(line.startswith("GPU: NL_GPU_NAMESPACE=numpy") for line in out)


def test_gpu_step_is_the_reference_adamw_step(monkeypatch):
    # over the NumPy namespace the GPU port is the reference bit for bit: so is the benchmark's step
    from nlref.fast.gpu import model as gpu_model
    from nlref.reference import optimizers

    monkeypatch.setattr(gpu_model, "NAMESPACE", "numpy")
    cfg = config.preset("hope-tiny")
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(2, 9))
    be = bench._backend("gpu")
    step = be.stepper(be.params(cfg), tokens, cfg)
    opt = optimizers.make("adamw", lr=bench.ADAMW_LR)
    params = ref.init_params(cfg, 0)
    state = opt.init(params)
    for _ in range(2):
        step()
        _, grads = ref.loss_and_grads(params, tokens, cfg)
        params, state = opt.update(params, grads, state)
    for k in params:
        np.testing.assert_array_equal(gpu_model.to_host(step.params[k]), params[k], err_msg=k)


def test_clock_waits_for_the_device(monkeypatch):
    use_fake_clock(monkeypatch)
    calls = []
    n_steps = []
    first, med, n = bench._time_steps(lambda: n_steps.append(1), 3, 10.0, sync=lambda: calls.append(len(n_steps)))
    assert n == 3 and calls == [1, 2, 3, 4]  # after every step, before its clock is read
    rec, synced = _Recorder(), []
    bench._time_decode(rec, None, config.preset("titans-tiny"), 50, 3, piece=20, sync=lambda: synced.append(len(rec.calls)))
    assert synced == [1, 2, 3, 3 + bench.DECODE_WARMUP] + [3 + bench.DECODE_WARMUP + i for i in (1, 2, 3)]


def test_torch_device_row_runs_its_code_path_on_the_cpu(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(bench, "TORCH_CUDA_DEVICE", "cpu")
    use_fake_clock(monkeypatch)
    rows = bench.run(presets=("titans-tiny",), backends=("torch-cuda",), batch_size=1, seq_len=8, repeats=1,
                     decode_contexts=(12,), decode_tokens=2, echo=lambda *a: None)
    row = rows[0]
    assert "status" not in row, row.get("status")
    assert row["tokens_per_s"] > 0 and row["decode_s_per_token"]["12"] > 0 and row["decode_state_bytes"]["12"] > 0


@pytest.mark.parametrize("name", ["hope-tiny", "transformer-tiny"])
def test_torch_trainer_is_loss_and_grads_plus_adamw(name):
    # the torch-cuda row's step (device-resident parameters, torch.optim.AdamW) against the NumPy
    # interface's autograd gradients + reference AdamW, float64, three steps
    torch = pytest.importorskip("torch")
    from tolerances import assert_close

    from nlref import torch_model as tm
    from nlref.reference import optimizers

    cfg = dataclasses.replace(config.preset(name), dtype="float64")
    params = ref.init_params(cfg, 0)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 9))
    trainer = tm.Trainer(params, cfg, "cpu")
    opt = optimizers.make("adamw")
    state = opt.init(params)
    for _ in range(3):
        loss_t = trainer.step(torch.as_tensor(tokens))
        loss, grads = tm.loss_and_grads(params, tokens, cfg)
        params, state = opt.update(params, grads, state)
        assert float(loss_t) == pytest.approx(loss, rel=1e-12)
    got = trainer.params()
    for k in params:
        assert_close(got[k], params[k], "float64", "torch_oracle", k)
    # forward_tensors is forward without the host round trip
    P = tm.init_from_params(params, cfg, "cpu")
    logits, st1 = tm.forward_tensors(P, torch.as_tensor(tokens), cfg)
    ref_logits, st2 = tm.forward(params, tokens, cfg)
    np.testing.assert_array_equal(logits.numpy(), ref_logits)


def test_torch_model_device_choice():
    torch = pytest.importorskip("torch")
    from nlref import torch_model as tm

    assert tm.get_device() == torch.device("cpu")
    assert tm.set_device("cpu") == torch.device("cpu")
    cfg = config.preset("titans-tiny")
    assert tm.init_from_params(tm.init_params(cfg, 0), cfg)["embed.E"].device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            tm.set_device("cuda")
        assert tm.get_device() == torch.device("cpu")  # unchanged


def test_cli_bench_gpu_options_and_time_budget(tmp_path, monkeypatch):
    use_fake_clock(monkeypatch)
    js = tmp_path / "rows.jsonl"
    res = CliRunner().invoke(cli, ["bench", "--preset", "titans-tiny", "--preset", "hope-tiny", "--backend", "cpu",
                                   "--backend", "gpu", "--backend", "torch-cuda", "--seq-len", "6", "--batch-size",
                                   "1", "--repeats", "1", "--decode-context", "8", "--decode-tokens", "1",
                                   "--max-seconds", "5", "--prefill-seconds", "0", "--time-budget", "0",
                                   "--json-out", str(js)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in js.read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "skipped: the run's time budget (0 s) is spent" for r in rows)
    res = CliRunner().invoke(cli, ["bench", "--preset", "titans-tiny", "--backend", "cpu", "--seq-len", "6",
                                   "--batch-size", "1", "--repeats", "1", "--decode-context", "8",
                                   "--decode-tokens", "1", "--prefill-seconds", "0", "--json-out", str(js)])
    assert res.exit_code == 0, res.output
    row = json.loads(js.read_text())
    assert re.fullmatch(r"prefill predicted \d+ s > 0 s", row["decode_skipped"]["8"])
    res = CliRunner().invoke(cli, ["bench", "--backend", "tpu"])
    assert res.exit_code == 2 and "tpu" in res.output
    res = CliRunner().invoke(cli, ["bench", "--max-seconds", "-1"])
    assert res.exit_code == 2


def test_a_failing_row_is_reported_and_the_cli_exits_1(monkeypatch, tmp_path):
    real = bench._backend

    def broken(name, batch_size=4):
        be = real(name, batch_size)
        if name == "reference":
            def stepper(*a):
                raise FloatingPointError("a step that fails")
            be.stepper = stepper
        return be

    monkeypatch.setattr(bench, "_backend", broken)
    js = tmp_path / "rows.jsonl"
    res = CliRunner().invoke(cli, ["bench", "--preset", "titans-tiny", "--backend", "reference", "--backend", "cpu",
                                   "--seq-len", "6", "--batch-size", "1", "--repeats", "1", "--decode-context", "8",
                                   "--decode-tokens", "1", "--json-out", str(js)])
    assert res.exit_code == 1
    assert "FloatingPointError: a step that fails" in res.output and "Traceback" in res.output
    assert "1 row(s) failed: titans-tiny reference" in res.output
    ref_row, cpu_row = (json.loads(line) for line in js.read_text().splitlines())
    assert ref_row["status"] == "error: FloatingPointError: a step that fails"
    assert cpu_row["tokens_per_s"] > 0 and cpu_row["vs_reference"] is None  # the run went on


def test_gpu_check_script_parses():
    # scripts/gpu_check.sh runs once on a GPU machine: at least its syntax is checked on every run
    import pathlib
    import shutil
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    assert "set -uo pipefail" in text and "NL_REQUIRE_GPU=1" in text and "--backend gpu" in text


def test_the_command_line_runs_the_cpu_groups_in_worker_processes(tmp_path):
    """SPEC.md#fast-cpu: ``nested-learning`` sets NL_CPU_WORKERS=process unless it is set (the
    library's default is threads); the bench header names what ran. A fresh process, since the
    port reads the setting once."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NL_CPU_WORKERS"}
    args = [sys.executable, "-m", "nlref", "bench", "--preset", "titans-tiny", "--backend", "cpu",
            "--batch-size", "2", "--seq-len", "6", "--repeats", "1", "--decode-context", "4", "--decode-tokens", "1"]
    for setting, kind in ((None, "process"), ("thread", "thread")):
        run_env = env if setting is None else dict(env, NL_CPU_WORKERS=setting)
        res = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        if len(os.sched_getaffinity(0)) >= 2:  # one core: the groups run in the caller
            assert f"the caller and 1 {kind} worker(s)" in res.stdout, res.stdout


def test_memory_verdict_is_linear_in_the_tokens_and_names_the_budget():
    need, why = bench.memory_verdict(1024.0, 4, 256, budget_mib=2048.0)  # 1 MiB per token x 1,024 tokens
    assert need == pytest.approx(1024.0) and why is None
    need, why = bench.memory_verdict(1024.0, 4, 256, budget_mib=512.0, probe_t=32)
    assert need == pytest.approx(1024.0)
    assert why == ("predicted peak 1.0 GB > the 0.5 GB budget (--max-memory; 1.0 MB per token measured at 4 x 32 "
                   "tokens in a child process)")
    assert bench.memory_verdict(1e9, 4, 256, budget_mib=None)[1] is None  # no budget: no guard


def test_a_torch_row_over_the_memory_budget_is_skipped_and_the_run_goes_on():
    """The probe runs for real (a child process, one step of 1 x 6 tokens); with a budget of a few
    bytes the torch row is skipped with its prediction and the other rows are measured; with the
    machine's budget it runs and records what the probe measured. The CLI exits 0 either way."""
    pytest.importorskip("torch")
    out = []
    # max_seconds 600: the probe's timeout (max(60, max_seconds)) is then far beyond a 6-token step on any machine
    rows = bench.run(presets=("transformer-tiny",), backends=("cpu", "torch"), batch_size=1, seq_len=6, repeats=1,
                     decode_contexts=(8,), decode_tokens=1, echo=out.append, max_memory_gb=1e-9, max_seconds=600.0)
    cpu, torch_row = rows
    assert cpu["tokens_per_s"] > 0 and "status" not in cpu
    assert torch_row["status"].startswith("skipped: predicted peak ") and "--max-memory" in torch_row["status"]
    assert torch_row["probe_kib_per_token"] > 0 and torch_row["memory_budget_mib"] == pytest.approx(1e-9 * 1024)
    assert "tokens_per_s" not in torch_row
    assert re.search(r"transformer-tiny +torch +skipped: predicted peak", "\n".join(out))
    rows = bench.run(presets=("transformer-tiny",), backends=("torch",), batch_size=1, seq_len=6, repeats=1,
                     decode_contexts=(8,), decode_tokens=1, echo=lambda *a: None, max_seconds=600.0)
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["predicted_step_mib"] <= rows[0]["memory_budget_mib"]
    res = CliRunner().invoke(cli, ["bench", "--preset", "transformer-tiny", "--backend", "torch", "--batch-size", "1",
                                   "--seq-len", "6", "--repeats", "1", "--decode-context", "8", "--decode-tokens", "1",
                                   "--max-seconds", "600", "--max-memory", "0.000000001"])
    assert res.exit_code == 0, res.output
    assert "skipped: predicted peak" in res.output


def test_peak_memory_is_the_processs_own_not_its_parents(tmp_path):
    """A child started by a process holding ~400 MB reads its own peak (``bench.peak_rss_kib``:
    VmHWM), not the parent's size, which Linux's ``ru_maxrss`` carries across fork and exec."""
    import subprocess
    import sys

    if not open("/proc/self/status", encoding="ascii").read().count("VmHWM:"):
        pytest.skip("no VmHWM in /proc/self/status")
    big = np.ones(400 * 2**20 // 8)  # touched: resident in this process
    code = "from nlref import bench; print(bench.peak_rss_kib())"
    child_kib = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.split()[-1])
    assert big.sum() > 0
    assert child_kib < 300 * 1024, f"the child read {child_kib / 1024:.0f} MB: the parent's peak, not its own"


def test_memory_layer_flops_count_the_fast_weights_products_by_hand():
    """``bench.memory_layer_flops`` against counts worked out by hand from the layers' equations
    (per head: a read of an MLP memory z + W1 act(W2 z) is 2 products of dh x Hm, 4 dh Hm FLOPs)."""
    # hope-tiny: dh 4, Hm 4, 2 heads, memories k, v, eta, alpha, memory (readers: the first four), DGD.
    cfg = config.preset("hope-tiny")
    assert (cfg.d_model, cfg.n_heads, cfg.mem_hidden, cfg.mem_kind, cfg.mem_dgd) == (8, 2, 4, "mlp", True)
    read = 4 * 4 * 4  # W2 z and W1 act(.): 2 x (2 x 4 x 4)
    reads = 4 + 1 + 5 + 5  # x by 4 readers, q by M_memory, v (v_hat) and k (inner gradient) by 5 memories
    per_memory = 2 * 4 * 4 + 2 * 32 + 4 * 16  # W1^T u1; rank-1 factors into W1 and W2; W2 (alpha I - eta' k k^T)
    assert bench.memory_layer_flops(cfg) == 2 * (reads * read + 5 * per_memory)
    no_dgd = dataclasses.replace(cfg, mem_dgd=False)  # the shrink's two products go, nothing else
    assert bench.memory_layer_flops(cfg) - bench.memory_layer_flops(no_dgd) == 2 * 5 * 4 * 16
    # titans-small: dh 32, Hm 128, 4 heads: read at q, inner gradient at k (+ W1^T u1), the write
    cfg = config.preset("titans-small")
    dh, Hm = 32, 128
    assert (cfg.d_model // cfg.n_heads, cfg.mem_hidden or 4 * dh, cfg.mem_kind) == (dh, Hm, "mlp")
    assert bench.memory_layer_flops(cfg) == 4 * (2 * 4 * dh * Hm + 2 * dh * Hm + 2 * 2 * dh * Hm)
    # deltanet: read S q, then S k and the rank-1 correction (dh x dh each); linear attention: read, outer product
    cfg = config.preset("deltanet-small")
    dh = cfg.d_model // cfg.n_heads
    assert bench.memory_layer_flops(cfg) == cfg.n_heads * 6 * dh * dh
    assert bench.memory_layer_flops(config.preset("linear-attention-small")) == cfg.n_heads * 4 * dh * dh
    assert bench.memory_layer_flops(config.preset("transformer-small")) == 0.0
    # the step: 3 x (forward) per layer and token on top of the 6 N rule
    cfg = config.preset("hope-small")
    extra = bench.model_flops(cfg, 4, 256) - 3.0 * bench.memory_layer_flops(cfg) * cfg.n_layers * 1024
    assert extra == pytest.approx(6.0 * sum(int(np.prod(s)) for k, s in ref.param_shapes(cfg).items()
                                            if len(s) >= 2 and not k.startswith("embed.")) * 1024)


def test_a_memory_probe_killed_by_a_signal_skips_the_torch_row(monkeypatch):
    """A probe that a signal ended (the OOM killer's SIGKILL: a step of the probe's size did not fit)
    skips the torch row with that reason instead of running it into the same kill, which would end
    the whole run; a probe that failed with an error still lets the row run (and report the error)."""
    import subprocess

    def fake_run(returncode, stderr=""):
        return lambda args, **kw: subprocess.CompletedProcess(args, returncode, "", stderr)

    monkeypatch.setattr(subprocess, "run", fake_run(-9))
    kib, why, killed = bench.probe_step_memory("transformer-tiny", "torch", 1, 6, "float32", 60.0)
    assert kib is None and killed and why == ("the memory probe of one 1 x 6-token step was killed by signal 9 "
                                              "(out of memory?)")
    monkeypatch.setattr(subprocess, "run", fake_run(1, "Traceback\nValueError: bad preset"))
    assert bench.probe_step_memory("transformer-tiny", "torch", 1, 6, "float32", 60.0) == (
        None, "ValueError: bad preset", False)
    monkeypatch.undo()
    from nlref import config

    cfg = config.preset("transformer-tiny")
    for result, expect in (((None, "killed by signal 9", True), "killed by signal 9"), ((None, "ValueError", False), None)):
        monkeypatch.setattr(bench, "probe_step_memory", lambda *a, result=result, **k: result)
        row = {}
        assert bench._torch_memory_check(row, cfg, "float32", 1, 6, 1.0, 60.0) == expect
        assert row["memory_probe"] == result[1]
