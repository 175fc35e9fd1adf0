"""Start-up cleanup of abandoned multipart uploads, and the operator tools over a bucket."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import StartReceiver
from tests.seaweed import SeaweedServer
from tests.storage.s3_support import index_rows, put, unfinished_uploads
from tests.support import PROJECT_ROOT, head_commits, make_tarball, receiver_config, write_toml


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=PROJECT_ROOT, check=False
    )


def test_start_aborts_uploads_older_than_abandon_after_and_keeps_younger_ones(
    tmp_path: Path,
    repo: Path,
    start_receiver: StartReceiver,
    seaweedfs: SeaweedServer,
    s3_storage: dict[str, Any],
) -> None:
    client, bucket = seaweedfs.client(), s3_storage["bucket"]
    client.create_multipart_upload(Bucket=bucket, Key="episodes/other/e.tar.zst")
    client.create_multipart_upload(Bucket=bucket, Key="elsewhere/x")  # not under the prefix
    start_receiver(repo, storage={**s3_storage, "abandon_after_seconds": 3600}).stop()
    assert sorted(unfinished_uploads(seaweedfs, bucket)) == [
        "elsewhere/x",
        "episodes/other/e.tar.zst",
    ]
    start_receiver(repo, storage={**s3_storage, "abandon_after_seconds": 0.001}).stop()
    assert unfinished_uploads(seaweedfs, bucket) == ["elsewhere/x"]


def test_backfill_and_verify_with_config_work_on_the_bucket(
    tmp_path: Path,
    repo: Path,
    start_receiver: StartReceiver,
    seaweedfs: SeaweedServer,
    s3_storage: dict[str, Any],
) -> None:
    receiver = start_receiver(repo, storage=s3_storage)
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    assert put(receiver.url, "/episodes/h/indexed", body, head).status_code == 201
    receiver.stop()
    # An object no receiver indexed (as after a lost row), and one that is no episode.
    client, bucket = seaweedfs.client(), s3_storage["bucket"]
    sha = hashlib.sha256(body).hexdigest()
    client.put_object(
        Bucket=bucket, Key="episodes/h/lost.tar.zst", Body=body, Metadata={"sha256": sha}
    )
    client.put_object(Bucket=bucket, Key="episodes/h/notes.txt", Body=b"x")
    config = write_toml(
        tmp_path / "tools.toml", receiver_config(tmp_path, repo, storage=s3_storage)
    )
    found = tool("tools.verify", "--config", str(config), "--json")
    assert found.returncode == 1 and "lost" in found.stdout and "notes.txt" in found.stdout, found
    backfill = tool("tools.index_backfill", "--config", str(config))
    assert backfill.returncode == 0, backfill.stdout + backfill.stderr
    assert sorted(row["episode_id"] for row in index_rows(tmp_path / "data")) == ["indexed", "lost"]
    again = tool("tools.verify", "--config", str(config), "--json")
    assert "lost" not in again.stdout and "notes.txt" in again.stdout, again
