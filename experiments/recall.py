"""``nested-learning experiment recall``: exact recall vs context length (passkey, MQAR).

Paper: §7.2 (NL Table 1: S-NIAH single needle, Hope = Titans = 100 % at 4K-16K, Transformer
76-89 %; MQ-NIAH, Hope 31.7 > Titans 22.8 at 4K) and §7.4, arXiv 2512.24695v1.

Protocol (docs/experiments.md#recall): per task, per model, per seed, the model is trained
from scratch with ``training.train`` on examples of ``train_len`` bytes (tasks.py; each training
window is exactly one example, checked at run time), then scored on fresh examples (drawn from
a separate seed stream) at every context length of the scale. An answer is correct when every
one of its bytes is the model's most likely next byte given the true prefix (for the passkey
this is exactly greedy decoding of the answer). Lengths above the training length test length
generalisation. The attention families are scored up to ``attention_max_len`` (their KV cache
grows with the context; the memory families' state does not), stated in the report.

A training run that diverges (``common.Diverged``: a non-finite loss or gradient, or diverged
parameters) is recorded with its step and message; its accuracy is missing (None, not 0), it is
left out of the means and of the paired differences, and the other runs go on. A summary no seed
finished is "not available".
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from nlref.experiments import common, compare, tasks
from nlref.experiments.common import ModelSpec

QUESTION = ("Trained briefly on a synthetic recall task at one context length, how exactly do Hope, Titans and "
            "Transformer++ retrieve a single passkey and answer multi-query associative recall (MQAR) as the "
            "context grows, within and beyond the training length?")

ATTENTION_FAMILIES = ("transformer", "hope-attention")
_TINY_CHUNKS = {"mem_chunk": 16, "mem_chunk_other": 16}
_TINY_CMS = {"cms_levels": [{"hidden": 8, "period": 16, "eta": 0.05}, {"hidden": 8, "period": 64, "eta": 0.02},
                            {"hidden": 8, "period": None}]}


def default_models(scale: str) -> list[ModelSpec]:
    if scale == "full":
        return [ModelSpec("hope-small", "hope-small"), ModelSpec("titans-small", "titans-small"),
                ModelSpec("transformer-small", "transformer-small")]
    hope = ModelSpec("hope-tiny", "hope-tiny", {**_TINY_CHUNKS, **_TINY_CMS})
    if scale == "smoke":
        return [hope, ModelSpec("transformer-tiny", "transformer-tiny")]
    return [hope, ModelSpec("titans-tiny", "titans-tiny", dict(_TINY_CHUNKS)),
            ModelSpec("transformer-tiny", "transformer-tiny")]


@dataclass(frozen=True)
class Scale:
    steps: int
    batch_size: int
    train_len: int  # bytes per training example = per window
    lr: float
    lengths: tuple[int, ...]
    n_eval: int  # examples per length
    attention_max_len: int
    piece: int


SCALES = {
    "smoke": Scale(steps=3, batch_size=2, train_len=32, lr=2e-2, lengths=(32, 64), n_eval=4, attention_max_len=64,
                   piece=32),
    "quick": Scale(steps=60, batch_size=4, train_len=64, lr=2e-2, lengths=(32, 64, 128, 256), n_eval=16,
                   attention_max_len=256, piece=128),
    "full": Scale(steps=400, batch_size=4, train_len=256, lr=3e-3,
                  lengths=(1024, 2048, 4096, 8192, 16384, 32768, 65536), n_eval=8, attention_max_len=8192, piece=1024),
}


def write_training_data(task: str, seed: int, n: int, length: int, where: Path, per_file: int = 64) -> set:
    """``n`` training examples as text files of ``per_file`` whole examples each (plus one file for
    the training loop's own validation split); returns the examples' SHA-256 digests."""
    from nlref import data as data_mod

    where.mkdir(parents=True, exist_ok=True)
    exs = tasks.examples(task, seed, length, n + per_file, "train")
    digests = set()
    for k in range(0, len(exs), per_file):
        chunk = exs[k:k + per_file]
        (where / f"part-{k // per_file:05d}.txt").write_bytes(b"".join(e.text for e in chunk))
        digests.update(hashlib.sha256(e.text).digest() for e in chunk)
    corpus = data_mod.load_corpus(str(where))
    if corpus.train.n_bytes % length:  # every window must be one whole example (tasks.py)
        raise common.ExperimentError(f"{where}: the training stream holds {corpus.train.n_bytes} bytes, not a "
                                     f"multiple of the example length {length}; windows would straddle examples")
    return digests


def _max_len(fact: dict, scale: Scale) -> int:
    """The longest context a model is scored at: ``attention_max_len`` for the attention families."""
    return scale.attention_max_len if fact["family"] in ATTENTION_FAMILIES else max(scale.lengths)


def answer_scores(be, params, mc, exs, piece: int) -> tuple[float, float]:
    """(exact-match accuracy over answers, accuracy over answer bytes) of examples of one length,
    teacher-forced: the logits at position p - 1 predict byte p; the context is read in pieces
    with the carried state."""
    import numpy as np

    tokens = np.stack([e.tokens for e in exs]).astype(np.int64)  # (n, L)
    n, L = tokens.shape
    want = sorted({p for e in exs for (a, b) in e.answer_spans for p in range(a, b)})
    pred = np.zeros((n, L), dtype=np.int64)
    params = be.to_device(params)
    state = None
    last = max(want)  # logits needed up to position last - 1
    for start in range(0, last, piece):
        part = tokens[:, start:min(start + piece, last)]
        logits, state = be.forward(params, part, mc, state)
        pred[:, start:start + part.shape[1]] = np.asarray(be.to_host(logits)).argmax(axis=-1)
    hits, total, byte_hits, byte_total = 0, 0, 0, 0
    for i, e in enumerate(exs):
        for a, b in e.answer_spans:
            ok = pred[i, a - 1:b - 1] == tokens[i, a:b]
            hits += bool(ok.all())
            total += 1
            byte_hits += int(ok.sum())
            byte_total += ok.size
    return hits / total, byte_hits / byte_total


def run(out, *, scale_name: str = "quick", n_seeds: int = 3, backend: str | None = None, models=None,
        task_names=tasks.TASKS, echo=print) -> dict:
    from nlref import backends

    t_start = time.perf_counter()
    scale = SCALES[scale_name]
    backend = backend or backends.default()
    be = common.backend_model(backend)
    out = common.out_dir(out)
    specs = list(models) if models else default_models(scale_name)
    seed_list = common.seeds(n_seeds)
    machine = common.machine()
    facts = [common.model_facts(s, backend) for s in specs]
    n_train = scale.steps * scale.batch_size
    echo(f"recall ({scale_name}): tasks {', '.join(task_names)}; {len(specs)} model(s) x {len(seed_list)} seed(s); "
         f"{scale.steps} steps of {scale.batch_size} examples of {scale.train_len} bytes; lengths {list(scale.lengths)}")
    runs = []
    for task in task_names:
        for seed in seed_list:
            data_dir = out / "data" / task / f"seed{seed}"
            train_digests = write_training_data(task, seed, n_train, scale.train_len, data_dir)
            evals = {L: tasks.examples(task, seed, L, scale.n_eval, "eval") for L in scale.lengths}
            leaked = sum(hashlib.sha256(e.text).digest() in train_digests for exs in evals.values() for e in exs)
            if leaked:
                raise common.ExperimentError(f"{task} seed {seed}: {leaked} evaluation example(s) are training examples")
            for spec, fact in zip(specs, facts, strict=True):
                t0 = time.perf_counter()
                run_dir = out / "runs" / task / common.slug(spec.label) / f"seed{seed}"
                try:
                    params, summary, rc = common.train_phase(
                        spec, data_dir=data_dir, run_dir=run_dir, seed=seed, steps=scale.steps,
                        batch_size=scale.batch_size, seq_len=scale.train_len - 1, lr=scale.lr, backend=backend)
                except common.Diverged as exc:  # recorded; its accuracy is missing, never 0 or dropped silently
                    runs.append({"task": task, "model": spec.label, "seed": seed, "accuracy": None,
                                 "diverged": str(exc), "diverged_step": common.diverged_step(exc),
                                 "train_curve": compare.train_curve(run_dir, scale.batch_size * (scale.train_len - 1)),
                                 "run_dir": str(run_dir), "wall_time_s": time.perf_counter() - t0})
                    echo(f"  {task} {spec.label} seed {seed}: DIVERGED ({exc})")
                    continue
                acc = {}
                for L in scale.lengths:
                    if L > _max_len(fact, scale):
                        continue
                    exact, per_byte = answer_scores(be, params, rc.model, evals[L], scale.piece)
                    acc[L] = {"exact": exact, "byte": per_byte}
                runs.append({"task": task, "model": spec.label, "seed": seed, "accuracy": acc, "diverged": None,
                             "final_train_loss": summary["final_train_loss"], "run_dir": str(run_dir),
                             "wall_time_s": time.perf_counter() - t0})
                echo(f"  {task} {spec.label} seed {seed}: exact " +
                     ", ".join(f"{L}: {a['exact']:.2f}" for L, a in acc.items()) + f" ({time.perf_counter() - t0:.1f} s)")
    summary, diverged_seeds = {}, {}
    for task in task_names:
        for spec, fact in zip(specs, facts, strict=True):
            rs = [r for r in runs if r["task"] == task and r["model"] == spec.label]
            done = [r for r in rs if r["accuracy"] is not None]  # over the seeds that finished training
            diverged_seeds.setdefault(task, {})[spec.label] = [r["seed"] for r in rs if r["accuracy"] is None]
            summary.setdefault(task, {})[spec.label] = {
                str(L): {"exact": common.mean_sd([r["accuracy"][L]["exact"] for r in done]),
                         "byte": common.mean_sd([r["accuracy"][L]["byte"] for r in done])}
                for L in scale.lengths if L <= _max_len(fact, scale)}
    results = {"experiment": "recall", "question": QUESTION, "scale": scale_name,
               "settings": {**scale.__dict__, "lengths": list(scale.lengths)}, "backend": backend, "seeds": seed_list,
               "tasks": {t: {"chance_exact": tasks.chance(t), "train_examples": n_train,
                             "train_tokens": n_train * scale.train_len} for t in task_names},
               "models": facts, "runs": runs, "summary": summary, "diverged_seeds": diverged_seeds,
               "diverged_runs": [{"task": r["task"], "model": r["model"], "seed": r["seed"], "step": r["diverged_step"],
                                  "error": r["diverged"]} for r in runs if r["diverged"]],
               "machine": machine}
    results["verdicts"] = _verdicts(results, specs, facts)
    results["wall_time_s"] = time.perf_counter() - t_start
    figures = _figures(out, results)
    results["figures"] = [p.name for p in figures]
    results["wall_time_s"] = time.perf_counter() - t_start
    common.write_outputs(out, results, report(results))
    echo(f"wrote {out / 'results.json'}, {out / 'report.md'}" + (f" and {len(figures)} figure(s)" if figures else
                                                                  " (no figures: matplotlib is not installed)"))
    return results


def _verdicts(results, specs, facts) -> list[dict]:
    fam = {f["label"]: f["family"] for f in facts}
    first = {}
    for s in specs:
        first.setdefault(fam[s.label], s.label)
    claims = [("passkey", "hope", "transformer", "Hope retrieves the passkey at least as well as Transformer++ "
               "(NL Table 1, S-NIAH-1)"),
              ("passkey", "titans", "transformer", "Titans retrieves the passkey at least as well as Transformer++"),
              ("mqar", "hope", "titans", "Hope answers MQAR better than Titans (NL Table 1, MQ-NIAH)")]
    out = []
    for task, a, b, text in claims:
        if task not in results["summary"] or a not in first or b not in first:
            continue
        ra = [r for r in results["runs"] if r["task"] == task and r["model"] == first[a]]  # in seed order
        rb = [r for r in results["runs"] if r["task"] == task and r["model"] == first[b]]
        per_len = results["summary"][task]
        L = max(int(x) for x in per_len[first[a]] if x in per_len[first[b]])

        def exact(rs, L=L):  # per seed; None where training diverged
            return [None if r["accuracy"] is None else r["accuracy"][L]["exact"] for r in rs]

        d = common.paired_finished(exact(ra), exact(rb))
        done = [r for r in ra + rb if r["accuracy"] is not None]
        best = max((max(r["accuracy"][x]["exact"] for x in r["accuracy"]) for r in done), default=None)
        if d["n"] == 0:
            word = "not available: no seed finished training for both models"
        elif d["n"] == 1:
            word = "not decided: one seed finished for both models (no spread to judge by)"
        elif best <= 2 * results["tasks"][task]["chance_exact"] + 1e-12:
            word = "not reproduced: neither model learned the task at this scale (accuracy at chance)"
        elif d["call"] == "higher":
            word = "reproduced at this scale"
        elif d["call"] == "lower":
            word = "not reproduced: the opposite"
        elif "at least as well" in text:
            word = "consistent with the claim: no difference beyond the seed noise"
        else:
            word = "not reproduced: the difference is within the seed noise"
        if 0 < d["n"] < len(ra):
            word += f"; over the {d['n']} of {len(ra)} seeds where both finished (the others diverged)"
        out.append({"claim": f"{text} [{first[a]} vs {first[b]}, {task} at {L} bytes]", "length": L,
                    "difference": d, "verdict": word})
    return out


def _figures(out: Path, results: dict) -> list[Path]:
    plt = common.pyplot()
    if plt is None:
        return []
    paths = []
    sc = results["settings"]
    sizes = ", ".join(f"{f['label']} {f['parameters']:,}" for f in results["models"])
    n_seeds = len(results["seeds"])
    for task, per_model in results["summary"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, per_len in per_model.items():
            n_done = n_seeds - len(results["diverged_seeds"][task][label])
            if not n_done:  # every seed diverged: a legend entry, no points
                ax.plot([], [], marker="o", label=f"{label}: not available (every seed diverged)")
                continue
            Ls = [int(x) for x in per_len]
            ax.errorbar(Ls, [per_len[str(L)]["exact"]["mean"] for L in Ls],
                        yerr=[per_len[str(L)]["exact"]["sd"] for L in Ls], marker="o", capsize=3,
                        label=label + ("" if n_done == n_seeds else f" ({n_done} of {n_seeds} seeds; the others diverged)"))
        ax.axvline(sc["train_len"], color="grey", ls="--", lw=1, label="training length")
        ax.axhline(results["tasks"][task]["chance_exact"], color="k", ls=":", lw=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (bytes)")
        ax.set_ylabel("exact-match accuracy (mean ± sd)")
        ax.set_title(f"{task}: {sizes} params; {results['tasks'][task]['train_tokens']:,} training tokens; "
                     f"{len(results['seeds'])} seeds; run {results['wall_time_s']:.0f} s", fontsize=7)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"recall-{task}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def report(results: dict) -> str:
    sc = results["settings"]
    lines = [f"# Recall vs context length ({results['scale']} scale)", "", f"**Question.** {results['question']}", "",
             "## Setup", "",
             "- Tasks (experiments/tasks.py): passkey (5 digits after `#key=`, needle at a uniform position in "
             "random-letter filler; chance 1e-5) and MQAR (2-letter keys bound to 2-digit values, up to 16 queries; "
             "chance 1e-2 per query).",
             f"- Training: {sc['steps']} steps of {sc['batch_size']} examples of {sc['train_len']} bytes "
             f"({results['tasks'][next(iter(results['tasks']))]['train_tokens']:,} tokens per task), AdamW lr "
             f"{sc['lr']:g}, from scratch per task and seed; each training window is one example.",
             f"- Evaluation: {sc['n_eval']} fresh examples per length (a separate seed stream, checked disjoint from "
             f"the training examples) at lengths {sc['lengths']}; attention families up to {sc['attention_max_len']} "
             "bytes (their KV cache grows with the context). Correct = every answer byte is the argmax given the "
             "true prefix.",
             f"- Seeds: {results['seeds']}. Backend: {results['backend']}.",
             f"- Machine: {common.machine_line(results['machine'])}. Wall time: {results['wall_time_s']:.0f} s.", ""]
    lines.append(common.md_table(["model", "family", "parameters", "overrides"],
                                 [[f["label"], f["family"], f"{f['parameters']:,}", f["overrides"] or "-"]
                                  for f in results["models"]]))
    n_seeds = len(results["seeds"])

    def cell(stat):
        if not stat["exact"]["n"]:
            return common.fmt_or_na(stat["exact"])
        return f"{common.fmt(stat['exact'], 2)} ({stat['byte']['mean']:.2f})"

    lines += ["## Results", "", "Exact-match accuracy, mean ± sd over the seeds that finished training (per answer "
              "byte in brackets); - = not evaluated.", ""]
    for task, per_model in results["summary"].items():
        lines.append(f"**{task}**:\n")
        rows = []
        for label, per_len in per_model.items():
            rows.append([label, f"{n_seeds - len(results['diverged_seeds'][task][label])} of {n_seeds}"]
                        + [cell(per_len[str(L)]) if str(L) in per_len else "-" for L in sc["lengths"]])
        lines.append(common.md_table(["model", "seeds finished"] + [f"{L} B" for L in sc["lengths"]], rows))
    if results["diverged_runs"]:
        lines += ["**Diverged runs.** A training run whose loss, gradient or parameters became non-finite or diverged "
                  "stopped (training.train's check); it was not scored (its accuracy is missing, not 0) and is left "
                  "out of the means and of the paired differences:", ""]
        lines += [f"- {d['task']} {d['model']} seed {d['seed']}" + ("" if d["step"] is None else f", step {d['step']}")
                  + f": {d['error']}" for d in results["diverged_runs"]] + [""]
    lines += ["## Answer at this scale", ""]
    for v in results["verdicts"]:
        d = v["difference"]
        if not d["n"]:
            lines.append(f"- {v['claim']}: **{v['verdict']}**.")
            continue
        lines.append(f"- {v['claim']}: **{v['verdict']}** (accuracy difference {d['mean']:+.3f}, sd {d['sd']:.3f} over "
                     f"{d['n']} seeds).")
    if not results["verdicts"]:
        lines.append("- The models given do not include a pair the paper compares.")
    lines += ["", "A difference is called only when its mean exceeds two standard errors of the per-seed differences.", ""]
    if results.get("figures"):
        lines += ["Figures: " + ", ".join(f"[{p}]({p})" for p in results["figures"]), ""]
    return "\n".join(lines)

