"""Reliability fixtures: one receiver config, restarted with and without failpoints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.failpoints import ENV as FAILPOINTS_ENV
from tests.support import (
    ReceiverProcess,
    head_commits,
    make_repo,
    make_tarball,
    receiver_config,
    write_toml,
)

HEADER = "X-Code-Commit"


class Receiver:
    """One data_dir and config; start() runs a fresh process, optionally with failpoints."""

    def __init__(self, tmp_path: Path, repo: Path | None, **sections: Any) -> None:
        self.tmp_path = tmp_path
        self.data_dir = tmp_path / "data"
        self.config = receiver_config(tmp_path, repo, **sections)
        self.config_path = write_toml(tmp_path / "receiver.toml", self.config)
        self.process: ReceiverProcess | None = None

    @property
    def url(self) -> str:
        assert self.process is not None
        return self.process.url

    @property
    def port(self) -> int:
        assert self.process is not None
        return self.process.port

    @property
    def pid(self) -> int:
        assert self.process is not None and self.process.proc is not None
        return self.process.proc.pid

    def start(self, failpoints: str = "") -> Receiver:
        self.stop()
        env = {FAILPOINTS_ENV: failpoints}  # "" also overrides one inherited from the test run
        self.process = ReceiverProcess(self.config_path, env=env).start()
        return self

    def wait_dead(self, timeout: float = 10.0) -> int:
        """Wait for the process to die (a failpoint fired); returns its return code."""
        assert self.process is not None and self.process.proc is not None
        return self.process.proc.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.proc is not None:
            if self.process.proc.poll() is None:
                self.process.stop()
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.proc is not None:
            self.process.kill()
        self.process = None

    def log(self) -> str:
        return self.process.log() if self.process is not None else ""

    def put(self, host: str, episode: str, body: bytes, commit: str | None) -> httpx.Response:
        headers = {HEADER: commit} if commit is not None else {}
        return httpx.put(
            f"{self.url}/episodes/{host}/{episode}", content=body, headers=headers, timeout=30
        )


@pytest.fixture
def gate_repo(tmp_path: Path) -> tuple[Path, str]:
    """A git repository for the version gate, and its head commit."""
    path = tmp_path / "repo"
    make_repo(path, commits=2)
    return path, head_commits(path, 1)[0]


@pytest.fixture
def receiver(tmp_path: Path, gate_repo: tuple[Path, str]) -> Iterator[Receiver]:
    """A receiver (not started) on tmp_path/data; killed at the end of the test."""
    instance = Receiver(tmp_path, gate_repo[0])
    yield instance
    instance.kill()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def episode(commit: str, size: int = 2048, seed: int = 0) -> bytes:
    """A valid tarball whose content (and so sha256) depends on seed."""
    data = hashlib.shake_256(f"{seed}".encode()).digest(size)
    return make_tarball(commit, {"data/obs.bin": data})
