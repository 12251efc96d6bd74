#!/usr/bin/env bash
# scripts/fresh_machine.sh: a new user's path, checked. Clones the repository into a temporary
# folder, makes a fresh virtual environment there, runs exactly the README's two quickstart
# commands in the clone (read from README.md's `## Quickstart` block by scripts/readme_quickstart.py,
# the parser .ci/run uses too) and prints a summary: each command, its exit code and wall time.
# Both commands run even if the first fails; the exit status is 1 if either failed, else 0
# (pytest's "no tests collected", exit 5, is a failure too).
#
# Usage: scripts/fresh_machine.sh [--dry-run] [--keep] [SOURCE]
#   SOURCE     a path or URL git can clone; default: the checkout this script is in, at its
#              committed HEAD (uncommitted changes are not part of what a new user gets)
#   --dry-run  clone and read the README's commands, print what would run, run nothing
#   --keep     keep the temporary folder (the clone, the venv, the logs); by default it is kept
#              only when a command failed
# Environment: PYTHON (python3) makes the venv. The commands run with the settings a fresh shell
# has: NL_*, NUMBA_CACHE_DIR, PYTHONPATH and an active virtual environment are cleared (pip's
# own configuration, e.g. its index, is the machine's and is kept).
# Takes about 10 minutes on the 2-core machine (the install, a 2-minute training run, the tests).

set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"

dry=0 keep=0 src=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1 ;;
        --keep) keep=1 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        -*) echo "fresh_machine.sh: unknown option $arg" >&2; exit 2 ;;
        *) [ -z "$src" ] || { echo "fresh_machine.sh: one SOURCE only" >&2; exit 2; }; src="$arg" ;;
    esac
done

tmp="$(mktemp -d "${TMPDIR:-/tmp}/nl-fresh-machine.XXXXXX")"
clone="$tmp/repo"
if [ -z "$src" ]; then
    rev="$(git -C "$root" rev-parse HEAD)" || { echo "fresh_machine.sh: $root is not a git checkout" >&2; exit 2; }
    git clone --quiet --no-checkout "$root" "$clone" && git -C "$clone" checkout --quiet "$rev"
else
    git clone --quiet "$src" "$clone"
fi || { echo "fresh_machine.sh: could not clone ${src:-$root}" >&2; rm -rf "$tmp"; exit 1; }
echo "clone: ${src:-$root} at $(git -C "$clone" rev-parse --short HEAD) in $clone"

mapfile -t commands < <(python3 "$here/readme_quickstart.py" "$clone/README.md")
if [ "${#commands[@]}" -ne 2 ]; then
    echo "fresh_machine.sh: could not read the README quickstart of the clone" >&2
    rm -rf "$tmp"
    exit 1
fi

if [ "$dry" -eq 1 ]; then
    echo "dry run: would make $tmp/venv (${PYTHON:-python3} -m venv) and run in $clone:"
    printf '  %s\n' "${commands[@]}"
    rm -rf "$tmp"
    exit 0
fi

"${PYTHON:-python3}" -m venv "$tmp/venv" || { echo "fresh_machine.sh: could not make a venv" >&2; exit 1; }

# a fresh shell's settings: nothing of this checkout's environment leaks into the new user's run
while IFS= read -r name; do unset "$name"; done < <(compgen -v NL_)
unset NUMBA_CACHE_DIR PYTHONPATH VIRTUAL_ENV PYTHONHOME
# shellcheck disable=SC1091
. "$tmp/venv/bin/activate"
cd "$clone" || exit 1

rcs=() walls=()
for i in 0 1; do
    echo "+ ${commands[$i]}"
    start=$SECONDS
    bash -o pipefail -c "${commands[$i]}" 2>&1 | tee "$tmp/command$((i + 1)).log"
    rcs+=("${PIPESTATUS[0]}")
    walls+=("$((SECONDS - start))")
done

failed=0
echo
echo "fresh machine check: $(git -C "$clone" rev-parse --short HEAD), $(python3 --version 2>&1), $(nproc) cores"
for i in 0 1; do
    verdict=ok
    if [ "${rcs[$i]}" -ne 0 ]; then verdict=FAILED; failed=1; fi
    [ "${rcs[$i]}" -eq 5 ] && verdict="FAILED (pytest collected no tests)"
    printf '  %-44s exit %-3s %6s s  %s\n' "${commands[$i]}" "${rcs[$i]}" "${walls[$i]}" "$verdict"
done
tail_line="$(grep -E '[0-9]+ (passed|failed)' "$tmp/command2.log" | tail -n 1)"
[ -n "$tail_line" ] && echo "  pytest: $tail_line"
if [ "$failed" -eq 1 ] || [ "$keep" -eq 1 ]; then
    echo "  kept: $tmp (the clone, the venv, command1.log, command2.log)"
else
    rm -rf "$tmp"
fi
exit "$failed"
