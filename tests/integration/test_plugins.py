"""The example plugins on real traffic through spoked: counter (connections and bytes per
direction, periodic and final report, bad interval) and deny (prefix at the start of a
connection, whole or split over several sends, lists of prefixes, the answer sent before
closing, connections that pass untouched, missing config)."""

import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import SpokeCase, Spoked, connect, recv_all, recv_exact, roundtrip  # noqa: E402

COUNTS = (r"connections opened=(\d+) open=(\d+) bytes from_client=(\d+) to_server=(\d+) "
          r"from_server=(\d+) to_client=(\d+)")


def counter(interval="200ms"):
    return {"file": "counter.so", "config": {"interval": interval}}


def deny(prefix, message=None):
    config = {"prefix": prefix}
    if message is not None:
        config["message"] = message
    return {"file": "deny.so", "config": config}


class CounterTest(SpokeCase):
    def last_counts(self, log, final=False):
        lines = [m for m in re.finditer(("final: " if final else "") + COUNTS, log)]
        self.assertTrue(lines, "no counter line in:\n" + log)
        return tuple(int(x) for x in lines[-1].groups())

    def test_counts_bytes_per_direction(self):
        with Spoked(self.dir, self.echo.address, plugins=[counter()]) as sp:
            self.assertEqual(roundtrip(sp.port, b"a" * 1000), b"a" * 1000)
            self.assertEqual(roundtrip(sp.port, b"b" * 234), b"b" * 234)
            sp.wait_log(r"opened=2 open=0 bytes from_client=1234 to_server=1234 "
                        r"from_server=1234 to_client=1234")
        self.assertEqual(self.last_counts(sp.log(), final=True), (2, 0, 1234, 1234, 1234, 1234))

    def test_counts_open_connections(self):
        with Spoked(self.dir, self.echo.address, plugins=[counter()]) as sp:
            socks = [connect(f"127.0.0.1:{sp.port}") for _ in range(3)]
            for s in socks:
                s.sendall(b"hi")
                self.assertEqual(recv_exact(s, 2), b"hi")
            sp.wait_log(r"opened=3 open=3 bytes from_client=6 ")
            for s in socks:
                s.close()
            sp.wait_log(r"opened=3 open=0 ")

    def test_to_counts_follow_rewrites(self):
        """'to_*' counts bytes after the other plugins ran: a denied connection's bytes
        come from the client but never reach the server."""
        plugins = [counter(), deny("DROP", message="denied\n")]
        with Spoked(self.dir, self.echo.address, plugins=plugins) as sp:
            self.assertEqual(roundtrip(sp.port, b"DROP TABLE x"), b"denied\n")
            self.assertEqual(roundtrip(sp.port, b"keep"), b"keep")
            sp.wait_log(r"opened=2 open=0 bytes from_client=16 to_server=4 from_server=4 "
                        r"to_client=4")

    def test_default_interval_is_ten_seconds(self):
        with Spoked(self.dir, self.echo.address, plugins=[{"file": "counter.so"}]) as sp:
            self.assertEqual(roundtrip(sp.port, b"x"), b"x")
            time.sleep(0.6)
            self.assertIsNone(re.search(r"plugin counter: connections", sp.log()))
        self.assertEqual(self.last_counts(sp.log(), final=True), (1, 0, 1, 1, 1, 1))

    def test_bad_interval_refused(self):
        for bad in ("10", "fast", "0s", "25h"):
            sp = Spoked(self.dir, self.echo.address, plugins=[counter(bad)], expect_fail=True)
            sp.stop()
            self.assertIn(f"interval: '{bad}' is not a duration", sp.log())
            self.assertNotEqual(sp.proc.returncode, 0)


class DenyTest(SpokeCase):
    def test_denies_prefix_and_answers(self):
        with Spoked(self.dir, self.echo.address,
                    plugins=[deny("GET /admin", message="forbidden\n")]) as sp:
            self.assertEqual(roundtrip(sp.port, b"GET /admin/users HTTP/1.1\r\n\r\n"),
                             b"forbidden\n")
            sp.wait_log(r"WARN .*plugin deny: conn \d+ from 127\.0\.0\.1:\d+ denied: "
                        r"first bytes match prefix 'GET /admin'")
        self.assertEqual(self.echo.received, 0)

    def test_denies_prefix_split_over_sends(self):
        with Spoked(self.dir, self.echo.address,
                    plugins=[deny("GET /admin", message="forbidden\n")]) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            for part in (b"GE", b"T /a", b"dmin and more"):
                s.sendall(part)
                time.sleep(0.1)  # separate reads in spoked
            self.assertEqual(recv_all(s), b"forbidden\n")
            s.close()
            self.assertEqual(len(re.findall(r"denied: first bytes", sp.log())), 1)
        self.assertEqual(self.echo.received, 0)  # not even the first bytes went upstream

    def test_passes_other_connections_intact(self):
        with Spoked(self.dir, self.echo.address, plugins=[deny("GET /admin")]) as sp:
            self.assertEqual(roundtrip(sp.port, b"GET /index.html"), b"GET /index.html")
            self.assertEqual(roundtrip(sp.port, b"G"), b"")  # never decided: held, dropped
            # The prefix only counts at the start of a connection.
            data = b"hello GET /admin " * 1000
            self.assertEqual(roundtrip(sp.port, data), data)
            self.assertNotIn("denied", sp.log())

    def test_held_bytes_are_released_in_order(self):
        """Bytes held while undecided reach the upstream first, in order, once the
        connection is let through."""
        with Spoked(self.dir, self.echo.address, plugins=[deny("GET /admin")]) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            for part in (b"GE", b"T /", b"adx", b"-rest"):
                s.sendall(part)
                time.sleep(0.1)
            self.assertEqual(recv_exact(s, 13), b"GET /adx-rest")
            s.sendall(b"GET /admin")  # later bytes are never compared
            self.assertEqual(recv_exact(s, 10), b"GET /admin")
            s.close()

    def test_prefix_list_without_message(self):
        with Spoked(self.dir, self.echo.address,
                    plugins=[deny(["DELETE ", "DROP ", "\u00e9t\u00e9"])]) as sp:
            self.assertEqual(roundtrip(sp.port, b"DROP TABLE t"), b"")
            self.assertEqual(roundtrip(sp.port, b"DELETE FROM t"), b"")
            self.assertEqual(roundtrip(sp.port, "\u00e9t\u00e9!".encode()), b"")
            self.assertEqual(roundtrip(sp.port, b"DROPPED"), b"DROPPED")
            self.assertEqual(len(re.findall(r"denied: first bytes", sp.log())), 3)
        self.assertEqual(self.echo.received, 7)

    def test_missing_prefix_refused(self):
        sp = Spoked(self.dir, self.echo.address,
                    plugins=[{"file": "deny.so", "config": {"message": "x"}}], expect_fail=True)
        sp.stop()
        self.assertIn("config key 'prefix' is required", sp.log())
        self.assertNotEqual(sp.proc.returncode, 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
