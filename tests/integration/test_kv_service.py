"""The KV host services (ABI 1.2) through a real spoked with two workers: the t-kv test
plugin runs client commands through kv_put/kv_get/kv_del/kv_scan. What one worker writes
the other reads (each answer names the worker's pid, and a worker held busy forces the
next connection onto the other one), from hooks and from timers; a value written before both workers are killed with
SIGKILL (after a kv.sync period) is read back by their successors; a store that cannot be
opened makes the services answer KV_UNAVAILABLE while traffic still flows, and is opened
by every worker once the obstacle is gone; and the limits as a plugin sees them."""

import os
import re
import signal
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import SpokeCase, Spoked, connect, roundtrip, test_plugin  # noqa: E402

PLUGIN_ID = 77
ERR = {"invalid": -1, "payload_too_large": -10, "not_found": -18, "kv_unavailable": -19}
MiB = 1024 * 1024


class Client:
    """One connection to spoked; one answer line per command."""

    def __init__(self, port):
        self.s = connect(f"127.0.0.1:{port}", timeout=20)
        self.buf = b""

    def send(self, text):
        self.s.sendall(text.encode() + b"\n")

    def line(self):
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise AssertionError("connection closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def cmd(self, text):
        self.send(text)
        return self.line()

    def rc(self, text):
        """Status of PUT/DEL/BIG/KEY."""
        m = re.fullmatch(r"RC (-?\d+)", self.cmd(text))
        assert m, text
        return int(m.group(1))

    def get(self, key):
        """(status, value or None)."""
        m = re.fullmatch(r"RC (-?\d+) (\d+) (.*)", self.cmd("GET " + key), re.S)
        assert m, key
        rc = int(m.group(1))
        return rc, (m.group(3) if rc == 0 else None)

    def scan(self, *args):
        """(status, [(key, value)...])."""
        m = re.fullmatch(r"RC (-?\d+) (\d+)(.*)", self.cmd("SCAN " + " ".join(args)))
        assert m, args
        items = [tuple(kv.split("=", 1)) for kv in m.group(3).split()]
        assert len(items) == int(m.group(2))
        return int(m.group(1)), items

    def pid(self):
        m = re.fullmatch(r"PID (\d+)", self.cmd("PID"))
        return int(m.group(1))

    def close(self):
        self.s.close()


def t_kv(**kw):
    p = {"name": "t-kv", "id": PLUGIN_ID, "file": test_plugin("t_kv")}
    p.update(kw)
    return p


class KvServiceTest(SpokeCase):
    def spoked(self, kv=None, plugins=None, **kw):
        extra = {"listen": {"workers": 2},
                 # HOLD blocks a hook on purpose: keep the watchdog out of it
                 "plugins": {"hook_timeout": "2s", "drain_timeout": "1s"},
                 "kv": {"path": os.path.join(self.dir, "kv"), "map_size": "64MiB",
                        "sync": "100ms"}}
        extra["kv"].update(kv or {})
        return Spoked(self.dir, self.echo.address, plugins=plugins or [t_kv()], extra=extra,
                      **kw)

    def other_worker(self, sp, busy):
        """A client served by the worker that is not `busy`'s: `busy`'s worker is held in
        a hook while the new connection is accepted, so only the other can take it."""
        busy_pid = busy.pid()
        busy.send("HOLD 700")
        time.sleep(0.15)
        other = Client(sp.port)
        pid = other.pid()
        self.assertEqual(busy.line(), "HELD")
        self.assertNotEqual(pid, busy_pid)
        self.assertEqual(sorted(sp.worker_pids()), sorted([pid, busy_pid]))
        return other

    def test_shared_between_workers(self):
        with self.spoked() as sp:
            a = Client(sp.port)
            pid_a = a.pid()
            self.assertEqual(a.rc(f"PUT shared from-{pid_a}"), 0)
            b = self.other_worker(sp, a)
            pid_b = b.pid()
            # a's write, read by the other worker; and the other way round
            self.assertEqual(b.get("shared"), (0, f"from-{pid_a}"))
            self.assertEqual(b.rc(f"PUT back from-{pid_b}"), 0)
            self.assertEqual(a.get("back"), (0, f"from-{pid_b}"))
            self.assertEqual(b.rc("PUT list/1 one"), 0)
            self.assertEqual(a.rc("PUT list/2 two"), 0)
            self.assertEqual(b.rc("PUT list/3 three"), 0)
            self.assertEqual(a.scan("list/"),
                             (0, [("list/1", "one"), ("list/2", "two"), ("list/3", "three")]))
            self.assertEqual(b.scan("list/", "list/1", "1"), (0, [("list/2", "two")]))
            self.assertEqual(b.scan("-", "-", "2"), (0, [("back", f"from-{pid_b}"),
                                                        ("list/1", "one")]))
            # deletes too
            self.assertEqual(a.rc("DEL shared"), 0)
            self.assertEqual(b.get("shared"), (ERR["not_found"], None))
            self.assertEqual(b.rc("DEL shared"), ERR["not_found"])
            # the limits, as a plugin sees them
            self.assertEqual(a.rc("KEY 507"), 0)
            self.assertEqual(a.rc("KEY 508"), ERR["invalid"])
            self.assertEqual(a.rc(f"BIG big {MiB}"), 0)
            self.assertEqual(a.rc(f"BIG big2 {MiB + 1}"), ERR["payload_too_large"])
            rc, _ = b.get("big2")
            self.assertEqual(rc, ERR["not_found"])
            b.send("GET big")
            m = re.match(r"RC 0 (\d+) x+$", b.line())
            self.assertIsNotNone(m)
            self.assertEqual(int(m.group(1)), MiB)
            # traffic that is no command still flows through the plugin to the upstream
            self.assertEqual(roundtrip(sp.port, b"hello upstream"), b"hello upstream")
            a.close()
            b.close()
        self.assertNotIn("KV services unavailable", sp.log())
        self.assertNotRegex(sp.log(), r"ERROR .*kv")

    def test_writes_from_timers(self):
        """A timer's kv_put is a transaction of its own: each worker's timer writes the
        key, and every worker reads the latest."""
        with self.spoked(plugins=[t_kv(config={"tick_put": "ticks"})]) as sp:
            a = Client(sp.port)
            b = self.other_worker(sp, a)
            seen = set()
            deadline = time.time() + 15
            while len(seen) < 2:  # both workers' timers wrote it
                self.assertLess(time.time(), deadline, seen)
                for c in (a, b):
                    rc, v = c.get("ticks")
                    if rc == 0:
                        seen.add(int(v.split()[0]))
                time.sleep(0.05)
            self.assertEqual(seen, set(sp.worker_pids()))
            a.close()
            b.close()
        self.assertNotIn("tick_put:", sp.log())

    def test_survives_kill_9_of_the_workers(self):
        with self.spoked() as sp:
            a = Client(sp.port)
            self.assertEqual(a.rc("PUT durable before-the-kill"), 0)
            self.assertEqual(a.rc("PUT gone soon"), 0)
            self.assertEqual(a.rc("DEL gone"), 0)
            old = sp.worker_pids()
            self.assertEqual(len(old), 2)
            time.sleep(0.3)  # past kv.sync (100ms): flushed, though a kill loses nothing anyway
            a.close()
            for pid in old:
                os.kill(pid, signal.SIGKILL)
            sp.wait_log(r"restarting worker 0")
            sp.wait_log(r"restarting worker 1")
            deadline = time.time() + 20
            while True:  # until both successors run
                pids = sp.worker_pids()
                if len(pids) == 2 and not set(pids) & set(old):
                    break
                self.assertLess(time.time(), deadline, pids)
                time.sleep(0.05)
            c = Client(sp.port)
            self.assertNotIn(c.pid(), old)
            self.assertEqual(c.get("durable"), (0, "before-the-kill"))
            self.assertEqual(c.get("gone"), (ERR["not_found"], None))
            d = self.other_worker(sp, c)
            self.assertEqual(d.get("durable"), (0, "before-the-kill"))
            c.close()
            d.close()

    def test_store_that_cannot_be_opened(self):
        blocker = os.path.join(self.dir, "a-file")
        with open(blocker, "w") as f:
            f.write("not a directory\n")
        # a path below a regular file: neither it nor its parent can be created
        with self.spoked(kv={"path": os.path.join(blocker, "kv")},
                         plugins=[t_kv(config={"init_put": "k=from-init"})]) as sp:
            sp.wait_log(r"KV services unavailable: .*a-file")
            a = Client(sp.port)
            self.assertEqual(a.rc("PUT k v"), ERR["kv_unavailable"])
            self.assertEqual(a.get("k"), (ERR["kv_unavailable"], None))
            self.assertEqual(a.rc("DEL k"), ERR["kv_unavailable"])
            self.assertEqual(a.scan("-")[0], ERR["kv_unavailable"])
            # arguments are still checked first
            self.assertEqual(a.rc("KEY 508"), ERR["invalid"])
            # traffic flows: what is no command reaches the upstream and comes back
            a.send("not a command")
            self.assertEqual(a.s.recv(100), b"not a command\n")
            self.assertEqual(roundtrip(sp.port, b"x" * 100000), b"x" * 100000)
            a.close()
            st = sp.status()
            self.assertRegex(st, r"t-kv\s+1\.0\.0\s+active")

    def test_store_path_is_a_file_then_fixed(self):
        """kv.path names a regular file: unavailable. Once the operator removes it, the
        services open the store by themselves (retried every few seconds)."""
        path = os.path.join(self.dir, "kv-file")
        with open(path, "w") as f:
            f.write("x")
        with self.spoked(kv={"path": path}) as sp:
            sp.wait_log(r"KV services unavailable: .*kv-file")
            a = Client(sp.port)
            self.assertEqual(a.get("k"), (ERR["kv_unavailable"], None))
            self.assertEqual(roundtrip(sp.port, b"flows"), b"flows")
            os.unlink(path)
            deadline = time.time() + 20
            while a.rc("PUT k fixed") != 0:
                self.assertLess(time.time(), deadline, "the store was never reopened")
                time.sleep(0.2)
            sp.wait_log(r"kv: store .*kv-file opened")
            b = self.other_worker(sp, a)
            deadline = time.time() + 20
            while b.get("k") != (0, "fixed"):  # the other worker reopens it on its own
                self.assertLess(time.time(), deadline, "not reopened by the other worker")
                time.sleep(0.2)
            a.close()
            b.close()


if __name__ == "__main__":
    unittest.main()
