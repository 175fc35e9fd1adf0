"""Every row of the contract's status table, against a real receiver process."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

import httpx

from tests.conftest import StartReceiver
from tests.support import add_commit, git, head_commits, make_tarball, raw_request

HEADER = "X-Code-Commit"


def digest_header(body: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


def index_rows(data_dir: Path) -> list[dict[str, object]]:
    path = data_dir / "index.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def stored_files(data_dir: Path) -> list[str]:
    root = data_dir / "episodes"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def temp_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "tmp").rglob("*") if p.is_file()]


def put(url: str, path: str, body: bytes, commit: str | None, **headers: str) -> httpx.Response:
    sent = dict(headers)
    if commit is not None:
        sent[HEADER] = commit
    return httpx.put(f"{url}{path}", content=body, headers=sent, timeout=30)


def test_201_stores_file_and_row_then_200_for_a_retry(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    body = make_tarball(head.upper())  # meta.json may use any case too
    response = put(receiver.url, "/episodes/lab-07/ep-0001", body, head.upper())
    assert response.status_code == 201, response.text
    sha = hashlib.sha256(body).hexdigest()
    assert response.json() == {
        "status": "stored",
        "host_id": "lab-07",
        "episode_id": "ep-0001",
        "sha256": sha,
        "size_bytes": len(body),
        "commit": head,
        "behind_by": 0,
    }
    data = tmp_path / "data"
    assert (data / "episodes" / "lab-07" / "ep-0001.tar.zst").read_bytes() == body
    rows = index_rows(data)
    assert len(rows) == 1
    assert list(rows[0]) == sorted(rows[0])
    assert rows[0]["commit"] == head and rows[0]["sha256"] == sha
    assert rows[0]["schema_version"] == 1 and rows[0]["size_bytes"] == len(body)

    again = put(receiver.url, "/episodes/lab-07/ep-0001", body, head)
    assert again.status_code == 200
    assert again.json()["status"] == "already-present"
    assert again.json()["sha256"] == sha
    assert len(index_rows(data)) == 1
    assert temp_files(data) == []


def test_409_for_different_content_keeps_the_stored_file(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    first, second = make_tarball(head), make_tarball(head)
    assert put(receiver.url, "/episodes/h/e", first, head).status_code == 201
    for extra in ({}, {"Content-Digest": digest_header(second)}):
        response = put(receiver.url, "/episodes/h/e", second, head, **extra)
        assert response.status_code == 409
        assert response.json()["error"] == "conflict"
        assert response.json()["stored_sha256"] == hashlib.sha256(first).hexdigest()
    assert (tmp_path / "data" / "episodes" / "h" / "e.tar.zst").read_bytes() == first
    assert len(index_rows(tmp_path / "data")) == 1


def test_already_stored_wins_over_a_commit_that_has_left_the_window(
    repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, version_gate={"window": 2})
    old = head_commits(repo, 1)[0]
    body = make_tarball(old)
    assert put(receiver.url, "/episodes/h/e", body, old).status_code == 201
    for _ in range(3):
        add_commit(repo)
    wait_until_refused(receiver.url, old)
    # A retry after a lost response is not stale.
    assert put(receiver.url, "/episodes/h/e", body, old).status_code == 200
    head = httpx.head(f"{receiver.url}/episodes/h/e", headers={HEADER: old})
    assert head.status_code == 200
    assert head.headers["repr-digest"] == digest_header(body)
    assert put(receiver.url, "/episodes/h/other", body, old).status_code == 412


def wait_until_refused(url: str, commit: str, timeout: float = 10.0) -> None:
    """The window moves at the next refresh (refresh_seconds = 1 in these tests)."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/gate/{commit}").status_code != 412:
        assert time.monotonic() < deadline, "the window never moved past the commit"
        time.sleep(0.1)


