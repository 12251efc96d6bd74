"""``nested-learning experiment continual``: does Hope forget less when domains come one after another?

Paper: §7.3 and §8 (continual learning; the CMS levels, Eq. (71), keep learning in context and
are claimed to reduce catastrophic forgetting), arXiv 2512.24695v1. The paper's own study starts
from Llama backbones and reports figures only; this is the small from-scratch version.

Protocol (docs/experiments.md#continual):

1. **Outer training, domain after domain.** Each model is trained on domain A, then B, then C
   (``training.train``, one run directory per phase; a phase starts from the previous phase's
   weights with a fresh optimizer state and schedule). After every phase every domain's
   held-out files are scored (``training.evaluate``, fresh state per window): the forgetting
   matrix ``L[i][j]`` = loss on domain j after phase i (nats per byte), plus the row before any
   training.
2. Summaries per run (loss units, positive = worse): backward transfer
   ``BWT = mean_{j<T-1} (L[T-1][j] - L[j][j])`` (how much the loss on the earlier domains rose by
   the end; GEM's BWT with the sign of a loss), forgetting
   ``F = mean_{j<T-1} (L[T-1][j] - min_{j<=i<T-1} L[i][j])`` (final minus best), and the final
   average loss over all domains.
3. **Test-time only.** No outer updates: the weights after phase 1 (trained on A only) read a
   stream of held-out documents of every domain in order, once with the fast states (memories,
   in-context CMS levels, the attention cache) carried across the whole stream and once reset
   before every document (``training.evaluate_continual``). The difference per domain is what
   in-context learning alone does across a domain shift.
4. **A phase that diverges** (``common.Diverged``: a non-finite loss or gradient, or diverged
   parameters) is recorded (model, seed, phase, step, message) and ends that (model, seed)
   stream: its later phases are skipped, their matrix rows are None, and the run has no BWT,
   forgetting or final average. Every other stream goes on. Summaries and verdicts are over the
   seeds that finished (the matrix row by row over the seeds that reached it; the test-time
   stream over the seeds whose first phase finished), with "not available" where none did.

Models side by side (the defaults): Hope with in-context CMS, Hope with CMS frozen in context
(``cms_in_context=false``), Titans, Transformer++.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from nlref.experiments import common, compare
from nlref.experiments import domains as dom
from nlref.experiments.common import ModelSpec

QUESTION = ("When a model is trained on several text domains one after another, does Hope with in-context CMS "
            "forget the earlier domains less than Hope with its CMS frozen in context, Titans and Transformer++? "
            "And without any outer update, do fast states carried across a stream of documents from changing "
            "domains help or hurt, against resetting them per document?")

_TINY_CHUNKS = {"mem_chunk": 16, "mem_chunk_other": 16}
_TINY_CMS = {"cms_levels": [{"hidden": 8, "period": 16, "eta": 0.05}, {"hidden": 8, "period": 64, "eta": 0.02},
                            {"hidden": 8, "period": None}]}


def default_models(scale: str) -> list[ModelSpec]:
    """Tiny presets at smoke/quick (the hope and titans memories at 16-token chunks and CMS periods
    16/64 as in the small presets, so a step costs ~0.1 s), the small presets at full scale."""
    if scale == "full":
        return [ModelSpec("hope-small", "hope-small"), ModelSpec("hope-small-no-cms", "hope-small-no-cms"),
                ModelSpec("titans-small", "titans-small"), ModelSpec("transformer-small", "transformer-small")]
    hope = ModelSpec("hope-tiny", "hope-tiny", {**_TINY_CHUNKS, **_TINY_CMS})
    frozen = ModelSpec("hope-tiny-cms-frozen", "hope-tiny", {**_TINY_CHUNKS, **_TINY_CMS, "cms_in_context": False})
    if scale == "smoke":
        return [hope, ModelSpec("transformer-tiny", "transformer-tiny")]
    return [hope, frozen, ModelSpec("titans-tiny", "titans-tiny", dict(_TINY_CHUNKS)),
            ModelSpec("transformer-tiny", "transformer-tiny")]


@dataclass(frozen=True)
class Scale:
    steps: int  # outer steps per phase
    batch_size: int
    seq_len: int
    lr: float
    eval_windows: int  # held-out windows scored per domain per evaluation
    tt_docs: int  # test-time stream: documents per domain
    tt_doc_bytes: int
    piece: int  # bytes per forward call of the stream


SCALES = {
    "smoke": Scale(steps=3, batch_size=2, seq_len=32, lr=2e-2, eval_windows=4, tt_docs=1, tt_doc_bytes=48, piece=32),
    "quick": Scale(steps=40, batch_size=4, seq_len=64, lr=2e-2, eval_windows=16, tt_docs=2, tt_doc_bytes=256,
                   piece=64),
    "full": Scale(steps=300, batch_size=4, seq_len=128, lr=3e-3, eval_windows=64, tt_docs=4, tt_doc_bytes=1024,
                  piece=256),
}


# ------------------------------------------------------------------------------------------------
# Summaries of one run's matrix
# ------------------------------------------------------------------------------------------------


def summarise(matrix: list[list[float] | None]) -> dict:
    """BWT, forgetting (both per earlier domain and their means) and the final average loss. A
    matrix with a missing row (None: a phase that diverged and the phases after it) has none of
    them (None); its learned losses are those of the phases that finished."""
    T = len(matrix)
    if any(row is None for row in matrix):
        return {"bwt": None, "bwt_per_domain": None, "forgetting": None, "forgetting_per_domain": None,
                "final_average_loss": None, "learned_loss": [None if row is None else row[j]
                                                             for j, row in enumerate(matrix)]}
    last = matrix[-1]
    bwt = [last[j] - matrix[j][j] for j in range(T - 1)]
    forgetting = [last[j] - min(matrix[i][j] for i in range(j, T - 1)) for j in range(T - 1)]
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {"bwt": mean(bwt), "bwt_per_domain": bwt, "forgetting": mean(forgetting),
            "forgetting_per_domain": forgetting, "final_average_loss": mean(last),
            "learned_loss": [matrix[j][j] for j in range(T)]}


def _test_time(params, mc, domain_list, scale: Scale, backend: str) -> dict:
    """Carried vs reset fast states over held-out documents of every domain, in domain order."""
    import numpy as np

    from nlref import data as data_mod
    from nlref import training

    names, contents, owner = [], [], []
    for d in domain_list:
        picked = [n for n in dom.eval_documents(d) if Path(d.files[n]).stat().st_size >= 2][: scale.tt_docs]
        dom.check_disjoint(d, picked)
        for n in picked:
            names.append(f"{d.name}/{n}")
            contents.append(d.read(n)[: scale.tt_doc_bytes])
            owner.append(d.name)
    lengths = np.array([len(c) for c in contents], dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    split = data_mod.Split(tuple(names), np.frombuffer(b"".join(contents), dtype=np.uint8).copy(), offsets)
    ev = training.evaluate_continual(params, mc, split, max_docs=len(names), doc_bytes=scale.tt_doc_bytes,
                                     piece=scale.piece, backend=backend)
    per_domain = {}
    for row, name in zip(ev["documents"], owner, strict=True):
        acc = per_domain.setdefault(name, {"carried": 0.0, "reset": 0.0, "bytes": 0})
        n = row["bytes"] - 1  # scored bytes
        acc["carried"] += row["continual_loss"] * n
        acc["reset"] += row["reset_loss"] * n
        acc["bytes"] += n
    for acc in per_domain.values():
        acc["carried"] /= acc["bytes"]
        acc["reset"] /= acc["bytes"]
    return {"documents": ev["documents"], "per_domain": per_domain,
            "carried": ev["continual"]["loss"], "reset": ev["reset"]["loss"]}


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------


def run(out, *, scale_name: str = "quick", n_seeds: int = 3, backend: str | None = None, models=None,
        user_domains=(), builtin: bool = True, echo=print) -> dict:
    """Run the experiment into ``out``; return the results (also written as results.json)."""
    import numpy as np

    from nlref import backends, training

    t_start = time.perf_counter()
    scale = SCALES[scale_name]
    backend = backend or backends.default()
    be = common.backend_model(backend)
    out = common.out_dir(out)
    specs = list(models) if models else default_models(scale_name)
    seed_list = common.seeds(n_seeds)
    domain_list, missing = dom.load_domains(user_domains, builtin=builtin)
    for m in missing:
        echo(f"domain {m['name']} is not available here: {m['why']}")
    if len(domain_list) < 2:
        raise common.ExperimentError(f"continual learning needs at least 2 domains; found {len(domain_list)} "
                                     "(add your own with --domain NAME=PATH)")
    machine = common.machine()
    facts = [common.model_facts(s, backend) for s in specs]
    window = scale.seq_len + 1
    streams = {}
    for d in domain_list:
        stream, used = dom.eval_stream(d, window, scale.eval_windows)
        streams[d.name] = (stream, used)
    train_dirs = {d.name: dom.materialise_train(d, out / "data" / d.name / "train") for d in domain_list}
    n_eval_batches = math.ceil(scale.eval_windows / 8)
    tokens_per_phase = scale.steps * scale.batch_size * scale.seq_len
    echo(f"continual ({scale_name}): {len(specs)} model(s) x {len(seed_list)} seed(s) x {len(domain_list)} phases "
         f"({', '.join(d.name for d in domain_list)}), {scale.steps} steps of {scale.batch_size}x{scale.seq_len} "
         f"bytes per phase, backend {backend}")

    def scores(params, mc):
        row = []
        for d in domain_list:
            stream, used = streams[d.name]
            dom.check_disjoint(d, used)
            row.append(training.evaluate(params, mc, stream, 8, scale.seq_len, n_eval_batches, backend=backend)["loss"])
        return row

    runs = []
    for spec in specs:
        for seed in seed_list:
            t0 = time.perf_counter()
            rc0 = common.run_config(spec, steps=scale.steps, batch_size=scale.batch_size, seq_len=scale.seq_len,
                                    lr=scale.lr, backend=backend, seed=seed, data=None)
            initial = scores(be.model.init_params(rc0.model, seed=seed), rc0.model)
            matrix, params, phases, test_time, diverged = [None] * len(domain_list), None, [], None, None
            for i, d in enumerate(domain_list):
                run_dir = out / "runs" / common.slug(spec.label) / f"seed{seed}" / f"phase{i + 1}-{d.name}"
                try:
                    params, summary, rc = common.train_phase(
                        spec, data_dir=train_dirs[d.name], run_dir=run_dir, seed=seed, steps=scale.steps,
                        batch_size=scale.batch_size, seq_len=scale.seq_len, lr=scale.lr, backend=backend,
                        init_params=params, data_seed=[seed, 1, i])
                except common.Diverged as exc:  # recorded; this stream's later phases are skipped (rows None)
                    diverged = {"phase": i + 1, "domain": d.name, "step": common.diverged_step(exc), "error": str(exc)}
                    phases.append({"domain": d.name, "run_dir": str(run_dir), "diverged": str(exc),
                                   "train_curve": compare.train_curve(run_dir, scale.batch_size * scale.seq_len)})
                    echo(f"  {spec.label} seed {seed}: DIVERGED in phase {i + 1} ({d.name}), its later phases "
                         f"skipped ({exc})")
                    break
                matrix[i] = scores(params, rc.model)
                phases.append({"domain": d.name, "run_dir": str(run_dir), "final_train_loss": summary["final_train_loss"],
                               "wall_time_s": summary["wall_time_s"]})
                if i == 0:
                    test_time = _test_time(params, rc.model, domain_list, scale, backend)
            summ = summarise(matrix)
            runs.append({"model": spec.label, "seed": seed, "initial": initial, "matrix": matrix, **summ,
                         "phases": phases, "test_time": test_time, "diverged": diverged,
                         "wall_time_s": time.perf_counter() - t0})
            if diverged is None:
                echo(f"  {spec.label} seed {seed}: final average loss {summ['final_average_loss']:.3f}, BWT "
                     f"{summ['bwt']:+.3f}, forgetting {summ['forgetting']:+.3f}, test-time carried - reset "
                     f"{test_time['carried'] - test_time['reset']:+.3f} ({time.perf_counter() - t0:.1f} s)")

    summary = {}
    for spec in specs:
        rs = [r for r in runs if r["model"] == spec.label]
        done = [r for r in rs if r["diverged"] is None]  # every phase finished
        rows = [np.array([r["matrix"][i] for r in rs if r["matrix"][i] is not None]) for i in range(len(domain_list))]
        read = [r for r in rs if r["test_time"] is not None]  # the first phase finished
        fin = [r for r in read
               if math.isfinite(r["test_time"]["carried"]) and math.isfinite(r["test_time"]["reset"])]
        summary[spec.label] = {
            "finished_seeds": [r["seed"] for r in done],
            "diverged_seeds": [r["seed"] for r in rs if r["diverged"] is not None],
            # row i over the matrix_n[i] seeds that reached phase i + 1 (None when none did)
            "matrix_n": [len(x) for x in rows],
            "matrix_mean": [x.mean(axis=0).tolist() if len(x) else None for x in rows],
            "matrix_sd": [(x.std(axis=0, ddof=1) if len(x) > 1 else np.zeros(len(domain_list))).tolist()
                          if len(x) else None for x in rows],
            "bwt": common.mean_sd([r["bwt"] for r in done]),
            "forgetting": common.mean_sd([r["forgetting"] for r in done]),
            "final_average_loss": common.mean_sd([r["final_average_loss"] for r in done]),
            "test_time": {  # over the seeds whose streams stayed finite; the others are named
                "non_finite_seeds": [r["seed"] for r in read if r not in fin],
                "diverged_seeds": [r["seed"] for r in rs if r["test_time"] is None],  # the first phase diverged
                "carried": common.mean_sd([r["test_time"]["carried"] for r in fin]),
                "reset": common.mean_sd([r["test_time"]["reset"] for r in fin]),
                "carried_minus_reset": common.paired_difference([r["test_time"]["carried"] for r in fin],
                                                                [r["test_time"]["reset"] for r in fin]),
                "per_domain": {d.name: common.paired_difference(
                    [r["test_time"]["per_domain"][d.name]["carried"] for r in fin],
                    [r["test_time"]["per_domain"][d.name]["reset"] for r in fin]) for d in domain_list},
            },
        }
    verdicts = _verdicts(specs, facts, runs, summary)
    results = {
        "experiment": "continual", "question": QUESTION, "scale": scale_name, "settings": scale.__dict__,
        "backend": backend, "seeds": seed_list, "tokens_per_phase": tokens_per_phase,
        "domains": [d.info() for d in domain_list], "domain_order": [d.name for d in domain_list],
        "missing_domains": missing, "eval_files": {k: v[1] for k, v in streams.items()},
        "models": facts, "runs": runs, "summary": summary, "verdicts": verdicts, "machine": machine,
        "diverged_runs": [{"model": r["model"], "seed": r["seed"], **r["diverged"]} for r in runs if r["diverged"]],
        "wall_time_s": time.perf_counter() - t_start,
    }
    figures = _figures(out, results)
    results["figures"] = [p.name for p in figures]
    results["wall_time_s"] = time.perf_counter() - t_start
    common.write_outputs(out, results, report(results))
    echo(f"wrote {out / 'results.json'}, {out / 'report.md'}" + (f" and {len(figures)} figure(s)" if figures else
                                                                  " (no figures: matplotlib is not installed)"))
    return results


def _verdicts(specs, facts, runs, summary) -> list[dict]:
    """The paper's claims against this run, each with its numbers and a plain word."""
    by_family = {}
    for spec, fact in zip(specs, facts, strict=True):
        key = fact["family"] + ("" if fact["config"].get("cms_in_context", True) else "-frozen")
        by_family.setdefault(key, spec.label)
    out = []
    hope = by_family.get("hope")

    def per_seed(label, key):  # in seed order; None for a run that diverged
        return [r[key] for r in runs if r["model"] == label]

    if hope is not None:
        for other in specs:
            if other.label == hope:
                continue
            d = common.paired_finished(per_seed(other.label, "forgetting"), per_seed(hope, "forgetting"))
            n_seeds = len(per_seed(hope, "forgetting"))
            if d["n"] == 0:
                word = "not available: no seed finished every phase for both models"
            elif d["n"] == 1:
                word = "not decided: one seed finished every phase for both models (no spread to judge by)"
            elif d["call"] == "higher":
                word = "reproduced at this scale"
            elif d["call"] == "lower":
                word = "not reproduced: the opposite (Hope forgets more)"
            else:
                word = "not reproduced: the difference is within the seed noise"
            if 0 < d["n"] < n_seeds:
                word += f"; over the {d['n']} of {n_seeds} seeds where both finished (the others diverged)"
            out.append({"claim": f"{hope} forgets less than {other.label}", "measure": "forgetting (nats/byte)",
                        "other_minus_hope": d, "verdict": word})
    for spec in specs:
        tt = summary[spec.label]["test_time"]
        d = tt["carried_minus_reset"]
        word = {"lower": "carrying the fast states helps", "higher": "carrying the fast states hurts",
                "one seed: not called": "not decided: one seed (no spread to judge by)"}.get(
            d["call"], "no difference beyond the seed noise")
        if d["n"] == 0 and tt["diverged_seeds"]:
            word = f"not available: the first phase diverged in seed(s) {tt['diverged_seeds']}"
        elif tt["diverged_seeds"]:
            word += f" (the first phase diverged in seed(s) {tt['diverged_seeds']}: no stream there)"
        bad = tt["non_finite_seeds"]
        if bad:
            word = (f"the loss became non-finite (the fast states diverged) in seed(s) {bad}; over the other "
                    f"seeds: {word}")
        out.append({"claim": f"{spec.label}: fast states carried across the domain stream help (no outer updates)",
                    "measure": "loss carried - reset (nats/byte)", "carried_minus_reset": d, "verdict": word})
    return out


