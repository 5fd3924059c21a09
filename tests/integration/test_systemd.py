#!/usr/bin/python3
"""spoked under systemd: readiness (sd_notify), the units, the sandbox, `cmake --install`.

There is no systemd as PID 1 here, so each part is tested with what is real:

- readiness: the test is the service manager's end of the protocol, a real AF_UNIX
  datagram socket in $NOTIFY_SOCKET. READY=1 must come only once the first generation
  serves (its line logged, a connection made right after it is served), never from a
  spoked whose plugin fails to start; RELOADING=1 (with MONOTONIC_USEC) then READY=1
  around a good and a failed reload; STOPPING=1 on SIGTERM; and no worker inherits
  $NOTIFY_SOCKET.
- install: `cmake --install` of the build into a DESTDIR; the installed example configs
  pass --check-config; a plugin compiled from a copy of an example's source with nothing
  but `pkg-config --cflags spoke` (spoke.pc, against the installed header) is loaded by the
  installed spoked and proxies a connection.
- the units: `systemd-analyze verify` on the installed spoked.service and hubd.service.
- the sandbox: the installed spoked.service's [Service] settings are read and applied
  with the kernel's own mechanisms, as systemd applies them: a private mount namespace
  (unshare) where every mount is read-only but the state and runtime directories
  (ProtectSystem=strict, StateDirectory=, RuntimeDirectory=, ReadWritePaths=), a fresh
  tmpfs on /tmp and /var/tmp (PrivateTmp), empty /home, /root, /run/user (ProtectHome),
  /sys/fs/cgroup read-only (ProtectControlGroups),
  a /dev with only the pseudo-devices (PrivateDevices), /proc/sys read-only
  (ProtectKernelTunables; /sys is read-only with the rest), then setpriv for
  NoNewPrivileges and CapabilityBoundingSet, umask and ulimit for UMask and LimitNOFILE
  (capped at this machine's hard limit, which only PID 1 may raise).
  The installed spoked then starts, notifies, proxies, reloads and stops in there. A
  setting this test does not know how to apply fails the test: the unit cannot gain a
  hardening option spoked has not run under.
"""
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spoketest import (BIN_DIR, SOURCE_DIR, TEST_PLUGIN_DIR, EchoServer, Spoked,  # noqa: E402
                       free_port, roundtrip, to_yaml)

# [Service] keys of the units and how this test honours each.
PROCESS_KEYS = {"Type", "ExecStart", "ExecReload", "KillMode", "KillSignal", "TimeoutStopSec",
                "Restart", "RestartSec"}  # the service manager's side: tested as behaviour
SANDBOX_KEYS = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectControlGroups", "NoNewPrivileges",
                "CapabilityBoundingSet", "RuntimeDirectory", "RuntimeDirectoryMode",
                "StateDirectory", "StateDirectoryMode", "ReadWritePaths", "UMask",
                "LimitNOFILE"}


def install_prefix():
    with open(os.path.join(BIN_DIR, "CMakeCache.txt")) as f:
        return re.search(r"^CMAKE_INSTALL_PREFIX:PATH=(.*)$", f.read(), re.M).group(1)


def unit_service(path):
    """The [Service] section of a unit file as {key: value} (one value per key here)."""
    section, out = None, {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]":
                k, v = line.split("=", 1)
                out[k] = v
    return out


class Notify:
    """The service manager's end of sd_notify: a datagram socket at `path`."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)

    def next(self, timeout=20.0):
        """The next message as {key: value}."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            raise AssertionError("no sd_notify message within %.0f s" % timeout)
        return dict(line.split("=", 1) for line in data.decode().split("\n") if line)

    def pending(self):
        """Every message already queued, without waiting."""
        out = []
        while True:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n") if line))

    def close(self):
        self.sock.close()


