"""Fixture factories shared by every test package."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import pytest

from tests.postgres import PostgresServer, start_postgres
from tests.seaweed import SeaweedServer
from tests.support import (
    SESSION_ENV,
    ReceiverProcess,
    make_repo,
    processes_with_env,
    receiver_config,
    write_toml,
)


def pytest_configure(config: pytest.Config) -> None:
    # Set before any test starts a process, so every one of them carries it.
    os.environ[SESSION_ENV] = uuid.uuid4().hex


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite() -> Iterator[None]:
    """After the last test, no process the suite started is still running."""
    yield
    session = os.environ[SESSION_ENV]
    # multiprocessing's resource tracker, if a test started it here, belongs to this
    # process and ends with it (at EOF on its pipe).
    tracker: int | None = getattr(resource_tracker._resource_tracker, "_pid", None)

    def leftovers() -> dict[int, str]:
        found = processes_with_env(SESSION_ENV, session)
        if tracker is not None:
            found.pop(tracker, None)
        return found

    deadline = time.monotonic() + 10  # time for graceful stops still under way
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes started by the test suite are still running: {left}"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A real git repository with three commits."""
    path = tmp_path / "repo"
    make_repo(path, commits=3)
    return path


StartReceiver = Callable[..., ReceiverProcess]


@pytest.fixture
def start_receiver(tmp_path: Path) -> Iterator[StartReceiver]:
    """Start real receiver processes; all are stopped at the end of the test."""
    started: list[ReceiverProcess] = []

    def start(
        repo: Path | None, env: dict[str, str] | None = None, wait: bool = True, **sections: Any
    ) -> ReceiverProcess:
        config = receiver_config(tmp_path, repo, **sections)
        path = write_toml(tmp_path / f"receiver-{len(started)}.toml", config)
        process = ReceiverProcess(path, env=env)
        started.append(process)
        return process.start(wait=wait)

    yield start
    for process in started:
        if process.proc is not None:
            process.kill()  # the whole process group, workers included


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the session; each test gets its own database."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty database of the session's cluster."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One real S3 server (SeaweedFS) for the session, on loopback; each test its own bucket."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_storage(seaweedfs: SeaweedServer, tmp_path: Path) -> dict[str, Any]:
    """A [storage] section for a fresh bucket on the session's SeaweedFS."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    return seaweedfs.storage_section(bucket, tmp_path / "s3-credentials.toml")
