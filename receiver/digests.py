"""RFC 9530 digest fields: parse Content-Digest and hash a body (Repr-Digest: episode_common.wire).

Content-Digest is an RFC 8941 dictionary: parameters are ignored, `sha-256` and
`sha-512` are checked when present, other algorithms are ignored. A field that
cannot be parsed is InvalidDigest (the sender's bug: re-sending will not help);
a well-formed digest that differs from the body is DigestMismatch (re-hash, retry).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import http_sf

from receiver.errors import DigestMismatch, InvalidDigest

# The algorithms we verify, and the length in bytes a value of each must have.
_LENGTHS = {"sha-256": 32, "sha-512": 64}


@dataclass(frozen=True)
class BodyDigest:
    """What a body hashed to, as lower-case hex; sha512 only when it was asked for."""

    sha256: str
    sha512: str | None = None


@dataclass(frozen=True)
class DeclaredDigest:
    """The digests a request declared, as lower-case hex; None for one it did not send."""

    sha256: str | None = None
    sha512: str | None = None

    def check(self, body: BodyDigest) -> None:
        """DigestMismatch unless every declared digest equals the body's."""
        pairs = (("sha-256", self.sha256, body.sha256), ("sha-512", self.sha512, body.sha512))
        for name, declared, actual in pairs:
            if declared is not None and declared != actual:
                raise DigestMismatch(
                    f"Content-Digest says {name} {declared}, the body has {actual}"
                )


def parse_content_digest(value: str | None) -> DeclaredDigest | None:
    """The sha-256/sha-512 members; None when absent or when it names only other algorithms."""
    if value is None:
        return None
    try:
        # Starlette decodes header bytes as latin-1, so this gives the parser the bytes sent.
        members = http_sf.parse(value.encode("latin-1"), tltype="dictionary")
    except (http_sf.StructuredFieldError, UnicodeEncodeError) as error:
        detail = f"Content-Digest is not a structured-field dictionary: {error}"
        raise InvalidDigest(detail) from None
    assert isinstance(members, dict)  # tltype="dictionary" returns nothing else
    found = {name: _member_hex(name, members[name]) for name in _LENGTHS if name in members}
    if not found:
        return None
    return DeclaredDigest(found.get("sha-256"), found.get("sha-512"))


def _member_hex(name: str, member: object) -> str:
    value = member[0] if isinstance(member, tuple) else member  # (value, parameters)
    if not isinstance(value, bytes):
        raise InvalidDigest(f"Content-Digest {name} is not a byte sequence (:base64:)")
    if len(value) != _LENGTHS[name]:
        raise InvalidDigest(
            f"Content-Digest {name} is {len(value)} bytes, a {name} digest is {_LENGTHS[name]}"
        )
    return value.hex()


class BodyHasher:
    """sha-256 of every body, and sha-512 in the same pass only when the request declared one."""

    def __init__(self, declared: DeclaredDigest | None = None) -> None:
        self._sha256 = hashlib.sha256()
        wants_512 = declared is not None and declared.sha512 is not None
        self._sha512 = hashlib.sha512() if wants_512 else None

    def update(self, data: bytes) -> None:
        self._sha256.update(data)
        if self._sha512 is not None:
            self._sha512.update(data)

    def digest(self) -> BodyDigest:
        sha512 = self._sha512.hexdigest() if self._sha512 is not None else None
        return BodyDigest(self._sha256.hexdigest(), sha512)


def hash_body(data: bytes, declared: DeclaredDigest | None) -> BodyDigest:
    """The digests of a whole body held in memory."""
    hasher = BodyHasher(declared)
    hasher.update(data)
    return hasher.digest()
