"""The catalogue row, as every backend stores it and `index.jsonl` spells it, and host totals.

Rows are msgspec structs whose fields are declared in sorted order, so encoding writes the
contract's key-sorted JSON line.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

SCHEMA_VERSION = 1


class IndexRow(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One catalogue row. Fields are declared in sorted order so rows are written key-sorted.

    gc=False: a row holds only strings, numbers and None, so it can be in no cycle;
    untracked, the million rows of a large index cost the cyclic collector nothing
    (no pass walks them, no pause on the event loop) and 16 bytes less each.
    """

    backfilled: bool = False
    commit: str | None = None
    episode_id: str
    host_id: str
    received_at_wall: str
    schema_version: int
    sha256: str
    size_bytes: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.host_id, self.episode_id)


def new_row(
    host_id: str,
    episode_id: str,
    sha256: str,
    size_bytes: int,
    commit: str | None,
    *,
    backfilled: bool = False,
) -> IndexRow:
    return IndexRow(
        backfilled=backfilled,
        commit=commit,
        episode_id=episode_id,
        host_id=host_id,
        received_at_wall=dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        schema_version=SCHEMA_VERSION,
        sha256=sha256,
        size_bytes=size_bytes,
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(IndexRow)
# The decoder itself, for loops over millions of lines: map(row_decoder.decode, lines) has
# no Python frame per line (a few per cent of each line's decode).
row_decoder = _decoder


def encode_row(row: IndexRow) -> bytes:
    """The row as one `index.jsonl` line, newline included."""
    return _encoder.encode(row) + b"\n"


def decode_row(line: bytes) -> IndexRow:
    """Raises msgspec.DecodeError / ValidationError for a line that is not a row."""
    return _decoder.decode(line)


def decode_rows(data: bytes) -> list[IndexRow]:
    """Rows of complete lines in one C call; raises like decode_row (also takes odd shapes)."""
    return _decoder.decode_lines(data)


@dataclass
class HostSummary:
    episodes: int = 0
    bytes: int = 0
    last_seen: str = ""  # received_at_wall of the newest row ("" = none)
    last_commit: str | None = None


def summarise_hosts(rows: Iterable[IndexRow]) -> dict[str, HostSummary]:
    """Episodes, bytes, newest row and its commit per host, in a single pass over rows.

    received_at_wall is compared as a string: every writer stores UTC isoformat with
    microseconds (new_row), where text order is time order, and parsing a million
    timestamps would dominate the cost.
    """
    hosts: dict[str, HostSummary] = {}
    for row in rows:
        summary = hosts.get(row.host_id)
        if summary is None:
            summary = hosts[row.host_id] = HostSummary()
        summary.episodes += 1
        summary.bytes += row.size_bytes
        if row.received_at_wall >= summary.last_seen:
            summary.last_seen = row.received_at_wall
            summary.last_commit = row.commit
    return hosts
