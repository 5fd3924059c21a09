"""Files an unprivileged user could use against spoked (issue 12, item 4, in part): a
symbolic link planted at the pid file's path is not followed (the file it points to is
left alone), the pid file is a regular file of mode 0644 whatever the umask, and the admin
socket is 0600 whatever the umask."""

import os
import stat
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import EchoServer, Spoked, TempDir  # noqa: E402


class FilesTest(unittest.TestCase):
    def start(self, tmp, umask):
        old = os.umask(umask)
        try:
            return Spoked(tmp, upstream=f"127.0.0.1:{self.echo.port}")
        finally:
            os.umask(old)

    def setUp(self):
        self.echo = EchoServer()

    def tearDown(self):
        self.echo.stop()

    def test_planted_pid_link_is_not_followed(self):
        with TempDir() as tmp:
            run = os.path.join(tmp, "run")
            os.makedirs(run)
            victim = os.path.join(tmp, "victim")
            with open(victim, "w") as f:
                f.write("keep me\n")
            os.symlink(victim, os.path.join(run, "spoked.pid"))
            with self.start(tmp, 0o022) as sp:
                pid_path = os.path.join(run, "spoked.pid")
                st = os.lstat(pid_path)
                self.assertTrue(stat.S_ISREG(st.st_mode), "the pid file is still a link")
                with open(pid_path) as f:
                    self.assertEqual(int(f.read()), sp.proc.pid)
            with open(victim) as f:
                self.assertEqual(f.read(), "keep me\n")

    def test_modes_whatever_the_umask(self):
        for umask in (0o000, 0o077):
            with TempDir() as tmp:
                with self.start(tmp, umask):
                    run = os.path.join(tmp, "run")
                    pid_mode = stat.S_IMODE(os.lstat(os.path.join(run, "spoked.pid")).st_mode)
                    sock_mode = stat.S_IMODE(os.lstat(os.path.join(run, "spoked.sock")).st_mode)
                    self.assertEqual(oct(pid_mode), oct(0o644), f"umask {umask:o}")
                    self.assertEqual(oct(sock_mode), oct(0o600), f"umask {umask:o}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
