"""Classification of every receiver answer, as the contract's shipper semantics list them."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from episode_common.wire import format_sha256_digest
from shipper.outcome import (
    Reply,
    Verdict,
    classify_gate,
    classify_head,
    classify_put,
    classify_refusal,
    decode_body,
    sha256_from_digest_header,
    transport_failure,
)

SHA = hashlib.sha256(b"episode").hexdigest()
OTHER_SHA = hashlib.sha256(b"something else").hexdigest()


def reply(status: int, body: dict[str, Any] | None = None, **headers: str) -> Reply:
    raw = json.dumps(body).encode() if body is not None else b""
    return Reply(status, {k.replace("_", "-").lower(): v for k, v in headers.items()}, raw)


def repr_digest(sha_hex: str) -> str:
    return "sha-256=:" + base64.b64encode(bytes.fromhex(sha_hex)).decode() + ":"


def test_content_digest_is_rfc9530_base64_of_the_raw_digest() -> None:
    expected = base64.b64encode(hashlib.sha256(b"episode").digest()).decode()
    assert format_sha256_digest(SHA) == f"sha-256=:{expected}:"
    assert sha256_from_digest_header(format_sha256_digest(SHA)) == SHA


def test_digest_header_parsing_picks_sha256_among_several_and_rejects_garbage() -> None:
    both = f"sha-512=:{base64.b64encode(bytes(64)).decode()}:, {repr_digest(SHA)}"
    assert sha256_from_digest_header(both) == SHA
    assert sha256_from_digest_header("sha-256=:not base64!:") is None
    assert (
        sha256_from_digest_header("sha-256=:" + base64.b64encode(b"short").decode() + ":") is None
    )
    assert sha256_from_digest_header(None) is None


def test_put_201_with_the_local_sha256_is_shipped() -> None:
    outcome = classify_put(reply(201, {"status": "stored", "sha256": SHA}), SHA)
    assert outcome.verdict is Verdict.SHIPPED


def test_put_200_already_present_with_the_local_sha256_is_shipped() -> None:
    outcome = classify_put(reply(200, {"status": "already-present", "sha256": SHA.upper()}), SHA)
    assert outcome.verdict is Verdict.SHIPPED


def test_put_2xx_with_another_sha256_is_fatal_never_shipped() -> None:
    outcome = classify_put(reply(201, {"status": "stored", "sha256": OTHER_SHA}), SHA)
    assert outcome.verdict is Verdict.FATAL
    assert OTHER_SHA in outcome.reason


def test_put_2xx_without_sha256_is_not_confirmed_and_retried() -> None:
    assert classify_put(reply(201, {"status": "stored"}), SHA).verdict is Verdict.RETRY_EPISODE


def test_put_2xx_near_the_window_edge_carries_the_warning() -> None:
    body = {"status": "stored", "sha256": SHA, "warning": "4 commits behind; update soon"}
    assert classify_put(reply(201, body), SHA).behind_by_warning == body["warning"]
    headed = classify_put(reply(201, {"sha256": SHA}, x_commit_behind_by="4"), SHA)
    assert headed.behind_by_warning is not None and "4" in headed.behind_by_warning


def test_put_412_is_stale_with_the_remediation_verbatim() -> None:
    body = {"error": "stale-commit", "remediation": "git pull\n  episode-shipper retry\n"}
    outcome = classify_put(reply(412, body), SHA)
    assert outcome.verdict is Verdict.STALE
    assert outcome.code == "stale-commit"
    assert outcome.remediation == body["remediation"]


def test_put_400_digest_mismatch_asks_for_a_rehash() -> None:
    outcome = classify_put(reply(400, {"error": "digest-mismatch", "detail": "x"}), SHA)
    assert outcome.verdict is Verdict.DIGEST_MISMATCH


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid-tarball"),
        (400, "invalid-digest"),
        (400, "commit-mismatch"),
        (400, "malformed-commit"),
        (409, "conflict"),
        (413, "too-large"),
    ],
)
def test_put_client_errors_are_fatal_with_the_reason(status: int, code: str) -> None:
    outcome = classify_put(reply(status, {"error": code, "detail": "why"}), SHA)
    assert outcome.verdict is Verdict.FATAL
    assert code in outcome.reason and "why" in outcome.reason


@pytest.mark.parametrize("status", [408, 423])
def test_put_episode_level_busy_answers_retry_the_episode(status: int) -> None:
    outcome = classify_put(reply(status, {"error": "busy"}, retry_after="3"), SHA)
    assert outcome.verdict is Verdict.RETRY_EPISODE
    assert outcome.retry_after == 3.0


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 507])
def test_put_receiver_level_answers_back_off_the_receiver(status: int) -> None:
    outcome = classify_put(reply(status, {"error": "unwell"}, retry_after="7"), SHA)
    assert outcome.verdict is Verdict.RETRY_RECEIVER
    assert outcome.retry_after == 7.0


def test_put_unexpected_status_backs_off_rather_than_parking_the_episode() -> None:
    assert classify_put(reply(404), SHA).verdict is Verdict.RETRY_RECEIVER
    assert classify_put(Reply(502, {}, b"<html>bad gateway</html>"), SHA).verdict is (
        Verdict.RETRY_RECEIVER
    )


def test_head_200_with_matching_repr_digest_is_shipped_without_a_body() -> None:
    outcome = classify_head(reply(200, repr_digest=repr_digest(SHA)), SHA)
    assert outcome.verdict is Verdict.SHIPPED


def test_head_200_with_another_digest_is_a_fatal_conflict() -> None:
    outcome = classify_head(reply(200, repr_digest=repr_digest(OTHER_SHA)), SHA)
    assert outcome.verdict is Verdict.FATAL
    assert outcome.code == "conflict"


def test_head_200_without_a_digest_leaves_the_decision_to_put() -> None:
    assert classify_head(reply(200), SHA).verdict is Verdict.PROCEED


def test_head_404_means_send_the_body() -> None:
    assert classify_head(reply(404), SHA).verdict is Verdict.PROCEED


def test_head_412_is_stale_before_any_body_is_sent() -> None:
    assert classify_head(reply(412), SHA).verdict is Verdict.STALE


def test_head_commit_refusal_400_is_fatal() -> None:
    assert classify_head(reply(400), SHA).verdict is Verdict.FATAL


@pytest.mark.parametrize("status", [401, 403])
def test_auth_refusals_are_held_not_fatal(status: int) -> None:
    assert classify_head(reply(status), SHA).verdict is Verdict.HELD
    put = classify_put(reply(status, {"error": "unauthorized", "detail": "unknown token"}), SHA)
    assert put.verdict is Verdict.HELD and put.reason.endswith("unauthorized: unknown token")


def test_the_get_body_supplies_the_reason_for_a_bodiless_head_401() -> None:
    head = classify_head(reply(401), SHA)
    body = {"error": "unauthorized", "detail": "unknown token"}
    outcome = classify_refusal(reply(401, body), head)
    assert outcome.verdict is Verdict.HELD
    assert outcome.reason == "HTTP 401 unauthorized: unknown token"
    # A receiver without that GET (405): the HEAD's answer stands.
    assert classify_refusal(reply(405), head) == head


@pytest.mark.parametrize("status", [429, 500, 503, 507])
def test_head_receiver_trouble_backs_off(status: int) -> None:
    outcome = classify_head(reply(status, retry_after="2"), SHA)
    assert outcome.verdict is Verdict.RETRY_RECEIVER
    assert outcome.retry_after == 2.0


def test_gate_body_supplies_the_remediation_for_a_bodiless_head_412() -> None:
    head = classify_head(reply(412), SHA)
    body = {"error": "unknown-commit", "remediation": "push your commit\n", "behind_by": None}
    outcome = classify_gate(reply(412, body), head)
    assert outcome.verdict is Verdict.STALE
    assert outcome.code == "unknown-commit"
    assert outcome.remediation == "push your commit\n"


def test_gate_accepting_the_commit_now_lets_the_upload_proceed() -> None:
    head = classify_head(reply(412), SHA)
    assert classify_gate(reply(200, {"status": "ok"}), head).verdict is Verdict.PROCEED


def test_gate_unavailable_retries_later_so_the_remediation_is_not_lost() -> None:
    head = classify_head(reply(412), SHA)
    assert classify_gate(reply(503), head).verdict is Verdict.RETRY_RECEIVER
    assert classify_gate(reply(404), head) == head


def test_gate_400_makes_a_head_400_fatal_with_the_receiver_reason() -> None:
    head = classify_head(reply(400), SHA)
    body = {"error": "malformed-commit", "remediation": "fix meta.json\n"}
    outcome = classify_gate(reply(400, body), head)
    assert outcome.verdict is Verdict.FATAL
    assert "malformed-commit" in outcome.reason


def test_transport_failures_back_off_the_receiver() -> None:
    assert transport_failure("ConnectError").verdict is Verdict.RETRY_RECEIVER


def test_decode_body_tolerates_non_json_and_non_objects() -> None:
    assert decode_body(b"") == {}
    assert decode_body(b"<html>") == {}
    assert decode_body(b"[1, 2]") == {}
    assert decode_body(b'{"error": "x"}') == {"error": "x"}
