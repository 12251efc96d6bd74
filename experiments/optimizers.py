"""``experiment optimizers``: M3 vs AdamW vs Muon vs the deep optimizers, on a small language model
and on a least-squares problem with a known optimum.

Paper: §4 (optimizers as associative memories: momentum Eq. 33, preconditioned momentum, delta
momentum Eq. 49, deep momentum Eq. 50, Muon Eq. 42) and §7.2 (M3, Eq. 75 / Algorithm 1; the
paper reports M3 ahead of AdamW and Muon), arXiv 2512.24695v1. SPEC.md#optimizers has the rules.

**Question.** At the same budget, with each optimizer's learning rate tuned on the training loss,
does M3 reach a lower held-out loss than AdamW, Muon, momentum and the deep optimizers (delta,
deep and preconditioned momentum), and a smaller gap to the optimum of a least-squares problem?

Tasks:

- **(a) language modelling.** One fixed model (transformer-tiny at smoke / quick, transformer-small
  at full; ``--model`` replaces it), trained through ``training.train`` (``common.train_phase``:
  warmup + cosine schedule, gradient clipping at 1, the same for every optimizer) on the python
  domain's training files, scored on its held-out files (``compare.heldout_loss``: the by-file
  split, checked before every evaluation). Every optimizer gets the same steps, batch, windows and
  seeds, so the same token budget and data order.
- **(b) linear least squares.** ``L(W) = ||X W^T - Y||_F^2 / (2n)``, ``W`` one ``(d_out, d_in)``
  matrix (so Muon's and M3's orthogonalisation act on the whole problem), ``X`` of condition number
  ``kappa`` (singular values log-spaced in ``[1 / kappa, 1] * sqrt(n)``, so the curvatures
  ``eig(X^T X / n)`` lie in ``[1 / kappa^2, 1]``), ``Y = X W_true^T + noise``.
  Its optimum is unique (``n >= d_in``, ``X`` full rank): the normal equations
  ``W_opt^T = (X^T X)^{-1} X^T Y`` (``optimum``). Full-batch gradients, float64, ``W_0 = 0``,
  ``reference/optimizers.make`` driven directly in NumPy with the same lr schedule as (a)
  (``training.lr_at``: warmup steps // 10, cosine to 0.1 lr). Reported: the gap
  ``L(W_T) - L(W_opt) = tr(D H D^T) / 2`` (``D = W_T - W_opt``, ``H = X^T X / n``: exact for a
  quadratic, no cancellation) and its ratio to the starting gap. Seeds draw X, W_true and the noise.

Decisions:

- **Learning rates: a small sweep per optimizer and task, on the training loss only.** Fixed
  defaults would compare the defaults, not the optimizers (their lr units differ: ``momentum``
  steps in parameter units, Muon by an orthogonal matrix, M3 divides an orthogonal matrix by a
  second-moment sum). Each optimizer's grid is ``n`` consecutive values of the half-decade ladder
  ``1, 3, 10, 30 ...`` around its centre (``LM_CENTRES``, ``REGRESSION_CENTRES``: set from one
  exploratory sweep of the training loss at the quick scale); when the best value is at an end of
  what was tried, the next ladder value beyond it is tried too (at most ``extend`` times), and a
  choice still at an edge is marked in the report. A diverged run scores +inf. Ties go to the
  smaller lr. The sweep runs on ``SWEEP_SEED``, which is none of the reported seeds (another
  initialisation, data order and least-squares instance), so the reported runs are not the ones
  the lr was picked on.
- The LM sweep's score is the mean training loss over the last quarter of the run's steps
  (``metrics.jsonl``'s training rows; the same batches for every lr). It never reads held-out
  data: a sweep gets only the folder of training files, and the held-out windows are built after
  every sweep has finished (tests/runs/test_experiments_optimizers.py makes held-out reads raise
  during the sweep). The regression has nothing held out: its objective is its training loss.
- Every other hyper-parameter is the optimizer's default (``reference/optimizers.DEFAULTS``: the
  paper's forms, e.g. M3's Algorithm 1 sums, deep momentum's hidden width 8), recorded in
  results.json.
- Comparisons are paired by seed against the first optimizer (M3 by default): the LM's held-out
  loss, the regression's log10 relative gap; a run that diverges is recorded and left out of the
  mean (the report says how many).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from nlref.experiments import common, compare
from nlref.experiments.common import ModelSpec

DEFAULT_OPTIMIZERS = ("m3", "adamw", "muon", "delta_momentum", "deep_momentum", "preconditioned_momentum",
                      "momentum")
"""M3 first (the question's subject), the usual baselines, the deep optimizers, classic momentum."""

SWEEP_SEED = 1000
"""The seed of every lr-sweep run: none of the reported seeds 0 .. N-1."""

LADDER = tuple(float(f"{m}e{e}") for e in range(-6, 4) for m in (1, 3))
"""The half-decade learning-rate ladder 1e-6, 3e-6, ..., 1000, 3000."""

# Each optimizer's grid centre (a LADDER value), from one exploratory sweep of the training loss
# at the quick scale; the grid extends past an end that wins (module docstring).
LM_CENTRES = {"m3": 1e-2, "adamw": 3e-2, "muon": 3e-2, "delta_momentum": 0.3, "deep_momentum": 0.3,
              "preconditioned_momentum": 3e-3, "momentum": 0.3, "sgd": 1.0, "adam": 3e-2, "adagrad": 0.1}
REGRESSION_CENTRES = {"m3": 3e-3, "adamw": 0.3, "muon": 0.3, "delta_momentum": 1.0, "deep_momentum": 1.0,
                      "preconditioned_momentum": 0.3, "momentum": 1.0, "sgd": 10.0, "adam": 0.3, "adagrad": 1.0}


@dataclass(frozen=True)
class LMScale:
    model: str
    steps: int
    batch_size: int
    seq_len: int
    eval_windows: int
    grid: int  # lr values per optimizer before extending
    extend: int  # at most this many values past a winning end
    centre_shift: int  # ladder steps to move every centre by (the small model takes smaller lrs)


@dataclass(frozen=True)
class RegressionScale:
    n: int
    d_in: int
    d_out: int
    kappa: float
    noise: float
    steps: int
    grid: int
    extend: int


SCALES = {
    "smoke": (LMScale("transformer-tiny", steps=3, batch_size=2, seq_len=32, eval_windows=4, grid=2, extend=0,
                      centre_shift=0),
              RegressionScale(n=64, d_in=16, d_out=8, kappa=10.0, noise=0.5, steps=40, grid=2, extend=0)),
    "quick": (LMScale("transformer-tiny", steps=200, batch_size=8, seq_len=64, eval_windows=32, grid=4, extend=2,
                      centre_shift=0),
              RegressionScale(n=256, d_in=32, d_out=16, kappa=100.0, noise=0.5, steps=300, grid=5, extend=3)),
    "full": (LMScale("transformer-small", steps=300, batch_size=4, seq_len=128, eval_windows=64, grid=4, extend=2,
                     centre_shift=-1),
             RegressionScale(n=512, d_in=64, d_out=32, kappa=100.0, noise=0.5, steps=1000, grid=6, extend=4)),
}


# ------------------------------------------------------------------------------------------------
# The learning-rate sweep (shared by both tasks)
# ------------------------------------------------------------------------------------------------


def lr_grid(centre: float, n: int, shift: int = 0) -> list[float]:
    """``n`` consecutive LADDER values around ``centre`` (moved ``shift`` ladder steps)."""
    i = min(range(len(LADDER)), key=lambda j: abs(math.log(LADDER[j] / centre))) + shift
    lo = max(0, min(len(LADDER) - n, i - (n - 1) // 2))
    return list(LADDER[lo:lo + n])


def sweep(grid, score, extend: int) -> dict:
    """Score every lr of ``grid`` (``score(lr)`` -> float, +inf when the run diverged), then extend past
    a winning end (or below the lowest when every run diverged) up to ``extend`` times.

    Returns {"tried": [{"lr", "score"}] in lr order, "chosen" (None when all diverged), "at_edge"}."""
    scores = {lr: float(score(lr)) for lr in grid}

    def best():
        finite = [lr for lr in sorted(scores) if math.isfinite(scores[lr])]
        return min(finite, key=lambda lr: scores[lr]) if finite else None

    for _ in range(extend):
        b, lrs = best(), sorted(scores)
        i = LADDER.index(lrs[0]) - 1 if b is None or b == lrs[0] else (
            LADDER.index(lrs[-1]) + 1 if b == lrs[-1] else None)
        if i is None or not 0 <= i < len(LADDER):
            break
        scores[LADDER[i]] = float(score(LADDER[i]))
    b, lrs = best(), sorted(scores)
    return {"tried": [{"lr": lr, "score": scores[lr] if math.isfinite(scores[lr]) else None,
                       "diverged": not math.isfinite(scores[lr])} for lr in lrs],
            "chosen": b, "at_edge": b is not None and len(lrs) > 1 and b in (lrs[0], lrs[-1])}


# ------------------------------------------------------------------------------------------------
# (a) language modelling
# ------------------------------------------------------------------------------------------------


def _sweep_criterion(run_dir, steps: int) -> float:
    """The LM sweep's score: the mean training loss over the last quarter of the run's steps."""
    curve = compare.train_curve(run_dir, 1)
    tail = [loss for step, loss in curve if step > steps - max(1, steps // 4)]
    return sum(tail) / len(tail)


def sweep_lm(spec: ModelSpec, opt: str, *, train_dir, out, sc: LMScale, backend: str, echo) -> dict:
    """The lr sweep of ``opt`` on the LM task: training runs on ``SWEEP_SEED`` over the folder of
    training files ``train_dir`` only, scored by ``_sweep_criterion`` (never held-out data)."""
    from nlref import training

    def score(lr):
        run_dir = out / "runs" / "sweep" / opt / f"lr{lr:g}"
        try:
            common.train_phase(spec, data_dir=train_dir, run_dir=run_dir, seed=SWEEP_SEED, steps=sc.steps,
                               batch_size=sc.batch_size, seq_len=sc.seq_len, lr=lr, backend=backend, optimizer=opt)
        except common.Diverged:
            echo(f"  sweep {opt} lr {lr:g}: diverged")
            return math.inf
        (run_dir / training.CHECKPOINT_NAME).unlink(missing_ok=True)  # the sweep keeps its metrics only
        s = _sweep_criterion(run_dir, sc.steps)
        echo(f"  sweep {opt} lr {lr:g}: training loss {s:.4f}")
        return s

    return sweep(lr_grid(LM_CENTRES.get(opt, 1e-2), sc.grid, sc.centre_shift), score, sc.extend)


def _lm_task(optimizers, spec, sc: LMScale, seed_list, backend, out, echo) -> dict:
    """Sweep every optimizer's lr on training runs, then (only then) build the held-out windows and
    train + score every optimizer on every seed at its chosen lr."""
    from nlref.experiments import domains as dom

    domain = compare.pick_domains()[0]
    train_dir = dom.materialise_train(domain, out / "data" / domain.name / "train")
    sweeps = {}
    for opt in optimizers:
        sweeps[opt] = sweep_lm(spec, opt, train_dir=train_dir, out=out, sc=sc, backend=backend, echo=echo)
        echo(f"  {opt}: lr {sweeps[opt]['chosen']} chosen on the training loss"
             f"{' (at the edge of the grid)' if sweeps[opt]['at_edge'] else ''}")
    stream, used = compare.heldout_windows(domain, sc.seq_len, sc.eval_windows)
    runs = []
    for opt in optimizers:
        lr = sweeps[opt]["chosen"]
        for seed in seed_list:
            row = {"optimizer": opt, "seed": seed, "lr": lr, "heldout_loss": None, "diverged": False}
            if lr is None:
                row.update(diverged=True, error="every lr of the sweep diverged")
                runs.append(row)
                continue
            run_dir = out / "runs" / opt / f"seed{seed}"
            try:
                params, summary, rc = common.train_phase(spec, data_dir=train_dir, run_dir=run_dir, seed=seed,
                                                         steps=sc.steps, batch_size=sc.batch_size,
                                                         seq_len=sc.seq_len, lr=lr, backend=backend, optimizer=opt)
            except common.Diverged as exc:
                row.update(diverged=True, error=str(exc), train_curve=compare.train_curve(run_dir, 1))
                runs.append(row)
                echo(f"  {opt} seed {seed}: diverged")
                continue
            row["heldout_loss"] = compare.heldout_loss(params, rc, domain, stream, used, seq_len=sc.seq_len,
                                                       n_windows=sc.eval_windows, backend=backend)
            row.update(final_train_loss=summary["final_train_loss"], train_curve=compare.train_curve(run_dir, 1),
                       wall_time_s=summary["wall_time_s"])
            runs.append(row)
            echo(f"  {opt} seed {seed}: held-out loss {row['heldout_loss']:.4f} (lr {lr:g}, "
                 f"{summary['wall_time_s']:.1f} s)")
    return {"model": common.model_facts(spec, backend), "domain": domain.info(), "heldout_files": list(used),
            "tokens_per_run": sc.steps * sc.batch_size * sc.seq_len, "sweep": sweeps, "runs": runs,
            **_stats(optimizers, runs, "heldout_loss")}


# ------------------------------------------------------------------------------------------------
# (b) linear least squares with a known optimum
# ------------------------------------------------------------------------------------------------


def problem(seed: int, sc: RegressionScale) -> dict:
    """The least-squares instance of ``seed``: X (n, d_in), Y (n, d_out) (module docstring)."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed, 53]))
    U, _ = np.linalg.qr(rng.standard_normal((sc.n, sc.d_in)))
    V, _ = np.linalg.qr(rng.standard_normal((sc.d_in, sc.d_in)))
    s = np.logspace(-math.log10(sc.kappa), 0.0, sc.d_in)
    X = math.sqrt(sc.n) * (U * s) @ V.T
    W_true = rng.standard_normal((sc.d_out, sc.d_in)) / math.sqrt(sc.d_in)
    Y = X @ W_true.T + sc.noise * rng.standard_normal((sc.n, sc.d_out))
    return {"X": X, "Y": Y}


def loss(W, X, Y) -> float:
    R = X @ W.T - Y
    return 0.5 * float((R * R).sum()) / X.shape[0]


def grad(W, X, Y):
    """dL/dW = (X W^T - Y)^T X / n, shape (d_out, d_in)."""
    return (X @ W.T - Y).T @ X / X.shape[0]


def optimum(X, Y):
    """W_opt from the normal equations (X^T X) W^T = X^T Y."""
    import numpy as np

    return np.linalg.solve(X.T @ X, X.T @ Y).T


def gap(W, W_opt, X) -> float:
    """L(W) - L(W_opt) = tr(D (X^T X / n) D^T) / 2 with D = W - W_opt (exact: L is quadratic and its
    gradient vanishes at W_opt)."""
    D = (W - W_opt) @ X.T
    return 0.5 * float((D * D).sum()) / X.shape[0]


def regression_run(opt_name: str, lr: float, seed: int, sc: RegressionScale, every: int = 1) -> dict:
    """``steps`` full-batch steps of ``opt_name`` from W = 0 on instance ``seed``: the gap curve
    [(step, gap)] every ``every`` steps, the final gap and its ratio to the starting gap."""
    import numpy as np

    from nlref import training
    from nlref.reference import optimizers as ref_opt

    P = problem(seed, sc)
    X, Y = P["X"], P["Y"]
    W_opt = optimum(X, Y)
    tc = training.TrainConfig(steps=sc.steps, lr=lr, backend="reference")
    params = {"W": np.zeros((sc.d_out, sc.d_in))}
    state = ref_opt.make(opt_name, lr=lr).init(params)
    g0 = gap(params["W"], W_opt, X)
    curve, diverged = [(0, g0)], False
    for t in range(sc.steps):
        try:
            params, state = ref_opt.make(opt_name, lr=training.lr_at(t, tc)).update(
                params, {"W": grad(params["W"], X, Y)}, state)
        except ValueError:  # a non-finite gradient
            diverged = True
            break
        g = gap(params["W"], W_opt, X)
        if not (math.isfinite(g) and g <= 1e8 * g0):
            diverged = True
            break
        if (t + 1) % every == 0 or t + 1 == sc.steps:
            curve.append((t + 1, g))
    final = None if diverged else curve[-1][1]
    return {"optimizer": opt_name, "seed": seed, "lr": lr, "diverged": diverged, "initial_gap": g0, "gap": final,
            "relative_gap": None if diverged else final / g0,
            "log10_relative_gap": None if diverged else math.log10(max(final / g0, 1e-300)),
            "optimum_loss": loss(W_opt, X, Y), "curve": curve}


def _regression_task(optimizers, sc: RegressionScale, seed_list, echo) -> dict:
    every, sweeps = max(1, sc.steps // 200), {}
    for opt in optimizers:
        def score(lr, opt=opt):
            r = regression_run(opt, lr, SWEEP_SEED, sc, every=sc.steps)
            return math.inf if r["diverged"] else r["gap"]
        sweeps[opt] = sweep(lr_grid(REGRESSION_CENTRES.get(opt, 1e-2), sc.grid), score, sc.extend)
    runs = []
    for opt in optimizers:
        lr = sweeps[opt]["chosen"]
        for seed in seed_list:
            if lr is None:
                runs.append({"optimizer": opt, "seed": seed, "lr": None, "diverged": True, "gap": None,
                             "log10_relative_gap": None, "error": "every lr of the sweep diverged"})
                continue
            runs.append(regression_run(opt, lr, seed, sc, every=every))
        r = [x for x in runs if x["optimizer"] == opt]
        echo(f"  regression {opt}: lr {lr}, log10 relative gap "
             + ", ".join("diverged" if x["diverged"] else f"{x['log10_relative_gap']:.2f}" for x in r))
    return {"problem": {**asdict(sc), "loss": "||X W^T - Y||_F^2 / (2n)", "start": "W = 0",
                        "optimum": "normal equations (X^T X) W^T = X^T Y"},
            "sweep": sweeps, "runs": runs, **_stats(optimizers, runs, "log10_relative_gap")}


# ------------------------------------------------------------------------------------------------
# Statistics, the run, the outputs
# ------------------------------------------------------------------------------------------------


def _stats(optimizers, runs, key: str) -> dict:
    """Per optimizer: mean ± sd of ``key`` over its finite seeds, diverged count; paired differences to
    the first optimizer over the seeds where both are finite."""
    def by_seed(opt):
        return {r["seed"]: r[key] for r in runs if r["optimizer"] == opt and r[key] is not None}

    summary = {o: {**common.mean_sd(by_seed(o).values()),
                   "diverged": sum(1 for r in runs if r["optimizer"] == o and r["diverged"])} for o in optimizers}
    ref = by_seed(optimizers[0])
    vs_first = {}
    for o in optimizers[1:]:
        mine = by_seed(o)
        both = sorted(set(mine) & set(ref))
        vs_first[o] = common.paired_difference([mine[s] for s in both], [ref[s] for s in both])
    ranking = sorted((o for o in optimizers if summary[o]["n"]), key=lambda o: summary[o]["mean"])
    return {"summary": summary, "vs_first": vs_first, "ranking": ranking}


def _check_optimizers(names) -> list[str]:
    from nlref import training

    names = list(dict.fromkeys(names)) if names else list(DEFAULT_OPTIMIZERS)
    bad = [n for n in names if n not in training.OPTIMIZERS]
    if bad:
        raise common.ExperimentError(f"--optimizer {bad[0]}: unknown; valid: {', '.join(training.OPTIMIZERS)}")
    return names


def run(out, *, scale_name: str = "quick", n_seeds: int = 3, backend: str | None = None, models=None,
        echo=print, optimizers=()) -> dict:
    """Both tasks for every optimizer (``optimizers``: names, default DEFAULT_OPTIMIZERS) on every seed;
    results.json, report.md and optimizers.png into ``out``."""
    from nlref import backends
    from nlref.reference import optimizers as ref_opt

    t_start = time.perf_counter()
    lm_sc, reg_sc = SCALES[scale_name]
    names = _check_optimizers(optimizers)
    backend = backend or backends.default()
    common.backend_model(backend)
    if models and len(models) > 1:
        raise common.ExperimentError("experiment optimizers trains one model (the LM task's); give one --model")
    spec = models[0] if models else ModelSpec(lm_sc.model, lm_sc.model)
    seed_list = common.seeds(n_seeds)
    out = common.out_dir(out)
    facts = common.model_facts(spec, backend)
    echo(f"optimizers {', '.join(names)}; LM task: {spec.label} ({facts['parameters']:,} parameters), "
         f"{lm_sc.steps} steps of {lm_sc.batch_size}x{lm_sc.seq_len} bytes; seeds {seed_list}, lr sweeps on seed "
         f"{SWEEP_SEED}")
    t0 = time.perf_counter()
    lm = _lm_task(names, spec, lm_sc, seed_list, backend, out, echo)
    lm["wall_time_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):  # as training.train: reproducible sums, no thread
        reg = _regression_task(names, reg_sc, seed_list, echo)  # contention on a shared machine
    reg["wall_time_s"] = time.perf_counter() - t0
    results = {"experiment": "optimizers", "scale": scale_name,
               "scale_config": {"lm": asdict(lm_sc), "regression": asdict(reg_sc)}, "backend": backend,
               "seeds": seed_list, "sweep_seed": SWEEP_SEED, "optimizers": names,
               "hparams": {n: {k: v for k, v in ref_opt.DEFAULTS[n].items() if k != "lr"} for n in names},
               "lm": lm, "regression": reg, "machine": common.machine(),
               "wall_time_s": time.perf_counter() - t_start}
    results["figures"] = [p.name for p in _figure(out, results)]
    common.write_outputs(out, results, report(results))
    echo(f"optimizers: done in {results['wall_time_s']:.0f} s; {out / 'report.md'}")
    return results


def _figure(out, res):
    plt = common.pyplot()
    if plt is None:
        return []
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, opt in enumerate(res["optimizers"]):
        c = colours[i % len(colours)]
        for j, r in enumerate(r for r in res["lm"]["runs"] if r["optimizer"] == opt and r.get("train_curve")):
            xs, ys = zip(*r["train_curve"], strict=True)
            a.plot(xs, ys, lw=0.7, color=c, alpha=0.8, label=opt if j == 0 else None)
        for j, r in enumerate(r for r in res["regression"]["runs"] if r["optimizer"] == opt and r.get("curve")):
            xs, ys = zip(*r["curve"], strict=True)
            b.plot(xs, np.maximum(np.asarray(ys), 1e-300), lw=0.7, color=c, alpha=0.8, label=opt if j == 0 else None)
    lm, reg = res["lm"], res["regression"]["problem"]
    a.set_title(f"(a) {lm['model']['label']} on {lm['domain']['name']}: training loss", fontsize=9)
    a.set_ylim(top=min(a.get_ylim()[1], 8.0))  # an early spike (M3's first steps) would flatten the rest
    a.set_xlabel("step")
    a.set_ylabel("training loss (nats/byte; axis cut at 8)")
    b.set_yscale("log")
    b.set_title(f"(b) least squares ({reg['d_out']}x{reg['d_in']}, kappa {reg['kappa']:g}): L(W) - L(W_opt)",
                fontsize=9)
    b.set_xlabel("step")
    b.set_ylabel("gap to the optimum")
    for ax in (a, b):
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "optimizers.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _lr_text(sw: dict) -> str:
    if sw["chosen"] is None:
        return "all diverged"
    return f"{sw['chosen']:g}" + (" (edge)" if sw["at_edge"] else "")


def _answer(task: dict, first: str, what: str) -> str:
    better = [o for o, d in task["vs_first"].items() if d["call"] == "lower"]
    worse = [o for o, d in task["vs_first"].items() if d["call"] == "higher"]
    noise = [o for o, d in task["vs_first"].items() if d["call"] not in ("lower", "higher")]
    parts = [f"best mean {what}: {task['ranking'][0] if task['ranking'] else 'none (all diverged)'}"]
    if worse:
        parts.append(f"{first} is ahead of {', '.join(worse)}")
    if better:
        parts.append(f"{first} is behind {', '.join(better)}")
    if noise:
        parts.append(f"within the seed noise of {first} (or not comparable): {', '.join(noise)}")
    return "; ".join(parts) + "."


def report(res) -> str:
    lm, reg, first = res["lm"], res["regression"], res["optimizers"][0]
    m = lm["model"]
    rows_lm = [[o, _lr_text(lm["sweep"][o]), common.fmt(lm["summary"][o]) if lm["summary"][o]["n"] else "-",
                lm["summary"][o]["diverged"],
                common.fmt(lm["vs_first"][o]) + f" ({lm['vs_first'][o]['call']})" if o in lm["vs_first"] else "reference"]
               for o in res["optimizers"]]
    rows_reg = [[o, _lr_text(reg["sweep"][o]), common.fmt(reg["summary"][o], 2) if reg["summary"][o]["n"] else "-",
                 reg["summary"][o]["diverged"],
                 common.fmt(reg["vs_first"][o], 2) + f" ({reg['vs_first'][o]['call']})" if o in reg["vs_first"]
                 else "reference"] for o in res["optimizers"]]
    p = reg["problem"]
    return (
        f"# optimizers\n\n**Question.** At the same budget, each optimizer's learning rate tuned on the training "
        f"loss only, does {first} reach a lower held-out language-modelling loss and a smaller gap to a "
        f"least-squares optimum than {', '.join(res['optimizers'][1:])}? (§7.2 reports M3 ahead of AdamW and "
        f"Muon at scale.)\n\n"
        f"**Answer at this scale.** (a) LM: {_answer(lm, first, 'held-out loss')} (b) least squares: "
        f"{_answer(reg, first, 'log10 relative gap')} A difference is called only beyond two standard errors of "
        f"the per-seed differences; with {len(res['seeds'])} seed(s) this is a rough test, and a "
        f"{m['parameters']:,}-parameter model trained on {lm['tokens_per_run']:,} bytes does not speak to the "
        f"paper's scale. An lr marked (edge) was best at the end of what its sweep tried: the optimizer may do "
        f"better outside it.\n\n"
        f"Seeds {res['seeds']} (lr sweeps on seed {res['sweep_seed']}, not reported), backend {res['backend']}, "
        f"wall time {res['wall_time_s']:.0f} s (LM {lm['wall_time_s']:.0f} s, least squares "
        f"{reg['wall_time_s']:.0f} s) on {common.machine_line(res['machine'])}. Every other hyper-parameter is "
        f"the optimizer's default (results.json `hparams`).\n\n"
        f"## (a) language modelling\n\n{m['label']} ({m['family']}, {m['parameters']:,} parameters), "
        f"{res['scale_config']['lm']['steps']} steps of {res['scale_config']['lm']['batch_size']} x "
        f"{res['scale_config']['lm']['seq_len']} bytes ({lm['tokens_per_run']:,} bytes per run, warmup + cosine, "
        f"gradient clip 1) on {compare.domain_line({'domains': [lm['domain']]})}; held-out loss on "
        f"{res['scale_config']['lm']['eval_windows']} windows from {len(lm['heldout_files'])} held-out files. "
        f"The lr is the one with the lowest mean training loss over the last quarter of a sweep run.\n\n"
        + common.md_table(["optimizer", "lr (sweep)", "held-out loss (mean ± sd)", "diverged seeds",
                           f"minus {first}"], rows_lm)
        + f"\n## (b) least squares\n\nmin over W ({p['d_out']} x {p['d_in']}) of ||X W^T - Y||^2 / (2n), "
        f"n = {p['n']}, cond(X) = {p['kappa']:g}, noise {p['noise']:g}, from W = 0, {p['steps']} full-batch steps "
        f"(warmup + cosine lr); the optimum from the normal equations. Reported: log10 of (L(W_T) - L(W_opt)) / "
        f"(L(W_0) - L(W_opt)) (lower is better); the lr is the one with the lowest final gap on the sweep seed's "
        f"instance.\n\n"
        + common.md_table(["optimizer", "lr (sweep)", "log10 relative gap (mean ± sd)", "diverged seeds",
                           f"minus {first}"], rows_reg))
