"""nested-learning experiment optimizers (issue 17 item 6) and --domain on compare / ablate: the
command end to end at its smoke scale, the least-squares optimum checked independently, the lr
sweep never reading held-out data (and a planted sweep that does is caught), and compare / ablate
training and scoring on the given domain's files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nlref.cli import cli
from nlref.experiments import compare
from nlref.experiments import domains as dom
from nlref.experiments import optimizers as opt_exp


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_optimizers_smoke_end_to_end(tmp_path):
    out = tmp_path / "opt"
    res = CliRunner().invoke(cli, ["experiment", "optimizers", "--smoke", "--seeds", "2", "--backend", "reference",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = _results(out)
    names = list(opt_exp.DEFAULT_OPTIMIZERS)
    assert data["optimizers"] == names and data["seeds"] == [0, 1]
    assert opt_exp.SWEEP_SEED not in data["seeds"]
    for task, key in (("lm", "heldout_loss"), ("regression", "log10_relative_gap")):
        runs = data[task]["runs"]
        assert sorted((r["optimizer"], r["seed"]) for r in runs) == sorted((o, s) for o in names for s in (0, 1))
        for o in names:
            sw = data[task]["sweep"][o]
            assert sw["chosen"] in [t["lr"] for t in sw["tried"]]  # the lr is recorded with its sweep
            rows = [r for r in runs if r["optimizer"] == o]
            assert all(r["lr"] == sw["chosen"] for r in rows)
            vals = [r[key] for r in rows]
            if all(v is not None for v in vals):
                assert vals[0] != vals[1]  # seeds differ
        assert set(data[task]["summary"]) == set(names) and set(data[task]["vs_first"]) == set(names[1:])
    assert data["lm"]["model"]["label"] == "transformer-tiny"
    assert data["lm"]["tokens_per_run"] == 3 * 2 * 32
    assert all(r.get("train_curve") for r in data["lm"]["runs"] if not r["diverged"])
    report = (out / "report.md").read_text()
    for text in ("**Question.**", "**Answer at this scale.**", "5,224 parameters", "192 bytes per run",
                 "wall time", "± "):
        assert text in report
    assert not data["figures"] or (out / "optimizers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optimizers_refuses_unknown_optimizer_and_two_models(tmp_path):
    res = CliRunner().invoke(cli, ["experiment", "optimizers", "--smoke", "--optimizer", "lion", "--out",
                                   str(tmp_path / "a")])
    assert res.exit_code == 1 and "lion" in res.output and "adamw" in res.output
    res = CliRunner().invoke(cli, ["experiment", "optimizers", "--smoke", "--model", "transformer-tiny", "--model",
                                   "hope-tiny", "--out", str(tmp_path / "b")])
    assert res.exit_code == 1 and "one --model" in res.output


@pytest.mark.parametrize("seed", [0, 3])
def test_regression_optimum_is_the_optimum(seed):
    sc = opt_exp.SCALES["quick"][1]
    p = opt_exp.problem(seed, sc)
    X, Y = p["X"], p["Y"]
    W_opt = opt_exp.optimum(X, Y)
    W_lstsq = np.linalg.lstsq(X, Y, rcond=None)[0].T  # SVD-based, independent of the normal equations
    assert np.allclose(W_opt, W_lstsq, rtol=1e-9, atol=1e-10)
    g0 = np.linalg.norm(opt_exp.grad(np.zeros_like(W_opt), X, Y))
    assert np.linalg.norm(opt_exp.grad(W_opt, X, Y)) < 1e-10 * g0
    # the curvatures are as documented: eig(X^T X / n) in [1/kappa^2, 1]
    eig = np.linalg.eigvalsh(X.T @ X / sc.n)
    assert eig.min() == pytest.approx(sc.kappa ** -2, rel=1e-8) and eig.max() == pytest.approx(1.0, rel=1e-8)
    # the gap formula equals the difference of losses, and every perturbation raises the loss
    rng = np.random.default_rng(seed)
    l_opt = opt_exp.loss(W_opt, X, Y)
    for scale in (1e-3, 1e-1, 1.0):
        W = W_opt + scale * rng.standard_normal(W_opt.shape)
        assert opt_exp.gap(W, W_opt, X) == pytest.approx(opt_exp.loss(W, X, Y) - l_opt, rel=1e-6)
        assert opt_exp.loss(W, X, Y) > l_opt
    # an optimizer run reports that gap: plain gradient descent converges to it
    r = opt_exp.regression_run("sgd", 1.0, seed, sc)
    assert not r["diverged"] and r["gap"] < r["initial_gap"]
    assert r["optimum_loss"] == pytest.approx(l_opt)


def test_sweep_extends_past_a_winning_end_and_skips_divergence():
    calls = []

    def score(lr):  # best at 1e-2; diverges above 0.5
        calls.append(lr)
        return math.inf if lr > 0.5 else abs(math.log10(lr) + 2)

    s = opt_exp.sweep([1e-4, 3e-4], score, extend=10)
    assert s["chosen"] == pytest.approx(1e-2) and not s["at_edge"]
    assert calls[:2] == [1e-4, 3e-4] and len(calls) == 6  # 1e-3, 3e-3, 1e-2, 3e-2: stops past the best
    s = opt_exp.sweep([1.0, 3.0], score, extend=1)  # all diverge: one value below
    assert s["chosen"] == pytest.approx(0.3) and s["at_edge"]
    assert opt_exp.sweep([1.0], score, extend=0)["chosen"] is None


def _guard_heldout(monkeypatch):
    """Make every read of held-out data raise while an lr sweep runs; count the reads after it."""
    state = {"sweeping": False, "heldout_reads": 0}
    real_sweep, real_read = opt_exp.sweep_lm, dom.Domain.read

    def sweep_lm(*a, **k):
        state["sweeping"] = True
        try:
            return real_sweep(*a, **k)
        finally:
            state["sweeping"] = False

    def read(self, name):
        if name in self.held_out:
            if state["sweeping"]:
                raise AssertionError(f"the lr sweep read the held-out file {name}")
            state["heldout_reads"] += 1
        return real_read(self, name)

    monkeypatch.setattr(opt_exp, "sweep_lm", sweep_lm)
    monkeypatch.setattr(dom.Domain, "read", read)
    return state


def test_lr_sweep_never_reads_heldout_data(tmp_path, monkeypatch):
    state = _guard_heldout(monkeypatch)
    real = compare.heldout_loss

    def heldout_loss(*a, **k):
        assert not state["sweeping"], "the lr sweep scored held-out data"
        return real(*a, **k)

    monkeypatch.setattr(compare, "heldout_loss", heldout_loss)
    data = opt_exp.run(tmp_path / "ok", scale_name="smoke", n_seeds=1, backend="reference",
                       optimizers=("adamw", "m3"), echo=lambda _m: None)
    assert state["heldout_reads"] > 0  # the held-out files were read, after the sweeps
    assert all(r["heldout_loss"] is not None for r in data["lm"]["runs"])

    # a planted bug: a sweep that picks the lr on held-out windows is caught
    def leaky(run_dir, steps):
        domain = compare.pick_domains()[0]
        compare.heldout_windows(domain, 32, 4)
        return 0.0

    monkeypatch.setattr(opt_exp, "_sweep_criterion", leaky)
    with pytest.raises(AssertionError, match="held-out file"):
        opt_exp.run(tmp_path / "bug", scale_name="smoke", n_seeds=1, backend="reference", optimizers=("adamw",),
                    echo=lambda _m: None)


# ------------------------------------------------------------------------------------------------
# --domain NAME=PATH on compare and ablate
# ------------------------------------------------------------------------------------------------


def _text_domain(root: Path, tag: str, n: int = 12) -> Path:
    rng = np.random.default_rng(len(tag))
    words = [f"{tag}{w}" for w in ("alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta")]
    root.mkdir(parents=True)
    for i in range(n):
        body = " ".join(rng.choice(words, size=400)) + f"\nfile {i}\n"
        (root / f"{tag}_{i:02d}.txt").write_text(body)
    return root


def _check_domain_run(out: Path, data: dict, name: str, src: Path):
    info = next(d for d in data["domains"] if d["name"] == name)
    train, held = set(info["train"]["files"]), set(info["held_out"]["files"])
    assert train and held and not train & held
    assert train | held == {p.name for p in src.iterdir()}
    assert str(src) in info["source"]
    rows = [r for r in data["runs"] if r["domain"] == name]
    assert rows and all(r["heldout_files"] and set(r["heldout_files"]) <= held for r in rows)
    # the models trained on exactly the domain's training files
    linked = {p.name for p in (out / "data" / name / "train").iterdir() if p.name != ".complete"}
    assert linked == train
    assert all((out / "data" / name / "train" / f).resolve().parent == src.resolve() for f in linked)
    run_data = json.loads(next((out / "runs" / name).rglob("data.json")).read_text())
    assert str(out / "data" / name / "train") in json.dumps(run_data)


def test_compare_domain_uses_the_given_files(tmp_path):
    a = _text_domain(tmp_path / "notes", "n")
    b = _text_domain(tmp_path / "logs", "l")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(cli, ["experiment", "compare", "--smoke", "--seeds", "1", "--backend", "reference",
                                   "--model", "transformer-tiny", "--domain", f"notes={a}", "--domain", f"logs={b}",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = _results(out)
    assert [d["name"] for d in data["domains"]] == ["notes", "logs"]  # instead of python
    assert data["domain"]["name"] == "notes" and set(data["by_domain"]) == {"notes", "logs"}
    for name, src in (("notes", a), ("logs", b)):
        _check_domain_run(out, data, name, src)
    report = (out / "report.md").read_text()
    assert "the notes domain" in report and "the logs domain" in report and "python" not in report
    assert "## domain notes" in report and str(a) in report


def test_compare_default_is_still_the_python_domain(tmp_path):
    out = tmp_path / "cmp"
    res = CliRunner().invoke(cli, ["experiment", "compare", "--smoke", "--seeds", "1", "--backend", "reference",
                                   "--model", "transformer-tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = _results(out)
    assert [d["name"] for d in data["domains"]] == ["python"] and "the python domain" in (out / "report.md").read_text()


def test_ablate_domain_names_it(tmp_path):
    a = _text_domain(tmp_path / "notes", "n")
    out = tmp_path / "abl"
    res = CliRunner().invoke(cli, ["experiment", "ablate", "--smoke", "--seeds", "1", "--backend", "reference",
                                   "--domain", f"notes={a}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = _results(out)
    assert data["experiment"] == "ablate" and [d["name"] for d in data["domains"]] == ["notes"]
    _check_domain_run(out, data, "notes", a)
    assert "the notes domain" in (out / "report.md").read_text()


def test_domain_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["experiment", "compare", "--smoke", "--domain", "nopath", "--out",
                                   str(tmp_path / "x")])
    assert res.exit_code == 1 and "NAME=PATH" in res.output