class NotifyTest(unittest.TestCase):
    """Readiness and state as spoked sends them, to a real NOTIFY_SOCKET."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="spoke-notify-")
        self.notify = Notify(os.path.join(self.tmp, "notify.sock"))
        self.echo = EchoServer()

    def tearDown(self):
        self.echo.stop()
        self.notify.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_ready_reload_stop(self):
        sp = Spoked(self.tmp, f"127.0.0.1:{self.echo.port}", wait=False,
                    env={"NOTIFY_SOCKET": self.notify.path},
                    plugins=[{"name": "passthrough", "file": "passthrough.so"}])
        try:
            m = self.notify.next()
            # READY=1 is sent after the generation was promoted (its line is logged first)
            self.assertEqual(m.get("READY"), "1", m)
            self.assertIn("generation 1 serving", m.get("STATUS", ""))
            self.assertRegex(sp.log(), r"generation 1 serving")
            # and a client that connects as soon as it is told is served
            self.assertEqual(roundtrip(sp.port, b"ready?"), b"ready?")
            for pid in sp.worker_pids():
                with open(f"/proc/{pid}/environ", "rb") as f:
                    self.assertNotIn(b"NOTIFY_SOCKET=", f.read())

            sp.proc.send_signal(signal.SIGHUP)
            m = self.notify.next()
            self.assertEqual(m.get("RELOADING"), "1", m)
            self.assertRegex(m.get("MONOTONIC_USEC", ""), r"^\d+$")
            m = self.notify.next()
            self.assertEqual(m.get("READY"), "1", m)
            self.assertIn("generation 2 serving", m.get("STATUS", ""))

            sp.write_config(text="listen: [ this is not a config\n")
            sp.proc.send_signal(signal.SIGHUP)
            self.assertEqual(self.notify.next().get("RELOADING"), "1")
            m = self.notify.next()
            self.assertEqual(m.get("READY"), "1", m)  # the reload is over: it failed
            self.assertIn("reload failed", m.get("STATUS", ""))
            self.assertEqual(roundtrip(sp.port, b"still"), b"still")

            sp.proc.send_signal(signal.SIGTERM)
            self.assertEqual(self.notify.next().get("STOPPING"), "1")
            self.assertEqual(sp.proc.wait(30), 0, sp.log())
            sp.__exit__(None, None, None)  # and no sanitizer report
        finally:
            sp.stop()

    def test_no_ready_when_the_first_generation_fails(self):
        sp = Spoked(self.tmp, f"127.0.0.1:{self.echo.port}", wait=False,
                    env={"NOTIFY_SOCKET": self.notify.path},
                    plugins=[{"name": "t-init-fail",
                              "file": os.path.join(TEST_PLUGIN_DIR, "t_init_fail.so")}])
        try:
            self.assertNotEqual(sp.proc.wait(30), 0, sp.log())
            # every datagram it sent is queued by now
            self.assertFalse([m for m in self.notify.pending() if m.get("READY") == "1"])
        finally:
            sp.stop()


def visible_in_sandbox(path):
    """path, or /var/lib when path is under a directory the unit's sandbox replaces."""
    real = os.path.realpath(path)
    for hidden in ("/tmp", "/var/tmp", "/home", "/root", "/run/user"):
        if real == hidden or real.startswith(hidden + "/"):
            return "/var/lib"
    return path


