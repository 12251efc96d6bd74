"""Data-parallel training over MPI (SPEC.md#distributed): the split, the fused all-reduce, N-rank runs.

The tests that launch ranks run ``mpiexec -n N`` on localhost with tiny presets (seconds); they
are skipped, with the reason, where mpi4py or an ``mpiexec`` is missing (``pip install -e
".[test]"`` brings both: pyproject.toml's ``mpi`` extra is part of the test extra).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from nlref import checkpoint, distributed, training

# ------------------------------------------------------------------------------------------------
# Without MPI: the split, the world, the settings
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,N", [(5, 2), (5, 3), (7, 4), (4, 4), (9, 1), (3, 2)])
def test_shares_cover_the_batch_larger_first_like_the_cpu_batch_groups(B, N):
    sl = distributed.shares(B, N)
    sizes = [s.stop - s.start for s in sl]
    assert sl[0].start == 0 and sl[-1].stop == B
    assert all(a.stop == b.start for a, b in zip(sl, sl[1:], strict=False))
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True) and min(sizes) >= 1
    # the weights B_r / B sum to one: the weighted sum of the ranks' mean losses is the batch's mean
    assert sum(n / B for n in sizes) == pytest.approx(1.0, abs=1e-15)


def test_shares_refuse_a_batch_smaller_than_the_world():
    with pytest.raises(distributed.DistributedError, match=r"batch of 2 sequences cannot be split over 3 ranks.*--batch-size 3"):
        distributed.shares(2, 3)


def test_the_weighted_shares_give_the_full_batch_gradient_in_one_process():
    """The identity the all-reduce relies on, on the reference in float64: sum_r (B_r / B) grad_r
    equals the full batch's mean-loss gradient to round-off (uneven shares 3 + 2)."""
    from nlref import backends, config

    mc = config.from_dict({**config.preset("transformer-tiny").to_dict(), "vocab_size": 256, "dtype": "float64"})
    be = backends.get("reference")
    params = be.model.init_params(mc, seed=0)
    tokens = np.random.default_rng(1).integers(0, 256, (5, 13))
    loss, grads = be.loss_and_grads(params, tokens, mc)
    acc_loss, acc = 0.0, {k: 0.0 for k in grads}
    for s in distributed.shares(5, 2):
        part_loss, part = be.loss_and_grads(params, tokens[s], mc)
        w = (s.stop - s.start) / 5
        acc_loss += w * part_loss
        acc = {k: acc[k] + w * part[k] for k in grads}
    assert acc_loss == pytest.approx(loss, rel=1e-14)
    for k in grads:
        np.testing.assert_allclose(acc[k], grads[k], rtol=1e-11, atol=1e-14)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_ENV and k != "NL_MPI"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=60)


