"""Fixture factories shared by every test package."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ReceiverProcess, make_repo, receiver_config, write_toml


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
        if process.proc is not None and process.proc.poll() is None:
            process.kill()
