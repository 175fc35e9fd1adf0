"""The HTTP layer: routes, request parsing and response rendering only.

Domain errors (receiver.errors) are rendered here, once, as JSON bodies with
the contract's `error` codes; everything below this module is HTTP-agnostic.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, NoReturn

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from receiver import __version__
from receiver.auth import TokenStore
from receiver.config import ReceiverConfig
from receiver.errors import IngestError, InvalidId, LengthRequired
from receiver.events import RequestEvent
from receiver.gate import VersionGate
from receiver.index import open_index
from receiver.ingest import Ingestor, Reply, UploadHeaders
from receiver.limits import UploadAdmission, with_body_timeout
from receiver.locks import EpisodeLocks
from receiver.status_page import render_status_page
from receiver.store import FilesystemStore
from receiver.telemetry import Telemetry

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
    server = config.server
    store = FilesystemStore(storage.data_dir)
    index = open_index(storage.data_dir / "index.jsonl")
    gate = VersionGate(config.version_gate)
    telemetry = Telemetry()
    tokens = None
    if config.auth.mode == "tokens":
        assert config.auth.tokens_file is not None
        tokens = TokenStore(config.auth.tokens_file)
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
        await asyncio.to_thread(index.load_once)
        if tokens is not None:
            tokens.load()
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

    def finished(
        request: Request, started: float, status: int, outcome: str, body: Mapping[str, Any]
    ) -> None:
        """One log line and one telemetry event per episode request."""
        host_id = str(request.path_params.get("host_id", request.url.path))[:200]
        episode_id = str(request.path_params.get("episode_id", ""))[:200]
        duration = time.monotonic() - started
        size = int(body.get("size_bytes") or 0)
        commit = body.get("commit") or body.get("your_commit")
        behind_by = body.get("behind_by")
        log.info(
            "%s host=%s episode=%s status=%d outcome=%s bytes=%d duration=%.3fs commit=%s",
            request.method,
            host_id,
            episode_id,
            status,
            outcome,
            size,
            duration,
            commit,
        )
        telemetry.request_finished(
            RequestEvent(
                method=request.method,
                host_id=host_id,
                episode_id=episode_id,
                status=status,
                outcome=outcome,
                size_bytes=size,
                duration_seconds=duration,
                commit=str(commit) if commit else None,
                behind_by=behind_by if isinstance(behind_by, int) else None,
                finished_at=time.time(),
            )
        )

    async def episode_request(request: Request) -> Response:
        started = time.monotonic()
        head = request.method == "HEAD"
        host_id = request.path_params["host_id"]
        episode_id = request.path_params["episode_id"]
        commit_value = request.headers.get(header_name)
        try:
            if tokens is not None:
                tokens.authorize(host_id, request.headers.get("authorization"))
            ingestor = state["ingestor"]
            if head:
                reply = await ingestor.head(host_id, episode_id, commit_value)
            else:
                headers = UploadHeaders(
                    commit=commit_value,
                    content_length=_content_length(request),
                    content_digest=request.headers.get("content-digest"),
                )
                body = with_body_timeout(request.stream(), server.body_timeout_seconds)
                reply = await ingestor.put(host_id, episode_id, headers, body)
        except IngestError as error:
            finished(request, started, error.status_code, error.code, error.body())
            return _error_response(error, head)
        except ClientDisconnect:
            finished(request, started, 499, "client-disconnected", {})
            return Response(status_code=400)
        outcome = str(reply.body.get("status", "stored" if reply.status_code < 300 else ""))
        if head:
            outcome = {200: "present", 404: "absent"}.get(reply.status_code, outcome)
        finished(request, started, reply.status_code, outcome, reply.body)
        return _render(reply, head)

    async def invalid_episode_path(request: Request) -> Response:
        error = InvalidId("the path must be /episodes/{host_id}/{episode_id}")
        return _error_response(error, head=request.method == "HEAD")

    def read_endpoint(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """/, /metrics, /healthz and /gate: open, unless auth.protect_read_endpoints."""

        async def guarded(request: Request) -> Response:
            if tokens is not None and config.auth.protect_read_endpoints:
                try:
                    tokens.authorize_any(request.headers.get("authorization"))
                except IngestError as error:
                    return _error_response(error)
            return await handler(request)

        return guarded

    async def gate_answer(request: Request) -> Response:
        try:
            return _render(await state["ingestor"].gate_answer(request.path_params["commit"]))
        except IngestError as error:
            return _error_response(error)

    async def healthz(request: Request) -> Response:
        body = {
            "status": "ok",
            "version": __version__,
            "pid": os.getpid(),
            "gate": gate.state(),
            "index_rows": len(index),
            "uploads_in_progress": admission.active,
            "shutting_down": admission.shutting_down,
        }
        return _json(200, body)

    async def metrics(request: Request) -> Response:
        await asyncio.to_thread(index.refresh)
        telemetry.set_gauges(free_bytes=store.free_bytes(), index_rows=len(index))
        body, content_type = telemetry.render_metrics(gate.state())
        return Response(body, media_type=content_type)

    async def status_page(request: Request) -> Response:
        await asyncio.to_thread(index.refresh)
        page = await asyncio.to_thread(
            lambda: render_status_page(
                rows=index.rows(),
                gate_state=gate.state(),
                gate_positions=gate.position,
                telemetry=telemetry,
                now=time.time(),
                version=__version__,
            )
        )
        return HTMLResponse(page)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return _json(exc.status_code, {"error": code, "detail": exc.detail}, exc.headers)

    routes = [
        Route("/episodes/{host_id}/{episode_id}", episode_request, methods=["PUT", "HEAD"]),
        Route("/episodes/{rest:path}", invalid_episode_path, methods=["PUT", "HEAD"]),
        Route("/gate/{commit}", read_endpoint(gate_answer), methods=["GET"]),
        Route("/healthz", read_endpoint(healthz), methods=["GET"]),
        Route("/metrics", read_endpoint(metrics), methods=["GET"]),
        Route("/", read_endpoint(status_page), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    # A path that matches no route is an error, not a redirect to a look-alike.
    app.router.redirect_slashes = False
    return app
