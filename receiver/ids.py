"""Validation of the identifiers that reach the file system or the gate."""

from __future__ import annotations

import re

from receiver.errors import InvalidId

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
COMMIT_PATTERN = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")


def check_id(kind: str, value: str) -> str:
    """Return value if it is a safe host or episode id (no separators, no dot-dot start)."""
    if not ID_PATTERN.fullmatch(value):
        raise InvalidId(f"{kind} must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$")
    return value


def normalise_commit(value: str) -> str | None:
    """Lower-case commit id, or None when value is not 40 or 64 hex digits."""
    value = value.strip()
    if COMMIT_PATTERN.fullmatch(value):
        return value.lower()
    return None
