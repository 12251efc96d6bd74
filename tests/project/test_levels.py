"""``levels.levels`` and ``nested-learning levels``: the table agrees with the config (paper §3)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from nlref import config, levels
from nlref.cli import cli
from nlref.reference import model


@pytest.mark.parametrize("name", config.preset_names())
def test_every_preset_partitions_its_parameters_in_order(name):
    cfg = config.preset(name)
    rows = levels.levels(cfg)
    shapes = model.param_shapes(cfg)
    # the rows' parameters are a partition of the model's: every key exactly once
    keys = [k for lv in rows for k in lv.keys]
    assert sorted(keys) == sorted(shapes)
    assert sum(lv.params for lv in rows) == sum(model.param_counts(cfg).values())
    assert all(lv.kind in levels.KINDS for lv in rows)
    # fastest first: in-context periods never decrease, then the frozen rows, then the outer level
    in_context = [lv.period for lv in rows if lv.unit == "tokens" and lv.period is not None]
    assert in_context == sorted(in_context)
    kinds = [lv.kind for lv in rows]
    assert kinds[-2:] == ["optimizer-memory", "outer"]
    last_live = max((n for n, lv in enumerate(rows) if lv.unit == "tokens" and lv.period is not None), default=-1)
    first_frozen = min((n for n, lv in enumerate(rows) if lv.unit == "tokens" and lv.period is None), default=len(rows))
    assert last_live < first_frozen


@pytest.mark.parametrize("name", ["hope-tiny", "hope-attention-small", "hope-small-no-cms", "hope-medium"])
def test_cms_periods_match_the_config(name):
    cfg = config.preset(name)
    rows = {lv.name: lv for lv in levels.levels(cfg)}
    for i in range(cfg.n_layers):
        for l, lv in enumerate(cfg.cms_levels):
            row = rows[f"blocks.{i}.cms.{l}"]
            live = cfg.cms_in_context and lv.period is not None
            assert row.period == (lv.period if live else None)
            assert row.state == (2 * cfg.d_model * lv.hidden if live else 0)
            assert row.params == 2 * cfg.d_model * lv.hidden
            assert ("frozen" in row.every) == (not live)
            if live:
                assert "Eq. 71" in row.objective


def test_no_cms_preset_shows_every_level_frozen():
    rows = [lv for lv in levels.levels("hope-small-no-cms") if lv.kind == "cms"]
    assert rows and all(lv.period is None for lv in rows)
    assert any("cms_in_context = false" in lv.every for lv in rows)


def test_memory_and_attention_rows_follow_the_family():
    for name in config.preset_names():
        cfg = config.preset(name)
        rows = levels.levels(cfg)
        attn = [lv for lv in rows if lv.kind == "attention"]
        mem = [lv for lv in rows if lv.kind == "memory"]
        if cfg.family in ("transformer", "hope-attention"):
            assert len(attn) == cfg.n_layers and not mem
            assert all(lv.period == 1 and lv.state == 2 * cfg.d_model for lv in attn)
        elif cfg.family in ("titans-mag", "titans-mal", "titans-mac"):  # both halves of the hybrid (SPEC.md#titans-mag)
            assert len(attn) == len(mem) == cfg.n_layers
            reach = f"{cfg.attn_window}-token segment" if cfg.family == "titans-mac" else f"last {cfg.attn_window} tokens"
            assert all(lv.period == 1 and reach in lv.context for lv in attn)
            assert all(lv.period == cfg.mem_chunk and lv.state > 0 for lv in mem)
        else:
            assert len(mem) == cfg.n_layers and not attn
            want = cfg.mem_chunk if cfg.family in ("titans", "hope") else 1
            assert all(lv.period == want and lv.state > 0 for lv in mem)


def test_two_chunk_clocks_make_two_memory_levels():
    cfg = dataclasses.replace(config.preset("hope-tiny"), mem_chunk=4, mem_chunk_other=2)
    rows = levels.levels(cfg)
    mem = [lv for lv in rows if lv.kind == "memory"]
    assert sorted(lv.period for lv in mem) == [2, 2, 4, 4]
    assert sum(lv.params for lv in rows) == sum(model.param_counts(cfg).values())
    # the faster clock (M_k, ...) is listed before the CMS level of the same period, M_memory after it
    names = [lv.name for lv in rows]
    assert names.index("blocks.0.mem (M_k, M_v, M_eta, M_alpha)") < names.index("blocks.0.cms.0")
    assert names.index("blocks.0.cms.0") < names.index("blocks.0.mem (M_memory)")


def test_outer_step_and_optimizer_state():
    rows = levels.levels("transformer-tiny", batch_size=3, seq_len=7, optimizer="adamw")
    total = sum(model.param_counts(config.preset("transformer-tiny")).values())
    opt, outer = rows[-2], rows[-1]
    assert opt.period == outer.period == 21 and opt.unit == outer.unit == "steps"
    assert opt.state == 2 * total  # AdamW's m and v
    assert f"{total:,}" in outer.detail
    sgd = levels.levels("transformer-tiny", optimizer="sgd")[-2]
    assert sgd.state == 0
    with pytest.raises(ValueError, match="valid names"):
        levels.levels("transformer-tiny", optimizer="nope")


def test_cli_prints_the_table_and_json():
    runner = CliRunner()
    res = runner.invoke(cli, ["levels", "--model", "hope-tiny"])
    assert res.exit_code == 0, res.output
    rows = levels.levels("hope-tiny")
    lines = res.output.splitlines()
    assert lines[0].startswith("hope-tiny: family hope")
    for lv in rows:
        assert any(line.startswith(lv.name + " ") and f"{lv.params:,}" in line for line in lines), lv.name
    assert any(line.startswith("total") and "2,268" in line for line in lines)
    res = runner.invoke(cli, ["levels", "--model", "hope-attention-tiny", "--json", "--batch-size", "2",
                              "--seq-len", "8"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["model"] == "hope-attention-tiny"
    assert data["total_params"] == sum(model.param_counts(config.preset("hope-attention-tiny")).values())
    assert [d["name"] for d in data["levels"]] == [lv.name for lv in levels.levels("hope-attention-tiny")]
    assert data["levels"][-1]["period"] == 16


def test_cli_unknown_preset_lists_the_presets():
    res = CliRunner().invoke(cli, ["levels", "--model", "nope"])
    assert res.exit_code == 2
    assert "unknown preset 'nope'" in res.output and "hope-tiny" in res.output
    res = CliRunner().invoke(cli, ["levels", "--model", "hope-tiny", "--seq-len", "0"])
    assert res.exit_code == 2 and "--seq-len" in res.output
