"""A lean HTTP/1.1 client for the bench: the body goes by sendfile, so the client costs little
CPU and the same client measures the receiver and nginx alike."""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from pathlib import Path

from tests.support import read_http_response


class HttpError(Exception):
    """A request in the bench did not get the answer it needed."""


def _head(method: str, port: int, target: str, headers: Mapping[str, str], length: int) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def put_file(port: int, target: str, path: Path, headers: Mapping[str, str]) -> tuple[int, bytes]:
    """PUT a file (sendfile) on a new connection; returns (status, body)."""
    size = path.stat().st_size
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_head("PUT", port, target, {**headers, "Connection": "close"}, size))
        try:
            with path.open("rb") as body:
                sock.sendfile(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered early (a rejection): the response says why
        return read_http_response(sock, bytearray())


class KeepAlive:
    """One persistent connection sending small in-memory bodies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()

    def put(self, target: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        self._sock.sendall(_head("PUT", self.port, target, headers, len(body)) + body)
        return read_http_response(self._sock, self._buffer)

    def close(self) -> None:
        self._sock.close()


def get(port: int, target: str, timeout: float = 1.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return read_http_response(sock, bytearray())


def wait_healthy(port: int, deadline: float, interval: float = 0.005) -> float:
    """Poll /healthz until it answers 200; returns the monotonic time it did."""
    while time.monotonic() < deadline:
        try:
            status, _ = get(port, "/healthz")
        except (OSError, HttpError):
            status = 0
        if status == 200:
            return time.monotonic()
        time.sleep(interval)
    raise HttpError(f"/healthz on port {port} not 200 in time")
