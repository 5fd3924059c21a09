"""spoketest -- the harness of spoke's integration tests.

Real processes, real sockets on loopback: an echo server in a thread of the test, the
real `spoked` binary started with a generated YAML config, and helpers to talk to both.
Stdlib only; run with Debian's /usr/bin/python3.

    echo = EchoServer()
    with Spoked(tmp, upstream=f"127.0.0.1:{echo.port}",
                plugins=[{"name": "t-rewrite", "file": TEST_PLUGIN_DIR + "/t_rewrite.so"}]) as sp:
        assert roundtrip(sp.port, b"abc") == b"ABC"
"""

import json
import os
import pwd
import re
import select
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest

BIN_DIR = os.environ.get("SPOKE_BIN_DIR", os.path.join(os.path.dirname(__file__), "../../build"))
PLUGIN_DIR = os.environ.get("SPOKE_PLUGIN_DIR", os.path.join(BIN_DIR, "plugins"))
TEST_PLUGIN_DIR = os.environ.get("SPOKE_TEST_PLUGIN_DIR", os.path.join(BIN_DIR, "tests/plugins"))
SOURCE_DIR = os.environ.get("SPOKE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "../.."))


def host_abi():
    """The host's plugin ABI version, "MAJOR.MINOR", as abi/spoke.h defines it."""
    with open(os.path.join(SOURCE_DIR, "abi", "spoke.h")) as f:
        h = f.read()
    major = re.search(r"#define SPOKE_ABI_MAJOR (\d+)", h).group(1)
    minor = re.search(r"#define SPOKE_ABI_MINOR (\d+)", h).group(1)
    return f"{major}.{minor}"


HOST_ABI = host_abi()


def spoke_bin(name):
    """Path of a built program (spoked, spoke-plugin, spoke-bench...)."""
    return os.path.join(BIN_DIR, name)


# The account the workers run as (`user:`): this process's own, so that spoked started as
# root runs its plugins as root only because the config says so (core/privs.h).
RUN_AS = pwd.getpwuid(os.geteuid()).pw_name


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def yaml_scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid YAML double-quoted scalar


def to_yaml(obj, indent=0):
    """Block-style YAML for dicts, lists and scalars (enough for spoke configs)."""
    pad = " " * indent
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:")
                out.append(to_yaml(v, indent + 2))
            elif isinstance(v, dict):
                out.append(f"{pad}{k}: {{}}")
            elif isinstance(v, list):
                out.append(f"{pad}{k}: []")
            else:
                out.append(f"{pad}{k}: {yaml_scalar(v)}")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict) and v:
                inner = to_yaml(v, indent + 2).split("\n")
                out.append(f"{pad}- {inner[0].strip()}")
                out.extend(inner[1:])
            else:
                out.append(f"{pad}- {yaml_scalar(v)}")
    return "\n".join(out)


