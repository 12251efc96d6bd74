#!/usr/bin/env bash
# scripts/gpu_check.sh: the one-shot check of the GPU port on a machine with a CUDA card (SPEC.md#fast-gpu).
#
# Run from anywhere; it works in the repository root (the package nlref). It needs no
# network: python3 with numpy, numba, scipy, click, hypothesis, pytest, pytest-timeout, safetensors,
# threadpoolctl, CuPy and torch (CUDA builds) already installed. Steps, each logged to $OUT/<step>.log:
#   install     pip install -e . (no deps, no index); falls back to pip --target, then to a PYTHONPATH
#               symlink; says which one worked
#   versions    nvidia-smi -L, python, numpy, numba, CuPy (and the device it sees), torch (CUDA)
#   warmup      (in the background, during the tests) a tiny bench of the cpu and gpu backends on
#               the hope, titans and transformer families: fills Numba's cache and CuPy's kernel
#               cache, so the benchmark's first calls are not mostly compilation (informational)
#   tests       NL_REQUIRE_GPU=1 pytest tests/gpu/test_gpu_device_*.py -x (GPU errors to $OUT/gpu_errors.jsonl)
#   conformance nlref conformance verify tests/conformance --backend gpu
#   bench_<p>   nlref bench --backend gpu --backend cpu --backend torch-cuda for preset p
#               (hope-small and hope-medium, then titans-small and transformer-small if time is left),
#               batch 4 x 256 float32, decode at 1K and 64K contexts, rows to $OUT/bench_<p>.jsonl
#   summary     one short table: test counts, conformance line, worst GPU error per dtype, bench rows,
#               and hope-medium's GPU step against the CPU port and against PyTorch CUDA eager
# A failing step does not stop the script; the exit status is 1 if any step failed (a bench step
# that ran out of its time counts as failed: its table lacks rows), else 0.
#
# Time: the whole script stays within NL_CHECK_BUDGET_S (default 400 s, under 7 minutes): each step
# has a cap (below) cut to what is left of the budget, and runs under `timeout`; bench steps also
# get --time-budget (no new row or decode context after 60% of their time) and small --max-seconds /
# --prefill-seconds, so a slow backend reports one step and skips its 64K decode instead of
# overrunning. Knobs (environment; the defaults are the GPU run's; for a dry run on a CPU, shrink them):
#   OUT (/tmp/gpu_check)  PYTHON (python3)  NL_CHECK_BUDGET_S (400)  NL_CHECK_TESTS_S (120)
#   NL_CHECK_CONF_S (40)  NL_CHECK_BENCH_SMALL_S (60)  NL_CHECK_BENCH_MEDIUM_S (130)
#   NL_CHECK_PRESETS ("hope-small hope-medium")  NL_CHECK_EXTRA_PRESETS ("titans-small transformer-small"; "" for none)
#   NL_CHECK_BACKENDS ("gpu cpu torch-cuda")  NL_CHECK_BATCH (4)  NL_CHECK_SEQ_LEN (256)
#   NL_CHECK_REPEATS (2)  NL_CHECK_CONTEXTS ("1024 65536")  NL_CHECK_DECODE_TOKENS (16)
#   NL_CHECK_MAX_SECONDS (8)  NL_CHECK_PREFILL_SECONDS (15)  NL_CHECK_TESTS ("tests/gpu/test_gpu_device_*.py")
#   NL_CHECK_WARMUP (1: run the warm-up)  NL_CHECK_PYTEST_ARGS ("-x"; e.g. "--maxfail=20" to see every failure)

set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY="${PYTHON:-python3}"
BUDGET="${NL_CHECK_BUDGET_S:-400}"
RESERVE=10        # seconds kept for the summary
MIN_STEP=15       # a step that would get less than this is skipped
T0=$SECONDS
FAILED=()
declare -A STATUS

left() { echo $(( BUDGET - (SECONDS - T0) - RESERVE )); }

# run_step NAME CAP REQUIRED CMD...: CMD under `timeout`, output tee'd to $OUT/NAME.log; records the status.
run_step() {
    local name=$1 cap=$2 required=$3
    shift 3
    local t
    t=$(left)
    (( cap < t )) && t=$cap
    if (( t < MIN_STEP )); then
        STATUS[$name]="skipped: the script's time budget (${BUDGET} s) is spent"
        echo "== $name: ${STATUS[$name]}" | tee "$OUT/$name.log"
        [[ $required == 1 ]] && FAILED+=("$name")
        return 0
    fi
    echo "== $name (timeout ${t} s, $(( SECONDS - T0 )) s into the script): $*"
    local start=$SECONDS rc
    timeout -k 5 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$(( SECONDS - start ))
    if (( rc == 0 )); then
        STATUS[$name]="ok (${took} s)"
    elif (( rc == 124 || rc == 137 )); then
        STATUS[$name]="TIMED OUT after ${t} s"
        FAILED+=("$name")
    else
        STATUS[$name]="FAILED: exit ${rc} (${took} s)"
        FAILED+=("$name")
    fi
    echo "== $name: ${STATUS[$name]}"
}

