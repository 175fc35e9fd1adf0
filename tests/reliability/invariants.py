"""The storage promise, checked by reading a receiver's data_dir directly.

Every acknowledged episode is on disk and indexed exactly once; nothing partial
is visible under a final name (every stored file hashes to its row); the index
parses line by line; after a restart no temp file is left.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from receiver.storage.rows import IndexRow, decode_row

Key = tuple[str, str]


@dataclass
class StoreState:
    """What a data_dir holds, read without the receiver's help."""

    rows: dict[Key, IndexRow] = field(default_factory=dict)
    files: dict[Key, str] = field(default_factory=dict)  # key -> sha256 of the stored file
    temp_files: list[Path] = field(default_factory=list)
    torn_tail: bytes = b""


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_state(data_dir: Path) -> StoreState:
    """Parse the index strictly (a torn tail is reported, not parsed) and hash every file."""
    state = StoreState()
    index = data_dir / "index.jsonl"
    raw = index.read_bytes() if index.exists() else b""
    end = raw.rfind(b"\n") + 1
    state.torn_tail = raw[end:]
    for number, line in enumerate(raw[:end].splitlines(), start=1):
        row = decode_row(line)  # raises for a line that is not a row
        keys = list(json.loads(line))
        assert keys == sorted(keys), f"index line {number}: keys not sorted: {keys}"
        assert row.key not in state.rows, f"index line {number}: second row for {row.key}"
        state.rows[row.key] = row
    episodes = data_dir / "episodes"
    if episodes.is_dir():
        for path in sorted(episodes.rglob("*")):
            if path.is_dir():
                continue
            relative = path.relative_to(episodes)
            assert len(relative.parts) == 2, f"unexpected file under episodes/: {relative}"
            assert path.name.endswith(".tar.zst"), f"not a tarball under episodes/: {relative}"
            key = (relative.parts[0], path.name.removesuffix(".tar.zst"))
            state.files[key] = file_sha256(path)
    tmp = data_dir / "tmp"
    if tmp.is_dir():
        state.temp_files = sorted(p for p in tmp.rglob("*") if not p.is_dir())
    return state


def check_invariants(
    data_dir: Path,
    acked: Mapping[Key, str],
    maybe: Mapping[Key, set[str]] | None = None,
    *,
    after_restart: bool = True,
) -> StoreState:
    """Assert the promise; returns the state read.

    acked: episodes answered 201/200, with their sha256: each must be stored and
    indexed once with that sha256. maybe: episodes whose upload may or may not have
    been stored (the process died before answering); if stored, with one of these
    sha256s. Nothing else may be stored. after_restart: recovery has run, so there is
    no torn tail, no temp file, and every stored file has its row.
    """
    maybe = maybe or {}
    state = read_state(data_dir)
    for key, row in state.rows.items():
        assert key in state.files, f"row without a stored file: {key}"
        assert state.files[key] == row.sha256, f"stored file of {key} does not match its row"
    for key, sha in state.files.items():
        allowed = {acked[key]} if key in acked else maybe.get(key, set())
        assert sha in allowed, f"{key} stored with sha256 {sha}, expected one of {allowed}"
        if after_restart:
            assert key in state.rows, f"stored file without a row after recovery: {key}"
    for key, sha in acked.items():
        assert key in state.rows, f"acknowledged episode {key} has no row"
        assert state.rows[key].sha256 == sha, f"row of acknowledged {key} has another sha256"
    if after_restart:
        assert state.torn_tail == b"", f"torn index tail after recovery: {state.torn_tail!r}"
        assert state.temp_files == [], f"temp files left after recovery: {state.temp_files}"
    return state
