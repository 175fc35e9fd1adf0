"""receiver.digests: Content-Digest as an RFC 8941 dictionary, body hashing, Repr-Digest."""

from __future__ import annotations

import base64
import hashlib

import pytest

from episode_common.wire import format_sha256_digest as format_digest
from receiver.digests import (
    BodyDigest,
    BodyHasher,
    DeclaredDigest,
    hash_body,
    parse_content_digest,
)
from receiver.errors import DigestMismatch, InvalidDigest

# RFC 9530's examples: the representation `{"hello": "world"}` (Appendix B) and the
# same with a trailing newline (the sha-512 example of section 2).
HELLO = b'{"hello": "world"}'
HELLO_SHA256 = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
HELLO_SHA512 = (
    "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+"
    "AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:"
)
HELLO_LF = HELLO + b"\n"
HELLO_LF_SHA512 = (
    "sha-512=:YMAam51Jz/jOATT6/zvHrLVgOYTGFy1d6GJiOHTohq4yP+"
    "pgk4vf2aCsyRZOtw8MjkM7iw7yZ/WkppmM44T3qg==:"
)


def test_absent_header_is_none() -> None:
    assert parse_content_digest(None) is None


def test_rfc_9530_sha256_example_is_the_digest_of_its_body() -> None:
    declared = parse_content_digest(HELLO_SHA256)
    assert declared == DeclaredDigest(sha256=hashlib.sha256(HELLO).hexdigest())
    declared.check(hash_body(HELLO, declared))


def test_rfc_9530_sha512_example_is_the_digest_of_its_body() -> None:
    declared = parse_content_digest(HELLO_LF_SHA512)
    assert declared == DeclaredDigest(sha512=hashlib.sha512(HELLO_LF).hexdigest())
    declared.check(hash_body(HELLO_LF, declared))
    with pytest.raises(DigestMismatch, match="sha-512"):
        declared.check(hash_body(HELLO, declared))


def test_rfc_9530_dictionary_with_both_algorithms_checks_both() -> None:
    declared = parse_content_digest(f"{HELLO_SHA256},\t {HELLO_SHA512}")
    assert declared == DeclaredDigest(
        hashlib.sha256(HELLO).hexdigest(), hashlib.sha512(HELLO).hexdigest()
    )
    declared.check(hash_body(HELLO, declared))
    right_256_wrong_512 = BodyDigest(hashlib.sha256(HELLO).hexdigest(), "0" * 128)
    with pytest.raises(DigestMismatch, match="sha-512"):
        declared.check(right_256_wrong_512)
    wrong_256 = BodyDigest("0" * 64, hashlib.sha512(HELLO).hexdigest())
    with pytest.raises(DigestMismatch, match="sha-256"):
        declared.check(wrong_256)


@pytest.mark.parametrize(
    "value",
    [
        f"{HELLO_SHA256};foo=1",
        f'{HELLO_SHA256};foo="bar";baz;n=1.5;t=tok',
        f"{HELLO_SHA256};foo=1, {HELLO_SHA512};x=?0",
    ],
)
def test_parameters_are_ignored(value: str) -> None:
    declared = parse_content_digest(value)
    assert declared is not None
    assert declared.sha256 == hashlib.sha256(HELLO).hexdigest()
    declared.check(hash_body(HELLO, declared))


@pytest.mark.parametrize(
    "value",
    [
        f"md5=:{base64.b64encode(b'x' * 16).decode()}:, {HELLO_SHA256}",
        f"{HELLO_SHA256}, unixsum=30637",
        f"{HELLO_SHA256}, id-sha-256=tok, crc32c=(1 2)",
    ],
)
def test_unknown_algorithms_are_ignored_whatever_their_value(value: str) -> None:
    declared = parse_content_digest(value)
    assert declared == DeclaredDigest(sha256=hashlib.sha256(HELLO).hexdigest())


def test_only_unknown_algorithms_is_none() -> None:
    assert parse_content_digest("md5=:AAAA:, unixsum=30637") is None


