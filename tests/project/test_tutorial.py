"""docs/tutorial.md runs as written: every ``python`` block, in order and in one namespace, prints
the ``text`` block under it. docs/paper-map.md names only functions that exist and covers every
equation of the paper.

Numbers are compared within one unit of the expected number's last printed digit plus 1e-6
relative (BLAS and platforms round differently); integers and all other text exactly.

``python tests/project/test_tutorial.py --update`` runs the snippets and rewrites the ``text`` blocks
with what they print (then read the diff before committing it).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from pathlib import Path

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"
PAPER_MAP = TUTORIAL.with_name("paper-map.md")
N_EQUATIONS = 121  # arXiv 2512.24695v1: Eqs. 1-121 (Appendix C ends at 121)
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
# a number not inside a name (W1, cms.1, 0.9**6 stays two numbers): sign, digits, decimals, exponent
NUMBER = re.compile(r"(?<![A-Za-z_\d.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
MAX_SECONDS = 10.0  # per snippet; each takes well under a second


def blocks(text: str) -> list[tuple[str, int, int, str]]:
    """(language, start, end, body) of every fenced block; start/end delimit the body."""
    return [(m.group(1), m.start(2), m.end(2), m.group(2)) for m in FENCE.finditer(text)]


def pairs(text: str) -> list[tuple[str, tuple[int, int, str]]]:
    """[(python code, (start, end, expected output)), ...]: each python block and the text block
    right after it. A python block without one is an error."""
    bl = blocks(text)
    out = []
    for i, (lang, _, _, body) in enumerate(bl):
        if lang != "python":
            continue
        if i + 1 >= len(bl) or bl[i + 1][0] != "text":
            raise AssertionError(f"python block {len(out) + 1} has no ```text block after it")
        _, s, e, expected = bl[i + 1]
        out.append((body, (s, e, expected)))
    return out


def run_snippets(codes: list[str]) -> list[tuple[str, float]]:
    """Execute the snippets in order in one namespace; return (stdout, seconds) of each."""
    import numpy as np

    namespace: dict = {"__name__": "__tutorial__"}
    results = []
    saved = np.get_printoptions()
    try:
        for n, code in enumerate(codes, 1):
            buf = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                try:
                    exec(compile(code, f"docs/tutorial.md:python block {n}", "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(f"python block {n} raised {type(exc).__name__}: {exc}") from exc
            results.append((buf.getvalue(), time.perf_counter() - t0))
    finally:
        np.set_printoptions(**saved)
    return results


def _unit(token: str) -> float:
    """One unit of the last printed digit of a float token (0 for an integer)."""
    mant, _, exp = token.lower().partition("e")
    if "." not in mant:
        return 0.0
    decimals = len(mant.split(".")[1])
    return 10.0 ** (int(exp or 0) - decimals)


def compare(actual: str, expected: str) -> str | None:
    """None when they agree; else a one-line description of the first difference."""
    a_lines, e_lines = actual.rstrip("\n").split("\n"), expected.rstrip("\n").split("\n")
    if len(a_lines) != len(e_lines):
        return f"{len(a_lines)} lines printed, {len(e_lines)} expected"
    for ln, (a, e) in enumerate(zip(a_lines, e_lines, strict=True), 1):
        a, e = a.rstrip(), e.rstrip()
        a_text, e_text = NUMBER.split(a), NUMBER.split(e)
        a_num, e_num = NUMBER.findall(a), NUMBER.findall(e)
        if a_text != e_text or len(a_num) != len(e_num):
            return f"line {ln}: printed {a!r}, expected {e!r}"
        for x, y in zip(a_num, e_num, strict=True):
            xv, yv = float(x), float(y)
            unit = max(_unit(x), _unit(y))
            if unit == 0.0 and x.lstrip("+") != y.lstrip("+"):
                return f"line {ln}: printed {x} where {y} was expected ({a!r})"
            if abs(xv - yv) > 1.0001 * unit + 1e-6 * max(abs(xv), abs(yv)):
                return f"line {ln}: printed {x} where {y} was expected ({a!r})"
    return None


def test_tutorial_snippets_print_what_the_tutorial_shows():
    ps = pairs(TUTORIAL.read_text())
    assert len(ps) >= 10, "the tutorial lost its snippets"
    results = run_snippets([code for code, _ in ps])
    failures = []
    for n, ((_, (_, _, expected)), (out, secs)) in enumerate(zip(ps, results, strict=True), 1):
        diff = compare(out, expected)
        if diff:
            failures.append(f"python block {n}: {diff}")
        if secs > MAX_SECONDS:
            failures.append(f"python block {n} took {secs:.1f} s (> {MAX_SECONDS} s)")
    assert not failures, "docs/tutorial.md is stale (python tests/project/test_tutorial.py --update):\n" + "\n".join(failures)


def test_compare_uses_the_printed_precision_and_is_exact_elsewhere():
    assert compare("x 0.1235 [1 2]\n", "x 0.1234 [1 2]") is None  # one unit of the last digit
    assert compare("x 0.1237\n", "x 0.1234") is not None
    assert compare("x -0.0000\n", "x 0.0000") is None
    assert compare("n 2,268\n", "n 2,269") is not None  # integers exactly
    assert compare("blocks.0.cms.1 True\n", "blocks.0.cms.2 True") is not None
    assert compare("True\n", "False") is not None
    assert compare("a\nb\n", "a") is not None
    assert compare("1.5e-03\n", "1.6e-03") is None and compare("1.5e-03\n", "1.8e-03") is not None


def test_every_python_block_is_followed_by_its_output():
    text = "```python\nprint(1)\n```\n\nno output block\n"
    try:
        pairs(text)
    except AssertionError as exc:
        assert "python block 1" in str(exc)
    else:
        raise AssertionError("a python block without a text block was accepted")


def _resolve(dotted: str):
    """The object named ``nlref.a.b.c``: the longest importable module prefix, then getattr."""
    import importlib

    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError:
            continue
        for attr in parts[n:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_paper_map_names_only_functions_that_exist():
    text = PAPER_MAP.read_text()
    names = sorted(set(re.findall(r"`(nlref(?:\.\w+)+)`", text)))
    assert len(names) > 60, "the paper map lost its functions"
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    assert not missing, "docs/paper-map.md names functions that do not exist:\n" + "\n".join(missing)


def test_paper_map_covers_every_equation():
    covered = set()
    for line in PAPER_MAP.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) != 4 or cells[0] in ("eq.", "paper", "---"):
            continue
        for a, b in re.findall(r"\b(\d+)(?:-(\d+))?\b", cells[0]):
            covered.update(range(int(a), int(b or a) + 1))
    missing = sorted(set(range(1, N_EQUATIONS + 1)) - covered)
    assert not missing, f"docs/paper-map.md has no row for Eqs. {missing}"


def update() -> int:
    """Rewrite the text blocks of docs/tutorial.md from a run of its snippets."""
    text = TUTORIAL.read_text()
    ps = pairs(text)
    results = run_snippets([code for code, _ in ps])
    for (_, (s, e, _)), (out, _secs) in sorted(zip(ps, results, strict=True), key=lambda r: -r[0][1][0]):
        out = "\n".join(line.rstrip() for line in out.rstrip("\n").split("\n")) + "\n" if out.strip() else ""
        text = text[:s] + out + text[e:]
    TUTORIAL.write_text(text)
    for n, (_, secs) in enumerate(results, 1):
        print(f"python block {n}: {secs:.2f} s")
    print(f"rewrote {len(ps)} text blocks of {TUTORIAL}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        print("usage: python tests/project/test_tutorial.py --update   (pytest runs the check)")
        sys.exit(2)
    sys.exit(update())
