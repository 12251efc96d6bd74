"""Real-text domains that a fresh machine already holds, the by-file split, and its checks.

Paper: §8's continual-learning claim needs several text distributions; none is downloaded.

Built-in domains (each the first candidate source that holds at least ``MIN_FILES`` text files
and ``MIN_BYTES`` bytes; a domain none of whose sources exists is reported as missing):

| domain      | first choice                                          | fallback                           |
| ----------- | ----------------------------------------------------- | ---------------------------------- |
| python      | the running Python's standard library ``*.py``        | (always there; data.py's corpus)   |
|             | (``data.default_corpus_files``: no tests, no site-packages) |                              |
| c-headers   | the running Python's C headers (``sysconfig`` include) | ``/usr/include/**/*.h``           |
| licenses    | ``/usr/share/common-licenses/*`` and                  | the standard library's prose:      |
|             | ``/usr/share/doc/*/copyright`` (Debian's base-files   | ``*.txt``, ``*.rst``, ``README*``,  |
|             | and every package's copyright file)                   | ``LICENSE*`` outside test folders  |

``--domain NAME=PATH`` adds a user's own (a directory or glob of at least two text files).

Decisions:

- Identical files (same bytes) are kept once, under their first path in sorted order: a
  domain like ``/usr/share/doc/*/copyright`` repeats the same text under many packages, and a
  copy on both sides of the split would leak training text into the held-out part.
- The split is by file, ``data.split_files`` (files ordered by the SHA-256 of their relative
  path, the first ``ceil(fraction * n)`` held out), so it is the same on every machine with the
  same files. It is recorded in ``results.json``.
- ``check_disjoint`` runs before every evaluation: no held-out file (by name or by content) is
  a training file. A planted bug that evaluates on the training split fails the run.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from nlref.experiments.common import ExperimentError

MIN_FILES = 4
MIN_BYTES = 64 * 1024
HELD_OUT_FRACTION = 0.1
BUILTIN = ("python", "c-headers", "licenses")


@dataclass(frozen=True)
class Domain:
    """One domain: its files (relative name -> path), split by file into train and held-out."""

    name: str
    source: str  # where the files came from, in words
    files: dict  # name -> Path, after dropping binary, empty and duplicate files
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    duplicates_dropped: int
    binary_skipped: int
    digests: dict  # name -> sha256 of the content (the disjointness check compares them)

    def read(self, name: str) -> bytes:
        return Path(self.files[name]).read_bytes()

    def n_bytes(self, names) -> int:
        return sum(Path(self.files[n]).stat().st_size for n in names)

    def info(self, list_files: bool = True) -> dict:
        d = {"name": self.name, "source": self.source, "n_files": len(self.files),
             "duplicates_dropped": self.duplicates_dropped, "binary_skipped": self.binary_skipped,
             "split_rule": f"by file: data.split_files (sha256 of the relative name), held-out fraction "
                           f"{HELD_OUT_FRACTION:g}",
             "train": {"n_files": len(self.train), "n_bytes": self.n_bytes(self.train)},
             "held_out": {"n_files": len(self.held_out), "n_bytes": self.n_bytes(self.held_out)}}
        if list_files:
            d["train"]["files"] = list(self.train)
            d["held_out"]["files"] = list(self.held_out)
        return d


# ------------------------------------------------------------------------------------------------
# Candidate sources
# ------------------------------------------------------------------------------------------------


def _stdlib_python() -> tuple[str, dict]:
    from nlref import data

    root, rels = data.default_corpus_files()
    return f"the standard library's *.py files ({root})", {r: root / r for r in rels}


def _headers(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.h")) if p.is_file()}


def _python_headers() -> tuple[str, dict]:
    root = Path(sysconfig.get_paths()["include"])
    return f"the Python C headers ({root})", _headers(root) if root.is_dir() else {}


def _usr_include() -> tuple[str, dict]:
    root = Path("/usr/include")
    return "the system C headers (/usr/include)", _headers(root) if root.is_dir() else {}


def _debian_licenses() -> tuple[str, dict]:
    files = {}
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        files.update({f"common-licenses/{p.name}": p for p in sorted(lic.iterdir()) if p.is_file()})
    for m in sorted(glob.glob("/usr/share/doc/*/copyright")):
        if os.path.isfile(m):
            files[f"doc/{Path(m).parent.name}/copyright"] = Path(m)
    return "license texts (/usr/share/common-licenses/*, /usr/share/doc/*/copyright)", files


def _stdlib_prose() -> tuple[str, dict]:
    from nlref import data

    root = data.stdlib_root()
    files = {}
    for pattern in ("*.txt", "*.rst", "README*", "LICENSE*"):
        for p in root.rglob(pattern):
            rel = p.relative_to(root)
            if p.is_file() and not any(part in ("site-packages", "dist-packages", *data.TEST_DIRS)
                                       for part in rel.parts[:-1]):
                files[rel.as_posix()] = p
    return f"the standard library's prose files ({root}: *.txt, *.rst, README*, LICENSE*)", dict(sorted(files.items()))


CANDIDATES = {
    "python": (_stdlib_python,),
    "c-headers": (_python_headers, _usr_include),
    "licenses": (_debian_licenses, _stdlib_prose),
}


# ------------------------------------------------------------------------------------------------
# Building and splitting
# ------------------------------------------------------------------------------------------------


def _clean(files: dict) -> tuple[dict, int, int, dict]:
    """Drop unreadable, empty, binary and duplicate files: (kept, duplicates, binary, digests)."""
    from nlref import data

    kept, seen, dups, binary, digests = {}, set(), 0, 0, {}
    for name in sorted(files):
        try:
            content = Path(files[name]).read_bytes()
        except OSError:
            continue
        if not content:
            continue
        if data.is_binary(content):
            binary += 1
            continue
        digest = hashlib.sha256(content).digest()
        if digest in seen:
            dups += 1
            continue
        seen.add(digest)
        kept[name] = Path(files[name])
        digests[name] = digest
    return kept, dups, binary, digests


def make_domain(name: str, source: str, files: dict, cleaned=None) -> Domain:
    from nlref import data

    kept, dups, binary, digests = _clean(files) if cleaned is None else cleaned
    if len(kept) < 2:
        raise ExperimentError(f"domain {name} ({source}): {len(kept)} distinct text file(s); a by-file split "
                              "needs at least 2")
    train, held = data.split_files(sorted(kept), HELD_OUT_FRACTION)
    return Domain(name, source, kept, tuple(train), tuple(held), dups, binary, digests)


def builtin_domains() -> tuple[list[Domain], list[dict]]:
    """The built-in domains present here, and a note per domain that is missing."""
    found, missing = [], []
    for name in BUILTIN:
        tried = []
        for candidate in CANDIDATES[name]:
            source, files = candidate()
            cleaned = _clean(files)
            kept = cleaned[0]
            size = sum(p.stat().st_size for p in kept.values())
            if len(kept) >= MIN_FILES and size >= MIN_BYTES:
                found.append(make_domain(name, source, files, cleaned))
                break
            tried.append(f"{source}: {len(kept)} text files, {size:,} bytes")
        else:
            missing.append({"name": name, "why": f"no source with >= {MIN_FILES} text files and "
                                                  f">= {MIN_BYTES:,} bytes; tried " + "; ".join(tried)})
    return found, missing


def user_domain(spec: str) -> Domain:
    """``NAME=PATH`` (a directory or glob of text files) -> Domain."""
    from nlref import data

    name, eq, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not eq or not name or not path:
        raise ExperimentError(f"--domain {spec}: give NAME=PATH (a directory or glob of text files)")
    try:
        root, rels, _ = data.resolve_data_path(path)
    except data.DataError as exc:
        raise ExperimentError(f"--domain {spec}: {exc}") from None
    return make_domain(name, f"{path} (given with --domain)", {r: root / r for r in rels})


def load_domains(user_specs=(), builtin: bool = True) -> tuple[list[Domain], list[dict]]:
    domains, missing = builtin_domains() if builtin else ([], [])
    for spec in user_specs:
        d = user_domain(spec)
        if any(x.name == d.name for x in domains):
            raise ExperimentError(f"--domain {spec}: a domain called {d.name!r} exists already; choose another NAME")
        domains.append(d)
    return domains, missing


def check_disjoint(domain: Domain, eval_names) -> None:
    """ExperimentError unless every evaluated file is held out and none is (by name or by content)
    a training file of ``domain``. Run before every evaluation."""
    train = set(domain.train)
    names = list(eval_names)
    bad = [n for n in names if n in train or n not in set(domain.held_out)]
    if not bad and names:  # the content too, read again now (a file edited since the split counts)
        train_digests = {domain.digests[n] for n in domain.train}
        bad = [n for n in names if hashlib.sha256(domain.read(n)).digest() in train_digests]
    if bad:
        raise ExperimentError(f"domain {domain.name}: {len(bad)} evaluated file(s) are training files or not held "
                              f"out (e.g. {bad[0]}); evaluating on training data would hide forgetting")


def materialise_train(domain: Domain, where: Path) -> Path:
    """A folder of links to the domain's training files (what ``training.train`` reads as --data)."""
    where = Path(where)
    marker = where / ".complete"
    if marker.exists():
        return where
    where.mkdir(parents=True, exist_ok=True)
    for name in domain.train:
        link = where / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(Path(domain.files[name]).resolve())
        except OSError:  # no symlinks here: copy
            link.write_bytes(domain.read(name))
    marker.write_text("")
    return where


def eval_documents(domain: Domain) -> list[str]:
    """The documents an evaluation reads: the held-out files, in the split's (hash) order."""
    from nlref import data

    return sorted(domain.held_out, key=data.path_hash)


def eval_stream(domain: Domain, window: int, n_windows: int, per_doc: int = 2):
    """(stream of up to ``n_windows`` whole windows, the files they come from): up to ``per_doc``
    consecutive windows from the start of each held-out file, so many files are sampled."""
    import numpy as np

    names = eval_documents(domain)
    check_disjoint(domain, names)
    parts, used = [], []
    for name in names:
        if len(parts) >= n_windows:
            break
        content = domain.read(name)
        k = min(per_doc, len(content) // window, n_windows - len(parts))
        parts += [content[i * window:(i + 1) * window] for i in range(k)]
        if k:
            used.append(name)
    if not parts:
        raise ExperimentError(f"domain {domain.name}: no held-out file holds {window} bytes; use a shorter "
                              "sequence length or more files")
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), used
