"""Where `meta.json` sits in an episode archive: the one rule of receiver, backfill and shipper.

At the top (`meta.json`, `./meta.json`), or inside the one top-level directory that holds
everything else (`<dir>/meta.json`, what `tar -C <spool> -cf - <episode_id>` makes); exactly
one, at one of those places. Members are seen one at a time, as a tar stream yields them.
"""

from __future__ import annotations

META_NAME = "meta.json"
LOOKED_FOR = "at the top or under the single top-level directory"
TOP = ""  # the place key of a top-level meta.json; a nested one's key is its directory


class ArchiveLayoutError(ValueError):
    """The archive has no usable meta.json place; str() is the detail for the user."""


def member_parts(name: str) -> tuple[str, ...]:
    """A member name's path parts, without the empty and `.` parts tar writers add."""
    return tuple(part for part in name.split("/") if part not in ("", "."))


class MetaLocator:
    """Follows the members of one archive and says, at the end, which meta.json is the one.

    observe() returns a place key for a member whose content the caller should read and
    keep (a candidate that can still win), None otherwise; finish() names the winner.
    """

    def __init__(self) -> None:
        self._first_top: str | None = None
        self._several_tops = False
        self._top_metas = 0
        self._nested_metas = 0  # under the first top-level name only
        self._deeper: str | None = None  # the first meta.json seen too deep, for the detail

    def observe(self, name: str) -> str | None:
        parts = member_parts(name)
        if not parts:
            return None
        if self._first_top is None:
            self._first_top = parts[0]
        elif parts[0] != self._first_top:
            self._several_tops = True
        if parts[-1] != META_NAME:
            return None
        if len(parts) == 1:
            self._top_metas += 1
            return TOP if self._top_metas == 1 else None
        if len(parts) == 2:
            if parts[0] != self._first_top:
                return None  # a second top-level directory: that layout is out already
            self._nested_metas += 1
            return parts[0] if self._nested_metas == 1 else None
        if self._deeper is None:
            self._deeper = "/".join(parts)
        return None

    @property
    def settled_at_top(self) -> bool:
        """A top-level meta.json decides the layout; only a second one could still refuse it."""
        return self._top_metas == 1

    def finish(self) -> str:
        """The place key of the archive's meta.json; ArchiveLayoutError when there is none."""
        if self._top_metas > 1:
            raise ArchiveLayoutError("more than one meta.json at the top of the archive")
        if self._top_metas == 1:
            return TOP
        if self._first_top is not None and not self._several_tops and self._nested_metas:
            if self._nested_metas > 1:
                raise ArchiveLayoutError(f"more than one {self._first_top}/meta.json")
            return self._first_top
        raise ArchiveLayoutError(self._missing_detail())

    def _missing_detail(self) -> str:
        detail = f"no meta.json {LOOKED_FOR}"
        if self._several_tops and self._nested_metas:
            return f"{detail} (the archive has several top-level entries)"
        if self._deeper is not None:
            return f"{detail} ({self._deeper} is too deep)"
        return detail
