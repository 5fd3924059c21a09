"""Only trusted plugin code is loaded (issue 12, item 1).

- plugins.strict_modes, as sshd's StrictModes: a plugin file or directory (or a directory
  above it) writable by group or others, or owned by another user, is refused with its
  path and the reason, also through a symbolic link; strict_modes: false turns it off.
- A generation's plugin set is fixed when it starts: a worker restarted after kill -9
  runs the bytes its generation started with, not a file edited in place or added since;
  only a reload changes what runs.
- `user:`/`group:`: workers (and their plugins) run as that account, the supervisor keeps
  root; spoked as root refuses a config without `user:`.

Run as root: the tests make a throwaway user (useradd) and remove it afterwards.
"""

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import (CRASH_ENV, Hubd, Spoked, SpokeCase, connect, recv_exact,  # noqa: E402
                       roundtrip, test_plugin as tp)

USER = "spoke-t%d" % os.getpid()
UID = GID = None


def setUpModule():
    global UID, GID
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root (makes a throwaway user)")
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                    "--shell", "/usr/sbin/nologin", USER], check=True)
    UID, GID = pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid


def tearDownModule():
    if UID is not None:
        subprocess.run(["userdel", USER], check=False)


def proc_ids(pid):
    """{'Uid': [...], 'Gid': [...], 'Groups': [...]} of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "Groups"):
                out[k] = [int(x) for x in v.split()]
    return out


def memfds(pid):
    """Names of the memfds process pid holds ("spoke-pin:t-version.so", ...)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            t = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if t.startswith("/memfd:"):
            out.append(t[len("/memfd:"):].split(" (deleted)")[0])
    return sorted(out)


def ask_version(port):
    s = connect(f"127.0.0.1:{port}")
    s.sendall(b"VERSION?")
    got = recv_exact(s, 16)
    s.close()
    return got


class Base(SpokeCase):
    def plugin_dir(self, *parts, mode=0o755, src="t_version_v1"):
        """A plugin directory (under self.dir/parts...) holding t-version.so."""
        pdir = os.path.join(self.dir, *parts, "plugins")
        os.makedirs(pdir)
        os.chmod(pdir, mode)
        shutil.copy(tp(src), os.path.join(pdir, "t-version.so"))
        return pdir

    def start(self, pdir, plugins=({"file": "t-version.so"},), **kw):
        return Spoked(self.dir, self.echo.address, plugins=list(plugins), plugin_dir=pdir, **kw)

    def refused(self, pdir, pattern, **kw):
        sp = self.start(pdir, expect_fail=True, **kw)
        self.assertNotEqual(sp.proc.returncode, 0)
        self.assertRegex(sp.log(), pattern)
        self.assertNotRegex(sp.log(), r"generation \d+ serving")


