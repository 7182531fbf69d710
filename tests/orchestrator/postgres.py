"""A private PostgreSQL server for tests: initdb in a temporary folder, 127.0.0.1, a free port.

    from postgres import Postgres, PostgresUnavailable
    with Postgres() as pg:                  # raises PostgresUnavailable when it cannot start
        pg.env                              # PGHOST, PGPORT, PGUSER=postgres, PGPASSWORD, PATH
        pg.psql("SELECT 1")                 # as the superuser, over TCP

Key decisions:
- The binaries come from $PG_BIN, else the newest /usr/lib/postgresql/<version>/bin (Debian's
  `apt-get install postgresql`), else the PATH.
- PostgreSQL refuses to run as root. As root, initdb and pg_ctl run as the unprivileged user
  `nobody` (through `runuser`), which owns the temporary folder; as anyone else, as that user.
- It listens on 127.0.0.1 only (no Unix socket), and every TCP login needs a password
  (scram-sha-256); the superuser `postgres` gets a random one, handed to clients through
  PGPASSWORD, never on a command line.
- `stop()` (pg_ctl stop -m immediate, then the folder is removed) runs at teardown.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HOW_TO_RUN = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found; install them (Debian/Ubuntu: "
    "apt-get install -y postgresql) or point PG_BIN at their folder, then run "
    "python -m pytest tests/orchestrator/test_team_server.py"
)


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why and how to fix it."""


def find_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    candidates = []
    if os.environ.get("PG_BIN"):
        candidates.append(Path(os.environ["PG_BIN"]))
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True)
        candidates += [p / "bin" for p in versions]
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One PostgreSQL cluster in a temporary folder, on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        self.bin = find_bin()
        self.port = _free_port()
        self.password = secrets.token_hex(16)
        self.root: Path | None = None
        self.running = False
        self._as_user: list[str] = []

    @property
    def env(self) -> dict[str, str]:
        """What libpq clients (psql, createdb, psycopg) need to reach it as the superuser."""
        return {
            "PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "postgres",
            "PGPASSWORD": self.password, "PGDATABASE": "postgres",
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def start(self, timeout: float = 60.0) -> "Postgres":
        if self.bin is None:
            raise PostgresUnavailable(HOW_TO_RUN)
        as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root without runuser: PostgreSQL refuses to run as "
                                          "root; run the test as an ordinary user")
            as_user = ["runuser", "-u", "nobody", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="kvbench-pg-"))
        data, log = self.root / "data", self.root / "postgres.log"
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if as_user:
            shutil.chown(self.root, user="nobody")
            shutil.chown(pwfile, user="nobody")
        pwfile.chmod(0o600)
        self._run(as_user + [str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile),
                             "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8",
                             "--locale=C"], "initdb")
        pwfile.unlink()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''"
        self._run(as_user + [str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                             "-w", "-t", str(int(timeout)), "start"], "pg_ctl start")
        self.running = True
        self._as_user = as_user
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise PostgresUnavailable(f"PostgreSQL did not accept connections within {timeout:.0f} s")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser in `database`; its output (unaligned, tuples only)."""
        done = subprocess.run([str(self.bin / "psql"), "-v", "ON_ERROR_STOP=1", "-At", "-d", database], input=sql,
                              text=True, capture_output=True, env={**os.environ, **self.env}, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def stop(self) -> None:
        if self.root is None:
            return
        if self.running:
            subprocess.run(self._as_user + [str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m",
                                            "immediate", "-w", "stop"], capture_output=True, timeout=60)
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _run(self, cmd: list[str], what: str) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "postgres.log" if self.root else None
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            self.stop()
            raise PostgresUnavailable(f"{what} failed ({done.returncode}): {done.stderr.strip()[-1000:]} {tail} "
                                      f"(run the test as an ordinary user, or as root with runuser and the "
                                      f"user nobody; PG_BIN=<folder> picks other binaries)")

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