# ---- install ------------------------------------------------------------------------------------
echo "== install ($ROOT)"
how=""
{
    PIPARGS=(--no-deps --no-build-isolation --no-index)
    if "$PY" -m pip install "${PIPARGS[@]}" -e .; then
        how="pip install -e ."
    elif "$PY" -m pip install "${PIPARGS[@]}" --break-system-packages -e .; then
        how="pip install --break-system-packages -e ."
    elif "$PY" -m pip install "${PIPARGS[@]}" --target "$OUT/site" .; then
        how="pip install --target $OUT/site"
        export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
} > "$OUT/install.log" 2>&1
found=$(cd / && "$PY" -c "import nlref, os; print(os.path.realpath(os.path.dirname(nlref.__file__)))" 2>>"$OUT/install.log")
if [[ -z $how || ( $how != *--target* && $found != "$ROOT" ) ]]; then
    # the repository root is the package: a symlink named nlref on PYTHONPATH imports it
    mkdir -p "$OUT/pkgpath" && ln -sfn "$ROOT" "$OUT/pkgpath/nlref"
    export PYTHONPATH="$OUT/pkgpath${PYTHONPATH:+:$PYTHONPATH}"
    how="${how:-pip failed (see install.log)}; using PYTHONPATH=$OUT/pkgpath (symlink to $ROOT)"
    found=$(cd / && "$PY" -c "import nlref, os; print(os.path.realpath(os.path.dirname(nlref.__file__)))" 2>>"$OUT/install.log")
fi
echo "install: $how; nlref imports from ${found:-NOWHERE}" | tee -a "$OUT/install.log"
if [[ -z $found ]]; then
    STATUS[install]="FAILED (see install.log)"
    FAILED+=(install)
else
    STATUS[install]="ok: $how"
fi

