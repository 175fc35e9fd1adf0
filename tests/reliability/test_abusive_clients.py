"""Abusive clients on raw sockets against one real receiver.

Broken bodies, resets, slow drips, huge heads, malformed chunking, a crowd of
idle connections, hostile ids and hostile tarballs: each gets a clear 4xx (or a
closed connection), writes nothing, and leaves the server's memory bounded and
its service to well-behaved clients intact.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import HEADER, episode, sha256
from tests.reliability.invariants import Key, check_invariants, read_state
from tests.support import ReceiverProcess, head_commits, make_repo, receiver_config, write_toml

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
BODY_TIMEOUT = 1.0
MAX_UNPACKED = 64 * MiB
MAX_WINDOW = 8 * MiB
RSS_GROWTH_LIMIT = 48 * MiB


@dataclass
class Server:
    process: ReceiverProcess
    data_dir: Path
    commit: str
    acked: dict[Key, str]

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def url(self) -> str:
        return self.process.url

    def status(self, field: str) -> int:
        """A /proc/<pid>/status value in bytes (VmRSS, VmHWM)."""
        assert self.process.proc is not None
        for line in Path(f"/proc/{self.process.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
        raise AssertionError(f"{field} not in /proc status")

    def head(self, path: str, length: int | None = None, *extra: str) -> bytes:
        lines = [f"PUT {path} HTTP/1.1", "Host: x", f"{HEADER}: {self.commit}", *extra]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def assert_untouched(self, *keys: Key) -> None:
        """Nothing stored or indexed for keys; the server has tidied every temp file."""
        deadline = time.monotonic() + 10
        while self.busy():
            assert time.monotonic() < deadline, read_state(self.data_dir).temp_files
            time.sleep(0.05)
        state = check_invariants(self.data_dir, self.acked)
        for key in keys:
            assert key not in state.files and key not in state.rows, key

    def busy(self) -> bool:
        """An upload is still in progress (perhaps of a request already answered)."""
        health = httpx.get(f"{self.url}/healthz", timeout=5).json()
        return bool(health["uploads_in_progress"] or read_state(self.data_dir).temp_files)

    def assert_serving(self, episode_id: str) -> None:
        """A well-behaved client is still served."""
        body = episode(self.commit, seed=zlib.crc32(episode_id.encode()))
        response = httpx.put(
            f"{self.url}/episodes/good/{episode_id}",
            content=body,
            headers={HEADER: self.commit},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        self.acked[("good", episode_id)] = sha256(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("abusive")
    make_repo(tmp / "repo", commits=2)
    config = receiver_config(
        tmp,
        tmp / "repo",
        server={"body_timeout_seconds": BODY_TIMEOUT, "max_concurrent_uploads": 64},
        storage={
            "max_upload_bytes": 256 * MiB,
            "max_unpacked_bytes": MAX_UNPACKED,
            "max_window_bytes": MAX_WINDOW,
        },
    )
    process = ReceiverProcess(write_toml(tmp / "receiver.toml", config)).start()
    instance = Server(process, tmp / "data", head_commits(tmp / "repo", 1)[0], {})
    instance.assert_serving("warm-up")
    try:
        yield instance
    finally:
        process.kill()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        parsed: dict[str, object] = json.loads(self.body)
        return parsed


def read_reply(sock: socket.socket, timeout: float = 10) -> Reply | None:
    """One response, or None when the server closed (or reset) without one."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        return None
    return Reply(int(lines[0].split(" ")[1]), headers, body[:length])


def reply_or_close(sock: socket.socket, timeout: float = 10) -> Reply | None:
    reply = read_reply(sock, timeout)
    sock.close()
    return reply


# -- broken bodies ----------------------------------------------------------------------


