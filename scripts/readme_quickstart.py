"""Print the README's quickstart commands, one per line, exactly as written.

The one parser of README.md's ``## Quickstart`` fenced block, shared by ``.ci/run`` and
``scripts/fresh_machine.sh`` so both run the README's commands verbatim and never drift from it:
the first fenced block after the heading; blank lines and ``#`` comments dropped; it must hold
exactly two commands (install + train, install the test extras + test). Exits 1 with a message
otherwise.

Usage: python3 scripts/readme_quickstart.py [README.md]   (default: the README next to scripts/)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def quickstart(text: str) -> list[str]:
    m = re.search(r"^##\s+Quickstart\s*$.*?^```[a-z]*\s*$\n(.*?)^```", text, re.M | re.S)
    if not m:
        raise ValueError("README.md has no '## Quickstart' fenced block")
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) != 2:
        raise ValueError(f"README.md quickstart must hold exactly two commands, found {len(lines)}")
    return lines


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "README.md"
    try:
        print("\n".join(quickstart(path.read_text(encoding="utf-8"))))
    except (OSError, ValueError) as exc:
        sys.exit(f"{path}: {exc}")
