#!/usr/bin/env bash
# bench-proxy.sh -- the proxy benchmark of docs/benchmarks.md, in one command: a thin
# wrapper that builds spoke-bench, spoked and the passthrough plugin (Release) if needed
# and runs the proxy suite, `spoke-bench proxy` without --target (tools/bench_proxy_suite.c),
# which starts the echo upstream, HAProxy and spoked with 0, 1 and 4 plugins itself.
# `spoke-bench all` runs it with the rest of the benchmarks.
#
# Usage: scripts/bench-proxy.sh [--build DIR] [--duration 10s] [--warmup 1s]
#                               [--conns 64] [--sizes "128 16384"] [--rounds 1]
#                               [--out FILE] [-- MORE SPOKE-BENCH PROXY OPTIONS]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build-release
ARGS=()
OUT=
while [ $# -gt 0 ]; do
    case $1 in
    --build) BUILD=$2; shift 2 ;;
    --duration|--warmup|--conns|--rounds) ARGS+=("$1" "$2"); shift 2 ;;
    --sizes) ARGS+=(--sizes "$(echo "$2" | tr ' ' ',')"); shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --) shift; ARGS+=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-proxy: unknown option '$1' (see --help)" >&2; exit 1 ;;
    esac
done
[ -f "$BUILD/CMakeCache.txt" ] ||
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target spoke-bench spoked passthrough >/dev/null
if [ -n "$OUT" ]; then
    "$BUILD/spoke-bench" proxy "${ARGS[@]}" | tee "$OUT"
else
    exec "$BUILD/spoke-bench" proxy "${ARGS[@]}"
fi
