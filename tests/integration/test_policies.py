"""Policies over signals (docs/policies.md) through a real spoked: the t-policy test plugin
emits the signal a client asks for ("SIG NAME k=v ..."), and the policies in the config
decide what it does. Each built-in action, a Lua action, first-match order, policies that
fail (an error, an endless loop, unbounded allocation) without stopping traffic and
reported in the log and `spoked status`, reloads that change policies or are refused for
a broken one, --check-config's Lua messages with the file's line, and the sandbox."""

import os
import re
import signal
import socket
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import SpokeCase, Spoked, connect, recv_all, spoke_bin, test_plugin  # noqa: E402
from test_send_to_control import peek, queue_tool  # noqa: E402

PLUGIN_ID = 31


def t_policy():
    return {"file": test_plugin("t_policy"), "id": PLUGIN_ID}


def policies(*entries, **keys):
    p = dict(keys)
    p["list"] = list(entries)
    return {"policies": p}


class Conn:
    """One client connection; sig() sends a command and returns the "SEEN" line."""

    def __init__(self, port):
        self.s = connect(f"127.0.0.1:{port}")
        self.buf = b""

    def sig(self, text):
        self.s.sendall(text.encode() + b"\n")
        while b"\n" not in self.buf:
            d = self.s.recv(4096)
            if not d:
                raise AssertionError(f"connection closed after {text!r} (got {self.buf!r})")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def rest(self):
        """What comes until the connection closes."""
        out = self.buf + recv_all(self.s)
        self.buf = b""
        return out

    def close(self):
        self.s.close()


class PolicyCase(SpokeCase):
    def spoked(self, *entries, keys=None, **kw):
        extra = policies(*entries, **(keys or {}))
        extra["plugins"] = {"drain_timeout": "200ms"}  # the tests leave connections open
        return Spoked(self.dir, self.echo.address, plugins=[t_policy()], extra=extra, **kw)

    def assert_open(self, c):
        """The connection still carries traffic: a chunk goes to the upstream and back."""
        c.s.sendall(b"ping\n")
        self.assertEqual(self._line(c), "ping")

    def _line(self, c):
        while b"\n" not in c.buf:
            d = c.s.recv(4096)
            if not d:
                raise AssertionError("connection closed")
            c.buf += d
        line, c.buf = c.buf.split(b"\n", 1)
        return line.decode()

    def assert_terminated(self, c, cmd, rest=b""):
        self.assertEqual(c.sig(cmd), "SEEN " + cmd.split()[1])
        self.assertEqual(c.rest(), rest)


class BuiltinActionsTest(PolicyCase):
    def test_no_policy_for_the_signal_keeps_builtin(self):
        with self.spoked({"signal": "other", "action": "passthrough"}) as sp:
            c = Conn(sp.port)
            self.assert_terminated(c, "SIG terminate reason=plain")
            sp.wait_log(r"terminate signal: plain")

    def test_log(self):
        pol = {"signal": "log", "action": "log", "level": "error",
               "message": "${plugin}#${plugin_id} says ${message} (conn ${conn}, ${peer})"}
        with self.spoked(pol) as sp:
            c = Conn(sp.port)
            self.assertEqual(c.sig("SIG log level=debug message=hello"), "SEEN log")
            sp.wait_log(r"ERROR .*plugin t-policy: conn \d+: t-policy#31 says hello "
                        r"\(conn \d+, 127\.0\.0\.1:\d+\)")
            self.assert_open(c)

    def test_log_of_a_terminate_then_builtin(self):
        pol = {"signal": "terminate", "action": "log", "then": "builtin"}
        with self.spoked(pol) as sp:
            c = Conn(sp.port)
            self.assert_terminated(c, "SIG terminate reason=r1")
            sp.wait_log(r"INFO .*plugin t-policy: conn \d+: signal terminate: reason=r1")
            sp.wait_log(r"terminate signal: r1")

    def test_terminate_with_answer(self):
        pol = {"signal": "quit", "action": "terminate", "answer": "ERROR 57P01 bye\n"}
        with self.spoked(pol) as sp:
            c = Conn(sp.port)
            self.assert_terminated(c, "SIG quit", b"ERROR 57P01 bye\n")
            sp.wait_log(r"conn \d+: terminated by policies.list\[0\] \(signal 'quit'\)")

    def test_passthrough(self):
        with self.spoked({"signal": "terminate", "action": "passthrough"}) as sp:
            c = Conn(sp.port)
            self.assertEqual(c.sig("SIG terminate reason=x"), "SEEN terminate")
            self.assert_open(c)
            self.assertNotIn("terminate signal", sp.log())

    def test_close_drops_the_response(self):
        with self.spoked({"signal": "terminate", "action": "close"}) as sp:
            c = Conn(sp.port)
            c.s.sendall(b"SIG terminate\n")
            self.assertEqual(c.rest(), b"")
            sp.wait_log(r"closed by policies.list\[0\]")

    def test_send_to_control(self):
        pol = {"name": "audit", "signal": "terminate", "action": "send_to_control", "to": 77}
        with self.spoked(pol) as sp:
            c = Conn(sp.port)
            self.assert_terminated(c, "SIG terminate reason=audited")  # then: builtin
            recs = [r for r in peek(os.path.join(self.dir, "queue")) if r["plugin"] == 77]
            self.assertEqual(len(recs), 1, recs)
            self.assertEqual(recs[0]["type"], "application/json")
            self.assertIn(("signal", "terminate"), recs[0]["meta"])
            shown = queue_tool("show", str(recs[0]["seq"]), os.path.join(self.dir, "queue"))
            for part in ('"signal":"terminate"', '"fields":{"reason":"audited"}',
                         '"plugin":"t-policy"', '"plugin_id":31', '"policy":"audit"'):
                self.assertIn(part, shown.replace('\\"', '"'))
            self.assertRegex(sp.status(), r"policies: 1  matched 1 ")


