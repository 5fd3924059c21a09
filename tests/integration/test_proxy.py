"""The data path: spoked between a real client and a real echo server on loopback.

Bytes arrive intact both ways from 1 byte to 16 MiB, over IPv4, IPv6 and Unix sockets,
with and without plugins; half-close is passed on; a slow peer does not make spoked's
memory grow; many concurrent connections on one worker; a down upstream is logged.
"""

import hashlib
import os
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import (EchoServer, SpokeCase, Spoked, connect, free_port, recv_exact,  # noqa: E402
                       roundtrip)

SIZES = [1, 2, 1000, 65536, 65537, 1 << 20, 16 << 20]


def pattern(n, seed=0):
    """n bytes that are not all alike, so reordering or loss shows."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps = n // len(block) + 1
    return (block * reps)[:n]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class ProxyTest(SpokeCase):
    def check_sizes(self, addr):
        for n in SIZES:
            data = pattern(n, n)
            got = roundtrip(addr, data)
            self.assertEqual(len(got), n, f"size {n}: got {len(got)} bytes back")
            self.assertTrue(got == data, f"size {n}: bytes differ")

    def test_sizes_no_plugins(self):
        with Spoked(self.dir, self.echo.address) as sp:
            self.check_sizes(f"127.0.0.1:{sp.port}")

    def test_sizes_through_passthrough_plugins(self):
        plugins = [{"name": f"pass-{i}", "file": "passthrough.so"} for i in range(4)]
        with Spoked(self.dir, self.echo.address, plugins=plugins) as sp:
            self.check_sizes(f"127.0.0.1:{sp.port}")

    def test_ipv6_and_unix_listeners(self):
        port6 = free_port()
        path = os.path.join(self.dir, "spoke.sock")
        listen = [f"127.0.0.1:{free_port()}", f"[::1]:{port6}", f"unix:{path}"]
        with Spoked(self.dir, self.echo.address, listen=listen):
            for addr in listen:
                data = pattern(100000, 7)
                self.assertEqual(roundtrip(addr, data), data, addr)

    def test_unix_upstream(self):
        path = os.path.join(self.dir, "echo.sock")
        uecho = EchoServer(unix_path=path)
        try:
            with Spoked(self.dir, uecho.address) as sp:
                data = pattern(300000, 3)
                self.assertEqual(roundtrip(sp.port, data), data)
        finally:
            uecho.stop()

    def test_half_close_passed_on(self):
        """Client shuts its write side: the echo server sees EOF, still answers, then
        closes; the client reads everything then EOF."""
        with Spoked(self.dir, self.echo.address) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"before-fin")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                d = s.recv(100)
                if not d:
                    break
                got += d
            s.close()
            self.assertEqual(got, b"before-fin")

    def test_server_first_half_close(self):
        """The upstream speaks first and half-closes; the client still sends afterwards."""
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        port = lsock.getsockname()[1]
        seen = []

        def serve():
            c, _ = lsock.accept()
            c.sendall(b"greeting")
            c.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                d = c.recv(100)
                if not d:
                    break
                data += d
            seen.append(data)
            c.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with Spoked(self.dir, f"127.0.0.1:{port}") as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            self.assertEqual(recv_exact(s, 8), b"greeting")
            self.assertEqual(s.recv(10), b"")  # the FIN came through
            s.sendall(b"late words")
            s.shutdown(socket.SHUT_WR)
            t.join(10)
            s.close()
        lsock.close()
        self.assertEqual(seen, [b"late words"])

    def test_many_concurrent_connections(self):
        """2000 connections open at once on one worker, each echoing its own bytes."""
        n = 2000
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard < 3 * n + 100:
            self.skipTest(f"RLIMIT_NOFILE hard limit {hard} too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 3 * n + 100), hard))
        with Spoked(self.dir, self.echo.address) as sp:
            socks = []
            try:
                for _ in range(n):
                    socks.append(connect(f"127.0.0.1:{sp.port}"))
                for i, s in enumerate(socks):
                    s.sendall(b"conn-%06d;" % i)
                for i, s in enumerate(socks):
                    self.assertEqual(recv_exact(s, 12), b"conn-%06d;" % i, "connection %d" % i)
            finally:
                # Closed before spoked stops, also on failure: it would otherwise wait
                # out its drain time for them.
                for s in socks:
                    s.close()

    def test_slow_reader_memory_bounded(self):
        """The upstream never reads: spoked must stop reading the client instead of
        buffering without bound."""
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        port = lsock.getsockname()[1]
        held = []

        def accept_and_sit():
            c, _ = lsock.accept()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            held.append(c)

        threading.Thread(target=accept_and_sit, daemon=True).start()
        # The connection cannot finish (its upstream never reads): a short drain_timeout
        # lets spoked stop promptly at the end.
        with Spoked(self.dir, f"127.0.0.1:{port}",
                    extra={"plugins": {"drain_timeout": "1s"}}) as sp:
            worker = sp.worker_pids()[0]
            base = rss_kib(worker)
            s = connect(f"127.0.0.1:{sp.port}")
            s.setblocking(False)
            chunk = b"x" * 65536
            sent = 0
            deadline = time.time() + 5
            while time.time() < deadline and sent < (256 << 20):
                try:
                    sent += s.send(chunk)
                except BlockingIOError:
                    time.sleep(0.01)
            grown = rss_kib(worker) - base
            s.close()
            # Kernel buffers take some; spoked itself holds at most about one high
            # watermark (1 MiB by default) plus a read chunk.
            self.assertLess(sent, 64 << 20, "spoked kept reading a client nobody drains")
            self.assertLess(grown, 16 * 1024, f"spoked grew by {grown} KiB")
        for c in held:
            c.close()
        lsock.close()

    def test_upstream_down_is_logged(self):
        dead = free_port()
        with Spoked(self.dir, f"127.0.0.1:{dead}") as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"hello")
            self.assertEqual(s.recv(10), b"")  # closed, nothing sent back
            s.close()
            sp.wait_log(rf"upstream 127\.0\.0\.1:{dead} unreachable: Connection refused")

    def test_sigterm_drains_open_connections(self):
        with Spoked(self.dir, self.echo.address) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"one")
            self.assertEqual(recv_exact(s, 3), b"one")
            sp.send_signal(15)
            sp.wait_log("no longer accepting")
            s.sendall(b"two")  # the open connection still works while draining
            self.assertEqual(recv_exact(s, 3), b"two")
            s.close()
            sp.proc.wait(10)
            self.assertEqual(sp.proc.returncode, 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
