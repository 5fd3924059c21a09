"""Edge to control, end to end and under faults: a plugin in spoked sends payloads, the
uplink carries them to hubd, and a control plugin counts each one in its KV namespace --
while hubd's workers and hubd itself are kill -9ed and restarted, and the uplink is kill
-9ed in between. Every payload must be counted exactly once (KV: exactly once), over
http:// and over https:// with mutual TLS. Also the reference example: cache-stats at the
edge and cache-stats-aggregator at the hub, whose totals equal what the edge counted."""

import os
import random
import re
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from grpcpeer import make_pki  # noqa: E402
from spoketest import (PLUGIN_DIR, EchoServer, Hubd, Spoked, TempDir, connect,  # noqa: E402
                       spoke_bin, test_plugin)
from test_send_to_control import Client, queue_tool  # noqa: E402

SEND_ID = 100  # t-send's ID at the edge = t-control's at the hub


def kv_scan(hub, plugin_id, prefix=""):
    p = subprocess.run([spoke_bin("hubd"), "kv", "scan", str(plugin_id), prefix, "-c",
                        hub.config_path], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise AssertionError("hubd kv scan: " + p.stderr)
    return dict(line.split("\t", 1) for line in p.stdout.splitlines() if "\t" in line)


def pending(qdir):
    return int(re.search(r"pending:\s+(\d+)", queue_tool("stat", qdir)).group(1))


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


class FaultsTest(unittest.TestCase):
    tls = False

    def setUp(self):
        self.tmpdir = TempDir()
        self.tmp = self.tmpdir.__enter__()
        self.echo = EchoServer()
        self.hub_extra = {}
        self.uplink = {}
        if self.tls:
            make_pki(self.tmp, client_names=("edge-test",))
            f = lambda n: os.path.join(self.tmp, n)  # noqa: E731
            self.hub_extra = {"tls": {"cert": f("server.pem"), "key": f("server.key"),
                                      "client_ca": f("ca.pem")}}
            self.uplink = {"ca": f("ca.pem"), "cert": f("client.pem"), "key": f("client.key")}
        self.hub = self.start_hub()
        scheme = "https" if self.tls else "http"
        self.uplink.update({"url": f"{scheme}://127.0.0.1:{self.hub.port}",
                            "heartbeat": "100ms", "batch_size": 10, "timeout": "2s"})
        t_send = {"name": "t-send", "id": SEND_ID, "file": test_plugin("t_send")}
        self.sp = Spoked(self.tmp, upstream=f"127.0.0.1:{self.echo.port}", plugins=[t_send],
                         extra={"uplink": self.uplink})
        self.client = Client(self.sp.port)
        self.sent = []

    def start_hub(self, port=None):
        t_control = {"name": "t-control", "id": SEND_ID, "file": test_plugin("t_control")}
        return Hubd(self.tmp, plugins=[t_control], extra=self.hub_extra, workers=2, port=port)

    def tearDown(self):
        self.client.close()
        self.sp.stop()
        self.hub.stop()
        self.echo.stop()
        self.tmpdir.__exit__(None, None, None)

    def send(self, n):
        for _ in range(n):
            corr = f"p{len(self.sent)}"
            rc, _ = self.client.cmd(f"SEND {corr} payload-{len(self.sent)}")
            self.assertEqual(rc, 0)
            self.sent.append(corr)

    def uplink_pid(self):
        m = re.search(r"uplink: pid (\d+)", self.sp.status())
        return int(m.group(1)) if m else None

    def test_every_payload_counted_once_through_kills(self):
        rnd = random.Random(7)
        for rnd_i in range(3):
            self.send(25)
            time.sleep(rnd.uniform(0.05, 0.3))
            workers = children(self.hub.proc.pid)
            if workers:
                os.kill(rnd.choice(workers), signal.SIGKILL)  # a hub worker
            self.send(25)
            pid = self.uplink_pid()
            if pid:
                os.kill(pid, signal.SIGKILL)  # the uplink
            self.send(25)
            time.sleep(rnd.uniform(0.05, 0.3))
            port = self.hub.port
            os.kill(self.hub.proc.pid, signal.SIGKILL)  # hubd itself; workers follow it
            self.hub.proc.wait()
            self.hub._log.close()
            deadline = time.time() + 10
            while children(self.hub.proc.pid) if os.path.exists(f"/proc/{self.hub.proc.pid}") else []:
                if time.time() > deadline:
                    break
                time.sleep(0.05)
            time.sleep(0.3)  # the killed workers' sockets close
            self.hub = self.start_hub(port=port)
        self.send(25)
        qdir = os.path.join(self.tmp, "queue")
        deadline = time.time() + 60
        while time.time() < deadline:
            if pending(qdir) == 0:
                break
            time.sleep(0.2)
        self.assertEqual(pending(qdir), 0, self.sp.status())
        seen = kv_scan(self.hub, SEND_ID, "seen/")
        self.assertEqual(sorted(seen), sorted(f"seen/{c}" for c in self.sent))
        twice = {k: v for k, v in seen.items() if v != "1"}
        self.assertEqual(twice, {}, "counted more than once")
        # The faults hit deliveries: calls failed and were retried.
        self.assertRegex(self.sp.status(), r"failed \(retried\) [1-9]")


class FaultsTlsTest(FaultsTest):
    tls = True


class ReferenceExampleTest(unittest.TestCase):
    """cache-stats (edge) and cache-stats-aggregator (hub): the hub's totals equal the
    hits and misses the edge's workers counted."""

    def test_totals_match(self):
        with TempDir() as tmp:
            echo = EchoServer()
            agg = {"name": "cache-stats-aggregator", "id": 42,
                   "file": os.path.join(PLUGIN_DIR, "cache-stats-aggregator.so")}
            hub = Hubd(tmp, plugins=[agg], workers=2)
            stats = {"name": "cache-stats", "id": 42,
                     "file": os.path.join(PLUGIN_DIR, "cache-stats.so"),
                     "config": {"report_interval": "200ms"}}
            sp = Spoked(tmp, upstream=f"127.0.0.1:{echo.port}", plugins=[stats],
                        extra={"listen": {"workers": 2},
                               "uplink": {"url": hub.url, "heartbeat": "100ms"}})
            try:
                lines = [f"GET /item/{i % 7} HTTP/1.1\r\n".encode() for i in range(60)]
                for line in lines:
                    s = connect(f"127.0.0.1:{sp.port}")
                    s.sendall(line)
                    s.recv(100)
                    s.close()
                # A graceful stop: the workers' fini queue their last reports, then the
                # uplink drains them before it exits.
                sp.stop()
                hits = sum(int(h) for h in re.findall(r"hits=(\d+) misses=\d+", sp.log()))
                misses = sum(int(m) for m in re.findall(r"hits=\d+ misses=(\d+)", sp.log()))
                self.assertEqual(hits + misses, 60)
                self.assertEqual(pending(os.path.join(tmp, "queue")), 0)
                totals = kv_scan(hub, 42, "totals")["totals"]
                self.assertIn(f'"hits": {hits}, "misses": {misses}', totals)
                self.assertIn('"edges": 1', totals)
            finally:
                sp.stop()
                hub.stop()
                echo.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
