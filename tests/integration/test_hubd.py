"""hubd against a real gRPC client (Debian's python3-grpcio, stubs generated at test time from
the project's .proto): every outcome of a batch (accepted, duplicate, no receiver, refused
with its code), routing (handled = 0 passes on in config order, an error is logged and not
retried), the health check, unknown methods, bad requests (garbage protobuf, a message over
limits.max_message, a missing edge ID), authentication (tokens: UNAUTHENTICATED and
PERMISSION_DENIED; client certificates), the edge registry in `hubd status`, and a crash in
accept_edge_payload (blamed, the worker restarted, the plugin quarantined)."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from grpcpeer import BATCH, HEALTH, HEARTBEAT, load_protos, make_pki, stub  # noqa: E402
from spoketest import CRASH_ENV, Hubd, TempDir, spoke_bin, test_plugin  # noqa: E402

PB = load_protos()
C = PB.control
OUT = C.PayloadResult
ID = 100


def t_control(name="t-control", pid=ID, config=None):
    p = {"name": name, "id": pid, "file": test_plugin("t_control")}
    if config:
        p["config"] = config
    return p


def batch(edge="edge-1", payloads=(), ns="test"):
    req = C.SendPluginControlBatchRequest(edge_id=edge, edge_namespace=ns)
    for p in payloads:
        req.payloads.add(**p)
    return req


def pl(seq, corr="ok", plugin=ID, payload=b"data", **kw):
    return dict(plugin_id=plugin, sequence=seq, correlation_id=corr, payload=payload,
                edge_timestamp_ms=int(time.time() * 1000), **kw)


class HubCase(unittest.TestCase):
    plugins = (t_control(),)
    extra = None
    workers = 1
    env = None

    def setUp(self):
        self.tmpdir = TempDir()
        self.tmp = self.tmpdir.__enter__()
        self.prepare()
        self.hub = Hubd(self.tmp, plugins=self.plugins, extra=self.extra, workers=self.workers,
                        env=self.env)
        self.channel = self.open_channel()

    def prepare(self):
        pass

    def open_channel(self):
        return grpc.insecure_channel(f"127.0.0.1:{self.hub.port}")

    def tearDown(self):
        self.channel.close()
        self.hub.stop()
        self.tmpdir.__exit__(None, None, None)

    def send(self, req, metadata=None):
        return stub(self.channel, PB, BATCH)(req, timeout=10, metadata=metadata)

    def outcomes(self, resp):
        return [(r.sequence, r.outcome) for r in resp.results]


class OutcomesTest(HubCase):
    plugins = (t_control(), t_control("t-other", 200, {"catch_all": "true"}))

    def test_accepted_then_duplicate(self):
        r = self.send(batch(payloads=[pl(1), pl(2, payload=b"x" * 1000)]))
        self.assertEqual(self.outcomes(r), [(1, OUT.ACCEPTED), (2, OUT.ACCEPTED)])
        self.assertEqual(r.accepted, 2)
        self.assertGreater(r.hub_time_ms, 0)
        self.hub.wait_log(r"t-control: got edge edge-1 seq 1 corr ok bytes 4 plugin 100")
        r = self.send(batch(payloads=[pl(2), pl(3)]))
        self.assertEqual(self.outcomes(r), [(2, OUT.DUPLICATE), (3, OUT.ACCEPTED)])
        self.assertEqual(r.accepted, 2)
        # Another edge's sequence 1 is its own.
        r = self.send(batch(edge="edge-2", payloads=[pl(1)]))
        self.assertEqual(self.outcomes(r), [(1, OUT.ACCEPTED)])
        self.assertEqual(len(re.findall(r"got edge edge-1 seq 2 ", self.hub.log())), 1)

    def test_no_receiver_is_not_marked(self):
        r = self.send(batch(payloads=[pl(1, plugin=999)]))
        self.assertEqual(self.outcomes(r), [(1, OUT.NO_RECEIVER)])
        r = self.send(batch(payloads=[pl(1, plugin=999)]))
        self.assertEqual(self.outcomes(r), [(1, OUT.NO_RECEIVER)])

    def test_refusals_name_the_limit(self):
        big = b"x" * (1024 * 1024 + 1)
        md51 = [C.KeyValue(key=f"k{i}", value="v") for i in range(51)]
        r = self.send(batch(payloads=[
            pl(1, payload=big), pl(2, metadata=md51), pl(3, plugin=0),
            pl(4, corr="c" * 257), pl(5, metadata=[C.KeyValue(key="k" * 257, value="v")]),
            pl(6, payload=b"y" * (1024 * 1024)), pl(7, metadata=md51[:50])]))
        res = r.results
        self.assertEqual([x.outcome for x in res[:5]], [OUT.REFUSED] * 5)
        self.assertEqual([x.code for x in res[:5]],
                         ["payload_too_large", "too_many_metadata", "malformed",
                          "correlation_id_too_long", "metadata_key_too_long"])
        self.assertTrue(all(x.reason for x in res[:5]))
        self.assertEqual([x.outcome for x in res[5:]], [OUT.ACCEPTED] * 2)  # at the limits

    def test_pass_on_and_errors(self):
        r = self.send(batch(payloads=[pl(1, corr="pass-1"), pl(2, corr="fail-1")]))
        self.assertEqual(self.outcomes(r), [(1, OUT.ACCEPTED), (2, OUT.ACCEPTED)])
        self.hub.wait_log(r"t-other: got edge edge-1 seq 1 corr pass-1 bytes 4 plugin 100")
        self.hub.wait_log(r"plugin t-control: accept_edge_payload failed .* edge edge-1 "
                          r"sequence 2 correlation 'fail-1'")
        self.assertRegex(self.hub.status(), r"plugin errors 1")
        r = self.send(batch(payloads=[pl(2, corr="fail-1")]))
        self.assertEqual(self.outcomes(r), [(2, OUT.DUPLICATE)])  # never retried

    def test_metadata_order_reaches_the_plugin(self):
        md = [C.KeyValue(key=k, value=v) for k, v in (("z", "1"), ("a", "2"), ("m", "3"))]
        self.send(batch(payloads=[pl(1, metadata=md)]))
        self.hub.wait_log(r"md z=1,a=2,m=3")

    def test_health_unknown_methods_and_bad_requests(self):
        h = stub(self.channel, PB, HEALTH)
        self.assertEqual(h(PB.health.HealthCheckRequest(), timeout=5).status,
                         PB.health.HealthCheckResponse.SERVING)
        self.assertEqual(h(PB.health.HealthCheckRequest(service="spoke.control.v1.EdgeControl"),
                           timeout=5).status, PB.health.HealthCheckResponse.SERVING)
        with self.assertRaises(grpc.RpcError) as e:
            h(PB.health.HealthCheckRequest(service="nope"), timeout=5)
        self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)
        raw = self.channel.unary_unary("/spoke.control.v1.EdgeControl/Nope")
        with self.assertRaises(grpc.RpcError) as e:
            raw(b"", timeout=5)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        raw = self.channel.unary_unary(BATCH)
        with self.assertRaises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(grpc.RpcError) as e:
            self.send(batch(edge=""))
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        # Over limits.max_message (16 MiB by default): 17 payloads of 1 MiB.
        with self.assertRaises(grpc.RpcError) as e:
            self.send(batch(payloads=[pl(i, payload=b"z" * (1 << 20)) for i in range(1, 18)]))
        self.assertEqual(e.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        # Still serving.
        self.assertEqual(self.outcomes(self.send(batch(payloads=[pl(50)]))), [(50, OUT.ACCEPTED)])

    def test_heartbeat_and_status(self):
        hb = stub(self.channel, PB, HEARTBEAT)
        req = C.HeartbeatRequest(edge_id="edge-7", edge_namespace="prod", spoke_version="9.9",
                                 queue_depth=12, queue_oldest_age_ms=3400)
        req.plugins.add(id=5, name="cache-stats", version="1.0.0", state=C.PluginStatus.ACTIVE)
        req.plugins.add(id=6, name="bad", version="0.1", state=C.PluginStatus.QUARANTINED)
        r = hb(req, timeout=5)
        self.assertGreater(r.hub_time_ms, 0)
        self.send(batch(edge="edge-7", payloads=[pl(1), pl(2, plugin=999)]))
        st = self.hub.status()
        self.assertRegex(st, r"edge-7  namespace prod  spoke 9.9  last heartbeat [\d.]+ s ago  "
                             r"queue 12 \(oldest 3.4 s\)")
        self.assertRegex(st, r"batches 1  delivered 1  duplicates 0  no receiver 1")
        self.assertRegex(st, r"plugin cache-stats\s+id 5\s+1.0.0\s+active")
        self.assertRegex(st, r"plugin bad\s+id 6\s+0.1\s+quarantined")


class ReloadAndConfigTest(HubCase):
    def test_reload_adds_a_control_plugin(self):
        r = self.send(batch(payloads=[pl(1, plugin=300)]))
        self.assertEqual(self.outcomes(r), [(1, OUT.NO_RECEIVER)])
        cfg = dict(self.hub.config)
        cfg["plugins"] = dict(cfg["plugins"], list=[t_control(), t_control("t-new", 300)])
        self.hub.write_config(cfg)
        self.hub.send_signal(signal.SIGHUP)
        self.hub.wait_log(r"generation 2 serving")
        r = self.send(batch(payloads=[pl(1, plugin=300)]))
        self.assertEqual(self.outcomes(r), [(1, OUT.ACCEPTED)])
        self.hub.wait_log(r"t-new: got edge edge-1 seq 1")

    def test_config_refusals(self):
        def check(text):
            path = os.path.join(self.tmp, "bad.yaml")
            with open(path, "w") as f:
                f.write(text)
            p = subprocess.run([spoke_bin("hubd"), "--check-config", path],
                                             capture_output=True, text=True, timeout=10)
            return p.returncode, p.stderr
        code, err = check("hub: { listen: 0.0.0.0:7443 }\n")
        self.assertEqual(code, 1)
        self.assertIn("bad.yaml:1: hub.listen: 0.0.0.0:7443 is reachable from other machines but "
                      "no edge is authenticated", err)
        code, err = check("tls: { cert: /x.pem }\n")
        self.assertIn("tls.cert: TLS needs both tls.cert and tls.key", err)
        code, err = check("listen: { upstream: 127.0.0.1:1 }\n")
        self.assertIn("listen: unknown section (known: hub, tls, auth, limits, plugins, metrics, "
                      "log; and the keys run_dir, user, group)", err)
        code, err = check("limits: { max_message: 1MiB }\n")
        self.assertIn("limits.max_message", err)


class MetricsTest(HubCase):
    def prepare(self):
        from spoketest import free_port
        self.mport = free_port()
        self.extra = {"metrics": {"listen": f"127.0.0.1:{self.mport}"}}

    def test_metrics(self):
        import urllib.request
        self.send(batch(payloads=[pl(1), pl(2), pl(3, plugin=999)]))
        self.send(batch(payloads=[pl(2)]))
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.mport}/metrics", timeout=5).read()
        text = text.decode()
        for line in ('spoke_hub_batches_total 2', 'spoke_hub_payloads_total{outcome="accepted"} 2',
                     'spoke_hub_payloads_total{outcome="duplicate"} 1',
                     'spoke_hub_payloads_total{outcome="no_receiver"} 1', 'spoke_hub_edges 1'):
            self.assertIn(line + "\n", text)
        self.assertNotIn("spoke_queue_", text)  # the edge's metrics are not hubd's
        # A worker killed: its counts stay in the totals.
        os.kill(self.hub.worker_pids()[0], signal.SIGKILL)
        self.hub.wait_log(r"restarting worker 0")
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.mport}/metrics", timeout=5).read()
        self.assertIn('spoke_hub_payloads_total{outcome="accepted"} 2\n', text.decode())


TOKEN = "s3cret-edge-1"


class TokenAuthTest(HubCase):
    def prepare(self):
        path = os.path.join(self.tmp, "tokens")
        with open(path, "w") as f:
            f.write(f"# edges\nedge-1 {hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
        os.chmod(path, 0o600)
        self.extra = {"auth": {"token_file": path}}

    def test_tokens(self):
        md = (("authorization", f"Bearer {TOKEN}"),)
        r = self.send(batch(payloads=[pl(1)]), metadata=md)
        self.assertEqual(self.outcomes(r), [(1, OUT.ACCEPTED)])
        for meta, edge, code in ((None, "edge-1", grpc.StatusCode.UNAUTHENTICATED),
                                 ((("authorization", "Bearer nope"),), "edge-1",
                                  grpc.StatusCode.UNAUTHENTICATED),
                                 (md, "edge-2", grpc.StatusCode.PERMISSION_DENIED)):
            with self.assertRaises(grpc.RpcError) as e:
                self.send(batch(edge=edge, payloads=[pl(2)]), metadata=meta)
            self.assertEqual(e.exception.code(), code)
        # A payload stamped with another edge's ID inside edge-1's batch is refused.
        r = self.send(batch(payloads=[pl(3, edge_id="edge-2")]), metadata=md)
        self.assertEqual([x.code for x in r.results], ["edge_mismatch"])
        self.assertRegex(self.hub.status(), r"auth failures 3")


class CertAuthTest(HubCase):
    def prepare(self):
        make_pki(self.tmp, client_names=("edge-1",))
        f = lambda n: os.path.join(self.tmp, n)  # noqa: E731
        self.extra = {"tls": {"cert": f("server.pem"), "key": f("server.key"),
                              "client_ca": f("ca.pem")}}

    def open_channel(self):
        def read(n):
            with open(os.path.join(self.tmp, n), "rb") as fh:
                return fh.read()
        creds = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
        return grpc.secure_channel(f"127.0.0.1:{self.hub.port}", creds)

    def test_certificate_names_the_edge(self):
        r = self.send(batch(payloads=[pl(1)]))
        self.assertEqual(self.outcomes(r), [(1, OUT.ACCEPTED)])
        with self.assertRaises(grpc.RpcError) as e:
            self.send(batch(edge="edge-2", payloads=[pl(1)]))
        self.assertEqual(e.exception.code(), grpc.StatusCode.PERMISSION_DENIED)


class CrashTest(HubCase):
    extra = {"plugins": {"crash_limit": 2, "crash_window": "1m"}}
    env = CRASH_ENV

    def test_crash_in_accept_is_blamed_and_quarantined(self):
        for i in (1, 2):
            with self.assertRaises(grpc.RpcError) as e:
                self.send(batch(payloads=[pl(i, corr="crash")]))
            self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
            self.hub.wait_log(r"crashed: plugin t-control, SIGSEGV in accept_edge_payload")
        self.hub.wait_log(r"quarantin")
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                r = self.send(batch(payloads=[pl(1, corr="crash")]))
                break
            except grpc.RpcError:
                time.sleep(0.2)
        # The quarantined plugin is gone: its payloads wait at the edge (no receiver), and
        # nothing was marked by the crashed deliveries.
        self.assertEqual(self.outcomes(r), [(1, OUT.NO_RECEIVER)])
        self.assertRegex(self.hub.status(), r"t-control\s+quarantined")


if __name__ == "__main__":
    unittest.main(verbosity=2)
