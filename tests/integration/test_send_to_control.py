"""send_to_control through a real spoked: the t-send test plugin calls the host service on
client commands, and the records are checked in the LMDB queue with `spoke-queue`
(plugin ID, correlation ID, metadata, content type), together with the limits as a plugin
sees them (1 MiB accepted, 1 MiB + 1 refused with its code, 50/51 metadata entries), JSON
refusal, a send from init, the status report and metrics, and a kill -9 of the worker
right after a send that returned 0 (the record must still be there)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import EchoServer, Spoked, TempDir, connect, free_port, spoke_bin  # noqa: E402

PLUGIN_ID = 4242
MiB = 1024 * 1024
ERR = {"payload_too_large": -10, "too_many_metadata": -11, "not_json": -17}


def t_send(config=None):
    p = {"name": "t-send", "id": PLUGIN_ID,
         "file": os.path.join(os.environ.get("SPOKE_TEST_PLUGIN_DIR", ""), "t_send.so")}
    if config:
        p["config"] = config
    return p


class Client:
    """One connection to spoked; each command gets one "RC status pending" answer."""

    def __init__(self, port):
        self.s = connect(f"127.0.0.1:{port}")
        self.buf = b""

    def cmd(self, text):
        self.s.sendall(text.encode() + b"\n")
        while b"\n" not in self.buf:
            d = self.s.recv(4096)
            if not d:
                raise AssertionError(f"connection closed after {text[:40]!r}")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        m = re.fullmatch(rb"RC (-?\d+) (\d+)", line)
        if not m:
            raise AssertionError(f"unexpected answer {line!r}")
        return int(m.group(1)), int(m.group(2))

    def close(self):
        self.s.close()


def queue_tool(*args):
    p = subprocess.run([spoke_bin("spoke-queue"), *args], capture_output=True, text=True,
                       timeout=30)
    if p.returncode != 0:
        raise AssertionError(f"spoke-queue {args}: {p.stderr}")
    return p.stdout


def peek(qdir, n=100):
    """Records as dicts: seq, plugin, bytes, type, corr, meta, payload (escaped preview)."""
    recs = []
    for line in queue_tool("peek", str(n), qdir).splitlines():
        m = re.match(r"seq (\d+)  plugin (\d+)  time \S+  (\d+) bytes(?:  edge (\S+))?"
                     r"(?:  type (\S+))?$", line)
        if m:
            recs.append({"seq": int(m.group(1)), "plugin": int(m.group(2)),
                         "bytes": int(m.group(3)), "edge": m.group(4), "type": m.group(5),
                         "meta": []})
            continue
        if "CORRUPT" in line:
            raise AssertionError("corrupt record: " + line)
        m = re.match(r'  correlation id: "(.*)"$', line)
        if m:
            recs[-1]["corr"] = m.group(1)
        m = re.match(r'  meta "(.*)" = "(.*)"$', line)
        if m:
            recs[-1]["meta"].append((m.group(1), m.group(2)))
        m = re.match(r'  payload: "(.*)"(?:\.\.\. \(\d+ bytes\))?$', line)
        if m:
            recs[-1]["payload"] = m.group(1)
    return recs


def pending(qdir):
    m = re.search(r"pending:\s+(\d+) records", queue_tool("stat", qdir))
    return int(m.group(1))


class SendToControlTest(unittest.TestCase):
    def setUp(self):
        self.tmp = TempDir()
        self.dir = self.tmp.__enter__()
        self.qdir = os.path.join(self.dir, "queue")
        self.echo = EchoServer()

    def tearDown(self):
        self.echo.stop()
        self.tmp.__exit__(None, None, None)

    def spoked(self, config=None, **kw):
        extra = {"queue": {"map_size": "64MiB", "max_bytes": "32MiB"}}
        extra.update(kw.pop("extra", {}))
        return Spoked(self.dir, self.echo.address, plugins=[t_send(config)], extra=extra, **kw)

    def poll(self, get, done, timeout=10.0):
        """Call get() every 50 ms until done(value); return that value. Fails the test
        with the last value when `timeout` seconds pass first."""
        deadline = time.time() + timeout
        while True:
            value = get()
            if done(value):
                return value
            self.assertLess(time.time(), deadline, value)
            time.sleep(0.05)

    def test_records_limits_and_json(self):
        mport = free_port()
        with self.spoked({"init_send": "hello from init"},
                         extra={"metrics": {"listen": f"127.0.0.1:{mport}"}}) as sp:
            c = Client(sp.port)
            self.assertEqual(c.cmd("SEND req-1 hello world"), (0, 2))  # init's is the 1st
            self.assertEqual(c.cmd("JSON req-2 {\"a\": [1, 2, true]}"), (0, 3))
            self.assertEqual(c.cmd("SEND - no correlation"), (0, 4))
            rc, _ = c.cmd("JSON req-3 {not json}")
            self.assertEqual(rc, ERR["not_json"])
            self.assertEqual(c.cmd(f"BIG {MiB}"), (0, 5))
            rc, _ = c.cmd(f"BIG {MiB + 1}")
            self.assertEqual(rc, ERR["payload_too_large"])
            self.assertEqual(c.cmd("MD 50"), (0, 6))
            rc, _ = c.cmd("MD 51")
            self.assertEqual(rc, ERR["too_many_metadata"])
            c.close()

            recs = peek(self.qdir)
            self.assertEqual([r["seq"] for r in recs], [1, 2, 3, 4, 5, 6])
            self.assertTrue(all(r["plugin"] == PLUGIN_ID for r in recs))
            self.assertTrue(all(r["edge"] == "edge-test" for r in recs))
            init, raw, js, nocorr, big, md = recs
            self.assertEqual((init["corr"], init["payload"]), ("from-init", "hello from init"))
            self.assertEqual((raw["corr"], raw["payload"], raw["type"]),
                             ("req-1", "hello world", None))
            self.assertEqual(raw["meta"], [("kind", "t-send"), ("n", "1")])
            self.assertEqual((js["corr"], js["type"]), ("req-2", "application/json"))
            self.assertEqual(js["payload"], '{\\"a\\": [1, 2, true]}')
            self.assertEqual(nocorr["corr"], "")
            self.assertEqual(big["bytes"], MiB)
            self.assertEqual(len(md["meta"]), 50)

            # Refusals are logged with the plugin's name and counted by reason.
            sp.wait_log(r"plugin t-send: send_to_control refused \(not_json")
            sp.wait_log(r"plugin t-send: send_to_control refused \(payload_too_large")
            status = sp.status()
            self.assertRegex(status, r"queue: .*pending 6 ")
            self.assertRegex(status, r"send_to_control: accepted 6  refused 3")
            self.assertIn("not_json 1", status)
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            self.assertIn("spoke_queue_pending 6\n", metrics)
            self.assertIn('spoke_queue_refused_total{reason="payload_too_large"} 1\n', metrics)
            self.assertIn('spoke_queue_refused_total{reason="too_many_metadata"} 1\n', metrics)
            self.assertIn("spoke_queue_sent_total 6\n", metrics)
            self.assertIn(f'spoke_queue_plugin_pending{{plugin_id="{PLUGIN_ID}"}} 6\n', metrics)
            self.assertRegex(metrics, r"spoke_queue_oldest_age_seconds \d+\.\d+\n")
            self.assertIn("spoke_queue_available 1\n", metrics)

    def test_supervisor_moves_the_journal(self):
        # send_to_control only appends to the journal; the supervisor's timer moves the
        # records into LMDB, flushes it and frees the journal (docs/queue.md).
        mport = free_port()
        with self.spoked(extra={"metrics": {"listen": f"127.0.0.1:{mport}"}}) as sp:
            c = Client(sp.port)
            for i in range(20):
                self.assertEqual(c.cmd(f"SEND m-{i} to be moved"), (0, i + 1))
            c.close()
            def scrape():
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics",
                                            timeout=10) as r:
                    return r.read().decode()

            metrics = self.poll(scrape, lambda m: "spoke_queue_journal_used_bytes 0\n" in m)
            self.assertIn("spoke_queue_pending 20\n", metrics)
            self.assertIn("spoke_queue_damaged_total 0\n", metrics)
            self.assertRegex(metrics, r"spoke_queue_syncs_total [1-9]\d*\n")
            self.assertRegex(metrics, r"spoke_queue_journal_size_bytes 67108864\n")
        self.assertEqual(pending(self.qdir), 20)

    def test_single_process_moves_the_journal(self):
        # --single-process has no supervisor: the worker runs the queue timer itself.
        with self.spoked(args=("--single-process",)) as sp:
            c = Client(sp.port)
            for i in range(10):
                self.assertEqual(c.cmd(f"SEND s-{i} single"), (0, i + 1))
            c.close()
            self.poll(lambda: queue_tool("stat", self.qdir),
                      lambda st: re.search(r"journal:\s+0 of \d+ bytes in use", st))
            self.assertEqual(pending(self.qdir), 10)

    def test_kill9_after_send_loses_nothing(self):
        with self.spoked() as sp:
            for i in range(3):
                pids = sp.worker_pids()
                self.assertEqual(len(pids), 1)
                c = Client(sp.port)
                self.assertEqual(c.cmd(f"SEND kill-{i} accepted before kill -9")[0], 0)
                self.assertEqual(c.cmd(f"JSON kill-{i} {{not json")[0], ERR["not_json"])
                os.kill(pids[0], signal.SIGKILL)  # at once, before any sync could run
                c.close()
                self.assertEqual(pending(self.qdir), i + 1)
                # wait for the replacement worker before the next round
                self.poll(lambda: (sp.worker_pids(), sp.status()),
                          lambda v: v[0] and v[0][0] != pids[0] and "ready" in v[1],
                          timeout=15)
            recs = peek(self.qdir)
            self.assertEqual([r["corr"] for r in recs], ["kill-0", "kill-1", "kill-2"])
            self.assertIn("ok:", queue_tool("verify", self.qdir))
            # The counters of the killed workers are kept: metrics counters never go back.
            status = sp.status()
            self.assertRegex(status, r"send_to_control: accepted 3  refused 3")
            self.assertIn("not_json 3", status)

    def test_sync_always(self):
        with self.spoked(extra={"queue": {"sync": "always", "map_size": "64MiB",
                                          "max_bytes": "32MiB"}}) as sp:
            c = Client(sp.port)
            for i in range(5):
                self.assertEqual(c.cmd(f"SEND a-{i} durable"), (0, i + 1))
            c.close()
        self.assertEqual(pending(self.qdir), 5)

    def test_queue_unavailable_worker_still_serves(self):
        blocker = os.path.join(self.dir, "not-a-dir")
        with open(blocker, "w") as f:
            f.write("a file where the queue directory should be\n")
        with self.spoked(extra={"queue": {"path": os.path.join(blocker, "q")}}) as sp:
            sp.wait_log(r"send_to_control unavailable: ")
            c = Client(sp.port)
            self.assertEqual(c.cmd("SEND x y")[0], -16)  # SPOKE_ERR_QUEUE_UNAVAILABLE
            c.close()
            with connect(f"127.0.0.1:{sp.port}") as s:  # traffic still flows
                s.sendall(b"echo me")
                self.assertEqual(s.recv(100), b"echo me")
            self.assertIn("queue: unavailable", sp.status())


if __name__ == "__main__":
    unittest.main(verbosity=2)
