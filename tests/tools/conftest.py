"""Stores written by a real receiver, and the two CLIs run in-process with their output.

The receiver runs once per session (with the same helpers the start_receiver fixture uses)
and every test gets its own copy of the store it wrote: starting a receiver per test would
cost a second each. Tests that need a live receiver use start_receiver directly.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    ReceiverProcess,
    head_commits,
    make_repo,
    make_tarball,
    receiver_config,
    write_toml,
)
from tools import index_backfill, verify

HOSTS = ("lab-01", "lab-02")
EPISODES_PER_HOST = 3
HEADER = "X-Code-Commit"


@dataclass(frozen=True)
class Store:
    data_dir: Path
    commit: str
    bodies: dict[tuple[str, str], bytes]

    @property
    def index(self) -> Path:
        return self.data_dir / "index.jsonl"

    @property
    def episodes(self) -> Path:
        return self.data_dir / "episodes"

    def tarball(self, host_id: str, episode_id: str) -> Path:
        return self.episodes / host_id / f"{episode_id}.tar.zst"

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.index.read_bytes().splitlines()]

    def keys(self) -> list[tuple[str, str]]:
        return sorted((row["host_id"], row["episode_id"]) for row in self.rows())

    def drop_rows(self, *keys: tuple[str, str]) -> None:
        """Rewrite the index without the rows of keys (a lost or damaged index)."""
        kept = [
            line
            for line in self.index.read_bytes().splitlines(keepends=True)
            if (json.loads(line)["host_id"], json.loads(line)["episode_id"]) not in keys
        ]
        self.index.write_bytes(b"".join(kept))

    def place(self, host_id: str, episode_id: str, body: bytes) -> Path:
        """A tarball put in place by hand (a restore, a copy from a host's spool)."""
        path = self.tarball(host_id, episode_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        return path


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Tool = Callable[..., Result]


@pytest.fixture(scope="session")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    tmp = tmp_path_factory.mktemp("receiver")
    repo = tmp / "repo"
    make_repo(repo, commits=3)
    commit = head_commits(repo, 1)[0]
    config = receiver_config(tmp, repo)
    receiver = ReceiverProcess(write_toml(tmp / "receiver.toml", config)).start()
    bodies: dict[tuple[str, str], bytes] = {}
    try:
        for host_id in HOSTS:
            for number in range(EPISODES_PER_HOST):
                episode_id = f"ep-{number:04d}"
                body = make_tarball(commit, {"data/obs.bin": os.urandom(4096 * (number + 1))})
                url = f"{receiver.url}/episodes/{host_id}/{episode_id}"
                response = httpx.put(url, content=body, headers={HEADER: commit}, timeout=30)
                assert response.status_code == 201, response.text
                bodies[(host_id, episode_id)] = body
    finally:
        assert receiver.stop() == 0
    return Store(tmp / "data", commit, bodies)


@pytest.fixture
def store(template_store: Store, tmp_path: Path) -> Store:
    """A private copy of the store the real receiver wrote."""
    data_dir = tmp_path / "store"
    shutil.copytree(template_store.data_dir, data_dir)
    return Store(data_dir, template_store.commit, dict(template_store.bodies))


def _run(main: Callable[[Sequence[str] | None], None], args: Sequence[str | Path]) -> int:
    with pytest.raises(SystemExit) as exited:
        main([str(arg) for arg in args])
    code = exited.value.code
    assert isinstance(code, int)
    return code


@pytest.fixture
def backfill(capsys: pytest.CaptureFixture[str]) -> Tool:
    def run(*args: str | Path) -> Result:
        code = _run(index_backfill.main, args)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def verify_tool(capsys: pytest.CaptureFixture[str]) -> Tool:
    def run(*args: str | Path) -> Result:
        code = _run(verify.main, args)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def store_args(store: Store) -> list[str | Path]:
    return ["--episodes-root", store.episodes, "--index", store.index]
