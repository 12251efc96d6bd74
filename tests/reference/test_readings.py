"""reference/readings.py: the pinned readings that differ from the paper's letter are shown for the
configurations they describe, and only those (SPEC.md#readings)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from nlref import levels
from nlref.cli import cli
from nlref.reference import config, optimizers, readings

ROOT = Path(__file__).resolve().parents[2]


def _keys(rs):
    return [r.key for r in rs]


def test_every_anchor_is_a_spec_section():
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', (ROOT / "SPEC.md").read_text(encoding="utf-8")))
    rs = [r for name in config.preset_names() for r in readings.model_readings(config.preset(name))]
    rs += [r for name in optimizers.NAMES for r in readings.optimizer_readings(name)]
    assert rs and {r.anchor for r in rs} <= anchors
    assert "readings" in anchors


def test_hope_defaults_list_the_selfmod_and_cms_readings():
    assert _keys(readings.model_readings(config.preset("hope-small"))) == [
        "dgd-step-size", "normalize-v", "selfmod-momentum", "cms-chunk-sum"]


@pytest.mark.parametrize("field, value, key, present", [
    ("mem_normalize_v", False, "normalize-v", False),   # back to the paper's letter: the line goes
    ("mem_momentum", False, "selfmod-momentum", False),
    ("mem_layernorm", True, "memory-layernorm", True),  # away from the letter: a line comes
    ("mem_adaptive_q", True, "adaptive-q", True),
    ("mem_stop_grad_writes", True, "stop-grad-writes", True),
    ("mem_step_norm", True, "step-norm", True),
    ("cms_in_context", False, "cms-chunk-sum", False),
])
def test_a_switch_adds_or_removes_its_reading(field, value, key, present):
    base = config.preset("hope-small")
    assert (key in _keys(readings.model_readings(base))) is not present
    cfg = dataclasses.replace(base, **{field: value})
    assert (key in _keys(readings.model_readings(cfg))) is present


def test_families_without_nl_readings_list_none():
    for name in ("transformer-small", "titans-small"):
        assert readings.model_readings(config.preset(name)) == []
    assert readings.lines([]) == ["readings that differ from the paper's letter: none"]
    hope_attention = readings.model_readings(config.preset("hope-attention-small"))
    assert _keys(hope_attention) == ["cms-chunk-sum"]


def test_titans_memory_without_layernorm_is_a_reading():
    """Titans §3.3's memory has a LayerNorm; the tiny presets (and mem_layernorm = false) leave it out."""
    for name in ("titans-tiny", "titans-mag-tiny"):
        assert _keys(readings.model_readings(config.preset(name))) == ["titans-memory-no-layernorm"]
    small = config.preset("titans-small")
    assert small.mem_layernorm and readings.model_readings(small) == []
    assert _keys(readings.model_readings(dataclasses.replace(small, mem_layernorm=False))) == [
        "titans-memory-no-layernorm"]
    assert readings.model_readings(dataclasses.replace(small, mem_layernorm=False, mem_kind="matrix")) == []


def test_optimizer_readings_follow_the_hyperparameters():
    assert _keys(readings.optimizer_readings("delta_momentum")) == ["delta-normalised"]
    assert readings.optimizer_readings("delta_momentum", {"normalize": False}) == []
    assert _keys(readings.optimizer_readings("adamw")) == ["adam-form"]
    assert readings.optimizer_readings("adam", {"form": "paper"}) == []
    assert readings.optimizer_readings("sgd") == []
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        readings.optimizer_readings("nope")


def test_info_and_levels_print_one_line_per_reading():
    info = CliRunner().invoke(cli, ["info", "--model", "hope-small"])
    assert info.exit_code == 0, info.output
    marked = [ln for ln in info.output.splitlines() if ln.startswith("  ! ")]
    assert len(marked) == 4 and all("[SPEC.md#" in ln for ln in marked)
    lv = CliRunner().invoke(cli, ["levels", "--model", "hope-small", "--optimizer", "m3"])
    assert lv.exit_code == 0, lv.output
    assert sum(ln.startswith("  ! ") for ln in lv.output.splitlines()) == 5 and "m3-signs" in lv.output
    data = json.loads(levels.to_json("hope-small", optimizer="deep_momentum"))
    assert [r["key"] for r in data["readings"]][-1] == "deep-unit-key-read"
