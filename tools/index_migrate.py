"""`episode-index migrate`: move a store onto other backends (e.g. jsonl + filesystem onto
PostgreSQL + S3), every blob and every row, keeping each row as it was.

Rows go in commit order; a blob is copied (and verified against its row's sha256) before
its row is written, so the target never holds a row without its blob. Re-running resumes:
what the target holds is skipped. The source is only read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from receiver.storage import BlobWriter, IndexRow, Storage, digest_stream

log = logging.getLogger(__name__)


class MigrationError(Exception):
    """A blob does not match its row, or the target holds something else under an id."""


@dataclass
class MigrationReport:
    copied_blobs: int = 0
    added_rows: int = 0
    already_there: int = 0
    bytes_copied: int = 0


def migrate(
    source: Storage, target: Storage, report: MigrationReport | None = None
) -> MigrationReport:
    report = report or MigrationReport()
    for row in source.catalogue.rows_after(None):
        _migrate_row(source, target, row, report)
    return report


def _migrate_row(source: Storage, target: Storage, row: IndexRow, report: MigrationReport) -> None:
    existing = target.catalogue.lookup(*row.key)
    if existing is not None:
        if existing.sha256 != row.sha256:
            raise MigrationError(f"{row.host_id}/{row.episode_id}: the target holds other content")
        report.already_there += 1
        return
    writer = None
    if not target.blobs.exists(*row.key):
        writer = _copy_blob(source, target, row)
        report.copied_blobs += 1
        report.bytes_copied += row.size_bytes
    elif target.blobs.digest(*row.key)[0] != row.sha256:
        raise MigrationError(f"{row.host_id}/{row.episode_id}: the target's blob is other content")
    _, added = target.catalogue.append_if_absent(row)  # the row as it was: time, commit, flag
    report.added_rows += added
    if writer is not None:
        writer.close()  # the row is durable: the blob needs no recovery note any more


def _copy_blob(source: Storage, target: Storage, row: IndexRow) -> BlobWriter:
    """Stream the source's blob into the target, verified, committed (not yet closed)."""
    writer = target.blobs.open_writer(row.host_id, row.episode_id, row.commit, row.sha256)
    try:
        with source.blobs.open_read(*row.key) as handle:
            sha256, size = digest_stream(handle, lambda block: writer.write([block]))
        if (sha256, size) != (row.sha256, row.size_bytes):
            raise MigrationError(
                f"{row.host_id}/{row.episode_id}: the source's blob does not match its row "
                f"(sha256 {sha256}, {size} bytes); run episode-verify on the source"
            )
        if not writer.commit():
            raise MigrationError(
                f"{row.host_id}/{row.episode_id}: appeared in the target meanwhile"
            )
    except BaseException:
        writer.abort()
        raise
    return writer
