"""SPEC.md stays honest: the trace table is current and names real tests; cited anchors exist."""

import re

from spec_trace import ROOT, SPEC, cited_test_names, render, section_rows


def _defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names |= set(re.findall(r"^\s*def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    return names


def test_trace_table_is_current():
    text = SPEC.read_text(encoding="utf-8")
    assert len(section_rows(text)) > 50
    assert render(text) == text, "SPEC.md's trace table is stale: run `python tests/spec_trace.py`"


def test_every_test_named_in_spec_exists():
    missing = sorted(cited_test_names(SPEC.read_text(encoding="utf-8")) - _defined_tests())
    assert not missing, f"SPEC.md names tests that do not exist: {missing}"


def _anchors(path) -> set[str]:
    """The explicit anchors (``<a id="..."></a>``) of a Markdown file: how SPEC.md and docs/ name sections."""
    return set(re.findall(r'<a id="([^"]+)"></a>', path.read_text(encoding="utf-8")))


def _package_python_files() -> list:
    """Every *.py of the package and its tests and scripts (not the virtual environment or build output)."""
    skip = {".venv", "build", "dist", "__pycache__", ".git"}
    return sorted(
        p for p in ROOT.rglob("*.py")
        if not skip & set(p.relative_to(ROOT).parts) and not any(s.endswith(".egg-info") for s in p.parts)
    )


def test_every_cited_spec_anchor_exists():
    anchors = _anchors(SPEC)
    cited = {}
    files = _package_python_files()
    assert ROOT / "tests" / "project" / "test_spec.py" in files and ROOT / "reference" / "model.py" in files
    for path in files + [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        for anchor in re.findall(r"SPEC\.md#([A-Za-z0-9_-]+)", path.read_text(encoding="utf-8")):
            cited.setdefault(anchor, str(path.relative_to(ROOT)))
    unknown = {a: f for a, f in cited.items() if a not in anchors}
    assert not unknown, f"code cites SPEC.md anchors that do not exist: {unknown}"


def test_every_cited_docs_page_and_anchor_exists():
    """Every ``docs/<name>.md`` (with its ``#anchor``, if any) that the code or SPEC.md cites exists."""
    missing = {}
    for path in _package_python_files() + [SPEC, ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        for page, anchor in re.findall(r"\bdocs/([A-Za-z0-9_.-]+?\.md)(?:#([A-Za-z0-9_-]+))?", text):
            target = ROOT / "docs" / page
            if not target.is_file():
                missing[f"docs/{page}"] = str(path.relative_to(ROOT))
            elif anchor and anchor not in _anchors(target):
                missing[f"docs/{page}#{anchor}"] = str(path.relative_to(ROOT))
    assert not missing, f"cited docs pages or anchors that do not exist: {missing}"


def test_performance_history_links_back_to_spec_sections_that_exist():
    perf = ROOT / "docs" / "performance.md"
    text = perf.read_text(encoding="utf-8")
    anchors = _anchors(SPEC)
    back = re.findall(r"\.\./SPEC\.md#([A-Za-z0-9_-]+)", text)
    assert back, "docs/performance.md links back to no SPEC section"
    assert not sorted(set(back) - anchors), f"docs/performance.md links to missing SPEC anchors: {set(back) - anchors}"
    assert not sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - _anchors(perf))


def test_every_internal_link_of_spec_resolves():
    text = SPEC.read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    broken = sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - anchors)
    assert not broken, f"SPEC.md links to anchors that do not exist: {broken}"
