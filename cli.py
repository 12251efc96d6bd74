"""The ``nested-learning`` command line (one click group).

Heavy imports (numpy, the reference, numba, cupy) happen inside the commands, so ``--help`` is
instant and never imports numba or cupy. User errors are ``click.ClickException`` /
``click.BadParameter`` (exit 2 for usage errors, 1 for a failed check).
"""

from __future__ import annotations

import os
import sys

import click

from nlref import backends as _backends  # the backend names (imports no numpy, numba or cupy)
from nlref import progress  # the slow-start notice (imports the standard library only)
from nlref.reference import cases as _cases  # the case modules' names (imports no numpy)

# Reference modules whose gradient-check cases (reference/cases/<module>.py) ``nested-learning
# check`` runs, in order (SPEC.md#gradient-checks).
GRADCHECK_MODULES = _cases.MODULES

# Tolerance of the float64 central-difference checks (tests/tolerances.py, ("float64", "gradcheck")).
CHECK_TOLERANCE = 1e-6


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nested-learning-reference")
def cli() -> None:
    """Nested Learning (arXiv 2512.24695v1): reference, checks and training from the shell."""
    from nlref.fast.cpu import allocator  # ctypes only: no NumPy or Numba

    try:
        allocator.tune()  # large arrays reused from the heap (SPEC.md#fast-cpu; NL_CPU_MALLOC=default: off)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command()
@click.option("--model", "model_preset", default=None, metavar="PRESET",
              help="Print this model preset's parameter count per component and state size per sequence.")
