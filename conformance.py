"""Conformance vectors: golden inputs, outputs and gradients any implementation can check itself against.

SPEC: SPEC.md#conformance (the schema and how another implementation uses the vectors). The
reference (the specification) writes them; ``verify`` runs a backend of this package (the
reference itself, the CPU port or the GPU port: backends.py, SPEC.md#backends) on the stored
inputs and compares every tensor.

One vector is one ``.npz`` file (NumPy's zip of ``.npy`` arrays, readable from any language with an
npy reader) holding:

    meta            a 0-d unicode array: JSON with schema, version, spec and paper versions, kind
                    ("op" | "model"), op, dtype, seed, config (models), the argument lists, and the
                    tolerance per dtype
    input.<name>    the op's inputs (models: ``input.tokens``)
    param.<key>     the model's parameters (models only)
    upstream.<name> the gradient fed to the backward (ops only; the loss is a mean for models)
    output.<name>   the forward's outputs (models: ``output.loss`` (0-d), ``output.logits``)
    grad.<name>     every gradient (ops: w.r.t. each input; models: w.r.t. each parameter)

``DIR/manifest.json`` lists the files with their SHA-256 and the schema version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

SCHEMA = "nested-learning-conformance"
VERSION = 1
# Agreement required of an implementation that computes in the vector's dtype: summation order and
# library functions only. float64: 1e-10 (the CPU port's worst on these vectors is ~1e-13; the
# looser ("float64", "port") row of tests/tolerances.py covers LayerNorm options the vectors do
# not use); float32: the ("float32", "port") row.
TOLERANCE = {"float64": 1e-10, "float32": 5e-4}

# Ops: name -> (forward argument names, keyword arguments, gradient names in backward's order).
# Gradients that a backward returns as None (no bias) are not stored.
OPS: dict[str, tuple[tuple[str, ...], dict, tuple[str, ...]]] = {
    "primitives.linear": (("x", "W", "b"), {}, ("x", "W", "b")),
    "primitives.embedding": (("tokens", "E"), {}, ("E",)),
    "primitives.rmsnorm": (("x", "g"), {"eps": 1e-6}, ("x", "g")),
    "primitives.l2norm": (("x",), {"eps": 1e-6}, ("x",)),
    "primitives.gelu": (("x",), {}, ("x",)),
    "primitives.silu": (("x",), {}, ("x",)),
    "primitives.swiglu": (("x", "W_gate", "W_up", "W_down"), {}, ("x", "W_gate", "W_up", "W_down")),
    "primitives.conv1d": (("x", "w", "b", "state"), {}, ("x", "w", "b", "state")),
    "primitives.rope": (("x", "positions"), {"base": 10000.0}, ("x",)),
    "primitives.attention": (("q", "k", "v"), {"causal": True}, ("q", "k", "v")),
    "primitives.cross_entropy": (("logits", "targets"), {}, ("logits",)),
}
CMS_CASES = ("sequential", "independent")
MODEL_PRESETS = ("transformer-tiny", "hope-attention-tiny", "titans-tiny", "hope-tiny")
# Spec 0.3's mechanisms and families (issue 16): name -> (preset, ModelConfig overrides). Listed after
# every spec-0.2 vector, so those keep their seeds (and their bytes) when the set grows.
MODEL_CASES: dict[str, tuple[str, dict]] = {
    "linear-attention-tiny": ("linear-attention-tiny", {}),
    "deltanet-tiny": ("deltanet-tiny", {}),
    "gated-deltanet-tiny": ("gated-deltanet-tiny", {}),
    "dgd-tiny": ("dgd-tiny", {}),  # NL §4.5: DGD as a sequence layer
    "hope-tiny-no-dgd": ("hope-tiny", {"mem_dgd": False}),  # Table 6 "w/o DGD"
    "hope-tiny-no-momentum": ("hope-tiny", {"mem_momentum": False}),  # Table 6 "w/o Momentum"
    "hope-attention-tiny-nested": ("hope-attention-tiny", {"cms_nested": True}),  # nested CMS, Eq. 72
    "hope-tiny-nested": ("hope-tiny", {"cms_nested": True}),
    # Table 6 "w/o inner-projection k / v": static k and v projections
    "hope-tiny-static-kv": ("hope-tiny", {"mem_adaptive_k": False, "mem_adaptive_v": False}),
    "hope-tiny-no-retention": ("hope-tiny", {"mem_retention": False}),  # Table 6 "w/o weight decay"
    "titans-mag-tiny": ("titans-mag-tiny", {}),  # Titans' memory as a gate (SPEC.md#titans-mag)
    "titans-mal-tiny": ("titans-mal-tiny", {}),  # Titans' memory as a layer (SPEC.md#titans-mal)
    "titans-mac-tiny": ("titans-mac-tiny", {}),  # Titans' memory as context (SPEC.md#titans-mac)
}


class ConformanceError(Exception):
    """A malformed vector or directory (the CLI turns it into a one-line error)."""


# ---------------------------------------------------------------------------------------------
# Inputs of each vector (drawn from a seed; stored, so nobody needs to reproduce the draw)
# ---------------------------------------------------------------------------------------------


def _op_inputs(op: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, t, d = 2, 5, 4
    x = rng.standard_normal((n, t, d))
    return {
        "primitives.linear": lambda: {"x": x, "W": rng.standard_normal((3, d)), "b": rng.standard_normal(3)},
        "primitives.embedding": lambda: {"tokens": rng.integers(0, 7, size=(n, t)), "E": rng.standard_normal((7, d))},
        "primitives.rmsnorm": lambda: {"x": x, "g": rng.standard_normal(d)},
        "primitives.l2norm": lambda: {"x": x},
        "primitives.gelu": lambda: {"x": 3 * x},
        "primitives.silu": lambda: {"x": 3 * x},
        "primitives.swiglu": lambda: {"x": x, "W_gate": rng.standard_normal((6, d)), "W_up": rng.standard_normal((6, d)),
                                      "W_down": rng.standard_normal((d, 6))},
        "primitives.conv1d": lambda: {"x": x, "w": rng.standard_normal((d, 4)), "b": rng.standard_normal(d),
                                      "state": rng.standard_normal((n, 3, d))},
        "primitives.rope": lambda: {"x": rng.standard_normal((n, 2, t, d)), "positions": np.arange(7, 7 + t)},
        "primitives.attention": lambda: {"q": rng.standard_normal((n, 2, t, d)), "k": rng.standard_normal((n, 2, t + 2, d)),
                                         "v": rng.standard_normal((n, 2, t + 2, 3))},
        "primitives.cross_entropy": lambda: {"logits": 2 * rng.standard_normal((n, t, 9)),
                                             "targets": rng.integers(0, 9, size=(n, t))},
    }[op]()


def _cast(arrays: dict, dtype: str) -> dict:
    return {k: (v.astype(dtype) if np.asarray(v).dtype.kind == "f" else np.asarray(v)) for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------
# Running a backend on a vector's inputs
# ---------------------------------------------------------------------------------------------


def _run_op(op: str, backend: str, inputs: dict, upstream: dict):
    """Returns ({output name: array}, {input name: gradient}) of ``op`` on ``backend``."""
    from .fast import registry

    names, kwargs, gnames = OPS[op]
    fwd = registry.load(op + "_forward", backend)
    bwd = registry.load(op + "_backward", backend)
    out = fwd(*[inputs[k] for k in names], **kwargs)
    y, cache = out[0], out[1]
    outputs = {"y": np.asarray(y)}
    if op == "primitives.conv1d":
        outputs["new_state"] = out[2]
        grads = bwd(upstream["y"], cache, dnew_state=upstream["new_state"])
    elif op == "primitives.cross_entropy":
        grads = bwd(upstream["loss"], cache)
    else:
        grads = bwd(upstream["y"], cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    if op == "primitives.conv1d":
        grads = grads[:4]
    return outputs, {n: g for n, g in zip(gnames, grads, strict=True) if g is not None}


def _cms_inputs(variant: str, rng: np.random.Generator):
    from .reference import cms

    B, T, D, hidden, periods, start = 2, 7, 3, (4, 2), (2, 3), 1
    inputs = {"u": rng.standard_normal((B, T, D))}
    groups = []
    for l, (h, p) in enumerate(zip(hidden, periods, strict=True)):
        gr = cms.groups_for(p, start, T)
        groups.append(gr)
        inputs[f"{l}.W1"] = 0.5 * rng.standard_normal((B, len(gr), D, h))
        inputs[f"{l}.W2"] = 0.5 * rng.standard_normal((B, len(gr), h, D))
    if variant == "independent":
        inputs["agg"] = rng.standard_normal(len(hidden))
    meta = {"periods": list(periods), "start": start, "groups": [[list(g) for g in gr] for gr in groups],
            "variant": variant, "act": "gelu"}
    return inputs, meta


def _run_cms(meta: dict, backend: str, inputs: dict, upstream: dict):
    from .fast import registry

    groups = [[tuple(g) for g in gr] for gr in meta["groups"]]
    L = len(groups)
    weights = [(inputs[f"{l}.W1"], inputs[f"{l}.W2"]) for l in range(L)]
    y, cache = registry.load("cms.forward", backend)(inputs["u"], weights, groups, meta["variant"], meta["act"],
                                                     inputs.get("agg"))
    du, dw, dagg = registry.load("cms.backward", backend)(upstream["y"], cache)
    grads = {"u": du}
    for l, (d1, d2) in enumerate(dw):
        grads[f"{l}.W1"], grads[f"{l}.W2"] = d1, d2
    if dagg is not None:
        grads["agg"] = dagg
    return {"y": y}, grads


def _run_model(cfg, backend: str, params: dict, tokens: np.ndarray):
    from .fast import registry

    loss, grads = registry.load("model.loss_and_grads", backend)(params, tokens, cfg)
    logits, _ = registry.load("model.forward", backend)(params, tokens, cfg)
    return {"loss": np.asarray(loss, dtype=cfg.dtype), "logits": logits}, grads


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _meta(kind: str, op: str, dtype: str, seed: int, **extra) -> dict:
    from . import PAPER, SPEC_VERSION

    return {"schema": SCHEMA, "version": VERSION, "spec_version": SPEC_VERSION, "paper": PAPER, "kind": kind,
            "op": op, "dtype": dtype, "seed": seed, "tolerance": TOLERANCE, **extra}


def _save(path: Path, meta: dict, groups: dict[str, dict]) -> None:
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for prefix, d in groups.items():
        for k, v in d.items():
            arrays[f"{prefix}.{k}"] = np.asarray(v)
    np.savez_compressed(path, **arrays)


def vector_names(dtypes=("float64", "float32")) -> list[str]:
    """The vectors ``export`` writes, as file stems."""
    names = []
    for dtype in dtypes:
        names += [f"{op}.{dtype}" for op in OPS]
        names += [f"cms.{v}.{dtype}" for v in CMS_CASES]
        names += [f"model.{p}.{dtype}" for p in MODEL_PRESETS]
    for dtype in dtypes:
        names += [f"model.{c}.{dtype}" for c in MODEL_CASES]
    return names


def export(directory, seed: int = 0, dtypes=("float64", "float32"), only: str | None = None) -> list[Path]:
    """Write every vector (ops, CMS chains, the model families and mechanisms; each dtype) with the
    reference, and ``manifest.json``. Returns the files written."""
    from . import config
    from .reference import model as ref_model

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(vector_names(dtypes)):
        if only is not None and only not in name:
            continue
        base, dtype = name.rsplit(".", 1)
        rng = np.random.default_rng([seed, i])
        vseed = int(rng.integers(1 << 30))
        rng = np.random.default_rng(vseed)
        path = out / f"{name}.npz"
        if base in OPS:
            inputs = _cast(_op_inputs(base, rng), dtype)
            if base == "primitives.cross_entropy":
                ups = {"loss": np.asarray(1.0, dtype=dtype)}
            else:
                ups = {k: rng.standard_normal(s).astype(dtype) for k, s in _run_op_forward_shapes(base, inputs).items()}
            outputs, grads = _run_op(base, "reference", inputs, ups)
            names, kwargs, _ = OPS[base]
            meta = _meta("op", base, dtype, vseed, arguments=list(names), kwargs=kwargs)
            _save(path, meta, {"input": inputs, "upstream": ups, "output": outputs, "grad": grads})
        elif base.startswith("cms."):
            inputs, cmeta = _cms_inputs(base.split(".")[1], rng)
            inputs = _cast(inputs, dtype)
            ups = {"y": rng.standard_normal(inputs["u"].shape).astype(dtype)}
            outputs, grads = _run_cms(cmeta, "reference", inputs, ups)
            _save(path, _meta("op", "cms", dtype, vseed, cms=cmeta), {"input": inputs, "upstream": ups,
                                                                    "output": outputs, "grad": grads})
        else:
            preset = base.split(".", 1)[1]
            source, overrides = MODEL_CASES.get(preset, (preset, {}))
            cfg = dataclasses.replace(config.preset(source), dtype=dtype, **overrides)
            params = ref_model.init_params(cfg, vseed)
            tokens = rng.integers(0, cfg.vocab_size, size=(2, 9))
            outputs, grads = _run_model(cfg, "reference", params, tokens)
            meta = _meta("model", preset, dtype, vseed, config=cfg.to_dict(), init="reference.model.init_params(cfg, seed)")
            _save(path, meta, {"input": {"tokens": tokens}, "param": params, "output": outputs, "grad": grads})
        written.append(path)
    manifest = {"schema": SCHEMA, "version": VERSION, "files": {}}
    for p in sorted(out.glob("*.npz")):
        manifest["files"][p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return written


def _run_op_forward_shapes(op: str, inputs: dict) -> dict[str, tuple]:
    """Shapes of the outputs an upstream gradient is drawn for (y; conv1d also new_state)."""
    from .reference import primitives as P

    names, kwargs, _ = OPS[op]
    out = getattr(P, op.split(".")[1] + "_forward")(*[inputs[k] for k in names], **kwargs)
    shapes = {"y": np.shape(out[0])}
    if op == "primitives.conv1d":
        shapes["new_state"] = out[2].shape
    return shapes


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------


def load_vector(path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(meta, {"input": {...}, "param": {...}, "upstream": {...}, "output": {...}, "grad": {...}})."""
    with np.load(path, allow_pickle=False) as z:
        if "meta" not in z.files:
            raise ConformanceError(f"{path}: not a conformance vector (no 'meta' entry)")
        meta = json.loads(str(z["meta"]))
        groups: dict[str, dict[str, np.ndarray]] = {"input": {}, "param": {}, "upstream": {}, "output": {}, "grad": {}}
        for key in z.files:
            if key == "meta":
                continue
            prefix, _, name = key.partition(".")
            if prefix not in groups:
                raise ConformanceError(f"{path}: unknown entry {key!r}")
            groups[prefix][name] = z[key]
    if meta.get("schema") != SCHEMA:
        raise ConformanceError(f"{path}: schema {meta.get('schema')!r} is not {SCHEMA!r}")
    if meta.get("version") != VERSION:
        raise ConformanceError(f"{path}: schema version {meta.get('version')} is not supported (this build reads {VERSION})")
    return meta, groups


