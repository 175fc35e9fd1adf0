"""The HTTP layer: routes, request parsing and response rendering only.

Domain errors (receiver.errors) are rendered here, once, as JSON bodies with the
contract's `error` codes; everything below this module is HTTP-agnostic. Endpoints get
the process's services from the lifespan's state (`request.state.services`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from receiver import __version__
from receiver.config import ReceiverConfig
from receiver.errors import (
    Forbidden,
    IngestError,
    InvalidId,
    LengthRequired,
    StorageUnavailable,
    Unauthorized,
)
from receiver.ingest import Reply, Upload
from receiver.limits import with_body_timeout
from receiver.request_log import RequestFacts
from receiver.services import Services, serving
from receiver.status_page import render_status_page
from receiver.storage import BackendUnavailable

Endpoint = Callable[[Request], Awaitable[Response]]


def _json(
    status_code: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(body, status_code=status_code, headers=headers)


def _render(reply: Reply, bodiless: bool = False) -> Response:
    if bodiless:
        return Response(status_code=reply.status_code, headers=reply.headers)
    return _json(reply.status_code, reply.body, reply.headers)


def _error_response(error: IngestError, bodiless: bool = False) -> Response:
    if bodiless:
        return Response(status_code=error.status_code, headers=error.headers)
    return _json(error.status_code, error.body(), error.headers)


def _services(request: Request) -> Services:
    services: Services = request.state.services
    return services


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        if "chunked" not in request.headers.get("transfer-encoding", "").lower():
            raise LengthRequired("send Content-Length or a chunked body")
        return None
    if not value.isdigit():
        raise LengthRequired("Content-Length is not a number")
    return int(value)


def _outcome(reply: Reply, head: bool) -> str:
    if head:
        return {200: "present", 404: "absent"}.get(reply.status_code, str(reply.status_code))
    named = reply.body.get("status") or reply.body.get("error")
    return str(named) if named else str(reply.status_code)


# -- episodes ------------------------------------------------------------------------


async def episode_request(request: Request) -> Response:
    """PUT stores; HEAD asks; GET answers as HEAD does, with the body (why a HEAD was refused)."""
    services = _services(request)
    facts = RequestFacts(
        method=request.method,
        claimed_host=request.path_params["host_id"],
        episode_id=request.path_params["episode_id"],
        sent_commit=request.headers.get(services.config.version_gate.header),
    )
    bodiless = request.method == "HEAD"
    try:
        _authorize(services, request, facts)
        reply = await _answer_episode(services, request, facts)
    except IngestError as error:
        facts.body = error.body()
        facts.finished(services.telemetry, error.status_code, error.code)
        return _error_response(error, bodiless)
    except ClientDisconnect:
        facts.finished(services.telemetry, 499, "client-disconnected")
        return Response(status_code=400)
    facts.body = reply.body
    outcome = _outcome(reply, request.method != "PUT")
    facts.finished(services.telemetry, reply.status_code, outcome)
    if request.method == "GET":
        reply.body.setdefault("status", outcome)
    return _render(reply, bodiless)


def _authorize(services: Services, request: Request, facts: RequestFacts) -> None:
    if services.tokens is None:
        return
    try:
        services.tokens.authorize(facts.claimed_host, request.headers.get("authorization"))
    except (Unauthorized, Forbidden):
        facts.authenticated = False
        raise


async def _answer_episode(services: Services, request: Request, facts: RequestFacts) -> Reply:
    try:
        return await _ask_ingestor(services, request, facts)
    except BackendUnavailable as down:  # translated once, here, for every backend
        retry_after = {"Retry-After": str(down.retry_after_seconds)}
        raise StorageUnavailable(str(down), headers=retry_after) from down


async def _ask_ingestor(services: Services, request: Request, facts: RequestFacts) -> Reply:
    ingestor = services.ingestor
    if request.method != "PUT":
        return await ingestor.head(facts.claimed_host, facts.episode_id, facts.sent_commit)
    timeout = services.config.server.body_timeout_seconds
    upload = Upload(
        host_id=facts.claimed_host,
        episode_id=facts.episode_id,
        sent_commit=facts.sent_commit,
        content_length=_content_length(request),
        content_digest=request.headers.get("content-digest"),
        body=facts.meter(with_body_timeout(request.stream(), timeout)),
    )
    return await ingestor.put(upload)


async def invalid_episode_path(request: Request) -> Response:
    error = InvalidId("the path must be /episodes/{host_id}/{episode_id}")
    return _error_response(error, bodiless=request.method == "HEAD")


# -- read endpoints ------------------------------------------------------------------


def read_endpoint(handler: Endpoint) -> Endpoint:
    """/, /metrics, /healthz, /readyz and /gate: open, unless auth.protect_read_endpoints."""

    async def guarded(request: Request) -> Response:
        services = _services(request)
        if services.tokens is not None and services.config.auth.protect_read_endpoints:
            try:
                services.tokens.authorize_any(request.headers.get("authorization"))
            except IngestError as error:
                return _error_response(error)
        return await handler(request)

    return guarded


async def gate_answer(request: Request) -> Response:
    ingestor = _services(request).ingestor
    try:
        return _render(await ingestor.gate_answer(request.path_params["commit"]))
    except IngestError as error:
        return _error_response(error)


async def healthz(request: Request) -> Response:
    services = _services(request)
    body = {
        "status": "ok",
        "version": __version__,
        "pid": os.getpid(),
        "gate": services.gate.state(),
        "index_rows": await asyncio.to_thread(services.storage.catalogue.count),
        "uploads_in_progress": services.admission.active,
    }
    return _json(200, body)


async def readyz(request: Request) -> Response:
    """200 when this receiver can store an episode now; else 503 and why (for balancers)."""
    services = _services(request)
    reasons = []
    if services.config.version_gate.enabled and not services.gate.state().get("loaded"):
        reasons.append("the version gate has not loaded its commit window yet")
    min_free = services.config.storage.min_free_bytes
    storage = services.storage
    for reason in (
        await asyncio.to_thread(storage.blobs.unready_reason, min_free),
        await asyncio.to_thread(storage.catalogue.unready_reason),
    ):
        if reason is not None:
            reasons.append(reason)
    if reasons:
        body = {"error": "not-ready", "detail": "; ".join(reasons), "reasons": reasons}
        return _json(503, body, {"Retry-After": "5"})
    return _json(200, {"status": "ready"})


async def metrics(request: Request) -> Response:
    services = _services(request)
    rows = await asyncio.to_thread(services.storage.catalogue.count)
    free = await asyncio.to_thread(services.storage.blobs.free_bytes)
    services.telemetry.set_gauges(free_bytes=free, index_rows=rows)
    body, content_type = services.telemetry.render_metrics(services.gate.state())
    return Response(body, media_type=content_type)


async def status_page(request: Request) -> Response:
    services = _services(request)
    catalogue = services.storage.catalogue

    def render() -> str:  # in a thread: every figure is read from the catalogue's storage
        return render_status_page(
            hosts=catalogue.host_summaries(),
            commits=catalogue.commit_summaries(),
            gate_state=services.gate.state(),
            gate_positions=services.gate.position,
            telemetry=services.telemetry,
            now=time.time(),
            version=__version__,
        )

    return HTMLResponse(await asyncio.to_thread(render))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    return _json(exc.status_code, {"error": code, "detail": exc.detail}, exc.headers)


ROUTES = [
    Route("/episodes/{host_id}/{episode_id}", episode_request, methods=["PUT", "HEAD", "GET"]),
    Route("/episodes/{rest:path}", invalid_episode_path, methods=["PUT", "HEAD"]),
    Route("/gate/{commit}", read_endpoint(gate_answer), methods=["GET"]),
    Route("/healthz", read_endpoint(healthz), methods=["GET"]),
    Route("/readyz", read_endpoint(readyz), methods=["GET"]),
    Route("/metrics", read_endpoint(metrics), methods=["GET"]),
    Route("/", read_endpoint(status_page), methods=["GET"]),
]


def create_app(config: ReceiverConfig) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        async with serving(config) as services:
            yield {"services": services}

    app = Starlette(
        routes=ROUTES, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    # A path that matches no route is an error, not a redirect to a look-alike.
    app.router.redirect_slashes = False
    return app
