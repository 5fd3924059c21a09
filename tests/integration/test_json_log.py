"""log.format: json -- every line spoked writes to stderr is one JSON object with the fixed
keys (time, level, process, pid, message), and a plugin's lines carry its name, the
connection and the fields of its log signal; text stays the default."""

import json
import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import SpokeCase, Spoked, connect, recv_exact, test_plugin  # noqa: E402


class JsonLogTest(SpokeCase):
    def run_spoked(self, fmt):
        plugins = [{"file": test_plugin("t_signal")}, {"file": test_plugin("t_timer")}]
        extra = {"log": {"level": "info", "format": fmt}} if fmt else None
        with Spoked(self.dir, self.echo.address, plugins=plugins, extra=extra) as sp:
            s = connect(f"127.0.0.1:{sp.port}")
            s.sendall(b"LOG")
            self.assertEqual(recv_exact(s, 3), b"LOG")
            s.close()
            sp.wait_log(r"t-signal saw LOG")
            sp.wait_log(r"t-timer tick 2")
        # The context manager stopped spoked: the log holds its shutdown lines too.
        return sp.log()

    def test_every_line_is_json_with_fields(self):
        text = self.run_spoked("json")
        lines = text.splitlines()
        self.assertGreater(len(lines), 5, text)
        objs = []
        for ln in lines:
            try:
                o = json.loads(ln)
            except ValueError as e:
                self.fail(f"not a JSON line ({e}): {ln!r}\nwhole log:\n{text}")
            self.assertIsInstance(o, dict, ln)
            for k in ("time", "level", "process", "pid", "message"):
                self.assertIn(k, o, ln)
            self.assertRegex(o["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertIn(o["level"], ("debug", "info", "warn", "error"))
            self.assertIsInstance(o["pid"], int)
            self.assertTrue(o["process"].startswith("spoked"), ln)
            objs.append(o)
        # the supervisor and a worker both write JSON
        procs = {o["process"] for o in objs}
        self.assertIn("spoked", procs)
        self.assertTrue(any(re.match(r"spoked worker \d+\.\d+$", p) for p in procs), procs)
        # the log signal: plugin, connection, level and the signal's own fields
        sig = [o for o in objs if o["message"] == "t-signal saw LOG"]
        self.assertEqual(len(sig), 1, text)
        sig = sig[0]
        self.assertEqual(sig["plugin"], "t-signal")
        self.assertEqual(sig["level"], "warn")
        self.assertIsInstance(sig["conn"], int)
        self.assertGreater(sig["conn"], 0)
        self.assertEqual(sig["detail"], "quote \" backslash \\ tab \t caf\u00e9")
        self.assertEqual(sig["field.pid"], "not the pid")
        self.assertIsInstance(sig["pid"], int)
        # a plugin's host->log() line names the plugin and no connection
        tick = [o for o in objs if o["message"].startswith("t-timer tick")]
        self.assertTrue(tick, text)
        self.assertEqual(tick[0]["plugin"], "t-timer")
        self.assertNotIn("conn", tick[0])

    def test_text_is_the_default(self):
        text = self.run_spoked(None)
        for ln in text.splitlines():
            self.assertFalse(ln.startswith("{"), ln)
        self.assertRegex(text, r"WARN .*plugin t-signal: conn \d+: t-signal saw LOG")
        self.assertRegex(text, r"INFO .*plugin t-timer: t-timer tick 2")


if __name__ == "__main__":
    unittest.main(verbosity=2)
