"""The ``nested-learning`` command line (one click group).

Heavy imports (numpy, the reference, numba, cupy) happen inside the commands, so ``--help`` is
instant and never imports numba or cupy. User errors are ``click.ClickException`` /
``click.BadParameter`` (exit 2 for usage errors, 1 for a failed check).
"""

from __future__ import annotations

import sys

import click

# Reference modules whose GRADCHECKS ``nested-learning check`` runs (SPEC.md#gradient-checks).
GRADCHECK_MODULES = ("primitives", "memory", "mlp_memory")

# Tolerance of the float64 central-difference checks (tests/tolerances.py, ("float64", "gradcheck")).
CHECK_TOLERANCE = 1e-6


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nested-learning")
def cli() -> None:
    """Nested Learning (arXiv 2512.24695v1): reference, checks and training from the shell."""


@cli.command()
def info() -> None:
    """Print versions, BLAS and thread settings, and whether a GPU is usable."""
    import importlib.metadata as md
    import os
    import platform

    import nested_learning

    click.echo(f"nested-learning {nested_learning.__version__} (spec {nested_learning.SPEC_VERSION}, "
               f"paper {nested_learning.PAPER})")
    click.echo(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    for dist in ("numpy", "numba", "llvmlite", "scipy", "click", "safetensors", "cupy-cuda12x", "torch"):
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            version = "not installed"
        click.echo(f"  {dist:<14} {version}")
    click.echo(f"cpu cores: {os.cpu_count()}")
    try:
        import numpy  # noqa: F401  (loads the BLAS so threadpoolctl can see it)
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            click.echo(f"  threadpool {pool.get('user_api')}: {pool.get('internal_api')} "
                       f"{pool.get('version')}, {pool.get('num_threads')} threads")
    except ImportError:
        click.echo("  threadpoolctl not installed: BLAS threads unknown")
    try:
        import numba

        click.echo(f"numba threads: {numba.config.NUMBA_NUM_THREADS}")
    except ImportError:
        click.echo("numba: not importable")
    click.echo(f"gpu: {_gpu_status()}")


def _gpu_status() -> str:
    try:
        import cupy
    except ImportError:
        return "not usable (CuPy is not installed: pip install 'nested-learning[gpu]')"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n == 0:
            return "not usable (CuPy found no CUDA device)"
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"usable: {n} device(s), device 0 is {name}"
    except Exception as exc:  # a driver or runtime error is a status to report, not a crash
        return f"not usable ({type(exc).__name__}: {exc})"


@cli.command()
@click.option("--only", default=None, metavar="SUBSTRING", help="Run only the cases whose name contains this.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random configurations.")
def check(only: str | None, seed: int) -> None:
    """Run the reference's float64 gradient checks; exit 1 if any fails.

    For every registered op (GRADCHECKS of each reference module) this draws a small random
    configuration, compares the hand-written gradient with central differences entry by entry
    and runs the dot-product test, and prints one row per op.
    """
    import importlib

    import numpy as np

    from nested_learning.reference.gradcheck import check_gradients

    cases = []
    for module_name in GRADCHECK_MODULES:
        module = importlib.import_module(f"nested_learning.reference.{module_name}")
        for name, make in module.GRADCHECKS.items():
            if only is None or only in name:
                cases.append((name, make))
    if not cases:
        raise click.BadParameter(f"no gradient check matches {only!r}", param_hint="--only")

    width = max(len(name) for name, _ in cases)
    click.echo(f"{'op':<{width}}  {'max rel error':>13}  {'tolerance':>9}  result")
    failed = []
    for i, (name, make) in enumerate(cases):
        rng = np.random.default_rng([seed, i])
        loss, inputs, grads = make(rng)
        errors = check_gradients(loss, inputs, grads, rng)
        worst = max(errors.values())
        ok = bool(np.isfinite(worst) and worst <= CHECK_TOLERANCE)
        if not ok:
            failed.append(name)
        click.echo(f"{name:<{width}}  {worst:>13.2e}  {CHECK_TOLERANCE:>9.0e}  {'OK' if ok else 'FAIL'}")
    click.echo(f"{len(cases) - len(failed)} passed, {len(failed)} failed")
    if failed:
        click.echo("failed: " + ", ".join(failed), err=True)
        sys.exit(1)


def main() -> None:
    cli(prog_name="nested-learning")


if __name__ == "__main__":
    main()
