"""pg-cache between real PostgreSQL clients and a real PostgreSQL server, with the real
hubd and cache-stats-aggregator behind it.

The test starts its own server (pgserver.py: a throwaway cluster with pg_stat_statements)
and spoked with two workers and pg-cache in front of it. A small protocol client (below)
sends simple queries and keeps every byte it gets back, so answers can be compared byte
for byte with the server's own; pg_stat_statements says how often the server really ran
a query. Checked: a repeated SELECT runs once on the server and every answer is the
server's bytes; an UPDATE through the other worker (a worker is chosen by stopping the
other one with SIGSTOP while the connection is accepted, and checked in /proc) makes the
next SELECT see the new value; nothing in a transaction is served or stored; volatile
queries are never cached; psql and pgbench get identical answers with and without the
cache. End to end: the hub's totals equal the edge's hits and misses, and what the
server ran, after a worker and hubd were each kill -9ed during the run.

In CI (root on Debian 12 after scripts/deps.sh) PostgreSQL is there and the test runs;
elsewhere it exits 77 (skipped) naming what is missing, unless SPOKE_REQUIRE_PG=1.
"""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import shutil
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import PLUGIN_DIR, Hubd, Spoked, spoke_bin  # noqa: E402
from pgserver import (PG_USER, SKIP, PgServer, client, client_env,  # noqa: E402
                      find_pg_bindir, missing_pg)

CACHE_ID = 42
BINDIR = None


class PgClient:
    """One session over the v3 protocol: startup (trust auth), simple queries. query()
    returns the raw bytes of the answer, through ReadyForQuery."""

    def __init__(self, port, db="postgres", app="spoke-pg-cache-test"):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20)
        params = (b"user\0" + PG_USER.encode() + b"\0database\0" + db.encode() +
                  b"\0application_name\0" + app.encode() + b"\0\0")
        body = struct.pack("!I", 196608) + params
        self.s.sendall(struct.pack("!I", len(body) + 4) + body)
        self.buf = b""
        raw = self.until_ready()
        if b"E" in [m[0:1] for m in split(raw)]:
            raise AssertionError("startup failed: %r" % raw)

    def recv(self, n):
        while len(self.buf) < n:
            d = self.s.recv(65536)
            if not d:
                raise ConnectionError("connection closed")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def until_ready(self):
        raw = b""
        while True:
            hdr = self.recv(5)
            body = self.recv(struct.unpack("!I", hdr[1:5])[0] - 4)
            raw += hdr + body
            if hdr[0:1] == b"Z":
                return raw

    def query(self, sql):
        q = sql.encode() + b"\0"
        self.s.sendall(b"Q" + struct.pack("!I", len(q) + 4) + q)
        return self.until_ready()

    def rows(self, sql):
        return rows(self.query(sql))

    def close(self):
        try:
            self.s.sendall(b"X\0\0\0\4")
        except OSError:
            pass
        self.s.close()


def split(raw):
    out, i = [], 0
    while i < len(raw):
        n = struct.unpack("!I", raw[i + 1:i + 5])[0]
        out.append(raw[i:i + 1 + n])
        i += 1 + n
    return out


def rows(raw):
    """The DataRows of an answer as tuples of text; raises on an ErrorResponse."""
    out = []
    for m in split(raw):
        if m[0:1] == b"E":
            raise AssertionError("server error: %r" % m)
        if m[0:1] == b"D":
            n = struct.unpack("!H", m[5:7])[0]
            i, row = 7, []
            for _ in range(n):
                ln = struct.unpack("!i", m[i:i + 4])[0]
                i += 4
                row.append(None if ln < 0 else m[i:i + ln].decode())
                i += max(ln, 0)
            out.append(tuple(row))
    return out


