"""What episode-verify found: each kind of problem, rendered as text lines or as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from receiver.storage import BadLine, NumberedRow, StoredBlob, Stray, TornTail
from tools.cli_common import StoreLocation
from tools.progress import human_bytes


class _Named(Protocol):
    """A StoredBlob or an IndexRow: both name their episode."""

    @property
    def host_id(self) -> str: ...
    @property
    def episode_id(self) -> str: ...


@dataclass(frozen=True)
class Mismatch:
    tarball: StoredBlob
    row: NumberedRow
    actual: str | int  # the file's sha256 or size


@dataclass
class VerifyReport:
    quick: bool
    rows: int = 0
    files: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    missing: list[NumberedRow] = field(default_factory=list)
    orphaned: list[StoredBlob] = field(default_factory=list)
    sha256_mismatch: list[Mismatch] = field(default_factory=list)
    size_mismatch: list[Mismatch] = field(default_factory=list)
    duplicates: list[list[NumberedRow]] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)
    torn_tail: TornTail | None = None
    unreadable: list[tuple[StoredBlob, str]] = field(default_factory=list)
    stray: list[Stray] = field(default_factory=list)

    @property
    def problems(self) -> int:
        counts = [len(self.missing), len(self.orphaned), len(self.sha256_mismatch)]
        counts += [len(self.size_mismatch), len(self.duplicates), len(self.bad_lines)]
        counts += [len(self.unreadable), int(self.torn_tail is not None)]
        return sum(counts)

    def sort(self) -> None:
        self.missing.sort(key=lambda numbered: numbered.row.key)
        self.orphaned.sort(key=lambda tarball: tarball.key)
        self.sha256_mismatch.sort(key=lambda mismatch: mismatch.tarball.key)
        self.size_mismatch.sort(key=lambda mismatch: mismatch.tarball.key)
        self.duplicates.sort(key=lambda rows: rows[0].row.key)
        self.unreadable.sort(key=lambda item: item[0].key)

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "files": self.files,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "mb_per_second": round(self._rate() / 1e6, 1),
            "problems": self.problems,
            "clean": self.problems == 0,
        }

    def _rate(self) -> float:
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def to_json(self, location: StoreLocation, host: str | None) -> dict[str, Any]:
        torn = self.torn_tail
        return {
            "episodes_root": str(location.episodes_root),
            "index": location.catalogue_name,
            "host": host,
            "quick": self.quick,
            "summary": self.summary(),
            "missing": [{**_row_json(n), "path": _path(location, n)} for n in self.missing],
            "orphaned": [
                {**_key_json(t), "path": t.where, "size_bytes": t.size_bytes} for t in self.orphaned
            ],
            "sha256_mismatch": [_mismatch_json(m, "sha256") for m in self.sha256_mismatch],
            "size_mismatch": [_mismatch_json(m, "size_bytes") for m in self.size_mismatch],
            "duplicates": [
                {
                    **_key_json(rows[0].row),
                    "lines": [n.line for n in rows],
                    "same_content": _same_content(rows),
                }
                for rows in self.duplicates
            ],
            "bad_lines": [
                {"line": bad.line, "error": bad.error, "preview": bad.preview}
                for bad in self.bad_lines
            ],
            "torn_tail": None if torn is None else {"line": torn.line, "bytes": torn.size},
            "unreadable": [
                {**_key_json(t), "path": t.where, "error": error} for t, error in self.unreadable
            ],
            "stray": [{"path": s.where, "reason": s.reason} for s in self.stray],
        }

    def text_lines(self, prog: str, location: StoreLocation) -> list[str]:
        lines = [
            f"missing {_name(n.row)}: index line {n.line}, no file {_path(location, n)}"
            for n in self.missing
        ]
        lines += [
            f"orphaned {_name(t)}: {t.where} ({t.size_bytes} bytes) has no index row"
            for t in self.orphaned
        ]
        lines += [
            f"sha256 mismatch {_name(m.tarball)}: index line {m.row.line} says "
            f"{m.row.row.sha256}, the file has {m.actual}"
            for m in self.sha256_mismatch
        ]
        lines += [
            f"size mismatch {_name(m.tarball)}: index line {m.row.line} says "
            f"{m.row.row.size_bytes} bytes, the file has {m.actual}"
            for m in self.size_mismatch
        ]
        for rows in self.duplicates:
            content = "same content" if _same_content(rows) else "DIFFERENT content"
            numbers = ", ".join(str(n.line) for n in rows)
            lines.append(f"duplicate rows {_name(rows[0].row)}: lines {numbers} ({content})")
        lines += [
            f"bad line {bad.line}: not an index row ({bad.error}): {bad.preview!r}"
            for bad in self.bad_lines
        ]
        if self.torn_tail is not None:
            torn = self.torn_tail
            lines.append(f"torn tail: line {torn.line} ({torn.size} bytes) has no newline")
        lines += [f"unreadable {_name(t)}: {error} ({t.where})" for t, error in self.unreadable]
        lines += [f"note: not a tarball: {s.where}: {s.reason}" for s in self.stray]
        if self.quick:
            work = f"sizes compared in {self.seconds:.1f} s"
        else:
            rate = self._rate() / 1e6
            work = (
                f"{human_bytes(self.bytes_read)} hashed in {self.seconds:.1f} s ({rate:.0f} MB/s)"
            )
        verdict = "clean" if self.problems == 0 else f"{self.problems} problem(s)"
        lines.append(
            f"{prog}: {location.episodes_root}: {self.rows} rows, {self.files} files, {work}: "
            f"{verdict}"
        )
        return lines


def _name(item: _Named) -> str:
    return f"{item.host_id}/{item.episode_id}"


def _key_json(item: _Named) -> dict[str, str]:
    return {"host_id": item.host_id, "episode_id": item.episode_id}


def _row_json(numbered: NumberedRow) -> dict[str, Any]:
    return {**_key_json(numbered.row), "line": numbered.line}


def _path(location: StoreLocation, numbered: NumberedRow) -> str:
    return location.storage.blobs.where(*numbered.row.key)


def _mismatch_json(mismatch: Mismatch, field_name: str) -> dict[str, Any]:
    return {
        **_row_json(mismatch.row),
        "path": mismatch.tarball.where,
        f"index_{field_name}": getattr(mismatch.row.row, field_name),
        f"file_{field_name}": mismatch.actual,
    }


def _same_content(rows: list[NumberedRow]) -> bool:
    return len({(n.row.sha256, n.row.size_bytes) for n in rows}) == 1
