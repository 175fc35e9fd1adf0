"""The s3 backend when things go wrong: SIGKILL mid-upload, racing uploads of one id from
two receivers, the store stopped mid-upload, and memory under 8 concurrent big uploads."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver import failpoints
from tests.conftest import StartReceiver
from tests.seaweed import SeaweedServer
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
from tests.support import ReceiverProcess, head_commits, make_tarball

PART = 5 * MiB


@pytest.mark.parametrize(
    ("point", "stored"),
    [(failpoints.AFTER_TEMP_WRITE, False), (failpoints.AFTER_INSTALL, True)],
)
def test_sigkill_mid_upload_leaves_nothing_partial_and_restart_repairs(
    point: str,
    stored: bool,
    tmp_path: Path,
    repo: Path,
    start_receiver: StartReceiver,
    seaweedfs: SeaweedServer,
    s3_storage: dict[str, Any],
) -> None:
    storage = {**s3_storage, "part_size_bytes": PART}
    env = {failpoints.ENV: point}
    dying = start_receiver(repo, env=env, storage=storage)
    bucket, data, head = s3_storage["bucket"], tmp_path / "data", head_commits(repo, 1)[0]
    body = make_tarball(head, {"data/x.bin": os.urandom(12 * MiB)})
    with pytest.raises(httpx.HTTPError):
        put(dying.url, "/episodes/h/e", body, head, **{"Content-Digest": digest_header(body)})
    assert dying.proc is not None and dying.proc.wait(10) == -9
    final = "episodes/h/e.tar.zst"
    assert set(objects(seaweedfs, bucket)) <= {final, "episodes/.commit/h/e"}
    assert index_rows(data) == []
    restarted = start_receiver(repo, storage=storage)  # same data_dir: its journal
    assert unfinished_uploads(seaweedfs, bucket) == []
    if stored:  # complete, row missing: recovery wrote it from the object's metadata
        assert [row["episode_id"] for row in index_rows(data)] == ["e"]
        assert list(objects(seaweedfs, bucket)) == [final]
        assert put(restarted.url, "/episodes/h/e", body, head).status_code == 200
    else:
        assert_nothing_left(seaweedfs, bucket, data)
        assert put(restarted.url, "/episodes/h/e", body, head).status_code == 201
    assert read_object(seaweedfs, bucket, final) == body


def test_16_concurrent_uploads_of_one_id_from_two_receivers_make_one_object(
    tmp_path: Path,
    repo: Path,
    start_receiver: StartReceiver,
    seaweedfs: SeaweedServer,
    s3_storage: dict[str, Any],
) -> None:
    storage = {**s3_storage, "part_size_bytes": PART}
    # Two receivers with their own catalogues (no shared claims): only the store arbitrates.
    first = start_receiver(repo, storage=storage)
    second = start_receiver(repo, storage={**storage, "data_dir": str(tmp_path / "data-2")})
    head = head_commits(repo, 1)[0]
    bodies = [make_tarball(head, {"data/x.bin": os.urandom(6 * MiB)}) for _ in range(16)]
    barrier = threading.Barrier(16)
    answers: list[httpx.Response | None] = [None] * 16

    def upload(number: int) -> None:
        receiver = (first, second)[number % 2]
        body = bodies[number]
        barrier.wait()
        headers = {"Content-Digest": digest_header(body)} if number % 4 < 2 else {}
        answers[number] = put(receiver.url, "/episodes/h/race", body, head, **headers)

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = [answer.status_code for answer in answers if answer is not None]
    assert codes.count(201) == 1 and set(codes) <= {201, 409, 423, 503}, codes
    winner = bodies[codes.index(201)]
    bucket = s3_storage["bucket"]
    assert list(objects(seaweedfs, bucket)) == ["episodes/h/race.tar.zst"]
    assert read_object(seaweedfs, bucket, "episodes/h/race.tar.zst") == winner
    assert unfinished_uploads(seaweedfs, bucket) == []
    # One row per catalogue at most, each naming the stored content (a loser's receiver
    # indexes the object it found, as for any stored blob without a row).
    expected = [hashlib.sha256(winner).hexdigest()]
    for data_dir in (tmp_path / "data", tmp_path / "data-2"):
        assert [row["sha256"] for row in index_rows(data_dir)] in ([], expected)
    winning_dir = tmp_path / ("data", "data-2")[codes.index(201) % 2]
    assert [row["sha256"] for row in index_rows(winning_dir)] == expected


def test_store_stopped_mid_upload_answers_503_and_leaves_nothing(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    server = SeaweedServer(tmp_path / "own-seaweedfs").start()  # this test stops it
    try:
        storage = server.storage_section("stopped", tmp_path / "creds.toml", part_size_bytes=PART)
        receiver = start_receiver(repo, storage=storage)
        head = head_commits(repo, 1)[0]
        body = make_tarball(head, {"data/x.bin": os.urandom(16 * MiB)})
        sent = threading.Event()

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), MiB):
                if start == 8 * MiB:
                    sent.set()
                    time.sleep(1.5)  # meanwhile the store goes away
                yield body[start : start + MiB]

        def kill_when_half_sent() -> None:
            sent.wait(30)
            server.kill()

        killer = threading.Thread(target=kill_when_half_sent)
        killer.start()
        response = put(receiver.url, "/episodes/h/e", chunks(), head)
        killer.join()
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) > 0
        server.start()  # the same ports and data
        receiver.stop()
        ReceiverProcess(receiver.config_path).start().stop()  # start-up cleans up
        assert_nothing_left(server, "stopped", tmp_path / "data")
    finally:
        server.stop()


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_8_concurrent_256_mib_uploads_stay_within_the_memory_bound(
    tmp_path: Path,
    start_receiver: StartReceiver,
    seaweedfs: SeaweedServer,
    s3_storage: dict[str, Any],
) -> None:
    part = 16 * MiB
    storage = {**s3_storage, "validate": "none", "part_size_bytes": part}
    receiver = start_receiver(None, storage=storage)
    block = os.urandom(4 * MiB)
    size = 256 * MiB

    def body() -> Iterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    digest = hashlib.sha256(block * (size // len(block))).hexdigest()
    answers: list[int] = []

    def upload(number: int) -> None:
        headers = {"Content-Length": str(size), "Content-Digest": f"sha-256=:{_b64(digest)}:"}
        answer = put(receiver.url, f"/episodes/h{number}/big", body(), None, **headers)
        answers.append(answer.status_code)

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [201] * 8
    assert receiver.proc is not None
    bound = 64 * MiB + 8 * 2 * part
    assert peak_rss_bytes(receiver.proc.pid) <= bound
    assert len(objects(seaweedfs, s3_storage["bucket"])) == 8


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()
