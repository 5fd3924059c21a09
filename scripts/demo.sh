#!/usr/bin/env bash
# demo.sh -- build spoke and show it working, on loopback, in about half a minute:
#
#   1. an echo server as the upstream (spoke-bench echo);
#   2. spoked in front of it (a supervisor and two workers) with the example plugins:
#      counter (bytes and connections, logged every second) and deny (refuses
#      connections starting with "DROP ");
#   3. traffic through it: a load run of spoke-bench, one denied connection;
#   4. `spoked status`, then a hot reload (SIGHUP) that adds pg-query-log, under load,
#      and the status again; then a clean stop (SIGTERM).
#
# Everything runs in a temporary directory and stops on exit. Usage: scripts/demo.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/deps.sh

BUILD=$ROOT/build
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target spoked spoke-bench spoke-plugin passthrough counter \
    deny pg-query-log >/dev/null

DIR=$(mktemp -d /tmp/spoke-demo.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ECHO_PORT=$(free_port)
EDGE_PORT=$(free_port)
mkdir -p "$DIR/plugins"
cp "$BUILD"/plugins/{counter,deny,pg-query-log}.so "$DIR/plugins/"

write_config() { # $1: extra plugin entries
    cat >"$DIR/spoke.yaml" <<EOF
edge: { id: demo-edge, namespace: demo }
listen: { address: 127.0.0.1:$EDGE_PORT, upstream: 127.0.0.1:$ECHO_PORT, workers: 2 }
run_dir: $DIR/run
queue: { path: $DIR/queue }
plugins:
  dir: $DIR/plugins
  list:
    - { name: demo-deny, file: deny.so, config: { prefix: "DROP ", message: "denied by demo-deny\n" } }
    - { name: demo-counter, file: counter.so, config: { interval: 1s } }
$1
EOF
}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "upstream: echo server on 127.0.0.1:$ECHO_PORT"
"$BUILD/spoke-bench" echo --listen "127.0.0.1:$ECHO_PORT" &
PIDS+=($!)

write_config ""
say "spoked on 127.0.0.1:$EDGE_PORT with plugins deny and counter"
"$BUILD/spoked" --check-config "$DIR/spoke.yaml" | tail -1
"$BUILD/spoked" -c "$DIR/spoke.yaml" 2>"$DIR/spoked.log" &
SPOKED=$!
PIDS+=($SPOKED)
for _ in $(seq 100); do grep -q "generation 1 serving" "$DIR/spoked.log" && break; sleep 0.1; done

say "plugin files, as the host sees them"
"$BUILD/spoke-plugin" inspect "$DIR/plugins/deny.so"

say "3 s of traffic: 16 connections of 512-byte round trips"
"$BUILD/spoke-bench" proxy --target "127.0.0.1:$EDGE_PORT" --conns 16 --size 512 \
    --duration 3s --warmup 0s

say "a connection starting with 'DROP ' is refused by deny"
/usr/bin/python3 - "$EDGE_PORT" <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"DROP TABLE users;")
print("client got back:", s.recv(100))
EOF

say "spoked status"
"$BUILD/spoked" status -c "$DIR/spoke.yaml"

say "hot reload under load: add pg-query-log, SIGHUP"
"$BUILD/spoke-bench" proxy --target "127.0.0.1:$EDGE_PORT" --conns 16 --size 512 \
    --duration 4s --warmup 0s >"$DIR/load.txt" &
LOAD=$!
sleep 1
write_config "    - { name: demo-pg-log, file: pg-query-log.so }"
"$BUILD/spoked" reload -c "$DIR/spoke.yaml"
wait $LOAD
grep -E "errors|requests" "$DIR/load.txt" || cat "$DIR/load.txt"
"$BUILD/spoked" status -c "$DIR/spoke.yaml"

say "stop (SIGTERM: drain, then exit)"
kill -TERM $SPOKED
wait $SPOKED || true

say "what spoked logged (plugin lines and supervisor lines)"
grep -E "plugin demo-|generation|denied|quarantin|reload" "$DIR/spoked.log" | tail -25
