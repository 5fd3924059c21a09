#!/usr/bin/env bash
# bench-proxy.sh -- the proxy benchmark of docs/benchmarks.md, in one command.
#
# Builds spoke-bench, spoked and the passthrough plugin (Release) if needed, then on
# loopback, against ONE echo upstream (`spoke-bench echo`, one thread), runs the same
# client load (`spoke-bench proxy`: N connections of request/response round trips) for
# each size:
#
#   direct      straight to the echo server (the floor: no proxy at all)
#   haproxy     through HAProxy, mode tcp, nbthread 1
#   spoked 0/1/4  through spoked with one worker (listen.workers: 1) and 0, 1, 4
#               passthrough plugins
#
# then `spoke-bench hooks`, and prints one markdown report: the machine, the commands,
# a table per size with ratios against HAProxy, and the hooks table. Parts that cannot
# run (spoked not built yet, haproxy missing) are listed as skipped, with the reason.
# With --rounds R every path runs R times, interleaved (round 1 of each path, then round
# 2 ..., each round starting one path later), and each row is the run with the median
# req/s of its path, shown whole, so a burst of other work on the machine skews one
# round, not one path.
#
# Usage: scripts/bench-proxy.sh [--build DIR] [--duration 10s] [--warmup 1s]
#                               [--conns 64] [--sizes "128 16384"] [--rounds 1]
#                               [--out FILE]
# Every process it starts is stopped on exit (also on Ctrl-C). Only loopback is used.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build-release
DURATION=10s
WARMUP=1s
CONNS=64
SIZES="128 16384"
ROUNDS=1
OUT=

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case $1 in
    --build) BUILD=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --conns) CONNS=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench-proxy: unknown option '$1' (see --help)" >&2; exit 1 ;;
    esac
