"""nested-learning experiment toy-momentum (issue 17 item 5): the Eq. 53 sweep end to end at the
smoke scale, its verdicts against reference/toy.compare, and the verdict rule itself."""

import json

from click.testing import CliRunner

from nlref.cli import cli
from nlref.experiments import toy_sweep
from nlref.reference import toy


def test_toy_sweep_cli_writes_parseable_outputs(tmp_path):
    res = CliRunner().invoke(cli, ["experiment", "toy-momentum", "--smoke", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    grid = toy_sweep.SCALES["smoke"]
    assert len(data["cells"]) == len(grid["k"]) * len(grid["alpha"]) * len(grid["omega"]) * len(grid["eta"])
    assert sum(data["counts"].values()) == len(data["cells"])
    assert "Answer at this scale" in (tmp_path / "report.md").read_text()
    png = tmp_path / "toy_momentum_sweep.png"
    assert not data["figures"] or png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_toy_sweep_cell_matches_reference_compare(tmp_path, monkeypatch):
    # the sweep's cell at the toy's defaults must give the same steps as toy.compare (catches swapped
    # optimizers, a wrong eta or a dropped delta)
    d = toy.TOY_DEFAULTS
    monkeypatch.setitem(toy_sweep.SCALES, "smoke", {"k": [d["k"]], "alpha": [d["alpha"]], "omega": [d["omega"]],
                                                    "eta": [d["lr"]], "steps": d["steps"]})
    cell = toy_sweep.run(tmp_path, "smoke")["cells"][0]
    rows = toy.compare(steps=d["steps"])
    assert cell["momentum"]["steps"] == rows[0]["steps"]
    assert cell["delta_momentum"]["steps"] == rows[1]["steps"]
    assert cell["verdict"] == toy_sweep.verdict({"steps": rows[0]["steps"]}, {"steps": rows[1]["steps"]})


def test_verdict_rule():
    v = toy_sweep.verdict
    assert v({"steps": 100}, {"steps": 50}) == "delta faster"
    assert v({"steps": 50}, {"steps": 100}) == "momentum faster"
    assert v({"steps": 50}, {"steps": 50}) == "tie"
    assert v({"steps": None}, {"steps": 5}) == "only delta converges"
    assert v({"steps": 5}, {"steps": None}) == "only momentum converges"
    assert v({"steps": None}, {"steps": None}) == "neither"


def test_toy_sweep_refuses_models(tmp_path):
    import pytest

    from nlref.experiments import common

    with pytest.raises(common.ExperimentError):
        toy_sweep.run(tmp_path, "smoke", models=["hope-tiny"])


# ------------------------------------------------------------------------------------------------
# experiment compare (issue 17 item 1)
# ------------------------------------------------------------------------------------------------


def test_compare_smoke_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    res = CliRunner().invoke(cli, ["experiment", "compare", "--smoke", "--seeds", "2", "--backend", "reference",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "parameters (" in res.output  # the parameter counts and their ratio are printed
    data = json.loads((out / "results.json").read_text())
    labels = [m["label"] for m in data["models"]]
    for label in labels:
        losses = [r["heldout_loss"] for r in data["runs"] if r["model"] == label]
        assert len(losses) == 2 and losses[0] != losses[1]  # seeds differ
    assert all(r["train_curve"] for r in data["runs"])
    assert all(m["matched"] == (m["ratio_to_largest"] >= 0.9) for m in data["models"])
    assert "held-out loss" in (out / "report.md").read_text()
    assert not data["figures"] or (out / "loss_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


def _plant_divergence(monkeypatch, hits):
    """Make seed 1 of every model whose label ``hits`` stop as a diverged training run would."""
    from nlref.experiments import common

    real = common.train_phase

    def planted(spec, **kw):
        if hits(spec.label) and kw["seed"] == 1:
            raise common.Diverged(f"{spec.label}, seed 1: step 2: the loss is not finite (planted)")
        return real(spec, **kw)

    monkeypatch.setattr(common, "train_phase", planted)


def test_compare_records_a_diverged_seed_and_goes_on(tmp_path, monkeypatch):
    """A run that stops on a non-finite loss is counted and named, left out of the mean and of the
    paired difference, and the other runs still finish (seen at full scale: hope-small seed 1 NaN)."""
    _plant_divergence(monkeypatch, lambda label: label.startswith("transformer"))
    out = tmp_path / "div"
    res = CliRunner().invoke(cli, ["experiment", "compare", "--smoke", "--seeds", "2", "--backend", "reference",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "DIVERGED" in res.output
    data = json.loads((out / "results.json").read_text())
    label = next(m["label"] for m in data["models"] if m["label"].startswith("transformer"))
    assert data["by_domain"]["python"]["diverged"][label] == 1
    assert data["summary"][label]["n"] == 1 and data["vs_first"][label]["n"] == 1
    bad = [r for r in data["runs"] if r.get("diverged")]
    assert len(bad) == 1 and bad[0]["heldout_loss"] is None and "planted" in bad[0]["diverged"]
    assert "diverged seeds" in (out / "report.md").read_text()


def test_compare_evaluating_on_the_training_split_is_caught(tmp_path, monkeypatch):
    from nlref.experiments import domains

    monkeypatch.setattr(domains, "eval_documents", lambda d: list(d.train))
    res = CliRunner().invoke(cli, ["experiment", "compare", "--smoke", "--seeds", "1", "--backend", "reference",
                                   "--out", str(tmp_path / "bug")])
    assert res.exit_code == 1
    assert "training files" in res.output
    assert not (tmp_path / "bug" / "results.json").exists()


# ------------------------------------------------------------------------------------------------
# experiment ablate (issue 17 item 4)
# ------------------------------------------------------------------------------------------------


def test_ablate_smoke_end_to_end(tmp_path):

    out = tmp_path / "abl"
    res = CliRunner().invoke(cli, ["experiment", "ablate", "--smoke", "--seeds", "2", "--backend", "reference",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data["experiment"] == "ablate"
    cfgs = {m["label"]: m["config"] for m in data["models"]}
    assert cfgs["hope-tiny"]["cms_in_context"] is True
    assert cfgs["hope-tiny:cms_in_context=false"]["cms_in_context"] is False  # the switch reached the model
    assert set(data["vs_first"]) == {"hope-tiny:cms_in_context=false"}
    assert "Not available" not in (out / "report.md").read_text()  # every Table 6 row has its switch now


def test_ablate_report_counts_diverged_seeds_and_calls_nothing_on_one_seed(tmp_path, monkeypatch):
    """Seen at full scale: a Hope variant finished 1 of 3 seeds; its row must say so, and a paired
    difference over one seed is not called (no spread), not 'within the seed noise'."""
    _plant_divergence(monkeypatch, lambda label: label != "hope-tiny")
    out = tmp_path / "abl"
    res = CliRunner().invoke(cli, ["experiment", "ablate", "--smoke", "--seeds", "2", "--backend", "reference",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    variant = "hope-tiny:cms_in_context=false"
    assert data["by_domain"]["python"]["diverged"] == {"hope-tiny": 0, variant: 1}
    assert data["vs_first"][variant]["n"] == 1 and data["vs_first"][variant]["call"] == "one seed: not called"
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith(f"| {variant} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].endswith("(1 of 2 seeds)") and cells[3] == "1" and cells[5] == "one seed: not called", cells


def test_paired_difference_calls():
    from nlref.experiments import common

    assert common.paired_difference([], [])["call"] == "no finite seeds"
    assert common.paired_difference([3.0], [1.0])["call"] == "one seed: not called"
    assert common.paired_difference([3.0, 3.1, 2.9], [1.0, 1.0, 1.0])["call"] == "higher"
    assert common.paired_difference([1.0, 1.0, 1.0], [3.0, 3.1, 2.9])["call"] == "lower"
    assert common.paired_difference([1.0, 2.0, 3.0], [2.0, 1.0, 3.0])["call"] == "within the seed noise"


def test_ablate_defaults_cover_every_switch():
    from nlref.experiments import ablate

    specs = ablate.default_models("quick")
    assert specs[0].overrides == {}
    assert [s.overrides for s in specs[1:]] == [over for _, over, _ in ablate.TABLE6]
    from nlref.reference import config

    base = config.preset("hope-tiny")
    for label, over, _ in ablate.TABLE6:  # each row is a real switch of the model (not a no-op)
        assert over is not None, label
        cfg = config.from_dict({**base.to_dict(), **over})
        assert all(getattr(cfg, k) == v != getattr(base, k) for k, v in over.items()), label
