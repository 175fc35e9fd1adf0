"""uvicorn's httptools protocol with a cap on the request head (request line and headers).

httptools buffers a header of any size: a 64 MiB header costs the receiver over
100 MB of memory and seconds of CPU. Past MAX_HEAD_BYTES the client gets 431 and
the connection is closed, so a head costs at most that plus one read.
"""

from __future__ import annotations

import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024

_BODY = json.dumps(
    {
        "error": "headers-too-large",
        "detail": f"request line and headers over {MAX_HEAD_BYTES} bytes",
    }
).encode()
_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _BODY
)


class BoundedHeadProtocol(HttpToolsProtocol):
    _head_bytes: int | None = None  # bytes of the head being received; None between heads
    _began_in_this_read = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._began_in_this_read = True

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        self._began_in_this_read = False
        super().data_received(data)
        # A read in which a head began may also hold the previous request's body: not counted.
        if self._head_bytes is None or self._began_in_this_read:
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            log.warning(
                "request head over %d bytes from %s: 431, closed", MAX_HEAD_BYTES, self.client
            )
            self.transport.write(_REFUSAL)
            self.transport.close()
