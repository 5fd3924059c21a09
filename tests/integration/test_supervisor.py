"""The supervisor: crash isolation and restart, quarantine, the hook watchdog, heartbeat
loss, health checks, hot reload with no dropped connection, a failed reload keeping the
old generation, status, and no orphans after kill -9 of the supervisor."""

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import (CRASH_ENV, HOST_ABI, SpokeCase, Spoked, connect, recv_all,  # noqa: E402
                       recv_exact, roundtrip, spoke_bin, test_plugin)


tp = test_plugin


def dropped(port, payload):
    """Send payload; True if the connection was dropped without an answer."""
    s = connect(f"127.0.0.1:{port}")
    try:
        s.sendall(payload)
        return recv_all(s) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        s.close()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


class SupervisorTest(SpokeCase):
    def test_crash_restart_and_quarantine(self):
        plugins = [{"file": tp("t_crash")}, {"file": "passthrough.so"}]
        with Spoked(self.dir, self.echo.address, plugins=plugins, env=CRASH_ENV) as sp:
            for i in range(3):
                self.assertTrue(dropped(sp.port, b"CRASH"), "crashing connection not dropped")
                # The next connection waits in the backlog and is served after the restart.
                self.assertEqual(roundtrip(sp.port, b"after crash %d" % i), b"after crash %d" % i)
                sp.wait_log(r"worker 0 \(pid \d+\) crashed: plugin t-crash, SIGSEGV in "
                            r"on_traffic_from_client")
            sp.wait_log(r"plugin t-crash quarantined: 3 crashes in 60 s")
            sp.wait_log(r"generation 2 serving")
            # Traffic flows without it: CRASH is just bytes now.
            self.assertEqual(roundtrip(sp.port, b"CRASH"), b"CRASH")
            sp.wait_log(r"t_crash\.so: quarantined after repeated crashes; not loaded")
            status = sp.status()
            self.assertRegex(status, r"t-crash\s+quarantined\s+crashes 3")
            self.assertRegex(status, r"passthrough\s+1\.0\.0\s+active")
            self.assertNotRegex(status, r"t-crash\s+1\.0\.0\s+active")

    def test_hook_over_timeout_is_logged_then_killed(self):
        extra = {"plugins": {"hook_timeout": "20ms"}}
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_sleep")}],
                    extra=extra) as sp:
            # 100 ms: over hook_timeout, under the hard limit (200 ms): logged, not killed.
            self.assertEqual(roundtrip(sp.port, b"NAP"), b"NAP")
            sp.wait_log(r"plugin t-sleep on_traffic_from_client still running after \d+ ms "
                        r"\(plugins.hook_timeout 20 ms\)")
            t0 = time.time()
            self.assertTrue(dropped(sp.port, b"SLEEP"))
            self.assertLess(time.time() - t0, 10)
            sp.wait_log(r"plugin t-sleep on_traffic_from_client running for \d+ ms, over 10x "
                        r"plugins.hook_timeout; killing it")
            sp.wait_log(r"crashed: plugin t-sleep")
            self.assertEqual(roundtrip(sp.port, b"served again"), b"served again")
            self.assertRegex(sp.status(), r"t-sleep\s+1\.0\.0\s+active\s+crashes 1\s+slow hooks 2")

    def test_spinning_timer_loses_heartbeat(self):
        extra = {"plugins": {"hook_timeout": "50ms"}}
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_spin")}],
                    extra=extra) as sp:
            sp.wait_log(r"heartbeat lost: plugin t-spin timer running for \d+ ms", timeout=20)
            sp.wait_log(r"restarting worker 0")

    def test_failed_health_checks_count_as_crash(self):
        extra = {"plugins": {"health_check_period": "100ms", "health_fail_limit": 3}}
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_unhealthy")}],
                    extra=extra) as sp:
            sp.wait_log(r"plugin t-unhealthy: failed 3 health checks in a row")
            sp.wait_log(r"crashed: plugin t-unhealthy, failed health checks")
            sp.wait_log(r"plugin t-unhealthy quarantined", timeout=20)
            self.assertEqual(roundtrip(sp.port, b"ok"), b"ok")

    def test_crash_in_on_config_loaded_is_blamed_and_quarantined(self):
        """on_config_loaded is stamped in the slot like a traffic hook: a restarted worker
        that crashes there is blamed on the plugin, and quarantine follows."""
        marker = os.path.join(self.dir, "crash-now")
        plugins = [{"file": tp("t_hook_fault"),
                    "config": {"crash_in_config_loaded_if": marker}},
                   {"file": "passthrough.so"}]
        with Spoked(self.dir, self.echo.address, plugins=plugins, env=CRASH_ENV) as sp:
            self.assertEqual(roundtrip(sp.port, b"before"), b"before")
            open(marker, "w").close()
            for pid in sp.worker_pids():
                os.kill(pid, signal.SIGKILL)
            sp.wait_log(r"worker 0 \(pid \d+\) crashed: plugin t-hook-fault, SIGSEGV in "
                        r"on_config_loaded")
            sp.wait_log(r"plugin t-hook-fault quarantined: 3 crashes in 60 s")
            sp.wait_log(r"generation 2 serving")
            self.assertEqual(roundtrip(sp.port, b"after"), b"after")
            status = sp.status()
            self.assertRegex(status, r"t-hook-fault\s+quarantined\s+crashes 3")
            self.assertRegex(status, r"passthrough\s+1\.0\.0\s+active")

    def test_hang_in_fini_of_a_draining_generation_is_blamed(self):
        """fini is stamped too, and the watchdog watches draining generations: a worker of
        the old generation that hangs in fini after a reload is killed and blamed."""
        extra = {"plugins": {"hook_timeout": "20ms"}}
        plugins = [{"file": tp("t_hook_fault"), "config": {"hang_in_fini": True}}]
        with Spoked(self.dir, self.echo.address, plugins=plugins, extra=extra) as sp:
            t0 = time.time()
            sp.send_signal(signal.SIGHUP)
            sp.wait_log(r"generation 2 serving")
            sp.wait_log(r"generation 1 worker 0 \(pid \d+\): (heartbeat lost: )?plugin "
                        r"t-hook-fault fini running "
                        r"for \d+ ms, over 10x plugins.hook_timeout; killing it")
            sp.wait_log(r"generation 1 worker 0 \(pid \d+\) crashed: plugin t-hook-fault, "
                        r"(heartbeat lost: )?plugin t-hook-fault fini running")
            sp.wait_log(r"generation 1 finished draining")
            self.assertLess(time.time() - t0, 10)
            self.assertEqual(roundtrip(sp.port, b"still serving"), b"still serving")
            self.assertRegex(sp.status(), r"t-hook-fault\s+1\.0\.0\s+active\s+crashes 1")

    def test_no_restart_when_reload_on_crash_false(self):
        extra = {"plugins": {"reload_on_crash": False}}
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_crash")}],
                    extra=extra, env=CRASH_ENV) as sp:
            self.assertTrue(dropped(sp.port, b"CRASH"))
            sp.wait_log(r"worker 0 not restarted \(plugins.reload_on_crash is false\)")
            self.assertRegex(sp.status(), r"worker 0\s+down")

    def reload_setup(self):
        pdir = os.path.join(self.dir, "plugins")
        os.makedirs(pdir, exist_ok=True)
        shutil.copy(tp("t_version_v1"), os.path.join(pdir, "t-version.so"))
        return pdir

    def install(self, pdir, src):
        """Install by rename, as docs/operations.md asks."""
        tmp = os.path.join(pdir, ".t-version.so.new")
        shutil.copy(src, tmp)
        os.rename(tmp, os.path.join(pdir, "t-version.so"))

    def ask_version(self, port):
        s = connect(f"127.0.0.1:{port}")
        s.sendall(b"VERSION?")
        got = recv_exact(s, 16)
        s.close()
        return got

    def test_reload_under_load_breaks_nothing(self):
        pdir = self.reload_setup()
        plugins = [{"file": "t-version.so"}]
        with Spoked(self.dir, self.echo.address, plugins=plugins, plugin_dir=pdir,
                    extra={"listen": {"workers": 2}}) as sp:
            self.assertEqual(self.ask_version(sp.port), b"t-version 1.0.0\n")
            stop = threading.Event()
            errors, rounds = [], [0] * 50

            def stream(i):
                try:
                    s = connect(f"127.0.0.1:{sp.port}")
                    n = 0
                    while not stop.is_set():
                        msg = (b"%03d:%08d;" % (i, n)) * 64
                        s.sendall(msg)
                        got = recv_exact(s, len(msg))
                        if got != msg:
                            errors.append(f"conn {i}: round {n}: got {len(got)} bytes")
                            return
                        n += 1
                        rounds[i] = n
                    s.close()
                except OSError as e:
                    errors.append(f"conn {i}: {e!r}")

            threads = [threading.Thread(target=stream, args=(i,)) for i in range(50)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            self.install(pdir, tp("t_version_v2"))
            sp.send_signal(signal.SIGHUP)
            sp.wait_log(r"generation 2 serving")
            before = sum(rounds)
            time.sleep(0.5)
            self.assertEqual(self.ask_version(sp.port), b"t-version 2.0.0\n")
            stop.set()
            for t in threads:
                t.join(30)
            self.assertEqual(errors, [])
            self.assertGreater(sum(rounds), before, "traffic stopped during the reload")
            self.assertTrue(all(r > 0 for r in rounds))
            sp.wait_log(r"generation 1 finished draining")

    def check_failed_reload(self, sp, reason_regex, status=True):
        sp.send_signal(signal.SIGHUP)
        sp.wait_log(r"reload failed: " + reason_regex)
        sp.wait_log(r"generation 1 keeps serving")
        self.assertEqual(self.ask_version(sp.port), b"t-version 1.0.0\n")
        self.assertEqual(roundtrip(sp.port, b"still here"), b"still here")
        if status:  # (`spoked status` reads run_dir from the config file)
            self.assertRegex(sp.status(), r"last reload: failed: ")

    def test_failed_reloads_keep_old_generation(self):
        pdir = self.reload_setup()
        plugins = [{"file": "t-version.so"}]
        with Spoked(self.dir, self.echo.address, plugins=plugins, plugin_dir=pdir,
                    env=CRASH_ENV) as sp:
            keep = socket.create_connection(("127.0.0.1", sp.port))
            # 1. an ABI mismatch
            self.install(pdir, tp("t_abi_major"))
            self.check_failed_reload(sp, r".*t-version\.so: refused: plugin ABI 2\.0, host ABI "
                                      + re.escape(HOST_ABI))
            self.install(pdir, tp("t_version_v1"))
            # 2. an init failure
            cfg = copy.deepcopy(sp.config)
            cfg["plugins"]["list"] = [{"file": "t-version.so"}, {"file": tp("t_init_fail")}]
            sp.write_config(cfg)
            self.check_failed_reload(sp, r".*t_init_fail\.so: refused: plugin 't-init-fail' init failed")
            # 3. a crash in init
            cfg["plugins"]["list"] = [{"file": "t-version.so"},
                                      {"file": tp("t_crash"), "config": {"crash_in_init": True}}]
            sp.write_config(cfg)
            self.check_failed_reload(sp, r"worker 0 crashed: plugin t-crash: SIGSEGV in init")
            # 4. a config that does not parse
            sp.write_config(text="listen: [\n")
            self.check_failed_reload(sp, r".*spoke\.yaml:\d+: ", status=False)
            # The connection opened before all this still works.
            keep.sendall(b"through it all")
            self.assertEqual(recv_exact(keep, 14), b"through it all")
            keep.close()

    def test_reload_with_hanging_init_times_out(self):
        pdir = self.reload_setup()
        extra = {"plugins": {"start_timeout": "500ms"}}
        with Spoked(self.dir, self.echo.address, plugins=[{"file": "t-version.so"}],
                    plugin_dir=pdir, extra=extra) as sp:
            cfg = copy.deepcopy(sp.config)
            cfg["plugins"]["list"] = [{"file": "t-version.so"},
                                      {"file": tp("t_sleep"), "config": {"hang_in_init": True}}]
            sp.write_config(cfg)
            t0 = time.time()
            self.check_failed_reload(
                sp, r"worker 0 crashed: plugin t-sleep: did not start within "
                    r"plugins.start_timeout \(in plugin t-sleep, init\)")
            self.assertLess(time.time() - t0, 10)

    def test_plugin_overwritten_in_place_does_not_crash_workers(self):
        """cp over a loaded .so (same inode, new bytes): running workers run their private
        copy, so they keep serving; a reload then picks up the new file."""
        pdir = self.reload_setup()
        with Spoked(self.dir, self.echo.address, plugins=[{"file": "t-version.so"}],
                    plugin_dir=pdir) as sp:
            self.assertEqual(self.ask_version(sp.port), b"t-version 1.0.0\n")
            with open(tp("t_version_v2"), "rb") as src, \
                    open(os.path.join(pdir, "t-version.so"), "r+b") as dst:
                dst.truncate(0)
                dst.write(src.read())
            for _ in range(5):
                self.assertEqual(self.ask_version(sp.port), b"t-version 1.0.0\n")
            self.assertNotIn("crashed", sp.log())
            sp.send_signal(signal.SIGHUP)
            # (until the old generation has stopped accepting, it may take a new client)
            sp.wait_log(r"generation 1 finished draining")
            self.assertEqual(self.ask_version(sp.port), b"t-version 2.0.0\n")

    def test_worker_restarted_while_a_failing_reload_starts(self):
        """A serving worker that crashes while a new generation starts is restarted at once,
        and serves, whether or not the reload then succeeds (here it fails: a plugin's init
        hangs past start_timeout)."""
        extra = {"plugins": {"start_timeout": "3s", "crash_limit": 10}}
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_crash")}],
                    extra=extra, env=CRASH_ENV) as sp:
            cfg = copy.deepcopy(sp.config)
            cfg["plugins"]["list"] = [{"file": tp("t_crash")},
                                      {"file": tp("t_sleep"), "config": {"hang_in_init": True}}]
            sp.write_config(cfg)
            sp.send_signal(signal.SIGHUP)
            sp.wait_log(r"reload: generation 2 starting")
            self.assertTrue(dropped(sp.port, b"CRASH"))
            sp.wait_log(r"generation 1 worker 0 \(pid \d+\) crashed: plugin t-crash")
            self.assertEqual(roundtrip(sp.port, b"during"), b"during")
            sp.wait_log(r"reload failed: .*did not start within plugins.start_timeout")
            self.assertEqual(roundtrip(sp.port, b"after"), b"after")
            self.assertNotIn("not restarted", sp.log())

    def wait_log_count(self, sp, pattern, n, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(re.findall(pattern, sp.log())) >= n:
                return
            time.sleep(0.02)
        raise AssertionError(f"log never matched {pattern!r} {n} times:\n{sp.log()}")

    def test_outside_sigkill_is_named_not_blamed(self):
        """A SIGKILL the supervisor did not send (the OOM killer, an operator) is logged with
        the plugin and hook that ran, and not counted as that plugin's crash: two of them
        under crash_limit 2 do not quarantine it."""
        extra = {"plugins": {"hook_timeout": "500ms", "crash_limit": 2}}
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_sleep")}],
                    extra=extra) as sp:
            for i in range(1, 3):
                s = connect(f"127.0.0.1:{sp.port}")
                s.sendall(b"SLEEP")
                # (the watchdog would kill it itself at 5 s)
                self.wait_log_count(sp, r"plugin t-sleep on_traffic_from_client still running", i)
                for pid in sp.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                s.close()
                self.wait_log_count(sp, r"generation 1 worker 0 \(pid \d+\) ended: SIGKILL not "
                                        r"sent by the supervisor \(the OOM killer or an "
                                        r"operator\?\) while in plugin t-sleep "
                                        r"on_traffic_from_client; not counted as its crash", i)
                self.assertEqual(roundtrip(sp.port, b"again %d" % i), b"again %d" % i)
            self.assertNotIn("quarantined", sp.log())
            self.assertNotIn("crashed: plugin t-sleep", sp.log())
            self.assertRegex(sp.status(), r"t-sleep\s+1\.0\.0\s+active\s+crashes 0")

    def test_restart_backoff_starts_with_the_second_crash_and_decays(self):
        """The first crash restarts at once; a second soon after waits; the backoff follows
        the crash rate, so after a quiet while the next crash restarts at once again."""
        extra = {"plugins": {"crash_limit": 10}}
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_crash")}],
                    extra=extra, env=CRASH_ENV) as sp:
            restarts = r"restarting worker 0 in (\d+) ms"
            self.assertTrue(dropped(sp.port, b"CRASH"))
            self.assertEqual(roundtrip(sp.port, b"1"), b"1")
            self.assertTrue(dropped(sp.port, b"CRASH"))
            self.assertEqual(roundtrip(sp.port, b"2"), b"2")
            self.wait_log_count(sp, restarts, 2)
            first, second = (int(ms) for ms in re.findall(restarts, sp.log()))
            self.assertEqual(first, 0, sp.log())
            self.assertGreater(second, 0, sp.log())
            time.sleep(15)  # three half-lives of the backoff (supervisor.c)
            self.assertTrue(dropped(sp.port, b"CRASH"))
            self.assertEqual(roundtrip(sp.port, b"3"), b"3")
            # the restart that follows each crash (not one for another reason)
            third = r"(?s)crashed: plugin t-crash(?:(?!crashed: ).)*?" + restarts
            self.wait_log_count(sp, third, 3)
            self.assertEqual(int(re.findall(third, sp.log())[2]), 0, sp.log())

    def test_sighup_while_first_generation_starts(self):
        """A reload requested while a generation is starting runs after it, never kills it."""
        sp = Spoked(self.dir, self.echo.address, plugins=[{"file": "passthrough.so"}],
                    wait=False)
        try:
            sp.wait_log(r"supervisor pid \d+")
            sp.send_signal(signal.SIGHUP)
            sp.wait_log(r"generation 2 serving")
            self.assertEqual(roundtrip(sp.port, b"both fine"), b"both fine")
            self.assertNotIn("cannot start", sp.log())
        finally:
            self.assertEqual(sp.stop(), 0, sp.log())

    def test_spoked_reload_command(self):
        pdir = self.reload_setup()
        with Spoked(self.dir, self.echo.address, plugins=[{"file": "t-version.so"}],
                    plugin_dir=pdir) as sp:
            self.install(pdir, tp("t_version_v2"))
            p = subprocess.run([spoke_bin("spoked"), "reload", "-c", sp.config_path],
                               capture_output=True, text=True, timeout=10)
            self.assertEqual(p.returncode, 0, p.stderr)
            sp.wait_log(r"generation 1 finished draining")
            self.assertEqual(self.ask_version(sp.port), b"t-version 2.0.0\n")
            self.assertRegex(sp.status(), r"last reload: ok: generation 2 replaced 1")

    def test_status_output(self):
        with Spoked(self.dir, self.echo.address, plugins=[{"file": "passthrough.so"}],
                    extra={"listen": {"workers": 2}}) as sp:
            sp.wait_log(r"generation 1 serving \(2 workers\)")
            st = sp.status()
            self.assertRegex(st, r"generation 1 \(serving\): 2 workers")
            self.assertRegex(st, r"worker 0\s+pid \d+\s+ready\s+up [\d.]+ s\s+restarts 0")
            self.assertRegex(st, r"worker 1\s+pid \d+\s+ready")
            self.assertRegex(st, r"passthrough\s+1\.0\.0\s+active")

    def test_kill9_supervisor_leaves_no_worker(self):
        sp = Spoked(self.dir, self.echo.address, extra={"listen": {"workers": 2}})
        try:
            sp.wait_log(r"generation 1 serving")
            workers = sp.worker_pids()
            self.assertEqual(len(workers), 2)
            os.kill(sp.proc.pid, signal.SIGKILL)
            sp.proc.wait(5)
            deadline = time.time() + 5
            while time.time() < deadline and any(alive(p) for p in workers):
                time.sleep(0.05)
            self.assertFalse(any(alive(p) for p in workers), "a worker outlived its supervisor")
        finally:
            sp.stop()

    def test_sigquit_exits_at_once(self):
        sp = Spoked(self.dir, self.echo.address)
        s = connect(f"127.0.0.1:{sp.port}")
        s.sendall(b"x")
        recv_exact(s, 1)
        t0 = time.time()
        sp.send_signal(signal.SIGQUIT)
        sp.proc.wait(10)
        self.assertLess(time.time() - t0, 5)
        self.assertEqual(recv_all(s), b"")
        s.close()
        sp.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
