"""``experiment compare``: held-out language-modelling loss of the families at matched size and budget.

Paper: §8, Table 2 (Hope vs Titans vs Transformer++ perplexity at 760M / 1.3B), arXiv 2512.24695v1.
Small from-scratch version on the python domain (experiments/domains.py; held out by file, checked
at every evaluation). Parameter counts are printed with their ratio to the largest; a model more
than 10 % off is marked "not matched" in the report (the presets' widths are not retuned here).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from nlref.experiments import common
from nlref.experiments import domains as dom
from nlref.experiments.common import ModelSpec

_FAMILIES = ("hope", "titans", "hope-attention", "transformer")


@dataclass(frozen=True)
class Scale:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    eval_windows: int


SCALES = {
    "smoke": Scale(steps=3, batch_size=2, seq_len=32, lr=2e-2, eval_windows=4),
    "quick": Scale(steps=60, batch_size=4, seq_len=64, lr=2e-2, eval_windows=16),
    "full": Scale(steps=400, batch_size=4, seq_len=128, lr=3e-3, eval_windows=64),
}


def default_models(scale: str) -> list[ModelSpec]:
    size = "small" if scale == "full" else "tiny"
    fams = _FAMILIES[:1] + _FAMILIES[3:] if scale == "smoke" else _FAMILIES
    return [ModelSpec(f"{f}-{size}", f"{f}-{size}") for f in fams]


def run(out, *, scale_name: str = "quick", n_seeds: int = 3, backend: str | None = None, models=None,
        echo=print, name: str = "compare", defaults=None, render=None) -> dict:
    """Train every model on every seed, score the held-out windows, write the outputs into ``out``.
    ``name``, ``defaults`` (scale -> specs) and ``render`` (results -> markdown) let ``ablate`` reuse it."""
    from nlref import backends, training

    t_start = time.perf_counter()
    scale = SCALES[scale_name]
    backend = backend or backends.default()
    common.backend_model(backend)
    out = common.out_dir(out)
    specs = list(models) if models else (defaults or default_models)(scale_name)
    seed_list = common.seeds(n_seeds)
    domain_list, _ = dom.load_domains((), builtin=True)
    domain = next(d for d in domain_list if d.name == "python")
    facts = [common.model_facts(s, backend) for s in specs]
    largest = max(f["parameters"] for f in facts)
    for f in facts:
        f["ratio_to_largest"] = f["parameters"] / largest
        f["matched"] = f["ratio_to_largest"] >= 0.9
        echo(f"  {f['label']}: {f['parameters']:,} parameters ({f['ratio_to_largest']:.2f} of the largest"
             f"{'' if f['matched'] else ', NOT matched within 10 %'})")
    stream, used = dom.eval_stream(domain, scale.seq_len + 1, scale.eval_windows)
    train_dir = dom.materialise_train(domain, out / "data" / domain.name / "train")
    tokens = scale.steps * scale.batch_size * scale.seq_len
    runs = []
    for spec in specs:
        for seed in seed_list:
            run_dir = out / "runs" / common.slug(spec.label) / f"seed{seed}"
            params, summary, rc = common.train_phase(spec, data_dir=train_dir, run_dir=run_dir, seed=seed,
                                                     steps=scale.steps, batch_size=scale.batch_size,
                                                     seq_len=scale.seq_len, lr=scale.lr, backend=backend)
            dom.check_disjoint(domain, used)
            loss = training.evaluate(params, rc.model, stream, 8, scale.seq_len,
                                     math.ceil(scale.eval_windows / 8), backend=backend)["loss"]
            curve = [(r["step"] * scale.batch_size * scale.seq_len, r["loss"])
                     for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                     if "loss" in r and "step" in r]
            runs.append({"model": spec.label, "seed": seed, "heldout_loss": loss, "train_curve": curve,
                         "wall_time_s": summary["wall_time_s"]})
            echo(f"  {spec.label} seed {seed}: held-out loss {loss:.3f} ({summary['wall_time_s']:.1f} s)")
    summary = {s.label: common.mean_sd([r["heldout_loss"] for r in runs if r["model"] == s.label]) for s in specs}
    ref = specs[0].label
    diffs = {s.label: common.paired_difference([r["heldout_loss"] for r in runs if r["model"] == s.label],
                                               [r["heldout_loss"] for r in runs if r["model"] == ref])
             for s in specs[1:]}
    results = {"experiment": name, "scale": scale_name, "scale_config": scale.__dict__, "backend": backend,
               "seeds": seed_list, "tokens_per_run": tokens, "models": facts, "domain": domain.info(),
               "runs": runs, "summary": summary, "vs_first": diffs, "machine": common.machine(),
               "wall_time_s": time.perf_counter() - t_start}
    results["figures"] = [p.name for p in _figure(out, results)]
    common.write_outputs(out, results, (render or report)(results))
    return results


def _figure(out, results):
    plt = common.pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for f in results["models"]:
        for r in (r for r in results["runs"] if r["model"] == f["label"]):
            xs, ys = zip(*r["train_curve"], strict=True) if r["train_curve"] else ((), ())
            ax.plot(xs, ys, lw=0.8, label=f"{f['label']} seed {r['seed']}")
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("training loss (nats/byte)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "loss_vs_tokens.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def report(res) -> str:
    rows = [[f["label"], f"{f['parameters']:,}", "yes" if f["matched"] else "NO", common.fmt(res["summary"][f["label"]]),
             res["vs_first"].get(f["label"], {}).get("call", "reference")] for f in res["models"]]
    return (f"# compare\n\n**Question.** At matched parameter count and the same token budget "
            f"({res['tokens_per_run']:,} bytes per run), which family reaches the lowest held-out loss on the "
            f"python domain? Seeds {res['seeds']}, backend {res['backend']}, wall time {res['wall_time_s']:.0f} s "
            f"on {common.machine_line(res['machine'])}.\n\n"
            + common.md_table(["model", "parameters", "within 10 %", "held-out loss (mean ± sd)",
                               f"vs {res['models'][0]['label']}"], rows)
            + "\nA difference is called only beyond two standard errors of the per-seed differences; with 3 seeds "
              "this is rough, and at this scale it does not speak to the paper's Table 2 (760M-1.3B models).\n")