def test_missing_base64_padding_is_accepted_as_rfc_8941_asks() -> None:
    declared = parse_content_digest("sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE:")
    assert declared == DeclaredDigest(sha256=hashlib.sha256(HELLO).hexdigest())


@pytest.mark.parametrize(
    "value",
    [
        "SHA-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",  # keys are lower case
        "sha-256 = :X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
        f"{HELLO_SHA256},",
        f"{HELLO_SHA256} {HELLO_SHA512}",
        "sha-256=:",
        "sha-256=:not base64!:",
        "sha-256=:A=B=:",
        "=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:;p=(1)",
        "sha-256=:\u00e9:",
        "sha-256=:\u20ac:",  # not even latin-1
    ],
)
def test_malformed_dictionary_is_invalid_digest(value: str) -> None:
    with pytest.raises(InvalidDigest, match="not a structured-field dictionary"):
        parse_content_digest(value)


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ("sha-256=tok", "not a byte sequence"),
        ("sha-256", "not a byte sequence"),  # a bare key is the boolean true
        ("sha-256=1", "not a byte sequence"),
        ('sha-256="X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="', "not a byte sequence"),
        ("sha-256=(:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:)", "not a byte sequence"),
        (f"{HELLO_SHA256}, sha-512=?1", "sha-512 is not a byte sequence"),
    ],
)
def test_a_member_that_is_not_a_byte_sequence_is_invalid_digest(value: str, what: str) -> None:
    with pytest.raises(InvalidDigest, match=what):
        parse_content_digest(value)


@pytest.mark.parametrize(
    ("name", "length"),
    [("sha-256", 0), ("sha-256", 31), ("sha-256", 33), ("sha-256", 64), ("sha-512", 32)],
)
def test_a_value_of_the_wrong_length_is_invalid_digest(name: str, length: int) -> None:
    value = base64.b64encode(b"\x01" * length).decode()
    with pytest.raises(InvalidDigest, match=f"{name} is {length} bytes"):
        parse_content_digest(f"{name}=:{value}:")


def test_invalid_digest_and_mismatch_are_400s_with_their_own_codes() -> None:
    with pytest.raises(InvalidDigest) as invalid:
        parse_content_digest("sha-256=:nope")
    assert (invalid.value.status_code, invalid.value.code) == (400, "invalid-digest")
    assert invalid.value.detail and "Content-Digest" in invalid.value.detail
    declared = parse_content_digest(HELLO_SHA256)
    assert declared is not None
    with pytest.raises(DigestMismatch) as mismatch:
        declared.check(hash_body(b"other", declared))
    assert (mismatch.value.status_code, mismatch.value.code) == (400, "digest-mismatch")


def test_sha512_is_hashed_only_when_declared() -> None:
    assert hash_body(HELLO, None) == BodyDigest(hashlib.sha256(HELLO).hexdigest(), None)
    only_256 = DeclaredDigest(sha256="0" * 64)
    assert hash_body(HELLO, only_256).sha512 is None
    hasher = BodyHasher(DeclaredDigest(sha512="0" * 128))
    for piece in (HELLO[:5], HELLO[5:]):
        hasher.update(piece)
    assert hasher.digest() == BodyDigest(
        hashlib.sha256(HELLO).hexdigest(), hashlib.sha512(HELLO).hexdigest()
    )


def test_format_digest_is_the_rfc_9530_form() -> None:
    assert format_digest(hashlib.sha256(HELLO).hexdigest()) == HELLO_SHA256


@pytest.mark.parametrize("data", [b"", b"x", b"episode" * 1000])
def test_format_digest_round_trips_through_parse(data: bytes) -> None:
    sha = hashlib.sha256(data).hexdigest()
    assert parse_content_digest(format_digest(sha)) == DeclaredDigest(sha256=sha)
    assert parse_content_digest(format_digest(sha.upper())) == DeclaredDigest(sha256=sha)
