#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (once, and again when the
# dependencies change) and runs the demo, the tests or the benchmarks.
#   ./dev.sh demo     synthesize a dataset, prebuild the cache, read it with 2 workers
#   ./dev.sh test     the whole test suite (what CI runs); --quick: the fast tier
#   ./dev.sh bench    the benchmark suite (installs the peers it compares against)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    local extras=$1
    [ -x "$PY" ] || python3 -m venv "$VENV"
    local stamp
    stamp="$VENV/.installed-$extras-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        echo "setting up $VENV ($extras) ..." >&2
        "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
        "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]"
        touch "$stamp"
    fi
}

# ./dev.sh test [--quick] [pytest arguments]: the whole suite, or with --quick the fast tier
# (no test marked full, Hypothesis's quick profile; tests/README.md).
run_tests() {
    local args=() quick=0
    for a in "$@"; do
        if [ "$a" = --quick ]; then quick=1; else args+=("$a"); fi
    done
    if [ $quick = 1 ]; then
        export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-quick}
        args=(-m "not slow and not full" "${args[@]}")
    fi
    exec "$PY" -m pytest -q ${args[@]+"${args[@]}"}
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)  setup test;  exec "$PY" -m diskcache_ocr.demo "$@" ;;
    test)  setup test; run_tests "$@" ;;
    bench) setup bench; exec "$PY" benchmarks/run_all.py "$@" ;;
    *) sed -n '2,7p' "$0"; exit 2 ;;
esac