def info(model_preset: str | None) -> None:
    """Print versions, BLAS and thread settings, and whether a GPU is usable.

    With --model PRESET (e.g. hope-small): the preset's configuration, its parameter count
    per component (summed over blocks) and its streaming state size per sequence.
    """
    if model_preset is not None:
        _model_info(model_preset)
        return
    import importlib.metadata as md
    import os
    import platform

    import nlref
    from nlref import distributed

    try:  # collective under mpiexec (the hosts are gathered); rank 0 alone prints
        world = distributed.world()
        layout = distributed.layout(world)
    except distributed.DistributedError as exc:
        raise click.ClickException(str(exc)) from None
    if not world.is_root:
        return
    click.echo(f"nested-learning {nlref.__version__} (spec {nlref.SPEC_VERSION}, "
               f"paper {nlref.PAPER})")
    click.echo(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    for dist in ("numpy", "numba", "llvmlite", "scipy", "click", "safetensors", "cupy-cuda12x", "torch", "mpi4py",
                 "mpich"):
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
    click.echo(f"layout: {layout}")


def _model_info(name: str) -> None:
    """``info --model PRESET``: sizes of a model preset (SPEC.md#hope)."""
    from nlref import config
    from nlref.reference import model

    try:
        cfg = config.preset(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    click.echo(f"model {cfg.name}: family {cfg.family}, vocab {cfg.vocab_size}, width {cfg.d_model}, "
               f"{cfg.n_layers} layers, {cfg.n_heads} heads, dtype {cfg.dtype}")
    for lv in cfg.cms_levels:
        period = "frozen" if lv.period is None else f"period {lv.period} tokens, eta {lv.eta:g}"
        if lv.period is not None and not cfg.cms_in_context:
            period = f"frozen (cms_in_context = false; period {lv.period} unused)"
        click.echo(f"  CMS level: hidden {lv.hidden}, {period}")
    counts = model.param_counts(cfg)
    width = max(len(k) for k in counts)
    click.echo("parameters per component (blocks.* summed over blocks):")
    for comp, n in counts.items():
        click.echo(f"  {comp:<{width}}  {n:>10,}")
    click.echo(f"  {'total':<{width}}  {sum(counts.values()):>10,}")
    size = model.state_size(cfg)
    line = f"state per sequence: {size['fixed']:,} floats fixed (in-context CMS weights and the versions the open level chunks re-run with, memory layers)"
    if size["per_token"]:
        line += f" + {size['per_token']:,} floats per token (attention cache)"
    if size["chunk_tokens"]:
        line += f" + up to {size['chunk_tokens']} tokens (the open CMS level chunks)"
    click.echo(line)
    from nlref.reference import readings

    for text in readings.lines(readings.model_readings(cfg)):  # SPEC.md#readings
        click.echo(text)


@cli.command("levels")
@click.option("--model", "model_preset", default="hope-small", show_default=True, metavar="PRESET",
              help="The model preset whose levels to list.")
@click.option("--batch-size", type=int, default=None, help="Sequences per outer step (default: train's, 4).")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence (default: train's, 128).")
@click.option("--optimizer", default=None, metavar="NAME",
              help="The outer optimizer (default: train's, adamw; any of train --optimizer's).")
@click.option("--json", "as_json", is_flag=True, help="Print the levels as JSON.")
def levels_(model_preset: str, batch_size: int | None, seq_len: int | None, optimizer: str | None,
            as_json: bool) -> None:
    """List every level of a model, fastest first (paper §3, Definitions 2-3).

    One row per attention layer (a cache, no write), sequence memory (written every token, read at
    its chunk starts), CMS level (every C^(l) tokens, or frozen), frozen MLP, the outer optimizer's
    memories and the outer parameters (every step of B x T tokens): its update frequency, context,
    objective, parameter count and the state it writes per sequence.
    """
    from nlref import config
    from nlref import levels as levels_mod

    try:
        cfg = config.preset(model_preset)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise click.BadParameter(f"must be >= 1, got {value}", param_hint=name)
    render = levels_mod.to_json if as_json else levels_mod.table
    try:
        text = render(cfg, batch_size, seq_len, optimizer)
    except ValueError as exc:  # an unknown optimizer: the message lists the valid names
        raise click.BadParameter(str(exc), param_hint="--optimizer") from None
    click.echo(text)


def _gpu_status() -> str:
    try:
        import cupy
    except ImportError:
        return "not usable (CuPy is not installed: pip install 'nested-learning-reference[gpu]')"
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

    For every registered op (GRADCHECKS of reference/cases/<module>.py) this draws a small random
    configuration, compares the hand-written gradient with central differences (or the complex
    step, where a case asks for it) entry by entry and runs the dot-product test, and prints one
    row per op.
    """
    import numpy as np

    from nlref.reference.cases import all_cases
    from nlref.reference.gradcheck import check_gradients

    cases = [(name, make) for name, make in all_cases().items() if only is None or only in name]
    if not cases:
        raise click.BadParameter(f"no gradient check matches {only!r}", param_hint="--only")

    width = max(len(name) for name, _ in cases)
    click.echo(f"{'op':<{width}}  {'max rel error':>13}  {'tolerance':>9}  result")
    failed = []
    for i, (name, make) in enumerate(cases):
        rng = np.random.default_rng([seed, i])
        loss, inputs, grads = make(rng)
        # A case whose forward is analytic may ask for the complex step (exact to rounding).
        errors = check_gradients(loss, inputs, grads, rng, method=getattr(make, "method", "central"))
        worst = max(errors.values())
        ok = bool(np.isfinite(worst) and worst <= CHECK_TOLERANCE)
        if not ok:
            failed.append(name)
        click.echo(f"{name:<{width}}  {worst:>13.2e}  {CHECK_TOLERANCE:>9.0e}  {'OK' if ok else 'FAIL'}")
    click.echo(f"{len(cases) - len(failed)} passed, {len(failed)} failed")
    if failed:
        click.echo("failed: " + ", ".join(failed), err=True)
        sys.exit(1)


# ------------------------------------------------------------------------------------------------
# Training runs: train, eval, generate, plot (issue 6; the machinery is in training.py, data.py,
# checkpoint.py; SPEC.md#training). Heavy imports stay inside the commands.
# ------------------------------------------------------------------------------------------------

_TRAIN_OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "adamw", "preconditioned_momentum",
                     "delta_momentum", "deep_momentum", "muon", "m3")
# Options that may change when a run is resumed (they do not change the loss trajectory);
# the same list as rundir.RESUME_OK (kept literal here so --help imports nothing heavy).
_RESUME_OK = ("steps", "eval_every", "checkpoint_every", "log_every", "early_stop_patience")


def _run_errors():
    """The user-facing error types of a run (each becomes a one-line ClickException)."""
    from nlref.checkpoint import CheckpointError
    from nlref.data import DataError
    from nlref.rundir import RunDirError
    from nlref.training import TrainingError

    return (CheckpointError, DataError, RunDirError, TrainingError)


@cli.command()
@click.option("--preset", "--model", "preset", default=None, metavar="NAME",
              help="Model preset (default hope-small; e.g. transformer-tiny, titans-small).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file: training keys, [model] and [optimizer_hparams] tables; flags override it.")
@click.option("--data", default=None, metavar="PATH",
              help="A text file, a directory or a glob; .jsonl, .csv/.tsv and .parquet files are read as records, "
                   "one document each (their --text-field). Default: the Python stdlib.")
@click.option("--text-field", default=None, metavar="NAME",
              help="The JSONL field / CSV or Parquet column holding the text (default text).")
@click.option("--tokenizer", default=None, metavar="byte|bpe|PATH",
              help="byte (default, V = 256); bpe: a byte-level BPE trained on the training split, saved as "
                   "tokenizer.json in the run directory; or PATH/tokenizer.json (a byte-level tokenizer file). "
                   "The model's vocab_size is the tokenizer's size.")
@click.option("--vocab-size", "tokenizer_vocab_size", type=int, default=None,
              help="Size of the BPE that --tokenizer bpe trains (default 4096).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default 300).")
@click.option("--batch-size", type=int, default=None, help="Sequences per batch (default 4).")
@click.option("--seq-len", type=int, default=None, help="Predicted tokens (bytes) per sequence (default 128).")
@click.option("--optimizer", type=click.Choice(_TRAIN_OPTIMIZERS), default=None, help="Default adamw.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 3e-3).")
@click.option("--warmup-steps", type=int, default=None, help="Linear warmup steps (default steps // 10).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default=None,
              help="After the warmup: cosine (default) or linear decay to 0.1 lr, or constant.")
@click.option("--weight-decay", type=float, default=None,
              help="The optimizer's weight_decay (adamw default 0.01; sgd, momentum, adam, adagrad, muon, m3 take it).")
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient's global norm (default 1.0; 0: off).")
@click.option("--grad-accum", type=int, default=None, metavar="N",
              help="Accumulate N micro-batches of --batch-size per step (= a batch N times larger).")
@click.option("--early-stop-patience", type=int, default=None, metavar="N",
              help="Stop after N validations (--eval-every) without a new best (default 0: never).")
@click.option("--init-from", default=None, metavar="WEIGHTS",
              help="Start from a weights file (export --weights-only, stack) and its model instead of a preset.")
@click.option("--backend", type=click.Choice(_backends.NAMES), default=None,
              help="Default: cpu (the Numba port) where numba imports, else reference; gpu: the CuPy port.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="Computation dtype (default: the preset's).")
@click.option("--seed", type=int, default=None, help="Seed of the initialisation and the data order (default 0).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory (default runs/<preset>-<time>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Continue the run in RUN_DIR from its last checkpoint (from step 0 if it has none yet).")
@click.option("--overwrite", is_flag=True,
              help="Start over in an --out that already holds a run (deletes that run's checkpoint and metrics).")
@click.option("--eval-every", type=int, default=None, help="Validate every N steps (default 0: at the end).")
@click.option("--checkpoint-every", type=int, default=None, help="Checkpoint every N steps (default 50).")
@click.option("--log-every", type=int, default=None, help="Progress line every N steps off a terminal (default 10).")
def train(config_file, resume_dir, out, overwrite, **flags) -> None:
    """Train a model on text (bytes, or --tokenizer bpe / PATH); write metrics.jsonl, checkpoints and a summary.

    With no arguments: hope-small on the Python standard library's source files, about two
    to three minutes on 2 cores with the fastest backend available (README.md). One train at a
    time writes to a run directory (a lock; SPEC.md#run-directories). Ctrl-C stops after the
    step in flight with a checkpoint; --resume continues exactly.
    """
    import time
    from pathlib import Path

    from nlref import training

    try:
        if resume_dir is not None:
            if config_file is not None:
                raise click.UsageError("--config cannot be combined with --resume (the run has its config)")
            if out is not None:
                raise click.UsageError("--out cannot be combined with --resume (the run continues in RUN_DIR)")
            if overwrite:
                raise click.UsageError("--overwrite cannot be combined with --resume (--resume continues the run, "
                                       "--overwrite --out DIR replaces it)")
            fixed = sorted(k for k, v in flags.items() if v is not None and k not in _RESUME_OK)
            if fixed:
                raise click.UsageError(f"--resume continues the run as configured; only "
                                       f"{', '.join('--' + k.replace('_', '-') for k in _RESUME_OK)} may "
                                       f"change (got {', '.join('--' + k.replace('_', '-') for k in fixed)})")
            config_path = Path(resume_dir) / "config.toml"
            if not config_path.is_file():
                raise click.ClickException(f"{resume_dir}: not a run directory (no config.toml); start a run "
                                           f"there with train --out {resume_dir}")
            try:
                rc = training.resolve_config(training.read_toml(config_path), flags)
            except training.TrainingError as exc:
                raise click.ClickException(f"{exc}; undo the edit to resume, or start over with train --overwrite "
                                           f"--out {resume_dir}") from None
            run_dir = Path(resume_dir)
        else:
            if flags.get("init_from") and flags.get("preset"):
                raise click.UsageError("--init-from takes the weights file's model; it cannot be combined with "
                                       "--preset (override single [model] keys in a --config file instead)")
            file = training.read_toml(config_file) if config_file else {}
            rc = training.resolve_config(file, flags)
            run_dir = Path(out) if out else Path("runs") / f"{rc.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        training.check_backend(rc.train.backend)
        from nlref import distributed  # one process, or N under mpiexec (SPEC.md#distributed)

        distributed.train(rc, run_dir, resume=resume_dir is not None, echo=click.echo,
                          tty=sys.stdout.isatty(), overwrite=overwrite)
    except training.Interrupted as exc:
        if distributed.world().is_root:  # the other ranks stopped in their scratch copies: nothing to say
            click.echo(f"Stopped: {exc}", err=True)
        sys.exit(128 + exc.signum)
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # the disk, not the input: say which file and why
        raise click.ClickException(f"{exc.filename or 'the run directory'}: {exc.strerror or exc}") from None


@cli.command()
@click.option("--preset", "presets", multiple=True, metavar="NAME",
              help="A preset to warm (repeatable; default: hope-small and one tiny preset of every family).")
@click.option("--backend", type=click.Choice(_backends.PORTS), default="cpu", show_default=True)
@click.option("--dtype", "dtypes", type=click.Choice(["float32", "float64"]), multiple=True,
              help="Dtypes to warm (repeatable; default float32, the presets' own).")
def warmup(presets, backend, dtypes) -> None:
    """Compile and cache the compiled port's kernels now, so the first run does not wait for them.

    Numba compiles the CPU port's kernels on their first call after an install (about 1-2
    minutes on 2 cores) and caches them; this makes those calls for every family (a training
    step, a streaming forward, one token) and prints the time each took.
    """
    import time

    t0 = time.perf_counter()
    try:
        rows = _backends.warm(backend, presets or _backends.WARM_PRESETS, dtypes or ("float32",), echo=click.echo)
    except (_backends.BackendError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"warm: {len(rows)} preset(s) on {backend} in {time.perf_counter() - t0:.1f} s; later runs load "
               "the kernels from the cache")


@cli.command("eval")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT", type=click.Path(exists=True))
@click.option("--data", default=None, metavar="PATH",
              help="Evaluate all of this text file/directory/glob (or JSONL/CSV/Parquet records; default: the run's "
                   "validation split).")
@click.option("--text-field", default=None, metavar="NAME",
              help="The field / column holding the text in --data records (default: the run's).")
@click.option("--seq-len", type=int, default=None, help="Tokens (bytes) per window (default: the run's).")
@click.option("--batch-size", type=int, default=None, help="Windows per batch (default: the run's).")
@click.option("--max-batches", type=int, default=4, show_default=True, help="Batches of windows to score.")
@click.option("--continual", is_flag=True,
              help="Read documents in order without ever resetting fast states; show loss per document.")
@click.option("--max-docs", type=int, default=4, show_default=True, help="Documents read (--continual).")
@click.option("--doc-bytes", type=int, default=512, show_default=True,
              help="Bytes read from the start of each document (--continual).")
@click.option("--backend", type=click.Choice(_backends.NAMES), default=None,
              help="Default: the fastest available (cpu where numba imports).")
def eval_(target, data, text_field, seq_len, batch_size, max_batches, continual, max_docs, doc_bytes,
          backend) -> None:
    """Validation loss, perplexity and bits per byte of a checkpoint (or a run's last one).

    The run's tokenizer (its tokenizer.json beside the checkpoint) encodes the text; bits per byte
    are per byte of text whatever the tokenizer (SPEC.md#data)."""
    import numpy as np

    from nlref import data as data_mod
    from nlref import tokenization, training

    for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--max-batches", max_batches),
                        ("--max-docs", max_docs), ("--doc-bytes", doc_bytes)):
        if value is not None and value < 1:
            raise click.BadParameter(f"must be >= 1, got {value}", param_hint=name)
    try:
        backend = backend or training.default_backend()
        training.check_backend(backend)
        params, rc, ck = training.load_model_checkpoint(target)
        training.check_backend(backend, rc.model.family)
        tc, mc = rc.train, rc.model
        tok = tokenization.for_checkpoint(tc, ck)  # the run's tokens (SPEC.md#data)
        if data is None:
            split = data_mod.encode_split(data_mod.read_corpus(tc.data, tc.val_fraction, tc.text_field).val, tok)
            where = f"the validation split of {tc.data or 'python-stdlib'}"
        else:
            split = data_mod.load_documents(data, text_field or tc.text_field, tokenizer=tok)
            where = data
        seq_len = seq_len or tc.seq_len
        click.echo(f"{mc.name} at step {ck.step} ({ck.path}) on {where}")
        if not continual:
            with progress.slow_start(click.echo, sys.stdout.isatty(), backend, what="the evaluation"):
                ev = training.evaluate(params, mc, split.stream, batch_size or tc.batch_size, seq_len, max_batches,
                                       backend=backend, tokenizer=tok)
            if not np.isfinite(ev["loss"]):
                raise click.ClickException(f"the loss of {ck.path} is not finite ({ev['loss']}) on {where}: "
                                           "the checkpoint is not usable; use an earlier one or retrain")
            click.echo(f"loss {ev['loss']:.4f} nats/{'byte' if tok.kind == 'byte' else 'token'}   perplexity "
                       f"{ev['perplexity']:.2f}   bits per byte {ev['bits_per_byte']:.3f}   ({training.size_text(ev)})")
            return
        with progress.slow_start(click.echo, sys.stdout.isatty(), backend, what="the evaluation"):
            res = training.evaluate_continual(params, mc, split, max_docs, doc_bytes, seq_len, backend=backend,
                                              tokenizer=tok)
        click.echo("continual: fast states and in-context CMS levels are never reset between documents;")
        click.echo("reset: the same documents, each read from the initial state (the baseline).")
        unit = "bytes" if tok.kind == "byte" else "tokens"  # --doc-bytes counts tokens with a BPE
        click.echo(f"{'doc':>4}  {unit:>6}  {'continual':>9}  {'reset':>7}  {'change':>7}  document")
        for row in res["documents"]:
            change = row["continual_loss"] - row["reset_loss"]
            click.echo(f"{row['position']:>4}  {row['bytes']:>6}  {row['continual_loss']:>9.4f}  "
                       f"{row['reset_loss']:>7.4f}  {change:>+7.4f}  {row['document']}")
        c, r = res["continual"], res["reset"]
        click.echo(f"all   {res['tokens']:>6}  {c['loss']:>9.4f}  {r['loss']:>7.4f}  {c['loss'] - r['loss']:>+7.4f}  "
                   f"(bits per byte {c['bits_per_byte']:.3f} continual, {r['bits_per_byte']:.3f} reset)")
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None


MIN_TEMPERATURE = 1e-6  # generate --temperature: 0 or at least this


@cli.command()
@click.argument("target", metavar="CHECKPOINT|RUN_DIR", type=click.Path(exists=True))
@click.option("--prompt", default="\n", show_default="a newline", help="Text the sample continues.")
@click.option("--max-bytes", type=int, default=200, show_default=True,
              help="Bytes to sample (with a BPE tokenizer: tokens until at least this many bytes).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 samples greedily.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k likeliest (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Sample in the nucleus: the likeliest tokens holding this much probability (1: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@click.option("--backend", type=click.Choice(_backends.NAMES), default=None,
              help="Default: the fastest available (cpu where numba imports).")
def generate(target, prompt, max_bytes, temperature, top_k, top_p, seed, backend) -> None:
    """Sample text from a checkpoint, carrying the streaming state (the context is read once)."""
    import codecs
    import math

    from nlref import tokenization, training

    if max_bytes < 0 or top_k < 0:
        raise click.BadParameter("--max-bytes and --top-k must be >= 0")
    if not 0 < top_p <= 1:
        raise click.BadParameter(f"must be in (0, 1], got {top_p!r}", param_hint="--top-p")
    if not (temperature == 0 or (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE)):
        raise click.BadParameter(f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g} (below it sampling "
                                 f"is greedy decoding to float precision: use 0), got {temperature!r}",
                                 param_hint="--temperature")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise click.BadParameter(f"is not valid UTF-8 (a byte the shell passed at character {exc.start} does not "
                                 "decode); give the prompt as UTF-8 text", param_hint="--prompt") from None
    try:
        backend = backend or training.default_backend()
        training.check_backend(backend)
        params, rc, ck = training.load_model_checkpoint(target)
        training.check_backend(backend, rc.model.family)
        tok = tokenization.for_checkpoint(rc.train, ck)  # the run's tokens (SPEC.md#data)
        tokens = tok.encode(prompt)
        if tokens.shape[0] == 0:
            raise click.BadParameter("the prompt is empty; give at least one character", param_hint="--prompt")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        click.echo(prompt, nl=False)
        with progress.slow_start(lambda m: click.echo(m, err=True), sys.stderr.isatty(), backend,
                                 what="reading the prompt"):  # the first call compiles or loads the kernels
            written = [0]

            def emit(t: int) -> bool:  # True: --max-bytes reached
                raw = tok.token_bytes[t]
                click.echo(decoder.decode(raw), nl=False)
                written[0] += len(raw)
                return written[0] >= max_bytes

            training.generate(params, rc.model, tokens, max_bytes, temperature, top_k, seed, top_p=top_p,
                              on_token=emit, backend=backend)
        click.echo(decoder.decode(b"", final=True))
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None


@cli.command("stack")
@click.argument("source", metavar="RUN_DIR|CHECKPOINT|WEIGHTS", type=click.Path(exists=True))
@click.option("--period", "periods", multiple=True, required=True, metavar="N|none",
              help="One per CMS level, in order: tokens between its in-context updates (none: frozen).")
@click.option("--eta", "etas", multiple=True, type=float, metavar="RATE",
              help="One per CMS level: its in-context rate (default 0: the pre-trained model exactly).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="OUT.safetensors",
              help="The stacked model's weights file (train from it with train --init-from OUT).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def stack_(source, periods, etas, out, overwrite) -> None:
    """Ad-hoc level stacking (NL §7.3): a model's frozen CMS levels become in-context levels.

    SOURCE is a hope or hope-attention model trained with its CMS frozen (cms_in_context =
    false); its MLPs initialise the levels, updated every --period tokens at rate --eta. With
    every rate 0 the stacked model computes the pre-trained one (SPEC.md#cms).
    """
    from nlref import api
    from nlref.reference.stacking import stack

    try:
        parsed = [None if p.lower() == "none" else int(p) for p in periods]
    except ValueError:
        raise click.BadParameter(f"each must be a positive integer or none, got {list(periods)}",
                                 param_hint="--period") from None
    try:
        m = api.load(source, backend="reference")
        params, cfg = stack(m.params, m.config, parsed, list(etas) or [0.0] * len(parsed))
        api.save_weights(out, params, cfg, overwrite=overwrite, tokenizer=m.tokenizer,
                         source={"stacked_from": str(source), "periods": parsed, "etas": list(etas)})
    except (ValueError, FileExistsError, IsADirectoryError) as exc:
        raise click.ClickException(str(exc)) from None
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {out}: {cfg.name}, levels " + ", ".join(
        f"{'frozen' if lv.period is None else f'every {lv.period} tokens at eta {lv.eta:g}'}" for lv in cfg.cms_levels)
        + f"; train it with nested-learning train --init-from {out}")


# ------------------------------------------------------------------------------------------------
# export: the weights alone, self-describing (issue 19 item 3; api.py; SPEC.md#weights)
# ------------------------------------------------------------------------------------------------


@cli.command("export")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT", type=click.Path())
@click.option("--weights-only", "out", required=True, metavar="OUT.safetensors", type=click.Path(dir_okay=False),
              help="Write the model's weights (no optimizer state) with its config in the metadata to this file.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(target, out, overwrite) -> None:
    """Write a run's (or a checkpoint's) weights alone to a safetensors file (SPEC.md#weights).

    The file holds the parameters under their own keys (embed.E, blocks.0.attn.Wq, ...), in the
    model's dtype, and the model config as JSON in its metadata: nlref.load(OUT) and
    torch_module.NestedLearningModule.from_safetensors(OUT) read it. About a third of a
    checkpoint (AdamW keeps two moments per parameter). Written atomically.
    """
    from pathlib import Path

    from nlref import api

    if Path(out).exists() and not overwrite:
        raise click.ClickException(f"{out} already exists; add --overwrite to replace it, or choose another OUT")
    try:
        model = api.load(target, backend="reference")  # reading needs no compiled port
        source = model.source.get("checkpoint") or model.source.get("weights")
        if source and Path(out).exists() and os.path.samefile(out, source):
            raise click.ClickException(f"{out} is the file being exported; choose another OUT")
        path = model.save(out, overwrite=overwrite)
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{out}: cannot write it ({exc.strerror or exc})") from None
    size = path.stat().st_size
    of = f" (the input: {Path(source).stat().st_size:,} bytes)" if source else ""
    at = f" at step {model.step}" if model.step is not None else ""
    click.echo(f"wrote {path}: {model.config.name}{at}, {len(model.params)} tensors, {model.n_params:,} parameters, "
               f"{model.config.dtype}, {size:,} bytes{of}")


@cli.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN_DIR...", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default="curves.png", show_default=True,
              help="PNG file to write.")
@click.option("--smooth", type=float, default=0.9, show_default=True,
              help="EMA factor of the training-loss curve (0: raw).")
@click.option("--x", "x_axis", type=click.Choice(["steps", "tokens", "time"]), default="steps", show_default=True,
              help="The x axis: optimizer steps, training tokens, or wall time since the run's first step.")
def plot(runs, out_file, smooth, x_axis) -> None:
    """PNG of the loss curves (training, validation) and the learning rate of one or several runs
    (needs matplotlib)."""
    from pathlib import Path

    from nlref import training

    try:
        import matplotlib
    except ImportError:
        raise click.ClickException("plot needs matplotlib, which is not installed: "
                                   "pip install 'nested-learning-reference[plot]'") from None
    if not 0 <= smooth < 1:
        raise click.BadParameter("must be in [0, 1)", param_hint="--smooth")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
        for run in runs:
            rows = training.read_metrics(run)
            train_rows = [r for r in rows if "loss" in r]
            val_rows = [r for r in rows if "val_loss" in r]
            if not train_rows:
                raise click.ClickException(f"{run}: metrics.jsonl holds no training steps yet")
            xs = _plot_x(train_rows, x_axis)
            at_step = dict(zip((r["step"] for r in train_rows), xs, strict=True))
            ema, smoothed = None, []
            for r in train_rows:
                ema = r["loss"] if ema is None else smooth * ema + (1 - smooth) * r["loss"]
                smoothed.append(ema)
            label = Path(run).name
            line, = ax.plot(xs, smoothed, label=f"{label} train" + (f" (EMA {smooth:g})" if smooth else ""))
            val_rows = [r for r in val_rows if r["step"] in at_step]
            if val_rows:
                ax.plot([at_step[r["step"]] for r in val_rows], [r["val_loss"] for r in val_rows], "o--",
                        color=line.get_color(), label=f"{label} validation")
            ax_lr.plot(xs, [r.get("lr", float("nan")) for r in train_rows], color=line.get_color(), label=label)
        ax_lr.set_xlabel({"steps": "step", "tokens": "training tokens", "time": "wall time (s)"}[x_axis])
        ax.set_ylabel("loss (nats per token)")
        ax_lr.set_ylabel("learning rate")
        ax.set_title("nested-learning training curves")
        for a in (ax, ax_lr):
            a.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        import io

        from nlref.checkpoint import atomic_write_bytes

        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(out_file, png.getvalue())  # never a partial PNG where a good one stood
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"--out {out_file}: cannot write the PNG ({exc.strerror or exc}); "
                                   "choose a writable path") from None
    click.echo(f"wrote {out_file} ({len(runs)} run{'s' if len(runs) > 1 else ''})")


def _plot_x(train_rows: list[dict], x_axis: str) -> list[float]:
    """The x value of each training row: its step, its cumulative tokens, or the wall time since the
    run's first step (the rows' ``time`` stamps minus the first step's duration; rows written before
    stamps existed: the summed step times)."""
    if x_axis == "steps":
        return [r["step"] for r in train_rows]
    if x_axis == "tokens":
        return [r["tokens"] for r in train_rows]
    if all("time" in r for r in train_rows):
        t0 = train_rows[0]["time"] - train_rows[0].get("step_time_s", 0.0)
        return [r["time"] - t0 for r in train_rows]
    out, t = [], 0.0
    for r in train_rows:
        t += r.get("step_time_s", 0.0)
        out.append(t)
    return out


@cli.command("toy-momentum", short_help="The paper's toy (Eq. 53, Figure 4): standard vs delta momentum.")
@click.option("--k", "k", type=float, default=10.0, show_default=True, help="k of Eq. (53) (not given by the paper).")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="alpha of Eq. (53) (not given).")
@click.option("--omega", type=float, default=2.0, show_default=True, help="omega of Eq. (53) (not given).")
@click.option("--lr", type=click.FloatRange(min=0), default=0.01, show_default=True, help="eta, both optimizers.")
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Momentum retention alpha (Eq. 33), both optimizers.")
@click.option("--delta", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Delta momentum's normalised decay step: zeta = delta / ||G||^2.")
@click.option("--zeta", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="The printed (un-normalised) form's decay step.")
@click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True, help="Steps per run.")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=1e-8, show_default=True,
              help="Converged at the first step with psi < tol.")
