#!/usr/bin/env bash
# demo.sh -- build spoke and show the reference example end to end, on loopback, in well
# under a minute:
#
#   1. PostgreSQL: a throwaway cluster (Debian's postgresql; initdb in a temporary
#      directory, run as `nobody` when we are root, since postgres refuses root);
#   2. hubd, the control plane, with the control plugin cache-stats-aggregator (ID 42) and
#      token authentication;
#   3. spoked in front of PostgreSQL (a supervisor, two workers and the uplink) with
#      pg-cache (ID 42): SELECT answers cached in the KV store all workers share,
#      invalidated by writes, hits and misses reported to the hub every second;
#   4. traffic through the edge: a short psql script (a repeated SELECT, an UPDATE that
#      invalidates it, a transaction that bypasses the cache), `pgbench -i` and 5 s of
#      pgbench select-only;
#   5. a hot reload (SIGHUP) that adds pg-query-log, under load;
#   6. a clean stop of spoked (its workers send their last reports, the uplink delivers
#      them), then the hub's totals beside what the edge counted, and `hubd status`.
#
# Everything runs in a temporary directory and stops on exit. Usage: scripts/demo.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/deps.sh

BUILD=$ROOT/build
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target spoked hubd spoke-plugin pg-cache pg-query-log \
    cache-stats-aggregator >/dev/null

PGBIN=/usr/lib/postgresql/15/bin
[ -x "$PGBIN/postgres" ] || PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

DIR=$(mktemp -d /tmp/spoke-demo.XXXXXX)
chmod 755 "$DIR"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port)
EDGE_PORT=$(free_port)
HUB_PORT=$(free_port)
mkdir -p "$DIR/plugins" "$DIR/hub-plugins" "$DIR/pg"
cp "$BUILD"/plugins/{pg-cache,pg-query-log}.so "$DIR/plugins/"
cp "$BUILD"/plugins/cache-stats-aggregator.so "$DIR/hub-plugins/"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_log() { for _ in $(seq 150); do grep -q "$2" "$1" && return 0; sleep 0.1; done; cat "$1"; return 1; }
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u nobody -- "$@"; else "$@"; fi; }
export PGUSER=spoke PGDATABASE=postgres PGHOST=127.0.0.1 PGCONNECT_TIMEOUT=5
unset PGPORT PGPASSWORD PGSERVICE PGOPTIONS
edge_psql() { psql -X -p "$EDGE_PORT" "$@"; }

say "PostgreSQL on 127.0.0.1:$PG_PORT (a throwaway cluster in $DIR/pg)"
[ "$(id -u)" -eq 0 ] && chown nobody "$DIR/pg"
as_pg "$PGBIN/initdb" -D "$DIR/pg/data" -U spoke --auth=trust -E UTF8 --locale=C --no-sync \
    >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log"; exit 1; }
as_pg "$PGBIN/postgres" -D "$DIR/pg/data" -k "$DIR/pg" -h 127.0.0.1 -p "$PG_PORT" \
    -c fsync=off -c shared_preload_libraries=pg_stat_statements >"$DIR/postgres.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 150); do psql -X -p "$PG_PORT" -qc 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.1; done
psql -X -p "$PG_PORT" -qAtc "SELECT version()"

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
listen: { address: 127.0.0.1:$EDGE_PORT, upstream: 127.0.0.1:$PG_PORT, workers: 2 }
run_dir: $DIR/run
user: $(id -un)
queue: { path: $DIR/queue }
kv: { path: $DIR/kv, map_size: 256MiB }
uplink: { url: http://127.0.0.1:$HUB_PORT, heartbeat: 500ms, token_file: $DIR/edge.token }
plugins:
  dir: $DIR/plugins
  list:
    - { id: 42, name: pg-cache, file: pg-cache.so, config: { ttl: 5m, max_bytes: 64MiB, report_interval: 1s } }
$1
EOF
}

say "hubd on 127.0.0.1:$HUB_PORT with cache-stats-aggregator (ID 42)"
"$BUILD/hubd" --check-config "$DIR/hub.yaml" | tail -1
"$BUILD/hubd" -c "$DIR/hub.yaml" 2>"$DIR/hubd.log" &
HUBD=$!
PIDS+=($HUBD)
wait_log "$DIR/hubd.log" "generation 1 serving"

