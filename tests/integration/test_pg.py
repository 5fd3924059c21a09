"""pg-query-log between real PostgreSQL clients and a real PostgreSQL server.

The test starts its own server (Debian's postgresql: initdb + postgres, trust auth, data
and socket directories in a temporary directory, 127.0.0.1 on a free port; as `nobody`
when run as root, since postgres refuses to run as root), puts spoked with pg-query-log
in front of it, and drives it with real clients: psql (simple queries; `\\gdesc`, which
sends an unnamed Parse), pgbench -M prepared / -M extended (named and unnamed Parse with
parameters). It checks what the clients got back (the plugin must not change traffic)
and what the plugin logged. It also turns TLS on in the server and checks that a TLS
session is recognised and not decoded.

Exits 77 (ctest: skipped) with the reason printed when the server binary is missing.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import Spoked  # noqa: E402

from pgserver import (PG_USER, SKIP, PgServer, client, client_env,  # noqa: E402
                      find_pg_bindir, missing_pg)

PSQL = "psql"  # set by main()


class PgQueryLogTest(unittest.TestCase):
    bindir = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="spoke-pg-")
        cls.pg = None
        cls.sp = None
        try:
            cls.pg = PgServer(cls.bindir, cls.tmp)
            spdir = os.path.join(cls.tmp, "spoked")
            os.mkdir(spdir)
            plugins = [{"file": "pg-query-log.so", "config": {"max_message": "256KiB"}}]
            cls.sp = Spoked(spdir, f"127.0.0.1:{cls.pg.port}", plugins=plugins)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            if cls.sp is not None:
                cls.sp.__exit__(None, None, None)  # raises on a non-zero exit or a sanitizer report
        finally:
            if cls.pg is not None:
                cls.pg.stop()
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def psql(self, *args, stdin=None, **env):
        """psql through spoked."""
        cmd = [PSQL, "-X", "-h", "127.0.0.1", "-p", str(self.sp.port), "-U", PG_USER,
               "-d", "postgres", *args]
        p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30,
                           env=client_env(**env))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        return p.stdout

    def pgbench(self, mode, script):
        path = os.path.join(self.tmp, f"bench-{mode}.sql")
        with open(path, "w") as f:
            f.write(script)
        p = subprocess.run([client(self.bindir, "pgbench"), "-n", "-M", mode, "-t", "2", "-f", path,
                            "-h", "127.0.0.1", "-p", str(self.sp.port), "-U", PG_USER, "postgres"],
                           capture_output=True, text=True, timeout=30, env=client_env())
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("number of transactions actually processed: 2/2", p.stdout)

    def logged(self, pattern):
        return self.sp.wait_log(r"plugin pg-query-log: conn (\d+): " + pattern)

    def test_simple_query(self):
        out = self.psql("-c", "SELECT 42 AS answer")
        self.assertRegex(out, r"answer\s*\n-+\n\s*42\n\(1 row\)")
        q = self.logged(r"query: SELECT 42 AS answer\n")
        conn = q.group(1)
        # The session line comes first for that connection, with the startup's user and db.
        s = self.logged(rf"session user={PG_USER} database=postgres")
        first = re.search(rf"pg-query-log: conn {conn}: (\S+)", self.sp.log())
        self.assertEqual(first.group(1), "session")
        self.assertLess(s.start(), q.start())

    def test_several_statements_and_newlines(self):
        out = self.psql("-A", "-t", "-c", "SELECT 1 AS a,\n  'two' AS b")
        self.assertEqual(out, "1|two\n")
        self.logged(r"query: SELECT 1 AS a,\\n  'two' AS b\n")

    def test_parse_unnamed_from_psql_gdesc(self):
        out = self.psql("-f", "-", stdin="SELECT 7::int AS seven, 'x'::text AS t \\gdesc\n")
        self.assertRegex(out, r"seven\s*\|\s*integer")
        self.assertRegex(out, r"t\s*\|\s*text")
        self.logged(r"parse: name= query: SELECT 7::int AS seven, 'x'::text AS t")

    def test_parse_named_with_parameters(self):
        self.pgbench("prepared", "\\set x 7\nSELECT :x::int AS prepared_seven;\n")
        self.logged(r"parse: name=\S+ query: SELECT \$1::int AS prepared_seven;")

    def test_parse_extended_unnamed(self):
        self.pgbench("extended", "\\set x 7\nSELECT :x::int AS extended_seven;\n")
        self.logged(r"parse: name= query: SELECT \$1::int AS extended_seven;")

    def test_large_query_over_many_chunks(self):
        """A 200 KB query arrives in several reads of spoked and is decoded whole: the log
        line (cut at 3000 bytes) gives its full length, and the stream stays in step."""
        x = "x" * 200000
        out = self.psql("-A", "-t", "-f", "-",
                        stdin=f"SELECT length('{x}') AS big_one;\nSELECT 'next one';\n")
        self.assertEqual(out, "200000\nnext one\n")
        m = self.logged(r"query: (SELECT length\('x+)\.\.\. \((\d+) bytes\)\n")
        self.assertEqual(len(m.group(2)), 3000)
        self.assertIn(int(m.group(3)), (200029, 200030))  # with or without psql's ';'
        self.logged(r"query: SELECT 'next one';?\n")

    def test_query_over_max_message_is_skipped(self):
        x = "y" * 300000
        out = self.psql("-A", "-t", "-f", "-", stdin=f"SELECT length('{x}') AS too_big;\n")
        self.assertEqual(out, "300000\n")  # traffic untouched
        self.logged(r"query of 3000\d\d bytes not logged \(over max_message 262144\)")
        self.assertNotIn("AS too_big", self.sp.log())
        # and the stream is still decoded after it
        self.psql("-c", "SELECT 'after the big one'")
        self.logged(r"query: SELECT 'after the big one'")

    def test_tls_session_is_not_decoded(self):
        openssl = shutil.which("openssl")
        if openssl is None:
            self.skipTest("openssl not found: cannot make a server certificate")
        cert = os.path.join(self.pg.data, "server.crt")
        key = os.path.join(self.pg.data, "server.key")
        p = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-subj", "/CN=localhost", "-days", "1", "-keyout", key, "-out", cert],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        os.chmod(key, 0o600)
        if self.pg.run_as:
            for f in (cert, key):
                os.chown(f, self.pg.run_as["user"], self.pg.run_as["group"])
        for stmt in ("ALTER SYSTEM SET ssl = on", "SELECT pg_reload_conf()"):
            r = self.pg.sql(stmt)
            self.assertEqual(r.returncode, 0, r.stderr)
        try:
            deadline = time.time() + 10
            while self.pg.sql("SHOW ssl").stdout.strip() != "on" and time.time() < deadline:
                time.sleep(0.1)
            out = self.psql("-A", "-t", "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = "
                            "pg_backend_pid() AND 'tls' = 'tls'", PGSSLMODE="require")
            self.assertEqual(out, "t\n")
            self.logged(r"the server accepted SSLRequest, the session is TLS; not decoding")
            self.assertNotIn("'tls' = 'tls'", self.sp.log())
        finally:
            for stmt in ("ALTER SYSTEM RESET ssl", "SELECT pg_reload_conf()"):
                self.pg.sql(stmt)
            deadline = time.time() + 10
            while self.pg.sql("SHOW ssl").stdout.strip() != "off" and time.time() < deadline:
                time.sleep(0.1)


def main():
    why = missing_pg()
    if why is not None:
        if os.environ.get("SPOKE_REQUIRE_PG") == "1":
            print("FAIL: " + why)
            return 1
        print("SKIP: " + why)
        return SKIP
    bindir = find_pg_bindir()
    global PSQL
    PSQL = client(bindir, "psql")
    PgQueryLogTest.bindir = bindir
    result = unittest.main(verbosity=2, exit=False).result
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
