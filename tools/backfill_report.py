"""What backfill learns about one tarball (its row, or why it is unreadable) and the run's report.

A tarball is read once, streaming: hashed, its zstd stream checked to the end (frame
checksums catch flipped bytes and truncation) in a second thread, then meta.json's commit
read from the start. Memory: a few MiB per file being read, whatever the tarball's size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from receiver.config import StorageConfig
from receiver.errors import InvalidTarball
from receiver.storage import BlobStore, IndexRow, StoredBlob, Stray, digest_stream
from receiver.stored_rows import row_for_stored_blob
from receiver.tarcheck import StreamValidator
from tools.cli_common import StoreLocation
from tools.scan import Cancelled


@dataclass(frozen=True)
class Unreadable:
    reason: str


def inspect_tarball(
    blobs: BlobStore,
    tarball: StoredBlob,
    storage: StorageConfig,
    on_bytes: Callable[[int], None],
    stop: threading.Event,
) -> IndexRow | Unreadable:
    """The row backfill would write for tarball (commit from meta.json, None when it has none).

    Corrupt means corrupt at the level the store promises: with validate = "none" any bytes
    are a tarball; with "zstd" the stream must decompress; with "tar" the tar before
    meta.json must parse too. The receiver's other acceptance rules are not re-applied.
    """
    checked = storage.validate if storage.validate == "none" else "zstd"
    validator = StreamValidator(msgspec.structs.replace(storage, validate=checked))

    def on_block(block: bytes) -> None:
        if stop.is_set():
            raise Cancelled
        if validator.failed is not None:
            raise validator.failed  # no need to hash the rest of a corrupt file
        validator.feed(block)
        on_bytes(len(block))

    key = (tarball.host_id, tarball.episode_id)
    try:
        with blobs.open_read(*key) as handle:
            digest = digest_stream(handle, on_block)
        validator.finish()
        return row_for_stored_blob(blobs, storage, *key, digest=digest, lenient=False)
    except InvalidTarball as error:
        return Unreadable(str(error))
    except OSError as error:
        return Unreadable(f"cannot read: {error.strerror or error}")
    finally:
        validator.abort()


@dataclass
class BackfillReport:
    dry_run: bool
    scanned: int
    skipped: list[Stray]
    already_indexed: int = 0
    torn_tail_bytes: int = 0  # cut off the index (in a dry run: would be)
    added: list[IndexRow] = field(default_factory=list)
    would_add: list[IndexRow] = field(default_factory=list)
    unreadable: list[tuple[StoredBlob, str]] = field(default_factory=list)
    in_flight: list[StoredBlob] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {
            "scanned": self.scanned,
            "already_indexed": self.already_indexed,
            "added": len(self.added),
            "would_add": len(self.would_add),
            "unreadable": len(self.unreadable),
            "in_flight": len(self.in_flight),
            "skipped": len(self.skipped),
            "torn_tail_bytes": self.torn_tail_bytes,
        }

    def to_json(self, location: StoreLocation) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "episodes_root": str(location.episodes_root),
            "index": location.catalogue_name,
            "summary": self.summary(),
            "added": [_row_json(row) for row in self.added],
            "would_add": [_row_json(row) for row in self.would_add],
            "unreadable": [
                {**_key_json(tarball), "path": tarball.where, "reason": reason}
                for tarball, reason in self.unreadable
            ],
            "in_flight": [_key_json(tarball) for tarball in self.in_flight],
            "skipped": [{"path": s.where, "reason": s.reason} for s in self.skipped],
        }

    def print_text(self, prog: str, location: StoreLocation) -> None:
        verb = "would add" if self.dry_run else "added"
        for row in sorted(self.would_add if self.dry_run else self.added, key=_row_key):
            print(
                f"{verb} {row.host_id}/{row.episode_id} size={row.size_bytes} "
                f"sha256={row.sha256} commit={row.commit or '-'}"
            )
        for tarball, reason in sorted(self.unreadable, key=lambda item: item[0].key):
            print(f"unreadable {tarball.host_id}/{tarball.episode_id}: {reason} ({tarball.where})")
        for tarball in self.in_flight:
            print(f"in flight {tarball.host_id}/{tarball.episode_id}: left to the receiver")
        for stray in self.skipped:
            print(f"skipped {stray.where}: {stray.reason}")
        if self.torn_tail_bytes:
            cut = "would cut" if self.dry_run else "cut"
            print(f"{cut} a torn last line ({self.torn_tail_bytes} bytes) off the index")
        counts = self.summary()
        print(
            f"{prog}: {location.episodes_root}: scanned {self.scanned} tarballs: "
            f"{self.already_indexed} already indexed, "
            f"{counts['would_add' if self.dry_run else 'added']} {verb}, "
            f"{counts['unreadable']} unreadable, {counts['in_flight']} in flight; "
            f"{counts['skipped']} entries that are not tarballs skipped"
            + (" (dry run: nothing written)" if self.dry_run else "")
        )


def _key_json(tarball: StoredBlob) -> dict[str, str]:
    return {"host_id": tarball.host_id, "episode_id": tarball.episode_id}


def _row_json(row: IndexRow) -> dict[str, Any]:
    return {
        "host_id": row.host_id,
        "episode_id": row.episode_id,
        "sha256": row.sha256,
        "size_bytes": row.size_bytes,
        "commit": row.commit,
    }


def _row_key(row: IndexRow) -> tuple[str, str]:
    return row.key
