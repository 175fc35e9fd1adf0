"""Debian's nginx, run with the shipped etc/nginx/episode-ingest.conf pointed at loopback.

Only the addresses change: the listen line and the upstream's server lines. nginx runs in
the foreground in its own session, with its files under a prefix, and is stopped by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.orphan_guard import OrphanGuard
from tests.support import PROJECT_ROOT, free_port

SHIPPED = PROJECT_ROOT / "etc" / "nginx" / "episode-ingest.conf"

MAIN = """\
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/episode-ingest.conf;
}}
"""


def render(upstreams: list[int], port: int) -> str:
    """The shipped config with loopback addresses (and nothing else) changed."""
    text = SHIPPED.read_text()
    servers = "".join(
        f"    server 127.0.0.1:{up} max_fails=1 fail_timeout=10s;\n" for up in upstreams
    )
    text, count = re.subn(r"(?m)^    server 10\.0\.0\.\d+:8080 [^\n]*\n", "", text)
    assert count == 2, "the shipped config's upstream lines changed: update this test helper"
    text = text.replace("    keepalive 32;", servers + "    keepalive 32;")
    text, count = re.subn(r"(?m)^    listen 80;", f"    listen 127.0.0.1:{port};", text)
    assert count == 1
    return text


@dataclass
class Nginx:
    prefix: Path
    port: int
    proc: subprocess.Popen[bytes]
    guard: OrphanGuard | None = None  # stops it if the test run dies

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
            self.guard = None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_nginx(prefix: Path, upstreams: list[int]) -> Nginx:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed: run scripts/setup-system.sh")
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (prefix / "episode-ingest.conf").write_text(render(upstreams, port))
    user = "user root root;" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(MAIN.format(prefix=prefix, user=user))
    proc = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=(prefix / "stderr.log").open("wb"),
        start_new_session=True,
    )
    nginx = Nginx(prefix, port, proc, OrphanGuard(group=proc.pid))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            nginx.stop()
            raise RuntimeError((prefix / "stderr.log").read_text())
        try:
            httpx.get(nginx.url + "/healthz", timeout=1)
            return nginx
        except httpx.HTTPError:
            time.sleep(0.05)
    nginx.stop()
    raise RuntimeError("nginx did not start")
