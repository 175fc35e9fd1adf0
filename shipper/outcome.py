"""What a receiver's answer means for an episode: pure classification, no I/O.

Every response (or transport failure) becomes one Outcome whose verdict tells
the daemon what to do; the rules are the contract's "Shipper semantics".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shipper.backoff import parse_retry_after


class Verdict(StrEnum):
    SHIPPED = "shipped"  # stored, and the receiver's sha256 equals ours
    PROCEED = "proceed"  # HEAD: not stored yet (or cannot tell); send the body
    STALE = "stale"  # 412: fatal for every episode with this commit
    FATAL = "fatal"  # parked until an operator runs `retry`
    DIGEST_MISMATCH = "digest-mismatch"  # re-hash the local copy, then try again
    RETRY_EPISODE = "retry-episode"  # this episode waits; the receiver is fine
    RETRY_RECEIVER = "retry-receiver"  # the receiver is unwell: everyone backs off
    HELD = "held"  # 401/403: our token is refused; everyone waits, slowly, for a new one


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, reduced to what classification needs."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    reason: str
    code: str | None = None
    remediation: str | None = None
    retry_after: float | None = None
    behind_by_warning: str | None = None


# Retried with backoff: the episode is fine, the moment is not.
_RETRY_EPISODE = frozenset({408, 423})
# Retried with backoff per receiver: it is overloaded, full or down.
_RETRY_RECEIVER = frozenset({429, 507})
# Fatal for the episode; an operator has to act.
_FATAL = frozenset({400, 409, 413})
# Held, not fatal: the token is fixed on the host (rotated, installed), not the episode.
_HELD = frozenset({401, 403})

_DIGEST_ITEM = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*")


def sha256_from_digest_header(value: str | None) -> str | None:
    """The sha-256 member of a Repr-Digest/Content-Digest header, as lower-case hex."""
    if not value:
        return None
    for item in value.split(","):
        match = _DIGEST_ITEM.fullmatch(item)
        if match and match.group(1).lower() == "sha-256":
            try:
                raw = base64.b64decode(match.group(2), validate=True)
            except (binascii.Error, ValueError):
                return None
            return raw.hex() if len(raw) == 32 else None
    return None


def decode_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a response body; {} when it is missing or not an object."""
    try:
        value = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _reason(reply: Reply, body: Mapping[str, Any]) -> str:
    code = body.get("error") or body.get("status")
    text = f"HTTP {reply.status}"
    if isinstance(code, str):
        text += f" {code}"
    detail = body.get("detail")
    if isinstance(detail, str) and detail:
        text += f": {detail}"
    if isinstance(body.get("stored_sha256"), str):
        text += f" (stored sha256 {body['stored_sha256']})"
    extras = [f"{key} {body[key]}" for key in ("behind_by", "window") if key in body]
    if extras:
        text += f" ({', '.join(extras)})"
    return text


def _text(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) else None


def _edge_warning(reply: Reply, body: Mapping[str, Any]) -> str | None:
    warning = _text(body, "warning")
    if warning:
        return warning
    behind = reply.headers.get("x-commit-behind-by")
    return f"commit is {behind} commits behind the receiver's head" if behind else None


def classify_put(reply: Reply, local_sha256: str) -> Outcome:
    """Classify the answer to PUT /episodes/{host}/{episode}."""
    body = decode_body(reply.body)
    code = _text(body, "error")
    retry_after = parse_retry_after(reply.headers.get("retry-after"))
    if reply.status in (200, 201):
        remote = (_text(body, "sha256") or "").lower()
        if not remote:
            # Not confirmed: a later HEAD compares Repr-Digest instead.
            return Outcome(Verdict.RETRY_EPISODE, f"HTTP {reply.status} without sha256")
        if remote != local_sha256:
            return Outcome(
                Verdict.FATAL,
                f"receiver stored sha256 {remote}, local copy is {local_sha256}",
                code="sha256-differs",
            )
        return Outcome(
            Verdict.SHIPPED, f"HTTP {reply.status}", behind_by_warning=_edge_warning(reply, body)
        )
    if reply.status == 412:
        return Outcome(
            Verdict.STALE, _reason(reply, body), code, _text(body, "remediation"), retry_after
        )
    # Only a mismatch is worth a re-hash; `invalid-digest` (a header the receiver cannot
    # parse) would be sent the same way again, so it is fatal like the other 400s.
    if reply.status == 400 and code == "digest-mismatch":
        return Outcome(Verdict.DIGEST_MISMATCH, _reason(reply, body), code)
    if reply.status in _HELD:
        return Outcome(Verdict.HELD, _reason(reply, body), code)
    if reply.status in _FATAL:
        return Outcome(Verdict.FATAL, _reason(reply, body), code, _text(body, "remediation"))
    if reply.status in _RETRY_EPISODE:
        return Outcome(Verdict.RETRY_EPISODE, _reason(reply, body), code, None, retry_after)
    # 429, 5xx, 507 and anything unexpected (a proxy's 404, a 3xx): the receiver
    # as a whole is not answering as the contract says, so back off for everyone
    # rather than park episodes over what is likely a deployment hiccup.
    return Outcome(Verdict.RETRY_RECEIVER, _reason(reply, body), code, None, retry_after)


