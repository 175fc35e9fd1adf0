"""Helpers shared by the tests: real git repositories, real receiver processes, tarballs."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import tomli_w

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

PROJECT_ROOT = Path(__file__).resolve().parent.parent

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.invalid",
    "GIT_COMMITTER_NAME": "Test Committer",
    "GIT_COMMITTER_EMAIL": "committer@example.invalid",
}


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_IDENTITY}
    result = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def make_repo(path: Path, commits: int = 3) -> list[str]:
    """A real git repository with `commits` empty commits; returns ids, newest first."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    for _ in range(commits):
        add_commit(path)
    return head_commits(path, commits)


def add_commit(repo: Path, message: str = "change") -> str:
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def head_commits(repo: Path, count: int) -> list[str]:
    return git(repo, "log", "--format=%H", "-n", str(count)).split()


ANOTHER_UID = 12345


def give_to_another_user(path: Path, uid: int = ANOTHER_UID) -> None:
    """chown a tree to a uid nobody here runs as: git then refuses it, even for root."""
    os.chown(path, uid, uid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(dict(data)))
    return path


def receiver_config(
    tmp: Path, repo: Path | None, port: int | None = None, **sections: dict[str, Any]
) -> dict[str, Any]:
    """A receiver config dict: loopback, data under tmp/data, gate on repo; sections override."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port or free_port()},
        "storage": {"data_dir": str(tmp / "data"), "min_free_bytes": 0},
        "version_gate": {"window": 5, "refresh_seconds": 1.0},
    }
    if repo is not None:
        config["version_gate"]["repo_path"] = str(repo)
    else:
        config["version_gate"]["enabled"] = False
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


class ReceiverProcess:
    """A real `python -m receiver serve` on 127.0.0.1, its log captured to a file."""

    def __init__(self, config_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.config_path = config_path
        with config_path.open("rb") as handle:
            import tomllib

            config = tomllib.load(handle)
        self.port: int = config["server"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config_path.with_suffix(".log")
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> ReceiverProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "receiver", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=PROJECT_ROOT,
            # Its own process group, so teardown can end the workers with the main process.
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"receiver not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM the main process (a graceful stop) and wait; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            end_process_group(self.proc)

    def kill(self) -> None:
        """SIGKILL the main process and every worker (its whole process group)."""
        assert self.proc is not None
        end_process_group(self.proc)


def end_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the group a `start_new_session=True` child leads, and reap the child.

    The group outlives its leader while any member lives, so this also ends workers
    whose main process has already exited.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def dev_receiver(checkout: Path, log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`episode-receiver serve --dev` run in `checkout` as `make run` runs it; yields
    (process, url) once /healthz answers, and stops it with SIGTERM at the end."""
    url = f"http://127.0.0.1:{free_port()}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "receiver", "serve", "--dev", "--port", url.rsplit(":", 1)[1]],
            cwd=checkout,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(proc, url, log_path)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        finally:
            end_process_group(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no /healthz from {url}:\n{log_path.read_text()}")


SESSION_ENV = "EPISODE_INGEST_TEST_SESSION"


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """pid -> command line of every process (but this one) started with name=value.

    Every child inherits the test session's environment, so this finds what the suite
    started even after it was re-parented. Reads /proc (Linux).
    """
    found: dict[int, str] = {}
    marker = f"{name}={value}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # exited while we looked, or not ours to read
    return found


def make_tarball(
    commit: str | None, files: Mapping[str, bytes] | None = None, top: str = ""
) -> bytes:
    """A valid episode .tar.zst with meta.json (code_version.commit) and data files.

    With top, every member is inside that one top-level directory.
    """
    raw = io.BytesIO()
    members: dict[str, bytes] = {}
    if commit is not None:
        members["meta.json"] = json.dumps({"code_version": {"commit": commit}}).encode()
    members.update(files or {"data/obs.bin": os.urandom(1024)})
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(content)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    options = {zstd.CompressionParameter.checksum_flag: 1}
    compressed: bytes = zstd.compress(raw.getvalue(), options=options)
    return compressed


def read_http_response(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """One HTTP response (status, body by Content-Length); bytes after it stay in buffer."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed mid-response: {bytes(buffer)!r}")
        buffer += chunk
    header_block, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status = int(header_block.split(b" ", 2)[1])
    length = 0
    for line in header_block.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        rest += chunk
    buffer[:] = rest[length:]
    return status, rest[:length]


def raw_request(
    port: int, head: bytes, body: bytes = b"", timeout: float = 10.0
) -> tuple[int, bytes]:
    """Send exact bytes (no client-side URL normalisation); returns (status, response body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        return read_http_response(sock, bytearray())
