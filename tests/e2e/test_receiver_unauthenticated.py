"""Requests without a valid token create no per-host state: labels, page rows, memory."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from tests.conftest import StartReceiver
from tests.e2e.test_receiver_auth import add_host
from tests.support import ReceiverProcess, read_http_response


def claim_hosts(receiver: ReceiverProcess, first: int, count: int) -> None:
    """PUT with no token under `count` distinct host names, pipelined on one connection."""
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as sock:
        buffer = bytearray()
        for start in range(first, first + count, 500):
            batch = range(start, min(start + 500, first + count))
            sock.sendall(
                b"".join(
                    b"PUT /episodes/claimed-%d/e HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                    % number
                    for number in batch
                )
            )
            for _ in batch:
                assert read_http_response(sock, buffer)[0] == 401


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_ten_thousand_claimed_hosts_leave_metrics_and_memory_flat(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(
        repo, auth={"mode": "tokens", "tokens_file": str(tmp_path / "tokens.toml")}
    )
    add_host(receiver.config_path, "lab-a")
    time.sleep(1.1)  # the receiver looks at the tokens file at most once a second
    assert receiver.proc is not None
    claim_hosts(receiver, 0, 1000)  # warm-up: first-use allocations
    metrics_before = httpx.get(f"{receiver.url}/metrics").text
    rss_before = rss_bytes(receiver.proc.pid)
    claim_hosts(receiver, 1000, 10_000)
    metrics_after = httpx.get(f"{receiver.url}/metrics").text
    rss_after = rss_bytes(receiver.proc.pid)
    assert (
        'episode_ingest_rejections_total{host="(unauthenticated)",reason="unauthorized"} 11000.0'
        in (metrics_after)
    )
    assert "claimed-" not in metrics_after
    assert abs(len(metrics_after) - len(metrics_before)) < 100  # only counter digits grow
    assert rss_after - rss_before < 8 * 1024 * 1024
    page = httpx.get(f"{receiver.url}/").text
    assert "claimed-" not in page
    assert "(unauthenticated)" in page