class StrictModesTest(Base):
    def test_group_writable_plugin_dir_is_refused(self):
        pdir = self.plugin_dir(mode=0o775)
        self.refused(pdir, re.escape(pdir) + r"/t-version\.so: refused: directory "
                     + re.escape(pdir) + r" is writable by its group \(mode 0775\)")

    def test_world_writable_file_is_refused(self):
        pdir = self.plugin_dir()
        os.chmod(os.path.join(pdir, "t-version.so"), 0o757)
        self.refused(pdir, r"t-version\.so: refused: file \S+/t-version\.so is writable by "
                     r"others \(mode 0757\)")

    def test_file_owned_by_another_user_is_refused(self):
        pdir = self.plugin_dir()
        os.chown(os.path.join(pdir, "t-version.so"), UID, GID)
        self.refused(pdir, r"t-version\.so: refused: file \S+ is owned by uid %d \(%s\), not "
                     r"by root or the user spoked runs as" % (UID, re.escape(USER)))

    def test_dir_owned_by_another_user_is_refused(self):
        pdir = self.plugin_dir()
        os.chown(pdir, UID, GID)
        self.refused(pdir, r"refused: directory %s is owned by uid %d" % (re.escape(pdir), UID))

    def test_writable_directory_further_up_is_refused(self):
        pdir = self.plugin_dir("shared")
        up = os.path.join(self.dir, "shared")
        os.chmod(up, 0o777)
        self.refused(pdir, r"refused: directory %s is writable by group and others "
                     r"\(mode 0777\)" % re.escape(up))

    def test_sticky_directory_further_up_is_accepted(self):
        """As /tmp: nobody else can rename or remove the trusted directory below it."""
        pdir = self.plugin_dir("tmp")
        os.chmod(os.path.join(self.dir, "tmp"), 0o1777)
        with self.start(pdir) as sp:
            self.assertEqual(ask_version(sp.port), b"t-version 1.0.0\n")

    def test_sticky_plugin_dir_itself_is_refused(self):
        pdir = self.plugin_dir(mode=0o1777)
        self.refused(pdir, r"refused: directory %s is writable by group and others "
                     r"\(mode 1777\)" % re.escape(pdir))

    def test_link_to_an_untrusted_target_is_refused(self):
        pdir = self.plugin_dir()
        evil = os.path.join(self.dir, "evil")
        os.makedirs(evil)
        os.chmod(evil, 0o777)
        shutil.copy(tp("t_version_v2"), os.path.join(evil, "v.so"))
        link = os.path.join(pdir, "t-version.so")
        os.unlink(link)
        os.symlink(os.path.join(evil, "v.so"), link)
        self.refused(pdir, r"%s \(resolves to %s\): refused: directory %s is writable by group "
                     r"and others" % (re.escape(link), re.escape(os.path.join(evil, "v.so")),
                                      re.escape(evil)))

    def test_link_to_a_trusted_target_is_loaded(self):
        pdir = self.plugin_dir()
        link = os.path.join(pdir, "t-version.so")
        os.unlink(link)
        os.symlink(tp("t_version_v2"), link)
        with self.start(pdir) as sp:
            self.assertEqual(ask_version(sp.port), b"t-version 2.0.0\n")

    def test_autoload_checks_the_plugin_dir(self):
        pdir = self.plugin_dir(mode=0o777)
        self.refused(pdir, r"%s: refused: directory %s is writable by group and others"
                     % (re.escape(pdir), re.escape(pdir)), plugins=(),
                     extra={"plugins": {"autoload": True}})

    def test_strict_modes_false_loads_with_a_warning(self):
        pdir = self.plugin_dir(mode=0o777)
        with self.start(pdir, extra={"plugins": {"strict_modes": False}}) as sp:
            self.assertEqual(ask_version(sp.port), b"t-version 1.0.0\n")
            self.assertIn("plugins.strict_modes is false: plugin files are loaded whatever "
                          "their owner and modes", sp.log())

    def test_reload_refuses_an_untrusted_file_and_keeps_serving(self):
        pdir = self.plugin_dir()
        with self.start(pdir) as sp:
            os.chmod(pdir, 0o777)
            tmp = os.path.join(pdir, ".new")
            shutil.copy(tp("t_version_v2"), tmp)
            os.rename(tmp, os.path.join(pdir, "t-version.so"))
            sp.send_signal(signal.SIGHUP)
            sp.wait_log(r"reload failed: .*t-version\.so: refused: directory %s is writable "
                        r"by group and others" % re.escape(pdir))
            self.assertEqual(ask_version(sp.port), b"t-version 1.0.0\n")

    def test_single_process_is_held_to_the_same_rules(self):
        pdir = self.plugin_dir(mode=0o775)
        self.refused(pdir, r"t-version\.so: refused: directory %s is writable by its group"
                     % re.escape(pdir), args=("--single-process",))


class PinnedSetTest(Base):
    def test_restarted_worker_runs_its_generation_files(self):
        """Edit the loaded file in place and add a new one to plugins.dir (autoload), then
        kill -9 the worker: its replacement runs what the generation started with. A reload
        then runs the new files."""
        pdir = self.plugin_dir()
        with self.start(pdir, plugins=(), extra={"plugins": {"autoload": True}},
                        env=CRASH_ENV) as sp:
            self.assertEqual(ask_version(sp.port), b"t-version 1.0.0\n")
            # the supervisor holds the generation's copy; a worker only its private one
            self.assertIn("spoke-pin:t-version.so", memfds(sp.proc.pid))
            (pid,) = sp.worker_pids()
            self.assertNotIn("spoke-pin:t-version.so", memfds(pid))
            self.assertIn("t-version.so", memfds(pid))
            with open(tp("t_version_v2"), "rb") as src, \
                    open(os.path.join(pdir, "t-version.so"), "r+b") as dst:
                dst.truncate(0)
                dst.write(src.read())
            shutil.copy(tp("t_respond"), os.path.join(pdir, "t-respond.so"))
            for round_ in range(2):
                (pid,) = sp.worker_pids()
                os.kill(pid, signal.SIGKILL)
                sp.wait_log(r"(?s)(restarting worker 0.*){%d}" % (round_ + 1))
                # the listener is the supervisor's: this waits for the restarted worker
                self.assertEqual(ask_version(sp.port), b"t-version 1.0.0\n")
                self.assertEqual(roundtrip(sp.port, b"PING"), b"PING")  # no t-respond
            self.assertNotIn("t-respond", sp.status())
            sp.send_signal(signal.SIGHUP)
            sp.wait_log(r"generation 1 finished draining")
            self.assertEqual(ask_version(sp.port), b"t-version 2.0.0\n")
            self.assertEqual(roundtrip(sp.port, b"PING"), b"PONG\n")

    def test_restarted_worker_checks_the_same_bytes_against_sha256(self):
        """With sha256: set, a file replaced after the start cannot stop restarts (the
        restarted worker hashes the generation's copy, not the new file)."""
        pdir = self.plugin_dir()
        import hashlib
        with open(os.path.join(pdir, "t-version.so"), "rb") as f:
            sum_ = hashlib.sha256(f.read()).hexdigest()
        with self.start(pdir, plugins=({"file": "t-version.so", "sha256": sum_},),
                        env=CRASH_ENV) as sp:
            tmp = os.path.join(pdir, ".new")
            shutil.copy(tp("t_version_v2"), tmp)
            os.rename(tmp, os.path.join(pdir, "t-version.so"))
            (pid,) = sp.worker_pids()
            os.kill(pid, signal.SIGKILL)
            sp.wait_log(r"restarting worker 0")
            self.assertEqual(ask_version(sp.port), b"t-version 1.0.0\n")
            self.assertNotIn("SHA-256 mismatch", sp.log())


