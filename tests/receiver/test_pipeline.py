"""receiver.pipeline: BodySink writes and hashes every byte in order and enforces the size cap."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from receiver.digests import BodyDigest, DeclaredDigest
from receiver.errors import TooLarge
from receiver.pipeline import BATCH_BYTES, BodySink
from receiver.storage.filesystem import FilesystemStore, FilesystemWriter

ODD_SIZES = [1, 7, 4093, 65537, 13, 1_000_003, 257, 0, 31, 524_289]


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks: list[bytes] = []
    position, turn = 0, 0
    while position < len(data):
        size = sizes[turn % len(sizes)]
        chunks.append(data[position : position + size])
        position += size
        turn += 1
    return chunks


def sample(size: int) -> bytes:
    return hashlib.shake_256(b"episode-ingest").digest(size)


async def drain(sink: BodySink, chunks: list[bytes]) -> str:
    for chunk in chunks:
        await sink.write(chunk)
    sha, summary = await sink.finish()
    assert summary is None
    return sha


def temp_writer(tmp_path: Path) -> FilesystemWriter:
    """A real blob writer: the filesystem store's temp file under tmp_path/data/tmp."""
    (tmp_path / "data").mkdir(exist_ok=True)
    store = FilesystemStore(tmp_path / "data")
    store.prepare()
    return store.open_writer("lab-07", "ep-1", None)


def write_to_file(tmp_path: Path, chunks: list[bytes], max_bytes: int) -> tuple[Path, str, int]:
    writer = temp_writer(tmp_path)
    sink = BodySink(writer, None, max_bytes)
    sha = asyncio.run(drain(sink, chunks))
    return writer.path, sha, sink.size


def test_many_odd_sized_chunks_reach_the_file_in_order_and_hash_right(tmp_path: Path) -> None:
    data = sample(3 * BATCH_BYTES + 12_345)  # several batches, the last one partial
    chunks = chunked(data, ODD_SIZES)
    path, sha, size = write_to_file(tmp_path, chunks, max_bytes=len(data))
    assert path.read_bytes() == data
    assert sha == hashlib.sha256(data).hexdigest()
    assert size == len(data)


def test_more_tiny_chunks_than_one_writev_takes_are_all_written(tmp_path: Path) -> None:
    data = sample(20_000)
    chunks = chunked(data, [1, 2, 3, 5, 7])  # ~5,700 buffers in one batch, > IOV_MAX
    path, sha, _size = write_to_file(tmp_path, chunks, max_bytes=len(data))
    assert path.read_bytes() == data
    assert sha == hashlib.sha256(data).hexdigest()


def test_empty_body_gives_an_empty_file_and_the_empty_hash(tmp_path: Path) -> None:
    path, sha, size = write_to_file(tmp_path, [], max_bytes=10)
    assert path.read_bytes() == b""
    assert sha == hashlib.sha256(b"").hexdigest()
    assert size == 0


def test_size_cap_raises_too_large_on_the_chunk_that_exceeds_it() -> None:
    async def run() -> int:
        sink = BodySink(None, None, max_bytes=1000)
        await sink.write(b"a" * 600)
        await sink.write(b"b" * 400)  # exactly at the cap: still fine
        accepted = sink.size
        with pytest.raises(TooLarge):
            await sink.write(b"c")
        await sink.abort()
        return accepted

    assert asyncio.run(run()) == 1000


def test_size_cap_raises_on_a_single_oversized_first_chunk(tmp_path: Path) -> None:
    writer = temp_writer(tmp_path)
    path = writer.path

    async def run() -> None:
        sink = BodySink(writer, None, max_bytes=BATCH_BYTES)
        with pytest.raises(TooLarge) as caught:
            await sink.write(b"x" * (BATCH_BYTES + 1))
        assert caught.value.status_code == 413
        await sink.abort()

    asyncio.run(run())
    assert path.read_bytes() == b""  # the oversized chunk was never written


def test_size_cap_exceeded_mid_stream_stops_before_writing_the_excess(tmp_path: Path) -> None:
    data = sample(3 * BATCH_BYTES)
    chunks = chunked(data, [65_536])
    cap = 2 * BATCH_BYTES + 100
    writer = temp_writer(tmp_path)
    path = writer.path

    async def run() -> int:
        sink = BodySink(writer, None, max_bytes=cap)
        for index, chunk in enumerate(chunks):
            try:
                await sink.write(chunk)
            except TooLarge:
                await sink.abort()
                return index
        raise AssertionError("TooLarge was never raised")

    failed_at = asyncio.run(run())
    assert failed_at == cap // 65_536  # the first chunk that crosses the cap
    assert len(path.read_bytes()) <= cap


def test_without_a_file_descriptor_the_sink_only_hashes() -> None:
    data = sample(BATCH_BYTES + 777)
    sink = BodySink(None, None, max_bytes=len(data))
    sha = asyncio.run(drain(sink, chunked(data, ODD_SIZES)))
    assert sha == hashlib.sha256(data).hexdigest()
    assert sink.size == len(data)
    assert sink.validation_failed() is None


@pytest.mark.parametrize("declared", [None, DeclaredDigest(sha256="0" * 64)])
def test_sha512_is_not_computed_unless_declared(declared: DeclaredDigest | None) -> None:
    data = sample(1000)
    sink = BodySink(None, None, max_bytes=len(data), declared=declared)
    asyncio.run(drain(sink, [data]))
    assert sink.digest() == BodyDigest(hashlib.sha256(data).hexdigest(), None)


def test_a_declared_sha512_is_computed_in_the_same_pass_over_every_batch() -> None:
    data = sample(2 * BATCH_BYTES + 12_345)
    sink = BodySink(None, None, max_bytes=len(data), declared=DeclaredDigest(sha512="0" * 128))
    sha = asyncio.run(drain(sink, chunked(data, ODD_SIZES)))
    assert sha == hashlib.sha256(data).hexdigest()
    assert sink.digest() == BodyDigest(sha, hashlib.sha512(data).hexdigest())
