"""Plugins acting on real traffic through spoked: rewrite (any size), respond without the
upstream, close, signals, args/env/config handed to init, timers and on_tick."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import (SpokeCase, Spoked, connect, free_port, recv_all, recv_exact, roundtrip,  # noqa: E402
                       test_plugin)


tp = test_plugin


class VerdictTest(SpokeCase):
    def test_rewrite_same_size(self):
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_rewrite")}]) as sp:
            self.assertEqual(roundtrip(sp.port, b"hello, World 42"), b"HELLO, WORLD 42")

    def test_rewrite_grows_chunk(self):
        plugins = [{"file": tp("t_rewrite"), "config": {"suffix": "<END>"}}]
        with Spoked(self.dir, self.echo.address, plugins=plugins) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"abc")
            self.assertEqual(recv_exact(s, 8), b"ABC<END>")
            s.close()

    def test_rewrite_to_large_chunk(self):
        """A 4 KiB chunk rewritten to 4 MiB arrives whole at the upstream and back."""
        plugins = [{"file": tp("t_rewrite"), "config": {"expand": 1024}}]
        with Spoked(self.dir, self.echo.address, plugins=plugins) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"z" * 4096)
            got = recv_exact(s, 4096 * 1024)
            s.close()
            self.assertEqual(len(got), 4096 * 1024)
            self.assertEqual(got, b"Z" * (4096 * 1024))

    def test_later_plugin_sees_earlier_rewrite(self):
        plugins = [{"file": tp("t_rewrite"), "config": {"suffix": "PING"}},
                   {"file": tp("t_respond")}]
        # t_rewrite turns "ping" into "PINGPING"; t_respond answers chunks starting with
        # PING, so it must have seen the rewrite.
        with Spoked(self.dir, self.echo.address, plugins=plugins) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"ping")
            self.assertEqual(recv_exact(s, 5), b"PONG\n")
            s.close()
        self.assertEqual(self.echo.received, 0)

    def test_respond_without_upstream(self):
        """With lazy connect, a plugin answers while the upstream is down."""
        dead = free_port()
        extra = {"listen": {"upstream_connect": "lazy"}}
        with Spoked(self.dir, f"127.0.0.1:{dead}", plugins=[{"file": tp("t_respond")}],
                    extra=extra) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            for _ in range(3):
                s.sendall(b"PING")
                self.assertEqual(recv_exact(s, 5), b"PONG\n")
            s.sendall(b"QUIT")
            self.assertEqual(recv_all(s), b"BYE\n")  # answered, then closed
            s.close()
            self.assertNotIn("unreachable", sp.log())

    def test_respond_keeps_upstream_untouched(self):
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_respond")}]) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"PING")
            self.assertEqual(recv_exact(s, 5), b"PONG\n")
            s.sendall(b"data")
            self.assertEqual(recv_exact(s, 4), b"data")
            s.close()
        self.assertEqual(self.echo.received, 4)

    def test_close_verdict(self):
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_respond")}]) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"QUIT now")
            self.assertEqual(recv_all(s), b"BYE\n")
            s.close()

    def test_signals(self):
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_signal")}]) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"LOG")
            self.assertEqual(recv_exact(s, 3), b"LOG")  # a log signal does not stop traffic
            sp.wait_log(r"WARN .*plugin t-signal: conn \d+: t-signal saw LOG")
            s.sendall(b"TERM")
            self.assertEqual(recv_all(s), b"TERMINATED\n")
            s.close()
            sp.wait_log(r"terminate signal: asked to")

    def test_args_env_config_reach_init(self):
        plugins = [{"file": tp("t_args"), "args": ["a", "b", "c"], "env": ["K=V", "X=Y"],
                    "config": {"k1": "v1", "k2": {"sub": "v2"}}}]
        with Spoked(self.dir, self.echo.address, plugins=plugins) as sp:
            sp.wait_log(r"args=\[a\|b\|c\] env=\[K=V\|X=Y\] config=\[k1=v1\|k2\.sub=v2\]")
            sp.wait_log(r"edge=edge-test ns=test")
            sp.wait_log(r"t-args: config loaded")

    def test_timers_and_tick(self):
        with Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_timer")}]) as sp:
            sp.wait_log(r"t-timer tick 3")
            sp.wait_log(r"t-timer on_tick")


if __name__ == "__main__":
    unittest.main(verbosity=2)
