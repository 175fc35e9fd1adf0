"""The HTTP layer: routes, request parsing and response rendering only."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from receiver import __version__
from receiver.config import ReceiverConfig


def create_app(config: ReceiverConfig) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"])])


def app_from_environment() -> Starlette:
    from receiver.server import config_from_environment

    return create_app(config_from_environment())