@click.option("--out", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder for toy_momentum.png and toy_momentum.json.")
def toy_momentum(k, alpha, omega, lr, momentum, delta, zeta, steps, tol, out) -> None:
    """The paper's toy (Eq. 53, Figure 4): standard vs delta momentum from (r, theta) = (-3.5, 2).

    Prints the steps each needs to reach psi < tol, writes the trajectories as a PNG (when
    matplotlib is installed) and the table as JSON. SPEC.md#optimizers records the defaults.
    """
    import json
    from pathlib import Path

    from nlref.reference import toy

    rows = toy.compare(k=k, alpha=alpha, omega=omega, lr=lr, momentum=momentum, delta=delta, zeta=zeta,
                       steps=steps, tol=tol)
    Path(out).mkdir(parents=True, exist_ok=True)
    click.echo(f"Eq. (53): psi = r^2 + k (r - theta + alpha sin(omega r))^2, k={k}, alpha={alpha}, omega={omega}; "
               f"start (-3.5, 2); lr={lr}, momentum={momentum}; converged when psi < {tol:g}")
    click.echo(f"{'optimizer':<32} {'steps to converge':>18} {'final psi':>12}")
    for r in rows:
        outcome = "diverged" if r["diverged"] else (str(r["steps"]) if r["steps"] is not None else f"not in {steps}")
        click.echo(f"{r['name']:<32} {outcome:>18} {r['final_psi']:>12.3e}")
    std, dm = rows[0]["steps"], rows[1]["steps"]
    if std is not None and dm is not None:
        verdict = "faster" if dm < std else "slower" if dm > std else "as fast"
        click.echo(f"delta momentum is {verdict} than standard momentum here ({dm} vs {std} steps)")
    else:
        click.echo(f"convergence: standard momentum {std}, delta momentum {dm} (None = did not converge)")
    table = [{key: r[key] for key in ("name", "hparams", "steps", "final_psi", "diverged")} for r in rows]
    (Path(out) / "toy_momentum.json").write_text(json.dumps(
        {"k": k, "alpha": alpha, "omega": omega, "tol": tol, "steps": steps, "runs": table}, indent=1))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        click.echo("matplotlib is not installed, so no PNG was written: pip install 'nested-learning-reference[plot]'")
        return
    png = Path(out) / "toy_momentum.png"
    toy.plot(rows, png, k=k, alpha=alpha, omega=omega)
    click.echo(f"wrote {png}")


# ------------------------------------------------------------------------------------------------
# Conformance vectors (issue 7, item 4; conformance.py; SPEC.md#conformance).
# ------------------------------------------------------------------------------------------------


@cli.group()
def conformance() -> None:
    """Golden vectors (inputs, outputs, every gradient) for checking an implementation."""


@conformance.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the vectors' inputs and parameters.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float64", "float32"]),
              help="Dtypes to write (repeatable; default both).")