def test_without_a_launcher_the_world_is_one_rank_and_mpi4py_is_not_imported():
    r = _python("import sys; from nlref import distributed as d; w = d.world(); "
                "print(w.rank, w.size, 'mpi4py' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "1", "False"]


def test_under_a_launcher_without_mpi4py_the_error_says_what_to_install():
    code = ("import sys; sys.modules['mpi4py'] = None\nfrom nlref import distributed as d\n"
            "try:\n    d.world()\nexcept d.DistributedError as e:\n    print(e)\n")
    r = _python(code, PMI_SIZE="2", PMI_RANK="0")
    assert r.returncode == 0, r.stderr
    assert "mpi4py cannot be imported" in r.stdout and "nested-learning-reference[mpi]" in r.stdout
    one = _python("import sys; sys.modules['mpi4py'] = None\nfrom nlref import distributed as d\n"
                  "print(d.world().size)", PMI_SIZE="1", PMI_RANK="0")
    assert one.stdout.strip() == "1", one.stderr  # mpiexec -n 1 without mpi4py: the plain run


@pytest.mark.parametrize("name,value,match", [("NL_MPI", "yes", "NL_MPI='yes': must be auto, on or off"),
                                              ("NL_MPI_REDUCE", "tree", "must be one of sum, ordered"),
                                              ("NL_MPI_CUDA_AWARE", "true", "must be 0 or 1"),
                                              ("NL_MPI_TIMEOUT", "-1", "must be a number of seconds >= 0")])
def test_bad_settings_name_the_variable_and_the_choices(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    fn = {"NL_MPI": distributed.mpi_setting, "NL_MPI_REDUCE": distributed.reduce_mode,
          "NL_MPI_CUDA_AWARE": distributed.cuda_aware, "NL_MPI_TIMEOUT": distributed.timeout_s}[name]
    with pytest.raises(distributed.DistributedError, match=match):
        fn()


def test_one_rank_loss_and_grads_is_the_backends_own_call():
    calls = []

    class Be:
        def loss_and_grads(self, params, tokens, mc):
            calls.append(tokens)
            return 1.5, {"w": np.ones(2)}

    tokens = np.zeros((3, 5), dtype=np.int64)
    loss, grads = distributed.loss_and_grads(Be(), None, tokens, None, w=distributed.World(0, 1))
    assert loss == 1.5 and calls[0] is tokens  # no copy, no reduction


def test_the_layout_of_one_process_names_the_cpu_groups():
    line = distributed.layout(distributed.World(0, 1), "cpu")
    assert line.startswith("1 process") and "1 rank x NL_CPU_GROUPS=" in line


# ------------------------------------------------------------------------------------------------
# With MPI: mpiexec -n N on localhost
# ------------------------------------------------------------------------------------------------


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    if _mpiexec() is None:
        return "no mpiexec on PATH or beside the interpreter (pip install -e '.[mpi]' brings MPICH's)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=_mpi_missing() or "")


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_ENV}
    env.update({"NL_CPU_WORKERS": "thread", "TMPDIR": str(tmp_path / "tmp"), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def mpirun(n: int, args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_mpiexec(), "-n", str(n), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


GRADS_SCRIPT = textwrap.dedent("""
    import os
    import sys
    import time
    import numpy as np
    from nlref import backends, config, distributed
    preset, backend, dtype, B, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    mc = config.from_dict({**config.preset(preset).to_dict(), "vocab_size": 256, "dtype": dtype})
    be = backends.get(backend)
    params = be.model.init_params(mc, seed=0)
    w = distributed.world()
    seed = 1 + (w.rank if "NL_TEST_OTHER_BATCH" in os.environ else 0)  # a rank that drew another batch
    tokens = np.random.default_rng(seed).integers(0, 256, (B, 13))
    if w.rank == 1 and "NL_TEST_HANG" in os.environ:  # a rank that never joins the all-reduce
        import time
        time.sleep(60)
    try:
        loss, grads = distributed.loss_and_grads(be, params, tokens, mc)
    except distributed.DistributedError as exc:
        print(f"rank {w.rank}: {exc}", flush=True)
        if "NL_TEST_HANG" in os.environ:
            time.sleep(distributed.ABORT_FLUSH_S)  # as distributed._fail: let the launcher relay the line
            w.comm.Abort(3)  # as distributed.train does: the other rank never comes
        sys.exit(3)
    stop = distributed.any_rank(w.rank == w.size - 1)  # only the last rank asks: every rank agrees
    assert stop is True and distributed.any_rank(False) is False
    rows, weight = distributed.local_batch(tokens)
    assert rows.shape[0] == round(weight * B)
    every = w.comm.gather((loss, grads), root=0) if w.size > 1 else [(loss, grads)]
    if w.is_root:
        for other_loss, other in every[1:]:  # every rank steps the optimizer with the same numbers
            assert other_loss == loss and all(np.array_equal(other[k], grads[k]) for k in grads)
        np.savez(out, loss=np.float64(loss), **grads)
""")


def _grads(tmp_path, n, preset, backend, dtype, B, **env):
    script = tmp_path / "grads.py"
    script.write_text(GRADS_SCRIPT)
    out = tmp_path / f"g-{n}-{backend}-{dtype}-{'-'.join(f'{k}{v}' for k, v in env.items())}.npz"
    r = mpirun(n, [sys.executable, str(script), preset, backend, dtype, str(B), str(out)], _env(tmp_path, **env))
    assert r.returncode == 0, r.stdout + r.stderr
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@needs_mpi
def test_gradients_on_1_2_3_ranks_equal_the_full_batch_to_round_off(tmp_path):
    """The reference in float64, B = 5 (shares 5; 3 + 2; 2 + 2 + 1): the all-reduced gradient is the
    one-process full-batch gradient to float64 round-off; on 1 rank it is that call bitwise."""
    from nlref import backends, config

    mc = config.from_dict({**config.preset("transformer-tiny").to_dict(), "vocab_size": 256, "dtype": "float64"})
    be = backends.get("reference")
    loss, grads = be.loss_and_grads(be.model.init_params(mc, seed=0),
                                    np.random.default_rng(1).integers(0, 256, (5, 13)), mc)
    for n in (1, 2, 3):
        got = _grads(tmp_path, n, "transformer-tiny", "reference", "float64", 5)
        worst = max(_rel(got[k], grads[k]) for k in grads)
        if n == 1:
            assert float(got["loss"]) == loss and worst == 0.0
        assert abs(float(got["loss"]) - loss) <= 1e-14 * abs(loss), n
        assert worst <= 1e-12, (n, worst)  # measured 4e-16 .. 3e-15


@needs_mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_ranks_are_bitwise_the_cpu_port_with_two_batch_groups(tmp_path, dtype):
    """The CPU port, B = 5: 2 ranks of one group each (MPI_SUM of two terms: no order to differ)
    equal one process with NL_CPU_GROUPS=2 bit for bit (both sum (3/5) g_0 + (2/5) g_1)."""
    one = _grads(tmp_path, 1, "hope-tiny", "cpu", dtype, 5, NL_CPU_GROUPS="2")
    two = _grads(tmp_path, 2, "hope-tiny", "cpu", dtype, 5, NL_CPU_GROUPS="1")
    assert one.keys() == two.keys()
    for k in one:
        assert one[k].dtype == two[k].dtype and np.array_equal(one[k], two[k]), k


@needs_mpi
def test_three_ranks_in_the_fixed_order_are_bitwise_three_batch_groups(tmp_path):
    """NL_MPI_REDUCE=ordered sums the shares in rank order on rank 0: 3 ranks (2 + 2 + 1) equal one
    process with NL_CPU_GROUPS=3 bit for bit; MPI_SUM (the default) equals it to round-off."""
    one = _grads(tmp_path, 1, "hope-tiny", "cpu", "float64", 5, NL_CPU_GROUPS="3")
    ordered = _grads(tmp_path, 3, "hope-tiny", "cpu", "float64", 5, NL_CPU_GROUPS="1", NL_MPI_REDUCE="ordered")
    summed = _grads(tmp_path, 3, "hope-tiny", "cpu", "float64", 5, NL_CPU_GROUPS="1", NL_MPI_REDUCE="sum")
    for k in one:
        assert np.array_equal(one[k], ordered[k]), k
        assert _rel(summed[k], one[k]) <= 1e-12, k


@needs_mpi
def test_ranks_compose_with_the_cpu_ports_batch_groups(tmp_path):
    """2 ranks x 2 groups on threads (shares 3 + 2, then 2 + 1 and 1 + 1) = the one-process gradient
    to float64 round-off."""
    one = _grads(tmp_path, 1, "hope-tiny", "cpu", "float64", 5, NL_CPU_GROUPS="2")
    both = _grads(tmp_path, 2, "hope-tiny", "cpu", "float64", 5, NL_CPU_GROUPS="2", NL_CPU_THREADS="2")
    for k in one:
        assert _rel(both[k], one[k]) <= 1e-12, k


@needs_mpi
def test_ranks_that_drew_different_batches_stop_at_the_first_step(tmp_path):
    script = tmp_path / "grads.py"
    script.write_text(GRADS_SCRIPT)
    r = mpirun(2, [sys.executable, str(script), "transformer-tiny", "reference", "float32", "4",
                   str(tmp_path / "x.npz")], _env(tmp_path, NL_TEST_OTHER_BATCH="1"))
    assert r.returncode != 0
    assert r.stdout.count("the ranks drew different batches") == 2, r.stdout + r.stderr  # both ranks know
    assert not (tmp_path / "x.npz").exists()


@needs_mpi
def test_a_rank_that_never_joins_the_all_reduce_stops_the_run_after_the_timeout(tmp_path):
    script = tmp_path / "grads.py"
    script.write_text(GRADS_SCRIPT)
    t0 = time.perf_counter()
    r = mpirun(2, [sys.executable, str(script), "transformer-tiny", "reference", "float64", "4",
                   str(tmp_path / "x.npz")], _env(tmp_path, NL_TEST_HANG="1", NL_MPI_TIMEOUT="2"), timeout=50)
    assert r.returncode != 0, r.stdout + r.stderr
    # "waited 2 s" (3 on a loaded machine: the first poll after the limit may come late)
    assert re.search(r"rank 0 of 2 waited [23] s in the all-reduce", r.stdout) and "--resume RUN_DIR" in r.stdout, (
        f"stdout: {r.stdout!r}\nstderr: {r.stderr[-3000:]}")
    assert time.perf_counter() - t0 < 40  # not the 60 s the other rank sleeps


@needs_mpi
def test_the_gpu_ports_code_on_2_ranks_equals_1_rank(tmp_path):
    """The GPU port's code path (NL_GPU_NAMESPACE=numpy: its code over NumPy) through the fused
    all-reduce: 2 ranks (3 + 2) = 1 rank to float64 round-off."""
    one = _grads(tmp_path, 1, "transformer-tiny", "gpu", "float64", 5, NL_GPU_NAMESPACE="numpy")
    two = _grads(tmp_path, 2, "transformer-tiny", "gpu", "float64", 5, NL_GPU_NAMESPACE="numpy")
    for k in one:
        assert _rel(two[k], one[k]) <= 1e-12, k


def _corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    words = "the memory learns to compress its context into weights while the optimizer learns".split()
    for i in range(4):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=400)))
    return d


def _train_args(corpus, out, steps, **kw):
    """A tiny run whose learning rate is constant (min_lr_ratio 1, no warmup), so that a run cut
    short and resumed with more steps follows the uninterrupted run's trajectory."""
    config = corpus.parent / "constant-lr.toml"
    config.write_text("min_lr_ratio = 1.0\nwarmup_steps = 0\n")
    args = ["--config", str(config), "--preset", "transformer-tiny", "--backend", "reference", "--dtype", "float64", "--data", str(corpus),
            "--steps", str(steps), "--batch-size", "5", "--seq-len", "16", "--checkpoint-every", "2",
            "--eval-every", "0", "--log-every", "1"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return ["nested-learning", "train", *args] + (["--out", str(out)] if out is not None else [])


def _losses(run_dir):
    return [r["loss"] for r in training.read_metrics(run_dir) if "loss" in r]


@needs_mpi
def test_a_run_on_2_ranks_is_the_one_process_run_and_resumes_on_3_and_on_1(tmp_path):
    """The CLI end to end: the losses on 2 ranks equal one process's to round-off; rank 0 alone
    writes the run directory (the other rank's scratch is gone); the checkpoint written on 2 ranks
    resumes on 3 ranks, then on 1, and the whole trajectory stays the uninterrupted one's."""
    corpus = _corpus(tmp_path)
    env = _env(tmp_path)
    plain = subprocess.run(_train_args(corpus, tmp_path / "one", 6), capture_output=True, text=True, env=env,
                           timeout=120)
    assert plain.returncode == 0, plain.stderr
    r = mpirun(2, _train_args(corpus, tmp_path / "two", 4), env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("done:") == 1 and "2 MPI ranks" in r.stdout and "splits 3+2" in r.stdout
    assert sorted(os.listdir(tmp_path / "tmp")) == []  # the follower's scratch directory is removed
    ref = _losses(tmp_path / "one")
    two = _losses(tmp_path / "two")
    assert len(two) == 4 and max(abs(a - b) for a, b in zip(two, ref, strict=False)) <= 1e-12
    assert checkpoint.load_checkpoint(tmp_path / "two" / training.CHECKPOINT_NAME).step == 4
    r = mpirun(3, ["nested-learning", "train", "--resume", str(tmp_path / "two"), "--steps", "5"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming" in r.stdout and "splits 2+2+1" in r.stdout
    r = subprocess.run(["nested-learning", "train", "--resume", str(tmp_path / "two"), "--steps", "6"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    got = _losses(tmp_path / "two")
    assert len(got) == 6 and max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-12
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 6


@needs_mpi
def test_gradient_accumulation_on_2_ranks_is_the_one_process_batch(tmp_path):
    """--grad-accum 2 on 2 ranks (each rank's share in micro-batches, one all-reduce per step)
    equals one process's run of the whole batch to round-off."""
    corpus = _corpus(tmp_path)
    env = _env(tmp_path)
    plain = subprocess.run(_train_args(corpus, tmp_path / "one", 3, batch_size=8), capture_output=True, text=True,
                           env=env, timeout=120)
    assert plain.returncode == 0, plain.stderr
    r = mpirun(2, _train_args(corpus, tmp_path / "acc", 3, batch_size=4, grad_accum=2), env)
    assert r.returncode == 0, r.stdout + r.stderr
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "acc")
    assert len(got) == 3 and max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-12


SIGINT_CHILD = textwrap.dedent("""
    import os, runpy, signal, sys
    from nlref import distributed
    from nlref.reference import model as m
    f, calls = m.loss_and_grads, []
    def at_step(*a):
        calls.append(1)
        if len(calls) == 3 and distributed.world().rank == 1:  # only rank 1 gets the Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return f(*a)
    m.loss_and_grads = at_step
    sys.argv = ['nested-learning'] + sys.argv[1:]
    runpy.run_module('nlref', run_name='__main__')
""")


@needs_mpi
def test_a_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    corpus = _corpus(tmp_path)
    env = _env(tmp_path)
    script = tmp_path / "child.py"
    script.write_text(SIGINT_CHILD)
    args = _train_args(corpus, tmp_path / "cut", 8)[1:]
    r = mpirun(2, [sys.executable, str(script), *args], env)
    assert r.returncode == 130, r.stdout + r.stderr
    assert r.stderr.count("at step 3/8") == 1, r.stderr  # rank 0 reports; the ranks agreed on step 3
    assert checkpoint.load_checkpoint(tmp_path / "cut" / training.CHECKPOINT_NAME).step == 3
    r = mpirun(2, ["nested-learning", "train", "--resume", str(tmp_path / "cut")], env)
    assert r.returncode == 0, r.stdout + r.stderr
    plain = subprocess.run(_train_args(corpus, tmp_path / "one", 8), capture_output=True, text=True, env=env,
                           timeout=120)
    assert plain.returncode == 0, plain.stderr
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "cut")
    assert len(got) == 8 and max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-12


@needs_mpi
def test_an_error_every_rank_meets_is_reported_once_and_ends_the_job(tmp_path):
    env = _env(tmp_path)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "config.toml").write_text("steps = 1\n")
    t0 = time.perf_counter()
    r = mpirun(2, _train_args(_corpus(tmp_path), occupied, 3), env)
    assert r.returncode != 0
    assert (r.stdout + r.stderr).count("already holds a run") == 1, r.stderr  # rank 0's, once
    assert time.perf_counter() - t0 < distributed.FOLLOWER_GRACE_S + 30
    small = mpirun(2, _train_args(_corpus(tmp_path), tmp_path / "small", 3, batch_size=1), env)
    assert small.returncode != 0 and "cannot be split over 2 ranks" in small.stderr
    assert not (tmp_path / "small").exists()  # refused before anything was written


def _rank_pid(mark: str, rank: int) -> int | None:
    """The pid of the process whose environment holds NL_TEST_MARK=mark and PMI_RANK=rank."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"NL_TEST_MARK={mark}".encode() in env and f"PMI_RANK={rank}".encode() in env:
            return int(p.name)
    return None


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid through /proc")
def test_kill_9_of_one_rank_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    mark = uuid.uuid4().hex
    env = _env(tmp_path, NL_TEST_MARK=mark)
    out = tmp_path / "run"
    proc = subprocess.Popen([_mpiexec(), "-n", "2", *_train_args(_corpus(tmp_path), out, 100000)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 60
        while not (out / training.CHECKPOINT_NAME).exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (out / training.CHECKPOINT_NAME).exists(), "no checkpoint within 60 s"
        pid = _rank_pid(mark, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)  # the launcher ends the other rank
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "signal 9" in output or "Killed" in output, output[-2000:]
    ck = checkpoint.load_checkpoint(out / training.CHECKPOINT_NAME)  # whole and loadable
    assert ck.step >= 2 and ck.step % 2 == 0
    assert _rank_pid(mark, 0) is None  # no rank left running
    r = subprocess.run(["nested-learning", "train", "--resume", str(out), "--steps", str(ck.step + 1)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr  # the lock died with rank 0; the run goes on from the checkpoint
    assert f"resuming {out} at step {ck.step}" in r.stdout


@needs_mpi
def test_info_shows_the_layout_once(tmp_path):
    r = mpirun(2, ["nested-learning", "info"], _env(tmp_path))
    assert r.returncode == 0, r.stderr
    layout = [ln for ln in r.stdout.splitlines() if ln.startswith("layout:")]
    assert len(layout) == 1 and "2 MPI ranks" in layout[0] and "2 ranks on" in layout[0]
    assert r.stdout.count("nested-learning ") == 1  # the other rank prints nothing


def test_the_planning_table_counts_every_gradient_entry():
    from nlref import bench_mpi, config
    from nlref.reference import model

    lines = []
    rows = bench_mpi.plan(["hope-small"], echo=lines.append)
    n = sum(int(np.prod(s)) for s in model.param_shapes(config.preset("hope-small")).values())
    assert rows[0]["grad_bytes"] == 4 * n
    assert rows[0]["ring_allreduce_s"][1] == pytest.approx(2 * 4 * n / 1.25e9)  # 10 GbE
    assert "hope-small" in lines[1] and "10 GbE" in lines[0]


@needs_mpi
def test_the_benchmark_runs_its_rank_counts_side_by_side(tmp_path, monkeypatch):
    """A smoke run (no timing is asserted): one mpiexec per rank count, one row each."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("NL_CPU_WORKERS", "thread")
    from nlref import bench_mpi

    lines = []
    rows = bench_mpi.run(ranks=(1, 2), preset="transformer-tiny", backend="reference", batch_size=3, seq_len=8,
                         steps=1, echo=lines.append)
    assert [r["ranks"] for r in rows] == [1, 2]
    assert rows[0]["allreduce_s"] < 1e-3  # one rank reduces nothing
    assert rows[1]["grad_bytes"] == rows[0]["grad_bytes"] > 0
    assert any(ln.split()[:1] == ["2"] for ln in lines) and "shared by the ranks" in lines[0]
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        bench_mpi.run(ranks=(4,), batch_size=2, echo=lines.append)


def test_bench_mpi_plan_from_the_command_line():
    from click.testing import CliRunner

    from nlref.cli import cli

    r = CliRunner().invoke(cli, ["bench-mpi", "--plan"])
    assert r.exit_code == 0, r.output
    assert "hope-medium" in r.output and "ring all-reduce" in r.output
