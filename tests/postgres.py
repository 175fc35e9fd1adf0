"""A throwaway PostgreSQL cluster from Debian's packages, on a free loopback port.

initdb and pg_ctl refuse to run as root, so under root they run as the `postgres` user
(runuser) in a directory it owns. The server listens on 127.0.0.1 only, with its socket
in that directory; it is stopped by its PID at the end.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.orphan_guard import OrphanGuard
from tests.support import free_port


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run scripts/setup-system.sh")
    return found[-1].parent


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class PostgresServer:
    home: Path
    port: int
    pid: int
    guard: OrphanGuard | None = field(default=None, repr=False)  # if the test run dies

    def __post_init__(self) -> None:
        self.guard = OrphanGuard(pid=self.pid, remove=self.home)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user=postgres"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart, fast, immediate), waiting until it is gone."""
        self._cancel_guard()
        subprocess.run(
            _as_postgres(
                [str(_bindir() / "pg_ctl"), "-D", str(self.home / "data"), "-m", mode, "-w", "stop"]
            ),
            capture_output=True,
            check=False,
        )
        _wait_gone(self.pid)
        self.guard = OrphanGuard(remove=self.home)  # stopped, its directory still to go

    def start(self) -> None:
        """Start it again on the same port and data (after stop())."""
        self._cancel_guard()
        self.pid = _start(self.home, self.port)
        self.guard = OrphanGuard(pid=self.pid, remove=self.home)

    def destroy(self) -> None:
        self._cancel_guard()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(self.pid)
        shutil.rmtree(self.home, ignore_errors=True)

    def _cancel_guard(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
            self.guard = None


def _wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _start(home: Path, port: int) -> int:
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c max_connections=200"
    subprocess.run(
        _as_postgres([str(_bindir() / "pg_ctl"), "-D", str(home / "data"), "-o", options,
                      "-l", str(home / "server.log"), "-w", "-t", "30", "start"]),
        capture_output=True,
        check=True,
    )  # fmt: skip
    return int((home / "data" / "postmaster.pid").read_text().split()[0])


def start_postgres() -> PostgresServer:
    home = Path(tempfile.mkdtemp(prefix="episode-ingest-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(home, user.pw_uid, user.pw_gid)
    subprocess.run(
        _as_postgres([str(_bindir() / "initdb"), "-D", str(home / "data"), "-A", "trust",
                      "-U", "postgres", "--no-sync", "-E", "UTF8"]),
        capture_output=True,
        check=True,
    )  # fmt: skip
    port = free_port()
    return PostgresServer(home, port, _start(home, port))