@click.option("--only", default=None, metavar="SUBSTRING", help="Write only the vectors whose name contains this.")
def conformance_export(directory, seed, dtypes, only) -> None:
    """Write the reference's vectors for every op and model family into DIRECTORY (npz + manifest)."""
    from nlref import conformance as conf

    files = conf.export(directory, seed=seed, dtypes=dtypes or ("float64", "float32"), only=only)
    if not files:
        raise click.BadParameter(f"no vector matches {only!r}", param_hint="--only")
    click.echo(f"wrote {len(files)} vectors (schema {conf.SCHEMA} v{conf.VERSION}) and manifest.json to {directory}")


@conformance.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--backend", type=click.Choice(_backends.NAMES), default="reference", show_default=True,
              help="The implementation to check.")
@click.option("--only", default=None, metavar="SUBSTRING", help="Check only the vectors whose name contains this.")
def conformance_verify(directory, backend, only) -> None:
    """Check a backend against the vectors in DIRECTORY: a per-tensor table; exit 1 on a mismatch."""
    from nlref import conformance as conf

    try:  # a backend that cannot run here is a ConformanceError saying why
        rows = conf.verify(directory, backend=backend, only=only)
    except conf.ConformanceError as exc:
        raise click.ClickException(str(exc)) from None
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'tensor':<{width}}  {'shape':<18}  {'max abs':>9}  {'max rel':>9}  {'tolerance':>9}  result")
    for r in rows:
        status = ("SKIPPED (" + r["skipped"] + ")" if "skipped" in r else
                  "OK" if r["ok"] else "FAIL" + (f" ({r['error']})" if "error" in r else ""))
        click.echo(f"{r['name']:<{width}}  {str(r['shape']):<18}  {r['max_abs']:>9.2e}  {r['max_rel']:>9.2e}  "
                   f"{r['tolerance']:>9.0e}  {status}")
    failed = [r["name"] for r in rows if not r["ok"] and "skipped" not in r]
    skipped = [r for r in rows if "skipped" in r]
    click.echo(f"backend {backend}: {len(rows) - len(failed) - len(skipped)} of {len(rows) - len(skipped)} tensors "
               "agree" + (f"; {len(skipped)} vector(s) skipped (a family this backend does not compute)"
                          if skipped else ""))
    if failed:
        click.echo("mismatch: " + ", ".join(failed), err=True)
        sys.exit(1)


