"""One log line per episode request, with the commit as sent, the outcome and bytes received."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx

from tests.conftest import StartReceiver
from tests.e2e.test_receiver_protocol import digest_header, put
from tests.support import ReceiverProcess, head_commits, make_tarball


def request_line(receiver: ReceiverProcess, method: str, episode: str) -> str:
    pattern = re.compile(rf"\b{method} host=lab-07 episode={re.escape(episode)} .*")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = pattern.findall(receiver.log())
        if found:
            assert len(found) == 1, found
            return str(found[0])
        time.sleep(0.05)
    raise AssertionError(f"no log line for {method} {episode}:\n{receiver.log()}")


def test_each_outcome_is_logged_with_commit_outcome_and_bytes(
    repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, storage={"max_upload_bytes": 100_000})
    head = head_commits(repo, 1)[0]
    stored = make_tarball(head)
    assert put(receiver.url, "/episodes/lab-07/ep-1", stored, head).status_code == 201
    other = make_tarball(head)
    assert put(receiver.url, "/episodes/lab-07/ep-1", other, head).status_code == 409
    wrong = {"Content-Digest": digest_header(b"something else")}
    assert put(receiver.url, "/episodes/lab-07/ep-2", other, head, **wrong).status_code == 400
    assert httpx.head(f"{receiver.url}/episodes/lab-07/ep-3", headers={"X-Code-Commit": head})
    big = put(receiver.url, "/episodes/lab-07/ep-4", b"x" * 200_000, head.upper())
    assert big.status_code == 413

    line = request_line(receiver, "PUT", "ep-2")
    assert "status=400 outcome=digest-mismatch" in line
    assert f"bytes={len(other)} " in line and line.endswith(f"commit={head}")
    conflict = [x for x in receiver.log().splitlines() if "episode=ep-1 status=409" in x]
    assert len(conflict) == 1 and "outcome=conflict" in conflict[0]
    assert f"bytes={len(other)} " in conflict[0]
    absent = request_line(receiver, "HEAD", "ep-3")
    assert "status=404 outcome=absent bytes=0 " in absent and absent.endswith(f"commit={head}")
    too_large = request_line(receiver, "PUT", "ep-4")
    assert "status=413 outcome=too-large" in too_large
    assert too_large.endswith(f"commit={head.upper()}")  # as sent
