"""Debian's nginx as a WebDAV PUT server on loopback, with its own config and prefix.

nginx spools the body to client_body_temp_path and renames it into place; it never
fsyncs, so the bench fsyncs the file and its directory after the 201 and counts that.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from types import TracebackType

from bench.baselines import Unavailable, fsync_path, need
from bench.client import HttpError, get, put_file
from episode_common.durable import fsync_dir
from tests.support import free_port

CONFIG = """\
worker_processes auto;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 0;
    client_body_buffer_size 1m;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
        }}
    }}
}}
"""


class WebDav:
    """`with WebDav(prefix) as dav: dav.put(name, path)`; raises Unavailable if nginx won't run."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WebDav:
        nginx = need("nginx")
        self.prefix.mkdir(parents=True, exist_ok=True)
        (self.prefix / "www").mkdir(exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        config = self.prefix / "nginx.conf"
        config.write_text(CONFIG.format(prefix=self.prefix, port=self.port, user=user))
        command = [nginx, "-p", str(self.prefix), "-c", str(config), "-e", "stderr"]
        log = self.prefix / "stderr.log"
        with log.open("wb") as stderr:
            self._proc = subprocess.Popen(
                [*command, "-g", "daemon off;"], stderr=stderr, stdout=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                error = log.read_text(errors="replace")
                raise Unavailable(f"nginx exited {self._proc.returncode}: {error.strip()[-200:]}")
            try:
                get(self.port, "/")
                return self
            except (OSError, HttpError):
                time.sleep(0.02)
        self.__exit__(None, None, None)
        raise Unavailable("nginx did not answer on loopback within 10 s")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def put(self, name: str, path: Path) -> float:
        """PUT the file, then fsync it and its directory; MB/s."""
        started = time.perf_counter()
        status, body = put_file(self.port, f"/{name}", path, {})
        if status not in (201, 204):
            raise HttpError(f"nginx PUT answered {status}: {body[:200]!r}")
        stored = self.prefix / "www" / name
        fsync_path(stored)
        fsync_dir(stored.parent)
        elapsed = time.perf_counter() - started
        stored.unlink()
        return path.stat().st_size / elapsed / 1e6