# ------------------------------------------------------------------------------------------------
# Benchmarks (issue 7, item 5; bench.py; SPEC.md#fast-cpu).
# ------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--preset", "presets", multiple=True, metavar="NAME",
              help="Model presets to time (repeatable; default: every family at tiny and small).")
@click.option("--backend", "backends", multiple=True,
              type=click.Choice(_backends.NAMES + _backends.PEERS),
              help="Backends to time (repeatable; default reference and cpu). gpu: the CuPy port; torch-cuda: "
                   "the PyTorch eager peer on CUDA (torch's AdamW); without a GPU those rows say why.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Sequences per step.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per sequence.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed training steps per backend (after one warm-up step); the median is reported.")
@click.option("--decode-context", "decode_contexts", multiple=True, type=click.IntRange(min=1),
              help="Context lengths for streaming decode (repeatable; default 1024).")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens decoded (and timed) after each context.")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Skip a (preset, backend) whose first step took longer than this.")
@click.option("--prefill-seconds", type=click.FloatRange(min=0), default=None,
              help="Skip a decode context whose prefill is predicted to take longer than this "
                   "[default: 3 x --max-seconds].")
@click.option("--time-budget", type=click.FloatRange(min=0), default=None,
              help="Seconds for the whole run: after them no further (preset, backend) or decode context is "
                   "started (each is reported skipped).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows as JSON lines (each as it ends).")
