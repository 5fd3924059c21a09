"""The example plugins read durations and sizes through the host's config_get_duration and
config_get_size (ABI 1.1), so a plugin's `config:` takes exactly the config file's units:
counter's `interval` and pg-query-log's `max_message` accept what the file accepts
(1500ms, 1m; 65536, 64KiB, 1MB) and refuse the rest with a message naming the key; so do
pg-cache's `ttl`, `report_interval`, `max_bytes` and `invalidate`."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import SpokeCase, Spoked, roundtrip  # noqa: E402


class PluginConfigUnitsTest(SpokeCase):
    def test_counter_interval_units(self):
        for good in ("1500ms", "1m", "24h"):
            with Spoked(self.dir, self.echo.address,
                        plugins=[{"file": "counter.so", "config": {"interval": good}}]) as sp:
                self.assertEqual(roundtrip(sp.port, b"x"), b"x")

    def test_pg_query_log_max_message(self):
        for good in ("65536", "64KiB", "1MB", "1GiB"):
            plugins = [{"file": "pg-query-log.so", "config": {"max_message": good}}]
            with Spoked(self.dir, self.echo.address, plugins=plugins) as sp:
                self.assertEqual(roundtrip(sp.port, b"x"), b"x")
        for bad in ("1.5MiB", "1K", "64kib", "0", "2GiB", "lots"):
            plugins = [{"file": "pg-query-log.so", "config": {"max_message": bad}}]
            sp = Spoked(self.dir, self.echo.address, plugins=plugins, expect_fail=True)
            sp.stop()
            self.assertIn(f"max_message: '{bad}' is not a size", sp.log())
            self.assertNotEqual(sp.proc.returncode, 0)

    def test_pg_cache_config(self):
        base = {"name": "pg-cache", "id": 42, "file": "pg-cache.so"}
        good = {"ttl": "1500ms", "max_bytes": "1MiB", "report_interval": "1m",
                "invalidate": "all"}
        with Spoked(self.dir, self.echo.address, plugins=[dict(base, config=good)]) as sp:
            self.assertEqual(roundtrip(sp.port, b"x"), b"x")  # not PostgreSQL: passed on
        bad = [({"ttl": "0"}, "ttl: '0' is not a duration"),
               ({"ttl": "1.5s"}, "ttl: '1.5s' is not a duration"),
               ({"report_interval": "25h"}, "report_interval: '25h' is not a duration"),
               ({"max_bytes": "1KiB"}, "max_bytes: '1KiB' is not a size"),
               ({"max_bytes": "2TiB"}, "max_bytes: '2TiB' is not a size"),
               ({"invalidate": "some"}, "invalidate: 'some' is not 'tables' or 'all'")]
        for cfg, msg in bad:
            sp = Spoked(self.dir, self.echo.address, plugins=[dict(base, config=cfg)],
                        expect_fail=True)
            sp.stop()
            self.assertIn(msg, sp.log())
            self.assertNotEqual(sp.proc.returncode, 0)
        no_id = {k: v for k, v in base.items() if k != "id"}
        sp = Spoked(self.dir, self.echo.address, plugins=[no_id], expect_fail=True)
        sp.stop()
        self.assertIn("needs an `id:`", sp.log())


if __name__ == "__main__":
    unittest.main()
