"""receiver.digests: RFC 9530 Content-Digest parsing and Repr-Digest formatting."""

from __future__ import annotations

import base64
import hashlib

import pytest

from receiver.digests import format_digest, parse_content_digest
from receiver.errors import DigestMismatch

SHA = hashlib.sha256(b"episode").hexdigest()
B64 = base64.b64encode(bytes.fromhex(SHA)).decode()
SHA512_B64 = base64.b64encode(hashlib.sha512(b"episode").digest()).decode()


def test_absent_header_is_none() -> None:
    assert parse_content_digest(None) is None


@pytest.mark.parametrize("key", ["sha-256", "SHA-256", "Sha-256", " sha-256 "])
def test_sha256_member_is_returned_as_lower_hex_whatever_the_key_case(key: str) -> None:
    assert parse_content_digest(f"{key}=:{B64}:") == SHA


def test_sha256_is_found_among_several_algorithms() -> None:
    assert parse_content_digest(f"sha-512=:{SHA512_B64}:, sha-256=:{B64}:") == SHA
    assert parse_content_digest(f"sha-256=:{B64}:,sha-512=:{SHA512_B64}:") == SHA


def test_only_other_algorithms_is_none() -> None:
    assert parse_content_digest(f"sha-512=:{SHA512_B64}:") is None
    assert parse_content_digest(f"sha-512=:{SHA512_B64}:, md5=:AAAA:") is None


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "",
        f"sha-256={B64}",
        f"sha-256=:{B64}",
        f"sha-256={B64}:",
        "sha-256=:",
        "sha-256=:not base64!:",
        f"sha-256=:{B64.rstrip('=')}:",
    ],
)
def test_malformed_header_is_a_digest_mismatch(value: str) -> None:
    with pytest.raises(DigestMismatch):
        parse_content_digest(value)


@pytest.mark.parametrize("length", [0, 20, 31, 33, 64])
def test_sha256_value_of_the_wrong_length_is_a_digest_mismatch(length: int) -> None:
    value = base64.b64encode(b"\x01" * length).decode()
    with pytest.raises(DigestMismatch, match="32 bytes"):
        parse_content_digest(f"sha-256=:{value}:")


def test_digest_mismatch_is_a_400_with_its_contract_code() -> None:
    with pytest.raises(DigestMismatch) as caught:
        parse_content_digest("garbage")
    assert caught.value.status_code == 400
    assert caught.value.code == "digest-mismatch"


def test_format_digest_is_the_rfc_9530_form() -> None:
    assert format_digest(SHA) == f"sha-256=:{B64}:"


@pytest.mark.parametrize("data", [b"", b"x", b"episode" * 1000])
def test_format_digest_round_trips_through_parse(data: bytes) -> None:
    sha = hashlib.sha256(data).hexdigest()
    assert parse_content_digest(format_digest(sha)) == sha
    assert parse_content_digest(format_digest(sha.upper())) == sha
