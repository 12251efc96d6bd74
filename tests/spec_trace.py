"""SPEC.md's trace table: collected from the per-section trace tables.

Each section of SPEC.md ends with its own table ``| paper | reference symbol | tests |``. The
global table under ``<a id="trace">`` is those rows, in document order, with a section column.
``python tests/spec_trace.py`` rewrites the global table; tests/project/test_spec.py checks it is current,
that every test it names exists, and that every SPEC.md anchor (``SPEC.md#<id>``) cited in the
code exists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "SPEC.md"
TRACE_ANCHOR = '<a id="trace"></a>'
HEADER = "| section | paper | reference symbol | tests |\n| --- | --- | --- | --- |\n"


def _split(text: str) -> tuple[str, str]:
    i = text.index(TRACE_ANCHOR)
    return text[:i], text[i:]


def section_rows(text: str) -> list[tuple[str, str]]:
    """(anchor of the section, table row) for every row of every per-section trace table."""
    body, _ = _split(text)
    rows, anchor, in_table = [], None, False
    for line in body.splitlines():
        m = re.match(r'<a id="([^"]+)"></a>', line)
        if m:
            anchor = m.group(1)
        if re.match(r"\|\s*paper( equation)?\s*\|\s*reference symbol\s*\|\s*tests\s*\|", line):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                in_table = False
            elif not re.match(r"\|\s*-+\s*\|", line):
                rows.append((anchor, line.strip()))
    return rows


def render(text: str) -> str:
    """SPEC.md with the global trace table regenerated from the section tables."""
    body, trace = _split(text)
    head = trace.split("\n| ", 1)[0].rstrip("\n") + "\n\n"
    lines = [f"| [{a}](#{a}) {row}" for a, row in section_rows(text)]
    return body + head + HEADER + "\n".join(lines) + "\n"


def cited_test_names(text: str) -> set[str]:
    """Every test function SPEC.md names (``test_x``; file names ``test_x.py`` excluded)."""
    names = re.findall(r"\btest_\w+(?![\w.])", text)
    return {n for n in names if not n.endswith("_")}


if __name__ == "__main__":
    new = render(SPEC.read_text(encoding="utf-8"))
    SPEC.write_text(new, encoding="utf-8")
    print(f"wrote the trace table: {len(section_rows(new))} rows", file=sys.stderr)
