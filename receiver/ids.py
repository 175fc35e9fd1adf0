"""The id and commit rules of the wire contract, as the receiver's typed errors."""

from __future__ import annotations

from episode_common.wire import ID_RULE, is_valid_id
from episode_common.wire import normalise_commit as normalise_commit
from receiver.errors import InvalidId


def check_id(kind: str, value: str) -> str:
    """Return value if it is a safe host or episode id (no separators, no dot-dot start)."""
    if not is_valid_id(value):
        raise InvalidId(f"{kind} must match {ID_RULE}")
    return value