def conn_worker(sp, sock):
    """The pid of the spoked worker holding the other end of client socket `sock`."""
    cport = sock.getsockname()[1]
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            lport = int(parts[1].split(":")[1], 16)
            rport = int(parts[2].split(":")[1], 16)
            if lport == sp.port and rport == cport:
                inode = parts[9]
    if inode is None:
        return None
    for pid in sp.worker_pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
                except OSError:
                    pass
        except OSError:
            pass
    return None


def serving_workers(sp):
    """The two workers' pids (the uplink is a child of the supervisor too)."""
    out = []
    for p in sp.worker_pids():
        with open(f"/proc/{p}/cmdline") as f:
            if "--worker" in f.read():
                out.append(p)
    return out


def client_on(sp, worker):
    """A session accepted by `worker`: every other worker is stopped (SIGSTOP) while it is
    accepted and started, so only that one can take it."""
    others = [p for p in serving_workers(sp) if p != worker]
    for p in others:
        os.kill(p, signal.SIGSTOP)
    try:
        c = PgClient(sp.port)
    finally:
        for p in others:
            os.kill(p, signal.SIGCONT)
    assert conn_worker(sp, c.s) == worker
    return c


def cache_plugin(**config):
    cfg = {"ttl": "60s", "report_interval": "200ms", "max_bytes": "8MiB"}
    cfg.update(config)
    return {"name": "pg-cache", "id": CACHE_ID, "file": os.path.join(PLUGIN_DIR, "pg-cache.so"),
            "config": cfg}


def spoked_extra(**more):
    extra = {"listen": {"workers": 2},
             "plugins": {"hook_timeout": "1s"},  # the SIGSTOPs stay far from the watchdog
             "kv": {"map_size": "64MiB", "sync": "100ms"}}
    extra.update(more)
    return extra


