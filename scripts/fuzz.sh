#!/usr/bin/env bash
# Build the libFuzzer targets (fuzz/, clang + ASan + UBSan, in build-fuzz/) and run each.
#   scripts/fuzz.sh --short          every target for FUZZ_SECONDS (default 20) s: the CI step
#   scripts/fuzz.sh TARGET [SECONDS] one target (config, pg_query_log, queue_record,
#                                    queue_journal, queue_store, grpc_body, edge_batch),
#                                    default 600 s
# The tree's corpus (fuzz/corpus/TARGET) is read, never written: new inputs go to
# build-fuzz/corpus/TARGET, crashes to build-fuzz/findings/. A crash fails the script, with
# the input's path; docs/fuzzing.md says what to do with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh

targets=(config pg_query_log queue_record queue_journal queue_store grpc_body edge_batch)
if [ "${1:-}" = "--short" ]; then
  seconds=${FUZZ_SECONDS:-20}
elif [ -n "${1:-}" ]; then
  targets=("$1")
  seconds=${2:-600}
else
  echo "usage: scripts/fuzz.sh --short | TARGET [SECONDS]" >&2
  exit 2
fi

build=build-fuzz
CC=clang cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DSPOKE_SANITIZE=ON -DSPOKE_FUZZ=ON \
  -DBUILD_TESTING=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" --target spoke-fuzzers >/dev/null
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

mkdir -p "$build/findings"
status=0
for t in "${targets[@]}"; do
  mkdir -p "$build/corpus/$t"
  log="$build/findings/$t.log"
  start=$(date +%s)
  rc=0
  "$build/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$build/findings/$t-" \
    "$build/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
  echo "fuzz_$t: $(( $(date +%s) - start )) s, ${runs:-?} runs, ${cov:-cov: ?}, exit $rc"
  if [ "$rc" -ne 0 ]; then
    status=1
    grep -E 'ERROR|SUMMARY|Test unit written' "$log" | head -5 || true
    echo "  log: $log"
  fi
done
exit $status
