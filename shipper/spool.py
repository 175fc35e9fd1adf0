"""Find finished episodes in the spool: directory listing, settle check, meta.json commit.

An entry is `<id>/` with meta.json or `<id>.tar.zst`. It is finished when
nothing in it changed for settle_seconds; "changed" is judged by ctime, which
copies cannot preserve (rsync -a and cp -p keep old mtimes, not ctimes).
File-system events (watchfiles) only say where to look sooner.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import tarfile
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import watchfiles

from episode_common.archive import ArchiveLayoutError, MetaLocator
from episode_common.wire import TARBALL_SUFFIX, normalise_commit

try:
    from compression import zstd  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # Python < 3.14
    from backports import zstd  # type: ignore[no-redef, unused-ignore]

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".partial")
# A meta.json larger than this is not metadata; refuse rather than read it all.
MAX_META_BYTES = 16 << 20


class Kind(StrEnum):
    DIRECTORY = "dir"
    TARBALL = "tar"


class BadEpisode(Exception):
    """The episode cannot be shipped as it is; the message says why, in one line."""


@dataclass(frozen=True)
class Entry:
    episode_id: str
    path: Path
    kind: Kind


def entry_for(spool_dir: Path, name: str) -> Entry | None:
    """The spool entry a top-level name stands for, or None when it is not one."""
    if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
        return None  # being written: producers rename when done (and our .deleting-*)
    path = spool_dir / name
    try:
        mode = path.lstat().st_mode
    except OSError:
        return None
    if stat.S_ISDIR(mode):
        return Entry(name, path, Kind.DIRECTORY)
    if stat.S_ISREG(mode) and name.endswith(TARBALL_SUFFIX):
        return Entry(name[: -len(TARBALL_SUFFIX)], path, Kind.TARBALL)
    return None


def list_entries(spool_dir: Path) -> list[Entry]:
    """Every candidate episode in the spool, sorted by name for a stable order."""
    entries = []
    for name in sorted(os.listdir(spool_dir)):
        entry = entry_for(spool_dir, name)
        if entry is not None:
            entries.append(entry)
    return entries


def unqueued(
    spool_dir: Path, known: AbstractSet[str], settle_seconds: float, now: float
) -> tuple[int, int]:
    """Spool entries not queued yet: (finished, still settling), as `status` reports them."""
    finished = settling = 0
    try:
        entries = list_entries(spool_dir)
    except OSError:
        return 0, 0
    for entry in entries:
        if entry.episode_id in known:
            continue
        changed = last_change(entry)
        if changed is None:
            continue
        if changed + settle_seconds <= now:
            finished += 1
        else:
            settling += 1
    return finished, settling


def last_change(entry: Entry) -> float | None:
    """Newest ctime/mtime in the entry; None when it is not a candidate yet (no meta.json)."""
    try:
        if entry.kind is Kind.TARBALL:
            info = entry.path.stat()
            return max(info.st_ctime, info.st_mtime)
        if not (entry.path / "meta.json").is_file():
            return None
        newest = 0.0
        for directory, dirnames, filenames in os.walk(entry.path):
            for name in [".", *dirnames, *filenames]:
                info = os.lstat(os.path.join(directory, name))
                newest = max(newest, info.st_ctime, info.st_mtime)
        return newest
    except FileNotFoundError:
        return None


def unpadded_commit(value: object) -> str | None:
    """The wire's commit rule, except that surrounding spaces are refused, not trimmed.

    The shipper has always refused them (meta.json, `retry --commit`) where the receiver
    trims; kept in the restructuring that shared the rule, so no behaviour changed.
    """
    if isinstance(value, str) and value != value.strip():
        return None
    return normalise_commit(value)


def commit_from_meta(raw: bytes, where: str) -> str:
    """code_version.commit from meta.json's bytes, lower case; BadEpisode if unusable."""
    try:
        meta: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadEpisode(f"{where}: not valid JSON ({error})") from None
    version = meta.get("code_version") if isinstance(meta, dict) else None
    value = version.get("commit") if isinstance(version, dict) else None
    if value is None:
        raise BadEpisode(f"{where}: has no code_version.commit")
    commit = unpadded_commit(value)
    if commit is None:
        raise BadEpisode(f"{where}: code_version.commit {value!r} is not 40 or 64 hex digits")
    return commit


def read_commit(entry: Entry) -> str:
    """The episode's commit, from its meta.json (inside the tarball for packed ones)."""
    if entry.kind is Kind.DIRECTORY:
        meta = entry.path / "meta.json"
        try:
            with open(meta, "rb") as handle:
                raw = handle.read(MAX_META_BYTES + 1)
        except OSError as error:
            raise BadEpisode(f"meta.json: cannot read ({error.strerror})") from None
        if len(raw) > MAX_META_BYTES:
            raise BadEpisode("meta.json: larger than 16 MiB")
        return commit_from_meta(raw, "meta.json")
    return _commit_from_tarball(entry)


def _commit_from_tarball(entry: Entry) -> str:
    """The commit of a pre-packed tarball, its meta.json found by the receiver's layout rule.

    A top-level meta.json is read at once; one inside a directory counts only once the walk
    has shown that directory to be the archive's only top-level entry.
    """
    locator = MetaLocator()
    commits: dict[str, str | BadEpisode] = {}
    try:
        with zstd.open(entry.path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                place = locator.observe(member.name)
                if place is not None:
                    commits[place] = _member_commit(entry, tar, member)
                    if locator.settled_at_top:
                        break
        found = commits[locator.finish()]
    except ArchiveLayoutError as error:
        raise BadEpisode(f"{entry.path.name}: {error}") from None
    except (OSError, EOFError, tarfile.TarError, zstd.ZstdError) as error:
        raise BadEpisode(f"{entry.path.name}: not a readable tar.zst ({error})") from None
    if isinstance(found, BadEpisode):
        raise found
    return found


def _member_commit(entry: Entry, tar: tarfile.TarFile, member: tarfile.TarInfo) -> str | BadEpisode:
    where = f"{entry.path.name}:{member.name}"
    if not member.isfile():
        return BadEpisode(f"{where}: not a regular file")
    if member.size > MAX_META_BYTES:
        return BadEpisode(f"{where}: larger than 16 MiB")
    handle = tar.extractfile(member)
    assert handle is not None  # a regular file always has one
    try:
        return commit_from_meta(handle.read(), where)
    except BadEpisode as error:
        return error


async def watch_names(spool_dir: Path, stop: asyncio.Event) -> AsyncIterator[set[str]]:
    """Top-level spool names that had file-system events, batch by batch, until stop."""
    root = spool_dir.resolve()
    async for changes in watchfiles.awatch(
        root, watch_filter=None, debounce=400, step=50, stop_event=stop, recursive=True
    ):
        names: set[str] = set()
        for _change, raw in changes:
            try:
                relative = Path(raw).relative_to(root)
            except ValueError:
                continue
            if relative.parts:
                names.add(relative.parts[0])
        if names:
            yield names
