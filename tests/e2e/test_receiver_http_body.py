"""The request body's path through the receiver's HTTP protocol, on raw sockets.

The receiver hands body pieces to the application without uvicorn's copies
(receiver/http_protocol.py); these tests drive the cases that code mirrors from
uvicorn: pipelined requests, `Expect: 100-continue`, bodies arriving in many
small pieces and faster than the application reads, and a client that leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from receiver.http_protocol import ReceiverProtocol, protocol_class
from tests.conftest import StartReceiver
from tests.support import head_commits, make_tarball, read_http_response


def put_head(episode: str, commit: str, length: int, *extra: str) -> bytes:
    lines = [
        f"PUT /episodes/lab-01/{episode} HTTP/1.1",
        "Host: 127.0.0.1",
        f"X-Code-Commit: {commit}",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def stored_bytes(data_dir: Path, episode: str) -> bytes:
    return (data_dir / "episodes" / "lab-01" / f"{episode}.tar.zst").read_bytes()


def test_this_uvicorn_gets_the_copy_free_protocol() -> None:
    assert protocol_class() is ReceiverProtocol
    assert issubclass(ReceiverProtocol, HttpToolsProtocol)


def test_pipelined_uploads_on_one_connection_are_each_stored_whole(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    commit = head_commits(repo, 1)[0]
    bodies = [make_tarball(commit, {"data/obs.bin": os.urandom(300_000 + n)}) for n in range(3)]
    wire = b"".join(put_head(f"ep-{n}", commit, len(body)) + body for n, body in enumerate(bodies))
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=20) as sock:
        sock.sendall(wire)  # all three requests before reading any response
        buffer = bytearray()
        replies = [read_http_response(sock, buffer) for _ in bodies]
    for n, (status, reply) in enumerate(replies):
        assert status == 201, reply
        assert json.loads(reply)["sha256"] == hashlib.sha256(bodies[n]).hexdigest()
        assert stored_bytes(tmp_path / "data", f"ep-{n}") == bodies[n]


def test_expect_100_continue_is_answered_before_the_body_is_sent(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    commit = head_commits(repo, 1)[0]
    body = make_tarball(commit, {"data/obs.bin": os.urandom(200_000)})
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=20) as sock:
        sock.sendall(put_head("ep-1", commit, len(body), "Expect: 100-continue"))
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        sock.sendall(body)
        buffer = bytearray(interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
        status, reply = read_http_response(sock, buffer)
    assert status == 201, reply
    assert stored_bytes(tmp_path / "data", "ep-1") == body


def test_a_body_in_many_small_pieces_and_in_bursts_arrives_whole_and_in_order(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    commit = head_commits(repo, 1)[0]
    body = make_tarball(commit, {"data/obs.bin": os.urandom(6 * 1024 * 1024)})
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(put_head("ep-1", commit, len(body)))
        view = memoryview(body)
        sizes = [1, 7, 511, 4096, 65537, 1_000_003]  # tiny pieces, then bursts past the high water
        turn = 0
        while view:
            size = sizes[turn % len(sizes)]
            sock.sendall(view[:size])
            view = view[size:]
            turn += 1
            if turn % 50 == 0:
                time.sleep(0.001)
        status, reply = read_http_response(sock, bytearray())
    assert status == 201, reply
    assert json.loads(reply)["size_bytes"] == len(body)
    assert stored_bytes(tmp_path / "data", "ep-1") == body


def test_a_client_that_leaves_mid_body_leaves_nothing_and_the_next_upload_works(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    commit = head_commits(repo, 1)[0]
    body = make_tarball(commit, {"data/obs.bin": os.urandom(2 * 1024 * 1024)})
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=20) as sock:
        sock.sendall(put_head("ep-1", commit, len(body)) + body[: len(body) // 2])
    data_dir = tmp_path / "data"
    # The receiver notices the disconnect and drops the upload; until then the
    # episode is in flight (423). Then a whole upload of the same id is stored.
    deadline = time.monotonic() + 10
    while True:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=20) as sock:
            sock.sendall(put_head("ep-1", commit, len(body)) + body)
            status, reply = read_http_response(sock, bytearray())
        if status != 423 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 201, reply
    assert stored_bytes(data_dir, "ep-1") == body
    assert [p for p in (data_dir / "tmp").rglob("*") if p.is_file()] == [], "temp file left"


def test_a_rejected_small_body_never_reaches_the_disk(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    # A small body is checked before its temp file is made: a new host's temp directory
    # is not even created (a streamed body's would be, and stay, empty).
    receiver = start_receiver(repo)
    commit = head_commits(repo, 1)[0]
    not_a_tarball = os.urandom(50_000)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=20) as sock:
        sock.sendall(put_head("ep-1", commit, len(not_a_tarball)) + not_a_tarball)
        status, reply = read_http_response(sock, bytearray())
    assert status == 400, reply
    assert json.loads(reply)["error"] == "invalid-tarball"
    data_dir = tmp_path / "data"
    assert not (data_dir / "tmp" / "lab-01").exists()
    assert not (data_dir / "episodes" / "lab-01").exists()
