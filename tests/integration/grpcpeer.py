"""grpcpeer -- a real gRPC peer for spoke's tests: Debian's python3-grpcio, with message
classes generated at test time from the project's own .proto files (protoc --python_out,
Debian's protobuf-compiler), so a field that the C side and the .proto disagree on shows.

    pb = load_protos()                 # pb.control: control_pb2, pb.health: health_pb2
    hub = FakeHub(pb)                  # an EdgeControl server, in this process
    hub.receivers = {4242}             # plugin IDs with a control plugin
    ... run spoked with uplink.url = hub.url ...
    hub.wait_for(lambda h: len(h.delivered) >= 10)

Run with Debian's /usr/bin/python3.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc

SOURCE_DIR = os.environ.get("SPOKE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "../.."))
PROTO_ROOT = os.path.join(SOURCE_DIR, "transport/proto")
GRPC_PROTO_ROOT = "/usr/share/grpc-proto"

_protos = None


class Protos:
    def __init__(self, control, health):
        self.control = control
        self.health = health


def load_protos():
    """Generate and import control_pb2 and health_pb2 (once per process)."""
    global _protos
    if _protos is not None:
        return _protos
    out = tempfile.mkdtemp(prefix="spoke-pb-")
    subprocess.run(["protoc", f"--proto_path={PROTO_ROOT}", f"--python_out={out}",
                    "spoke/control/v1/control.proto"], check=True)
    subprocess.run(["protoc", f"--proto_path={GRPC_PROTO_ROOT}", f"--python_out={out}",
                    "grpc/health/v1/health.proto"], check=True)
    sys.path.insert(0, out)
    control = importlib.import_module("spoke.control.v1.control_pb2")
    # grpc.health.v1's module path would shadow the grpc library: load it by file.
    spec = importlib.util.spec_from_file_location(
        "spoke_test_health_pb2", os.path.join(out, "grpc/health/v1/health_pb2.py"))
    health = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(health)
    _protos = Protos(control, health)
    return _protos


BATCH = "/spoke.control.v1.EdgeControl/SendPluginControlBatch"
HEARTBEAT = "/spoke.control.v1.EdgeControl/Heartbeat"
HEALTH = "/grpc.health.v1.Health/Check"


def stub(channel, pb, method):
    """A unary callable for `method` ("/pkg.Service/Method") on `channel`."""
    c = pb.control
    types = {BATCH: (c.SendPluginControlBatchRequest, c.SendPluginControlBatchResponse),
             HEARTBEAT: (c.HeartbeatRequest, c.HeartbeatResponse),
             HEALTH: (pb.health.HealthCheckRequest, pb.health.HealthCheckResponse)}
    req, resp = types[method]
    return channel.unary_unary(method, request_serializer=req.SerializeToString,
                               response_deserializer=resp.FromString)


class FakeHub:
    """An EdgeControl server that behaves as the test says.

    receivers   plugin IDs that have a control plugin (others get NO_RECEIVER); None: all
    refuse      correlation IDs answered REFUSED (code "test_refused")
    fail        status codes to answer the next batch calls with, one per call
    delay       seconds each batch call sleeps before answering
    heartbeat_answer  (interval_ms, batch_size) the Heartbeat answers with

    delivered   EdgePayloads ACCEPTED, in arrival order; each (edge_id, sequence) once
    batches     every request decoded, in arrival order (retries included)
    heartbeats  every HeartbeatRequest
    metadata    the invocation metadata of the last call
    """

    def __init__(self, pb, port=None, creds=None):
        self.pb = pb
        self.lock = threading.Condition()
        self.receivers = None
        self.refuse = set()
        self.fail = []
        self.delay = 0.0
        self.heartbeat_answer = (0, 0)
        self.delivered = []
        self.seen = set()
        self.batches = []
        self.heartbeats = []
        self.metadata = {}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((self,))
        self.port = port or _free_port()
        if creds is None:
            self.server.add_insecure_port(f"127.0.0.1:{self.port}")
            self.url = f"http://127.0.0.1:{self.port}"
        else:
            self.server.add_secure_port(f"127.0.0.1:{self.port}", creds)
            self.url = f"https://127.0.0.1:{self.port}"
        self.server.start()

    def stop(self):
        self.server.stop(None)

    # grpc.GenericRpcHandler
    def service(self, details):
        c = self.pb.control
        if details.method == BATCH:
            return grpc.unary_unary_rpc_method_handler(
                self._batch, request_deserializer=c.SendPluginControlBatchRequest.FromString,
                response_serializer=c.SendPluginControlBatchResponse.SerializeToString)
        if details.method == HEARTBEAT:
            return grpc.unary_unary_rpc_method_handler(
                self._heartbeat, request_deserializer=c.HeartbeatRequest.FromString,
                response_serializer=c.HeartbeatResponse.SerializeToString)
        return None

    def _batch(self, req, ctx):
        c = self.pb.control
        with self.lock:
            self.metadata = dict(ctx.invocation_metadata())
            self.batches.append(req)
            fail = self.fail.pop(0) if self.fail else None
            delay = self.delay
            self.lock.notify_all()
        if delay:
            time.sleep(delay)
        if fail is not None:
            ctx.abort(fail, "test failure")
        resp = c.SendPluginControlBatchResponse(hub_time_ms=int(time.time() * 1000))
        with self.lock:
            for p in req.payloads:
                r = resp.results.add(sequence=p.sequence)
                key = (p.edge_id or req.edge_id, p.sequence)
                if p.correlation_id in self.refuse:
                    r.outcome = c.PayloadResult.REFUSED
                    r.code = "test_refused"
                    r.reason = "refused by the test"
                elif key in self.seen:
                    r.outcome = c.PayloadResult.DUPLICATE
                    resp.accepted += 1
                elif self.receivers is not None and p.plugin_id not in self.receivers:
                    r.outcome = c.PayloadResult.NO_RECEIVER
                else:
                    r.outcome = c.PayloadResult.ACCEPTED
                    resp.accepted += 1
                    self.seen.add(key)
                    self.delivered.append(p)
            self.lock.notify_all()
        return resp

    def _heartbeat(self, req, ctx):
        c = self.pb.control
        with self.lock:
            self.heartbeats.append(req)
            self.lock.notify_all()
            iv, bs = self.heartbeat_answer
        return c.HeartbeatResponse(hub_time_ms=int(time.time() * 1000),
                                   heartbeat_interval_ms=iv, batch_size=bs)

    def wait_for(self, pred, timeout=20.0, what="condition"):
        """Wait until pred(self) holds (checked under the hub's lock)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}: {len(self.batches)} "
                                         f"batches, {len(self.delivered)} delivered")
                self.lock.wait(min(left, 0.2))


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d, client_names=("edge-1",)):
    """In directory d: a CA (ca.pem, ca.key), a server certificate for 127.0.0.1 and
    localhost (server.pem, server.key) and a client certificate (client.pem, client.key)
    with CN "client" and DNS names `client_names`, made with the openssl CLI."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=spoke test CA",
             cwd=d)
    sans = ",".join(f"DNS:{n}" for n in client_names)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("client", f"subjectAltName={sans}")):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=d)
    for k in ("ca.key", "server.key", "client.key"):
        os.chmod(os.path.join(d, k), 0o600)


def tls_server_credentials(d, require_client_auth=True):
    """grpc server credentials from make_pki's files in d."""
    def read(name):
        with open(os.path.join(d, name), "rb") as f:
            return f.read()
    return grpc.ssl_server_credentials([(read("server.key"), read("server.pem"))],
                                       root_certificates=read("ca.pem"),
                                       require_client_auth=require_client_auth)
