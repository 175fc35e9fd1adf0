"""What episode-verify asks of a catalogue that is not a file (a database): the same questions
as receiver.storage.IndexAudit answers for index.jsonl, with no line-level problems to find.

A database keeps one row per key by its own constraint and has no torn or bad lines, so
only missing and orphaned episodes and mismatches remain to report.
"""

from __future__ import annotations

from collections.abc import Container, Iterator

from receiver.storage import BadLine, Catalogue, NumberedRow, TornTail


class CatalogueAudit:
    def __init__(self, catalogue: Catalogue, host: str | None = None) -> None:
        self._catalogue = catalogue
        self._host = host
        self.bad_lines: list[BadLine] = []
        self.torn_tail: TornTail | None = None
        self.rows = sum(1 for _ in self._rows())

    def __enter__(self) -> CatalogueAudit:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def _rows(self) -> Iterator[NumberedRow]:
        """Rows in export order, numbered from 1 (the database's own order, not a line)."""
        number = 0
        for row in self._catalogue.iter_rows():
            if self._host is None or row.host_id == self._host:
                number += 1
                yield NumberedRow(number, row)

    def lookup(self, key: tuple[str, str]) -> NumberedRow | None:
        row = self._catalogue.lookup(*key)
        return None if row is None else NumberedRow(0, row)

    def duplicates(self) -> list[list[NumberedRow]]:
        return []  # UNIQUE (host_id, episode_id)

    def rows_not_in(self, keys: Container[tuple[str, str]]) -> Iterator[NumberedRow]:
        return (numbered for numbered in self._rows() if numbered.row.key not in keys)

    def catch_up(self) -> None:
        pass  # lookups read the database as it is now
