"""nested-learning bench-growth (bench_growth.py, SPEC.md#fast-cpu "Cost growth"): every point in
its own process, the rows and their JSON, the growth ratios. No timing is asserted."""

from __future__ import annotations

import json

from click.testing import CliRunner

from nlref import bench_growth
from nlref.cli import cli


def test_the_plan_covers_lengths_at_batch_4_then_batches_at_256_once_each():
    assert bench_growth.plan((64, 256), (1, 4, 16)) == [(4, 64), (4, 256), (1, 256), (16, 256)]


def test_cost_ratios_are_time_per_token_over_the_base_point():
    rows = [{"batch": 4, "seq_len": 256, "tokens_per_s": 1000.0}, {"batch": 4, "seq_len": 1024, "tokens_per_s": 800.0},
            {"batch": 1, "seq_len": 256, "tokens_per_s": 500.0}, {"batch": 4, "seq_len": 64, "skipped": "x"}]
    assert bench_growth.cost_vs_base(rows) == {(4, 256): 1.0, (4, 1024): 1.25, (1, 256): 2.0}
    assert bench_growth.cost_vs_base(rows[1:]) == {}  # no base point: no ratios


def test_cli_runs_each_point_in_its_own_process_and_writes_json(tmp_path):
    out = tmp_path / "rows.jsonl"
    r = CliRunner().invoke(cli, ["bench-growth", "--preset", "transformer-tiny", "--backend", "reference",
                                 "--seq-len", "16", "--seq-len", "256", "--batch", "1", "--repeats", "1",
                                 "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["batch"], x["seq_len"]) for x in rows] == [(4, 16), (4, 256), (1, 256)]
    assert all(x["tokens_per_s"] > 0 and x["peak_mb"] >= x["base_mb"] > 0 for x in rows)
    assert "transformer-tiny: time per token vs B=4 T=256: T=16" in r.output


def test_cli_refuses_an_unknown_preset():
    r = CliRunner().invoke(cli, ["bench-growth", "--preset", "nope", "--backend", "reference"])
    assert r.exit_code == 2 and "nope" in r.output
