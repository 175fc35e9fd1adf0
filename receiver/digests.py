"""RFC 9530 digest fields: parse Content-Digest, format Repr-Digest (sha-256 only)."""

from __future__ import annotations

import base64
import binascii

from receiver.errors import DigestMismatch


def parse_content_digest(value: str | None) -> str | None:
    """The sha-256 member as lower-case hex; None when absent or only other algorithms."""
    if value is None:
        return None
    for member in value.split(","):
        key, sep, item = member.strip().partition("=")
        if not sep:
            raise DigestMismatch("Content-Digest header is malformed")
        if key.strip().lower() != "sha-256":
            continue  # other algorithms may be ignored (RFC 9530 section 2)
        item = item.strip()
        if len(item) < 2 or not (item.startswith(":") and item.endswith(":")):
            raise DigestMismatch("Content-Digest sha-256 value must be :base64:")
        try:
            raw = base64.b64decode(item[1:-1], validate=True)
        except binascii.Error:
            raise DigestMismatch("Content-Digest sha-256 value is not base64") from None
        if len(raw) != 32:
            raise DigestMismatch("Content-Digest sha-256 value is not 32 bytes")
        return raw.hex()
    return None


def format_digest(sha256_hex: str) -> str:
    """`sha-256=:<base64>:` for Repr-Digest / Content-Digest."""
    return "sha-256=:" + base64.b64encode(bytes.fromhex(sha256_hex)).decode() + ":"
