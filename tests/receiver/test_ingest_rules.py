"""The ingest rules against the in-memory storage double: no disk, no server, every promise."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import pytest

from receiver.config import FilesystemStorageConfig, GateConfig, ReceiverConfig
from receiver.errors import (
    CommitMismatch,
    Conflict,
    DigestMismatch,
    InvalidTarball,
    TooLarge,
    UploadInFlight,
)
from receiver.gate import VersionGate
from receiver.ingest import Ingestor, Reply, Upload
from receiver.limits import UploadAdmission
from receiver.receiving import SMALL_BODY_BYTES
from receiver.storage import DataDirLayout, IndexRow, Storage, new_row
from receiver.storage.memory import MemoryBlobStore, MemoryCatalogue
from tests.e2e.test_receiver_protocol import digest_header
from tests.support import make_tarball

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
BIG = {"data/big.bin": os.urandom(SMALL_BODY_BYTES + 4096)}  # takes the streamed path


def never_fatal(message: str) -> NoReturn:
    raise AssertionError(f"durability failure in a memory store: {message}")


def make_ingestor() -> tuple[Ingestor, MemoryBlobStore, MemoryCatalogue]:
    unused = Path("/nonexistent/never-touched")
    config = ReceiverConfig(
        storage=FilesystemStorageConfig(data_dir=unused, min_free_bytes=0),
        version_gate=GateConfig(enabled=False),  # emergency collect mode: no git needed
    )
    blobs, catalogue = MemoryBlobStore(), MemoryCatalogue()
    storage = Storage(blobs, catalogue, DataDirLayout(unused))
    admission = UploadAdmission(8, 8, 0)
    gate = VersionGate(config.version_gate)
    return Ingestor(config, gate, storage, admission, never_fatal), blobs, catalogue


async def pieces(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def put(ingestor: Ingestor, data: bytes, commit: str | None = COMMIT, **headers: str) -> Reply:
    upload = Upload(
        "lab-07",
        "ep-1",
        commit,
        content_length=len(data),
        content_digest=headers.get("digest"),
        body=pieces(data),
    )
    return asyncio.run(ingestor.put(upload))


@pytest.mark.parametrize("files", [None, BIG], ids=["small", "streamed"])
def test_stored_once_then_a_retry_is_already_present(files: dict[str, bytes] | None) -> None:
    ingestor, blobs, catalogue = make_ingestor()
    body = make_tarball(COMMIT, files)
    first = put(ingestor, body)
    assert first.status_code == 201 and first.body["commit"] == COMMIT
    assert put(ingestor, body).body["status"] == "already-present"
    assert blobs.blobs == {("lab-07", "ep-1"): body}
    assert catalogue.count() == 1


@pytest.mark.parametrize("files", [None, BIG], ids=["small", "streamed"])
def test_different_content_is_a_conflict_and_overwrites_nothing(
    files: dict[str, bytes] | None,
) -> None:
    ingestor, blobs, catalogue = make_ingestor()
    body = make_tarball(COMMIT, files)
    put(ingestor, body)
    conflict = put(ingestor, make_tarball(COMMIT, {**(files or {}), "data/other.bin": b"x"}))
    assert conflict.status_code == 409 and conflict.body["error"] == "conflict"
    assert blobs.blobs[("lab-07", "ep-1")] == body and catalogue.count() == 1


@pytest.mark.parametrize("files", [None, BIG], ids=["small", "streamed"])
def test_a_row_with_other_content_indexed_meanwhile_is_a_conflict_not_a_201(
    files: dict[str, bytes] | None,
) -> None:
    """Another writer (sharing the catalogue, not the blob store) indexes the id between
    this upload's lookup and its append: the answer is 409 naming the row that won."""
    ingestor, _, catalogue = make_ingestor()
    theirs = new_row("lab-07", "ep-1", "ab" * 32, 123, COMMIT)
    ours_first = catalogue.append_if_absent

    def append_after_theirs(row: IndexRow) -> tuple[IndexRow, bool]:
        ours_first(theirs)
        return ours_first(row)

    catalogue.append_if_absent = append_after_theirs  # type: ignore[method-assign]
    with pytest.raises(Conflict, match="indexed with different content") as raised:
        put(ingestor, make_tarball(COMMIT, files))
    assert raised.value.fields == {"stored_sha256": theirs.sha256}
    assert catalogue.lookup("lab-07", "ep-1") == theirs and catalogue.count() == 1