@click.option("--max-memory", "max_memory_gb", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="GB", help="Cap on the memory a torch row's step may take (default: 90% of the memory "
              "available when the row starts). Its peak is predicted from a short step in a child process; a row "
              "predicted over the budget is skipped with the prediction.")
def bench(presets, backends, batch_size, seq_len, dtype, repeats, decode_contexts, decode_tokens, max_seconds,
          prefill_seconds, time_budget, json_out, max_memory_gb) -> None:
    """Time the training step (forward + backward + AdamW) and streaming decode per backend, in one run.

    Prints tokens/s, the speedup over the first backend, achieved GFLOP/s against the matrix-product
    rate of the row's device (CPU, or the card for gpu / torch-cuda) measured in the same run, the
    first-call (compile) time, and decode time per token at each context length. Exits 1 when a
    row failed with an error (its traceback is printed; the other rows still run).
    """
    from nlref import bench as b

    try:
        rows = b.run(presets=presets, backends=backends, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                     repeats=repeats, decode_contexts=decode_contexts or (1024,), decode_tokens=decode_tokens,
                     max_seconds=max_seconds, json_out=json_out, echo=click.echo, prefill_seconds=prefill_seconds,
                     time_budget=time_budget, max_memory_gb=max_memory_gb)
    except ValueError as exc:  # an unknown preset
        raise click.BadParameter(str(exc), param_hint="--preset") from None
    failed = [f"{r['preset']} {r['backend']}" for r in rows if r.get("status", "").startswith("error")]
    if failed:
        raise click.ClickException(f"{len(failed)} row(s) failed: {', '.join(failed)}")