class EchoServer:
    """A TCP echo server on 127.0.0.1 (or a unix socket path), one selector thread.

    One thread serves every connection, so a test can hold thousands of them open
    without meeting a thread or pid limit. Half-close aware: when the client shuts down
    its write side, the server finishes echoing and then shuts down its own, so a
    proxy's half-close handling is observable. A connection whose echo is not being
    read stops being read (at most 256 KiB waits per connection), like a blocking echo.
    """

    def __init__(self, unix_path=None):
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.address = "unix:" + unix_path
            self.port = None
        else:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
            self.address = f"127.0.0.1:{self.port}"
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.connections = 0
        self.received = 0
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns = {}  # socket -> [pending output (memoryview), peer finished sending]
        self._accept_resume = None  # when accepting paused on EMFILE: time to retry
        self.error = None  # an exception that stopped the loop; stop() raises it
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # EMFILE and the like: the listening socket stays readable, so stop
                # watching it for a moment rather than spin on it.
                self._sel.unregister(self.sock)
                self._accept_resume = time.monotonic() + 0.05
                return
            c.setblocking(False)
            with self._lock:
                self.connections += 1
            self._conns[c] = [memoryview(b""), False]
            self._sel.register(c, selectors.EVENT_READ, None)

    def _close(self, c):
        self._sel.unregister(c)
        del self._conns[c]
        c.close()

    def _service(self, c, events):
        st = self._conns[c]
        try:
            if events & selectors.EVENT_READ and not st[0] and not st[1]:
                d = c.recv(262144)
                if d:
                    with self._lock:
                        self.received += len(d)
                    st[0] = memoryview(d)
                else:
                    st[1] = True
            if st[0]:
                n = c.send(st[0])
                st[0] = st[0][n:]  # a view: no copy of what is left
            if st[1] and not st[0]:
                c.shutdown(socket.SHUT_WR)
                self._close(c)
                return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(c)
            return
        self._sel.modify(c, selectors.EVENT_WRITE if st[0] else selectors.EVENT_READ, None)

    def _loop(self):
        try:
            self._run()
        except BaseException as e:  # surfaced by stop(), not lost with the thread
            self.error = e
            raise

    def _run(self):
        while True:
            timeout = None
            if self._accept_resume is not None:
                timeout = max(0.0, self._accept_resume - time.monotonic())
                if timeout == 0.0:
                    self._sel.register(self.sock, selectors.EVENT_READ, None)
                    self._accept_resume = None
                    timeout = None
            for key, events in self._sel.select(timeout):
                s = key.fileobj
                if s is self._wake_r:
                    for c in list(self._conns):
                        self._close(c)
                    self._sel.close()
                    self.sock.close()
                    self._wake_r.close()
                    return
                if s is self.sock:
                    self._accept()
                elif s in self._conns:
                    self._service(s, events)

    def stop(self):
        """Stop the server and close every connection it holds. Raises what stopped its
        loop, if anything did."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(10)
        self._wake_w.close()
        if self.error is not None:
            raise AssertionError("echo server failed: %r" % (self.error,))
        if self._thread.is_alive():
            raise AssertionError("echo server did not stop within 10 s")


class Spoked:
    """Start the real spoked with a generated config; stop it on exit.

    plugins: list of dicts as in `plugins.list` (file may be a bare name, resolved against
    plugin_dir, or an absolute path). extra: dict merged into the top-level config (for
    sections) -- e.g. {"listen": {"upstream_connect": "lazy"}} merges into listen.
    """

    PROG = "spoked"

    def __init__(self, tmpdir, upstream, plugins=(), extra=None, plugin_dir=None,
                 listen=None, expect_fail=False, config_text=None, log_level="info",
                 start_timeout=15.0, env=None, wait=True, args=()):
        self.tmpdir = tmpdir
        self.port = free_port()
        self.listen = listen or [f"127.0.0.1:{self.port}"]
        cfg = {
            "edge": {"id": "edge-test", "namespace": "test"},
            "listen": {"address": self.listen if len(self.listen) > 1 else self.listen[0],
                       "upstream": upstream, "workers": 1},
            "plugins": {"dir": plugin_dir or PLUGIN_DIR, "tick": "200ms"},
            "log": {"level": log_level},
            "run_dir": os.path.join(tmpdir, "run"),
            "user": RUN_AS,
            "queue": {"path": os.path.join(tmpdir, "queue")},
            "kv": {"path": os.path.join(tmpdir, "kv")},
        }
        if plugins:
            cfg["plugins"]["list"] = list(plugins)
        for k, v in (extra or {}).items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
        self.config = cfg
        self._launch(tmpdir, "spoke.yaml", config_text, env, wait, expect_fail, start_timeout,
                     args)

    def _launch(self, tmpdir, config_name, config_text, env, wait, expect_fail, start_timeout,
                args=()):
        self.config_path = os.path.join(tmpdir, config_name)
        with open(self.config_path, "w") as f:
            f.write(config_text if config_text is not None else to_yaml(self.config) + "\n")
        self.log_path = os.path.join(tmpdir, f"{self.PROG}.log")
        self._log = open(self.log_path, "wb")
        penv = dict(os.environ)
        penv.update(env or {})
        self.proc = subprocess.Popen([spoke_bin(self.PROG), "-c", self.config_path, *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=penv)
        if not wait:
            return
        if expect_fail:
            try:
                self.proc.wait(start_timeout)
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError(f"{self.PROG} did not fail:\n" + self.log())
            self._log.close()
            return
        self._wait_listening(start_timeout)

    def wait_serving(self, timeout=15.0):
        self._wait_listening(timeout)

    def _wait_listening(self, timeout):
        """Wait for the log to say the workers serve. (No probe connection: it would reach
        the upstream and confuse tests that count upstream connections.)"""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.PROG} exited with {self.proc.returncode}:\n{self.log()}")
            # the supervisor's line, or a --single-process worker's
            if re.search(r"generation \d+ serving|spoked\[\d+\]: serving \S+ -> ", self.log()):
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.PROG} did not start listening:\n" + self.log())

    def status(self):
        """Output of `spoked status` (`hubd status`) for this instance."""
        p = subprocess.run([spoke_bin(self.PROG), "status", "-c", self.config_path],
                           capture_output=True, text=True, timeout=10)
        if p.returncode != 0:
            raise AssertionError(f"{self.PROG} status failed: " + p.stderr)
        return p.stdout

    def write_config(self, cfg_dict=None, text=None):
        """Rewrite the config file (before a reload)."""
        with open(self.config_path, "w") as f:
            f.write(text if text is not None else to_yaml(cfg_dict) + "\n")

    def worker_pids(self):
        """PIDs of the supervisor's children (the workers)."""
        pids = []
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            try:
                with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pass
        return pids

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_log(self, pattern, timeout=10.0):
        """Wait until the log matches `pattern` (a regex); return the match."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            time.sleep(0.02)
        raise AssertionError(f"log never matched {pattern!r}:\n{self.log()}")

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Stop spoked; return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.PROG} did not stop on {sig}:\n" + self.log())
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        code = self.stop()
        if exc[0] is None and code != 0:
            raise AssertionError(f"{self.PROG} exited with {code}:\n{self.log()}")
        if exc[0] is None and ("AddressSanitizer" in self.log() or "runtime error:" in self.log()):
            raise AssertionError("sanitizer report:\n" + self.log())


class Hubd(Spoked):
    """Start the real hubd with a generated config (hub.yaml); stop it on exit.

    plugins: control plugins, as in `plugins.list`. extra: dict merged into the top-level
    config (sections hub, tls, auth, limits, plugins, log). The store is in tmpdir/hubstore.
    """

    PROG = "hubd"

    def __init__(self, tmpdir, plugins=(), extra=None, plugin_dir=None, workers=1,
                 log_level="info", start_timeout=15.0, env=None, wait=True, expect_fail=False,
                 port=None, config_text=None):
        self.tmpdir = tmpdir
        self.port = port or free_port()
        cfg = {
            "hub": {"listen": f"127.0.0.1:{self.port}", "workers": workers,
                    "store": os.path.join(tmpdir, "hubstore"), "map_size": "256MiB"},
            "plugins": {"dir": plugin_dir or PLUGIN_DIR, "tick": "200ms"},
            "log": {"level": log_level},
            "run_dir": os.path.join(tmpdir, "hubrun"),
            "user": RUN_AS,
        }
        os.makedirs(cfg["run_dir"], exist_ok=True)
        if plugins:
            cfg["plugins"]["list"] = list(plugins)
        for k, v in (extra or {}).items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
        self.config = cfg
        self.url = f"http://127.0.0.1:{self.port}"
        self._launch(tmpdir, "hub.yaml", config_text, env, wait, expect_fail, start_timeout)


# For tests whose plugins crash on purpose: under AddressSanitizer, let a SIGSEGV kill the
# worker as it would in production instead of ASan's handler turning it into exit(1).
CRASH_ENV = {"ASAN_OPTIONS": ":".join(filter(None, [os.environ.get("ASAN_OPTIONS", ""),
                                                     "handle_segv=0"]))}


def connect(addr, timeout=10.0):
    """Connect to "host:port", "[v6]:port" or "unix:/path"."""
    if addr.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(addr[5:])
        return s
    if addr.startswith("["):
        host, port = addr[1:].split("]:")
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    else:
        host, port = addr.rsplit(":", 1)
        s = socket.socket()
    s.settimeout(timeout)
    s.connect((host, int(port)))
    return s


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        d = s.recv(min(n - len(out), 1 << 20))
        if not d:
            break
        out += d
    return bytes(out)


def recv_all(s):
    """Read until EOF."""
    out = bytearray()
    while True:
        d = s.recv(1 << 20)
        if not d:
            return bytes(out)
        out += d


def roundtrip(port_or_addr, data, expect=None):
    """Send data, half-close, read until EOF; return what came back."""
    addr = port_or_addr if isinstance(port_or_addr, str) else f"127.0.0.1:{port_or_addr}"
    with connect(addr) as s:
        got = bytearray()
        s.setblocking(False)
        view = memoryview(data)
        sent = 0
        shut = False
        deadline = time.time() + 60
        while True:
            if time.time() > deadline:
                raise AssertionError("roundtrip timed out")
            if sent == len(data) and not shut:
                s.shutdown(socket.SHUT_WR)
                shut = True
            w = [s] if sent < len(data) else []
            r, w, _ = select.select([s], w, [], 1.0)
            if w:
                try:
                    sent += s.send(view[sent:sent + 262144])
                except BlockingIOError:
                    pass
            if r:
                try:
                    d = s.recv(1 << 20)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    return bytes(got)
                if not d:
                    return bytes(got)
                got += d


class TempDir:
    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="spoke-test-")
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


def test_plugin(name):
    """Path of a test-only plugin built by the suite (tests/plugins/NAME.c)."""
    return os.path.join(TEST_PLUGIN_DIR, name + ".so")


class SpokeCase(unittest.TestCase):
    """A test with its own temporary directory (self.dir) and echo upstream (self.echo)."""

    def setUp(self):
        self.tmp = TempDir()
        self.dir = self.tmp.__enter__()
        self.echo = EchoServer()

    def tearDown(self):
        self.echo.stop()
        self.tmp.__exit__(None, None, None)
