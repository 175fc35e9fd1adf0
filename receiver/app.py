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
from dataclasses import dataclass, field
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
from receiver.errors import Forbidden, IngestError, InvalidId, LengthRequired, Unauthorized
from receiver.events import UNAUTHENTICATED_HOST, RequestEvent
from receiver.gate import VersionGate
from receiver.ids import normalise_commit
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


@dataclass
class RequestFacts:
    """What one episode request said and did, for its log line and telemetry event."""

    claimed_host: str
    episode_id: str
    sent_commit: str | None
    authenticated: bool = True
    received: int = 0  # body bytes read from the client
    body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def host_id(self) -> str:
        # A name claimed without a valid token never becomes a label or a page entry.
        return self.claimed_host if self.authenticated else UNAUTHENTICATED_HOST

    @property
    def commit(self) -> str | None:
        return normalise_commit(self.sent_commit) if self.sent_commit is not None else None

    async def meter(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in body:
            self.received += len(chunk)
            yield chunk


def _outcome(reply: Reply, head: bool) -> str:
    if head:
        return {200: "present", 404: "absent"}.get(reply.status_code, str(reply.status_code))
    named = reply.body.get("status") or reply.body.get("error")
    return str(named) if named else str(reply.status_code)


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
        request: Request, started: float, status: int, outcome: str, facts: RequestFacts
    ) -> None:
        """One log line and one telemetry event per episode request."""
        duration = time.monotonic() - started
        body = facts.body
        log.info(
            "%s host=%s episode=%s status=%d outcome=%s bytes=%d duration=%.3fs commit=%s",
            request.method,
            facts.claimed_host[:200],
            facts.episode_id[:200],
            status,
            outcome,
            facts.received,
            duration,
            facts.sent_commit[:200] if facts.sent_commit is not None else None,
        )
        recorded = body.get("commit") or body.get("your_commit") or facts.commit
        behind_by = body.get("behind_by")
        telemetry.request_finished(
            RequestEvent(
                method=request.method,
                host_id=facts.host_id,
                episode_id=facts.episode_id if facts.authenticated else "",
                status=status,
                outcome=outcome,
                size_bytes=int(body.get("size_bytes") or 0),
                duration_seconds=duration,
                commit=str(recorded) if recorded else None,
                behind_by=behind_by if isinstance(behind_by, int) else None,
                finished_at=time.time(),
            )
        )

    async def episode_request(request: Request) -> Response:
        started = time.monotonic()
        # GET answers as HEAD does, with the body: why a bodiless HEAD was refused (401/403).
        head = request.method != "PUT"
        bodiless = request.method == "HEAD"
        facts = RequestFacts(
            claimed_host=request.path_params["host_id"],
            episode_id=request.path_params["episode_id"],
            sent_commit=request.headers.get(header_name),
        )
        try:
            if tokens is not None:
                try:
                    tokens.authorize(facts.claimed_host, request.headers.get("authorization"))
                except (Unauthorized, Forbidden):
                    facts.authenticated = False
                    raise
            reply = await answer_episode(request, facts, head)
        except IngestError as error:
            facts.body = error.body()
            finished(request, started, error.status_code, error.code, facts)
            return _error_response(error, bodiless)
        except ClientDisconnect:
            finished(request, started, 499, "client-disconnected", facts)
            return Response(status_code=400)
        facts.body = reply.body
        outcome = _outcome(reply, head)
        finished(request, started, reply.status_code, outcome, facts)
        if request.method == "GET":
            reply.body.setdefault("status", outcome)
        return _render(reply, bodiless)

    async def answer_episode(request: Request, facts: RequestFacts, head: bool) -> Reply:
        ingestor = state["ingestor"]
        host_id, episode_id = facts.claimed_host, facts.episode_id
        if head:
            return await ingestor.head(host_id, episode_id, facts.sent_commit)
        headers = UploadHeaders(
            commit=facts.sent_commit,
            content_length=_content_length(request),
            content_digest=request.headers.get("content-digest"),
        )
        body = with_body_timeout(request.stream(), server.body_timeout_seconds)
        return await ingestor.put(host_id, episode_id, headers, facts.meter(body))

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

    async def readyz(request: Request) -> Response:
        """200 when this receiver can store an episode now; else 503 and why (for balancers)."""
        reasons = []
        if admission.shutting_down:
            reasons.append("shutting down")
        if config.version_gate.enabled and not gate.state().get("loaded"):
            reasons.append("the version gate has not loaded its commit window yet")
        storage_reason = await asyncio.to_thread(store.unready_reason, storage.min_free_bytes)
        if storage_reason is not None:
            reasons.append(storage_reason)
        if reasons:
            body = {"error": "not-ready", "detail": "; ".join(reasons), "reasons": reasons}
            return _json(503, body, {"Retry-After": "5"})
        return _json(200, {"status": "ready"})

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
        Route("/episodes/{host_id}/{episode_id}", episode_request, methods=["PUT", "HEAD", "GET"]),
        Route("/episodes/{rest:path}", invalid_episode_path, methods=["PUT", "HEAD"]),
        Route("/gate/{commit}", read_endpoint(gate_answer), methods=["GET"]),
        Route("/healthz", read_endpoint(healthz), methods=["GET"]),
        Route("/readyz", read_endpoint(readyz), methods=["GET"]),
        Route("/metrics", read_endpoint(metrics), methods=["GET"]),
        Route("/", read_endpoint(status_page), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    # A path that matches no route is an error, not a redirect to a look-alike.
    app.router.redirect_slashes = False
    return app
