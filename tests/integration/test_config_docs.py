"""docs/config.md agrees with the code: every key the parser knows is documented, and the
default and range each table row of docs/config.md gives are the ones config.c's table
holds (read back through `spoked --check-config`: the effective config of a file that sets
nothing, and the range an out-of-range value is refused with). Each default and range is
written once in code; this keeps the docs to it."""

import os
import re
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from spoketest import SOURCE_DIR, spoke_bin  # noqa: E402

DURATION = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000}
SIZE = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
        "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def value(text, kind):
    """A duration, size or integer as a number (the units of core/base/units.h)."""
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", text)
    if m is None:
        return text
    units = DURATION if kind == "duration" else SIZE if kind == "size" else {}
    if m.group(2) == "":
        return int(m.group(1))
    return int(m.group(1)) * units[m.group(2)] if m.group(2) in units else text


# What each program's page documents, and the least config it loads.
PROGRAMS = {
    "spoked": ("config.md", "listen: { upstream: 127.0.0.1:5432 }\n"),
    "hubd": ("control-plane.md", ""),
}


def check_config(text, prog="spoked"):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "spoke.yaml")
        with open(path, "w") as f:
            f.write(text)
        p = subprocess.run([spoke_bin(prog), "--check-config", path], capture_output=True,
                           text=True, timeout=30)
        return p.returncode, p.stdout + p.stderr


def dumped_defaults(prog="spoked"):
    """{'section.key': 'value'} from the effective config of a file that sets only the
    required keys."""
    code, out = check_config(PROGRAMS[prog][1], prog)
    assert code == 0, out
    keys, section, last = {}, None, None
    for line in out.splitlines():
        if line.startswith("#") or line.strip().startswith("#"):
            continue
        m = re.fullmatch(r"([a-z_]+):(?: (.*))?", line)
        if m:
            section = m.group(1) if m.group(2) is None else None
            continue
        m = re.fullmatch(r"  ([a-z_]+):(?: (.*))?", line)
        if m and section:
            last = section + "." + m.group(1)
            keys[last] = (m.group(2) or "").strip()
        m = re.fullmatch(r"    - (.*)", line)
        if m and section and last in ("listen.address", "hub.listen") and keys.get(last) == "":
            keys[last] = m.group(1)
    return keys


def documented(page="config.md"):
    """{'section.key': (type, default cell, range cell)} from a docs page's tables."""
    rows = {}
    with open(os.path.join(SOURCE_DIR, "docs", page)) as f:
        for line in f:
            line = line.replace("\\|", "\x00")
            m = re.match(r"^\| `([a-z_]+\.[a-z_]+)` \|([^|]*)\|([^|]*)\|([^|]*)\|", line)
            if m:
                rows[m.group(1)] = tuple(c.strip().replace("\x00", "|") for c in m.groups()[1:])
    return rows


def kind_of(doc_type):
    for k in ("duration", "size", "integer"):
        if k in doc_type:
            return k
    return "other"


class ConfigDocsTest(unittest.TestCase):
    """docs/config.md against spoked."""
    prog = "spoked"
    min_defaults, min_ranges = 30, 20

    def setUp(self):
        self.dump = dumped_defaults(self.prog)
        self.docs = documented(PROGRAMS[self.prog][0])

    def test_every_key_documented(self):
        self.assertEqual(sorted(k for k in self.dump if k not in self.docs), [])
        self.assertEqual(sorted(k for k in self.docs if k not in self.dump), [])

    def test_defaults_agree(self):
        checked = 0
        for key, (doc_type, default, _) in self.docs.items():
            m = re.fullmatch(r"`([^`]+)`", default)
            if m is None:  # "none", "empty", "**required**", "the host name (...)"
                continue
            kind = kind_of(doc_type)
            self.assertEqual(value(m.group(1), kind), value(self.dump[key], kind),
                             f"{key}: docs say {m.group(1)}, the code {self.dump[key]}")
            checked += 1
        self.assertGreater(checked, self.min_defaults)

    def test_ranges_agree(self):
        huge = {"duration": "99999999h", "size": "9999999TiB", "integer": "99999999999"}
        checked = 0
        for key, (doc_type, _, rng) in self.docs.items():
            kind = kind_of(doc_type)
            m = re.match(r"(\w+)\.\.(\w+)(?: days \((\w+)\))?", rng)
            if kind == "other" or m is None:
                continue
            lo, hi = m.group(1), m.group(3) or m.group(2)
            section, name = key.split(".")
            text = f"{PROGRAMS[self.prog][1]}{section}:\n  {name}: {huge[kind]}\n"
            if section == "listen":
                text = f"listen:\n  upstream: 127.0.0.1:5432\n  {name}: {huge[kind]}\n"
            code, out = check_config(text, self.prog)
            self.assertEqual(code, 1, f"{key}: {huge[kind]} was accepted")
            r = re.search(r"(?:out of range|an integer in) (\w+)\.\.(\w+)", out)
            self.assertIsNotNone(r, f"{key}: no range in: {out}")
            self.assertEqual((value(lo, kind), value(hi, kind)),
                             (value(r.group(1), kind), value(r.group(2), kind)),
                             f"{key}: docs say {lo}..{hi}, the code {r.group(1)}..{r.group(2)}")
            checked += 1
        self.assertGreaterEqual(checked, self.min_ranges)


class HubConfigDocsTest(ConfigDocsTest):
    """docs/control-plane.md's hub.yaml table against hubd (its `plugins`, `metrics` and
    `log` sections are spoked's, documented in docs/config.md)."""
    prog = "hubd"
    min_defaults, min_ranges = 10, 8

    def setUp(self):
        super().setUp()
        shared = documented("config.md")
        for key in list(self.dump):
            if key.split(".")[0] in ("plugins", "metrics", "log") and key in shared:
                self.docs.setdefault(key, shared[key])


if __name__ == "__main__":
    unittest.main()