def classify_head(reply: Reply, local_sha256: str) -> Outcome:
    """Classify the answer to HEAD /episodes/{host}/{episode} (sent with the commit header)."""
    retry_after = parse_retry_after(reply.headers.get("retry-after"))
    if reply.status == 200:
        stored = sha256_from_digest_header(reply.headers.get("repr-digest"))
        if stored is None:
            return Outcome(Verdict.PROCEED, "HTTP 200 without Repr-Digest; PUT decides")
        if stored != local_sha256:
            return Outcome(
                Verdict.FATAL,
                f"HTTP 200 conflict: receiver holds sha256 {stored}, local copy is {local_sha256}",
                code="conflict",
            )
        return Outcome(Verdict.SHIPPED, "already stored (HEAD digest matches)")
    if reply.status == 412:
        return Outcome(Verdict.STALE, "HTTP 412", None, None, retry_after)
    if reply.status in _HELD:
        # No body: GET of the same URL says why (classify_refusal).
        return Outcome(Verdict.HELD, f"HTTP {reply.status}", None)
    if reply.status == 400:
        # HEAD answers have no body: the gate endpoint says which 400 it was.
        return Outcome(Verdict.FATAL, "HTTP 400", None)
    if reply.status in _RETRY_RECEIVER or reply.status >= 500:
        return Outcome(Verdict.RETRY_RECEIVER, f"HTTP {reply.status}", None, None, retry_after)
    # 404 (not stored) and anything else: let the PUT's answer decide.
    return Outcome(Verdict.PROCEED, f"HTTP {reply.status}")


def classify_gate(reply: Reply, head_outcome: Outcome) -> Outcome:
    """Refine a bodiless HEAD refusal (400/412) with GET /gate/{commit}'s body."""
    body = decode_body(reply.body)
    if reply.status == 200:
        # The window moved between the two requests: the commit is fine now.
        return Outcome(Verdict.PROCEED, "gate accepts the commit now")
    if reply.status in (400, 412):
        verdict = Verdict.STALE if reply.status == 412 else Verdict.FATAL
        return Outcome(
            verdict,
            _reason(reply, body),
            _text(body, "error"),
            _text(body, "remediation"),
        )
    if reply.status in _RETRY_RECEIVER or reply.status >= 500:
        # Most likely a receiver restarting between the two requests: ask again
        # later, so that the remediation is not lost.
        retry_after = parse_retry_after(reply.headers.get("retry-after"))
        return Outcome(
            Verdict.RETRY_RECEIVER, f"gate: HTTP {reply.status}", None, None, retry_after
        )
    return head_outcome


def classify_refusal(reply: Reply, head_outcome: Outcome) -> Outcome:
    """Refine a bodiless HEAD 401/403 with the body of GET /episodes/{host}/{episode}."""
    if reply.status in _HELD:
        body = decode_body(reply.body)
        return Outcome(Verdict.HELD, _reason(reply, body), _text(body, "error"))
    # A receiver without that GET (405), or the token was accepted meanwhile: the
    # HEAD's answer stands; the next try asks again.
    return head_outcome


def transport_failure(reason: str) -> Outcome:
    """Connection refused, reset, timeouts: the receiver is unreachable."""
    return Outcome(Verdict.RETRY_RECEIVER, reason)
