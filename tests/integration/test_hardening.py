"""Files an unprivileged user could use against spoked (issue 12, item 4, in part): a
symbolic link planted at the pid file's path is not followed (the file it points to is
left alone), the pid file is a regular file of mode 0644 whatever the umask, the admin
socket is 0600 whatever the umask, and `spoked reload` signals only a spoked supervisor
for the same config, whatever pid the pid file names."""

import os
import stat
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import EchoServer, Spoked, TempDir, spoke_bin  # noqa: E402


class Case(unittest.TestCase):
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


class FilesTest(Case):
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


class ReloadTest(Case):
    def reload(self, sp):
        return subprocess.run([spoke_bin("spoked"), "reload", "-c", sp.config_path],
                              capture_output=True, text=True, timeout=10)

    def test_reload_signals_only_our_supervisor(self):
        with TempDir() as tmp:
            with self.start(tmp, 0o022) as sp:
                pid_path = os.path.join(tmp, "run", "spoked.pid")
                other = subprocess.Popen(["sleep", "60"])
                try:
                    with open(pid_path, "w") as f:
                        f.write(f"{other.pid}\n")
                    p = self.reload(sp)
                    self.assertEqual(p.returncode, 1, p.stdout)
                    self.assertIn(f"names pid {other.pid}, which is not a spoked supervisor",
                                  p.stderr)
                    self.assertIsNone(other.poll())  # not signalled: SIGHUP would kill it
                finally:
                    other.kill()
                    other.wait()
                with open(pid_path, "w") as f:
                    f.write(f"{sp.proc.pid}\n")
                p = self.reload(sp)
                self.assertEqual(p.returncode, 0, p.stderr)
                sp.wait_log(r"generation 2 serving")


if __name__ == "__main__":
    unittest.main(verbosity=2)
