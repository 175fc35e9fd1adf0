"""Fixture factories for the shipper's tests: episodes on tmp_path, configs, a fake receiver.

FakeReceiver speaks the contract's wire protocol in memory (for httpx.MockTransport),
and lets a test script the next answers; the real receiver is used by test_e2e_*.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipper.config import ShipperConfig, from_mapping
from shipper.daemon import Daemon
from shipper.queue import Queue
from shipper.states import Episode
from shipper.upload import ReceiverClient

try:
    from compression import zstd  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef, unused-ignore]

GOOD = "a" * 40
OLD = "b" * 40
OTHER = "c" * 40
REMEDIATION = "# update your checkout:\ncd /srv/code && git pull --ff-only\nepisode-shipper retry\n"

Scripted = httpx.Response | Callable[[httpx.Request], Awaitable[httpx.Response]]


def write_episode(
    spool: Path,
    episode_id: str,
    commit: str | None = GOOD,
    files: dict[str, bytes] | None = None,
    *,
    age: float = 3600.0,
) -> Path:
    """A finished episode directory; its timestamps are `age` seconds in the past."""
    directory = spool / episode_id
    directory.mkdir(parents=True)
    meta: dict[str, Any] = {"episode_id": episode_id}
    if commit is not None:
        meta["code_version"] = {"commit": commit}
    for name, data in (files or {"data/frames.bin": os.urandom(3000)}).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (directory / "meta.json").write_text(json.dumps(meta))
    backdate(directory, age)
    return directory


def backdate(path: Path, age: float) -> None:
    """Pretend the entry has been still for `age` seconds (only mtime can be set: tests
    that need an old ctime use settle_seconds = 0)."""
    when = os.path.getmtime(path) - age
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.utime(os.path.join(root, name), (when, when))
    os.utime(path, (when, when))


def write_tarball(spool: Path, episode_id: str, commit: str = GOOD) -> Path:
    """A ready `<id>.tar.zst` with meta.json at the root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [
            ("meta.json", json.dumps({"code_version": {"commit": commit}}).encode()),
            ("data.bin", os.urandom(2000)),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = spool / f"{episode_id}.tar.zst"
    path.write_bytes(zstd.compress(buffer.getvalue()))
    return path


def make_config(tmp_path: Path, **overrides: Any) -> ShipperConfig:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "host_id": "lab-01",
        "receiver_url": "http://receiver.test",
        "spool_dir": str(spool),
        "state_dir": str(tmp_path / "state"),
        "settle_seconds": 0.0,
        "rescan_seconds": 0.5,
        "shutdown_grace_seconds": 1.0,
        "retry": {"base_seconds": 0.05, "max_seconds": 0.2},
    }
    data.update(overrides)
    return from_mapping(data, "test.toml", tmp_path)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeReceiver:
    """The wire protocol in memory: a window of good commits, stored episodes, a script."""

    window: set[str] = field(default_factory=lambda: {GOOD, OTHER})
    stored: dict[str, bytes] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    script: list[Scripted] = field(default_factory=list)
    commit_header: str = "X-Code-Commit"
    in_flight: int = 0
    max_in_flight: int = 0

    def puts(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.method == "PUT"]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Seen(request.method, request.url.path, headers, request.content))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            # The script answers episode requests (HEAD, PUT) in order; GET /gate never.
            if self.script and request.method in ("HEAD", "PUT"):
                scripted = self.script.pop(0)
                if isinstance(scripted, httpx.Response):
                    return scripted
                return await scripted(request)
            return self.answer(request, headers)
        finally:
            self.in_flight -= 1

    def _refusal(self, commit: str | None) -> httpx.Response | None:
        if commit is None:
            return httpx.Response(400, json={"error": "missing-commit", "remediation": ""})
        if commit.lower() not in self.window:
            return httpx.Response(
                412,
                json={
                    "error": "stale-commit",
                    "your_commit": commit,
                    "head_commit": GOOD,
                    "window": 5,
                    "remediation": REMEDIATION,
                },
            )
        return None

    def answer(self, request: httpx.Request, headers: dict[str, str]) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        if request.method == "GET" and parts[0] == "gate":
            return self._refusal(parts[1]) or httpx.Response(200, json={"status": "ok"})
        key = "/".join(parts[1:])
        commit = headers.get(self.commit_header.lower())
        stored = self.stored.get(key)
        if request.method == "HEAD":
            if stored is not None:
                digest = base64.b64encode(hashlib.sha256(stored).digest()).decode()
                return httpx.Response(200, headers={"Repr-Digest": f"sha-256=:{digest}:"})
            refusal = self._refusal(commit)
            return httpx.Response(refusal.status_code) if refusal else httpx.Response(404)
        body = request.content
        sha = hashlib.sha256(body).hexdigest()
        if stored is not None:
            if hashlib.sha256(stored).hexdigest() == sha:
                return httpx.Response(200, json={"status": "already-present", "sha256": sha})
            stored_sha = hashlib.sha256(stored).hexdigest()
            return httpx.Response(409, json={"error": "conflict", "stored_sha256": stored_sha})
        if refusal := self._refusal(commit):
            return refusal
        expected = base64.b64encode(hashlib.sha256(body).digest()).decode()
        if headers.get("content-digest") != f"sha-256=:{expected}:":
            return httpx.Response(400, json={"error": "digest-mismatch", "detail": "differs"})
        self.stored[key] = body
        return httpx.Response(201, json={"status": "stored", "sha256": sha})


@dataclass
class Result:
    counts: dict[str, int]
    episodes: dict[str, Episode]


def ship_once(config: ShipperConfig, receiver: FakeReceiver, token: str | None = None) -> Result:
    """Run the daemon in `once` mode against the fake receiver; the queue after it."""
    queue = Queue.open(config.state_dir)

    async def go() -> None:
        client = ReceiverClient(
            config.receiver_url,
            config.host_id,
            commit_header=config.commit_header,
            token=token,
            timeout_seconds=5.0,
            transport=receiver.transport(),
        )
        try:
            await Daemon(config, queue, client, once=True).run(asyncio.Event())
        finally:
            await client.aclose()

    try:
        asyncio.run(go())
        return snapshot(queue)
    finally:
        queue.close()


def snapshot(queue: Queue) -> Result:
    ids = [row[0] for row in queue.conn.execute("SELECT episode_id FROM episodes")]
    episodes = {episode_id: queue.get(episode_id) for episode_id in ids}
    return Result(
        {str(state): count for state, count in queue.counts().items()},
        {key: value for key, value in episodes.items() if value is not None},
    )


@pytest.fixture
def receiver() -> FakeReceiver:
    return FakeReceiver()
