#!/usr/bin/env bash
# The compute benchmarks of docs/benchmarks.md in one run, so that funcmesh and the engines it is
# compared with share the machine's state: funcmesh's no-op round trip and throughput, then Dask,
# Parsl (HTEX) and Ray doing the same no-op with two workers (bench/competitors), one JSON line
# each. `bench/run.sh routing` runs the warming-aware routing experiment instead;
# `bench/run.sh scale [SIZES]` the idle-cost curve of in-process federations (default 10 40 100
# 200 members, one process each), and `bench/run.sh funcx` the funcX scale experiment, simulated.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set +u
if [ "${1:-}" = scale ] || [ "${1:-}" = funcx ]; then
    cargo build --release -p testnet --example scale >&2
    harness=$CARGO_TARGET_DIR/release/examples/scale
    if [ "$1" = funcx ]; then
        exec "$harness" --funcx --members 16 --per-institution 4 --endpoints 64 --workers 128 --tasks 1310720
    fi
    shift
    for n in ${@:-10 40 100 200}; do
        "$harness" --members "$n"
    done
    exit 0
fi
cargo build --release -p node --bin funcmesh --example bench_tasks >&2
export FUNCMESH_BIN=$CARGO_TARGET_DIR/release/funcmesh
if [ "${1:-noop}" = routing ]; then
    scripts/build-image.sh python >&2
    exec "$CARGO_TARGET_DIR/release/examples/bench_tasks" routing
fi
"$CARGO_TARGET_DIR/release/examples/bench_tasks" noop
bench/competitors/run.sh