write_config ""
say "spoked on 127.0.0.1:$EDGE_PORT in front of PostgreSQL, with pg-cache (ID 42); uplink to the hub"
"$BUILD/spoked" --check-config "$DIR/spoke.yaml" | tail -1
"$BUILD/spoked" -c "$DIR/spoke.yaml" 2>"$DIR/spoked.log" &
SPOKED=$!
PIDS+=($SPOKED)
wait_log "$DIR/spoked.log" "generation 1 serving"
"$BUILD/spoke-plugin" inspect "$DIR/plugins/pg-cache.so" | grep -E "^(name|version|description|hooks):"

say "psql through the edge: the second SELECT is a hit, the UPDATE invalidates it"
psql -X -p "$PG_PORT" -q <<'EOF'
CREATE EXTENSION pg_stat_statements;
CREATE TABLE fruit (id int PRIMARY KEY, name text, price numeric);
INSERT INTO fruit VALUES (1, 'apple', 0.5), (2, 'pear', 0.7), (3, 'plum', 0.3);
EOF
edge_psql -q <<'EOF'
\echo -- SELECT (a miss: it goes to PostgreSQL and is stored)
SELECT name, price FROM fruit ORDER BY id;
\echo -- the same SELECT (a hit: answered by the edge, PostgreSQL never sees it)
SELECT name, price FROM fruit ORDER BY id;
\echo -- UPDATE fruit: every cached answer that read fruit is invalidated, on every worker
UPDATE fruit SET price = 0.9 WHERE id = 2;
SELECT name, price FROM fruit ORDER BY id;
\echo -- in a transaction nothing is served from or stored in the cache
BEGIN;
SELECT name, price FROM fruit ORDER BY id;
COMMIT;
\echo -- volatile functions are never cached
SELECT now() < now() + interval '1 s' AS volatile_never_cached;
EOF

say "pgbench -i through the edge (DDL and COPY go through untouched), then 5 s of select-only"
pgbench -i -q -s 1 -h 127.0.0.1 -p "$EDGE_PORT" postgres 2>&1 | tail -1
printf '\\set aid random(1, 500)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' \
    >"$DIR/select.sql"
pgbench -n -M simple -c 8 -j 2 -T 5 -f "$DIR/select.sql" -h 127.0.0.1 -p "$EDGE_PORT" postgres \
    2>&1 | grep -E "^(number of transactions actually|latency average|tps)"

say "hot reload under load: add pg-query-log, SIGHUP"
pgbench -n -M simple -c 4 -T 3 -f "$DIR/select.sql" -h 127.0.0.1 -p "$EDGE_PORT" postgres \
    >"$DIR/load.txt" 2>&1 &
LOAD=$!
sleep 1
write_config "    - { name: demo-pg-log, file: pg-query-log.so, config: { max_message: 64KiB } }"
"$BUILD/spoked" reload -c "$DIR/spoke.yaml"
wait $LOAD
grep -E "actually processed|failed" "$DIR/load.txt" || cat "$DIR/load.txt"
wait_log "$DIR/spoked.log" "generation 2 serving"
edge_psql -qAtc "SELECT 'logged by pg-query-log' AS after_reload"
grep -m1 "demo-pg-log: conn .*: query: SELECT 'logged" "$DIR/spoked.log" | sed 's/^.*plugin /  plugin /'

say "spoked status (the uplink's deliveries)"
sleep 1.2
"$BUILD/spoked" status -c "$DIR/spoke.yaml"

say "stop spoked (SIGTERM: drain, fini sends the last reports, the uplink delivers them)"
kill -TERM $SPOKED
wait $SPOKED || true

say "what the edge counted, and what the hub has"
grep "pg-cache: edge totals" "$DIR/spoked.log" | tail -1 | sed 's/^.*edge totals: /edge: /'
printf 'hub:  '
"$BUILD/hubd" kv get 42 totals -c "$DIR/hub.yaml" | cut -f2
printf 'hub, per edge: '
"$BUILD/hubd" kv get 42 edge/demo-edge -c "$DIR/hub.yaml" | cut -f2
printf 'PostgreSQL ran "SELECT name, price FROM fruit ORDER BY id" %s times; psql sent it 4 times\n' \
    "$(psql -X -p "$PG_PORT" -qAtc "SELECT calls FROM pg_stat_statements WHERE query = 'SELECT name, price FROM fruit ORDER BY id'")"

say "hubd status"
"$BUILD/hubd" status -c "$DIR/hub.yaml"

kill -TERM $HUBD
wait $HUBD || true
