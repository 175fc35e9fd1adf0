"""The PUT/HEAD contract rows with [storage] type = "s3", against a real receiver process
and a real S3 server (SeaweedFS): what is stored, and that a rejection leaves nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import StartReceiver
from tests.seaweed import SeaweedServer, write_credentials
from tests.storage.s3_support import (
    MiB,
    assert_nothing_left,
    digest_header,
    index_rows,
    objects,
    put,
    read_object,
    unfinished_uploads,
)
from tests.support import PROJECT_ROOT, head_commits, make_tarball, receiver_config, write_toml

PART = 5 * MiB


def test_201_single_put_and_multipart_with_sha256_metadata_then_200_and_head(
    tmp_path: Path,
    repo: Path,
    start_receiver: StartReceiver,
    seaweedfs: SeaweedServer,
    s3_storage: dict[str, Any],
) -> None:
    receiver = start_receiver(repo, storage={**s3_storage, "part_size_bytes": PART})
    bucket, head = s3_storage["bucket"], head_commits(repo, 1)[0]
    bodies = {
        "small": make_tarball(head),
        "big": make_tarball(head, {"data/x.bin": os.urandom(12 * MiB)}),  # three parts
    }
    for name, body in bodies.items():
        for declared in (True, False):  # without a declared digest: staged, then copied
            path = f"/episodes/lab-1/{name}-{declared}"
            headers = {"Content-Digest": digest_header(body)} if declared else {}
            response = put(receiver.url, path, body, head, **headers)
            assert response.status_code == 201, response.text
            assert put(receiver.url, path, body, head).json()["status"] == "already-present"
            answer = httpx.head(f"{receiver.url}{path}")
            assert answer.status_code == 200
            assert answer.headers["repr-digest"] == digest_header(body)
            assert answer.headers["x-episode-size"] == str(len(body))
    stored = objects(seaweedfs, bucket)
    expected = {f"episodes/lab-1/{n}-{d}.tar.zst" for n in bodies for d in (True, False)}
    assert set(stored) == expected  # no marker, no staging object left
    for key, object_head in stored.items():
        body = bodies[key.split("/")[-1].split("-")[0]]
        assert read_object(seaweedfs, bucket, key) == body
        assert object_head["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert unfinished_uploads(seaweedfs, bucket) == []
    assert len(index_rows(tmp_path / "data")) == 4
    assert httpx.head(f"{receiver.url}/episodes/lab-1/absent").status_code == 404


def test_409_400_412_413_leave_nothing_in_the_bucket(
    tmp_path: Path,
    repo: Path,
    start_receiver: StartReceiver,
    seaweedfs: SeaweedServer,
    s3_storage: dict[str, Any],
) -> None:
    storage = {**s3_storage, "part_size_bytes": PART, "max_upload_bytes": 20 * MiB}
    receiver = start_receiver(repo, storage=storage, version_gate={"window": 2})
    bucket, data = s3_storage["bucket"], tmp_path / "data"
    head, _, stale = head_commits(repo, 3)
    big = make_tarball(head, {"data/x.bin": os.urandom(12 * MiB)})
    # 400: a digest that does not match, after every part was sent (multipart aborted).
    wrong = put(receiver.url, "/episodes/h/e", big, head, **{"Content-Digest": digest_header(b"x")})
    assert wrong.status_code == 400 and wrong.json()["error"] == "digest-mismatch"
    bad = put(receiver.url, "/episodes/h/e", os.urandom(11 * MiB), head)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid-tarball"
    other = make_tarball(stale)
    assert put(receiver.url, "/episodes/h/e", other, stale).status_code == 412
    huge = make_tarball(head, {"data/x.bin": os.urandom(21 * MiB)})
    assert put(receiver.url, "/episodes/h/e", huge, head).status_code == 413  # Content-Length

    def chunks() -> Any:  # no Content-Length: refused once past the cap, parts already sent
        for start in range(0, len(huge), MiB):
            yield huge[start : start + MiB]

    streamed = put(receiver.url, "/episodes/h/e", chunks(), head)
    assert streamed.status_code == 413
    assert_nothing_left(seaweedfs, bucket, data)
    # 409: the id is stored with other content; nothing is overwritten.
    assert put(receiver.url, "/episodes/h/e", big, head).status_code == 201
    conflict = put(receiver.url, "/episodes/h/e", make_tarball(head), head)
    assert conflict.status_code == 409
    assert read_object(seaweedfs, bucket, "episodes/h/e.tar.zst") == big
    assert list(objects(seaweedfs, bucket)) == ["episodes/h/e.tar.zst"]
    assert unfinished_uploads(seaweedfs, bucket) == [] and len(index_rows(data)) == 1


def check_config(tmp_path: Path, storage: dict[str, Any], repo: Path) -> tuple[int, str]:
    config = receiver_config(tmp_path, repo, storage=storage)
    path = write_toml(tmp_path / "check.toml", config)
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).strip()


def test_bad_credentials_missing_bucket_and_loose_file_mode_stop_with_one_line(
    tmp_path: Path, repo: Path, s3_storage: dict[str, Any], start_receiver: StartReceiver
) -> None:
    assert check_config(tmp_path, s3_storage, repo)[0] == 0
    code, line = check_config(tmp_path, {**s3_storage, "bucket": "no-such-bucket-here"}, repo)
    assert code == 2 and "storage.bucket" in line and len(line.splitlines()) == 1, line
    wrong = write_credentials(tmp_path / "wrong.toml", secret="not-the-secret")
    code, line = check_config(tmp_path, {**s3_storage, "credentials_file": str(wrong)}, repo)
    assert code == 2 and "storage.credentials_file" in line and len(line.splitlines()) == 1, line
    Path(s3_storage["credentials_file"]).chmod(0o640)
    code, line = check_config(tmp_path, s3_storage, repo)
    assert code == 2 and "group- or world-readable" in line, line
    receiver = start_receiver(repo, wait=False, storage=s3_storage)
    assert receiver.proc is not None and receiver.proc.wait(20) == 2
    assert "storage.credentials_file" in receiver.log()
