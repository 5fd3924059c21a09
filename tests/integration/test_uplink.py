"""The uplink through a real spoked, to a real gRPC server (python3-grpcio, grpcpeer.FakeHub).

The t-send test plugin queues payloads on client commands; spoked's supervisor runs the
uplink process, which drains the queue to the fake hub. Checked: the batch arrives intact
(bytes, correlation ID, metadata in order, content type, sequence, edge identity), what
the hub answers decides what leaves the queue (accepted and refused deleted, no receiver
kept and retried, failures retried with backoff), a slow hub makes the uplink time out
and retry without losing or duplicating a delivery, the bearer token is sent, heartbeats
carry the edge's queue and plugins, and a kill -9 of the uplink only costs a restart.
"""

import os
import re
import signal
import sys
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from grpcpeer import FakeHub, load_protos, make_pki, tls_server_credentials  # noqa: E402
from spoketest import EchoServer, Spoked, TempDir  # noqa: E402
from test_send_to_control import PLUGIN_ID, Client, queue_tool, t_send  # noqa: E402

PB = load_protos()


def pending(qdir):
    m = re.search(r"pending:\s+(\d+)", queue_tool("stat", qdir))
    return int(m.group(1))


class UplinkTest(unittest.TestCase):
    def setUp(self):
        self.tmpdir = TempDir()
        self.tmp = type("T", (), {"path": self.tmpdir.__enter__()})
        self.echo = EchoServer()
        self.hub = FakeHub(PB)
        self.sp = None
        self.client = None

    def tearDown(self):
        if self.sp is not None:
            if self.client is not None:
                self.client.close()
            self.sp.stop()
        self.hub.stop()
        self.echo.stop()
        self.tmpdir.__exit__(None, None, None)

    def start(self, heartbeat="200ms", batch_size=10, uplink=None, queue=None, plugins=None):
        up = {"url": self.hub.url, "heartbeat": heartbeat, "batch_size": batch_size}
        up.update(uplink or {})
        extra = {"uplink": up}
        if queue:
            extra["queue"] = dict(queue, path=os.path.join(self.tmp.path, "queue"))
        self.sp = Spoked(self.tmp.path, upstream=f"127.0.0.1:{self.echo.port}",
                         plugins=plugins or [t_send()], extra=extra)
        self.sp.wait_log(r"uplink started: pid (\d+)")
        self.qdir = os.path.join(self.tmp.path, "queue")
        self.client = Client(self.sp.port)

    def send(self, corr, text):
        rc, _ = self.client.cmd(f"SEND {corr} {text}")
        self.assertEqual(rc, 0)

    def wait_empty(self, timeout=10, left=0):
        deadline = time.time() + timeout
        while pending(self.qdir) != left and time.time() < deadline:
            time.sleep(0.05)
        self.assertEqual(pending(self.qdir), left)

    def uplink_pid(self):
        m = re.search(r"uplink: pid (\d+)", self.sp.status())
        return int(m.group(1)) if m else None

    def test_batch_arrives_intact_and_leaves_the_queue(self):
        self.start()
        for i in range(25):
            self.send(f"c{i}", f"payload {i}")
        self.client.cmd("JSON - {\"a\": [1, 2]}")
        self.hub.wait_for(lambda h: len(h.delivered) >= 26, what="26 deliveries")
        got = self.hub.delivered
        self.assertEqual([p.payload for p in got[:25]], [f"payload {i}".encode() for i in range(25)])
        self.assertEqual([p.correlation_id for p in got[:25]], [f"c{i}" for i in range(25)])
        seqs = [p.sequence for p in got]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(len(set(seqs)), 26)
        for p in got:
            self.assertEqual(p.plugin_id, PLUGIN_ID)
            self.assertEqual(p.edge_id, "edge-test")
            self.assertGreater(p.edge_timestamp_ms, 0)
        self.assertEqual([(kv.key, kv.value) for kv in got[0].metadata][0], ("kind", "t-send"))
        self.assertEqual(got[25].content_type, "application/json")
        self.assertEqual(got[25].payload, b'{"a": [1, 2]}')
        b = self.hub.batches[0]
        self.assertEqual((b.edge_id, b.edge_namespace), ("edge-test", "test"))
        self.assertTrue(all(len(b.payloads) <= 10 for b in self.hub.batches))
        self.wait_empty()
        st = self.sp.status()
        self.assertRegex(st, r"payloads accepted 26\b")
        self.assertRegex(st, r"last status OK")

    def test_full_batch_goes_before_the_heartbeat(self):
        self.start(heartbeat="1h", batch_size=5)
        self.hub.wait_for(lambda h: len(h.heartbeats) >= 1, what="the first heartbeat")
        t0 = time.time()
        for i in range(5):
            self.send("-", f"x{i}")
        self.hub.wait_for(lambda h: len(h.delivered) >= 5, timeout=5, what="a full batch")
        self.assertLess(time.time() - t0, 5)

    def test_refused_payloads_are_deleted_and_counted(self):
        self.hub.refuse = {"bad"}
        self.start()
        self.send("bad", "no good")
        self.send("ok", "fine")
        self.hub.wait_for(lambda h: len(h.delivered) >= 1, what="the good payload")
        self.wait_empty()
        self.assertEqual([p.correlation_id for p in self.hub.delivered], ["ok"])
        self.assertRegex(self.sp.status(), r"refused 1\b")
        self.assertIn("hubd refused payload", self.sp.log())

    def test_no_receiver_stays_queued_until_a_receiver_appears(self):
        self.hub.receivers = {1}  # not t-send's ID
        self.start()
        for i in range(3):
            self.send(f"n{i}", "early")
        self.hub.wait_for(lambda h: len(h.batches) >= 1, what="a batch")
        time.sleep(0.5)
        self.assertEqual(pending(self.qdir), 3)
        self.assertEqual(self.hub.delivered, [])
        self.assertRegex(self.sp.status(), r"plugins waiting for a receiver 1")
        self.hub.receivers = None  # the control plugin is deployed
        # Parked plugins are retried every 10 heartbeats (2 s here).
        self.hub.wait_for(lambda h: len(h.delivered) >= 3, timeout=15, what="late delivery")
        self.assertEqual([p.correlation_id for p in self.hub.delivered], ["n0", "n1", "n2"])

    def test_parked_payloads_do_not_block_the_others(self):
        # A second plugin (4243) queues one payload at init, before any of t-send's; the hub
        # has no receiver for it. With batches of one, it is the oldest record at every
        # read: the others must still go, in order.
        other = t_send({"init_send": "for a plugin not deployed yet"})
        other.update(name="t-other", id=4243)
        self.hub.receivers = {PLUGIN_ID}
        self.start(batch_size=1, plugins=[t_send(), other])
        for i in range(3):
            self.send(f"h{i}", "behind a parked one")
        self.hub.wait_for(lambda h: len(h.delivered) >= 3, what="the unparked payloads")
        self.assertEqual([p.correlation_id for p in self.hub.delivered], ["h0", "h1", "h2"])
        # (the hub records a batch before it answers: the last ack may still be on its way)
        self.wait_empty(left=1)
        self.hub.receivers = None
        self.hub.wait_for(lambda h: len(h.delivered) >= 4, timeout=15, what="the parked one")
        self.assertEqual(self.hub.delivered[3].plugin_id, 4243)
        self.wait_empty()

    def test_errors_are_retried_with_backoff(self):
        self.hub.fail = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                         grpc.StatusCode.UNAUTHENTICATED]
        self.start()
        for i in range(4):
            self.send(f"r{i}", "retry me")
        self.hub.wait_for(lambda h: len(h.delivered) >= 4, timeout=15, what="delivery")
        self.assertEqual(len(self.hub.delivered), 4)
        self.assertGreaterEqual(len(self.hub.batches), 4)
        self.assertRegex(self.sp.status(), r"failed \(retried\) 3\b")

    def test_slow_hub_times_out_and_nothing_is_lost_or_doubled(self):
        self.hub.delay = 1.0  # longer than the call's deadline
        self.start(uplink={"timeout": "300ms"})
        for i in range(3):
            self.send(f"s{i}", "slow")
        self.hub.wait_for(lambda h: len(h.batches) >= 2, what="a retry")
        self.hub.delay = 0
        self.hub.wait_for(lambda h: len(h.delivered) >= 3, timeout=15,
                          what="delivery after the slow spell")
        self.wait_empty()
        self.assertEqual(sorted(p.correlation_id for p in self.hub.delivered), ["s0", "s1", "s2"])
        self.assertIn("DEADLINE_EXCEEDED", self.sp.log())

    def test_hub_down_then_up(self):
        port = self.hub.port
        self.hub.stop()
        self.start()
        for i in range(5):
            self.send(f"d{i}", "while down")
        time.sleep(1.0)
        self.assertEqual(pending(self.qdir), 5)
        self.hub = FakeHub(PB, port=port)
        self.hub.wait_for(lambda h: len(h.delivered) >= 5, timeout=20, what="delivery")
        self.assertEqual([p.correlation_id for p in self.hub.delivered],
                         [f"d{i}" for i in range(5)])

    def test_payloads_past_retention_expire(self):
        port = self.hub.port
        self.hub.stop()
        self.start(queue={"retention": "1s"})
        self.send("old", "too late")
        self.sp.wait_log(r"1 payloads were older than queue.retention", timeout=10)
        self.assertEqual(pending(self.qdir), 0)
        self.assertRegex(queue_tool("stat", self.qdir), r"expired:\s+1\b")
        self.hub = FakeHub(PB, port=port)
        self.send("new", "in time")
        self.hub.wait_for(lambda h: len(h.delivered) >= 1, what="the young payload")
        self.assertEqual([p.correlation_id for p in self.hub.delivered], ["new"])

    def test_token_heartbeat_and_kill_9(self):
        tok = os.path.join(self.tmp.path, "token")
        with open(tok, "w") as f:
            f.write("s3cret\n")
        os.chmod(tok, 0o600)
        self.start(uplink={"token_file": tok})
        self.send("t0", "with token")
        self.hub.wait_for(lambda h: len(h.delivered) >= 1 and len(h.heartbeats) >= 1,
                          what="delivery and heartbeat")
        self.assertEqual(self.hub.metadata.get("authorization"), "Bearer s3cret")
        hb = self.hub.heartbeats[-1]
        self.assertEqual((hb.edge_id, hb.edge_namespace), ("edge-test", "test"))
        self.assertTrue(hb.spoke_version)
        self.hub.wait_for(lambda h: any(p.id == PLUGIN_ID for p in h.heartbeats[-1].plugins),
                          what="a heartbeat listing t-send")
        ps = [p for p in self.hub.heartbeats[-1].plugins if p.id == PLUGIN_ID][0]
        self.assertEqual((ps.name, ps.state), ("t-send", PB.control.PluginStatus.ACTIVE))

        pid = self.uplink_pid()
        os.kill(pid, signal.SIGKILL)
        self.sp.wait_log(r"uplink \(pid %d\) killed by signal 9" % pid)
        self.send("t1", "after the kill")
        self.hub.wait_for(lambda h: len(h.delivered) >= 2, what="delivery after the restart")
        self.assertNotEqual(self.uplink_pid(), pid)
        self.assertRegex(self.sp.status(), r"payloads accepted 2\b")  # counters survive

    def test_mutual_tls(self):
        d = self.tmp.path
        make_pki(d)
        self.hub.stop()
        self.hub = FakeHub(PB, creds=tls_server_credentials(d))
        self.start(uplink={"ca": f"{d}/ca.pem", "cert": f"{d}/client.pem",
                           "key": f"{d}/client.key"})
        for i in range(3):
            self.send(f"m{i}", "over mTLS")
        self.hub.wait_for(lambda h: len(h.delivered) >= 3, what="delivery over mTLS")
        self.wait_empty()

    def test_token_file_readable_by_others_is_refused(self):
        tok = os.path.join(self.tmp.path, "token")
        with open(tok, "w") as f:
            f.write("s3cret\n")
        os.chmod(tok, 0o644)
        self.start(uplink={"token_file": tok})
        self.sp.wait_log(r"readable by group or others")


if __name__ == "__main__":
    unittest.main(verbosity=2)