@cli.command("bench-growth")
@click.option("--preset", "presets", multiple=True, metavar="NAME",
              help="Presets (repeatable; default hope-small, titans-small, transformer-small).")
@click.option("--backend", type=click.Choice(_backends.NAMES), default="cpu", show_default=True)
@click.option("--seq-len", "seq_lens", multiple=True, type=click.IntRange(min=2),
              help="Sequence lengths at batch 4 (repeatable; default 64, 256, 1024, 4096).")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1),
              help="Batch sizes at T = 256 (repeatable; default 1, 4, 16).")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True, help="Timed steps per point.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--max-seconds", type=float, default=120.0, show_default=True,
              help="Skip a point predicted to take longer (from the previous point's rate).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON lines.")
def bench_growth_(presets, backend, seq_lens, batches, repeats, dtype, max_seconds, json_out) -> None:
    """Tokens/s and peak memory against the sequence length and the batch (each point its own process)."""
    from nlref import bench_growth, config

    for p in presets:
        try:
            config.preset(p)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--preset") from None
    try:
        _backends.get(backend).check()
    except _backends.BackendError as exc:
        raise click.ClickException(str(exc)) from None
    rows = bench_growth.run(presets or ("hope-small", "titans-small", "transformer-small"), backend,
                            seq_lens or bench_growth.SEQ_LENS, batches or bench_growth.BATCHES, repeats, dtype,
                            max_seconds, echo=click.echo, json_out=json_out)
    if any("error" in r for r in rows):
        sys.exit(1)


@cli.command("bench-mpi")
@click.option("--ranks", "ranks", multiple=True, type=click.IntRange(min=1),
              help="Rank counts to time, one mpiexec each (repeatable; default 1, 2, 4).")