def test_body_shorter_than_declared_then_half_close(server: Server) -> None:
    """The client stops sending (FIN) but keeps listening: no file, and no hang."""
    body = episode(server.commit, size=256 * 1024, seed=10)
    sock = server.connect()
    sock.sendall(server.head("/episodes/h/short", len(body)) + body[: len(body) // 2])
    sock.shutdown(socket.SHUT_WR)
    reply = reply_or_close(sock)
    assert reply is None or 400 <= reply.status < 500, reply
    server.assert_untouched(("h", "short"))
    server.assert_serving("after-short")


def test_connection_reset_mid_body(server: Server) -> None:
    body = episode(server.commit, size=4 * MiB, seed=11)
    sock = server.connect()
    sock.sendall(server.head("/episodes/h/reset", len(body)) + body[: 3 * MiB])
    deadline = time.monotonic() + 10
    while not read_state(server.data_dir).temp_files:  # the upload is being written
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST, not FIN
    server.assert_untouched(("h", "reset"))
    server.assert_serving("after-reset")


def test_body_longer_than_declared_stores_only_the_declared_bytes(server: Server) -> None:
    """The excess is parsed as a second, malformed request: uvicorn answers it 400 and
    closes, perhaps before the first request's own answer. The declared bytes are judged
    alone: stored whole and indexed, or not at all; a retry settles it with 200 or 201."""
    body = episode(server.commit, size=4096, seed=12)
    sock = server.connect()
    sock.sendall(server.head("/episodes/h/longer", len(body)) + body + b"GARBAGE" * 1000)
    reply = reply_or_close(sock)
    assert reply is not None and reply.status in (201, 400), reply
    stored = read_state(server.data_dir).files.get(("h", "longer"))
    assert stored in (None, sha256(body))
    retry = httpx.put(
        f"{server.url}/episodes/h/longer", content=body, headers={HEADER: server.commit}
    )
    assert retry.status_code == (201 if stored is None else 200), retry.text
    server.acked[("h", "longer")] = sha256(body)
    server.assert_untouched()
    assert (server.data_dir / "episodes" / "h" / "longer.tar.zst").read_bytes() == body


def test_declared_length_short_of_the_tarball_is_rejected(server: Server) -> None:
    """Content-Length cuts the tarball: the first part is an invalid tarball (400) and
    the rest a malformed request (400, closed); whichever answer arrives, nothing is kept."""
    body = episode(server.commit, size=4096, seed=13)
    sock = server.connect()
    sock.sendall(server.head("/episodes/h/cut", len(body) - 100) + body)
    reply = reply_or_close(sock)
    assert reply is not None and reply.status == 400, reply
    server.assert_untouched(("h", "cut"))
    sock = server.connect()
    sock.sendall(server.head("/episodes/h/cut", len(body) - 100) + body[:-100])
    reply = reply_or_close(sock)
    assert reply is not None and reply.status == 400, reply
    assert reply.json()["error"] == "invalid-tarball"
    server.assert_untouched(("h", "cut"))


def test_slow_drip_is_cut_off_by_the_body_timeout(server: Server) -> None:
    """A byte every 50 ms is never silent for a second, yet makes no real progress: 408."""
    body = episode(server.commit, size=64 * 1024, seed=14)
    sock = server.connect()
    sock.sendall(server.head("/episodes/h/drip", len(body)))
    started = time.monotonic()
    sock.setblocking(False)
    answered = b""
    for byte in body:
        try:
            sock.send(bytes([byte]))
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.05)
        try:
            answered += sock.recv(4096)
        except BlockingIOError:
            continue
        if answered:
            break
    elapsed = time.monotonic() - started
    sock.close()
    assert answered.startswith(b"HTTP/1.1 408"), answered[:200]
    assert elapsed < 3 * BODY_TIMEOUT, elapsed
    assert b'"error":"body-timeout"' in answered
    server.assert_untouched(("h", "drip"))


# -- heads and framing --------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    ["one-huge-header", "many-headers", "huge-url"],
)
def test_oversized_head_gets_431_in_bounded_memory(server: Server, shape: str) -> None:
    before = server.status("VmHWM")
    sock = server.connect()
    if shape == "huge-url":
        sock.sendall(b"PUT /episodes/h/" + b"u" * 1024)
    else:
        sock.sendall(server.head("/episodes/h/heady", 5)[:-2])  # the head is not finished
    reply: Reply | None = None
    try:
        for _ in range(16 * 64):  # up to 16 MiB, sent 16 KiB at a time
            if shape == "many-headers":
                piece = b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 60) for n in range(200))
            elif shape == "one-huge-header":
                piece = b"X-Big: " + b"a" * 16 * 1024 if _ == 0 else b"a" * 16 * 1024
            else:
                piece = b"u" * 16 * 1024
            sock.sendall(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = reply_or_close(sock)
    assert reply is not None and reply.status == 431, reply
    assert reply.json()["error"] == "headers-too-large"
    assert server.status("VmHWM") - before < RSS_GROWTH_LIMIT
    server.assert_untouched(("h", "heady"))
    server.assert_serving(f"after-{shape}")


def test_a_large_but_reasonable_head_is_served(server: Server) -> None:
    body = episode(server.commit, size=1024, seed=17)
    headers = [f"X-Note-{n}: {'n' * 200}" for n in range(200)]  # ~41 KiB
    sock = server.connect()
    sock.sendall(server.head("/episodes/h/roomy", len(body), *headers) + body)
    reply = reply_or_close(sock)
    assert reply is not None and reply.status == 201, reply
    server.acked[("h", "roomy")] = sha256(body)
    server.assert_untouched()


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # chunk size is not hex
        b"5\r\nabcdefghij\r\n0\r\n\r\n",  # more data than the chunk size
        b"3\r\nabc0\r\n\r\n",  # no CRLF after the chunk data
        b"-1\r\nabc\r\n0\r\n\r\n",  # negative size
        b"ffffffffffffffffffff\r\n",  # size overflows
    ],
    ids=["not-hex", "overlong-chunk", "missing-crlf", "negative", "overflow"],
)
def test_malformed_chunked_body_gets_400_and_writes_nothing(server: Server, chunks: bytes) -> None:
    sock = server.connect()
    sock.sendall(server.head("/episodes/h/chunky", None, "Transfer-Encoding: chunked") + chunks)
    reply = reply_or_close(sock)
    assert reply is not None and reply.status == 400, reply
    server.assert_untouched(("h", "chunky"))


