"""The HTTP layer: routes, request parsing and response rendering only.

Domain errors (receiver.errors) are rendered here, once, as JSON bodies with
the contract's `error` codes; everything below this module is HTTP-agnostic.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, NoReturn

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from receiver import __version__
from receiver.config import ReceiverConfig
from receiver.errors import IngestError, InvalidId, LengthRequired
from receiver.gate import VersionGate
from receiver.index import JsonlIndex
from receiver.ingest import Ingestor, Reply, UploadHeaders
from receiver.limits import UploadAdmission, with_body_timeout
from receiver.locks import EpisodeLocks
from receiver.store import FilesystemStore

log = logging.getLogger(__name__)

EXIT_DURABILITY = 70  # EX_SOFTWARE: restart and let recovery look at the disk


def _fatal(message: str) -> NoReturn:
    log.critical("durability failure, exiting so that a restart runs recovery: %s", message)
    logging.shutdown()
    os._exit(EXIT_DURABILITY)


def _json(
    status_code: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(body, status_code=status_code, headers=headers)


def _render(reply: Reply, head: bool = False) -> Response:
    if head:
        return Response(status_code=reply.status_code, headers=reply.headers)
    return _json(reply.status_code, reply.body, reply.headers)


def _error_response(error: IngestError, head: bool = False) -> Response:
    if head:
        return Response(status_code=error.status_code, headers=error.headers)
    return _json(error.status_code, error.body(), error.headers)


def _stop_admitting_on_sigterm(admission: UploadAdmission) -> None:
    """From SIGTERM on, new uploads get 503 while uvicorn drains the ones in flight.

    uvicorn has installed its own handler by the time the lifespan starts; ours runs
    first and then hands the signal on to it.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        admission.shutting_down = True
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        if "chunked" not in request.headers.get("transfer-encoding", "").lower():
            raise LengthRequired("send Content-Length or a chunked body")
        return None
    if not value.isdigit():
        raise LengthRequired("Content-Length is not a number")
    return int(value)


def create_app(config: ReceiverConfig) -> Starlette:
    storage = config.storage
    store = FilesystemStore(storage.data_dir)
    index = JsonlIndex(storage.data_dir / "index.jsonl")
    gate = VersionGate(config.version_gate)
    server = config.server
    admission = UploadAdmission(
        server.max_concurrent_uploads,
        server.max_concurrent_uploads_per_host,
        storage.min_free_bytes,
    )
    header_name = config.version_gate.header
    state: dict[str, Ingestor] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store.prepare()
        index.load(strict=False)
        locks = EpisodeLocks(storage.data_dir / "episodes.lock")
        await gate.start()
        _stop_admitting_on_sigterm(admission)
        state["ingestor"] = Ingestor(config, gate, store, index, locks, admission, _fatal)
        try:
            yield
        finally:
            # uvicorn cancels uploads that outlast the grace period and then runs this
            # at once; let them remove their temp files and release their locks first.
            if not await admission.wait_idle(timeout=10):
                log.warning("%d upload(s) still cleaning up at shutdown", admission.active)
            await gate.close()
            locks.close()

    async def put_episode(request: Request) -> Response:
        host_id = request.path_params["host_id"]
        episode_id = request.path_params["episode_id"]
        started = time.monotonic()
        outcome = "error"
        status = 500
        size = 0
        try:
            headers = UploadHeaders(
                commit=request.headers.get(header_name),
                content_length=_content_length(request),
                content_digest=request.headers.get("content-digest"),
            )
            body = with_body_timeout(request.stream(), server.body_timeout_seconds)
            reply = await state["ingestor"].put(host_id, episode_id, headers, body)
            status, outcome = reply.status_code, str(reply.body.get("status", ""))
            size = int(reply.body.get("size_bytes") or 0)
            return _render(reply)
        except IngestError as error:
            status, outcome = error.status_code, error.code
            return _error_response(error)
        except ClientDisconnect:
            status, outcome = 499, "client-disconnected"
            return Response(status_code=400)
        finally:
            log.info(
                "PUT host=%s episode=%s status=%d outcome=%s bytes=%d duration=%.3fs",
                host_id[:128],
                episode_id[:128],
                status,
                outcome,
                size,
                time.monotonic() - started,
            )

    async def head_episode(request: Request) -> Response:
        try:
            reply = await state["ingestor"].head(
                request.path_params["host_id"],
                request.path_params["episode_id"],
                request.headers.get(header_name),
            )
            return _render(reply, head=True)
        except IngestError as error:
            return _error_response(error, head=True)

    async def episode_dispatch(request: Request) -> Response:
        if request.method == "PUT":
            return await put_episode(request)
        return await head_episode(request)

    async def invalid_episode_path(request: Request) -> Response:
        error = InvalidId("the path must be /episodes/{host_id}/{episode_id}")
        return _error_response(error, head=request.method == "HEAD")

    async def gate_answer(request: Request) -> Response:
        try:
            return _render(await state["ingestor"].gate_answer(request.path_params["commit"]))
        except IngestError as error:
            return _error_response(error)

    async def healthz(request: Request) -> Response:
        return _json(
            200,
            {
                "status": "ok",
                "version": __version__,
                "pid": os.getpid(),
                "gate": gate.state(),
                "index_rows": len(index),
            },
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return _json(exc.status_code, {"error": code, "detail": exc.detail}, exc.headers)

    routes = [
        Route("/episodes/{host_id}/{episode_id}", episode_dispatch, methods=["PUT", "HEAD"]),
        Route("/episodes/{rest:path}", invalid_episode_path, methods=["PUT", "HEAD"]),
        Route("/gate/{commit}", gate_answer, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    # A path that matches no route is an error, not a redirect to a look-alike.
    app.router.redirect_slashes = False
    return app


def app_from_environment() -> Starlette:
    from receiver.server import config_from_environment

    return create_app(config_from_environment())