# ---- versions -----------------------------------------------------------------------------------
{
    echo "== versions"
    (command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi -L) || echo "nvidia-smi: not found or failed"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
    timeout 90 "$PY" - <<'EOF'
import platform
import numba, numpy
print(f"python {platform.python_version()}  numpy {numpy.__version__}  numba {numba.__version__}")
try:
    import cupy
    print(f"cupy {cupy.__version__}  CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"
          f"  driver {cupy.cuda.runtime.driverGetVersion()}")
except Exception as exc:
    print(f"cupy: {type(exc).__name__}: {exc}")
try:
    import torch
    print(f"torch {torch.__version__}  cuda available {torch.cuda.is_available()}"
          + (f"  {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
except Exception as exc:
    print(f"torch: {type(exc).__name__}: {exc}")
try:
    from nlref.fast.gpu import namespace
    print("nlref.fast.gpu.namespace.cupy_available():", namespace.cupy_available())
except Exception as exc:
    print(f"nlref: {type(exc).__name__}: {exc}")
EOF
} 2>&1 | tee "$OUT/versions.log"

# ---- warm-up of the compile caches, in the background while the tests run -------------------------
WARM_PID=""
if [[ ${NL_CHECK_WARMUP:-1} == 1 ]]; then
    echo "== warmup (background): bench of cpu and gpu at tiny sizes -> $OUT/warmup.log"
    timeout -k 5 150 "$PY" -m nlref bench --preset hope-tiny --preset titans-tiny \
        --preset transformer-tiny --backend cpu --backend gpu --batch-size 2 --seq-len 16 --repeats 1 \
        --decode-context 16 --decode-tokens 1 --max-seconds 600 > "$OUT/warmup.log" 2>&1 &
    WARM_PID=$!
fi

# ---- (a) GPU tests ------------------------------------------------------------------------------
rm -f "$OUT/gpu_errors.jsonl"
# shellcheck disable=SC2086  # the test glob is meant to expand
run_step tests "${NL_CHECK_TESTS_S:-110}" 1 \
    env NL_REQUIRE_GPU=1 NL_GPU_ERRORS="$OUT/gpu_errors.jsonl" \
    "$PY" -m pytest ${NL_CHECK_TESTS:-tests/gpu/test_gpu_device_*.py} -q ${NL_CHECK_PYTEST_ARGS:--x} -p no:cacheprovider

# ---- (b) conformance vectors on the GPU ---------------------------------------------------------
run_step conformance "${NL_CHECK_CONF_S:-40}" 1 \
    "$PY" -m nlref conformance verify tests/conformance --backend gpu

# ---- (c) benchmarks -----------------------------------------------------------------------------
if [[ -n $WARM_PID ]]; then
    t=$(left)
    (( t > 60 )) && t=60
    waited=$SECONDS
    while kill -0 "$WARM_PID" 2>/dev/null && (( SECONDS - waited < t )); do sleep 1; done
    if kill -0 "$WARM_PID" 2>/dev/null; then
        kill "$WARM_PID" 2>/dev/null
        STATUS[warmup]="still running after the tests and $(( SECONDS - waited )) s more: stopped"
    elif wait "$WARM_PID"; then
        STATUS[warmup]="ok (waited $(( SECONDS - waited )) s after the tests)"
    else
        STATUS[warmup]="exit $? (see warmup.log; informational)"
    fi
    echo "== warmup: ${STATUS[warmup]}"
fi
BACKEND_ARGS=()
for b in ${NL_CHECK_BACKENDS:-gpu cpu torch-cuda}; do BACKEND_ARGS+=(--backend "$b"); done
CONTEXT_ARGS=()
for c in ${NL_CHECK_CONTEXTS:-1024 65536}; do CONTEXT_ARGS+=(--decode-context "$c"); done
bench_preset() {  # bench_preset PRESET REQUIRED
    local p=$1 required=$2 cap
    if [[ $p == *medium* ]]; then cap=${NL_CHECK_BENCH_MEDIUM_S:-130}; else cap=${NL_CHECK_BENCH_SMALL_S:-60}; fi
    local t
    t=$(left)
    (( cap < t )) && t=$cap
    rm -f "$OUT/bench_$p.jsonl"
    run_step "bench_$p" "$cap" "$required" \
        "$PY" -m nlref bench --preset "$p" "${BACKEND_ARGS[@]}" \
        --batch-size "${NL_CHECK_BATCH:-4}" --seq-len "${NL_CHECK_SEQ_LEN:-256}" --dtype float32 \
        --repeats "${NL_CHECK_REPEATS:-2}" "${CONTEXT_ARGS[@]}" --decode-tokens "${NL_CHECK_DECODE_TOKENS:-16}" \
        --max-seconds "${NL_CHECK_MAX_SECONDS:-8}" --prefill-seconds "${NL_CHECK_PREFILL_SECONDS:-15}" \
        --time-budget $(( t * 6 / 10 )) --json-out "$OUT/bench_$p.jsonl"
}
for p in ${NL_CHECK_PRESETS:-hope-small hope-medium}; do bench_preset "$p" 1; done
for p in ${NL_CHECK_EXTRA_PRESETS-titans-small transformer-small}; do
    if (( $(left) >= 30 )); then bench_preset "$p" 0; else STATUS[bench_$p]="not run (time budget)"; fi
done

# ---- (d) summary --------------------------------------------------------------------------------
STEPS_FILE="$OUT/steps.tsv"
: > "$STEPS_FILE"
for k in install warmup tests conformance $(for p in ${NL_CHECK_PRESETS:-hope-small hope-medium} \
        ${NL_CHECK_EXTRA_PRESETS-titans-small transformer-small}; do echo "bench_$p"; done); do
    printf '%s\t%s\n' "$k" "${STATUS[$k]:-not run}" >> "$STEPS_FILE"
done
OUT="$OUT" NL_CHECK_BACKENDS="${NL_CHECK_BACKENDS:-gpu cpu torch-cuda}" timeout 30 "$PY" - <<'EOF' 2>&1 | tee "$OUT/summary.log"
import glob, json, os, re

out = os.environ["OUT"]
print("=" * 100)
print(f"GPU check summary ({out})")
for line in open(os.path.join(out, "steps.tsv")):
    name, status = line.rstrip("\n").split("\t", 1)
    print(f"  {name:<28} {status}")


def last_match(path, pattern):
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return None
    hits = [ln for ln in lines if re.search(pattern, ln)]
    return hits[-1].strip() if hits else None


print("tests:       ", last_match(os.path.join(out, "tests.log"),
                                  r"(passed|failed|error|skipped|no tests ran).* in [\d.]+s") or "no pytest summary line")
print("conformance: ", last_match(os.path.join(out, "conformance.log"), r"^backend gpu: ")
      or last_match(os.path.join(out, "conformance.log"), r"\S") or "no output")

errs = os.path.join(out, "gpu_errors.jsonl")
worst = {}
if os.path.exists(errs):
    for line in open(errs):
        try:
            r = json.loads(line)
            rel = float(r["rel"])
        except (ValueError, KeyError):
            continue
        d = r.get("dtype", "?")
        if d not in worst or rel > worst[d][0]:
            worst[d] = (rel, r)
for d, (rel, r) in sorted(worst.items()):
    print(f"worst GPU error {d}: rel {rel:.2e} (tol {r.get('tol')}) in {r.get('test')} :: {r.get('tensor')}"
          f"  [{r.get('namespace')}]")
if not worst:
    print("worst GPU error: none recorded (", errs, ")")

rows = []
for path in sorted(glob.glob(os.path.join(out, "bench_*.jsonl"))):
    rows += [json.loads(line) for line in open(path) if line.strip()]
cards = {}  # the card's matrix-product rate, measured once in each bench process
for r in rows:
    if r.get("device") and r.get("peak_gflops"):
        cards.setdefault((r["device"], r.get("peak")), set()).add(round(r["peak_gflops"] / 1e3, 2))
for (card, how), rates in sorted(cards.items()):
    print(f"card {card}: matrix-product rate {', '.join(f'{x:.2f}' for x in sorted(rates))} TFLOP/s ({how})")


def ms(v):
    return f"{1e3 * v:.2f}" if v else "-"


ctxs = sorted({int(c) for r in rows for c in r.get("decode_s_per_token", {})})
print(f"{'preset':<20} {'backend':<10} {'tokens/s':>9} {'step ms':>9} {'TFLOP/s':>8} {'% peak':>7} {'first s':>8} "
      + " ".join(f"{'ms/tok@' + (str(c // 1024) + 'K' if c % 1024 == 0 else str(c)):>11}" for c in ctxs) + "  note")
for r in rows:
    if "tokens_per_s" not in r:
        print(f"{r['preset']:<20} {r['backend']:<10} {r.get('status', '?')[:120]}")
        continue
    dec = r.get("decode_s_per_token", {})
    star = "*" if r.get("steps_timed") == 0 else " "
    skipped = "; ".join(f"@{c}: {w}" for c, w in r.get("decode_skipped", {}).items())
    peak = f"{100 * r['of_peak']:.2f}" if r.get("of_peak") else "-"
    print(f"{r['preset']:<20} {r['backend']:<10} {r['tokens_per_s']:>8.0f}{star} {1e3 * r['step_s']:>9.1f} "
          f"{r['gflops'] / 1e3:>8.4f} {peak:>7} {r['first_call_s']:>8.2f} "
          + " ".join(f"{ms(dec.get(str(c))):>11}" for c in ctxs) + (f"  skipped {skipped}" if skipped else ""))
if any(r.get("steps_timed") == 0 for r in rows):
    print("* one step only (the first call, over --max-seconds): its time is the step time")
for preset in sorted({r["preset"] for r in rows}):
    tps = {r["backend"]: r["tokens_per_s"] for r in rows if r["preset"] == preset and "tokens_per_s" in r}
    if "gpu" in tps:
        parts = [f"{tps['gpu'] / tps[b]:.2f}x {b}" for b in ("cpu", "torch-cuda") if b in tps]
        target = ""
        if "torch-cuda" in tps:
            target = "  (target >= 1x torch-cuda: " + ("met" if tps["gpu"] >= tps["torch-cuda"] else "NOT met") + ")"
        print(f"{preset}: gpu step = " + (", ".join(parts) or "no other row") + target)
steps = dict(line.rstrip("\n").split("\t", 1) for line in open(os.path.join(out, "steps.tsv")))
for name, status in steps.items():  # a bench step that ended (timeout, crash) before all its rows
    if name.startswith("bench_") and not status.startswith(("not run", "skipped")):
        have = {r["backend"] for r in rows if r["preset"] == name[6:]}
        for b in os.environ["NL_CHECK_BACKENDS"].split():
            if b not in have:
                print(f"{name[6:]} {b}: no row (the step ended first: {status})")
print("=" * 100)
EOF

if (( ${#FAILED[@]} )); then
    echo "gpu_check: FAILED steps: ${FAILED[*]} ($(( SECONDS - T0 )) s; logs in $OUT)"
    exit 1
fi
echo "gpu_check: all steps passed ($(( SECONDS - T0 )) s; logs in $OUT)"
