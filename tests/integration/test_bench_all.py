"""spoke-bench all and spoke-bench crash, run for real with short settings: the generated
section of the benchmarks file is replaced between its markers and the hand-written text
around it is kept byte for byte; every step's JSON lands in the combined file; the crash
soak (real crashing plugin, reloads that fail, a quarantine) ends with the supervisor's
descriptors and children as they were and no worker left. No timing is asserted."""

import json
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import CRASH_ENV, TempDir, spoke_bin  # noqa: E402

BEGIN = "<!-- spoke-bench all: generated section, begin"
END = "<!-- spoke-bench all: generated section, end -->"


def bench(args, timeout=240):
    env = dict(os.environ)
    env.update(CRASH_ENV)
    return subprocess.run([spoke_bin("spoke-bench"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


class BenchAllTest(unittest.TestCase):
    def test_generated_section_replaced_rest_kept(self):
        with TempDir() as d:
            docs = os.path.join(d, "benchmarks.md")
            before = "# Benchmarks\n\nHand-written intro.\n\n"
            after = "\n## pg (hand-written by another part)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
            with open(docs, "w") as f:
                f.write(before + BEGIN + " -->\nstale figures\n" + END + "\n" + after)
            for _ in range(2):  # a second run replaces the first run's section
                p = bench(["all", "--quick", "--only", "hooks,reload", "--docs", docs,
                           "--json", os.path.join(d, "all.json"),
                           "--plot", os.path.join(d, "plot")])
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertIn("[2/2] reload", p.stderr)  # progress
            text = open(docs).read()
            self.assertTrue(text.startswith(before), text[:200])
            self.assertTrue(text.endswith(END + "\n" + after), text[-300:])
            self.assertEqual(text.count(BEGIN), 1)
            self.assertNotIn("stale figures", text)
            self.assertIn("### hooks", text)
            self.assertIn("### reload", text)
            self.assertIn("cores online", text)
            self.assertIn("- build: ", text)
            self.assertIn("`spoke-bench reload --reloads 2 --json ", text)
            res = json.load(open(os.path.join(d, "all.json")))
            self.assertEqual([s["name"] for s in res["steps"]], ["hooks", "reload"])
            self.assertGreaterEqual(res["machine"]["cores"], 1)
            rl = res["steps"][1]["result"]
            self.assertEqual(len(rl["reloads"]), 2)
            self.assertEqual(rl["broken"], 0)

    def test_crash_soak_leaves_nothing(self):
        with TempDir() as d:
            out = os.path.join(d, "crash.json")
            p = bench(["crash", "--crashes", "8", "--reloads", "4", "--json", out])
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            r = json.load(open(out))
            self.assertEqual(r["crashes"], 8)
            self.assertEqual(r["lost"], 0)
            self.assertEqual((r["reloads_ok"], r["reloads_failed"]), (3, 1))
            self.assertTrue(r["quarantine_ok"])
            self.assertEqual(r["fds_before"], r["fds_after"])
            self.assertEqual(r["children_before"], r["children_after"])
            self.assertEqual(r["workers_left"], 0)
            self.assertGreater(r["workers_seen"], 8)
            self.assertIn("| supervisor descriptors before / after |", p.stdout)


if __name__ == "__main__":
    unittest.main(verbosity=2)
