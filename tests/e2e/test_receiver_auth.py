"""Per-host tokens and the read endpoints, against a real receiver process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartReceiver
from tests.e2e.test_receiver_protocol import HEADER, index_rows, stored_files, temp_files
from tests.support import PROJECT_ROOT, head_commits, make_tarball, raw_request


def add_host(config: Path, host: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "add-host", host, "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
    )
    return result.stdout.strip()


def test_tokens_gate_uploads_per_host_before_the_body_is_read(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    tokens_file = tmp_path / "tokens.toml"
    receiver = start_receiver(repo, auth={"mode": "tokens", "tokens_file": str(tokens_file)})
    token_a = add_host(receiver.config_path, "lab-a")
    token_b = add_host(receiver.config_path, "lab-b")
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)

    def put(host: str, token: str | None) -> httpx.Response:
        headers = {HEADER: head}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.put(f"{receiver.url}/episodes/{host}/e", content=body, headers=headers)

    time.sleep(1.1)  # the receiver looks at the tokens file at most once a second
    assert put("lab-a", None).status_code == 401
    assert put("lab-a", "not-a-token").status_code == 401
    forbidden = put("lab-a", token_b)
    assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"
    data = tmp_path / "data"
    assert stored_files(data) == [] and index_rows(data) == [] and temp_files(data) == []
    # Refused before the body: a 1 GiB Content-Length with no body is answered at once.
    status, _ = raw_request(
        receiver.port,
        f"PUT /episodes/lab-a/e HTTP/1.1\r\nHost: x\r\n{HEADER}: {head}\r\n"
        f"Content-Length: {2**30}\r\n\r\n".encode(),
    )
    assert status == 401
    assert put("lab-a", token_a).status_code == 201
    head_response = httpx.head(f"{receiver.url}/episodes/lab-a/e")
    assert head_response.status_code == 401

    # Revocation takes effect without a restart.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "receiver",
            "remove-host",
            "lab-b",
            "--config",
            str(receiver.config_path),
        ],
        check=True,
        capture_output=True,
        cwd=PROJECT_ROOT,
    )
    time.sleep(1.1)
    assert put("lab-b", token_b).status_code == 401
    log = receiver.log()
    assert token_a not in log and token_b not in log


def test_metrics_and_healthz_report_uploads_and_the_gate(
    repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, version_gate={"window": 2})
    commits = head_commits(repo, 3)
    ok = httpx.put(
        f"{receiver.url}/episodes/h/e",
        content=make_tarball(commits[0]),
        headers={HEADER: commits[0]},
    )
    assert ok.status_code == 201
    stale = httpx.put(
        f"{receiver.url}/episodes/h/e2",
        content=make_tarball(commits[2]),
        headers={HEADER: commits[2]},
    )
    assert stale.status_code == 412
    text = httpx.get(f"{receiver.url}/metrics").text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("episode_ingest_uploads_total", (("outcome", "stored"),))] == 1
    assert samples[("episode_ingest_index_rows", ())] == 1
    assert any(
        name == "episode_ingest_rejections_total" and dict(labels).get("reason") == "stale-commit"
        for name, labels in samples
    )
    health = httpx.get(f"{receiver.url}/healthz").json()
    assert health["gate"]["head_commit"] == commits[0]
    assert health["index_rows"] == 1


def test_protected_read_endpoints_need_a_token(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    tokens_file = tmp_path / "tokens.toml"
    receiver = start_receiver(
        repo,
        wait=False,
        auth={"mode": "tokens", "tokens_file": str(tokens_file), "protect_read_endpoints": True},
    )
    token = add_host(receiver.config_path, "lab-a")
    deadline = time.monotonic() + 20
    auth = {"Authorization": f"Bearer {token}"}
    while True:
        try:
            if httpx.get(f"{receiver.url}/healthz", headers=auth).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for path in ("/", "/metrics", "/healthz"):
        assert httpx.get(f"{receiver.url}{path}").status_code == 401
        assert httpx.get(f"{receiver.url}{path}", headers=auth).status_code == 200
