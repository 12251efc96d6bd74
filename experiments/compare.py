"""``experiment compare``: held-out language-modelling loss of the families at matched size and budget.

Paper: §8, Table 2 (Hope vs Titans vs Transformer++ perplexity at 760M / 1.3B), arXiv 2512.24695v1.
Small from-scratch version on the python domain, or on the ``--domain NAME=PATH`` domains instead
(experiments/domains.py; held out by file, checked at every evaluation; each domain a comparison of
its own). Parameter counts are printed with their ratio to the largest; a model more
than 10 % off is marked "not matched" in the report (at quick scale the tiny presets are widened to
match: ``default_models``).
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


# The tiny presets with the byte vocabulary are 5.2K-6.2K parameters (the embedding and head take
# 4,096): widened to hope-tiny's 6,188 within 0.1 % so that the quick comparison is matched, by the
# SwiGLU width (48 parameters per unit) or the CMS levels' hidden width (96 per unit of all three).
_TINY_CMS_16 = [{"hidden": 16, "period": 2, "eta": 0.05}, {"hidden": 16, "period": 4, "eta": 0.02},
                {"hidden": 16, "period": None, "eta": 0.0}]
_QUICK_MATCH = {"titans": {"mlp_hidden": 20}, "hope-attention": {"cms_levels": _TINY_CMS_16},
                "transformer": {"mlp_hidden": 32}}


def default_models(scale: str) -> list[ModelSpec]:
    """The four families at one size: small at full (983,680-1,085,688 parameters, within 10 %), tiny
    widened to match at quick and smoke (6,172-6,188)."""
    fams = _FAMILIES[:1] + _FAMILIES[3:] if scale == "smoke" else _FAMILIES
    if scale == "full":
        return [ModelSpec(f"{f}-small", f"{f}-small") for f in fams]
    out = []
    for f in fams:
        over = _QUICK_MATCH.get(f, {})
        label = f"{f}-tiny" + (":" + ",".join(f"{k}={'widened' if k == 'cms_levels' else v}"
                                             for k, v in over.items()) if over else "")
        out.append(ModelSpec(label, f"{f}-tiny", dict(over)))
    return out


def pick_domains(user_domains=()) -> list:
    """The domains a comparison trains and scores on: the python domain (the standard library's
    ``*.py``) by default; with ``--domain NAME=PATH`` (repeatable) those domains instead, each a
    separate comparison (experiments/domains.py: the by-file split, the disjointness check)."""
    if user_domains:
        return dom.load_domains(tuple(user_domains), builtin=False)[0]
    source, files = dom.CANDIDATES["python"][0]()
    return [dom.make_domain("python", source, files)]


def heldout_windows(domain, seq_len: int, n_windows: int):
    """(held-out stream, the files it comes from): ``n_windows`` windows of ``seq_len + 1`` bytes."""
    return dom.eval_stream(domain, seq_len + 1, n_windows)


def heldout_loss(params, rc, domain, stream, used, *, seq_len: int, n_windows: int, backend: str) -> float:
    """Mean held-out loss (nats/byte) of ``params`` on ``stream``, after checking that every file it
    comes from is held out of ``domain`` (dom.check_disjoint)."""
    from nlref import training

    dom.check_disjoint(domain, used)
    return training.evaluate(params, rc.model, stream, 8, seq_len, math.ceil(n_windows / 8), backend=backend)["loss"]


def train_curve(run_dir, tokens_per_step: int) -> list:
    """[(training tokens, training loss)] of a run, from its metrics.jsonl's training rows (none
    when the run wrote none)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    return [(r["step"] * tokens_per_step, r["loss"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "step" in r]


def run(out, *, scale_name: str = "quick", n_seeds: int = 3, backend: str | None = None, models=None,
        echo=print, name: str = "compare", defaults=None, render=None, user_domains=()) -> dict:
    """Train every model on every seed, score the held-out windows, write the outputs into ``out``.
    ``name``, ``defaults`` (scale -> specs) and ``render`` (results -> markdown) let ``ablate`` reuse it.
    ``user_domains``: ``NAME=PATH`` texts; each domain is a comparison of its own (default: python).

    results.json: ``domains`` (every domain's split), ``by_domain`` (name -> summary, vs_first),
    ``runs`` (one row per domain, model and seed); ``domain``, ``summary`` and ``vs_first`` are the
    first domain's (the only one by default)."""
    from nlref import backends

    t_start = time.perf_counter()
    scale = SCALES[scale_name]
    backend = backend or backends.default()
    common.backend_model(backend)
    out = common.out_dir(out)
    specs = list(models) if models else (defaults or default_models)(scale_name)
    seed_list = common.seeds(n_seeds)
    domain_list = pick_domains(user_domains)
    facts = [common.model_facts(s, backend) for s in specs]
    largest = max(f["parameters"] for f in facts)
    for f in facts:
        f["ratio_to_largest"] = f["parameters"] / largest
        f["matched"] = f["ratio_to_largest"] >= 0.9
        echo(f"  {f['label']}: {f['parameters']:,} parameters ({f['ratio_to_largest']:.2f} of the largest"
             f"{'' if f['matched'] else ', NOT matched within 10 %'})")
    tokens = scale.steps * scale.batch_size * scale.seq_len
    runs, by_domain = [], {}
    for domain in domain_list:
        echo(f"domain {domain.name}: {len(domain.train)} training / {len(domain.held_out)} held-out files "
             f"({domain.source})")
        stream, used = heldout_windows(domain, scale.seq_len, scale.eval_windows)
        train_dir = dom.materialise_train(domain, out / "data" / domain.name / "train")
        rows = []
        for spec in specs:
            for seed in seed_list:
                run_dir = out / "runs" / common.slug(domain.name) / common.slug(spec.label) / f"seed{seed}"
                try:
                    params, summary, rc = common.train_phase(spec, data_dir=train_dir, run_dir=run_dir, seed=seed,
                                                             steps=scale.steps, batch_size=scale.batch_size,
                                                             seq_len=scale.seq_len, lr=scale.lr, backend=backend)
                except common.Diverged as exc:  # recorded and counted, never averaged in or dropped silently
                    rows.append({"domain": domain.name, "model": spec.label, "seed": seed, "heldout_loss": None,
                                 "diverged": str(exc), "train_curve": train_curve(run_dir, scale.batch_size * scale.seq_len)})
                    echo(f"  {domain.name} {spec.label} seed {seed}: DIVERGED ({exc})")
                    continue
                loss = heldout_loss(params, rc, domain, stream, used, seq_len=scale.seq_len,
                                    n_windows=scale.eval_windows, backend=backend)
                rows.append({"domain": domain.name, "model": spec.label, "seed": seed, "heldout_loss": loss,
                             "heldout_files": list(used),
                             "train_curve": train_curve(run_dir, scale.batch_size * scale.seq_len),
                             "wall_time_s": summary["wall_time_s"]})
                echo(f"  {domain.name} {spec.label} seed {seed}: held-out loss {loss:.3f} "
                     f"({summary['wall_time_s']:.1f} s)")
        runs += rows
        per_model = {s.label: [r["heldout_loss"] for r in rows if r["model"] == s.label] for s in specs}
        ref = specs[0].label

        by_domain[domain.name] = {
            "summary": {label: common.mean_sd([x for x in v if x is not None]) for label, v in per_model.items()},
            "diverged": {label: sum(x is None for x in v) for label, v in per_model.items()},
            "vs_first": {s.label: common.paired_finished(per_model[s.label], per_model[ref]) for s in specs[1:]}}
    first = by_domain[domain_list[0].name]
    results = {"experiment": name, "scale": scale_name, "scale_config": scale.__dict__, "backend": backend,
               "seeds": seed_list, "tokens_per_run": tokens, "models": facts,
               "domains": [d.info() for d in domain_list], "domain": domain_list[0].info(),
               "by_domain": by_domain, "runs": runs, "summary": first["summary"], "vs_first": first["vs_first"],
               "machine": common.machine(), "wall_time_s": time.perf_counter() - t_start}
    results["figures"] = [p.name for p in _figure(out, results)]
    common.write_outputs(out, results, (render or report)(results))
    return results


def _smooth(ys, window: int = 20) -> list:
    """The trailing moving average over ``window`` steps (fewer at the start): the per-batch training
    loss is noisy enough that seeds and models overlap without it."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def _figure(out, results):
    """One panel per domain: each model in one colour, a line per seed (its training loss, a 20-step
    moving average), an x where a diverged seed stopped; the title gives sizes, budget, seeds, time."""
    plt = common.pyplot()
    if plt is None:
        return []
    names = [d["name"] for d in results["domains"]]
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, dname in zip(axes[0], names, strict=True):
        for i, f in enumerate(results["models"]):
            colour = colours[i % len(colours)]
            for j, r in enumerate(r for r in results["runs"] if r["model"] == f["label"] and r["domain"] == dname):
                if not r["train_curve"]:
                    continue
                xs, ys = zip(*r["train_curve"], strict=True)
                label = f"{f['label']} ({f['parameters'] / 1e6:.2f}M)" if j == 0 else None
                smooth = _smooth(list(ys))
                ax.plot(xs, smooth, lw=0.9, color=colour, label=label)
                if r.get("diverged"):
                    ax.plot(xs[-1], smooth[-1], "x", color=colour, ms=7)
        ax.set_title(f"domain {dname}: {results['tokens_per_run']:,} bytes per run, seeds {results['seeds']}, "
                     f"{results['wall_time_s']:.0f} s in all\n(lines: seeds, 20-step moving average; x: a seed "
                     "that diverged there)", fontsize=8)
        ax.set_xlabel("training tokens (bytes)")
        ax.set_ylabel("training loss (nats/byte)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "loss_vs_tokens.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def domain_line(res) -> str:
    """'the python domain (the standard library's *.py files (...)): 1,234 training / 137 held-out files'."""
    parts = [f"the {d['name']} domain ({d['source']}: {d['train']['n_files']:,} training / "
             f"{d['held_out']['n_files']:,} held-out files, split by file)" for d in res["domains"]]
    return "; ".join(parts)


def report(res) -> str:
    text = (f"# compare\n\n**Question.** At matched parameter count and the same token budget "
            f"({res['tokens_per_run']:,} bytes per run), which family reaches the lowest held-out loss on "
            f"{domain_line(res)}? Seeds {res['seeds']}, backend {res['backend']}, wall time "
            f"{res['wall_time_s']:.0f} s on {common.machine_line(res['machine'])}.\n")
    for d in res["domains"]:
        bd = res["by_domain"][d["name"]]
        div = bd.get("diverged", {})
        rows = [[f["label"], f"{f['parameters']:,}", "yes" if f["matched"] else "NO",
                 common.fmt_finished(bd["summary"][f["label"]], len(res["seeds"])),
                 str(div.get(f["label"], 0)), bd["vs_first"].get(f["label"], {}).get("call", "reference")]
                for f in res["models"]]
        text += (f"\n## domain {d['name']}\n\n"
                 + common.md_table(["model", "parameters", "within 10 %", "held-out loss (mean ± sd)",
                                    "diverged seeds", f"vs {res['models'][0]['label']}"], rows))
    if any(r.get("diverged") for r in res["runs"]):
        text += ("\nA diverged seed (a non-finite loss or gradient: the run stopped) is counted, left out of its "
                 "model's mean, and its pair left out of the paired difference; the runs table in results.json "
                 "names each with its message.\n")
    return text + ("\nA difference is called only beyond two standard errors of the per-seed differences; with 3 "
                   "seeds this is rough, and at this scale it does not speak to the paper's Table 2 (760M-1.3B "
                   "models).\n")
