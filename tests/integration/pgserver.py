"""pgserver -- a throwaway PostgreSQL for the integration tests (Debian's postgresql).

initdb + postgres with trust auth, data and socket directories in a temporary directory,
127.0.0.1 on a free port; as `nobody` when run as root, since postgres refuses to run as
root. Stdlib only.

    pg = PgServer(find_pg_bindir(), tmpdir, settings={"shared_preload_libraries": "pg_stat_statements"})
    pg.sql("SELECT 1")
    pg.stop()
"""

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import time

from spoketest import free_port

SKIP = 77
PG_USER = "spoke"
PSQL = shutil.which("psql") or "psql"


def find_pg_bindir():
    """Debian's server binaries: postgresql-15 first, else the newest installed."""
    dirs = ["/usr/lib/postgresql/15/bin"]
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                   key=lambda d: int(re.sub(r"\D", "", d) or 0), reverse=True)
    for d in dirs:
        if os.access(os.path.join(d, "postgres"), os.X_OK) and \
                os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    return None


def client(bindir, name):
    path = shutil.which(name)
    if path:
        return path
    path = os.path.join(bindir, name)
    return path if os.access(path, os.X_OK) else None


def client_env(**extra):
    env = dict(os.environ, PGCONNECT_TIMEOUT="5", PGSSLMODE="prefer", PGGSSENCMODE="disable",
               PGAPPNAME="spoke-test")
    for k in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE", "PGOPTIONS"):
        env.pop(k, None)
    env.update(extra)
    return env


class PgServer:
    """A throwaway PostgreSQL cluster, run as `nobody` when we are root."""

    def __init__(self, bindir, tmp, settings=None):
        self.bindir = bindir
        self.settings = dict(settings or {})
        self.dir = os.path.join(tmp, "pg")
        self.data = os.path.join(self.dir, "data")
        self.sock = os.path.join(self.dir, "sock")
        os.makedirs(self.sock)
        self.run_as = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            os.chmod(tmp, 0o755)
            for d in (self.dir, self.sock):
                os.chown(d, nobody.pw_uid, nobody.pw_gid)
        self.port = free_port()
        self.log_path = os.path.join(tmp, "postgres.log")
        self.proc = None
        self._initdb()
        self._start()

    def _initdb(self):
        p = subprocess.run([os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", PG_USER,
                            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
                            "--no-instructions"],
                           cwd=self.dir, capture_output=True, text=True, timeout=60, **self.run_as)
        if p.returncode != 0:
            raise AssertionError("initdb failed:\n" + p.stdout + p.stderr)

    def _start(self):
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data, "-k", self.sock,
             "-h", "127.0.0.1", "-p", str(self.port), "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             *[a for k, v in self.settings.items() for a in ("-c", f"{k}={v}")]],
            cwd=self.dir, stdout=self._log, stderr=subprocess.STDOUT, **self.run_as)
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("postgres exited:\n" + self.log())
            if self.sql("SELECT 1").returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("postgres did not start:\n" + self.log())

    def sql(self, text, port=None, **env):
        """Run one statement with psql straight to the server (or to `port`)."""
        return subprocess.run([psql_path(self.bindir), "-X", "-A", "-t", "-h", "127.0.0.1", "-p",
                               str(port or self.port), "-U", PG_USER, "-d", "postgres",
                               "-c", text],
                              capture_output=True, text=True, timeout=30, env=client_env(**env))

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._log.close()




def psql_path(bindir):
    return client(bindir, "psql") or PSQL


def missing_pg():
    """Why the PostgreSQL tests cannot run here, or None."""
    bindir = find_pg_bindir()
    if bindir is None:
        return ("no PostgreSQL server binary (/usr/lib/postgresql/*/bin/postgres); install "
                "Debian's postgresql-15 (scripts/deps.sh)")
    missing = [c for c in ("psql", "pgbench") if client(bindir, c) is None]
    if missing:
        return "PostgreSQL client programs missing: " + ", ".join(missing)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root and there is no user 'nobody' to run postgres as"
    return None
