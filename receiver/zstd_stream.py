"""A zstd stream decompressed in bounded pieces, and a forward-only reader over them.

Output is produced at most PIECE_BYTES at a time, counted against max_unpacked_bytes, with
the window capped by max_window_bytes, so memory stays bounded whatever the input; a
truncated stream or one without a frame is InvalidTarball.
"""

from __future__ import annotations

import io
import sys
import tarfile
import threading
from collections.abc import Iterable, Iterator

from receiver.config import StorageConfig
from receiver.errors import InvalidTarball

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

PIECE_BYTES = 1 << 20  # decompressed bytes per decompress() call
# Each frame costs a fresh decompressor (~15 us): bound frames by output so that a body of
# empty or skippable frames cannot buy minutes of CPU; real packers emit one or a few frames.
FRAME_ALLOWANCE = 1000
BYTES_PER_FRAME = 64 * 1024


class Aborted(Exception):
    """The validator was aborted; the worker unwinds without a verdict."""


class Inflater:
    """Decompressed pieces of a zstd stream of one or more frames, checked for truncation."""

    def __init__(
        self, chunks: Iterable[bytes], storage: StorageConfig, stop: threading.Event | None = None
    ) -> None:
        self._chunks = chunks
        self._limit = storage.max_unpacked_bytes
        self._window = storage.max_window_bytes
        window_log = self._window.bit_length() - 1  # floor(log2): never above the cap
        self._options: dict[int, int] = {zstd.DecompressionParameter.window_log_max: window_log}
        self._stop = stop
        self.produced = 0

    def pieces(self) -> Iterator[bytes]:
        decompressor: zstd.ZstdDecompressor | None = None
        frames = 0
        for chunk in self._chunks:
            data = chunk
            # A decompressor that stopped at max_length holds pending output: keep calling it
            # with no new input until it asks for more, so no piece exceeds PIECE_BYTES.
            while data or (decompressor is not None and not decompressor.needs_input):
                if self._stop is not None and self._stop.is_set():
                    raise Aborted
                if decompressor is None:
                    decompressor = zstd.ZstdDecompressor(options=self._options)
                try:
                    piece = decompressor.decompress(data, PIECE_BYTES)
                except zstd.ZstdError as error:
                    raise InvalidTarball(self._describe(error)) from None
                data = b""
                if piece:
                    self.produced += len(piece)
                    if self.produced > self._limit:
                        raise InvalidTarball(f"decompressed size exceeds {self._limit} bytes")
                    yield piece
                if decompressor.eof:  # the next frame (or a skippable one) starts right here
                    frames += 1
                    if frames > FRAME_ALLOWANCE + self.produced // BYTES_PER_FRAME:
                        raise InvalidTarball(
                            f"zstd: {frames} frames for {self.produced} bytes of output"
                        )
                    data = decompressor.unused_data
                    decompressor = None
        if decompressor is not None:
            raise InvalidTarball("truncated zstd stream")
        if frames == 0:
            raise InvalidTarball("empty body: no zstd frame")

    def _describe(self, error: zstd.ZstdError) -> str:
        reason = str(error).removeprefix("Unable to decompress Zstandard data: ")
        if "too much memory" in reason:  # libzstd's wording for a window above window_log_max
            return f"zstd: window larger than max_window_bytes ({self._window})"
        return f"zstd: {reason[:1].lower()}{reason[1:]}"


class ForwardReader:
    """A forward-only file over decompressed pieces for tarfile; seek() skips without copying."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._view = memoryview(b"")
        self._pos = 0

    def _fill(self) -> bool:
        piece = next(self._pieces, None)
        if piece is None:
            return False
        self._view = memoryview(piece)
        return True

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise io.UnsupportedOperation("unbounded read")  # tarfile always passes a size
        parts: list[memoryview] = []
        while size > 0 and (self._view or self._fill()):
            part = self._view[:size]
            self._view = self._view[len(part) :]
            parts.append(part)
            size -= len(part)
        data = b"".join(parts)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != io.SEEK_SET or pos < self._pos:
            raise tarfile.ReadError("seeking backwards is not allowed")  # as in mode "r|"
        # Stops at the end of data; tarfile then sees a short read and says so.
        while self._pos < pos and (self._view or self._fill()):
            step = min(pos - self._pos, len(self._view))
            self._view = self._view[step:]
            self._pos += step
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: bytes) -> int:
        raise io.UnsupportedOperation("read-only stream")

    def close(self) -> None:
        pass

    def drain(self) -> None:
        """Decompress the rest, so that damage after the tar's end is still detected."""
        self._view = memoryview(b"")
        for _ in self._pieces:
            pass
