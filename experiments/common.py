"""What every experiment shares: model specs, seeds, training phases, statistics, output files.

Paper: none (the experiment machinery of issue 17; the questions are in each command's module).

Decisions (docs/experiments.md says them to the reader):

- **Training goes through ``training.train``**, the project's one training loop (clipping, the
  schedule, the NaN / divergence stops, ``metrics.jsonl``), one run directory per phase. A phase
  that continues from earlier weights (the second and later phases of ``continual``) is started
  by writing a step-0 checkpoint holding those weights, a fresh optimizer state and a fresh
  sampler position into the phase's run directory, then resuming it: the loop runs unchanged,
  with a fresh warmup and cosine schedule per phase. (A public warm-start argument of
  ``training.train`` would replace the checkpoint; asked for in issue 17's notes.)
- **Model specs** are a preset name with optional ``[model]`` overrides, ``PRESET:key=value,...``
  (values read as TOML: ``hope-tiny:cms_in_context=false``); the label is the text given. The
  resolved config of every model is recorded in ``results.json``.
- **Seeds** are 0 .. N-1. A seed sets the initialisation and the data order of a run; the
  synthetic tasks draw their examples from ``SeedSequence([seed, ...])`` as well, so seeds give
  different examples.
- **Spread** is the sample standard deviation over seeds (ddof = 1; 0 with one seed). A paired
  comparison (same seeds) is called a difference when its mean exceeds two standard errors of
  the per-seed differences; otherwise it is "within the seed noise". With 3 seeds this is a
  rough test, and the reports say so.
- Nothing is tuned on held-out data: every hyper-parameter of a scale is fixed in the code
  before the run (the learning rates are the README's: 3e-3 for the small presets, 2e-2 for tiny),
  except ``experiment optimizers``' learning rates, each picked by a sweep on the training loss.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

SCALES = ("smoke", "quick", "full")
"""smoke: the tests' scale (seconds); quick: about two minutes on 2 cores; full: docs/experiments.md."""


class ExperimentError(Exception):
    """An experiment that cannot run or whose run-time check failed; the message says why."""


class Diverged(ExperimentError):
    """A training run stopped because its loss, gradient or parameters became non-finite or diverged
    (``training.NonFiniteLoss``); ``experiment optimizers`` records it instead of stopping."""


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model of an experiment: ``preset`` with ``overrides`` of its ``[model]`` keys."""

    label: str
    preset: str
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"label": self.label, "preset": self.preset, "overrides": dict(self.overrides)}


def parse_model_spec(text: str) -> ModelSpec:
    """``PRESET`` or ``PRESET:key=value,key=value`` (values as TOML literals) -> ModelSpec."""
    from nlref import config

    preset, _, rest = text.partition(":")
    preset = preset.strip()
    if preset not in config.PRESETS:
        raise ExperimentError(f"--model {text}: unknown preset {preset!r}; known presets: "
                              f"{', '.join(config.preset_names())}")
    overrides = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ExperimentError(f"--model {text}: {item!r} is not key=value")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise ExperimentError(f"--model {text}: {value!r} is not a TOML value (true, 16, 0.01, \"x\")") from None
    spec = ModelSpec(text, preset, overrides)
    run_config(spec, steps=1, batch_size=1, seq_len=1, lr=1e-3, backend="reference", seed=0, data=None)
    return spec


def run_config(spec: ModelSpec, *, steps: int, batch_size: int, seq_len: int, lr: float, backend: str,
               seed: int, data: str | None, eval_batches: int = 1, optimizer: str = "adamw",
               optimizer_hparams: dict | None = None):
    """The ``training.RunConfig`` of one run of ``spec`` (an ExperimentError for a bad override).
    ``optimizer`` / ``optimizer_hparams``: the outer optimizer (``experiment optimizers``; default AdamW)."""
    from nlref import training

    flags = {"preset": spec.preset, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
             "backend": backend, "seed": seed, "data": data, "checkpoint_every": 0, "log_every": max(1, steps),
             "eval_batches": eval_batches, "optimizer": optimizer}
    try:
        return training.resolve_config(file={"model": dict(spec.overrides),
                                             "optimizer_hparams": dict(optimizer_hparams or {})}, flags=flags)
    except training.TrainingError as exc:
        raise ExperimentError(f"--model {spec.label}: {exc}") from None


def model_facts(spec: ModelSpec, backend: str) -> dict:
    """Label, preset, overrides, family, parameter count and the resolved config of ``spec``."""
    from nlref.reference import model as ref_model

    mc = run_config(spec, steps=1, batch_size=1, seq_len=1, lr=1e-3, backend=backend, seed=0, data=None).model
    return {**spec.to_dict(), "family": mc.family, "parameters": int(sum(ref_model.param_counts(mc).values())),
            "dtype": mc.dtype, "config": mc.to_dict()}


def seeds(n: int) -> list[int]:
    if n < 1:
        raise ExperimentError(f"--seeds must be at least 1, got {n}")
    return list(range(n))


# ------------------------------------------------------------------------------------------------
# Training and evaluation through the project's loop
# ------------------------------------------------------------------------------------------------


def train_phase(spec: ModelSpec, *, data_dir: Path, run_dir: Path, seed: int, steps: int, batch_size: int,
                seq_len: int, lr: float, backend: str, init_params=None, data_seed=None, echo=None,
                optimizer: str = "adamw", optimizer_hparams: dict | None = None):
    """Train ``spec`` on the text files under ``data_dir`` with ``training.train``; return
    (trained params, the run's summary, its RunConfig).

    ``init_params``: start from these weights (a fresh optimizer state and schedule), through a
    step-0 checkpoint that the loop resumes (module docstring). ``data_seed``: the seed of the
    data order of a continued phase (default ``[seed, 1]``). ``optimizer`` / ``optimizer_hparams``:
    the outer optimizer (default AdamW at its defaults). A run that diverges raises ``Diverged``.
    """
    from nlref import checkpoint as ckpt
    from nlref import data as data_mod
    from nlref import training

    rc = run_config(spec, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, backend=backend, seed=seed,
                    data=str(data_dir), optimizer=optimizer, optimizer_hparams=optimizer_hparams)
    quiet = echo or (lambda _msg: None)
    try:
        if init_params is None:
            summary = training.train(rc, run_dir, echo=quiet, overwrite=True)
        else:
            corpus = data_mod.load_corpus(rc.train.data, rc.train.val_fraction)
            sampler = data_mod.BatchSampler(corpus.train.stream, batch_size, seq_len,
                                            seed=[seed, 1] if data_seed is None else data_seed)
            opt_state = training.make_optimizer(rc, rc.train.lr).init(init_params)
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "summary.json", "data.json"):
                (run_dir / name).unlink(missing_ok=True)
            ckpt.save_checkpoint(run_dir / training.CHECKPOINT_NAME, params=init_params, opt_state=opt_state,
                                 config=rc.to_dict(), step=0, data_position=sampler.state(),
                                 extra={"note": "experiment phase start: the previous phase's weights"})
            summary = training.train(rc, run_dir, resume=True, echo=quiet)
        params, _, _ = training.load_model_checkpoint(run_dir)
    except training.NonFiniteLoss as exc:
        raise Diverged(f"{spec.label}, seed {seed}, training on {data_dir}: {exc}") from None
    except training.TrainingError as exc:
        raise ExperimentError(f"{spec.label}, seed {seed}, training on {data_dir}: {exc}") from None
    return params, summary, rc


def backend_model(backend: str):
    """``backends.get(backend)`` after ``training.check_backend`` (one clear error otherwise)."""
    from nlref import backends, training

    try:
        training.check_backend(backend)
    except training.TrainingError as exc:
        raise ExperimentError(str(exc)) from None
    return backends.get(backend)


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def mean_sd(values) -> dict:
    """{"mean", "sd" (ddof 1; 0 for one value), "n", "values"} of finite numbers."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0, "values": []}
    m = sum(vals) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "sd": sd, "n": n, "values": vals}


