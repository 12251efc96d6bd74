"""The whole model on fast/cpu vs the reference, every family (SPEC.md#fast-cpu, SPEC.md#hope).

Hypothesis draws a configuration per family (batch, length not a multiple of the chunk sizes,
widths, heads, CMS levels and periods, in-context or static CMS, variant, memory kind and chunk
sizes) and a dtype; the loss, every gradient, the logits of a one-call forward and of a two-call
stream, and the final state must agree with the reference within the "port" rows. Parameters
and tokens are read-only and must stay unchanged. A 10-step AdamW trajectory agrees between the
backends, and ``nlref.fast.model`` dispatches by device.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from port_helpers import assert_grads_close as _assert_grads_close
from port_helpers import assert_model_port_matches
from strategies import FAMILIES
from strategies import model_configs as configs
from tolerances import assert_close

from nlref import config
from nlref.fast import model as fast_model
from nlref.fast.cpu import model as F
from nlref.fast.cpu import primitives as FP
from nlref.fast.gpu import namespace
from nlref.reference import model as R
from nlref.reference import optimizers


def _ro_params(params):
    out = {}
    for k, v in params.items():
        v = v.copy()
        v.setflags(write=False)
        out[k] = v
    return out


def _compiled_fallbacks():
    return {k: v for k, v in FP.FALLBACKS.items() if not k.startswith("model.")}


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8)
@given(data=st.data())
def test_model_matches_reference(family, data):
    cfg = data.draw(configs(family))
    seed = data.draw(st.integers(0, 2**20))
    B = data.draw(st.integers(1, 3))  # 2 and 3 take the batch split (F.GROUPS = 2): even and uneven groups
    T = data.draw(st.integers(2, 9))
    split = data.draw(st.integers(1, T - 1))
    note(f"{cfg} B={B} T={T} split={split}")
    dtype = cfg.dtype
    params = _ro_params(R.init_params(cfg, seed))
    before = {k: v.copy() for k, v in params.items()}
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))
    tokens.setflags(write=False)
    fallbacks = _compiled_fallbacks()
    layer_fb = FP.FALLBACKS.get(f"model.{family}_layer", 0)

    assert_model_port_matches(F, R, params, tokens, cfg, dtype, split)

    assert _compiled_fallbacks() == fallbacks, "a compiled op took the reference fallback"
    if F.PORTED_LAYERS.get(family) is not None:
        assert FP.FALLBACKS.get(f"model.{family}_layer", 0) == layer_fb
    for k, v in params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_batch_groups_are_a_balanced_contiguous_partition(monkeypatch):
    for G in range(1, 5):
        monkeypatch.setattr(F, "GROUPS", G)
        for B in range(1, 10):
            groups = F.batch_groups(B)
            assert len(groups) == min(G, B)
            assert groups[0].start == 0 and groups[-1].stop == B
            assert all(a.stop == b.start for a, b in zip(groups, groups[1:], strict=False))
            sizes = [g.stop - g.start for g in groups]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("name", ["hope-tiny", "titans-tiny", "hope-attention-tiny", "transformer-tiny"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batch_split_result_is_independent_of_the_thread_count(name, dtype, monkeypatch):
    """SPEC.md#fast-cpu (groups and threads): the grouping fixes the rounding, the thread count never
    changes a result (bitwise); any grouping is the reference's function (port tolerance), and the
    groups really run on the worker threads."""
    import threading

    cfg = dataclasses.replace(config.preset(name), dtype=dtype)
    params = R.init_params(cfg, 3)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(3, 9))
    lr, gr = R.loss_and_grads(params, tokens, cfg)
    seen = []
    inner = F._loss_and_grads

    def recording(p, t, c):
        seen.append((t.shape[0], threading.current_thread().name))
        return inner(p, t, c)

    monkeypatch.setattr(F, "_loss_and_grads", recording)
    monkeypatch.setattr(F, "WORKERS", "thread")  # the recording wrapper lives in this process
    runs = {}
    for groups, threads in ((1, 1), (3, 1), (3, 3), (2, 2)):
        monkeypatch.setattr(F, "GROUPS", groups)
        monkeypatch.setattr(F, "THREADS", threads)
        seen.clear()
        runs[groups, threads] = F.loss_and_grads(params, tokens, cfg)
        assert sorted(n for n, _ in seen) == sorted(g.stop - g.start for g in F.batch_groups(3))
        workers = sorted({t for _, t in seen if t.startswith("nl-cpu")})
        # the caller runs the first group; the others go to at most min(THREADS, groups) - 1 worker
        # threads (an idle worker may take two groups of a small model)
        assert ("MainThread" in {t for _, t in seen}) and len(workers) <= min(threads, groups) - 1, seen
        assert (len(workers) > 0) == (min(threads, groups) > 1), seen
        assert_close(runs[groups, threads][0], lr, dtype, "port", f"loss {groups} groups")
        _assert_grads_close(runs[groups, threads][1], gr, dtype)
    (l1, g1), (l3, g3) = runs[3, 1], runs[3, 3]
    assert l1 == l3
    for k in g1:
        np.testing.assert_array_equal(g1[k], g3[k], err_msg=k)


@pytest.mark.skipif(F.usable_cores() < 2, reason="one core: the groups run in the calling thread")
def test_worker_processes_give_bitwise_the_threads_result(monkeypatch):
    """NL_CPU_WORKERS=process runs the same code on the same numbers in another process: the
    result is bitwise the thread workers'; a worker that dies is reported (RuntimeError naming the
    remedy) and the next call starts a new one."""
    import signal

    monkeypatch.setattr(F, "GROUPS", 2)
    monkeypatch.setattr(F, "THREADS", 2)
    for name, dtype in (("hope-tiny", "float64"), ("titans-tiny", "float32")):
        cfg = dataclasses.replace(config.preset(name), dtype=dtype)
        params = R.init_params(cfg, 5)
        tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(3, 7))
        out = {}
        for kind in ("thread", "process"):
            monkeypatch.setattr(F, "WORKERS", kind)
            out[kind] = F.loss_and_grads(params, tokens, cfg)
        assert out["thread"][0] == out["process"][0], name
        for k in params:
            np.testing.assert_array_equal(out["thread"][1][k], out["process"][1][k], err_msg=f"{name} {k}")
    pool = F._POOLS[("process", 1)]
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="worker process died"):
        for _ in range(3):  # the pool notices the death at the next submit or result
            F.loss_and_grads(params, tokens, cfg)
    again = F.loss_and_grads(params, tokens, cfg)
    assert again[0] == out["process"][0]
    F._POOLS.pop(("process", 1)).shutdown(wait=True)  # leave no worker process behind


def test_an_error_in_one_group_is_raised(monkeypatch):
    cfg = config.preset("titans-tiny")
    params = R.init_params(cfg, 0)
    tokens = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    inner = F._loss_and_grads

    def failing(p, t, c):
        if t[0, 0] == 4:  # the second group only
            raise RuntimeError("group failed")
        return inner(p, t, c)

    monkeypatch.setattr(F, "_loss_and_grads", failing)
    monkeypatch.setattr(F, "WORKERS", "thread")
    monkeypatch.setattr(F, "GROUPS", 2)
    monkeypatch.setattr(F, "THREADS", 2)
    with pytest.raises(RuntimeError, match="group failed"):
        F.loss_and_grads(params, tokens, cfg)


def test_in_context_increments_and_frozen_loss_match(rng):
    cfg = config.preset("hope-attention-tiny")
    params = R.init_params(cfg, 5)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 9))
    incf, incr = F.cms_increments(params, tokens, cfg), R.cms_increments(params, tokens, cfg)
    assert set(incf) == set(incr) and incf
    assert any(np.any(v != 0) for v in incr.values())
    for k in incr:
        assert_close(incf[k], incr[k], "float64", "port", k)
    assert_close(F.loss_with_increments(params, tokens, cfg, incr),
                 R.loss_with_increments(params, tokens, cfg, incr), "float64", "port")


@pytest.mark.parametrize("name", ["hope-attention-tiny", "transformer-tiny"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ten_step_adamw_trajectory_agrees(name, dtype):
    """The first 10 training losses (and the final parameters) agree between the backends."""
    cfg = dataclasses.replace(config.preset(name), dtype=dtype)
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 2, 8))[np.arange(10) % 2]
    runs = {}
    for backend, mod in (("reference", R), ("cpu", F)):
        opt = optimizers.make("adamw", lr=1e-2)
        params = R.init_params(cfg, 0)
        state = opt.init(params)
        losses = []
        for step in range(10):
            loss, grads = mod.loss_and_grads(params, data[step], cfg)
            losses.append(loss)
            params, state = opt.update(params, grads, state)
        runs[backend] = (np.array(losses), params)
    assert_close(runs["cpu"][0], runs["reference"][0], dtype, "port", "losses")
    assert runs["reference"][0][-1] < runs["reference"][0][0]
    for k in runs["reference"][1]:
        assert_close(runs["cpu"][1][k], runs["reference"][1][k], dtype, "port", k)


def test_fast_model_api_dispatches_by_device(rng):
    cfg = config.preset("transformer-tiny")
    params = fast_model.init_params(cfg, 1)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, 5))
    loss, grads = fast_model.loss_and_grads(params, tokens, cfg, device="cpu")
    assert_close(loss, R.loss_and_grads(params, tokens, cfg)[0], "float64", "port")
    logits, state = fast_model.forward(params, tokens, cfg, device="cpu")
    assert logits.shape == (1, 5, cfg.vocab_size) and state["pos"] == 5
    if not namespace.cupy_available()[0]:  # no GPU here: a clear error naming what is missing
        with pytest.raises(RuntimeError, match="needs CuPy and a CUDA device"):
            fast_model.loss_and_grads(params, tokens, cfg, device="gpu")
    with pytest.raises(ValueError, match="device must be one of"):
        fast_model.forward(params, tokens, cfg, device="tpu")


def test_bad_input_raises_the_reference_errors():
    cfg = config.preset("transformer-tiny")
    params = R.init_params(cfg, 0)
    with pytest.raises(ValueError, match="tokens must lie in the vocabulary"):
        F.loss_and_grads(params, np.array([[0, 99]]), cfg)
    with pytest.raises(ValueError, match="must have shape"):
        F.forward(params | {"head.W": np.zeros((3, 3))}, np.array([[0, 1]]), cfg)
    with pytest.raises(ValueError, match="T >= 2"):
        F.loss_and_grads(params, np.array([[1]]), cfg)
    with pytest.raises(ValueError, match="state is for a batch"):
        F.forward(params, np.array([[1, 2]]), cfg, F.forward(params, np.array([[1], [2]]), cfg)[1])


@pytest.mark.parametrize("setting, message", [("NL_CPU_GROUPS=0", "NL_CPU_GROUPS='0': must be an integer >= 1"),
                                              ("NL_CPU_THREADS=x", "NL_CPU_THREADS='x': must be an integer >= 0"),
                                              ("NL_CPU_WORKERS=fork", "NL_CPU_WORKERS='fork': must be one of thread")])
def test_a_bad_cpu_setting_is_named_by_the_command_line(setting, message, tmp_path):
    """A bad NL_CPU_* value stops ``nested-learning train`` before it writes anything, with a message
    that names the variable and its choices (no traceback)."""
    import subprocess
    import sys

    name, value = setting.split("=")
    env = dict(os.environ, **{name: value})
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "nlref", "train", "--steps", "1", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not out.exists()


class _CountingLayer:
    """A layer module that counts its ``forward`` calls (everything else is the module's)."""

    def __init__(self, module):
        self._module, self.calls = module, 0

    def __getattr__(self, name):
        return getattr(self._module, name)

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self._module.forward(*args, **kwargs)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_span_reuse_skips_the_layer_reruns_and_computes_the_same_function(dtype):
    """``Ops.reuse_span_layers`` (SPEC.md#fast-cpu): the period-4 level's writes of hope-tiny (periods
    2, 4; processing chunk 2) take their two chunks' layer caches, merged, instead of re-running the
    self-modifying layers; every other layer call is the same. Loss, gradients, increments and the
    logits of a one-call forward agree with the switch off (float64: the rewrite row; the re-run of
    a higher block differs from the merged caches only by the CMS weights' grouping), and a stream
    of calls that starts inside a span (no reusable record) still equals one call."""
    cfg = dataclasses.replace(config.preset("hope-tiny"), dtype=dtype)
    assert [lv.period for lv in cfg.cms_levels][:2] == [2, 4] and cfg.cms_chunk == 2
    params = R.init_params(cfg, 7)
    T = 23
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, size=(2, T))
    counted, out = {}, {}
    for on in (True, False):
        layer = _CountingLayer(F.layer("hope"))
        ops = dataclasses.replace(F.CPU, reuse_span_layers=on, reuse_min_chunk=1,
                                  layer=lambda family, layer=layer: layer)
        out[on] = (R.loss_and_grads(params, tokens, cfg, ops=ops), R.cms_increments(params, tokens, cfg, ops=ops),
                   R.forward(params, tokens, cfg, ops=ops)[0])
        layer.calls = 0
        R.cms_increments(params, tokens, cfg, ops=ops)
        counted[on] = layer.calls
    chunks, span_writes = -(-T // 2), len(range(4, T, 4))  # processing chunks; the period-4 writes (p < T)
    assert counted[True] == cfg.n_layers * chunks
    assert counted[False] == cfg.n_layers * (chunks + span_writes)  # a re-run: one call per block over its span
    layer = _CountingLayer(F.layer("hope"))  # the port's own setting: chunks of 2 tokens are below its minimum
    assert F.CPU.reuse_min_chunk > cfg.cms_chunk
    R.cms_increments(params, tokens, cfg, ops=dataclasses.replace(F.CPU, layer=lambda family, layer=layer: layer))
    assert layer.calls == counted[False]
    row = "rewrite" if dtype == "float64" else "port"
    (loss_on, g_on), inc_on, logits_on = out[True]
    (loss_off, g_off), inc_off, logits_off = out[False]
    assert_close(loss_on, loss_off, dtype, row, "loss")
    _assert_grads_close(g_on, g_off, dtype)
    if dtype == "float64":
        for k in g_off:
            assert_close(g_on[k], g_off[k], dtype, row, k)
    for k in inc_off:
        assert_close(inc_on[k], inc_off[k], dtype, row, k)
    assert_close(logits_on, logits_off, dtype, row, "logits")
    state, pieces = None, []
    for a, b in ((0, 3), (3, 12), (12, T)):  # the second call starts inside the span [0, 4)
        logits, state = F.forward(params, tokens[:, a:b], cfg, state)
        pieces.append(logits)
    assert_close(np.concatenate(pieces, axis=1), logits_off, dtype, "port", "stream")


@pytest.mark.parametrize("periods", [(2, 4, None), (1, 4, 8)])
def test_the_reuse_switches_stop_below_the_minimum_chunk_and_compute_the_same_function(periods):
    """``Ops.reuse_min_chunk`` (SPEC.md#fast-cpu): with processing chunks shorter than it, neither the
    whole-sequence pass (``reuse_layer_caches``) nor a slower level's write (``reuse_span_layers``)
    takes the merged layer caches, so the layers run once per processing chunk, once per slower
    write's span and once over the whole sequence; at or above it they do not re-run. Loss and
    gradients agree either way (float64, the rewrite row), and with the port's own setting."""
    from nlref.reference.config import CMSLevel

    cfg = dataclasses.replace(config.preset("hope-tiny"), dtype="float64",
                              cms_levels=tuple(CMSLevel(hidden=8, period=p, eta=0.05) for p in periods))
    params = R.init_params(cfg, 5)
    T = 17
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, T))
    chunks = -(-T // cfg.cms_chunk)
    slower = sum(len(range(p, T, p)) for p in sorted({p for p in periods if p and p != cfg.cms_chunk}))
    out, calls = {}, {}
    for minimum in (1, cfg.cms_chunk + 1):
        layer = _CountingLayer(F.layer("hope"))
        ops = dataclasses.replace(F.CPU, reuse_min_chunk=minimum, lowest_layer_once=False,
                                  layer=lambda family, layer=layer: layer)  # (block 0 once: the next test)
        out[minimum] = R.loss_and_grads(params, tokens, cfg, ops=ops)
        calls[minimum] = layer.calls
    assert calls[1] == cfg.n_layers * chunks
    assert calls[cfg.cms_chunk + 1] == cfg.n_layers * (chunks + slower + 1)
    reference = R.loss_and_grads(params, tokens, cfg)
    for loss, grads in [*out.values(), F.loss_and_grads(params, tokens, cfg)]:
        assert_close(loss, reference[0], "float64", "rewrite", "loss")
        for k in grads:
            assert_close(grads[k], reference[1][k], "float64", "rewrite", k)


@pytest.mark.parametrize("periods", [(1, 4, 8), (1, 2, 6), (2, 8, None)])
def test_the_training_pass_keeps_factored_writes_in_its_history_as_factors(periods):
    """``model.thin_record`` (``Ops.cms_factored_writes``): in the pass ``loss_and_grads`` runs (a
    ``record`` given) a history record that is no longer an open level chunk's start keeps, for
    each factored level, no weights where it holds the level's write as factors or where the
    level does not write, so the period-1 level's weights are not held per token; the open
    starts keep theirs; the re-runs rebuild the rest (``recorded_weights``; their gradients are
    bitwise, the factored-writes test above). A state ``forward`` returns keeps every weight."""
    from nlref.reference.config import CMSLevel
    from nlref.reference.contract import factored_levels

    cfg = dataclasses.replace(config.preset("hope-tiny"), dtype="float64",
                              cms_levels=tuple(CMSLevel(hidden=8, period=p, eta=0.05) for p in periods))
    params = R.init_params(cfg, 1)
    tokens = R.check_tokens(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 23)), cfg)
    factored = factored_levels(F.CPU, cfg)
    assert factored
    state = R.init_state(params, cfg, 2, ops=F.CPU)
    R.run(F.CPU, params, tokens, cfg, state, record={})
    last = max(range(cfg.cms_chunk, tokens.shape[1], cfg.cms_chunk))  # the last writes (and forgetting)
    starts = R.open_level_starts(cfg, last)
    thinned = 0
    for h in state["history"]:
        if h["start"] >= last:  # recorded after them
            continue
        for i in range(cfg.n_layers):
            for l in factored:
                for n in ("W1", "W2"):
                    w, key = h["cms"][i][f"{l}.{n}"], f"{l}.{n}"
                    if h["start"] in starts:
                        assert isinstance(w, np.ndarray), (h["start"], key)
                    else:
                        assert w is None and h["mem"] is None, (h["start"], key)
                        thinned += 1
                        if h["start"] % cfg.cms_levels[l].period == 0:
                            u, v = h["writes"][i][key]
                            assert u.shape[1] == cfg.cms_levels[l].period
    assert thinned > 0
    _, streamed = F.forward(params, tokens, cfg)
    assert all(isinstance(w, np.ndarray) for h in streamed["history"] for f in h["cms"] for w in f.values())
    assert all("writes" not in h for h in streamed["history"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("periods", [(1, 4, 8), (2, 4, None), (3,)])
def test_lowest_layer_once_runs_block_0s_layer_once_and_computes_the_same_function(dtype, periods):
    """``Ops.lowest_layer_once`` (SPEC.md#fast-cpu): ``loss_and_grads`` calls block 0's layer once, over
    the whole sequence, and every other block's as often as with the switch off (per processing
    chunk, per re-run, the whole-sequence pass); loss and gradients agree with the switch off (the
    rewrite row in float64: the one call and the chain of per-chunk calls split the layer's own
    chunks differently) and with the reference."""
    from nlref.reference.config import CMSLevel
    from nlref.reference.contract import lowest_layer_once

    cfg = dataclasses.replace(config.preset("hope-tiny"), dtype=dtype, n_layers=3,
                              cms_levels=tuple(CMSLevel(hidden=8, period=p, eta=0.05) for p in periods))
    params = R.init_params(cfg, 5)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 21))
    out, calls = {}, {}
    for on in (True, False):
        layer = _CountingLayer(F.layer("hope"))
        ops = dataclasses.replace(F.CPU, lowest_layer_once=on, layer=lambda family, layer=layer: layer)
        assert lowest_layer_once(ops, cfg) == on
        out[on] = R.loss_and_grads(params, tokens, cfg, ops=ops)
        calls[on] = layer.calls
    per_block = calls[False] // cfg.n_layers
    assert calls[False] == cfg.n_layers * per_block and per_block > 2
    assert calls[True] == (cfg.n_layers - 1) * per_block + 1
    reference = R.loss_and_grads(params, tokens, cfg)
    row = "rewrite" if dtype == "float64" else "port"
    for other, name in ((out[False], "off"), (reference, "reference")):
        assert_close(out[True][0], other[0], dtype, row, f"loss vs {name}")
        _assert_grads_close(out[True][1], other[1], dtype)
        if dtype == "float64":
            for k in other[1]:
                assert_close(out[True][1][k], other[1][k], dtype, row, f"{k} vs {name}")