class LuaTest(PolicyCase):
    def test_condition_and_lua_action(self):
        run = ("spoke.log('warn', 'lua saw ' .. signal.name .. ' n=' .. fields.n ..\n"
               "          ' from ' .. plugin.name .. '/' .. plugin.id .. ' conn ' .. conn.id)\n"
               "if tonumber(fields.n) >= 2 then return 'terminate', 'LUA-ANSWER\\n' end\n")
        pol = {"signal": "*", "when": "signal.name == 'tick' and conn.peer:match('^127%.')",
               "run": run}
        with self.spoked(pol) as sp:
            c = Conn(sp.port)
            self.assertEqual(c.sig("SIG tick n=1"), "SEEN tick")  # nil: passthrough
            sp.wait_log(r"WARN .*plugin t-policy: policies.list\[0\]: lua saw tick n=1 from "
                        r"t-policy/31 conn \d+")
            self.assert_open(c)
            self.assert_terminated(c, "SIG tick n=2", b"LUA-ANSWER\n")
            c2 = Conn(sp.port)  # the condition does not hold: built-in (terminate)
            self.assert_terminated(c2, "SIG terminate reason=cond-false")
            sp.wait_log(r"terminate signal: cond-false")

    def test_first_match_wins(self):
        entries = [{"signal": "terminate", "when": "fields.who == 'nobody'", "action": "close"},
                   {"signal": "terminate", "action": "passthrough"},
                   {"signal": "*", "action": "close"}]
        with self.spoked(*entries) as sp:
            c = Conn(sp.port)
            self.assertEqual(c.sig("SIG terminate who=someone"), "SEEN terminate")  # 2nd
            self.assert_open(c)
            c.s.sendall(b"SIG terminate who=nobody\n")  # 1st: close
            self.assertEqual(c.rest(), b"")
            c2 = Conn(sp.port)
            c2.s.sendall(b"SIG other\n")  # 3rd
            self.assertEqual(c2.rest(), b"")

    SETUP = """
recent = {}   -- client address -> times of its terminate signals (this worker's)
function ip_of(peer) return peer:match('^(.*):%d+$') or peer end
function in_window(times, window)
  local kept, now = {}, spoke.now()
  for _, at in ipairs(times or {}) do
    if now - at < window then kept[#kept + 1] = at end
  end
  return kept
end
function record(peer, window)
  local ip = ip_of(peer)
  local kept = in_window(recent[ip], window)
  kept[#kept + 1] = spoke.now()
  recent[ip] = kept
end
function blocked(peer, n, window)
  return #in_window(recent[ip_of(peer)], window) >= n
end
"""

    def test_block_a_client_after_n_terminates(self):
        """docs/policies.md's first example: state kept in the worker's Lua state by
        policies.setup's functions; the host's own "open" signal refuses the client once it
        caused 3 terminate signals within a minute, before any plugin sees it."""
        entries = [{"signal": "terminate", "run": "record(conn.peer, 60) return 'builtin'"},
                   {"signal": "open", "when": "blocked(conn.peer, 3, 60)",
                    "action": "terminate", "answer": "BLOCKED\n"}]
        with self.spoked(*entries, keys={"setup": self.SETUP}) as sp:
            for i in range(3):
                c = Conn(sp.port)
                self.assert_open(c)  # not blocked yet
                self.assert_terminated(c, f"SIG terminate reason=t{i}")
            c = Conn(sp.port)
            self.assertEqual(c.rest(), b"BLOCKED\n")
            sp.wait_log(r"policies: conn \d+: terminated by policies.list\[1\] \(signal 'open'\)")

    def test_star_does_not_match_the_hosts_open(self):
        with self.spoked({"signal": "*", "action": "close"}) as sp:
            c = Conn(sp.port)
            self.assert_open(c)


