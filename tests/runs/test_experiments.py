"""nested-learning experiment continual / recall (issue 17): end to end at the smoke scale on the
built-in domains, the run-time held-out check against a planted bug, and the task generators."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from nlref.cli import cli
from nlref.experiments import domains, recall, tasks


def _invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


# ------------------------------------------------------------------------------------------------
# continual
# ------------------------------------------------------------------------------------------------


def test_continual_end_to_end(tmp_path):
    out = tmp_path / "cont"
    res = _invoke(["experiment", "continual", "--smoke", "--seeds", "2", "--backend", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    names = r["domain_order"]
    assert len(names) >= 3 and set(names) >= {"python", "c-headers", "licenses"}
    for d in r["domains"]:  # split by file, recorded, disjoint
        assert d["train"]["files"] and d["held_out"]["files"]
        assert not set(d["train"]["files"]) & set(d["held_out"]["files"])
    assert len(r["runs"]) == 2 * len(r["models"])
    for run in r["runs"]:
        assert len(run["matrix"]) == len(names) and all(len(row) == len(names) for row in run["matrix"])
        assert len(run["initial"]) == len(names)
        assert all(np.isfinite(run["matrix"]).ravel())
        assert set(run["test_time"]["per_domain"]) == set(names)
    by_model = {}
    for run in r["runs"]:
        by_model.setdefault(run["model"], []).append(run["matrix"])
    for mats in by_model.values():  # the seeds differ
        assert mats[0] != mats[1]
    report = (out / "report.md").read_text()
    assert "**Question.**" in report and "## Answer at this scale" in report and "Wall time" in report
    for f in r["figures"]:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(r["figures"]) == len(r["models"])


def test_evaluating_on_the_training_split_is_caught(tmp_path, monkeypatch):
    """A planted bug: the evaluation reads the training files. The run-time check stops the run."""
    monkeypatch.setattr(domains, "eval_documents", lambda d: list(d.train))
    res = _invoke(["experiment", "continual", "--smoke", "--seeds", "1", "--backend", "cpu", "--out",
                   str(tmp_path / "bug")])
    assert res.exit_code == 1
    assert "training files" in res.output
    assert not (tmp_path / "bug" / "results.json").exists()


def test_user_domains_and_duplicates(tmp_path):
    src = tmp_path / "mine"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}.txt").write_text(f"document {i}\n" * 50)
    (src / "copy.txt").write_text("document 0\n" * 50)  # same bytes as f0.txt
    d = domains.user_domain(f"mine={src}")
    assert d.duplicates_dropped == 1 and len(d.files) == 6
    assert not set(d.train) & set(d.held_out) and d.held_out
    domains.check_disjoint(d, d.held_out)
    with pytest.raises(domains.ExperimentError, match="training files"):
        domains.check_disjoint(d, d.train[:1])
    with pytest.raises(domains.ExperimentError, match="NAME=PATH"):
        domains.user_domain(str(src))


# ------------------------------------------------------------------------------------------------
# recall
# ------------------------------------------------------------------------------------------------


def test_recall_end_to_end(tmp_path):
    out = tmp_path / "rec"
    res = _invoke(["experiment", "recall", "--smoke", "--seeds", "2", "--backend", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert set(r["summary"]) == {"passkey", "mqar"}
    lengths = [str(L) for L in r["settings"]["lengths"]]
    for per_model in r["summary"].values():
        for per_len in per_model.values():
            assert list(per_len) == lengths
            for L in lengths:
                assert 0.0 <= per_len[L]["exact"]["mean"] <= 1.0
    losses = {}
    for run in r["runs"]:
        losses.setdefault((run["task"], run["model"]), []).append(run["final_train_loss"])
    assert all(a != b for a, b in losses.values())  # the seeds differ
    assert {f for f in r["figures"]} == {"recall-passkey.png", "recall-mqar.png"}
    assert "**Question.**" in (out / "report.md").read_text()


def test_training_windows_are_whole_examples(tmp_path):
    from nlref import data

    recall.write_training_data("passkey", 0, 10, 40, tmp_path)
    corpus = data.load_corpus(str(tmp_path))
    stream = corpus.train.stream
    assert stream.shape[0] % 40 == 0
    for w in stream.reshape(-1, 40):  # every window ends with its own query and answer
        text = bytes(w.tolist())
        key = text[-5:]
        assert text[-10:-5] == b"#key=" and text.count(b"#key=" + key + b"#") == 1


# ------------------------------------------------------------------------------------------------
# generators
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [22, 64, 257, 4096])
def test_passkey_answer_is_in_the_context(length):
    rng = np.random.default_rng(length)
    for _ in range(20):
        e = tasks.passkey(rng, length)
        t = e.text
        assert len(t) == length
        (a, b), (s, f) = e.answer_spans[0], e.needle_spans[0]
        assert b == length and t[a:b] == t[s:f] and t[a:b].isdigit()
        assert t[s - 5:s] == b"#key=" and t[f:f + 1] == b"#" and t[a - 5:a] == b"#key="
        context = t[:a]
        assert sum(c.isdigit() for c in context.decode()) == 5  # the needle is the only place of the answer
        assert context.count(b"#") == 3


@pytest.mark.parametrize("length", [13, 64, 256, 5000])
def test_mqar_answers_are_in_the_context(length):
    rng = np.random.default_rng(length)
    for _ in range(10):
        e = tasks.mqar(rng, length)
        t = e.text
        assert len(t) == length
        bar = t.index(b"|")
        pairs = dict(p.split(b":") for p in t[:bar].replace(b".", b"").split(b",") if p)
        assert len(pairs) == len(t[:bar].replace(b".", b"").split(b",")) - 1  # keys are distinct
        for (a, b), (s, f) in zip(e.answer_spans, e.needle_spans, strict=True):
            assert a > bar > f and t[a:b] == t[s:f]
            assert pairs[t[a - 3:a - 1]] == t[a:b] and t[s - 3:s - 1] == t[a - 3:a - 1]


def test_seeds_and_purposes_give_different_examples():
    for task in tasks.TASKS:
        a = [e.text for e in tasks.examples(task, 0, 64, 8, "train")]
        b = [e.text for e in tasks.examples(task, 1, 64, 8, "train")]
        c = [e.text for e in tasks.examples(task, 0, 64, 8, "eval")]
        again = [e.text for e in tasks.examples(task, 0, 64, 8, "train")]
        assert a == again
        assert not set(a) & set(b) and not set(a) & set(c)
        assert len(set(a)) == len(a)