def run_vector(meta: dict, groups: dict, backend: str):
    """Run ``backend`` on a vector's inputs: ({output: array}, {grad: array})."""
    from . import config

    if meta["kind"] == "model":
        cfg = config.from_dict(meta["config"])
        return _run_model(cfg, backend, groups["param"], groups["input"]["tokens"])
    if meta["op"] == "cms":
        return _run_cms(meta["cms"], backend, groups["input"], groups["upstream"])
    return _run_op(meta["op"], backend, groups["input"], groups["upstream"])


def compare(name: str, actual, expected, tolerance: float) -> dict:
    """One row of the verify table: max abs and max rel = max|a - e| / max(max|a|, max|e|)."""
    a, e = np.asarray(actual), np.asarray(expected)
    row = {"name": name, "shape": tuple(e.shape), "max_abs": float("inf"), "max_rel": float("inf"),
           "tolerance": tolerance, "ok": False}
    if a.shape != e.shape:
        row["error"] = f"shape {a.shape} != {e.shape}"
        return row
    if e.size == 0:
        row.update(max_abs=0.0, max_rel=0.0, ok=True)
        return row
    diff = np.abs(a.astype(np.float64) - e.astype(np.float64))
    scale = max(float(np.max(np.abs(e))), float(np.max(np.abs(a))), 1e-30)
    row["max_abs"] = float(np.max(diff))
    row["max_rel"] = row["max_abs"] / scale
    row["ok"] = bool(np.isfinite(row["max_rel"]) and row["max_rel"] <= tolerance and a.dtype == e.dtype)
    if a.dtype != e.dtype:
        row["error"] = f"dtype {a.dtype} != {e.dtype}"
    return row