# ------------------------------------------------------------------------------------------------
# Figures and the report
# ------------------------------------------------------------------------------------------------


def _caption(results: dict, fact: dict) -> str:
    n, done = len(results["seeds"]), len(results["summary"][fact["label"]]["finished_seeds"])
    seeds = f"{n} seeds" if done == n else f"\n{done} of {n} seeds finished every phase ({n - done} diverged)"
    return (f"{fact['label']} ({fact['parameters']:,} params), {results['tokens_per_phase']:,} tokens/phase, "
            f"{seeds}, {results['scale']} scale, run {results['wall_time_s']:.0f} s")


def _row_label(name: str, n: int, n_seeds: int, sep: str = " ") -> str:
    """'after python', or with the seeds that reached the phase when some diverged before it."""
    return f"after {name}" + ("" if n == n_seeds else f"{sep}({n} of {n_seeds} seeds)")


def _figures(out: Path, results: dict) -> list[Path]:
    import numpy as np

    plt = common.pyplot()
    if plt is None:
        return []
    names = results["domain_order"]
    n_seeds = len(results["seeds"])
    paths = []
    for fact in results["models"]:
        s = results["summary"][fact["label"]]
        missing = [math.nan] * len(names)  # a row no seed reached (every seed diverged before it)
        mean = np.array([missing if row is None else row for row in s["matrix_mean"]], dtype=float)
        sd = np.array([missing if row is None else row for row in s["matrix_sd"]], dtype=float)
        seen = mean[np.isfinite(mean)]
        lo, hi = (float(seen.min()), float(seen.max())) if seen.size else (0.0, 1.0)
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.4 + 0.9 * len(names)))
        im = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis_r", vmin=lo, vmax=hi)
        for i in range(len(mean)):
            for j in range(len(names)):
                if not np.isfinite(mean[i][j]):
                    ax.text(j, i, "not\navailable", ha="center", va="center", fontsize=6, color="grey")
                    continue
                ax.text(j, i, f"{mean[i][j]:.2f}\n±{sd[i][j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mean[i][j] > (lo + hi) / 2 else "black")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_yticks(range(len(names)), [_row_label(n, k, n_seeds, "\n") for n, k in zip(names, s["matrix_n"], strict=True)],
                      fontsize=8)
        ax.set_xlabel("held-out domain")
        ax.set_title("loss (nats/byte), mean ± sd\n" + _caption(results, fact), fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        p = out / f"forgetting-{common.slug(fact['label'])}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def report(results: dict) -> str:
    names = results["domain_order"]
    sc = results["settings"]
    lines = [f"# Continual learning ({results['scale']} scale)", "", f"**Question.** {results['question']}", "",
             "## Setup", "",
             f"- Phases: {' -> '.join(names)}; each {sc['steps']} outer steps of {sc['batch_size']} x {sc['seq_len']} "
             f"bytes ({results['tokens_per_phase']:,} tokens), AdamW lr {sc['lr']:g} with warmup and cosine decay per "
             "phase, a fresh optimizer state per phase (the weights carry over).",
             f"- Evaluation: up to {sc['eval_windows']} held-out windows of {sc['seq_len'] + 1} bytes per domain (2 per "
             "file from the start of each held-out file), each from a fresh state; held-out files are checked "
             "disjoint from the training files (by name and content) before every evaluation.",
             f"- Seeds: {results['seeds']} (initialisation and data order). Backend: {results['backend']}.",
             f"- Machine: {common.machine_line(results['machine'])}. Wall time: {results['wall_time_s']:.0f} s.", ""]
    lines.append(common.md_table(["model", "family", "parameters", "overrides"],
                                 [[f["label"], f["family"], f"{f['parameters']:,}", f["overrides"] or "-"]
                                  for f in results["models"]]))
    lines.append(common.md_table(["domain", "source", "train files / bytes", "held-out files / bytes", "duplicates dropped"],
                                 [[d["name"], d["source"], f"{d['train']['n_files']} / {d['train']['n_bytes']:,}",
                                   f"{d['held_out']['n_files']} / {d['held_out']['n_bytes']:,}", d["duplicates_dropped"]]
                                  for d in results["domains"]]))
    if results["missing_domains"]:
        lines += [f"- Missing here: {m['name']} ({m['why']})" for m in results["missing_domains"]] + [""]
    n_seeds = len(results["seeds"])
    lines += ["## Results", "", "Loss in nats per byte (lower is better), mean ± sd over seeds. BWT and forgetting: "
              "positive = the earlier domains got worse by the end.", ""]
    rows = []
    for f in results["models"]:
        s = results["summary"][f["label"]]
        rows.append([f["label"], f"{len(s['finished_seeds'])} of {n_seeds}"]
                    + [common.fmt_finished(x, n_seeds) for x in (s["final_average_loss"], s["bwt"], s["forgetting"],
                                                                s["test_time"]["carried"], s["test_time"]["reset"])])
    lines.append(common.md_table(["model", "seeds finished", "final avg loss", "BWT", "forgetting", "test-time carried",
                                  "test-time reset"], rows))
    for f in results["models"]:
        s = results["summary"][f["label"]]
        lines += [f"Forgetting matrix of {f['label']} (row: after training on; column: held-out domain):", ""]
        lines.append(common.md_table(["after \\ on"] + names, [
            [_row_label(n, s["matrix_n"][i], n_seeds)]
            + (["not available"] * len(names) if s["matrix_mean"][i] is None else
               [f"{s['matrix_mean'][i][j]:.3f} ± {s['matrix_sd'][i][j]:.3f}" for j in range(len(names))])
            for i, n in enumerate(names)]))
    if results["diverged_runs"]:
        lines += ["**Diverged runs.** A phase whose loss, gradient or parameters became non-finite or diverged "
                  "stopped (training.train's check). That stream's later phases were skipped (their matrix rows are "
                  "missing); the run is left out of the BWT, forgetting and final-average means and of the paired "
                  "differences, and its test-time stream counts only when its first phase finished:", ""]
        lines += [f"- {d['model']} seed {d['seed']}, phase {d['phase']} ({d['domain']})"
                  + ("" if d["step"] is None else f", step {d['step']}") + f": {d['error']}"
                  for d in results["diverged_runs"]] + [""]
    lines += ["## Answer at this scale", ""]
    for v in results["verdicts"]:
        d = v.get("other_minus_hope") or v.get("carried_minus_reset")
        if not d["n"]:
            lines.append(f"- {v['claim']}: **{v['verdict']}**.")
            continue
        lines.append(f"- {v['claim']}: **{v['verdict']}** ({v['measure']}: difference {d['mean']:+.4f}, "
                     f"sd {d['sd']:.4f} over {d['n']} seeds, per seed {[round(x, 4) for x in d['values']]}).")
    lines += ["", "A difference is called only when its mean exceeds two standard errors of the per-seed differences; "
              "with 3 seeds this is a rough test. Forgetting in loss units also depends on how much a model learned "
              "in the first place (the matrix's diagonal), so read it with the matrix.", ""]
    if results.get("figures"):
        lines += ["Figures: " + ", ".join(f"[{p}]({p})" for p in results["figures"]), ""]
    return "\n".join(lines)