def test_400_missing_and_malformed_commit_carry_the_remediation(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    remediation = "cd ~/lab && git pull\nepisode-shipper retry --config x.toml\n"
    receiver = start_receiver(repo, version_gate={"remediation": remediation})
    body = make_tarball(head_commits(repo, 1)[0])
    missing = put(receiver.url, "/episodes/h/e", body, None)
    assert missing.status_code == 400
    assert missing.json()["error"] == "missing-commit"
    assert missing.json()["remediation"] == remediation
    for bad in ("abc", "g" * 40, "a" * 41, "a" * 63):
        malformed = put(receiver.url, "/episodes/h/e", body, bad)
        assert malformed.status_code == 400
        assert malformed.json()["error"] == "malformed-commit"
        assert malformed.json()["remediation"] == remediation
    assert stored_files(tmp_path / "data") == []
    assert index_rows(tmp_path / "data") == []


def test_412_stale_and_unknown_commits(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    texts = {"remediation": "git -C /opt/x pull\n", "remediation_unknown": "git -C /opt/x push\n"}
    receiver = start_receiver(repo, version_gate={"window": 2, **texts})
    oldest = head_commits(repo, 3)[-1]  # behind_by 2: just outside a window of 2
    stale = put(receiver.url, "/episodes/h/e", make_tarball(oldest), oldest)
    assert stale.status_code == 412
    body = stale.json()
    assert body["error"] == "stale-commit"
    assert body["your_commit"] == oldest
    assert body["head_commit"] == head_commits(repo, 1)[0]
    assert body["window"] == 2
    assert body["behind_by"] == 2
    assert body["remediation"] == texts["remediation"]

    git(repo, "checkout", "-q", "-b", "side")
    side = add_commit(repo, "unpushed")
    git(repo, "checkout", "-q", "main")
    unknown = put(receiver.url, "/episodes/h/e", make_tarball(side), side)
    assert unknown.status_code == 412
    assert unknown.json()["error"] == "unknown-commit"
    assert unknown.json()["remediation"] == texts["remediation_unknown"]
    gate = httpx.get(f"{receiver.url}/gate/{side}")
    assert (gate.status_code, gate.json()["remediation"]) == (412, texts["remediation_unknown"])
    assert stored_files(tmp_path / "data") == []


def test_new_commit_is_accepted_without_restart(repo: Path, start_receiver: StartReceiver) -> None:
    receiver = start_receiver(repo, version_gate={"refresh_seconds": 3600})
    fresh = add_commit(repo, "pushed a second ago")
    response = put(receiver.url, "/episodes/h/e", make_tarball(fresh), fresh)
    assert response.status_code == 201, response.text
    assert response.json()["behind_by"] == 0


def test_warning_in_the_oldest_fifth_of_the_window(
    repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, version_gate={"window": 3})
    commits = head_commits(repo, 3)
    edge = put(receiver.url, "/episodes/h/e1", make_tarball(commits[2]), commits[2])
    assert edge.status_code == 201
    assert edge.json()["behind_by"] == 2
    assert "warning" in edge.json()
    assert edge.headers["x-commit-behind-by"] == "2"
    fine = put(receiver.url, "/episodes/h/e2", make_tarball(commits[1]), commits[1])
    assert fine.status_code == 201
    assert "warning" not in fine.json()
    assert "x-commit-behind-by" not in fine.headers


def test_400_bad_body_rows(tmp_path: Path, repo: Path, start_receiver: StartReceiver) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    other = head_commits(repo, 2)[1]
    good = make_tarball(head)
    cases = [
        ("digest-mismatch", good, head, {"Content-Digest": digest_header(b"other")}),
        ("invalid-digest", good, head, {"Content-Digest": "sha-256=:nope:"}),
        ("invalid-tarball", b"this is not zstd at all", head, {}),
        ("invalid-tarball", good[: len(good) // 2], head, {}),
        ("invalid-tarball", make_tarball(None), head, {}),
        ("commit-mismatch", make_tarball(other), head, {}),
    ]
    for code, body, commit, headers in cases:
        response = put(receiver.url, "/episodes/h/e", body, commit, **headers)
        assert response.status_code == 400, (code, response.text)
        assert response.json()["error"] == code
        assert response.json()["detail"]
    data = tmp_path / "data"
    assert stored_files(data) == [] and index_rows(data) == [] and temp_files(data) == []
    ok = put(receiver.url, "/episodes/h/e", good, head, **{"Content-Digest": digest_header(good)})
    assert ok.status_code == 201


def sha512_header(body: bytes) -> str:
    return "sha-512=:" + base64.b64encode(hashlib.sha512(body).digest()).decode() + ":"


def test_content_digest_is_a_structured_field_dictionary(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    data = tmp_path / "data"

    def send(path: str, body: bytes, digest: str) -> httpx.Response:
        return put(receiver.url, path, body, head, **{"Content-Digest": digest})

    # Small bodies are hashed in one piece, large ones while streaming: both paths.
    small = make_tarball(head)
    large = make_tarball(head, {"data/big.bin": os.urandom(3 * 1024 * 1024)})
    for name, body in (("small", small), ("large", large)):
        refused = [
            ("invalid-digest", "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=", "ending"),
            ("invalid-digest", "sha-256=:AAAA:", "sha-256 is 3 bytes"),
            ("digest-mismatch", f"{digest_header(body)}, {sha512_header(b'x')}", "says sha-512"),
        ]
        for code, value, detail in refused:
            response = send(f"/episodes/h/{name}", body, value)
            assert response.status_code == 400, response.text
            assert response.json()["error"] == code
            assert detail in response.json()["detail"]
            assert stored_files(data) == [] and index_rows(data) == [] and temp_files(data) == []

    with_params = f"{digest_header(small)};foo=1, md5=:AAAA:"
    response = send("/episodes/h/ep-1", small, with_params)
    assert response.status_code == 201, response.text
    both = f"{digest_header(large)}, {sha512_header(large)};x=?0"
    response = send("/episodes/h/ep-2", large, both)
    assert response.status_code == 201, response.text
    assert stored_files(data) == ["h/ep-1.tar.zst", "h/ep-2.tar.zst"]

    # Already stored, only a sha-512 declared: the body is hashed and that digest checked too.
    retry = send("/episodes/h/ep-1", small, sha512_header(small))
    assert retry.status_code == 200, retry.text
    wrong = send("/episodes/h/ep-1", small, sha512_header(b"x"))
    assert (wrong.status_code, wrong.json()["error"]) == (400, "digest-mismatch")


def test_a_malformed_content_digest_is_judged_in_the_contracts_order(
    repo: Path, start_receiver: StartReceiver
) -> None:
    """Already stored and the window come before the body checks, the digest among them."""
    receiver = start_receiver(repo, version_gate={"window": 2})
    commits = head_commits(repo, 3)
    malformed = {"Content-Digest": "sha-256=:not base64:"}
    stored = make_tarball(commits[0])
    assert put(receiver.url, "/episodes/h/ep-1", stored, commits[0]).status_code == 201
    retry = put(receiver.url, "/episodes/h/ep-1", stored, commits[0], **malformed)
    assert retry.status_code == 200, retry.text  # a retry is answered by content
    stale = put(receiver.url, "/episodes/h/ep-2", make_tarball(commits[2]), commits[2], **malformed)
    assert (stale.status_code, stale.json()["error"]) == (412, "stale-commit")


def test_400_invalid_ids_touch_nothing(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    hostile = [
        "/episodes/h/..",
        "/episodes/../e",
        "/episodes/h/.hidden",
        "/episodes/h/a%2Fb",
        "/episodes/h/a%00b",
        "/episodes/h/" + "x" * 129,
        "/episodes/h/%E2%80%A4%E2%80%A4",  # one-dot leaders, a '..' look-alike
        "/episodes/h/e/extra",
        "/episodes/h%2F..%2F..%2Fetc/passwd",
    ]
    for path in hostile:
        head_bytes = (
            f"PUT {path} HTTP/1.1\r\nHost: x\r\n{HEADER}: {head}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        status, answer = raw_request(receiver.port, head_bytes, body)
        assert status == 400, (path, status, answer)
        assert json.loads(answer)["error"] == "invalid-id"
    data = tmp_path / "data"
    assert stored_files(data) == [] and index_rows(data) == []
    assert not (tmp_path / "passwd").exists() and not (data / "passwd").exists()


def test_413_on_content_length_and_while_streaming(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, storage={"max_upload_bytes": 4096})
    head = head_commits(repo, 1)[0]
    big = make_tarball(head, {"data/x.bin": bytes(range(256)) * 64 + b"y" * 20000})
    big = big + b"\0" * max(0, 5000 - len(big))
    response = put(receiver.url, "/episodes/h/e", big, head)
    assert response.status_code == 413
    assert response.json()["error"] == "too-large"

    def chunks() -> object:
        for _ in range(10):
            yield b"z" * 1000

    streamed = httpx.put(
        f"{receiver.url}/episodes/h/e2",
        content=chunks(),  # type: ignore[arg-type]
        headers={HEADER: head},
        timeout=30,
    )
    assert streamed.status_code == 413
    data = tmp_path / "data"
    assert stored_files(data) == [] and temp_files(data) == []


def test_507_when_free_space_would_fall_below_the_minimum(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, storage={"min_free_bytes": 2**62})
    head = head_commits(repo, 1)[0]
    response = put(receiver.url, "/episodes/h/e", make_tarball(head), head)
    assert response.status_code == 507
    assert response.json()["error"] == "insufficient-storage"
    assert int(response.headers["retry-after"]) > 0
    assert stored_files(tmp_path / "data") == []


def test_503_when_the_gate_never_loaded_and_never_412(
    tmp_path: Path, start_receiver: StartReceiver
) -> None:
    not_a_repo = tmp_path / "empty"
    not_a_repo.mkdir()
    receiver = start_receiver(not_a_repo)
    commit = "a" * 40
    response = put(receiver.url, "/episodes/h/e", make_tarball(commit), commit)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    gate = httpx.get(f"{receiver.url}/gate/{commit}")
    assert gate.status_code == 503
    health = httpx.get(f"{receiver.url}/healthz").json()
    assert health["gate"]["loaded"] is False


def test_gate_off_accepts_any_commit_and_records_it(
    tmp_path: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(None)
    commit = "B" * 64  # a SHA-256 repository's id, upper case
    response = put(receiver.url, "/episodes/h/e", make_tarball(commit), commit)
    assert response.status_code == 201, response.text
    assert response.json()["commit"] == "b" * 64
    assert index_rows(tmp_path / "data")[0]["commit"] == "b" * 64
    mismatch = put(receiver.url, "/episodes/h/e2", make_tarball("c" * 40), "d" * 40)
    assert mismatch.status_code == 400 and mismatch.json()["error"] == "commit-mismatch"


def test_head_and_gate_endpoint(repo: Path, start_receiver: StartReceiver) -> None:
    receiver = start_receiver(repo, version_gate={"window": 2})
    commits = head_commits(repo, 3)
    url = f"{receiver.url}/episodes/h/e"
    assert httpx.head(url).status_code == 404
    assert httpx.head(url, headers={HEADER: commits[0]}).status_code == 404
    stale = httpx.head(url, headers={HEADER: commits[2]})
    assert stale.status_code == 412 and stale.content == b""
    assert httpx.head(url, headers={HEADER: "zz"}).status_code == 400
    gate = httpx.get(f"{receiver.url}/gate/{commits[2]}")
    assert gate.status_code == 412
    assert gate.json()["error"] == "stale-commit" and "remediation" in gate.json()
    accepted = httpx.get(f"{receiver.url}/gate/{commits[1].upper()}")
    assert accepted.status_code == 200
    assert accepted.json()["behind_by"] == 1 and accepted.json()["commit"] == commits[1]
    assert httpx.get(f"{receiver.url}/gate/xyz").status_code == 400


def test_unknown_routes_answer_json(repo: Path, start_receiver: StartReceiver) -> None:
    receiver = start_receiver(repo)
    missing = httpx.get(f"{receiver.url}/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"] == "not-found"
    wrong_method = httpx.delete(f"{receiver.url}/episodes/h/e")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
