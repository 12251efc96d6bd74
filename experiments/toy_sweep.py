"""``experiment toy-momentum``: the Eq. 53 toy over a grid of (k, alpha, omega, eta).

Paper: §4.4, Eq. (53), Figure 4 (delta momentum reaches the minimum of a curved valley where
standard momentum oscillates), arXiv 2512.24695v1. Question: over which (k, alpha, omega, eta)
does delta momentum (normalised form, ``delta`` of reference/toy.py's TOY_DEFAULTS) converge in
fewer steps than standard momentum, and where not? Both use the same eta and momentum 0.9 and
start from (-3.5, 2); the run is reference/toy.py's, unchanged. Deterministic: no seeds.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from . import common

SCALES = {
    "smoke": {"k": [1.0, 10.0], "alpha": [0.5], "omega": [2.0], "eta": [0.01], "steps": 300},
    "quick": {"k": [1.0, 10.0, 100.0], "alpha": [0.0, 0.5, 1.0], "omega": [1.0, 2.0, 4.0],
              "eta": [0.001, 0.003, 0.01], "steps": 2000},
    "full": {"k": [1.0, 3.0, 10.0, 30.0, 100.0], "alpha": [0.0, 0.25, 0.5, 1.0, 2.0],
             "omega": [0.5, 1.0, 2.0, 4.0, 8.0], "eta": [0.0003, 0.001, 0.003, 0.01, 0.03], "steps": 2000},
}


def _outcome(path, steps, tol, **kw):
    from nlref.reference import toy

    n = toy.steps_to_converge(path, tol, **kw)
    diverged = len(path) < steps + 1
    return {"steps": n, "diverged": diverged, "final_psi": None if diverged else float(toy.psi(path[-1], **kw))}


def verdict(std: dict, dm: dict) -> str:
    """'delta faster', 'momentum faster', 'tie', 'only delta converges', 'only momentum converges', 'neither'."""
    a, b = std["steps"], dm["steps"]
    if a is None and b is None:
        return "neither"
    if a is None:
        return "only delta converges"
    if b is None:
        return "only momentum converges"
    return "delta faster" if b < a else "momentum faster" if b > a else "tie"


def run(out, scale_name="quick", echo=None, models=None, n_seeds=None, backend=None) -> dict:
    from nlref.reference import toy

    echo = echo or (lambda _m: None)
    if models:
        raise common.ExperimentError("experiment toy-momentum takes no --model (the toy has no model)")
    sc = SCALES[scale_name]
    out = common.out_dir(out)
    d = toy.TOY_DEFAULTS
    t0 = time.perf_counter()
    cells = []
    for k, alpha, omega, eta in itertools.product(sc["k"], sc["alpha"], sc["omega"], sc["eta"]):
        kw = {"k": k, "alpha": alpha, "omega": omega}
        std = _outcome(toy.run("momentum", {"lr": eta, "momentum": d["momentum"]}, sc["steps"], **kw),
                       sc["steps"], d["tol"], **kw)
        dm = _outcome(toy.run("delta_momentum", {"lr": eta, "momentum": d["momentum"], "delta": d["delta"],
                                                  "normalize": True}, sc["steps"], **kw), sc["steps"], d["tol"], **kw)
        cells.append({**kw, "eta": eta, "momentum": std, "delta_momentum": dm, "verdict": verdict(std, dm)})
    wall = time.perf_counter() - t0
    counts = {}
    for c in cells:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    echo(f"toy-momentum sweep: {len(cells)} cells in {wall:.1f} s: " +
         ", ".join(f"{v} {n}" for v, n in sorted(counts.items())))
    results = {"experiment": "toy-momentum", "scale": scale_name, "grid": sc, "momentum": d["momentum"],
               "delta": d["delta"], "tol": d["tol"], "start": list(toy.START), "cells": cells, "counts": counts,
               "wall_s": wall, "machine": common.machine()}
    figure = _figure(out, cells, sc)
    results["figures"] = [figure.name] if figure else []
    common.write_outputs(out, results, _report(results))
    return results


_CODES = {"delta faster": 2, "only delta converges": 3, "tie": 0, "neither": 0, "momentum faster": -2,
          "only momentum converges": -3}


def _figure(out: Path, cells, sc):
    plt = common.pyplot()
    if plt is None:
        return None
    import numpy as np

    rows = [(a, o) for a in sc["alpha"] for o in sc["omega"]]
    cols = [(k, e) for k in sc["k"] for e in sc["eta"]]
    grid = np.zeros((len(rows), len(cols)))
    for c in cells:
        grid[rows.index((c["alpha"], c["omega"])), cols.index((c["k"], c["eta"]))] = _CODES[c["verdict"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(cols) + 2), max(3, 0.4 * len(rows) + 1.5)))
    im = ax.imshow(grid, cmap="RdBu", vmin=-3, vmax=3, aspect="auto")
    ax.set_xticks(range(len(cols)), [f"k={k:g}\neta={e:g}" for k, e in cols], fontsize=6, rotation=90)
    ax.set_yticks(range(len(rows)), [f"a={a:g}, w={o:g}" for a, o in rows], fontsize=6)
    ax.set_title("Eq. 53: blue = delta momentum wins (dark: only it converges), red = momentum wins", fontsize=8)
    fig.colorbar(im, ax=ax, ticks=[-3, -2, 0, 2, 3])
    fig.tight_layout()
    path = out / "toy_momentum_sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _report(res) -> str:
    n = len(res["cells"])
    wins = res["counts"].get("delta faster", 0) + res["counts"].get("only delta converges", 0)
    losses = res["counts"].get("momentum faster", 0) + res["counts"].get("only momentum converges", 0)
    rows = [[c["k"], c["alpha"], c["omega"], c["eta"], c["momentum"]["steps"], c["delta_momentum"]["steps"],
             c["verdict"]] for c in res["cells"]]
    return (f"# toy-momentum sweep (Eq. 53)\n\n**Question.** Where on (k, alpha, omega, eta) does delta momentum "
            f"(normalised, delta={res['delta']}) reach psi < {res['tol']:g} in fewer steps than standard momentum "
            f"(both momentum {res['momentum']}, start {tuple(res['start'])}, at most {res['grid']['steps']} steps)?\n\n"
            f"**Answer at this scale.** Delta momentum wins in {wins} of {n} cells, loses in {losses}, the rest are "
            f"ties or neither converges. Deterministic (no seeds): the counts are exact for this grid, but the grid "
            f"and the stopping rule are our choices (the paper gives no values). Wall time {res['wall_s']:.1f} s "
            f"on {common.machine_line(res['machine'])}.\n\n"
            + common.md_table(["k", "alpha", "omega", "eta", "momentum steps", "delta steps", "verdict"], rows))
