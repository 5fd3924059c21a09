"""Resource exhaustion, named and survived (issue 12, item 6).

Open files: a real spoked whose worker runs under a low open-files limit
(listen.max_open_files) gets more clients than it has descriptors for. The log says "too
many open files" (never that the upstream is unreachable), the worker stops accepting
instead of spinning, and once the clients close it serves again. With lazy upstream
connects the limit is reached exactly (counted in /proc/PID/fd), so the first thing to fail
is the upstream connect: that too is named as too many open files.

Half-close: a real test plugin (t_hold) holds client bytes back until a newline; when the
client half-closes, on_half_close (ABI 1.3) hands it the chance to flush what it holds,
so the upstream gets every byte before the FIN.
"""
import os
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spoketest import SpokeCase, Spoked, recv_exact, roundtrip, test_plugin  # noqa: E402

LIMIT = 64


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(pred, timeout=15.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class OpenFiles(SpokeCase):
    def start(self, **listen):
        return Spoked(self.dir, self.echo.address,
                      extra={"listen": {"max_open_files": LIMIT, **listen}})

    def test_accept_pauses_and_resumes(self):
        with self.start() as sp:
            held = [socket.create_connection(("127.0.0.1", sp.port)) for _ in range(LIMIT + 20)]
            sp.wait_log(r"too many open files \(this worker's limit; \d+ connections open, "
                        r"open-files limit 64")
            # the clients it took are served meanwhile
            held[0].settimeout(20)
            held[0].sendall(b"still here")
            self.assertEqual(recv_exact(held[0], 10), b"still here")
            for s in held:
                s.close()
            # service resumes once connections close
            self.assertEqual(roundtrip(sp.port, b"after the storm"), b"after the storm")
            sp.wait_log(r"accepting again")
            self.assertNotIn("unreachable", sp.log())

    def test_clients_in_the_backlog_wait_and_are_served(self):
        """At the limit, clients wait in the backlog rather than being accepted only to
        be closed: once the served ones leave, the waiting ones are served. (At most one
        is closed: the client accepted with the last descriptor when the upstream socket
        found none.)"""
        with self.start() as sp:
            held = [socket.create_connection(("127.0.0.1", sp.port)) for _ in range(LIMIT)]
            sp.wait_log(r"too many open files")
            time.sleep(1.5)  # a few of the worker's 500 ms probes pass meanwhile
            served = []
            for s in held:  # which ones got through (the worker holds about 24)
                s.settimeout(0.2)
                try:
                    s.sendall(b"a")
                    if s.recv(1) == b"a":
                        served.append(s)
                except OSError:
                    pass
            self.assertGreater(len(served), 0)
            waiting = [s for s in held if s not in served]
            for s in served:
                s.close()
            ok = 0
            for s in waiting:
                s.settimeout(20)
                try:
                    s.sendall(b"b")
                    got = recv_exact(s, 2)  # the "a" sent while it waited, then "b"
                    ok += got == b"ab"
                except OSError:
                    pass
                s.close()  # making room for those behind it
            self.assertGreaterEqual(ok, len(waiting) - 1, sp.log())
            sp.wait_log(r"accepting again")

    def test_upstream_connect_out_of_files_is_named(self):
        with self.start(upstream_connect="lazy") as sp:
            (worker,) = sp.worker_pids()
            held = []
            # fill the worker's descriptor table exactly, one accepted client at a time
            while fd_count(worker) < LIMIT:
                before = fd_count(worker)
                held.append(socket.create_connection(("127.0.0.1", sp.port)))
                wait_for(lambda: fd_count(worker) > before, what="the accept")
            self.assertEqual(fd_count(worker), LIMIT)
            held[0].sendall(b"x")  # its upstream connect needs one more descriptor
            m = sp.wait_log(r"connect to upstream \S+ for client \S+ \(conn \d+\): too many "
                            r"open files")
            self.assertTrue(m)
            held[0].settimeout(20)
            self.assertEqual(held[0].recv(10), b"")  # that client is closed
            for s in held:
                s.close()
            self.assertEqual(roundtrip(sp.port, b"served again"), b"served again")
            self.assertNotIn("unreachable", sp.log())


class HalfClose(SpokeCase):
    def hold(self, name="t-hold", **config):
        entry = {"name": name, "file": test_plugin("t_hold")}
        if config:
            entry["config"] = config
        return entry

    def test_held_bytes_reach_the_server_before_the_fin(self):
        with Spoked(self.dir, self.echo.address, plugins=[self.hold()]) as sp:
            # the tail after the last newline is held until the client half-closes
            self.assertEqual(roundtrip(sp.port, b"line one\nline two\npartial tail"),
                             b"line one\nline two\npartial tail")
            big = b"x" * 300000 + b"\n" + b"y" * 200000  # held across many chunks
            self.assertEqual(roundtrip(sp.port, big), big)

    def test_lazy_connect_for_bytes_held_until_the_half_close(self):
        """Nothing went upstream before the half-close (no newline): the upstream connect
        starts for the flushed bytes."""
        with Spoked(self.dir, self.echo.address, plugins=[self.hold()],
                    extra={"listen": {"upstream_connect": "lazy"}}) as sp:
            self.assertEqual(roundtrip(sp.port, b"no newline at all"), b"no newline at all")

    def test_chain_order_and_respond(self):
        """Each plugin's on_half_close runs in config order and sees what earlier ones put
        in the buffer; respond() answers the client, which can still read."""
        plugins = [self.hold("hold-a", mark="<A>", respond="bye\n"),
                   self.hold("hold-b", mark="<B>")]
        with Spoked(self.dir, self.echo.address, plugins=plugins) as sp:
            # no newline: all is held, so the answer to the client comes before the echo
            self.assertEqual(roundtrip(sp.port, b"abcdef"), b"bye\nabcdef<A><B>")


if __name__ == "__main__":
    unittest.main()