def test_chunked_body_cut_off_before_the_last_chunk(server: Server) -> None:
    body = episode(server.commit, size=8192, seed=15)
    sock = server.connect()
    sock.sendall(
        server.head("/episodes/h/unfinished", None, "Transfer-Encoding: chunked")
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n"
    )
    sock.shutdown(socket.SHUT_WR)  # no terminating 0-size chunk
    reply = reply_or_close(sock)
    assert reply is None or 400 <= reply.status < 500, reply
    server.assert_untouched(("h", "unfinished"))


def test_content_length_and_chunked_together_are_refused(server: Server) -> None:
    sock = server.connect()
    head = server.head("/episodes/h/smuggle", 10, "Transfer-Encoding: chunked")
    sock.sendall(head + b"5\r\nhello\r\n0\r\n\r\n")
    reply = reply_or_close(sock)
    assert reply is not None and reply.status == 400, reply
    server.assert_untouched(("h", "smuggle"))


def test_200_idle_connections_do_not_starve_a_well_behaved_client(server: Server) -> None:
    idle: list[socket.socket] = []
    try:
        for number in range(200):
            sock = server.connect()
            if number % 4 == 1:  # a head never finished
                sock.sendall(b"PUT /episodes/idle/e HTTP/1.1\r\nHost: x\r\n")
            elif number % 4 == 2:  # a finished request line, nothing more
                sock.sendall(b"HEAD /episodes/idle/e HTTP/1.1\r\n")
            idle.append(sock)
        started = time.monotonic()
        server.assert_serving("among-the-idle")
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()
    server.assert_untouched(("idle", "e"))


# -- hostile ids --------------------------------------------------------------------------

# tests/e2e/test_receiver_protocol.py::test_400_invalid_ids_touch_nothing covers "..",
# ".hidden", %2F, %00, 129 characters, one-dot leaders, extra segments and an encoded
# traversal; these are further ones.
HOSTILE_PATHS = [
    "/episodes/%2e%2e/e",  # encoded dot-dot as the host
    "/episodes/h/%2E%2E",
    "/episodes/h/%252F..%252Fetc",  # double-encoded
    "/episodes/h/a%5Cb",  # backslash
    "/episodes/h/%EF%BC%8F..",  # fullwidth solidus
    "/episodes/h/a%E2%88%95b",  # division slash
    "/episodes/h/%D0%B5p-1",  # Cyrillic e in "ep-1"
    "/episodes/h/%EF%BD%85p-1",  # fullwidth e
    "/episodes/h/e%C2%A0",  # no-break space
    "/episodes/h/e%0D%0AX-Injected:%201",  # CRLF
    "/episodes/h/e%20",  # trailing space
    "/episodes/h/-e",  # must start with a letter or digit
    "/episodes/h/" + "x" * 8000,  # very long, still under the head cap
    "/episodes/" + "h" * 129 + "/e",  # host id one over the limit
    "/episodes/h/e%00.tar.zst",
    "/episodes//e",  # empty host
    "/episodes/h/",  # empty episode
]


