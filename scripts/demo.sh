#!/usr/bin/env bash
# demo.sh -- build spoke and show it working end to end, on loopback, in well under a minute:
#
#   1. hubd, the control plane, with the control plugin cache-stats-aggregator (ID 42) and
#      token authentication;
#   2. an echo server as the upstream (spoke-bench echo);
#   3. spoked in front of it (a supervisor, two workers and the uplink) with the example
#      plugins deny (refuses connections starting with "DROP "), counter (bytes and
#      connections, logged every second) and cache-stats (ID 42: counts hits and misses of a
#      toy cache keyed by the request line, and reports them to the hub every second);
#   4. traffic through it: request lines from 12 clients, a load run, a denied connection;
#   5. `spoked status` (the uplink's deliveries) and a hot reload under load;
#   6. a clean stop of spoked (its workers report their last counts, the uplink delivers
#      them), then the hub's totals beside what the edge counted, and `hubd status`.
#
# Everything runs in a temporary directory and stops on exit. Usage: scripts/demo.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/deps.sh

BUILD=$ROOT/build
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target spoked hubd spoke-bench spoke-plugin counter deny \
    pg-query-log cache-stats cache-stats-aggregator >/dev/null

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
HUB_PORT=$(free_port)
mkdir -p "$DIR/plugins" "$DIR/hub-plugins"
cp "$BUILD"/plugins/{counter,deny,pg-query-log,cache-stats}.so "$DIR/plugins/"
cp "$BUILD"/plugins/cache-stats-aggregator.so "$DIR/hub-plugins/"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_log() { for _ in $(seq 150); do grep -q "$2" "$1" && return 0; sleep 0.1; done; cat "$1"; return 1; }

# The edge's token; the hub keeps only its SHA-256.
TOKEN=demo-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
printf '%s\n' "$TOKEN" >"$DIR/edge.token"
printf 'demo-edge %s\n' "$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)" >"$DIR/hub.tokens"
chmod 600 "$DIR/edge.token" "$DIR/hub.tokens"

cat >"$DIR/hub.yaml" <<EOF
hub: { listen: 127.0.0.1:$HUB_PORT, workers: 2, store: $DIR/hub-store, map_size: 256MiB }
auth: { token_file: $DIR/hub.tokens }
run_dir: $DIR/hub-run
user: $(id -un)
plugins:
  dir: $DIR/hub-plugins
  list:
    - { id: 42, name: cache-stats-aggregator, file: cache-stats-aggregator.so }
EOF

write_config() { # $1: extra plugin entries
    cat >"$DIR/spoke.yaml" <<EOF
edge: { id: demo-edge, namespace: demo }
listen: { address: 127.0.0.1:$EDGE_PORT, upstream: 127.0.0.1:$ECHO_PORT, workers: 2 }
run_dir: $DIR/run
user: $(id -un)
queue: { path: $DIR/queue }
kv: { path: $DIR/kv }
uplink: { url: http://127.0.0.1:$HUB_PORT, heartbeat: 500ms, token_file: $DIR/edge.token }
plugins:
  dir: $DIR/plugins
  list:
    - { name: demo-deny, file: deny.so, config: { prefix: "DROP ", message: "denied by demo-deny\n" } }
    - { name: demo-counter, file: counter.so, config: { interval: 1s } }
    - { id: 42, name: cache-stats, file: cache-stats.so, config: { report_interval: 1s } }
$1
EOF
}

say "hubd on 127.0.0.1:$HUB_PORT with cache-stats-aggregator (ID 42)"
"$BUILD/hubd" --check-config "$DIR/hub.yaml" | tail -1
"$BUILD/hubd" -c "$DIR/hub.yaml" 2>"$DIR/hubd.log" &
HUBD=$!
PIDS+=($HUBD)
wait_log "$DIR/hubd.log" "generation 1 serving"

say "upstream: echo server on 127.0.0.1:$ECHO_PORT"
"$BUILD/spoke-bench" echo --listen "127.0.0.1:$ECHO_PORT" &
PIDS+=($!)

write_config ""
say "spoked on 127.0.0.1:$EDGE_PORT with deny, counter and cache-stats; uplink to the hub"
"$BUILD/spoked" --check-config "$DIR/spoke.yaml" | tail -1
"$BUILD/spoked" -c "$DIR/spoke.yaml" 2>"$DIR/spoked.log" &
SPOKED=$!
PIDS+=($SPOKED)
wait_log "$DIR/spoked.log" "generation 1 serving"

say "plugin files, as the host sees them"
"$BUILD/spoke-plugin" inspect "$DIR/plugins/cache-stats.so"

say "traffic: 12 clients send 25 request lines each (30 distinct lines: the toy cache hits on repeats)"
/usr/bin/python3 - "$EDGE_PORT" <<'EOF'
import socket, sys, threading
port = int(sys.argv[1])
def client(k):
    for i in range(25):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"GET /item/{(k * 7 + i) % 30} HTTP/1.1\r\n\r\n".encode())
        s.recv(100)
        s.close()
ts = [threading.Thread(target=client, args=(k,)) for k in range(12)]
[t.start() for t in ts]
[t.join() for t in ts]
print("300 requests answered")
EOF

say "3 s of load: 16 connections of 512-byte round trips"
"$BUILD/spoke-bench" proxy --target "127.0.0.1:$EDGE_PORT" --conns 16 --size 512 \
    --duration 3s --warmup 0s

say "a connection starting with 'DROP ' is refused by deny"
/usr/bin/python3 - "$EDGE_PORT" <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"DROP TABLE users;")
print("client got back:", s.recv(100))
EOF

say "spoked status (the uplink's deliveries at the end)"
sleep 1
"$BUILD/spoked" status -c "$DIR/spoke.yaml"

say "hot reload under load: add pg-query-log, SIGHUP"
"$BUILD/spoke-bench" proxy --target "127.0.0.1:$EDGE_PORT" --conns 16 --size 512 \
    --duration 3s --warmup 0s >"$DIR/load.txt" &
LOAD=$!
sleep 1
write_config "    - { name: demo-pg-log, file: pg-query-log.so }"
"$BUILD/spoked" reload -c "$DIR/spoke.yaml"
wait $LOAD
grep -E "errors|requests" "$DIR/load.txt" || cat "$DIR/load.txt"
wait_log "$DIR/spoked.log" "generation 2 serving"

say "stop spoked (SIGTERM: drain, fini reports the last counts, the uplink delivers them)"
kill -TERM $SPOKED
wait $SPOKED || true

say "what the edge counted, and what the hub has"
/usr/bin/python3 - "$DIR/spoked.log" <<'EOF'
import re, sys
log = open(sys.argv[1]).read()
pairs = re.findall(r"cache-stats: hits=(\d+) misses=(\d+)", log)
print(f"edge: {len(pairs)} worker lifetimes counted hits={sum(int(h) for h, _ in pairs)} "
      f"misses={sum(int(m) for _, m in pairs)}")
EOF
printf 'hub:  '
"$BUILD/hubd" kv get 42 totals -c "$DIR/hub.yaml"

say "hubd status"
"$BUILD/hubd" status -c "$DIR/hub.yaml"

kill -TERM $HUBD
wait $HUBD || true

say "what was logged (plugins, generations, the uplink)"
grep -hE "plugin demo-|generation|denied|quarantin|reload|uplink" "$DIR/spoked.log" "$DIR/hubd.log" | tail -25
