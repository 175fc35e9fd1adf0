"""A commit marker left by a dead upload blocks its id only until commit_timeout_seconds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.conftest import StartReceiver
from tests.seaweed import SeaweedServer
from tests.storage.s3_support import objects, put
from tests.support import head_commits, make_tarball


def test_a_dead_uploads_marker_is_taken_over_once_it_is_older_than_the_timeout(
    tmp_path: Path,
    repo: Path,
    start_receiver: StartReceiver,
    seaweedfs: SeaweedServer,
    s3_storage: dict[str, Any],
) -> None:
    receiver = start_receiver(repo, storage={**s3_storage, "commit_timeout_seconds": 2.0})
    bucket, head = s3_storage["bucket"], head_commits(repo, 1)[0]
    marker = "episodes/.commit/lab-07/ep-1"  # what an upload killed mid-commit leaves
    seaweedfs.client().put_object(Bucket=bucket, Key=marker, Body=b"a dead upload's token")
    body = make_tarball(head)
    young = put(receiver.url, "/episodes/lab-07/ep-1", body, head)
    assert young.status_code == 503 and int(young.headers["retry-after"]) > 0
    assert "episodes/lab-07/ep-1.tar.zst" not in objects(seaweedfs, bucket)
    time.sleep(2.5)
    stale = put(receiver.url, "/episodes/lab-07/ep-1", body, head)
    assert stale.status_code == 201, stale.text
    assert sorted(objects(seaweedfs, bucket)) == ["episodes/lab-07/ep-1.tar.zst"]
    assert "took over the commit marker of a dead upload" in receiver.log()
