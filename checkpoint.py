"""Checkpoints: safetensors files with the run's metadata, written atomically, read with checks.

Paper: none (infrastructure for the training runs of SPEC.md#training). arXiv 2512.24695v1.

A checkpoint is one ``.safetensors`` file (``safetensors.numpy``; never pickle). Tensors:
``params.<path>`` (the model's outer parameters) and ``opt.<path>`` (the optimizer state),
where ``<path>`` joins the keys of the nested dicts / lists. String metadata (all JSON):

| key             | meaning                                                              |
| --------------- | -------------------------------------------------------------------- |
| ``format``      | ``nested-learning-checkpoint``; ``format_version`` its version       |
| ``spec_version``| ``nlref.SPEC_VERSION`` of the code that wrote it           |
| ``config``      | the resolved run config (model + training), JSON                     |
| ``step``        | optimizer steps taken                                                |
| ``rng_state``   | ``numpy`` bit-generator state(s) of the run                          |
| ``data_position``| the batch sampler's position (``data.BatchSampler.state()``)        |
| ``params_tree`` / ``opt_tree`` | the containers' structure, leaves naming tensors or holding scalars |
| ``checksums``   | SHA-256 of every tensor's dtype, shape and bytes                     |
| ``metadata_sha256`` | SHA-256 of all the other metadata fields (format version 2)      |

Decisions (SPEC.md#checkpoints):

- **Atomic writes**: the bytes go to a temporary file in the same directory, are flushed and
  fsync'd, then ``os.replace`` puts them in place (and the directory is fsync'd). A crash at any
  point leaves either the old file or the new one, never a mixture.
- **Checked reads**: the header is read first and the file's size checked against it (a huge
  or foreign file is refused before it is read into memory); the metadata checksum covers
  every other metadata field (config, step, sampler state, trees, the tensors' checksums), so
  no byte of a version-2 file can change unnoticed. Version-1 files (no metadata checksum) stay
  readable. A truncated or corrupt file (bad header, wrong sizes, a checksum mismatch),
  a file of another format or spec version, or one whose config or tensors do not match the
  model expected raises ``CheckpointError`` (a ``ValueError``) whose message says what is wrong
  and what to do; callers turn it into a one-line CLI error, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "nested-learning-checkpoint"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # 1: before the metadata checksum (still read)
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why."""


# ------------------------------------------------------------------------------------------------
# Nested containers <-> flat tensors + a JSON skeleton
# ------------------------------------------------------------------------------------------------


