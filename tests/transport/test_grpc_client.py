"""The uplink's gRPC client (transport/grpc_client.c) against a real gRPC server.

The server is Debian's python3-grpcio, in this process, with a generic handler (bytes in,
bytes out); the client is tests/transport/t_grpc_call, which drives grpc_client.c on a
libev loop and prints one line per finished call. Over h2c and over TLS (certificates made
with the openssl CLI), with mutual TLS and a bearer token.

Run with Debian's /usr/bin/python3; argv[1] is the path of t_grpc_call.
"""

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent import futures

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../integration"))
from grpcpeer import make_pki  # noqa: E402

T_GRPC_CALL = sys.argv.pop(1) if len(sys.argv) > 1 else "build/tests/transport/t_grpc_call"

CODES = {c.value[0]: c for c in grpc.StatusCode}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Handler(grpc.GenericRpcHandler):
    """/t.T/Echo echoes; /t.T/Status aborts with "code:message"; /t.T/Slow sleeps the
    seconds it is sent; /t.T/Meta answers the authorization header and whether a deadline
    came; /t.T/Big answers N bytes. Anything else: UNIMPLEMENTED (None)."""

    def __init__(self):
        self.calls = []
        self.peers = set()

    def service(self, details):
        name = details.method.rsplit("/", 1)[-1]
        if not details.method.startswith("/t.T/"):
            return None
        fn = getattr(self, "m_" + name, None)
        if fn is None:
            return None
        return grpc.unary_unary_rpc_method_handler(fn)

    def m_Echo(self, req, ctx):
        self.calls.append(req)
        self.peers.add(ctx.peer())
        return req

    def m_Status(self, req, ctx):
        code, msg = req.decode().split(":", 1)
        ctx.abort(CODES[int(code)], msg)

    def m_Slow(self, req, ctx):
        time.sleep(float(req.decode()))
        return b"late"

    def m_Meta(self, req, ctx):
        md = dict(ctx.invocation_metadata())
        remaining = ctx.time_remaining()
        return (f"auth={md.get('authorization', '')};deadline={remaining is not None and remaining < 100};"
                f"ua={md.get('user-agent', '')}").encode()

    def m_Big(self, req, ctx):
        return b"z" * int(req.decode())


def start_server(creds=None):
    handler = Handler()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 8 << 20),
                                  ("grpc.max_send_message_length", 32 << 20)])
    server.add_generic_rpc_handlers((handler,))
    port = free_port()
    if creds is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    return server, handler, port


LINE = re.compile(r"status=(\d+) http=(\d+) new_conn=(\d) len=(\d+) head=(\S*) message=(.*)")


def call(url, path, *args, timeout=30):
    out = subprocess.run([T_GRPC_CALL, url, path, *map(str, args)], capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"t_grpc_call failed ({out.returncode}): {out.stdout}{out.stderr}")
    calls = []
    conns = None
    for line in out.stdout.splitlines():
        m = LINE.match(line)
        if m:
            calls.append({"status": int(m[1]), "http": int(m[2]), "new_conn": m[3] == "1",
                          "len": int(m[4]), "head": bytes.fromhex(m[5]), "message": m[6]})
        elif line.startswith("connections="):
            conns = int(line.split()[0].split("=")[1])
    return calls, conns