class InstallTest(unittest.TestCase):
    """`cmake --install` into a DESTDIR, then the installed files at work."""

    @classmethod
    def setUpClass(cls):
        # Not where the sandbox mounts something fresh (PrivateTmp, ProtectHome): under the
        # build directory unless that is in one of those, then under /var/lib.
        cls.tmp = tempfile.mkdtemp(prefix="spoke-install-", dir=visible_in_sandbox(BIN_DIR))
        os.chmod(cls.tmp, 0o755)  # the sandboxed workers run as nobody and must reach it
        cls.stage = os.path.join(cls.tmp, "stage")
        p = subprocess.run([shutil.which("cmake") or "cmake", "--install", BIN_DIR],
                           env=dict(os.environ, DESTDIR=cls.stage), capture_output=True,
                           text=True, timeout=120)
        if p.returncode != 0:
            raise AssertionError("cmake --install failed:\n" + p.stdout + p.stderr)
        cls.prefix = install_prefix()
        cls.root = cls.stage + cls.prefix  # where the installed prefix is staged
        cls.bin = os.path.join(cls.root, "bin")
        cls.units = os.path.join(cls.root, "lib", "systemd", "system")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def staged(self, *parts):
        return os.path.join(self.root, *parts)

    def test_layout(self):
        for f in ("bin/spoked", "bin/hubd", "bin/spoke-queue", "bin/spoke-plugin",
                  "include/spoke/spoke.h", "share/pkgconfig/spoke.pc",
                  "lib/spoke/plugins/pg-query-log.so", "lib/systemd/system/spoked.service",
                  "lib/systemd/system/hubd.service", "share/spoke/examples/spoke.yaml",
                  "share/spoke/examples/hub.yaml", "share/doc/spoke/operations.md"):
            self.assertTrue(os.path.isfile(self.staged(f)), f)
        for prog in ("spoked", "hubd"):
            self.assertTrue(os.access(self.staged("bin", prog), os.X_OK))
        # the units run the installed programs
        self.assertIn(f"ExecStart={self.prefix}/bin/spoked -c /etc/spoke/spoke.yaml",
                      read(os.path.join(self.units, "spoked.service")))

    def test_example_configs_check(self):
        for prog, cfg in (("spoked", "spoke.yaml"), ("hubd", "hub.yaml")):
            p = subprocess.run([self.staged("bin", prog), "--check-config",
                                self.staged("share", "spoke", "examples", cfg)],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_plugin_built_with_pkg_config_loads(self):
        work = tempfile.mkdtemp(dir=self.tmp)
        src = os.path.join(work, "my_counter.c")  # a copy: no way to the source tree's abi/
        shutil.copy(os.path.join(SOURCE_DIR, "plugins", "counter.c"), src)
        env = dict(os.environ, PKG_CONFIG_PATH=self.staged("share", "pkgconfig"),
                   PKG_CONFIG_SYSROOT_DIR=self.stage)
        env.pop("PKG_CONFIG_LIBDIR", None)
        p = subprocess.run(["pkg-config", "--cflags", "spoke"], env=env, capture_output=True,
                           text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        cflags = p.stdout.split()
        self.assertEqual(cflags, ["-I" + self.staged("include", "spoke")])
        so = os.path.join(work, "my-counter.so")
        p = subprocess.run(["cc", "-std=c11", "-Wall", "-Werror", "-shared", "-fPIC",
                            "-fvisibility=hidden", *cflags, "-o", so, src],
                           cwd=work, capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        echo = EchoServer()
        run = os.path.join(work, "spoked")
        os.mkdir(run)
        cfg = os.path.join(run, "spoke.yaml")
        port = free_port()
        with open(cfg, "w") as f:
            f.write(to_yaml({"listen": {"address": f"127.0.0.1:{port}",
                                        "upstream": f"127.0.0.1:{echo.port}", "workers": 1},
                             "user": "root",  # this test is about the header and the .pc
                             "run_dir": run, "queue": {"path": os.path.join(run, "queue")},
                             "kv": {"path": os.path.join(run, "kv")},
                             "plugins": {"dir": work, "list": [{"file": "my-counter.so"}]}})
                    + "\n")
        log = open(os.path.join(run, "spoked.log"), "wb")
        proc = subprocess.Popen([self.staged("bin", "spoked"), "-c", cfg], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            text = wait_log(proc, os.path.join(run, "spoked.log"), r"generation 1 serving")
            self.assertRegex(text, r"plugin counter \S+ loaded from " + re.escape(so))
            self.assertEqual(roundtrip(port, b"through my plugin"), b"through my plugin")
        finally:
            stop(proc)
            log.close()
            echo.stop()

    @unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze not installed")
    def test_units_verify(self):
        for unit in ("spoked.service", "hubd.service"):
            # the unit as installed, its programs where this DESTDIR holds them
            with open(os.path.join(self.units, unit)) as f:
                text = f.read().replace(f"={self.prefix}/bin/", f"={self.bin}/")
            path = os.path.join(self.tmp, unit)
            with open(path, "w") as f:
                f.write(text)
            p = subprocess.run(["systemd-analyze", "verify", path], capture_output=True,
                               text=True, timeout=60)
            self.assertEqual((p.returncode, p.stdout + p.stderr), (0, ""), unit)

    def sandboxed(self, unit, prog, config, probe):
        """Run the installed `prog` under the installed `unit`'s sandbox settings with
        `config(state, runtime)` (a dict) and check it notifies, serves (probe()), writes
        where the unit lets it, reloads and stops."""
        svc = unit_service(os.path.join(self.units, unit))
        unknown = set(svc) - PROCESS_KEYS - SANDBOX_KEYS
        self.assertFalse(unknown, "settings this test does not apply: %s" % sorted(unknown))
        self.assertEqual((svc["Type"], svc["KillMode"]), ("notify", "mixed"))
        self.assertEqual(svc["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertRegex(svc["ExecStart"], rf"^{re.escape(self.prefix)}/bin/{prog} -c ")

        box = tempfile.mkdtemp(dir=self.tmp)
        os.chmod(box, 0o755)
        # /var/lib/<StateDirectory> and /run/<RuntimeDirectory> of the unit are these two
        state = os.path.join(box, "state", svc["StateDirectory"])
        runtime = os.path.join(box, "run", svc["RuntimeDirectory"])
        os.makedirs(state, int(svc.get("StateDirectoryMode", "0755"), 8))
        os.makedirs(runtime, int(svc.get("RuntimeDirectoryMode", "0755"), 8))
        cfg = os.path.join(box, "config.yaml")  # read-only in there, as /etc/spoke is
        with open(cfg, "w") as f:
            f.write(to_yaml(config(state, runtime)) + "\n")
        notify = Notify(os.path.join(box, "notify.sock"))  # on a read-only mount in there
        script = sandbox_script(svc, [state, runtime] + svc.get("ReadWritePaths", "").split())
        log_path = os.path.join(box, prog + ".log")
        log = open(log_path, "wb")
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-euc",
                                 script, "sandbox", self.staged("bin", prog), "-c", cfg],
                                stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, NOTIFY_SOCKET=notify.path))
        try:
            m = notify.next()
            self.assertEqual(m.get("READY"), "1", read(log_path))
            probe()
            self.assertTrue(os.path.exists(os.path.join(runtime, prog + ".pid")))
            # what it runs under is what the unit says
            with open(f"/proc/{proc.pid}/status") as f:
                status = f.read()
            self.assertEqual(re.search(r"NoNewPrivs:\s*(\d)", status).group(1),
                             "1" if svc.get("NoNewPrivileges") == "yes" else "0")
            self.assertEqual(int(re.search(r"CapBnd:\s*(\w+)", status).group(1), 16),
                             cap_mask(svc["CapabilityBoundingSet"]))
            proc.send_signal(signal.SIGHUP)
            self.assertEqual(notify.next().get("RELOADING"), "1")
            self.assertEqual(notify.next().get("READY"), "1", read(log_path))
            probe()
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(notify.next().get("STOPPING"), "1")
            self.assertEqual(proc.wait(60), 0, read(log_path))
            self.assertNotRegex(read(log_path),
                                r"ERROR|Read-only file system|Permission denied|Sanitizer")
            return state
        finally:
            stop(proc)
            log.close()
            notify.close()

    def test_spoked_under_the_units_sandbox(self):
        echo = EchoServer()
        port = free_port()
        try:
            state = self.sandboxed("spoked.service", "spoked", lambda state, runtime: {
                "listen": {"address": f"127.0.0.1:{port}", "upstream": f"127.0.0.1:{echo.port}",
                           "workers": 2},
                "run_dir": runtime,
                "user": "nobody",  # the workers drop to it, as in production
                "queue": {"path": os.path.join(state, "queue")},
                "kv": {"path": os.path.join(state, "kv")},
                "plugins": {"dir": self.staged("lib", "spoke", "plugins"),
                            "list": [{"file": "pg-query-log.so"}, {"file": "counter.so"}]},
            }, lambda: self.assertEqual(roundtrip(port, b"sandboxed"), b"sandboxed"))
            self.assertTrue(os.path.exists(os.path.join(state, "queue", "data.mdb")))
        finally:
            echo.stop()

    def test_hubd_under_the_units_sandbox(self):
        import grpc
        import grpcpeer
        pb = grpcpeer.load_protos()
        port = free_port()

        def probe():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                r = grpcpeer.stub(ch, pb, grpcpeer.HEALTH)(pb.health.HealthCheckRequest(),
                                                          timeout=10)
                self.assertEqual(r.status, pb.health.HealthCheckResponse.SERVING)

        state = self.sandboxed("hubd.service", "hubd", lambda state, runtime: {
            "hub": {"listen": f"127.0.0.1:{port}", "workers": 1,
                    "store": os.path.join(state, "hub")},
            "run_dir": runtime,
            "user": "nobody",  # the workers drop to it, as in production
            "plugins": {"dir": self.staged("lib", "spoke", "plugins"),
                        "list": [{"id": 42, "file": "cache-stats-aggregator.so"}]},
        }, probe)
        self.assertTrue(os.path.exists(os.path.join(state, "hub", "data.mdb")))


CAPS = {"chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4,
        "kill": 5, "setgid": 6, "setuid": 7, "setpcap": 8, "net_bind_service": 10,
        "net_admin": 12, "net_raw": 13, "ipc_lock": 14, "sys_admin": 21, "sys_resource": 24}


def cap_mask(setting):
    return sum(1 << CAPS[c.lower().removeprefix("cap_")] for c in setting.split())


def sandbox_script(svc, rw):
    """sh commands applying the unit's sandbox settings, then exec "$@" (the program)."""
    sh = []
    for d in rw:  # ReadWritePaths, StateDirectory, RuntimeDirectory: own mounts, kept rw
        sh.append(f"mount --bind '{d}' '{d}'")
    if svc.get("ProtectSystem") == "strict":
        # every other mount read-only; /dev and /proc stay as they are (API file systems)
        keep = " ".join(f"'{d}'" for d in rw)
        sh.append("for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do "
                  "case $m in /dev|/dev/*|/proc|/proc/*) continue;; esac; "
                  f"for k in {keep}; do [ \"$m\" = \"$k\" ] && continue 2; done; "
                  "mount -o remount,bind,ro \"$m\"; done")
    elif "ProtectSystem" in svc:
        raise AssertionError("ProtectSystem=%s: only strict is applied here" % svc["ProtectSystem"])
    if svc.get("ProtectKernelTunables") == "yes":
        sh.append("mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys")
    if svc.get("ProtectControlGroups") == "yes":
        # a mount of its own: made read-only with every other by ProtectSystem=strict above
        sh.append("! mountpoint -q /sys/fs/cgroup || mount -o remount,bind,ro /sys/fs/cgroup")
    if svc.get("PrivateTmp") == "yes":
        sh.append("mount -t tmpfs -o mode=1777 tmpfs /tmp && mount -t tmpfs -o mode=1777 tmpfs /var/tmp")
    if svc.get("ProtectHome") == "yes":
        sh.append("for d in /home /root /run/user; do [ ! -d $d ] || mount -t tmpfs -o ro,mode=755 tmpfs $d; done")
    if svc.get("PrivateDevices") == "yes":
        sh.append("mount -t tmpfs -o mode=755 tmpfs /dev && "
                  "mknod -m 666 /dev/null c 1 3 && mknod -m 666 /dev/zero c 1 5 && "
                  "mknod -m 666 /dev/full c 1 7 && mknod -m 666 /dev/random c 1 8 && "
                  "mknod -m 666 /dev/urandom c 1 9 && mknod -m 666 /dev/tty c 5 0 && "
                  "mkdir /dev/shm && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && "
                  "mount -o remount,ro,bind /dev")
    if "UMask" in svc:
        sh.append(f"umask {svc['UMask']}")
    if "LimitNOFILE" in svc:
        # systemd (PID 1) may raise the hard limit; here root may not (no CAP_SYS_RESOURCE
        # in a container), so the limit is the unit's or the hard limit, the lower
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        want = int(svc["LimitNOFILE"])
        sh.append(f"ulimit -n {want if hard == resource.RLIM_INFINITY else min(want, hard)}")
    priv = ["setpriv"]
    if svc.get("NoNewPrivileges") == "yes":
        priv.append("--no-new-privs")
    if "CapabilityBoundingSet" in svc:
        caps = ",".join("+" + c.lower().removeprefix("cap_")
                        for c in svc["CapabilityBoundingSet"].split())
        priv.append(f"--bounding-set=-all,{caps}")
    sh.append("exec " + " ".join(priv) + ' -- "$@"')
    return "\n".join(sh)


def read(path):
    with open(path) as f:
        return f.read()


def wait_log(proc, path, pattern, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = read(path)
        if re.search(pattern, text):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"log never matched {pattern!r}:\n" + read(path))


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        # the sandbox needs mount namespaces; the rest runs anyway
        for t in ("test_spoked_under_the_units_sandbox", "test_hubd_under_the_units_sandbox"):
            setattr(InstallTest, t, unittest.skip("needs root, unshare and setpriv")(
                getattr(InstallTest, t)))
    result = unittest.main(verbosity=2, exit=False).result
    sys.exit(0 if result.wasSuccessful() else 1)