@pytest.mark.parametrize("files", [None, BIG], ids=["small", "streamed"])
def test_rejected_bodies_leave_no_blob_and_no_row(files: dict[str, bytes] | None) -> None:
    ingestor, blobs, catalogue = make_ingestor()
    body = make_tarball(COMMIT, files)
    with pytest.raises(DigestMismatch):
        put(ingestor, body, digest=digest_header(b"something else"))
    with pytest.raises(CommitMismatch):
        put(ingestor, make_tarball(OTHER, files))
    with pytest.raises(InvalidTarball):
        put(ingestor, body[: len(body) // 2])
    assert blobs.blobs == {} and catalogue.count() == 0


def test_size_is_refused_on_content_length_before_the_body_is_read() -> None:
    ingestor, blobs, _ = make_ingestor()
    ingestor.config = ReceiverConfig(
        storage=FilesystemStorageConfig(data_dir=Path("/nonexistent"), max_upload_bytes=10),
        version_gate=GateConfig(enabled=False),
    )

    async def unreadable() -> AsyncIterator[bytes]:
        raise AssertionError("the body was read")
        yield b""  # pragma: no cover

    upload = Upload("lab-07", "ep-1", COMMIT, content_length=11, body=unreadable())
    with pytest.raises(TooLarge):
        asyncio.run(ingestor.put(upload))
    assert blobs.blobs == {}


def test_an_id_claimed_elsewhere_is_refused_as_in_flight() -> None:
    ingestor, blobs, catalogue = make_ingestor()
    assert catalogue.claim("lab-07", "ep-1")  # another receiver's upload of this id
    with pytest.raises(UploadInFlight):
        put(ingestor, make_tarball(COMMIT))
    catalogue.release("lab-07", "ep-1")
    assert put(ingestor, make_tarball(COMMIT)).status_code == 201
    assert catalogue.claims == set()  # released again after the upload


def test_a_stored_blob_without_a_row_gets_its_row_on_access() -> None:
    ingestor, blobs, catalogue = make_ingestor()
    body = make_tarball(COMMIT)
    blobs.blobs[("lab-07", "ep-1")] = body  # a crash between the blob and its row
    head = asyncio.run(ingestor.head("lab-07", "ep-1", None))
    assert head.status_code == 200
    row = catalogue.lookup("lab-07", "ep-1")
    assert row is not None and row.backfilled and row.commit == COMMIT
    assert put(ingestor, body).body["status"] == "already-present"
    assert catalogue.count() == 1


def test_an_indexed_episode_whose_blob_is_gone_is_restored_from_the_same_content() -> None:
    ingestor, blobs, catalogue = make_ingestor()
    body = make_tarball(COMMIT)
    put(ingestor, body)
    row = catalogue.lookup("lab-07", "ep-1")
    del blobs.blobs[("lab-07", "ep-1")]
    assert asyncio.run(ingestor.head("lab-07", "ep-1", COMMIT)).status_code == 404
    with pytest.raises(Conflict, match="indexed with different content"):
        put(ingestor, make_tarball(COMMIT))
    assert blobs.blobs == {}
    restored = put(ingestor, body)
    assert restored.status_code == 201 and restored.body["behind_by"] is None
    assert blobs.blobs[("lab-07", "ep-1")] == body
    assert catalogue.lookup("lab-07", "ep-1") == row and catalogue.count() == 1


def test_emergency_collect_mode_stores_an_episode_that_names_no_commit() -> None:
    ingestor, _, catalogue = make_ingestor()
    body = make_tarball(None, {"meta.json": b'{"episode_id": "ep-1"}'})
    assert put(ingestor, body, commit=None).status_code == 201
    row = catalogue.lookup("lab-07", "ep-1")
    assert row is not None and row.commit is None


def test_the_row_records_the_commit_of_meta_json_when_no_header_was_sent() -> None:
    ingestor, _, catalogue = make_ingestor()
    put(ingestor, make_tarball(COMMIT.upper()), commit=None)
    assert catalogue.lookup("lab-07", "ep-1") == catalogue.rows[("lab-07", "ep-1")]
    assert catalogue.rows[("lab-07", "ep-1")].commit == COMMIT


def test_memory_catalogue_is_the_exactly_once_arbiter() -> None:
    catalogue = MemoryCatalogue()
    first = new_row("h", "e", "a" * 64, 1, None)
    second = new_row("h", "e", "b" * 64, 2, None)
    assert catalogue.append_if_absent(first) == (first, True)
    assert catalogue.append_if_absent(second) == (first, False)