class PrivilegesTest(Base):
    def setUp(self):
        super().setUp()
        os.chmod(self.dir, 0o755)  # the workers' user reaches its stores below it

    def test_workers_run_as_user_and_use_the_stores(self):
        plugins = [{"file": tp("t_send")}, {"file": tp("t_kv")}]
        # the queue's parents do not exist yet: they are made reachable by the workers
        extra = {"user": USER, "queue": {"path": os.path.join(self.dir, "var/lib/queue")}}
        with Spoked(self.dir, self.echo.address, plugins=plugins, extra=extra) as sp:
            self.assertEqual(roundtrip(sp.port, b"SEND - hello"), b"RC 0 1\n")
            (pid,) = sp.worker_pids()
            ids = proc_ids(pid)
            self.assertEqual(ids["Uid"], [UID] * 4)
            self.assertEqual(ids["Gid"], [GID] * 4)
            self.assertEqual(ids["Groups"], [GID])
            self.assertEqual(proc_ids(sp.proc.pid)["Uid"], [0] * 4)  # the supervisor
            for store in ("var/lib/queue", "kv"):
                self.assertEqual(os.stat(os.path.join(self.dir, store)).st_uid, UID)
                for f in os.listdir(os.path.join(self.dir, store)):
                    self.assertEqual(os.stat(os.path.join(self.dir, store, f)).st_uid, UID, f)
            self.assertNotIn("unavailable", sp.log())
            # restarts keep the account
            os.kill(pid, signal.SIGKILL)
            sp.wait_log(r"restarting worker 0")
            self.assertEqual(roundtrip(sp.port, b"SEND - again"), b"RC 0 2\n")
            (pid,) = sp.worker_pids()
            self.assertEqual(proc_ids(pid)["Uid"], [UID] * 4)

    def test_group(self):
        group = grp.getgrgid(0).gr_name  # any group other than the user's own
        with Spoked(self.dir, self.echo.address, extra={"user": USER, "group": group}) as sp:
            self.assertEqual(roundtrip(sp.port, b"abc"), b"abc")
            (pid,) = sp.worker_pids()
            self.assertEqual(proc_ids(pid)["Gid"], [0] * 4)
            self.assertEqual(proc_ids(pid)["Groups"], [0])
            self.assertEqual(proc_ids(pid)["Uid"], [UID] * 4)

    def test_root_without_user_is_refused(self):
        text = (f"listen: {{ address: 127.0.0.1:{self.echo.port + 1}, upstream: "
                f"{self.echo.address} }}\nrun_dir: {self.dir}/run\n")
        sp = Spoked(self.dir, self.echo.address, config_text=text, expect_fail=True)
        self.assertIn("user: not set, and spoked runs as root: workers would run plugins as "
                      "root. Set `user:`", sp.log())

    def test_unknown_user_is_refused(self):
        sp = Spoked(self.dir, self.echo.address, extra={"user": USER + "x"}, expect_fail=True)
        self.assertIn("user: no such user '%sx'" % USER, sp.log())

    def test_single_process_drops_too(self):
        with Spoked(self.dir, self.echo.address, extra={"user": USER},
                    args=("--single-process",)) as sp:
            self.assertEqual(roundtrip(sp.port, b"abc"), b"abc")
            self.assertEqual(proc_ids(sp.proc.pid)["Uid"], [UID] * 4)

    def test_hubd_workers_run_as_user(self):
        plugins = [{"name": "t-control", "id": 7, "file": tp("t_control")}]
        with Hubd(self.dir, plugins=plugins, extra={"user": USER}) as hub:
            self.assertIn("plugin t-control", hub.log())
            (pid,) = hub.worker_pids()
            self.assertEqual(proc_ids(pid)["Uid"], [UID] * 4)
            self.assertEqual(os.stat(os.path.join(self.dir, "hubstore")).st_uid, UID)


if __name__ == "__main__":
    unittest.main()
