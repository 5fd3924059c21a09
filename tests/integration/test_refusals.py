"""What spoked refuses, and what it says: ABI mismatch, checksum mismatch, malformed YAML,
bad values, plugin init failure; spoked --check-config; spoke-plugin inspect/verify;
plugins.autoload."""

import hashlib
import os
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import (HOST_ABI, PLUGIN_DIR, SpokeCase, Spoked, roundtrip, spoke_bin,  # noqa: E402
                       test_plugin)


tp = test_plugin


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(*args):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout + p.stderr


class RefusalTest(SpokeCase):
    def test_abi_major_mismatch_refused(self):
        sp = Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_abi_major")}],
                    expect_fail=True)
        self.assertEqual(sp.proc.returncode, 1)
        log = sp.log()
        self.assertIn(f"t_abi_major.so: refused: plugin ABI 2.0, host ABI {HOST_ABI}", log)
        self.assertRegex(log, r"spoke\.yaml:\d+: ")

    def test_checksum_mismatch_refused_with_both_sums(self):
        path = os.path.join(PLUGIN_DIR, "passthrough.so")
        good = sha256(path)
        bad = "0" * 64
        sp = Spoked(self.dir, self.echo.address,
                    plugins=[{"file": "passthrough.so", "sha256": bad}], expect_fail=True)
        log = sp.log()
        self.assertIn("SHA-256 mismatch", log)
        self.assertIn(f"config says {bad}, file is {good}", log)

    def test_checksum_match_loads(self):
        path = os.path.join(PLUGIN_DIR, "passthrough.so")
        with Spoked(self.dir, self.echo.address,
                    plugins=[{"file": "passthrough.so", "sha256": sha256(path)}]) as sp:
            self.assertEqual(roundtrip(sp.port, b"ok"), b"ok")

    def test_init_failure_refused(self):
        sp = Spoked(self.dir, self.echo.address, plugins=[{"file": tp("t_init_fail")}],
                    expect_fail=True)
        log = sp.log()
        self.assertIn("t_init_fail: refusing to start", log)
        self.assertIn("init failed", log)

    def test_malformed_yaml_gives_file_and_line(self):
        text = "listen:\n  upstream: 127.0.0.1:1\n  address: [unclosed\nplugins: {}\n"
        sp = Spoked(self.dir, self.echo.address, config_text=text, expect_fail=True)
        self.assertRegex(sp.log(), r"spoke\.yaml:\d+: .*YAML")

    def test_bad_value_names_key_and_line(self):
        text = ("listen:\n  upstream: 127.0.0.1:1\n  address: 127.0.0.1:9\n"
                "plugins:\n  hook_timeout: fast\n")
        sp = Spoked(self.dir, self.echo.address, config_text=text, expect_fail=True)
        self.assertRegex(sp.log(), r"spoke\.yaml:5: plugins\.hook_timeout")

    def test_check_config(self):
        good = os.path.join(self.dir, "good.yaml")
        with open(good, "w") as f:
            f.write("listen: { upstream: 127.0.0.1:5432 }\n")
        code, out = run(spoke_bin("spoked"), "--check-config", good)
        self.assertEqual(code, 0, out)
        self.assertIn("configuration OK", out)
        bad = os.path.join(self.dir, "bad.yaml")
        with open(bad, "w") as f:
            f.write("listen: { upstream: 127.0.0.1:5432 }\nnonsense: 1\n")
        code, out = run(spoke_bin("spoked"), "--check-config", bad)
        self.assertEqual(code, 1)
        self.assertIn("bad.yaml:2: ", out)
        self.assertIn("nonsense", out)

    def test_autoload(self):
        pdir = os.path.join(self.dir, "plugins")
        os.mkdir(pdir)
        shutil.copy(os.path.join(PLUGIN_DIR, "passthrough.so"), pdir)
        with Spoked(self.dir, self.echo.address, plugin_dir=pdir,
                    extra={"plugins": {"autoload": True}}) as sp:
            sp.wait_log(r"plugin passthrough 1\.0\.0 loaded from .*passthrough\.so \(autoload\)")
            self.assertEqual(roundtrip(sp.port, b"x"), b"x")

    def test_autoload_past_the_plugin_cap_refused(self):
        """A generation runs at most 64 plugins (a status slot's plugin table, so that every
        crash names its plugin): 64 listed plugins serve; one more found by autoload makes
        the start fail, with a message naming the keys and the cap."""
        pdir = os.path.join(self.dir, "plugins")
        os.mkdir(pdir)
        shutil.copy(os.path.join(PLUGIN_DIR, "passthrough.so"), os.path.join(pdir, "a.so"))
        listed = [{"file": "a.so", "name": f"p{i}"} for i in range(64)]
        extra = {"plugins": {"autoload": True}}
        with Spoked(self.dir, self.echo.address, plugins=listed, plugin_dir=pdir,
                    extra=extra) as sp:
            self.assertEqual(roundtrip(sp.port, b"64"), b"64")
        shutil.copy(os.path.join(PLUGIN_DIR, "passthrough.so"), os.path.join(pdir, "b.so"))
        sp = Spoked(self.dir, self.echo.address, plugins=listed, plugin_dir=pdir, extra=extra,
                    expect_fail=True)
        self.assertEqual(sp.proc.returncode, 1)
        self.assertIn("b.so: refused: more than 64 plugins to load (plugins.list and "
                      "plugins.autoload); a generation runs at most 64", sp.log())

    def test_spoke_plugin_inspect(self):
        path = os.path.join(PLUGIN_DIR, "passthrough.so")
        code, out = run(spoke_bin("spoke-plugin"), "inspect", path)
        self.assertEqual(code, 0, out)
        self.assertIn("name:        passthrough", out)
        self.assertIn("version:     1.0.0", out)
        self.assertIn("on_traffic_from_client", out)
        self.assertIn(f"abi:         {HOST_ABI}", out)
        self.assertIn(sha256(path), out)

    def test_spoke_plugin_verify(self):
        code, out = run(spoke_bin("spoke-plugin"), "verify", tp("t_abi_major"))
        self.assertEqual(code, 1)
        self.assertIn(f"plugin ABI 2.0, host ABI {HOST_ABI}", out)
        code, out = run(spoke_bin("spoke-plugin"), "verify", tp("t_init_fail"), "--init")
        self.assertEqual(code, 1)
        self.assertIn("init failed", out)
        path = os.path.join(PLUGIN_DIR, "passthrough.so")
        code, out = run(spoke_bin("spoke-plugin"), "verify", path, "--sha256", "ab" * 32)
        self.assertEqual(code, 1)
        self.assertIn("SHA-256 mismatch", out)
        code, out = run(spoke_bin("spoke-plugin"), "verify", path, "--sha256", sha256(path))
        self.assertEqual(code, 0, out)


if __name__ == "__main__":
    unittest.main(verbosity=2)
