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

from shipper import __version__
from shipper.outcome import Reply, content_digest

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

    async def _send(self, request: httpx.Request) -> Reply:
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
        except httpx.TimeoutException as error:
            raise ReceiverUnreachable(f"timeout: {type(error).__name__}") from error
        except httpx.HTTPError as error:
            # Transport errors, and answers httpx cannot decode: either way no usable reply.
            reason = str(error) or type(error).__name__
            raise ReceiverUnreachable(f"{type(error).__name__}: {reason}") from error
        headers = {key.lower(): value for key, value in response.headers.items()}
        return Reply(response.status_code, headers, body[:MAX_BODY])

    async def head(self, episode_id: str, commit: str) -> Reply:
        request = self.http.build_request(
            "HEAD", self._episode_url(episode_id), headers={self.commit_header: commit}
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
            "Content-Digest": content_digest(sha256),
        }
        request = self.http.build_request(
            "PUT",
            self._episode_url(episode_id),
            headers=headers,
            content=_read_chunks(path, size, on_progress),
        )
        return await self._send(request)


async def _read_chunks(
    path: Path, size: int, on_progress: Callable[[int], None] | None
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
            if on_progress is not None:
                on_progress(len(chunk))
            yield chunk
    finally:
        handle.close()