class FailingPoliciesTest(PolicyCase):
    CASES = {
        "errors": {"signal": "terminate", "when": "fields.reason:upper() == nil or error('bad policy')",
                   "action": "passthrough"},
        "timeouts": {"signal": "terminate", "when": "(function() while true do end end)()",
                     "action": "passthrough"},
        "out of memory": {"signal": "terminate", "run": "t = {}\nwhile true do t[#t + 1] = "
                          "string.rep('x', 4096) .. #t end", "action": None},
    }

    def check(self, kind, pol, log_re):
        pol = {k: v for k, v in pol.items() if v is not None}
        with self.spoked(pol) as sp:
            for i in range(3):  # every time: skipped, built-in applies, traffic flows
                c = Conn(sp.port)
                self.assert_terminated(c, f"SIG terminate reason=try{i}")
                sp.wait_log(rf"terminate signal: try{i}")
            sp.wait_log(log_re)
            c = Conn(sp.port)
            self.assert_open(c)
            m = re.search(r"failed: errors (\d+)  timeouts (\d+)  out of memory (\d+)",
                          sp.status())
            got = dict(zip(("errors", "timeouts", "out of memory"), map(int, m.groups())))
            self.assertEqual(got[kind], 3, sp.status())

    def test_error(self):
        self.check("errors", self.CASES["errors"],
                   r"WARN .*plugin t-policy: policies.list\[0\] skipped \(error\) for signal "
                   r"'terminate': \S+spoke.yaml:\d+: policies.list\[0\].when: Lua: bad policy; "
                   r"built-in behaviour applies")

    def test_endless_loop(self):
        self.check("timeouts", self.CASES["timeouts"],
                   r"skipped \(timeout\) .*ran past policies.timeout \(100000 instructions\)")

    def test_endless_loop_that_catches_its_timeout(self):
        pol = {"signal": "terminate", "action": "passthrough",
               "when": "(function() while true do pcall(function() while true do end end) end end)()"}
        self.check("timeouts", pol, r"skipped \(timeout\)")

    def test_unbounded_allocation(self):
        self.check("out of memory", self.CASES["out of memory"],
                   r"skipped \(out of memory\) .*ran out of policies.memory")

    def test_bad_return_value(self):
        self.check("errors", {"signal": "terminate", "run": "return 42"},
                   r"policies.list\[0\].run: Lua: returned number; expected nothing")


class ReloadTest(PolicyCase):
    def test_reload_changes_policies_for_new_connections(self):
        with self.spoked({"signal": "terminate", "action": "passthrough"}) as sp:
            old = Conn(sp.port)
            self.assertEqual(old.sig("SIG terminate"), "SEEN terminate")
            cfg = dict(sp.config)
            cfg.update(policies({"signal": "terminate", "action": "terminate",
                                 "answer": "NEW\n"}))
            sp.write_config(cfg)
            sp.send_signal(signal.SIGHUP)
            sp.wait_log(r"generation 2 serving")
            new = Conn(sp.port)
            self.assert_terminated(new, "SIG terminate", b"NEW\n")

    def test_reload_with_a_broken_policy_is_refused(self):
        with self.spoked({"signal": "terminate", "action": "passthrough"}) as sp:
            cfg = dict(sp.config)
            cfg.update(policies({"signal": "terminate", "when": "fields.x ==", "action": "close"}))
            sp.write_config(cfg)
            sp.send_signal(signal.SIGHUP)
            sp.wait_log(r"reload failed: .*spoke.yaml:\d+: policies.list\[0\].when: Lua: "
                        r"unexpected symbol")
            c = Conn(sp.port)  # the old generation and its policies still serve
            self.assertEqual(c.sig("SIG terminate"), "SEEN terminate")
            self.assert_open(c)