done
case $BUILD in /*) ;; *) BUILD=$PWD/$BUILD ;; esac
case $ROUNDS in ''|*[!0-9]*|0) echo "bench-proxy: --rounds: expected a positive number" >&2; exit 1 ;; esac

log() { echo "bench-proxy: $*" >&2; }
die() { log "$*"; exit 1; }

for tool in jq cmake make awk pgrep getconf; do
    command -v $tool >/dev/null || die "$tool is required (apt-get install $tool)"
done

# ---- processes and cleanup -----------------------------------------------------------

TMP=$(mktemp -d /tmp/spoke-bench.XXXXXX)
PIDS=()

stop_pid() { # pid: SIGTERM, up to 5 s, then SIGKILL
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for 5 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    PIDS=()
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() { # drop $1 from PIDS once it was stopped
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Ports come from below the ephemeral range, so no client socket can hold one by chance.
EPHEMERAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ "$EPHEMERAL_LOW" -gt 12000 ] || EPHEMERAL_LOW=12000

free_port() { # a port nobody listens on, from a per-run random start
    local p=$((10000 + (RANDOM % (EPHEMERAL_LOW - 10200)))) i
    for i in $(seq 200); do
        port_busy $p || { echo $p; return 0; }
        p=$((p + 1))
    done
    die "no free port found"
}

wait_listen() { # port pid logfile: wait (5 s) until port accepts, or pid died
    local i
    for i in $(seq 100); do
        port_busy "$1" && return 0
        kill -0 "$2" 2>/dev/null || { log "process $2 exited; its log:"; cat "$3" >&2; return 1; }
        sleep 0.05
    done
    log "nothing listens on 127.0.0.1:$1 after 5 s; log of pid $2:"
    cat "$3" >&2
    return 1
}

# ---- build -------------------------------------------------------------------------

if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    log "configuring $BUILD (Release)"
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >"$TMP/cmake.log" 2>&1 ||
        { cat "$TMP/cmake.log" >&2; die "cmake failed"; }
fi
BUILD_TYPE=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
[ "$BUILD_TYPE" = Release ] || log "warning: $BUILD is a '$BUILD_TYPE' build, not Release"
JOBS=$(nproc)
log "building spoke-bench and passthrough.so in $BUILD"
cmake --build "$BUILD" -j "$JOBS" --target spoke-bench passthrough >"$TMP/build.log" 2>&1 ||
    { tail -30 "$TMP/build.log" >&2; die "build of spoke-bench failed"; }
BENCH=$BUILD/spoke-bench
PLUGIN_DIR=$BUILD/plugins
SPOKED=
SKIP_SPOKED=
if [ ! -f "$ROOT/core/spoked.c" ]; then
    SKIP_SPOKED="core/spoked.c does not exist yet"
elif ! cmake --build "$BUILD" -j "$JOBS" --target spoked >"$TMP/build-spoked.log" 2>&1; then
    tail -30 "$TMP/build-spoked.log" >&2
    SKIP_SPOKED="spoked did not build (errors above)"
else
    SPOKED=$BUILD/spoked
fi
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
SKIP_HAPROXY=
[ -x "$HAPROXY" ] || SKIP_HAPROXY="haproxy is not installed (apt-get install haproxy)"
[ -z "$SKIP_SPOKED" ] || log "SKIPPING the spoked runs: $SKIP_SPOKED"
[ -z "$SKIP_HAPROXY" ] || log "SKIPPING the HAProxy runs: $SKIP_HAPROXY"

# ---- the runs ------------------------------------------------------------------------

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${LOAD_BEFORE%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
    log "warning: load average is $LOAD_BEFORE on $(nproc) CPUs; other work will skew the figures"
fi

ECHO_PORT=$(free_port)
"$BENCH" echo --listen "127.0.0.1:$ECHO_PORT" >"$TMP/echo.log" 2>&1 &
ECHO_PID=$!
PIDS+=("$ECHO_PID")
wait_listen "$ECHO_PORT" "$ECHO_PID" "$TMP/echo.log" || die "the echo upstream did not start"
UPSTREAM=127.0.0.1:$ECHO_PORT

CLK_TCK=$(getconf CLK_TCK)

cpu_ticks() { # pid: CPU ticks (user + system, own and reaped children's) of pid and children
    local p total=0
    for p in "$1" $(pgrep -P "$1"); do
        [ -r "/proc/$p/stat" ] || continue
        total=$((total + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{ print $12 + $13 + $14 + $15 }')))
    done
    echo $total
}

# load name target size [proxy_pid]: run spoke-bench proxy, keep its JSON in
# $TMP/name-size.rROUND.json (none when it could not run at all), and the CPU ticks the
# proxy process tree used meanwhile in .cpu: CPU per request does not depend on how
# busy the rest of the machine is, unlike throughput.
load() {
    local name=$1 target=$2 size=$3 pid=${4:-} rc=0 out=$TMP/$1-$3.r$ROUND c0=0
    log "round $ROUND/$ROUNDS: $name, $size-byte requests, $DURATION against $target"
    [ -z "$pid" ] || c0=$(cpu_ticks "$pid")
    "$BENCH" proxy --target "$target" --conns "$CONNS" --size "$size" \
        --duration "$DURATION" --warmup "$WARMUP" --json >"$out.json" 2>"$out.err" || rc=$?
    [ -z "$pid" ] || echo $(($(cpu_ticks "$pid") - c0)) >"$out.cpu"
    if [ $rc -ne 0 ]; then
        log "$name: spoke-bench proxy exited $rc:"
        cat "$out.err" >&2
    fi
    [ $rc -ne 1 ] || rm -f "$out.json"
}

# pick name size: the round with the median req/s becomes $TMP/name-size.json
pick() {
    local files=("$TMP/$1-$2".r*.json) median
    [ -e "${files[0]}" ] || return 0
    median=$(for f in "${files[@]}"; do echo "$(jq .rps "$f") $f"; done |
        sort -g | awk '{ v[NR] = $2 } END { print v[int((NR + 1) / 2)] }')
    cp "$median" "$TMP/$1-$2.json"
    [ ! -e "${median%.json}.cpu" ] || cp "${median%.json}.cpu" "$TMP/$1-$2.cpu"
}

spoked_config() { # file port n_plugins
    {
        echo "run_dir: $TMP/run-$2"
        echo "user: $(id -un)"
        echo "edge: { id: bench }"
        echo "listen: { address: 127.0.0.1:$2, upstream: $UPSTREAM, workers: 1 }"
        echo "log: { level: warn }"
        echo "queue: { path: $TMP/queue-$2 }"
        echo "plugins:"
        echo "  dir: $PLUGIN_DIR"
        if [ "$3" -gt 0 ]; then
            echo "  list:"
            for i in $(seq "$3"); do
                echo "    - { name: passthrough-$i, file: passthrough.so }"
            done
        fi
    } >"$1"
    mkdir -p "$TMP/run-$2"
}

run_spoked() { # n_plugins size
    local n=$1 size=$2 port cfg pid
    port=$(free_port)
    cfg=$TMP/spoked-$n.yaml
    spoked_config "$cfg" "$port" "$n"
    "$SPOKED" -c "$cfg" >"$TMP/spoked-$n-$size.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    if wait_listen "$port" "$pid" "$TMP/spoked-$n-$size.log"; then
        load "spoked$n" "127.0.0.1:$port" "$size" "$pid"
    else
        log "spoked with $n plugins did not start; config was:"
        cat "$cfg" >&2
    fi
    stop_pid "$pid"
    forget_pid "$pid"
}

run_haproxy() { # size
    local size=$1 port cfg pid maxconn=$((CONNS + 1000))
    port=$(free_port)
    cfg=$TMP/haproxy.cfg
    cat >"$cfg" <<EOF
global
    nbthread 1
    maxconn $maxconn

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    maxconn $maxconn

listen bench
    bind 127.0.0.1:$port
    server echo $UPSTREAM
EOF
    "$HAPROXY" -db -f "$cfg" >"$TMP/haproxy-$size.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    if wait_listen "$port" "$pid" "$TMP/haproxy-$size.log"; then
        load haproxy "127.0.0.1:$port" "$size" "$pid"
    fi
    stop_pid "$pid"
    forget_pid "$pid"
}

run_path() { # path size
    case $1 in
    direct) load direct "$UPSTREAM" "$2" ;;
    haproxy) [ -n "$SKIP_HAPROXY" ] || run_haproxy "$2" ;;
    spoked*) [ -n "$SKIP_SPOKED" ] || run_spoked "${1#spoked}" "$2" ;;
    esac
}

# Each round starts one path later (round 2: haproxy first ... direct last), so no path
# always runs right after the same neighbour or at the same point of the run.
PATHS=(direct haproxy spoked0 spoked1 spoked4)
for ROUND in $(seq "$ROUNDS"); do
    for size in $SIZES; do
        for i in $(seq 0 $((${#PATHS[@]} - 1))); do
            run_path "${PATHS[$(((i + ROUND - 1) % ${#PATHS[@]}))]}" "$size"
        done
    done
done
for size in $SIZES; do
    for name in direct haproxy spoked0 spoked1 spoked4; do pick "$name" "$size"; done
done

log "spoke-bench hooks"
HOOKS_RC=0
"$BENCH" hooks --plugin "$PLUGIN_DIR/passthrough.so" >"$TMP/hooks.txt" 2>&1 || HOOKS_RC=$?
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- the report ----------------------------------------------------------------------

num() { jq -r ".$2" "$1"; }

cpu_us() { # name size: proxy CPU µs per request of the picked run, or ""
    local f=$TMP/$1-$2.json c=$TMP/$1-$2.cpu
    [ -s "$c" ] && [ -s "$f" ] || { echo ""; return; }
    jq -rn --argjson t "$(cat "$c")" --argjson n "$(jq .requests_all "$f")" --argjson hz "$CLK_TCK" \
        'if $n > 0 then $t / $hz * 1e6 / $n * 100 | round / 100 | tostring else "" end'
}

ratio() { # a b: "a/b x" to two places, or "" when either is missing
    [ -n "$1" ] && [ -n "$2" ] || { echo ""; return; }
    jq -rn --argjson a "$1" --argjson b "$2" \
        'if $b > 0 then ($a / $b * 100 | round / 100 | tostring) + "x" else "" end'
}

row() { # label name size
    local f=$TMP/$2-$3.json ha=$TMP/haproxy-$3.json
    if [ ! -s "$f" ]; then
        echo "| $1 | failed: see the messages above | | | | | | | | | | |"
        return
    fi
    local cpu cpu_ha="" r_rps="" r_p99="" r_cpu=""
    cpu=$(cpu_us "$2" "$3")
    if [ -s "$ha" ] && [ "$2" != haproxy ] && [ "$2" != direct ]; then
        cpu_ha=$(cpu_us haproxy "$3")
        r_rps=$(ratio "$(num "$f" rps)" "$(num "$ha" rps)")
        r_p99=$(ratio "$(num "$f" p99_us)" "$(num "$ha" p99_us)")
        r_cpu=$(ratio "$cpu" "$cpu_ha")
    fi
    jq -r --arg name "$1" --arg cpu "${cpu:--}" --arg rr "$r_rps" --arg rp "$r_p99" \
        --arg rc "$r_cpu" '
        def f(n): n * 10 | round / 10 | tostring;
        "| \($name) | \(.rps | round) | \(f(.mib_s_out)) | \(f(.p50_us)) | \(f(.p99_us)) | " +
        "\(f(.p999_us)) | \(.errors) | \($cpu) | \(f(.client_cpu_us_per_req // 0)) | " +
        "\($rr) | \($rp) | \($rc) |"' "$f"
    local all
    all=$(cat "$TMP/$2-$3".r*.json | jq -s 'map(.errors) | add')
    [ "$all" = 0 ] || log "$1, $3 B: $all errors over $ROUNDS round(s) (messages above)"
}

report() {
    local cpu kernel commit
    cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
    kernel=$(uname -r)
    commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    echo "### Run of $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit"
    echo
    echo "- machine: $(nproc) CPUs, $cpu, Linux $kernel; load average $LOAD_BEFORE" \
         "before the runs, $LOAD_AFTER after"
    echo "- build: $BUILD_TYPE ($BUILD)"
    echo "- load: \`spoke-bench proxy --conns $CONNS --size SIZE --duration $DURATION" \
         "--warmup $WARMUP\` (one client thread), one echo upstream" \
         "(\`spoke-bench echo\`, one thread), all on 127.0.0.1"
    [ "$ROUNDS" -eq 1 ] || echo "- $ROUNDS rounds, interleaved, each starting one path later;" \
         "each row is the round with the median req/s of its path"
    echo "- spoked: \`listen.workers: 1\`, N passthrough plugins; HAProxy" \
         "$("$HAPROXY" -v 2>/dev/null | head -1 | awk '{print $3}'): \`mode tcp\`, \`nbthread 1\`"
    echo "- proxy CPU µs/req: user + system CPU time of the proxy's processes (spoked:" \
         "supervisor and worker) during the run, warmup included, over every request" \
         "completed meanwhile; unlike req/s it hardly depends on what else the machine runs." \
         "client CPU µs/req: the same for spoke-bench proxy itself (getrusage)"
    [ -z "$SKIP_SPOKED" ] || echo "- **skipped: spoked rows** ($SKIP_SPOKED)"
    [ -z "$SKIP_HAPROXY" ] || echo "- **skipped: HAProxy row** ($SKIP_HAPROXY)"
    for size in $SIZES; do
        echo
        echo "#### $size-byte requests, $CONNS connections"
        echo
        echo "| path | req/s | MiB/s each way | p50 µs | p99 µs | p99.9 µs | errors |" \
             "proxy CPU µs/req | client CPU µs/req | req/s vs HAProxy | p99 vs HAProxy |" \
             "CPU/req vs HAProxy |"
        echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
        row "direct to echo (no proxy)" direct "$size"
        [ -n "$SKIP_HAPROXY" ] || row "HAProxy, nbthread 1" haproxy "$size"
        if [ -z "$SKIP_SPOKED" ]; then
            row "spoked, 1 worker, 0 plugins" spoked0 "$size"
            row "spoked, 1 worker, 1 passthrough" spoked1 "$size"
            row "spoked, 1 worker, 4 passthrough" spoked4 "$size"
        fi
    done
    echo
    echo "#### spoke-bench hooks"
    echo
    if [ $HOOKS_RC -eq 0 ]; then
        cat "$TMP/hooks.txt"
    else
        echo "failed (exit $HOOKS_RC):"
        echo
        sed 's/^/    /' "$TMP/hooks.txt"
    fi
}

if [ -n "$OUT" ]; then
    report | tee "$OUT"
else
    report
fi