@pytest.mark.parametrize("method", ["PUT", "HEAD"])
def test_hostile_ids_get_400_invalid_id_and_touch_nothing(server: Server, method: str) -> None:
    body = episode(server.commit, size=1024, seed=16)
    before = sorted(p.relative_to(server.data_dir) for p in server.data_dir.rglob("*"))
    for path in HOSTILE_PATHS:
        sock = server.connect()
        head = server.head(path, len(body), "Connection: close").replace(b"PUT", method.encode(), 1)
        sock.sendall(head + (body if method == "PUT" else b""))
        reply = reply_or_close(sock)
        assert reply is not None and reply.status == 400, (path, reply)
        if method == "PUT":
            assert reply.json()["error"] == "invalid-id", (path, reply)
    after = sorted(p.relative_to(server.data_dir) for p in server.data_dir.rglob("*"))
    assert after == before
    server.assert_untouched()


@pytest.mark.parametrize(
    "raw_path", [b"/episodes/h/e\x00x", b"/episodes/h/e x", b"/episodes/h/\xff\xfe"]
)
def test_raw_bytes_in_the_path_are_refused(server: Server, raw_path: bytes) -> None:
    sock = server.connect()
    sock.sendall(b"PUT " + raw_path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    reply = reply_or_close(sock)
    assert reply is not None and reply.status == 400, reply
    server.assert_untouched()


# -- hostile tarballs ---------------------------------------------------------------------


def tar_of(*members: tarfile.TarInfo, commit: str) -> bytes:
    raw = io.BytesIO()
    meta = json.dumps({"code_version": {"commit": commit}}).encode()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("meta.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    return raw.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = 4 if kind == tarfile.REGTYPE else 0
    info.linkname = linkname
    return info


def compress(data: bytes, window_log: int | None = None) -> bytes:
    options = {zstd.CompressionParameter.checksum_flag: 1}
    if window_log is not None:
        options[zstd.CompressionParameter.window_log] = window_log
    compressor = zstd.ZstdCompressor(options=options)
    compressed: bytes = compressor.compress(data) + compressor.flush()
    return compressed


def bomb() -> bytes:
    """1 GiB of zeros in a few dozen KiB."""
    compressor = zstd.ZstdCompressor(options={zstd.CompressionParameter.checksum_flag: 1})
    zeros = bytes(MiB)
    parts: list[bytes] = [compressor.compress(zeros) for _ in range(1024)]
    tail: bytes = compressor.flush()
    return b"".join(parts) + tail


def hostile_tarballs(commit: str) -> dict[str, bytes]:
    big = tar_of(member("data/big.bin"), commit=commit) + bytes(4 * MiB)
    return {
        "zstd-bomb": bomb(),
        "huge-window": compress(big, window_log=24),  # 16 MiB > max_window_bytes
        "dotdot-member": compress(tar_of(member("data/../../evil"), commit=commit)),
        "absolute-member": compress(tar_of(member("/etc/evil"), commit=commit)),
        "symlink": compress(tar_of(member("link", tarfile.SYMTYPE, "/etc"), commit=commit)),
        "hardlink": compress(tar_of(member("hard", tarfile.LNKTYPE, "meta.json"), commit=commit)),
        "char-device": compress(tar_of(member("dev", tarfile.CHRTYPE), commit=commit)),
        "block-device": compress(tar_of(member("blk", tarfile.BLKTYPE), commit=commit)),
        "fifo": compress(tar_of(member("fifo", tarfile.FIFOTYPE), commit=commit)),
        "truncated": compress(tar_of(member("data/x"), commit=commit))[:-9],
        "not-zstd": b"PK\x03\x04" + bytes(1000),
    }


def test_hostile_tarballs_get_400_in_bounded_memory_and_write_nothing(server: Server) -> None:
    before = server.status("VmHWM")
    keys = []
    for name, body in hostile_tarballs(server.commit).items():
        response = httpx.put(
            f"{server.url}/episodes/tar/{name}",
            content=body,
            headers={HEADER: server.commit},
            timeout=30,
        )
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"] == "invalid-tarball", (name, response.text)
        keys.append(("tar", name))
    grown = server.status("VmHWM") - before
    assert grown < RSS_GROWTH_LIMIT, f"server peak RSS grew by {grown / MiB:.0f} MiB"
    server.assert_untouched(*keys)
    server.assert_serving("after-tarballs")