class CheckConfigTest(unittest.TestCase):
    def check(self, text):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "spoke.yaml")
            with open(path, "w") as f:
                f.write(text)
            p = subprocess.run([spoke_bin("spoked"), "--check-config", path],
                               capture_output=True, text=True, timeout=30)
            return p.returncode, p.stdout + p.stderr

    def test_lua_error_names_the_file_line(self):
        text = ("listen: { upstream: 127.0.0.1:5432 }\n"  # 1
                "policies:\n"                            # 2
                "  list:\n"                              # 3
                "    - signal: log\n"                    # 4
                "      action: passthrough\n"            # 5
                "    - signal: terminate\n"              # 6
                "      run: |\n"                         # 7
                "        local n = 1\n"                  # 8
                "        if n then\n"                    # 9
                "          n = = 2\n"                    # 10
                "        end\n")                         # 11
        code, out = self.check(text)
        self.assertEqual(code, 1, out)
        self.assertRegex(out, r"spoke.yaml:10: policies.list\[1\].run: Lua: unexpected symbol "
                         r"near '='")

    def test_setup_error_and_good_config(self):
        code, out = self.check("listen: { upstream: 127.0.0.1:5432 }\npolicies:\n"
                               "  setup: \"x = 1\\nerror('no')\"\n")
        self.assertEqual(code, 1, out)
        self.assertRegex(out, r"spoke.yaml:3: policies.setup: Lua: no")
        code, out = self.check("listen: { upstream: 127.0.0.1:5432 }\npolicies:\n"
                               "  list:\n    - { signal: '*', when: 'true', action: log }\n")
        self.assertEqual(code, 0, out)
        self.assertIn("signal: \"*\"", out)

    def test_parameter_of_another_action(self):
        code, out = self.check("listen: { upstream: 127.0.0.1:5432 }\npolicies:\n  list:\n"
                               "    - { signal: x, action: log, answer: no }\n")
        self.assertEqual(code, 1, out)
        self.assertIn("`answer:` is a parameter of action terminate", out)


class SandboxTest(PolicyCase):
    ABSENT = ["os", "io", "debug", "package", "require", "dofile", "loadfile", "print",
              "collectgarbage", "coroutine", "os.execute", "io.open", "debug.sethook",
              "string.dump", "('').dump"]

    def test_removed_libraries_and_globals(self):
        probes = "\n".join(
            f"report({name!r}, function() return {name} end)" for name in self.ABSENT)
        run = ("local function report(name, f)\n"
               "  local ok, v = pcall(f)\n"
               "  spoke.log('info', 'probe ' .. name .. ': ' .. ((ok and v ~= nil) and 'PRESENT' or 'absent'))\n"
               "end\n" + probes + "\n"
               "local f, err = load('\\27Lua\\x54\\0binary')\n"
               "spoke.log('info', 'probe binary load: ' .. (f == nil and err or 'PRESENT'))\n"
               "local g = load('return 6 * 7')\n"
               "spoke.log('info', 'probe text load: ' .. tostring(g and g()))\n")
        with self.spoked({"signal": "probe", "run": run}) as sp:
            c = Conn(sp.port)
            self.assertEqual(c.sig("SIG probe"), "SEEN probe")
            sp.wait_log(r"probe text load: 42")
            for name in self.ABSENT:
                sp.wait_log(r"probe " + re.escape(name) + r": absent")
            self.assertNotIn("PRESENT", sp.log())
            sp.wait_log(r"probe binary load: attempt to load a binary chunk \(mode is 't'\)")


if __name__ == "__main__":
    unittest.main(verbosity=2)
