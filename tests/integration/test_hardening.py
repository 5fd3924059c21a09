"""Files an unprivileged user could use against spoked (issue 12, item 4, in part): a
symbolic link planted at the pid file's path is not followed (the file it points to is
left alone), the pid file is a regular file of mode 0644 whatever the umask, the admin
socket is 0600 whatever the umask, and `spoked reload` signals only a spoked supervisor
for the same config, whatever pid the pid file names. Every descriptor the supervisor
opens is close-on-exec (item 4): a worker and the uplink share with it only what they
were given."""

import ctypes
import os
import stat
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import EchoServer, Spoked, TempDir, free_port, spoke_bin  # noqa: E402

SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
KCMP_FILE = 0
libc = ctypes.CDLL(None, use_errno=True)


def same_description(pid1, fd1, pid2, fd2):
    """Whether fd1 of pid1 and fd2 of pid2 are one open file description (inherited or
    passed), by kcmp(2): two opens of one file are two descriptions."""
    r = libc.syscall(SYS_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2)
    if r < 0:
        raise OSError(ctypes.get_errno(), "kcmp")
    return r == 0


def fds(pid):
    """{fd: what it points to} of a live process."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass  # closed meanwhile
    return out


def listening_inodes(port):
    """Socket inodes listening on TCP `port` (IPv4)."""
    out = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if int(cols[1].split(":")[1], 16) == port and cols[3] == "0A":
                out.add(f"socket:[{cols[9]}]")
    return out


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


@unittest.skipIf(SYS_KCMP is None, "kcmp syscall number unknown for this machine")
class DescriptorsTest(Case):
    def leaked(self, sup_pid, pid, allowed):
        """(fd, target) of `pid` that are a description the supervisor holds too, other
        than `allowed` targets and the standard streams. A child holds the config and status
        descriptors it is given until it has read them, so this waits (at most 10 s) for
        the set to be empty; what stays is returned."""
        deadline = time.time() + 10
        while True:
            mine = fds(sup_pid)
            out = {(fd, target) for fd, target in fds(pid).items()
                   if fd > 2 and target not in allowed and
                   any(same_description(sup_pid, sfd, pid, fd) for sfd in mine)}
            if not out or time.time() > deadline:
                return out
            time.sleep(0.05)

    def test_children_inherit_only_what_they_are_given(self):
        """The supervisor holds the queue (journal and LMDB data and lock files), the
        status region, config snapshots, the admin and metrics sockets: a worker shares
        with it only its standard streams and the listening socket, and the uplink (an
        exec'd child given no listener) only its standard streams."""
        with TempDir() as tmp:
            extra = {"metrics": {"listen": f"127.0.0.1:{free_port()}"},
                     "uplink": {"url": f"http://127.0.0.1:{free_port()}"}}
            with Spoked(tmp, upstream=f"127.0.0.1:{self.echo.port}", extra=extra) as sp:
                uplink = int(sp.wait_log(r"uplink started: pid (\d+)").group(1))
                sup_links = set(fds(sp.proc.pid).values())
                for want in ("data.mdb", "lock.mdb", "journal"):
                    self.assertTrue(any(want in v for v in sup_links),
                                    f"the supervisor holds no {want}: {sup_links}")
                listener = listening_inodes(sp.port)
                self.assertEqual(len(listener), 1, listener)
                workers = [p for p in sp.worker_pids() if p != uplink]
                self.assertEqual(len(workers), 1)
                self.assertEqual(self.leaked(sp.proc.pid, workers[0], listener), set(),
                                 "the worker inherited these")
                self.assertTrue(any(target in listener for target in fds(workers[0]).values()))
                self.assertEqual(self.leaked(sp.proc.pid, uplink, set()), set(),
                                 "the uplink inherited these")

if __name__ == "__main__":
    unittest.main(verbosity=2)
