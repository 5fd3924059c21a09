#!/usr/bin/python3
"""pg-query-log with a max_message smaller than the startup message (found by fuzz_pg_query_log).

max_message bounds the Query/Parse messages the plugin logs. It used to bound the startup
message too: a startup message over max_message was skipped unread, the connection stayed
in the startup phase, the first typed message was then taken for a startup message's
length, and the plugin stopped decoding the connection ("not a PostgreSQL startup message")
-- with `max_message: 16`, not one query of any psql session was logged. Here a real psql
(whose startup message is ~80 bytes) goes through spoked to a real PostgreSQL with
max_message 16: its session line and its short query must be logged, its long one skipped.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_pg  # noqa: E402
from spoketest import Spoked  # noqa: E402


class SmallMaxMessageTest(unittest.TestCase):
    def test_session_and_short_query_logged(self):
        tmp = tempfile.mkdtemp(prefix="spoke-pg-small-")
        pg = sp = None
        try:
            pg = test_pg.PgServer(test_pg.find_pg_bindir(), tmp)
            spdir = os.path.join(tmp, "spoked")
            os.mkdir(spdir)
            plugins = [{"file": "pg-query-log.so", "config": {"max_message": "16"}}]
            sp = Spoked(spdir, f"127.0.0.1:{pg.port}", plugins=plugins)
            for sql in ("SELECT 1", "SELECT 'a much longer query than sixteen bytes'"):
                p = subprocess.run([test_pg.PSQL, "-X", "-A", "-t", "-h", "127.0.0.1", "-p",
                                    str(sp.port), "-U", test_pg.PG_USER, "-d", "postgres",
                                    "-c", sql],
                                   capture_output=True, text=True, timeout=30,
                                   env=test_pg.client_env())
                self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            sp.wait_log(r"pg-query-log: conn \d+: session user=spoke database=postgres")
            sp.wait_log(r"pg-query-log: conn \d+: query: SELECT 1\n")
            sp.wait_log(r"pg-query-log: conn \d+: query of \d+ bytes not logged "
                        r"\(over max_message 16\)")
            self.assertNotIn("not a PostgreSQL startup message", sp.log())
        finally:
            if sp is not None:
                sp.__exit__(None, None, None)
            if pg is not None:
                pg.stop()
            shutil.rmtree(tmp, ignore_errors=True)


def main():
    bindir = test_pg.find_pg_bindir()
    if bindir is None or test_pg.client(bindir, "psql") is None:
        print("SKIP: no PostgreSQL server or psql (Debian's postgresql-15)")
        return test_pg.SKIP
    test_pg.PSQL = test_pg.client(bindir, "psql")
    result = unittest.main(verbosity=2, exit=False).result
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