class PgCacheCase(unittest.TestCase):
    pg = None
    tmp = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="spoke-pgcache-")
        cls.pg = PgServer(BINDIR, cls.tmp, settings={
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track": "top"})
        cls.psql_ok("CREATE EXTENSION pg_stat_statements")

    @classmethod
    def tearDownClass(cls):
        if cls.pg is not None:
            cls.pg.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def psql_ok(cls, sql):
        r = cls.pg.sql(sql)
        if r.returncode != 0:
            raise AssertionError(sql + ": " + r.stderr)
        return r.stdout

    def calls(self, normalized):
        """How often the server ran a statement (pg_stat_statements' normalized text)."""
        out = self.psql_ok("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                           "WHERE query = " + "'" + normalized.replace("'", "''") + "'")
        return int(out.strip())

    def setUp(self):
        self.dir = tempfile.mkdtemp(dir=self.tmp)
        self.sp = None
        self.clients = []

    def tearDown(self):
        for c in self.clients:
            c.close()
        if self.sp is not None:
            self.sp.__exit__(None, None, None)

    def start_spoked(self, plugins=None, **extra):
        self.sp = Spoked(self.dir, f"127.0.0.1:{self.pg.port}",
                         plugins=plugins or [cache_plugin()], extra=spoked_extra(**extra))
        return self.sp

    def client(self, port=None):
        c = PgClient(port or self.sp.port)
        self.clients.append(c)
        return c


class CacheTest(PgCacheCase):
    def test_repeated_select_is_answered_from_the_cache(self):
        self.psql_ok("CREATE TABLE t_repeat (id int PRIMARY KEY, val text); "
                     "INSERT INTO t_repeat SELECT g, 'v' || g FROM generate_series(1, 50) g")
        sp = self.start_spoked()
        q = "SELECT id, val FROM t_repeat WHERE id <= 20 ORDER BY id"
        direct = PgClient(self.pg.port)
        want = direct.query(q)
        direct.close()
        self.psql_ok("SELECT pg_stat_statements_reset()")
        answers = []
        for _ in range(3):  # new sessions, on whichever worker
            c = self.client()
            answers += [c.query(q), c.query(q)]
        self.assertEqual(len(rows(want)), 20)
        for a in answers:
            self.assertEqual(a, want)  # the server's bytes, every time
        norm = "SELECT id, val FROM t_repeat WHERE id <= $1 ORDER BY id"
        self.assertEqual(self.calls(norm), 1)
        # another application, the same user, database and settings: the same entry
        other = PgClient(sp.port, app="another-app")
        self.clients.append(other)
        self.assertEqual(other.query(q), want)
        self.assertEqual(self.calls(norm), 1)
        # another database, the same query text: its own answer
        self.psql_ok("CREATE DATABASE other_db")
        setup = PgClient(self.pg.port, db="other_db")
        rows(setup.query("CREATE TABLE t_repeat (id int PRIMARY KEY, val text); "
                         "INSERT INTO t_repeat VALUES (1, 'elsewhere')"))
        setup.close()
        elsewhere = PgClient(sp.port, db="other_db")
        self.clients.append(elsewhere)
        self.assertEqual(elsewhere.rows(q), [("1", "elsewhere")])
        self.assertEqual(elsewhere.rows(q), [("1", "elsewhere")])

    def test_update_through_the_other_worker_invalidates(self):
        self.psql_ok("CREATE TABLE t_upd (id int PRIMARY KEY, val text); "
                     "INSERT INTO t_upd VALUES (1, 'old'), (2, 'other')")
        sp = self.start_spoked()
        w1, w2 = serving_workers(sp)
        a = client_on(sp, w1)
        b = client_on(sp, w2)
        self.clients += [a, b]
        q = "SELECT val FROM t_upd WHERE id = 1"
        self.psql_ok("SELECT pg_stat_statements_reset()")
        self.assertEqual(a.rows(q), [("old",)])
        self.assertEqual(a.rows(q), [("old",)])
        self.assertEqual(b.rows(q), [("old",)])  # the other worker reads the shared entry
        self.assertEqual(self.calls("SELECT val FROM t_upd WHERE id = $1"), 1)
        self.assertEqual(rows(b.query("UPDATE t_upd SET val = 'new' WHERE id = 1")), [])
        self.assertEqual(a.rows(q), [("new",)])
        self.assertEqual(a.rows(q), [("new",)])
        self.assertEqual(self.calls("SELECT val FROM t_upd WHERE id = $1"), 2)
        # inside a multi-statement query, and a write to another table leaves it cached
        self.psql_ok("CREATE TABLE t_other (x int)")
        b.query("INSERT INTO t_other VALUES (1)")
        self.assertEqual(a.rows(q), [("new",)])
        self.assertEqual(self.calls("SELECT val FROM t_upd WHERE id = $1"), 2)
        b.query("SELECT 1; DELETE FROM t_upd WHERE id = 1; SELECT 2")
        self.assertEqual(a.rows(q), [])
        self.assertEqual(self.calls("SELECT val FROM t_upd WHERE id = $1"), 3)
        # a write in the extended protocol (prepared, executed several times) invalidates too
        q2 = "SELECT val FROM t_upd WHERE id = 2"
        self.assertEqual(a.rows(q2), [("other",)])
        self.assertEqual(a.rows(q2), [("other",)])
        script = os.path.join(self.dir, "upd.sql")
        with open(script, "w") as f:
            f.write("UPDATE t_upd SET val = val || '+' WHERE id = 2;\n")
        p = subprocess.run([client(BINDIR, "pgbench"), "-n", "-M", "prepared", "-t", "3", "-f",
                            script, "-h", "127.0.0.1", "-p", str(sp.port), "-U", PG_USER,
                            "postgres"], capture_output=True, text=True, timeout=60,
                           env=client_env())
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(a.rows(q2), [("other+++",)])

    def test_transaction_bypasses_the_cache(self):
        self.psql_ok("CREATE TABLE t_tx (id int PRIMARY KEY, val text); "
                     "INSERT INTO t_tx VALUES (1, 'a')")
        self.start_spoked()
        c = self.client()
        q = "SELECT val FROM t_tx WHERE id = 1"
        norm = "SELECT val FROM t_tx WHERE id = $1"
        self.psql_ok("SELECT pg_stat_statements_reset()")
        c.query(q)
        c.query(q)
        self.assertEqual(self.calls(norm), 1)  # cached
        c.query("BEGIN")
        self.assertEqual(c.rows(q), [("a",)])
        c.query("UPDATE t_tx SET val = 'b' WHERE id = 1")
        self.assertEqual(c.rows(q), [("b",)])  # its own write: not the cached 'a'
        self.assertEqual(c.rows(q), [("b",)])
        self.assertEqual(self.calls(norm), 4)  # all three ran on the server
        other = self.client()
        self.assertEqual(other.rows(q), [("a",)])  # not committed: the cached answer holds
        c.query("COMMIT")
        self.assertEqual(other.rows(q), [("b",)])  # committed: invalidated
        self.assertEqual(self.calls(norm), 5)
        # nothing read inside a transaction is stored
        c.query("BEGIN")
        c.query("SELECT id, val FROM t_tx WHERE id = 1")
        c.query("ROLLBACK")
        c.query("SELECT id, val FROM t_tx WHERE id = 1")
        self.assertEqual(self.calls("SELECT id, val FROM t_tx WHERE id = $1"), 2)

    def test_volatile_queries_are_never_cached(self):
        self.psql_ok("CREATE TABLE t_vol (id int); CREATE SEQUENCE s_vol")
        self.start_spoked()
        c = self.client()
        self.psql_ok("SELECT pg_stat_statements_reset()")
        queries = {
            "SELECT now() AS t_now_vol": "SELECT now() AS t_now_vol",
            "SELECT random() AS r_vol": "SELECT random() AS r_vol",
            "SELECT nextval('s_vol')": "SELECT nextval($1)",
            "SELECT clock_timestamp() AS ct_vol": "SELECT clock_timestamp() AS ct_vol",
            "SELECT id, CURRENT_TIMESTAMP AS cts_vol FROM t_vol": "SELECT id, CURRENT_TIMESTAMP AS cts_vol FROM t_vol",
        }
        for _ in range(3):
            for q in queries:
                c.query(q)
        for norm in queries.values():
            self.assertEqual(self.calls(norm), 3, norm)
        seqs = [c.rows("SELECT nextval('s_vol')")[0][0] for _ in range(3)]
        self.assertEqual(len(set(seqs)), 3)

    def test_max_bytes_evicts_the_least_recently_used(self):
        sp = self.start_spoked(plugins=[cache_plugin(max_bytes="64KiB")])
        c = self.client()
        q = "SELECT repeat('x', 2000) AS big, {} AS n"  # ~2.3 KB an entry: 27 fit
        norm = "SELECT repeat($1, $2) AS big, $3 AS n"
        self.psql_ok("SELECT pg_stat_statements_reset()")
        for i in range(10):
            c.query(q.format(i))
        time.sleep(1.1)  # a use refreshes an entry's LRU record at most once a second
        c.query(q.format(0))  # a hit: 0 is now used more recently than 1..9
        for i in range(10, 100):
            c.query(q.format(i))
            if i == 30:
                self.assertEqual(self.calls(norm), 31)
                c.query(q.format(0))  # still there: 1.. went first
                self.assertEqual(self.calls(norm), 31)
                c.query(q.format(1))  # evicted
                self.assertEqual(self.calls(norm), 32)
        self.assertEqual(self.calls(norm), 101)
        c.query(q.format(99))  # the newest is there
        self.assertEqual(self.calls(norm), 101)
        c.query(q.format(50))  # an old one was evicted
        self.assertEqual(self.calls(norm), 102)
        c.close()
        self.clients.remove(c)
        self.assertEqual(self.sp.stop(), 0)
        self.sp = None
        m = re.findall(r"edge totals: hits=(\d+) misses=(\d+) invalidations=\d+ "
                       r"entries=(\d+) bytes=(\d+)", sp.log())
        hits, misses, entries, size = map(int, m[-1])
        self.assertEqual((hits, misses), (3, 102))
        self.assertLessEqual(size, 64 * 1024)
        self.assertGreater(entries, 5)
        self.assertLess(entries, 30)

    def test_psql_and_pgbench_see_the_same_answers(self):
        self.psql_ok("CREATE TABLE t_cli (id int PRIMARY KEY, n int, val text); "
                     "INSERT INTO t_cli SELECT g, g * 3, repeat('x', g % 17) || ' é ' "
                     "FROM generate_series(1, 300) g; "
                     "CREATE TABLE t_cli_w (id int PRIMARY KEY, n int); "
                     "INSERT INTO t_cli_w VALUES (2, 7)")
        self.start_spoked()
        script = ("SELECT * FROM t_cli WHERE id < 40 ORDER BY id;\n"
                  "SELECT count(*), sum(n) FROM t_cli;\n"
                  "SELECT val, NULL AS nothing FROM t_cli WHERE id IN (3, 5, 7) ORDER BY id;\n"
                  "SELECT 1 / 0;\n"
                  "SELECT id FROM t_cli WHERE false;\n"
                  "UPDATE t_cli_w SET n = n WHERE id = 2;\n"
                  "SELECT n FROM t_cli_w WHERE id = 2;\n")

        def psql(port):
            p = subprocess.run([client(BINDIR, "psql"), "-X", "-h", "127.0.0.1", "-p",
                                str(port), "-U", PG_USER, "-d", "postgres", "-f", "-"],
                               input=script, capture_output=True, text=True, timeout=60,
                               env=client_env())
            return p.stdout + p.stderr

        self.psql_ok("SELECT pg_stat_statements_reset()")
        direct = psql(self.pg.port)
        cold = psql(self.sp.port)
        warm = psql(self.sp.port)
        self.assertIn("division by zero", direct)
        self.assertIn("UPDATE 1", direct)
        self.assertEqual(cold, direct)
        self.assertEqual(warm, direct)
        self.assertEqual(self.calls("SELECT count(*), sum(n) FROM t_cli"), 2)  # direct, cold
        # pgbench: the answers checked by the script itself (\gset, \if, an error if wrong)
        bench = os.path.join(self.dir, "check.sql")
        with open(bench, "w") as f:
            f.write("SELECT count(*) AS c, sum(id) AS s FROM t_cli WHERE id <= 100\n\\gset\n"
                    "\\if :c != 100 or :s != 5050\nSELECT 1 / 0;\n\\endif\n")
        self.psql_ok("SELECT pg_stat_statements_reset()")
        for port in (self.pg.port, self.sp.port):
            p = subprocess.run([client(BINDIR, "pgbench"), "-n", "-M", "simple", "-c", "4",
                                "-t", "50", "-f", bench, "-h", "127.0.0.1", "-p", str(port),
                                "-U", PG_USER, "postgres"],
                               capture_output=True, text=True, timeout=120, env=client_env())
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertIn("number of transactions actually processed: 200/200", p.stdout)
            self.assertIn("number of failed transactions: 0", p.stdout)
        ran = self.calls("SELECT count(*) AS c, sum(id) AS s FROM t_cli WHERE id <= $1")
        self.assertGreaterEqual(ran, 201)  # direct: 200, through the cache: at least one
        self.assertLessEqual(ran, 200 + 4)  # at most one miss per pgbench client


class EndToEndTest(PgCacheCase):
    """Hub totals = the edge's counts = what the server ran, through a kill -9 of a worker
    and of hubd."""

    def start_hub(self, port=None):
        agg = {"name": "cache-stats-aggregator", "id": CACHE_ID,
               "file": os.path.join(PLUGIN_DIR, "cache-stats-aggregator.so")}
        return Hubd(self.dir, plugins=[agg], workers=2, port=port)

    def test_hub_totals_match_through_kills(self):
        self.psql_ok("CREATE TABLE t_e2e (id int PRIMARY KEY, val text); "
                     "INSERT INTO t_e2e SELECT g, 'e' || g FROM generate_series(1, 10) g")
        hub = self.start_hub()
        try:
            self.run_with_hub(hub)
        finally:
            self.hub.stop()

    def run_with_hub(self, hub):
        self.hub = hub
        sp = self.start_spoked(uplink={"url": hub.url, "heartbeat": "100ms", "timeout": "2s"})
        self.psql_ok("SELECT pg_stat_statements_reset()")
        sent = 0

        def traffic(rounds):
            nonlocal sent
            c = PgClient(sp.port)
            for r in range(rounds):
                for i in range(1, 6):
                    self.assertEqual(c.rows(f"SELECT val FROM t_e2e WHERE id = {i}"),
                                     [(f"e{i}",)])
                    sent += 1
            if rounds > 1:
                c.query("UPDATE t_e2e SET val = val WHERE id = 3")
            c.close()

        traffic(3)
        worker = serving_workers(sp)[0]
        os.kill(worker, signal.SIGKILL)
        deadline = time.time() + 15
        while time.time() < deadline:
            now = serving_workers(sp)
            if len(now) == 2 and worker not in now:
                break
            time.sleep(0.05)
        self.assertNotIn(worker, serving_workers(sp))
        traffic(3)
        port = self.hub.port
        os.kill(self.hub.proc.pid, signal.SIGKILL)
        self.hub.proc.wait()
        self.hub._log.close()
        traffic(2)
        time.sleep(0.5)  # workers of the killed hub let go of the port
        self.hub = self.start_hub(port=port)
        traffic(2)
        self.assertRegex(sp.status(), r"failed \(retried\) [1-9]")  # the hub was away
        self.assertEqual(sp.stop(), 0)  # fini: the last reports, delivered before the uplink exits
        self.sp = None
        for log in (sp.log(), self.hub.log()):
            self.assertNotIn("runtime error:", log)
            self.assertNotIn("AddressSanitizer", log)
        misses = self.calls("SELECT val FROM t_e2e WHERE id = $1")
        edge = [tuple(map(int, m)) for m in
                re.findall(r"edge totals: hits=(\d+) misses=(\d+)", sp.log())]
        self.assertTrue(edge, sp.log())
        hits_e, misses_e = edge[-1]
        self.assertEqual(hits_e + misses_e, sent)
        self.assertEqual(misses_e, misses)  # every miss, and only a miss, ran on the server
        self.assertGreater(hits_e, 0)
        totals = None
        deadline = time.time() + 30
        while time.time() < deadline:
            p = subprocess.run([spoke_bin("hubd"), "kv", "get", str(CACHE_ID), "totals", "-c",
                                self.hub.config_path], capture_output=True, text=True, timeout=30)
            if p.returncode == 0:
                totals = json.loads(p.stdout.split("\t", 1)[1])
                if totals["hits"] == hits_e and totals["misses"] == misses_e:
                    break
            time.sleep(0.2)
        self.assertIsNotNone(totals)
        self.assertEqual((totals["edges"], totals["hits"], totals["misses"]),
                         (1, hits_e, misses_e), totals)
        self.assertAlmostEqual(totals["hit_rate"], hits_e / sent, places=3)


def main():
    why = missing_pg()
    if why is not None:
        if os.environ.get("SPOKE_REQUIRE_PG") == "1":
            print("FAIL: " + why)
            return 1
        print("SKIP: " + why)
        return SKIP
    global BINDIR
    BINDIR = find_pg_bindir()
    result = unittest.main(verbosity=2, exit=False).result
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
