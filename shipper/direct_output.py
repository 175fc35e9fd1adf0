"""Sequential output that bypasses the page cache (O_DIRECT) where the file system allows it.

A file system that refuses O_DIRECT gets ordinary buffered writes (with early writeback).
"""

# Why: writing a packed episode through the page cache costs the kernel a copy of every
# byte into freshly allocated page-cache pages (about a seventh of the packer's CPU on a
# two-core host, more than the sha256) and leaves the whole tarball dirty for the final
# fsync to push out. With O_DIRECT the device reads the bytes straight from one aligned
# buffer, the fsync has only the tail and the metadata left, and a lab host's page cache
# is not flooded with tarballs that are read once, by the upload.
#
# O_DIRECT needs the buffer address, the length and the file offset aligned, so bytes are
# gathered in a page-aligned buffer (an anonymous mmap) and written in whole buffers; the
# unaligned tail is written after O_DIRECT is switched off again. A file system that
# refuses O_DIRECT (EINVAL when it is set, or on the first write) gets ordinary buffered
# writes, with writeback started every few MiB so the final fsync still has little to do.

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from episode_common.durable import start_writeback

BUFFER_BYTES = 4 * 1024 * 1024
# O_DIRECT's alignment unit: 4096 covers every logical block size in use (512 or 4096).
ALIGNMENT = 4096
WRITEBACK_BYTES = 16 * 1024 * 1024


class DirectOutput:
    """Append-only writer for one open file descriptor, positioned at offset 0.

    Not thread-safe: one thread writes. `close()` writes what is buffered and restores
    the descriptor's flags; it does not fsync (the caller does, once, at the end).
    """

    def __init__(self, fd: int, *, direct: bool = True) -> None:
        self._fd = fd
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self._buffer = mmap.mmap(-1, BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self._fill = 0
        self._written = 0
        self._writeback_from = 0
        self.direct = direct and _set_flags(fd, self._flags | os.O_DIRECT)

    def write(self, data: bytes | memoryview) -> None:
        source = memoryview(data).cast("B")
        while source:
            count = min(len(source), BUFFER_BYTES - self._fill)
            self._view[self._fill : self._fill + count] = source[:count]
            self._fill += count
            source = source[count:]
            if self._fill == BUFFER_BYTES:
                self._write_buffer(BUFFER_BYTES)

    def close(self) -> None:
        """Write the buffered bytes (the aligned part directly, the tail buffered)."""
        try:
            aligned = self._fill - self._fill % ALIGNMENT
            if aligned:
                self._write_buffer(aligned)
            self._leave_direct_mode()
            if self._fill:
                self._write_buffer(self._fill)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Drop what is buffered (the output is being thrown away) and restore the flags."""
        self._leave_direct_mode()
        if self._buffer.closed:
            return
        try:
            self._view.release()
            self._buffer.close()
        except BufferError:
            pass  # a slice is still referenced (by a traceback): the mmap goes with it

    def _write_buffer(self, length: int) -> None:
        """Write buffer[:length] and keep what follows it (at most the unaligned tail)."""
        with self._view[:length] as view:
            done = 0
            while done < length:
                try:
                    count = os.write(self._fd, view[done:])
                except OSError as error:
                    # Some file systems accept the flag and refuse the write; nothing was
                    # written then.
                    if not (self.direct and error.errno == errno.EINVAL):
                        raise
                    self._leave_direct_mode()
                    continue
                if count < length - done and self.direct:
                    # A short direct write leaves the offset unaligned: finish buffered.
                    self._leave_direct_mode()
                done += count
        self._written += length
        leftover = self._fill - length
        if leftover:
            self._view[:leftover] = self._view[length : self._fill]
        self._fill = leftover
        if not self.direct and self._written - self._writeback_from >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._writeback_from, 0)
            self._writeback_from = self._written

    def _leave_direct_mode(self) -> None:
        if self.direct:
            _set_flags(self._fd, self._flags)
            self.direct = False


def _set_flags(fd: int, flags: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return False
        raise
    return True
