#!/usr/bin/python3
"""Capture real PostgreSQL client streams as fuzz/corpus/pg_query_log entries.

Starts a throwaway cluster (tests/integration/test_pg.py's PgServer), puts a recording
relay in front of it, and drives it with real clients (psql, pgbench in simple, extended
and prepared modes). Each session's client bytes are written in fuzz_pg_query_log.c's
input form, in the chunks the client sent them: [len][bytes] per client chunk (pieces of
at most 126 bytes), and [0x80][byte] for the server's one-byte answer to an SSLRequest.

    /usr/bin/python3 fuzz/capture_pg_corpus.py fuzz/corpus/pg_query_log
"""
import os
import socket
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import test_pg  # noqa: E402
from spoketest import free_port  # noqa: E402


def relay(listener, upstream_port, sessions):
    while True:
        try:
            c, _ = listener.accept()
        except OSError:
            return
        s = socket.create_connection(("127.0.0.1", upstream_port))
        rec = bytearray()
        sessions.append(rec)
        lock = threading.Lock()

        def pump(src, dst, client_side):
            while True:
                try:
                    d = src.recv(65536)
                except OSError:
                    d = b""
                if not d:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                with lock:
                    if client_side:
                        for i in range(0, len(d), 126):
                            piece = d[i:i + 126]
                            rec.append(len(piece))
                            rec.extend(piece)
                    elif len(d) == 1:
                        rec.extend(b"\x80" + d)
                dst.sendall(d)

        threading.Thread(target=pump, args=(c, s, True), daemon=True).start()
        threading.Thread(target=pump, args=(s, c, False), daemon=True).start()


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    bindir = test_pg.find_pg_bindir()
    test_pg.PSQL = test_pg.client(bindir, "psql")
    tmp = tempfile.mkdtemp(prefix="spoke-pgcap-")
    pg = test_pg.PgServer(bindir, tmp)
    port = free_port()
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", port))
    lst.listen(16)
    sessions = []
    threading.Thread(target=relay, args=(lst, pg.port, sessions), daemon=True).start()
    base = [test_pg.PSQL, "-X", "-h", "127.0.0.1", "-p", str(port), "-U", test_pg.PG_USER,
            "-d", "postgres"]
    script = os.path.join(tmp, "bench.sql")
    with open(script, "w") as f:
        f.write("\\set id random(1, 1000)\nSELECT $$it's\n\ta tab$$ || :id AS v, 'ünï' AS u;\n")
    runs = [
        ("psql-simple", base + ["-c", "SELECT 42 AS answer"], {}),
        ("psql-nossl", base + ["-c", "SELECT 1; SELECT 'a\\b'"], {"PGSSLMODE": "disable"}),
        ("psql-gdesc", base, {"stdin": "SELECT $1::int AS n \\gdesc\nSELECT now();\n"}),
        ("psql-multi", base + ["-c", "CREATE TEMP TABLE t(x int); INSERT INTO t VALUES (1);"
                                     " SELECT * FROM t"], {}),
    ]
    pgbench = test_pg.client(bindir, "pgbench")
    pb = [pgbench, "-n", "-h", "127.0.0.1", "-p", str(port), "-U", test_pg.PG_USER, "-t", "3",
          "-f", script, "postgres"]
    for mode in ("simple", "extended", "prepared"):
        runs.append(("pgbench-" + mode, pb + ["-M", mode], {}))
    for name, cmd, opts in runs:
        before = len(sessions)
        env = test_pg.client_env(**{k: v for k, v in opts.items() if k != "stdin"})
        p = subprocess.run(cmd, input=opts.get("stdin"), capture_output=True, text=True,
                           timeout=60, env=env)
        if p.returncode != 0:
            raise SystemExit(f"{name} failed: {p.stderr}")
        for i, rec in enumerate(sessions[before:]):
            with open(os.path.join(out, f"real-{name}-{i}"), "wb") as f:
                f.write(bytes(rec))
    lst.close()
    pg.stop()


if __name__ == "__main__":
    main()