def verify(directory, backend: str = "reference", only: str | None = None) -> list[dict]:
    """Check ``backend`` against every vector in ``directory``: one row per tensor. A backend that
    is not known or cannot run here is a ConformanceError saying why (``backends.Backend.check``).
    A model vector of a family the backend does not compute (the GPU port and the linear families)
    is one row with ``"skipped"`` (the reason) and ``ok`` False: never counted as agreeing."""
    from . import backends

    be = backends.get(backend)
    try:
        be.check()
    except backends.BackendError as exc:
        raise ConformanceError(str(exc)) from None
    d = Path(directory)
    manifest = d / "manifest.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        files = [d / f for f in sorted(info.get("files", {}))]
        for f in files:
            if not f.exists():
                raise ConformanceError(f"{f}: listed in manifest.json but missing")
            if hashlib.sha256(f.read_bytes()).hexdigest() != info["files"][f.name]:
                raise ConformanceError(f"{f}: SHA-256 differs from manifest.json (a corrupted or edited vector)")
    else:
        files = sorted(d.glob("*.npz"))
    if only is not None:
        files = [f for f in files if only in f.name]
    if not files:
        raise ConformanceError(f"no conformance vectors (*.npz) in {d}" + (f" matching {only!r}" if only else ""))
    rows = []
    for f in files:
        meta, groups = load_vector(f)
        tolerance = float(meta["tolerance"][meta["dtype"]])
        stem = f.name[:-4]
        family = meta.get("config", {}).get("family") if meta["kind"] == "model" else None
        if family is not None and family not in be.families():
            rows.append({"name": f"{stem}:*", "shape": (), "max_abs": float("nan"), "max_rel": float("nan"),
                         "tolerance": tolerance, "ok": False,
                         "skipped": f"backend {backend} does not compute family {family}"})
            continue
        outputs, grads = run_vector(meta, groups, backend)
        for kind, got in (("output", outputs), ("grad", grads)):
            expected = groups[kind]
            for k in sorted(set(expected) | set(got)):
                if k not in got or k not in expected:
                    rows.append({"name": f"{stem}:{kind}.{k}", "shape": (), "max_abs": float("inf"),
                                 "max_rel": float("inf"), "tolerance": tolerance, "ok": False,
                                 "error": "missing in " + ("the backend's result" if k not in got else "the vector")})
                    continue
                rows.append(compare(f"{stem}:{kind}.{k}", got[k], expected[k], tolerance))
    return rows
