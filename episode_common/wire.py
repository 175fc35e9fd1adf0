"""The wire contract both sides speak: the id rule, the commit form, digest fields, header names.

The receiver, the shipper and the operator tools import these instead of spelling them again.
"""

from __future__ import annotations

import base64
import re

ID_RULE = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ID_PATTERN = re.compile(ID_RULE[1:-1])
COMMIT_PATTERN = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")
DEFAULT_COMMIT_HEADER = "X-Code-Commit"
TARBALL_SUFFIX = ".tar.zst"


def is_valid_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


def normalise_commit(value: object) -> str | None:
    """Lower-case commit id, or None unless value is 40 or 64 hex digits (spaces trimmed)."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value.lower() if COMMIT_PATTERN.fullmatch(value) else None


def format_sha256_digest(sha256_hex: str) -> str:
    """`sha-256=:<base64>:`, the RFC 9530 field value of Content-Digest and Repr-Digest."""
    return "sha-256=:" + base64.b64encode(bytes.fromhex(sha256_hex)).decode() + ":"
