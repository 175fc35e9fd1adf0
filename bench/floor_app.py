"""The floor under the small-upload figure: an ASGI app that does only a small upload's
storage work, served by the same uvicorn and Starlette as the receiver.

Each PUT body is read into memory, then, in one worker thread, written to a temp file,
fsynced, linked under its final name, its directory fsynced, the temp name unlinked and a
line appended to an index file that is fsynced: the receiver's three syncs per upload and
its one thread hand-off, without its checks (no id rule, gate, hashing, tar validation,
catalogue lookups, limits or logging). Run as
`FLOOR_DATA=<dir> python -m uvicorn bench.floor_app:app ...`; the bench starts it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from functools import cache
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from episode_common.durable import fsync_dir

DATA = Path(os.environ.get("FLOOR_DATA", "floor-data"))


@cache
def _index_fd() -> int:
    """One O_APPEND descriptor per process: each line lands whole, no lock needed."""
    return os.open(DATA / "index.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _store(host: str, episode: str, body: bytes) -> None:
    temp_dir, final_dir = DATA / "tmp" / host, DATA / "episodes" / host
    temp_dir.mkdir(parents=True, exist_ok=True)
    final_dir.mkdir(parents=True, exist_ok=True)
    temp = temp_dir / f"{episode}~{secrets.token_hex(6)}.part"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(temp, final_dir / f"{episode}.tar.zst")
    fsync_dir(final_dir)
    os.unlink(temp)
    line = f'{{"host_id": "{host}", "episode_id": "{episode}", "size": {len(body)}}}\n'
    os.write(_index_fd(), line.encode())
    os.fsync(_index_fd())


async def put(request: Request) -> Response:
    body = await request.body()
    host, episode = request.path_params["host"], request.path_params["episode"]
    await asyncio.to_thread(_store, host, episode, body)
    return JSONResponse({"stored": len(body)}, status_code=201)


app = Starlette(routes=[Route("/episodes/{host}/{episode}", put, methods=["PUT"])])
