"""Where episodes and their catalogue live: backends behind small interfaces, opened by `type`.

Callers use the names exported here; each backend's module is its own business.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from receiver.config import (
    FilesystemStorageConfig,
    JsonlIndexConfig,
    PostgresIndexConfig,
    ReceiverConfig,
    S3StorageConfig,
)
from receiver.storage.base import (
    BackendUnavailable,
    BlobStore,
    BlobWriter,
    Catalogue,
    CatalogueCorrupt,
    CatalogueState,
    DurabilityError,
    StoredBlob,
    Stray,
)
from receiver.storage.filesystem import FilesystemStore
from receiver.storage.hashing import digest_stream
from receiver.storage.jsonl import JsonlCatalogue
from receiver.storage.jsonl_audit import (
    BadLine,
    IndexAudit,
    IndexSnapshot,
    NumberedRow,
    TornTail,
    read_index_snapshot,
)
from receiver.storage.layout import INDEX_NAME, DataDirLayout
from receiver.storage.marks import CommitSummary, Rejection, StaleMark, StaleRefusal
from receiver.storage.rows import HostSummary, IndexRow, decode_row, encode_row, new_row

__all__ = [
    "INDEX_NAME",
    "BackendUnavailable",
    "BadLine",
    "IndexAudit",
    "IndexSnapshot",
    "NumberedRow",
    "TornTail",
    "read_index_snapshot",
    "BlobStore",
    "BlobWriter",
    "Catalogue",
    "CommitSummary",
    "Rejection",
    "StaleMark",
    "StaleRefusal",
    "CatalogueCorrupt",
    "CatalogueState",
    "DataDirLayout",
    "DurabilityError",
    "HostSummary",
    "IndexRow",
    "Storage",
    "StoredBlob",
    "Stray",
    "decode_row",
    "digest_stream",
    "encode_row",
    "new_row",
    "open_storage",
    "open_storage_at",
]


@dataclass
class Storage:
    """One receiver's (or tool's) blob store and catalogue."""

    blobs: BlobStore
    catalogue: Catalogue
    layout: DataDirLayout

    def close(self) -> None:
        self.catalogue.close()


def open_storage(config: ReceiverConfig) -> Storage:
    """The backends the config's `type` keys name (not opened for serving yet)."""
    layout = DataDirLayout(config.storage.data_dir)
    return Storage(_blob_store(config, layout), _catalogue(config, layout), layout)


def open_storage_at(episodes_root: Path, index_path: Path) -> Storage:
    """A filesystem store and jsonl catalogue at explicit paths (the tools' --episodes-root,
    --index); the per-episode claims live beside episodes_root, as in a data_dir."""
    layout = DataDirLayout(episodes_root.parent)
    blobs = FilesystemStore(layout.data_dir, episodes_dir=episodes_root)
    return Storage(blobs, JsonlCatalogue(index_path, layout.claims_path), layout)


def _blob_store(config: ReceiverConfig, layout: DataDirLayout) -> BlobStore:
    match config.storage:
        case FilesystemStorageConfig():
            return FilesystemStore(layout.data_dir)
        case S3StorageConfig():
            from receiver.storage.s3 import S3Store  # boto3 is imported only when used

            return S3Store(config.storage, layout)


def _catalogue(config: ReceiverConfig, layout: DataDirLayout) -> Catalogue:
    match config.index:
        case JsonlIndexConfig():
            return JsonlCatalogue(layout.index_path, layout.claims_path)
        case PostgresIndexConfig():
            # Imported here: a receiver on the embedded default never loads the driver.
            from receiver.storage.postgresql import PostgresCatalogue

            return PostgresCatalogue(config.index)
