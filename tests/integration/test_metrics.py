"""/metrics: the host's figures, the plugins' registered metrics (ABI 1.4), the merger of
the plugins' own sockets, both text formats (checked by Debian's promtool), and an
endpoint that never holds up the supervisor's loop.

Everything real: spoked and hubd processes, the t-metrics test plugin, a real kill -9, and
Unix sockets served by this test that are slow, gone or answer garbage.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import (CRASH_ENV, Hubd, SpokeCase, Spoked, connect, free_port,  # noqa: E402
                       recv_all, recv_exact, roundtrip, test_plugin)

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def scrape(port, accept=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers.get("Content-Type"), r.read().decode()


def value(text, series):
    """The value of one series (its full name with labels, as written), or None."""
    m = re.search(r"^" + re.escape(series) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def poll(fn, ok, timeout=10.0):
    """Call fn until ok(result); return the last result."""
    deadline = time.time() + timeout
    while True:
        r = fn()
        if ok(r) or time.time() > deadline:
            return r
        time.sleep(0.05)


def promtool_check(test, prom_text, om_text, tmpdir):
    """promtool validates both: `check metrics` (parse and lint) the Prometheus text, and
    its OpenMetrics parser (tsdb create-blocks-from openmetrics, which wants a timestamp on
    each sample) the OpenMetrics text."""
    p = subprocess.run(["promtool", "check", "metrics"], input=prom_text, text=True,
                       capture_output=True, timeout=60)
    test.assertEqual(p.returncode, 0, "promtool check metrics:\n" + p.stdout + p.stderr)
    test.assertTrue(om_text.endswith("# EOF\n"))
    for m in re.finditer(r"^# TYPE (\S+) counter$", om_text, re.M):
        test.assertFalse(m.group(1).endswith("_total"), m.group(0))
    stamped = "".join(l if l.startswith("#") or not l.strip() else l.rstrip("\n") + " 1700000000\n"
                      for l in om_text.splitlines(keepends=True))
    path = os.path.join(tmpdir, "om.txt")
    with open(path, "w") as f:
        f.write(stamped)
    p = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", path,
                        os.path.join(tmpdir, "blocks")], capture_output=True, text=True,
                       timeout=60)
    test.assertEqual(p.returncode, 0, "promtool's OpenMetrics parser:\n" + p.stdout + p.stderr)


def send_chunks(port, n):
    """n chunks on one connection, each echoed before the next goes: one read each."""
    with connect(f"127.0.0.1:{port}") as s:
        for i in range(n):
            msg = b"chunk-%04d" % i
            s.sendall(msg)
            if recv_exact(s, len(msg)) != msg:
                raise AssertionError("echo lost")


class UnixServer:
    """A Unix socket this test serves: "garbage" answers text that is not Prometheus's,
    "slow" accepts and never answers."""

    def __init__(self, path, mode):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.mode = mode
        self.held = []
        self.stopping = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "slow":
                self.held.append(c)
                continue
            c.recv(4096)
            c.sendall(b"HTTP/1.0 200 OK\r\n\r\n<html>not metrics</html>\n")
            c.close()

    def stop(self):
        self.stopping = True
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.held:
            c.close()


class MetricsTest(SpokeCase):
    def spoked(self, plugins, extra=None, **kw):
        self.mport = free_port()
        ex = {"metrics": {"listen": f"127.0.0.1:{self.mport}", "merge_period": "200ms"}}
        for k, v in (extra or {}).items():
            ex.setdefault(k, {}).update(v)
        return Spoked(self.dir, self.echo.address, plugins=plugins, extra=ex, **kw)

    def metrics_plugin(self, **config):
        sock = os.path.join(self.dir, "t-metrics.sock")
        return {"name": "t-metrics", "file": test_plugin("t_metrics"), "metrics_socket": sock,
                "config": dict({"socket": sock}, **config)}

    def test_hook_calls_plugin_metrics_merger_and_formats(self):
        with self.spoked([self.metrics_plugin()]) as sp:
            sp.wait_log(r"plugin t-metrics: metric_register: 'bad-name' is not a Prometheus "
                        r"metric name")
            send_chunks(sp.port, 25)
            _, text = poll(lambda: scrape(self.mport),
                           lambda r: value(r[1], 't_own_requests_total{plugin="t-metrics",'
                                                 'kind="scrape"}'))
            self.assertEqual(value(text, "spoke_connections_total"), 1)
            calls = 'spoke_plugin_hook_calls_total{plugin="t-metrics",hook="on_traffic_from_client"}'
            self.assertEqual(value(text, calls), 25)
            self.assertEqual(value(text, 'spoke_plugin_hook_calls_total{plugin="t-metrics",'
                                   'hook="on_open"}'), 1)
            self.assertEqual(value(text, 'spoke_plugin_hook_calls_total{plugin="t-metrics",'
                                   'hook="init"}'), 1)
            self.assertEqual(value(text, 't_chunks_total{plugin="t-metrics",dir="in"}'), 25)
            self.assertEqual(value(text, 't_chunk_bytes_bucket{plugin="t-metrics",le="16"}'), 25)
            self.assertEqual(value(text, 't_chunk_bytes_sum{plugin="t-metrics"}'), 250)
            self.assertEqual(value(text, 't_open_conns{plugin="t-metrics"}'), 0)
            self.assertEqual(value(text, 'spoke_bytes_total{from="client"}'), 250)
            self.assertEqual(value(text, 'spoke_bytes_total{from="server"}'), 250)
            # The latency histogram samples 1 in metrics.hook_sample calls: its count is at most the calls.
            timed = value(text, 'spoke_plugin_hook_duration_seconds_count{plugin="t-metrics",'
                                'hook="on_traffic_from_client"}')
            self.assertIsNotNone(timed)
            self.assertLessEqual(timed, 25)
            # merged from the plugin's own socket, with its name, its timestamp dropped
            self.assertRegex(text, r'\nt_own_requests_total\{plugin="t-metrics",kind="scrape"\} '
                                   r'[1-9]\d*\n')
            self.assertGreater(value(text, 'spoke_metrics_merge_scrapes_total{plugin="t-metrics",'
                                     'result="ok"}'), 0)
            ctype, om = scrape(self.mport, OPENMETRICS)
            self.assertTrue(ctype.startswith("application/openmetrics-text; version=1.0.0"), ctype)
            self.assertIn("\n# TYPE t_chunks counter\nt_chunks_total{", om)
            ctype, prom = scrape(self.mport)
            self.assertTrue(ctype.startswith("text/plain; version=0.0.4"), ctype)
            promtool_check(self, prom, om, self.dir)

    def test_counter_survives_kill_9(self):
        with self.spoked([self.metrics_plugin()], env=CRASH_ENV) as sp:
            send_chunks(sp.port, 10)
            (pid,) = sp.worker_pids()
            os.kill(pid, signal.SIGKILL)
            sp.wait_log(r"restarting worker 0")
            poll(lambda: sp.worker_pids(), lambda p: p and p != [pid])
            sp.wait_log(r"plugin t-metrics 1\.0\.0 loaded", timeout=10)
            deadline = time.time() + 10
            while True:  # the restarted worker accepts once it is ready
                try:
                    send_chunks(sp.port, 7)
                    break
                except (AssertionError, OSError):
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
            _, text = poll(lambda: scrape(self.mport),
                           lambda r: value(r[1], 't_chunks_total{plugin="t-metrics",dir="in"}') == 17)
            self.assertEqual(value(text, 't_chunks_total{plugin="t-metrics",dir="in"}'), 17)
            self.assertEqual(value(text, 'spoke_plugin_hook_calls_total{plugin="t-metrics",'
                                   'hook="on_traffic_from_client"}'), 17)
            self.assertEqual(value(text, 'spoke_plugin_hook_calls_total{plugin="t-metrics",'
                                   'hook="init"}'), 2)
            self.assertEqual(value(text, 't_chunk_bytes_count{plugin="t-metrics"}'), 17)
            self.assertGreaterEqual(value(text, "spoke_worker_restarts_total"), 1)
            # stored as they change: the killed worker's connection and bytes are kept
            self.assertEqual(value(text, "spoke_connections_total"), 2)
            self.assertEqual(value(text, 'spoke_bytes_total{from="client"}'), 170)

    def test_quarantine_metric(self):
        plugins = [{"file": test_plugin("t_crash")}, {"file": "passthrough.so"}]
        with self.spoked(plugins, extra={"plugins": {"crash_limit": 1}}, env=CRASH_ENV) as sp:
            _, text = scrape(self.mport)
            self.assertNotIn('spoke_plugin_quarantined{plugin="t-crash"} 1', text)
            self.assertEqual(value(text, "spoke_quarantines_total"), 0)
            with connect(f"127.0.0.1:{sp.port}") as s:
                s.sendall(b"CRASH")
                try:
                    recv_all(s)
                except ConnectionResetError:
                    pass
            sp.wait_log(r"plugin t-crash quarantined")
            _, text = poll(lambda: scrape(self.mport),
                           lambda r: value(r[1], 'spoke_plugin_quarantined{plugin="t-crash"}') == 1)
            self.assertEqual(value(text, 'spoke_plugin_quarantined{plugin="t-crash"}'), 1)
            self.assertEqual(value(text, 'spoke_plugin_crashes_total{plugin="t-crash"}'), 1)
            self.assertEqual(value(text, "spoke_quarantines_total"), 1)

    def test_merger_skips_slow_gone_and_garbage_sockets(self):
        slow = UnixServer(os.path.join(self.dir, "slow.sock"), "slow")
        garbage = UnixServer(os.path.join(self.dir, "garbage.sock"), "garbage")
        plugins = [self.metrics_plugin()]
        for name in ("m-slow", "m-garbage", "m-gone"):
            plugins.append({"name": name, "file": test_plugin("t_metrics"),
                            "metrics_socket": os.path.join(self.dir, name[2:] + ".sock"),
                            "config": {"register": "false"}})
        try:
            with self.spoked(plugins) as sp:
                def done(r):
                    t = r[1]
                    return all((value(t, f'spoke_metrics_merge_scrapes_total{{plugin="m-{n}",'
                                         f'result="{n}"}}') or 0) >= 2
                               for n in ("slow", "garbage", "gone"))
                _, text = poll(lambda: scrape(self.mport), done, timeout=20)
                self.assertTrue(done((None, text)), text)
                for n in ("slow", "garbage", "gone"):
                    self.assertEqual(value(text, f'spoke_metrics_merge_scrapes_total{{plugin="m-{n}",'
                                           f'result="ok"}}'), 0)
                # the good socket is merged all the same, and nothing of the bad ones
                self.assertRegex(text, r'\nt_own_requests_total\{plugin="t-metrics",'
                                       r'kind="scrape"\} [1-9]')
                self.assertNotIn("not metrics", text)
                self.assertNotIn("html", text)
                sp.wait_log(r"metrics merger: plugin m-garbage: garbage .*garbage\.sock: line 1: ")
                sp.wait_log(r"metrics merger: plugin m-slow: slow ")
                sp.wait_log(r"metrics merger: plugin m-gone: gone .*No such file")
                _, om = scrape(self.mport, OPENMETRICS)
                promtool_check(self, text, om, self.dir)
        finally:
            slow.stop()
            garbage.stop()

    def test_merger_off(self):
        with self.spoked([self.metrics_plugin()], extra={"metrics": {"merger": False}}) as sp:
            sp.wait_log(r"generation 1 serving")
            time.sleep(0.5)  # several merge periods: nothing may be scraped
            _, text = scrape(self.mport)
            self.assertNotIn("t_own_requests_total", text)
            self.assertNotIn('spoke_metrics_merge_scrapes_total{plugin="t-metrics"', text)
            # the registered metrics are the host's own, not the merger's
            self.assertIn('t_chunks_total{plugin="t-metrics",dir="in"} 0', text)

    def test_slow_and_idle_clients_do_not_hold_the_supervisor(self):
        """200 idle connections and a slow-loris client on the metrics port; meanwhile
        `spoked status`, a reload and a worker restart work, and scrapes are answered.
        (Before, each connection held the loop for up to 100 ms in turn: 20 s for 200.)"""
        with self.spoked([{"file": "passthrough.so"}], env=CRASH_ENV) as sp:
            idle = [socket.create_connection(("127.0.0.1", self.mport)) for _ in range(200)]
            loris = socket.create_connection(("127.0.0.1", self.mport))
            stop = threading.Event()
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            sent = [0]

            def drip():  # one byte every 200 ms, the last two held back
                while sent[0] < len(request) - 2:
                    if stop.wait(0.2):
                        return
                    try:
                        loris.send(request[sent[0]:sent[0] + 1])
                    except OSError:
                        return
                    sent[0] += 1
            t = threading.Thread(target=drip, daemon=True)
            t.start()
            try:
                self.assertIn("generation 1 (serving)", sp.status())
                sp.send_signal(signal.SIGHUP)
                sp.wait_log(r"generation 2 serving", timeout=10)
                self.assertIn("generation 2 (serving)", sp.status())
                (pid,) = poll(lambda: sp.worker_pids(), lambda p: len(p) == 1)
                os.kill(pid, signal.SIGKILL)
                sp.wait_log(r"restarting worker 0", timeout=10)
                poll(lambda: sp.worker_pids(), lambda p: len(p) == 1 and p != [pid])
                self.assertEqual(poll(lambda: roundtrip(sp.port, b"after"),
                                      lambda r: r == b"after"), b"after")
                _, text = scrape(self.mport)
                self.assertGreaterEqual(value(text, "spoke_worker_restarts_total"), 1)
                # a partial request completes: the rest of it, then the answer
                stop.set()
                t.join(5)
                loris.sendall(request[sent[0]:])
                loris.settimeout(10)
                got = b""
                while b"spoke_generation" not in got:
                    d = loris.recv(65536)
                    if not d:
                        break
                    got += d
                self.assertTrue(got.startswith(b"HTTP/1.1 200"), got[:200])
            finally:
                stop.set()
                for s in idle:
                    s.close()
                loris.close()


class HubdMetricsTest(unittest.TestCase):
    def test_hubd_serves_both_formats(self):
        from spoketest import TempDir
        with TempDir() as d:
            mport = free_port()
            with Hubd(d, extra={"metrics": {"listen": f"127.0.0.1:{mport}"}}):
                _, prom = scrape(mport)
                self.assertIn("spoke_hub_batches_total 0", prom)
                _, om = scrape(mport, OPENMETRICS)
                self.assertIn("# TYPE spoke_hub_batches counter", om)
                promtool_check(self, prom, om, d)


if __name__ == "__main__":
    unittest.main()
