"""The paper's momentum toy (Eq. 53, Figure 4): standard vs delta momentum on a curved valley.

Paper: §4.4, Eq. (53), Figure 4, arXiv 2512.24695v1. SPEC: SPEC.md#optimizers.

    psi(r, theta) = r^2 + k (r - theta + alpha sin(omega r))^2        # Eq. (53)

minimised from (r0, theta0) = (-3.5, 2); the minimum is psi(0, 0) = 0. The parameter is one
vector ``x = (r, theta)`` of shape (2,), so delta momentum's decay ``G^T G`` is the 2x2 outer
product of the gradient (SPEC.md#optimizers).

Symbols:

| paper              | code            | shape |
| ------------------ | --------------- | ----- |
| (r, theta)         | x               | (2,)  |
| k, alpha, omega    | k, alpha, omega | scalars |
| psi                | psi(x, ...)     | scalar |

Decisions where the paper is open (SPEC.md#optimizers): the paper gives no values for k, alpha,
omega, the learning rates or the stopping rule. ``TOY_DEFAULTS`` records ours: k = 10, alpha = 0.5,
omega = 2, lr = 0.01, momentum = 0.9, delta = 0.1 (normalised form), zeta = 1e-4 (the printed,
un-normalised form), converged when ``psi < 1e-8`` for the first time, at most 2000 steps.
"""

from __future__ import annotations

import numpy as np

from . import optimizers

TOY_DEFAULTS = {"k": 10.0, "alpha": 0.5, "omega": 2.0, "lr": 0.01, "momentum": 0.9, "delta": 0.1, "zeta": 1e-4,
                "steps": 2000, "tol": 1e-8}
"""Our choices for the values Eq. (53) and Figure 4 leave open (SPEC.md#optimizers)."""

START = (-3.5, 2.0)
"""(r0, theta0) of Figure 4."""


def _check_x(x):
    x = np.asarray(x)
    if x.shape[-1:] != (2,) or not np.issubdtype(x.dtype, np.inexact):
        raise ValueError(f"x must be a float array of shape (..., 2) holding (r, theta), got {x.dtype} {x.shape}")
    return x


def psi(x, k=TOY_DEFAULTS["k"], alpha=TOY_DEFAULTS["alpha"], omega=TOY_DEFAULTS["omega"]):
    """Eq. (53) at ``x[..., 0] = r``, ``x[..., 1] = theta`` (analytic: accepts complex input)."""
    x = _check_x(x)
    r, theta = x[..., 0], x[..., 1]
    u = r - theta + alpha * np.sin(omega * r)
    return r * r + k * u * u  # Eq. (53)


def psi_grad(x, k=TOY_DEFAULTS["k"], alpha=TOY_DEFAULTS["alpha"], omega=TOY_DEFAULTS["omega"]):
    """Hand-written gradient of Eq. (53): ``(2r + 2k u (1 + alpha omega cos(omega r)), -2k u)``."""
    x = _check_x(x)
    r, theta = x[..., 0], x[..., 1]
    u = r - theta + alpha * np.sin(omega * r)
    dr = 2 * r + 2 * k * u * (1 + alpha * omega * np.cos(omega * r))
    dtheta = -2 * k * u
    return np.stack([dr, dtheta], axis=-1)


def run(name: str, hparams: dict, steps: int = TOY_DEFAULTS["steps"], k=TOY_DEFAULTS["k"],
        alpha=TOY_DEFAULTS["alpha"], omega=TOY_DEFAULTS["omega"], start=START) -> np.ndarray:
    """The trajectory ``(<= steps + 1, 2)`` of optimizer ``name`` (optimizers.make) on Eq. (53);
    it stops early, shorter, when the iterate diverges (``|x| > 1e6`` or a non-finite gradient)."""
    opt = optimizers.make(name, **hparams)
    params = {"x": np.array(start, dtype=np.float64)}
    state = opt.init(params)
    path = [params["x"]]
    for _ in range(steps):
        with np.errstate(all="ignore"):
            grads = {"x": psi_grad(params["x"], k, alpha, omega)}
        if not np.all(np.isfinite(grads["x"])) or np.max(np.abs(params["x"])) > 1e6:
            break  # diverged: the optimizers refuse non-finite gradients, so stop here
        params, state = opt.update(params, grads, state)
        path.append(params["x"])
    return np.stack(path)  # (steps + 1, 2)


def steps_to_converge(path: np.ndarray, tol: float = TOY_DEFAULTS["tol"], **psi_kw) -> int | None:
    """First step t with ``psi(path[t]) < tol``, or None if never."""
    values = psi(path, **psi_kw)
    hits = np.flatnonzero(values < tol)
    return int(hits[0]) if hits.size else None


def compare(k=TOY_DEFAULTS["k"], alpha=TOY_DEFAULTS["alpha"], omega=TOY_DEFAULTS["omega"],
            lr=TOY_DEFAULTS["lr"], momentum=TOY_DEFAULTS["momentum"], delta=TOY_DEFAULTS["delta"],
            zeta=TOY_DEFAULTS["zeta"], steps=TOY_DEFAULTS["steps"], tol=TOY_DEFAULTS["tol"]) -> list[dict]:
    """Standard momentum vs delta momentum (normalised with ``delta``, and the printed
    un-normalised form ``m (alpha I - zeta G^T G) - lr G``) at the same lr and momentum. Rows: name, hparams, steps to converge (None = not within ``steps``),
    final psi, and the trajectory."""
    runs = [
        ("momentum", {"lr": lr, "momentum": momentum}),
        ("delta_momentum", {"lr": lr, "momentum": momentum, "delta": delta, "normalize": True}),
        ("delta_momentum (printed form)", {"lr": lr, "momentum": momentum, "delta": zeta, "normalize": False}),
    ]
    rows = []
    for label, hp in runs:
        path = run(label.split(" ")[0], hp, steps, k, alpha, omega)
        rows.append({"name": label, "hparams": hp,
                     "steps": steps_to_converge(path, tol, k=k, alpha=alpha, omega=omega),
                     "final_psi": float(psi(path[-1], k, alpha, omega)) if len(path) == steps + 1 else float("inf"),
                     "diverged": len(path) < steps + 1, "path": path})
    return rows


def plot(rows: list[dict], path_png, k=TOY_DEFAULTS["k"], alpha=TOY_DEFAULTS["alpha"],
         omega=TOY_DEFAULTS["omega"]) -> None:
    """Contours of psi and each trajectory, written to ``path_png`` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.linspace(-4.5, 2.0, 300)
    th = np.linspace(-3.0, 3.0, 300)
    R, TH = np.meshgrid(r, th)
    Z = psi(np.stack([R, TH], axis=-1), k, alpha, omega)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    ax.contour(R, TH, np.log10(Z + 1e-12), levels=30, cmap="Greys", linewidths=0.6)
    for row in rows:
        p = row["path"]
        label = f"{row['name']} ({row['steps'] if row['steps'] is not None else 'not'} steps)"
        ax.plot(p[:, 0], p[:, 1], lw=1.0, label=label)
    ax.plot(*START, "ko")
    ax.plot(0, 0, "k*", ms=12)
    ax.set_xlabel("r")
    ax.set_ylabel("theta")
    ax.set_title(f"Eq. (53): k={k}, alpha={alpha}, omega={omega}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
