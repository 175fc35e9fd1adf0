"""The row for a blob that is stored but has no row: one rule for the receiver's repair on
access, start-up recovery and episode-backfill.

The commit is the one the upload was sent with when a recovery note knows it, else
meta.json's (found by the archive rule), else none.
"""

from __future__ import annotations

from episode_common.wire import normalise_commit
from receiver.config import StorageConfig
from receiver.errors import InvalidTarball
from receiver.storage import BlobStore, IndexRow, new_row
from receiver.tarcheck import read_meta_commit


def stored_commit(
    blobs: BlobStore, storage: StorageConfig, host_id: str, episode_id: str, *, lenient: bool
) -> str | None:
    """meta.json's commit of a stored blob, None when it names none (or is not a commit id).

    A stream broken before meta.json raises InvalidTarball when the store promises a tar
    (validate = "tar") unless lenient; otherwise the commit is simply unknown.
    """
    try:
        with blobs.open_read(host_id, episode_id) as handle:
            value = read_meta_commit(handle, storage)
    except InvalidTarball:
        if storage.validate == "tar" and not lenient:
            raise
        return None
    return normalise_commit(value)


def row_for_stored_blob(
    blobs: BlobStore,
    storage: StorageConfig,
    host_id: str,
    episode_id: str,
    *,
    digest: tuple[str, int] | None = None,
    commit: str | None = None,
    backfilled: bool = True,
    lenient: bool = True,
) -> IndexRow:
    """The row to append for a stored blob; digest and commit when already known."""
    sha256, size = digest if digest is not None else blobs.digest(host_id, episode_id)
    if commit is None:
        commit = stored_commit(blobs, storage, host_id, episode_id, lenient=lenient)
    return new_row(host_id, episode_id, sha256, size, commit, backfilled=backfilled)