class H2cTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server, cls.handler, port = start_server()
        cls.url = f"http://127.0.0.1:{port}"

    @classmethod
    def tearDownClass(cls):
        cls.server.stop(None)

    def test_echo(self):
        calls, _ = call(self.url, "/t.T/Echo", "--msg", "00ff10")
        self.assertEqual(calls[0]["status"], 0, calls)
        self.assertEqual(calls[0]["head"], b"\x00\xff\x10")
        self.assertEqual(calls[0]["http"], 200)
        self.assertIn(b"\x00\xff\x10", self.handler.calls)

    def test_empty_and_large_messages(self):
        calls, _ = call(self.url, "/t.T/Echo")
        self.assertEqual((calls[0]["status"], calls[0]["len"]), (0, 0))
        calls, _ = call(self.url, "/t.T/Echo", "--size", 1 << 20)
        self.assertEqual((calls[0]["status"], calls[0]["len"]), (0, 1 << 20))

    def test_every_status_code_and_its_message(self):
        for code in range(1, 17):
            msg = f"code {code}: h\u00e9llo 100% \u2603"
            calls, _ = call(self.url, "/t.T/Status", "--msg", f"{code}:{msg}".encode().hex())
            self.assertEqual(calls[0]["status"], code, calls)
            self.assertEqual(calls[0]["message"], msg)

    def test_unknown_method_is_unimplemented(self):
        calls, _ = call(self.url, "/t.T/Nope")
        self.assertEqual(calls[0]["status"], 12, calls)
        calls, _ = call(self.url, "/other.Service/Echo")
        self.assertEqual(calls[0]["status"], 12, calls)

    def test_slow_server_is_deadline_exceeded(self):
        t0 = time.monotonic()
        calls, _ = call(self.url, "/t.T/Slow", "--msg", b"2".hex(), "--timeout", 300)
        self.assertEqual(calls[0]["status"], 4, calls)
        self.assertLess(time.monotonic() - t0, 1.8)

    def test_deadline_token_and_user_agent_are_sent(self):
        calls, _ = call(self.url, "/t.T/Meta", "--timeout", 5000, "--token", "s3cret")
        self.assertEqual(calls[0]["status"], 0, calls)
        meta = dict(kv.split("=", 1) for kv in calls[0]["head"].decode().split(";"))
        self.assertEqual(meta["auth"], "Bearer s3cret")
        self.assertEqual(meta["deadline"], "True")  # grpc-timeout reached the server
        self.assertTrue(meta["ua"].startswith("spoke/"), meta)

    def test_response_over_the_limit_is_refused(self):
        calls, _ = call(self.url, "/t.T/Big", "--msg", b"3000000".hex(), "--max-response",
                        1 << 20)
        self.assertEqual(calls[0]["status"], 8, calls)
        calls, _ = call(self.url, "/t.T/Big", "--msg", b"3000000".hex())
        self.assertEqual((calls[0]["status"], calls[0]["len"]), (0, 3000000))

    def test_no_server_is_unavailable(self):
        calls, _ = call(f"http://127.0.0.1:{free_port()}", "/t.T/Echo")
        self.assertEqual(calls[0]["status"], 14, calls)
        self.assertEqual(calls[0]["http"], 0)

    def test_sequential_calls_each_get_a_connection(self):
        # libcurl 7.88 cannot reuse a prior-knowledge connection (curl issue 10634): one
        # connection per call, and every call still succeeds.
        calls, conns = call(self.url, "/t.T/Echo", "--msg", "01", "--repeat", 5)
        self.assertEqual([c["status"] for c in calls], [0] * 5, calls)
        self.assertEqual(conns, 5)

    def test_parallel_calls(self):
        calls, _ = call(self.url, "/t.T/Echo", "--msg", "02", "--parallel", 20)
        self.assertEqual([c["status"] for c in calls], [0] * 20, calls)


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        make_pki(d)
        cls.dir = d

        def read(name):
            with open(os.path.join(d, name), "rb") as f:
                return f.read()
        creds = grpc.ssl_server_credentials([(read("server.key"), read("server.pem"))],
                                            root_certificates=read("ca.pem"),
                                            require_client_auth=True)
        cls.server, cls.handler, port = start_server(creds)
        cls.url = f"https://127.0.0.1:{port}"

    @classmethod
    def tearDownClass(cls):
        cls.server.stop(None)
        cls.tmp.cleanup()

    def f(self, name):
        return os.path.join(self.dir, name)

    def tls(self):
        return ("--ca", self.f("ca.pem"), "--cert", self.f("client.pem"), "--key",
                self.f("client.key"))

    def test_mutual_tls_reuses_one_connection(self):
        calls, conns = call(self.url, "/t.T/Echo", "--msg", "07", "--repeat", 5, *self.tls())
        self.assertEqual([c["status"] for c in calls], [0] * 5, calls)
        self.assertEqual(conns, 1)
        self.assertEqual([c["new_conn"] for c in calls], [True] + [False] * 4)

    def test_token_reaches_the_server(self):
        calls, _ = call(self.url, "/t.T/Meta", "--token", "s3cret", *self.tls())
        self.assertEqual(calls[0]["status"], 0, calls)
        self.assertIn(b"auth=Bearer s3cret;", calls[0]["head"])

    def test_status_over_tls(self):
        calls, _ = call(self.url, "/t.T/Status", "--msg", b"7:not you".hex(), *self.tls())
        self.assertEqual((calls[0]["status"], calls[0]["message"]), (7, "not you"))

    def test_without_client_certificate_fails(self):
        calls, _ = call(self.url, "/t.T/Echo", "--ca", self.f("ca.pem"))
        self.assertEqual(calls[0]["status"], 14, calls)

    def test_unknown_ca_fails(self):
        calls, _ = call(self.url, "/t.T/Echo", "--ca", self.f("client.pem"), "--cert",
                        self.f("client.pem"), "--key", self.f("client.key"))
        self.assertEqual(calls[0]["status"], 14, calls)
        self.assertIn("certificate", calls[0]["message"].lower())


if __name__ == "__main__":
    unittest.main(verbosity=2)