def flatten_tree(tree, prefix: str) -> tuple[dict[str, np.ndarray], object]:
    """Split a nested dict/list/tuple of arrays and scalars into (tensors, JSON skeleton).

    Arrays and numpy scalars become tensors named ``prefix.key.sub``; Python scalars (int,
    float, bool, str, None) stay in the skeleton. ``unflatten_tree`` inverts this exactly.
    """
    tensors: dict[str, np.ndarray] = {}

    def walk(node, path):
        if isinstance(node, np.ndarray | np.generic):
            name = path
            i = 1
            while name in tensors:
                name = f"{path}~{i}"
                i += 1
            arr = np.array(node, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
            if arr.dtype.kind not in "biuf":
                raise TypeError(f"{path}: cannot store dtype {arr.dtype} in a checkpoint")
            tensors[name] = arr
            return {"__tensor__": name, "scalar": isinstance(node, np.generic)}
        if isinstance(node, dict):
            if all(isinstance(k, str) for k in node):
                return {"__dict__": {k: walk(v, f"{path}.{k}") for k, v in node.items()}}
            return {"__items__": [[_key(k), walk(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, list | tuple):
            kind = "__list__" if isinstance(node, list) else "__tuple__"
            return {kind: [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if node is None or isinstance(node, bool | int | float | str):
            return {"__value__": node}
        raise TypeError(f"{path}: cannot store a {type(node).__name__} in a checkpoint")

    skeleton = walk(tree, prefix)
    return tensors, skeleton


def _key(k):
    if isinstance(k, bool | int | float | str) or k is None:
        return k
    raise TypeError(f"cannot store a dict key of type {type(k).__name__} in a checkpoint")


def unflatten_tree(skeleton, tensors: dict[str, np.ndarray]):
    """Rebuild the container described by ``skeleton`` from ``tensors``."""
    if not isinstance(skeleton, dict) or len(skeleton) == 0:
        raise CheckpointError("the checkpoint's tree metadata is malformed")
    if "__tensor__" in skeleton:
        name = skeleton["__tensor__"]
        if name not in tensors:
            raise CheckpointError(f"the checkpoint lacks tensor {name!r} named in its metadata")
        arr = tensors[name]
        return arr[()] if skeleton.get("scalar") else arr
    if "__dict__" in skeleton:
        return {k: unflatten_tree(v, tensors) for k, v in skeleton["__dict__"].items()}
    if "__items__" in skeleton:
        return {k: unflatten_tree(v, tensors) for k, v in skeleton["__items__"]}
    if "__list__" in skeleton:
        return [unflatten_tree(v, tensors) for v in skeleton["__list__"]]
    if "__tuple__" in skeleton:
        return tuple(unflatten_tree(v, tensors) for v in skeleton["__tuple__"])
    if "__value__" in skeleton:
        return skeleton["__value__"]
    raise CheckpointError("the checkpoint's tree metadata is malformed")


def _metadata_checksum(metadata: dict) -> str:
    """SHA-256 of every metadata field but ``metadata_sha256`` itself (canonical JSON)."""
    rest = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode("utf-8")).hexdigest()


def _checksum(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(np.array(arr, order="C").tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------


def _write_all(f, payload: bytes) -> None:
    f.write(payload)


def _umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run file gets the user's umask like any other
        with os.fdopen(fd, "wb") as f:
            _write_all(f, payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------
# Save and load
# ------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    params: object
    opt_state: object
    config: dict
    step: int
    rng_state: object = None
    data_position: object = None
    spec_version: str = ""
    extra: dict = field(default_factory=dict)
    path: str = ""


def save_checkpoint(
    path: str | os.PathLike,
    *,
    params,
    opt_state,
    config: dict,
    step: int,
    rng_state=None,
    data_position=None,
    extra: dict | None = None,
) -> None:
    """Write one checkpoint file atomically (see the module docstring for its contents)."""
    from safetensors.numpy import save

    from nlref import SPEC_VERSION

    p_tensors, p_tree = flatten_tree(params, "params")
    o_tensors, o_tree = flatten_tree(opt_state, "opt")
    tensors = {**p_tensors, **o_tensors}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec_version": SPEC_VERSION,
        "config": json.dumps(config, sort_keys=True),
        "step": json.dumps(int(step)),
        "rng_state": json.dumps(rng_state),
        "data_position": json.dumps(data_position),
        "params_tree": json.dumps(p_tree),
        "opt_tree": json.dumps(o_tree),
        "checksums": json.dumps({name: _checksum(arr) for name, arr in tensors.items()}),
        "extra": json.dumps(extra or {}),
    }
    metadata["metadata_sha256"] = _metadata_checksum(metadata)
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _read_raw(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file; the header is read and the file's size
    checked against it before the data is read (SPEC.md#checkpoints)."""
    from safetensors.numpy import load

    bad = f"{path}: the checkpoint is truncated or corrupt"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: the checkpoint is truncated ({len(head)} bytes); "
                                      "use an earlier checkpoint or retrain")
            header_len = int.from_bytes(head, "little")
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: the checkpoint is truncated or not a safetensors file "
                                      f"(header claims {header_len} bytes, the file holds {size})")
            raw_header = f.read(header_len)
            try:
                header = json.loads(raw_header.decode("utf-8"))
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise CheckpointError(f"{bad} (bad header: {exc}); use an earlier checkpoint or retrain") from None
            expected = 8 + header_len + max(ends, default=0)
            if size != expected:
                raise CheckpointError(f"{bad}: the file holds {size:,} bytes, its header describes {expected:,} "
                                      "(truncated, extended or not a checkpoint); use an earlier checkpoint or retrain")
            payload = head + raw_header + f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    try:
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("metadata is not a table of strings")
        tensors = load(payload)
    except Exception as exc:  # safetensors raises its own error type for every malformed file
        raise CheckpointError(f"{bad} ({type(exc).__name__}: {exc}); use an earlier checkpoint or retrain") from None
    return tensors, metadata


def _meta_json(metadata: dict, key: str, path: Path):
    if key not in metadata:
        raise CheckpointError(f"{path}: the checkpoint lacks the metadata field {key!r}; it was not written "
                              "by nested-learning train or is damaged")
    try:
        return json.loads(metadata[key])
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: the checkpoint's metadata field {key!r} is corrupt") from None


def load_checkpoint(path: str | os.PathLike, expect_config: dict | None = None) -> Checkpoint:
    """Read and verify a checkpoint; raise ``CheckpointError`` with a clear message if unusable.

    ``expect_config``: the model config the caller expects (a dict); every key it names must be
    equal in the checkpoint's ``config["model"]``, otherwise the checkpoint is from another model.
    """
    from nlref import COMPATIBLE_SPECS, SPEC_VERSION

    path = Path(path)
    tensors, metadata = _read_raw(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a nested-learning checkpoint (format {metadata.get('format')!r})")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {metadata.get('format_version')!r}; this "
                              f"code reads versions {', '.join(READABLE_VERSIONS)}")
    if metadata["format_version"] != "1" and metadata.get("metadata_sha256") != _metadata_checksum(metadata):
        raise CheckpointError(f"{path}: the checkpoint's metadata does not match its checksum (edited or "
                              "corrupt: config, step or sampler state changed); use an earlier checkpoint or retrain")
    if metadata.get("spec_version") not in COMPATIBLE_SPECS:
        raise CheckpointError(f"{path}: written under spec version {metadata.get('spec_version')!r}, this code "
                              f"implements {SPEC_VERSION}: the model may compute a different function; retrain")
    checksums = _meta_json(metadata, "checksums", path)
    if set(checksums) != set(tensors):
        raise CheckpointError(f"{path}: the checkpoint's tensors do not match its metadata (corrupt file)")
    for name, digest in checksums.items():
        if _checksum(tensors[name]) != digest:
            raise CheckpointError(f"{path}: checksum mismatch in tensor {name!r}: the file is corrupt; "
                                  "use an earlier checkpoint or retrain")
    config = _meta_json(metadata, "config", path)
    if expect_config is not None:
        check_same_model(config.get("model", {}) if isinstance(config, dict) else {}, expect_config, path)
    step = _meta_json(metadata, "step", path)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: the checkpoint's step {step!r} is not a count of steps (corrupt)")
    try:
        params = unflatten_tree(_meta_json(metadata, "params_tree", path), tensors)
        opt_state = unflatten_tree(_meta_json(metadata, "opt_tree", path), tensors)
    except (TypeError, ValueError, AttributeError) as exc:  # a malformed tree (CheckpointError is a ValueError)
        if isinstance(exc, CheckpointError):
            raise CheckpointError(f"{path}: {exc}") from None
        raise CheckpointError(f"{path}: the checkpoint's tree metadata is malformed ({exc})") from None
    return Checkpoint(
        params=params,
        opt_state=opt_state,
        config=config,
        step=step,
        rng_state=_meta_json(metadata, "rng_state", path),
        data_position=_meta_json(metadata, "data_position", path),
        spec_version=metadata["spec_version"],
        extra=_meta_json(metadata, "extra", path),
        path=str(path),
    )


def check_same_model(found: dict, expected: dict, path) -> None:
    """Raise ``CheckpointError`` listing the model-config fields that differ."""
    diffs = [f"{k}: checkpoint {found.get(k, '<missing>')!r}, expected {v!r}"
             for k, v in expected.items() if found.get(k, "<missing>") != v]
    if diffs:
        raise CheckpointError(f"{path}: the checkpoint is from another model ({'; '.join(diffs[:6])}"
                              f"{'; ...' if len(diffs) > 6 else ''})")


def check_params_match(params, expected, path) -> None:
    """Raise ``CheckpointError`` unless ``params`` has the names, shapes and dtypes of ``expected``."""
    got, _ = flatten_tree(params, "params")
    want, _ = flatten_tree(expected, "params")
    problems = [f"missing {n}" for n in sorted(set(want) - set(got))]
    problems += [f"unexpected {n}" for n in sorted(set(got) - set(want))]
    problems += [f"{n}: shape {got[n].shape} {got[n].dtype}, expected {want[n].shape} {want[n].dtype}"
                 for n in sorted(set(got) & set(want))
                 if got[n].shape != want[n].shape or got[n].dtype != want[n].dtype]
    if problems:
        raise CheckpointError(f"{path}: the checkpoint's parameters are from another model "
                              f"({'; '.join(problems[:6])}{'; ...' if len(problems) > 6 else ''})")
