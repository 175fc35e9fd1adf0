"""Talk to the receiver over HTTP (httpx): HEAD, streaming PUT and the gate query.

httpx's exceptions are translated here, once, into ReceiverUnreachable; every
answer comes back as a plain Reply for shipper.outcome to classify.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote

import httpx

from episode_common.wire import format_sha256_digest
from shipper import __version__
from shipper.outcome import Reply

CHUNK = 1 << 20
# Upper bound on a response body we keep (they are small JSON objects).
MAX_BODY = 1 << 16


class ReceiverUnreachable(Exception):
    """No HTTP answer: refused, reset, timed out, DNS. str() is the one-line reason."""


class LocalFileChanged(Exception):
    """The tarball on disk is shorter than when it was hashed; hash it again."""


class ReceiverClient:
    """One receiver, one connection pool; safe for concurrent uploads."""

    def __init__(
        self,
        base_url: str,
        host_id: str,
        *,
        commit_header: str,
        token: str | None,
        timeout_seconds: float,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 8,
    ) -> None:
        headers = {"User-Agent": f"episode-shipper/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        self.host_id = host_id
        self.commit_header = commit_header
        self.http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0)),
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    def _episode_url(self, episode_id: str) -> str:
        return f"{self.base_url}/episodes/{quote(self.host_id)}/{quote(episode_id)}"

    async def _send(self, request: httpx.Request, sent: _BodyProgress | None = None) -> Reply:
        try:
            response = await self.http.send(request, stream=True)
            try:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY:
                        break
            finally:
                await response.aclose()
        except httpx.HTTPError as error:
            raise ReceiverUnreachable(_why(error, sent)) from error
        headers = {key.lower(): value for key, value in response.headers.items()}
        return Reply(response.status_code, headers, body[:MAX_BODY])

    async def head(self, episode_id: str, commit: str) -> Reply:
        request = self.http.build_request(
            "HEAD", self._episode_url(episode_id), headers={self.commit_header: commit}
        )
        return await self._send(request)

    def set_token(self, token: str | None) -> None:
        """Use another bearer token from the next request on (token_file was re-read)."""
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"
        else:
            self.http.headers.pop("Authorization", None)

    async def refusal(self, episode_id: str, commit: str) -> Reply:
        """GET of the episode URL: HEAD's answer with a body (the reason for a 401/403)."""
        request = self.http.build_request(
            "GET", self._episode_url(episode_id), headers={self.commit_header: commit}
        )
        return await self._send(request)

    async def gate(self, commit: str) -> Reply:
        request = self.http.build_request("GET", f"{self.base_url}/gate/{quote(commit)}")
        return await self._send(request)

    async def put(
        self,
        episode_id: str,
        commit: str,
        path: Path,
        size: int,
        sha256: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> Reply:
        """Stream the file at path as the body; Content-Length, never chunked."""
        headers = {
            self.commit_header: commit,
            "Content-Type": "application/zstd",
            "Content-Length": str(size),
            "Content-Digest": format_sha256_digest(sha256),
        }
        body = _BodyProgress(size, on_progress)
        request = self.http.build_request(
            "PUT",
            self._episode_url(episode_id),
            headers=headers,
            content=_read_chunks(path, size, body.advance),
        )
        return await self._send(request, body)


class _BodyProgress:
    """Bytes of a PUT body handed to httpx so far, so a failure can say how far it got."""

    def __init__(self, size: int, on_progress: Callable[[int], None] | None) -> None:
        self.size = size
        self.sent = 0
        self.on_progress = on_progress

    def advance(self, count: int) -> None:
        self.sent += count
        if self.on_progress is not None:
            self.on_progress(count)


def _why(error: httpx.HTTPError, body: _BodyProgress | None) -> str:
    """One line on what went wrong, in the words of someone watching the wire."""
    kind = type(error).__name__
    detail = str(error)
    detail = f"{kind}: {detail}" if detail and detail != kind else kind
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return f"cannot connect ({detail})"
    if isinstance(error, httpx.TimeoutException):
        where = "" if body is None else f" after {body.sent} of {body.size} bytes"
        return f"no progress within request_timeout_seconds{where} ({kind})"
    if body is not None and isinstance(error, httpx.TransportError):
        closed = "connection closed by the receiver after"
        if body.sent < body.size:
            return f"{closed} {body.sent} of {body.size} bytes ({kind})"
        return f"{closed} the whole body ({body.size} bytes), before an answer ({kind})"
    # Other transport errors, and answers httpx cannot decode: no usable reply either way.
    return detail


async def _read_chunks(
    path: Path, size: int, on_progress: Callable[[int], None]
) -> AsyncIterator[bytes]:
    # Reads happen in a worker thread so a slow disk never stalls the event loop.
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        remaining = size
        while remaining > 0:
            chunk = await asyncio.to_thread(handle.read, min(CHUNK, remaining))
            if not chunk:
                # Raised through httpx, so the request is aborted, not sent short.
                raise LocalFileChanged(f"{path.name} shrank since it was hashed")
            remaining -= len(chunk)
            on_progress(len(chunk))
            yield chunk
    finally:
        handle.close()