def test_lowest_layer_once_applies_only_to_a_chunk_major_pass_over_a_memory_layer():
    """``contract.lowest_layer_once``: not without ``cms_grads_only`` (a re-run would differentiate
    block 0's layer, whose slices carry no cache), not for attention mixers, not without in-context
    CMS (no chunk-major pass)."""
    from nlref.reference.contract import lowest_layer_once

    hope = config.preset("hope-tiny")
    assert lowest_layer_once(F.CPU, hope) and not lowest_layer_once(R.REFERENCE, hope)
    assert not lowest_layer_once(dataclasses.replace(F.CPU, cms_grads_only=False), hope)
    assert not lowest_layer_once(F.CPU, config.preset("hope-attention-tiny"))
    frozen = dataclasses.replace(hope, cms_in_context=False)
    assert frozen.cms_chunk is None and not lowest_layer_once(F.CPU, frozen)


@pytest.mark.parametrize("name", ["hope-tiny", "hope-attention-tiny"])
@pytest.mark.parametrize("periods", [(1, 4, 8), (1, 3), (2, 4, None)])
def test_factored_writes_keep_factors_and_compute_bitwise_the_same_numbers(name, periods):
    """``Ops.cms_factored_writes`` (SPEC.md#cms "Factored writes"): the levels of ``factored_levels``
    (C^(l) (D + Hm) < D Hm) write with their chunk's factors, and the whole-sequence pass's record
    keeps a ``Replay`` of them whose items are bitwise the weights in force the plain record keeps,
    in fewer bytes; loss, gradients, increments and logits are bitwise those with the switch off."""
    from nlref.reference import cms as RC
    from nlref.reference.config import CMSLevel
    from nlref.reference.contract import factored_levels

    cfg = dataclasses.replace(config.preset(name), dtype="float64",
                              cms_levels=tuple(CMSLevel(hidden=8, period=p, eta=0.05) for p in periods))
    params = R.init_params(cfg, 1)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 19))
    off = dataclasses.replace(F.CPU, cms_factored_writes=False)
    factored = factored_levels(F.CPU, cfg)
    assert factored == {l for l, lv in enumerate(cfg.cms_levels) if lv.period and lv.period * 16 < 64}
    assert factored and not factored_levels(off, cfg)
    checked = R.check_tokens(tokens, cfg)
    on_rec = R.weights_in_force(F.CPU, params, checked, cfg)
    off_rec = R.weights_in_force(off, params, checked, cfg)
    for key, arrays in off_rec.items():
        level = int(key.split(".")[3])
        assert isinstance(on_rec[key], RC.Replay) == (level in factored), key
        assert len(on_rec[key]) == len(arrays)
        for a, b in zip(on_rec[key], arrays, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=key)
        if level in factored:
            kept = sum(f.u.nbytes + f.v.nbytes for f in on_rec[key].writes)
            assert kept < sum(a.nbytes for a in arrays[1:]), key
    for fn in (R.loss_and_grads, R.cms_increments, lambda p, t, c, ops: R.forward(p, t, c, ops=ops)[0]):
        a, b = fn(params, tokens, cfg, ops=F.CPU), fn(params, tokens, cfg, ops=off)
        if isinstance(a, tuple):  # (loss, grads)
            assert a[0] == b[0]
            a, b = a[1], b[1]
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_array_equal(a, b)
