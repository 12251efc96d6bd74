"""SPEC.md stays honest: the trace table is current and names real tests; cited anchors exist."""

import re

from spec_trace import ROOT, SPEC, cited_test_names, render, section_rows


def _defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        names |= set(re.findall(r"^\s*def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    return names


def test_trace_table_is_current():
    text = SPEC.read_text(encoding="utf-8")
    assert len(section_rows(text)) > 50
    assert render(text) == text, "SPEC.md's trace table is stale: run `python tests/spec_trace.py`"


def test_every_test_named_in_spec_exists():
    missing = sorted(cited_test_names(SPEC.read_text(encoding="utf-8")) - _defined_tests())
    assert not missing, f"SPEC.md names tests that do not exist: {missing}"


def test_every_cited_spec_anchor_exists():
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', SPEC.read_text(encoding="utf-8")))
    cited = {}
    for path in list(ROOT.glob("*.py")) + list(ROOT.glob("reference/*.py")) + list(ROOT.glob("fast/**/*.py")):
        for anchor in re.findall(r"SPEC\.md#([A-Za-z0-9_-]+)", path.read_text(encoding="utf-8")):
            cited.setdefault(anchor, path.name)
    unknown = {a: f for a, f in cited.items() if a not in anchors}
    assert not unknown, f"code cites SPEC.md anchors that do not exist: {unknown}"


def test_every_internal_link_of_spec_resolves():
    text = SPEC.read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    broken = sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - anchors)
    assert not broken, f"SPEC.md links to anchors that do not exist: {broken}"
