"""Hash a stored blob's bytes as they are read, in bounded blocks, for every backend."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO

READ_BLOCK = 1024 * 1024


def digest_stream(
    handle: BinaryIO, on_block: Callable[[bytes], None] | None = None
) -> tuple[str, int]:
    """sha256 and size of what handle yields, read in blocks; on_block sees each block after
    hashing (progress, a second consumer); an exception it raises aborts the read."""
    sha = hashlib.sha256()
    size = 0
    while block := handle.read(READ_BLOCK):
        sha.update(block)
        size += len(block)
        if on_block is not None:
            on_block(block)
    return sha.hexdigest(), size
