"""uvicorn's httptools protocol with a cap on the request head and a copy-free body.

httptools buffers a header of any size: a 64 MiB header costs the receiver over
100 MB of memory and seconds of CPU. Past MAX_HEAD_BYTES the client gets 431 and
the connection is closed, so a head costs at most that plus one read.

uvicorn appends every body piece httptools hands it to a bytearray and gives the
application `bytes(bytearray)`: two copies of each body byte on the event loop,
on top of the two that uvloop and httptools make. For a receiver whose job is
moving bodies to disk that is a tenth of its CPU, so here each piece is queued
as the `bytes` object httptools made and handed to the application as it is.
Flow control is uvicorn's: reading pauses while more than HIGH_WATER_LIMIT bytes
wait, and resumes when the application asks for more.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import deque
from typing import TYPE_CHECKING

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

if TYPE_CHECKING:
    from uvicorn._types import (
        ASGI3Application,
        ASGIReceiveCallable,
        ASGIReceiveEvent,
        ASGISendCallable,
        Scope,
    )

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


class _BodyPieces:
    """One request's body as the pieces httptools produced, for uvicorn's cycle.

    Mirrors RequestResponseCycle.receive (100-continue, disconnect, the message
    event) with a deque of pieces in place of the bytearray. The message event
    stays set while pieces wait, so each receive() hands over one piece.
    """

    def __init__(self, cycle: RequestResponseCycle) -> None:
        # A proxy, not a reference: the cycle holds this object, and a reference back
        # would make a cycle that only the garbage collector frees.
        self.cycle = weakref.proxy(cycle)
        self.pieces: deque[bytes] = deque()
        self.waiting_bytes = 0

    def add(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self.waiting_bytes += len(piece)
        if self.waiting_bytes > HIGH_WATER_LIMIT:
            self.cycle.flow.pause_reading()
        self.cycle.message_event.set()

    async def receive(self) -> ASGIReceiveEvent:
        cycle = self.cycle
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        if not cycle.disconnected and not cycle.response_complete:
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected or cycle.response_complete:
            return {"type": "http.disconnect"}
        if not self.pieces:
            return {"type": "http.request", "body": b"", "more_body": cycle.more_body}
        piece = self.pieces.popleft()
        self.waiting_bytes -= len(piece)
        if self.pieces:
            cycle.message_event.set()  # the next receive() returns at once
        more_body = bool(self.pieces) or cycle.more_body
        return {"type": "http.request", "body": piece, "more_body": more_body}


_ATTRIBUTE = "_receiver_body_pieces"


class ReceiverProtocol(BoundedHeadProtocol):
    """The receiver's HTTP protocol: bounded head, body pieces handed over uncopied."""

    @staticmethod
    def _body_of(cycle: RequestResponseCycle) -> _BodyPieces:
        # Kept on the cycle itself, so it goes when the cycle does. (A map from cycle to
        # pieces kept every cycle of a keep-alive connection alive: the value refers to
        # its key, about 2 KiB per request until the connection closed.)
        body: _BodyPieces | None = getattr(cycle, _ATTRIBUTE, None)
        if body is None:
            body = _BodyPieces(cycle)
            setattr(cycle, _ATTRIBUTE, body)
        return body

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        self._body_of(cycle).add(body)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        receive_body: ASGIReceiveCallable = self._body_of(cycle).receive

        async def with_body_pieces(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            await app(scope, receive_body, send)

        super()._start_asgi_task(cycle, with_body_pieces)


def protocol_class() -> type[HttpToolsProtocol]:
    """ReceiverProtocol, or only the bounded head if this uvicorn lacks the hooks it uses.

    The body hand-over replaces uvicorn internals (the cycle's receive, the task
    start); a uvicorn without them still gets a correct, slower receiver.
    """
    cycle_fields = ("message_event", "flow", "waiting_for_100_continue", "more_body")
    hooks = all(hasattr(HttpToolsProtocol, name) for name in ("_start_asgi_task", "on_body"))
    init = RequestResponseCycle.__init__.__code__.co_names
    if hooks and all(name in init for name in cycle_fields):
        return ReceiverProtocol
    log.warning("this uvicorn lacks the hooks for copy-free bodies; bodies are copied")
    return BoundedHeadProtocol
