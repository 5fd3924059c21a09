"""The supervisor's loop never waits on a client or a disk (issue 12, item 5).

Against a real spoked: a client of the admin socket that sends half a command and stalls
gets nothing until its line is complete, and meanwhile `spoked status` is answered; a
client that sends 1,500 commands and reads nothing (answers far bigger than the socket's
buffers) does not stop the supervisor from answering others, and gets every answer once
it reads; idle connections past the cap do not lock `spoked status` out; a queue sync
that fails (the LMDB map is full) is logged once, with its backoff, not every retry; and
a reload whose config has 50,000 plugin config keys is parsed and served.
"""
import os
import select
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spoketest import SpokeCase, Spoked, roundtrip, test_plugin  # noqa: E402


def admin_path(sp):
    return os.path.join(sp.config["run_dir"], "spoked.sock")


def admin_connect(sp):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(admin_path(sp))  # blocking: waits while the backlog is full
    s.settimeout(20)
    return s


def read_to_eof(s):
    chunks = []
    while True:
        b = s.recv(65536)
        if not b:
            return b"".join(chunks).decode()
        chunks.append(b)


def readable(s, wait):
    r, _, _ = select.select([s], [], [], wait)
    return bool(r)


class AdminSocket(SpokeCase):
    def start(self):
        return Spoked(self.dir, self.echo.address)

    def test_half_a_command_waits_and_costs_others_nothing(self):
        with self.start() as sp:
            a = admin_connect(sp)
            a.sendall(b"sta")
            # others are answered while a's line is incomplete
            for _ in range(3):
                self.assertIn("generation 1 (serving)", sp.status())
            # and a got nothing: its command is not complete
            self.assertFalse(readable(a, 0.3), "answered before the command line ended")
            a.sendall(b"tus\n")
            self.assertTrue(readable(a, 10))
            got = b""
            while b"send_to_control" not in got:
                b = a.recv(65536)
                self.assertTrue(b, "connection closed before the report ended")
                got += b
            self.assertIn(b"generation 1 (serving)", got)
            # the connection stays open for the next command
            a.sendall(b"frobnicate\n")
            a.shutdown(socket.SHUT_WR)
            rest = read_to_eof(a)
            self.assertIn("unknown command 'frobnicate' (commands: status)", rest)
            a.close()

    def test_slow_reader_of_many_answers(self):
        n = 1500
        with self.start() as sp:
            a = admin_connect(sp)
            a.sendall(b"status\n" * n)  # and reads nothing for now
            time.sleep(0.3)
            for _ in range(3):
                self.assertIn("generation 1 (serving)", sp.status())
            # the proxy and the supervisor's other work go on too
            self.assertEqual(roundtrip(sp.port, b"ping"), b"ping")
            a.shutdown(socket.SHUT_WR)
            text = read_to_eof(a)
            a.close()
            self.assertGreater(len(text), 500000)  # more than the socket buffers hold
            self.assertEqual(text.count("generation 1 (serving)"), n)

    def test_idle_connections_do_not_lock_status_out(self):
        with self.start() as sp:
            idle = []
            for i in range(40):  # past the cap of 32
                s = admin_connect(sp)
                s.sendall(b"stat")
                idle.append(s)
            for _ in range(3):
                self.assertIn("generation 1 (serving)", sp.status())
            for s in idle:
                s.close()

    def test_empty_request_gets_the_report(self):
        """A client that closes its side without a command gets the report (as before
        commands existed)."""
        with self.start() as sp:
            a = admin_connect(sp)
            a.shutdown(socket.SHUT_WR)
            self.assertIn("generation 1 (serving)", read_to_eof(a))
            a.close()


class QueueSyncBackoff(SpokeCase):
    def test_failing_sync_is_logged_once(self):
        extra = {"queue": {"map_size": "1MiB", "max_bytes": "1MiB", "journal_size": "4MiB",
                           "sync": "10ms"}}
        plugins = [{"name": "t-send", "file": test_plugin("t_send")}]
        with Spoked(self.dir, self.echo.address, plugins=plugins, extra=extra) as sp:
            s = socket.create_connection(("127.0.0.1", sp.port))
            for _ in range(8):  # 1.6 MB: more than the map holds
                s.sendall(b"BIG 200000\n")
                self.assertTrue(s.recv(100).startswith(b"RC "))
            s.close()
            sp.wait_log(r"the LMDB map is full .*; retrying the queue sync with backoff "
                        r"\(100 ms, doubling to 5 s\)")
            # the interval (10 ms) is not the retry period: 2 s is some 200 intervals
            time.sleep(2)
            self.assertEqual(sp.log().count("the LMDB map is full"), 1, sp.log())
            self.assertIn("generation 1 (serving)", sp.status())


class LargeConfig(SpokeCase):
    def test_reload_with_fifty_thousand_config_keys(self):
        """A reload's config with 5 plugins of 10,000 config keys each is parsed and its
        generation serves (the parse runs on the supervisor's loop: no n^2 work, see
        tests/core/test_config_scale.c for the count)."""
        with Spoked(self.dir, self.echo.address) as sp:
            cfg = dict(sp.config)
            cfg["plugins"] = dict(cfg["plugins"])
            cfg["plugins"]["list"] = [
                {"name": f"units-{p}", "file": test_plugin("t_units"),
                 "config": {"interval": "1s", "limit": "1KiB",
                            **{f"k{k}": f"v{k}" for k in range(9998)}}}
                for p in range(5)]
            sp.write_config(cfg)
            sp.send_signal(1)  # SIGHUP
            sp.wait_log(r"generation 2 serving", timeout=60)
            self.assertEqual(roundtrip(sp.port, b"hello"), b"hello")
            self.assertIn("units-4", sp.status())


if __name__ == "__main__":
    unittest.main()
