"""shipper.upload: what a failed request says about how far it got."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from shipper.upload import ReceiverClient, ReceiverUnreachable

SIZE = 5 << 20  # five chunks of the client's 1 MiB


class ClosesAfter(httpx.AsyncBaseTransport):
    """Reads `chunks` chunks of the body, then the connection drops (as a dying receiver's)."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        stream = request.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        read = 0
        async for _chunk in stream:
            read += 1
            if read == self.chunks:
                break
        raise httpx.ReadError("", request=request)


def put_failure(tmp_path: Path, transport: httpx.AsyncBaseTransport) -> str:
    path = tmp_path / "ep-1.tar.zst"
    path.write_bytes(b"z" * SIZE)

    async def go() -> None:
        client = ReceiverClient(
            "http://receiver.test",
            "lab-01",
            commit_header="X-Code-Commit",
            token=None,
            timeout_seconds=5.0,
            transport=transport,
        )
        try:
            await client.put("ep-1", "a" * 40, path, SIZE, "f" * 64)
        finally:
            await client.aclose()

    with pytest.raises(ReceiverUnreachable) as caught:
        asyncio.run(go())
    return str(caught.value)


def test_a_connection_closed_mid_body_says_how_many_bytes_went(tmp_path: Path) -> None:
    reason = put_failure(tmp_path, ClosesAfter(chunks=2))
    sent = 2 << 20
    assert reason == f"connection closed by the receiver after {sent} of {SIZE} bytes (ReadError)"


def test_a_connection_closed_after_the_body_says_no_answer_came(tmp_path: Path) -> None:
    reason = put_failure(tmp_path, ClosesAfter(chunks=99))
    assert reason == (
        f"connection closed by the receiver after the whole body ({SIZE} bytes),"
        " before an answer (ReadError)"
    )


def test_a_refused_connection_says_it_could_not_connect(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    reason = put_failure(tmp_path, httpx.MockTransport(refuse))
    assert reason == "cannot connect (ConnectError: connection refused)"