def paired_difference(a, b) -> dict:
    """Per-seed differences a - b: mean, sd, standard error and a word: "higher", "lower" or
    "within the seed noise" (|mean| <= 2 standard errors); with one seed, "one seed: not called"
    (no spread to judge it by); with none, "no finite seeds"."""
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    s = mean_sd(d)
    if s["n"] == 0:
        return {**s, "se": float("nan"), "call": "no finite seeds"}
    if s["n"] == 1:
        return {**s, "se": float("inf"), "call": "one seed: not called"}
    se = s["sd"] / math.sqrt(s["n"])
    if abs(s["mean"]) > 2 * se:
        word = "higher" if s["mean"] > 0 else "lower"
    else:
        word = "within the seed noise"
    return {**s, "se": se, "call": word}


def fmt(stat: dict, digits: int = 3) -> str:
    """'2.345 ± 0.012' (mean ± sd over seeds)."""
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def paired_finished(a, b) -> dict:
    """``paired_difference`` over the seeds where both runs finished: ``a`` and ``b`` are per-seed
    values in the same seed order, None for a run that diverged (that seed's pair is left out)."""
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return paired_difference([x for x, _ in both], [y for _, y in both])


def fmt_or_na(stat: dict, digits: int = 3) -> str:
    """``fmt(stat)``, or "not available" when no seed finished (``stat["n"] == 0``)."""
    return fmt(stat, digits) if stat["n"] else "not available"


def fmt_finished(stat: dict, n_seeds: int, digits: int = 3) -> str:
    """``fmt_or_na(stat)`` and, when fewer than ``n_seeds`` seeds finished, how many did:
    '2.345 ± 0.000 (1 of 2 seeds)', 'not available (0 of 2 seeds)'."""
    return fmt_or_na(stat, digits) + ("" if stat["n"] == n_seeds else f" ({stat['n']} of {n_seeds} seeds)")


def diverged_step(exc: Diverged) -> int | None:
    """The training step at which the run behind ``exc`` stopped (the ``training.NonFiniteLoss`` that
    ``train_phase`` raised it from), or None when that is not known."""
    return getattr(exc.__context__, "step", None)


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def out_dir(path) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ExperimentError(f"--out {path}: a file of that name exists; choose a directory")
    p.mkdir(parents=True, exist_ok=True)
    return p


def machine() -> dict:
    """Where the experiment ran (the report's 'machine' line)."""
    import numpy as np

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "load_average_at_start": load,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def machine_line(m: dict) -> str:
    return (f"{m['machine']}, {m['cpu_count']} cores, Python {m['python']}, NumPy {m['numpy']}, "
            f"load average at start {m['load_average_at_start']}, {m['date']}")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if hasattr(obj, "item") and not isinstance(obj, str | bytes):
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_outputs(out: Path, results: dict, report: str) -> list[Path]:
    """results.json and report.md into ``out``; returns their paths."""
    paths = [out / "results.json", out / "report.md"]
    paths[0].write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n")
    paths[1].write_text(report)
    return paths


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label).strip("_")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