@click.option("--preset", default="hope-tiny", show_default=True, metavar="NAME", help="Model preset.")
@click.option("--backend", type=click.Choice(_backends.NAMES), default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="The global batch (split over the ranks).")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed steps per rank count (after one warm-up); the median is reported.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print only the planning table: gradient bytes per step per preset against link bandwidths.")
def bench_mpi(ranks, preset, backend, batch_size, seq_len, dtype, steps, plan_only) -> None:
    """Time data-parallel training on 1, 2, 4 ranks (mpiexec; SPEC.md#distributed), side by side.

    Prints tokens/s, the ratio to the first row, and per step: the rank's compute, the wait for the
    slowest rank, the fused all-reduce and its share of the step; then the planning table.
    """
    from nlref import bench_mpi as bm

    if not plan_only:
        try:
            bm.run(ranks=ranks or (1, 2, 4), preset=preset, backend=backend, batch_size=batch_size,
                   seq_len=seq_len, dtype=dtype, steps=steps, echo=click.echo)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo("")
    bm.plan(dtype=dtype, echo=click.echo)


# ------------------------------------------------------------------------------------------------
# experiment: the paper's claims at a scale anyone can run (issue 17; experiments/)
# ------------------------------------------------------------------------------------------------


@cli.group("experiment")
def experiment() -> None:
    """Test the paper's claims at small scale: JSON, PNG figures and a markdown report in --out.

    Each command has --quick (about two minutes on 2 cores); without it the full scale of
    docs/experiments.md runs.
    """


def _experiment_options(fn):
    for deco in reversed([
        click.option("--quick", "scale", flag_value="quick", help="The quick scale (about two minutes on 2 cores)."),
        click.option("--smoke", "scale", flag_value="smoke", hidden=True, help="The tests' scale (seconds)."),
        click.option("--full", "scale", flag_value="full", default=True, help="The full scale (the default)."),
        click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory."),
        click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds 0..N-1."),
        click.option("--backend", type=click.Choice(_backends.NAMES), default=None,
                     help="Default: cpu where numba imports, else reference."),
        click.option("--model", "models", multiple=True, metavar="PRESET[:key=value,...]",
                     help="A model (repeatable; [model] overrides as TOML values). Default: the scale's set."),
    ]):
        fn = deco(fn)
    return fn


def _run_experiment(module: str, **kwargs) -> None:
    import importlib

    from nlref import training
    from nlref.experiments import common

    try:
        mod = importlib.import_module(f"nlref.experiments.{module}")
        specs = [common.parse_model_spec(m) for m in kwargs.pop("models")] or None
        mod.run(models=specs, echo=click.echo, **kwargs)
    except (common.ExperimentError, training.TrainingError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@experiment.command("continual")
@_experiment_options
@click.option("--domain", "domains", multiple=True, metavar="NAME=PATH",
              help="Add a domain: a directory or glob of text files (repeatable).")
@click.option("--no-builtin-domains", is_flag=True, help="Use only the --domain domains.")
def experiment_continual(scale, out, seeds, backend, models, domains, no_builtin_domains) -> None:
    """Domains one after another: the forgetting matrix, BWT, forgetting, test-time-only streams."""
    _run_experiment("continual", out=out, scale_name=scale, n_seeds=seeds, backend=backend, models=models,
                    user_domains=domains, builtin=not no_builtin_domains)


@experiment.command("recall")
@_experiment_options
@click.option("--task", "task_names", multiple=True, type=click.Choice(["passkey", "mqar"]),
              help="Only these tasks (repeatable; default both).")
def experiment_recall(scale, out, seeds, backend, models, task_names) -> None:
    """Passkey retrieval and MQAR: exact-match accuracy vs context length."""
    _run_experiment("recall", out=out, scale_name=scale, n_seeds=seeds, backend=backend, models=models,
                    task_names=tuple(task_names) or ("passkey", "mqar"))


_domain_option = click.option(
    "--domain", "domains", multiple=True, metavar="NAME=PATH",
    help="Train and score on this domain (a directory or glob of text files) instead of the python domain "
         "(repeatable: one comparison per domain).")


@experiment.command("compare")
@_experiment_options
@_domain_option
def experiment_compare(scale, out, seeds, backend, models, domains) -> None:
    """Held-out LM loss of Hope, Titans, Hope-attention, Transformer++ at matched size and budget."""
    _run_experiment("compare", out=out, scale_name=scale, n_seeds=seeds, backend=backend, models=models,
                    user_domains=domains)


@experiment.command("ablate")
@_experiment_options
@_domain_option
def experiment_ablate(scale, out, seeds, backend, models, domains) -> None:
    """Table 6: Hope against each of its ablation switches (every row of the table) at the same budget."""
    _run_experiment("ablate", out=out, scale_name=scale, n_seeds=seeds, backend=backend, models=models,
                    user_domains=domains)


@experiment.command("optimizers")
@_experiment_options
@click.option("--optimizer", "optimizer_names", multiple=True, metavar="NAME",
              help="Only these optimizers (repeatable; the first is the reference). Default: m3, adamw, muon, "
                   "delta_momentum, deep_momentum, preconditioned_momentum, momentum.")
def experiment_optimizers(scale, out, seeds, backend, models, optimizer_names) -> None:
    """M3 vs AdamW vs Muon vs the deep optimizers: a small LM and a least-squares problem, lr swept on training loss."""
    _run_experiment("optimizers", out=out, scale_name=scale, n_seeds=seeds, backend=backend, models=models,
                    optimizers=tuple(optimizer_names))


@experiment.command("toy-momentum")
@click.option("--quick", "scale", flag_value="quick", help="The quick grid (81 cells, seconds).")
@click.option("--smoke", "scale", flag_value="smoke", hidden=True, help="The tests' grid.")
@click.option("--full", "scale", flag_value="full", default=True, help="The full grid (625 cells, the default).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory.")
def experiment_toy_momentum(scale, out) -> None:
    """The Eq. 53 toy over a (k, alpha, omega, eta) grid: where delta momentum beats momentum."""
    _run_experiment("toy_sweep", out=out, scale_name=scale, models=())


def main() -> None:
    # the CPU port's batch groups run in worker processes from the command line (SPEC.md#fast-cpu:
    # measured faster than threads; the entry points have a __main__ guard). Set before anything
    # imports the port, which reads it once.
    os.environ.setdefault("NL_CPU_WORKERS", "process")
    cli(prog_name="nested-learning")


if __name__ == "__main__":
    main()
