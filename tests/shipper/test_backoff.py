"""Backoff schedule, Retry-After parsing and per-receiver probing, without clocks or sleeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shipper.backoff import ReceiverHealth, backoff_seconds, parse_retry_after


def test_backoff_ceiling_doubles_per_attempt_until_the_cap() -> None:
    ceilings = [backoff_seconds(n, base=1.0, cap=30.0, jitter=1.0) for n in range(1, 8)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_backoff_is_full_jitter_between_zero_and_the_ceiling() -> None:
    assert backoff_seconds(4, base=1.0, cap=600.0, jitter=0.0) == 0.0
    assert backoff_seconds(4, base=1.0, cap=600.0, jitter=0.25) == 2.0
    assert backoff_seconds(4, base=1.0, cap=600.0, jitter=0.5) == 4.0


def test_backoff_is_zero_before_any_failure() -> None:
    assert backoff_seconds(0, base=1.0, cap=10.0, jitter=1.0) == 0.0


def test_backoff_of_a_huge_attempt_number_is_the_cap_without_overflow() -> None:
    assert backoff_seconds(10_000, base=1.0, cap=600.0, jitter=1.0) == 600.0
    assert backoff_seconds(10_000, base=1e300, cap=600.0, jitter=1.0) == 600.0


def test_backoff_honours_retry_after_as_a_floor() -> None:
    assert backoff_seconds(1, base=1.0, cap=600.0, jitter=0.0, retry_after=30.0) == 30.0
    # A longer jittered wait is kept: Retry-After is a minimum.
    assert backoff_seconds(10, base=1.0, cap=600.0, jitter=1.0, retry_after=30.0) == 512.0


def test_backoff_clamps_retry_after_to_the_cap() -> None:
    assert backoff_seconds(1, base=1.0, cap=60.0, jitter=0.0, retry_after=86400.0) == 60.0


def test_backoff_rejects_a_jitter_draw_outside_zero_to_one() -> None:
    with pytest.raises(ValueError):
        backoff_seconds(1, base=1.0, cap=10.0, jitter=1.5)


def test_parse_retry_after_reads_delta_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 7 ") == 7.0
    later = (now + timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(later, now=now) == 90.0
    earlier = (now - timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(earlier, now=now) == 0.0


def test_parse_retry_after_ignores_missing_and_garbage_values() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_receiver_health_lets_everyone_through_while_healthy() -> None:
    health = ReceiverHealth(1.0, 60.0, clock=Clock(), draw=lambda: 1.0)
    for _ in range(5):
        assert health.may_start()
        health.start()
    assert health.healthy


def test_receiver_health_waits_after_a_failure_then_sends_one_probe() -> None:
    clock = Clock()
    health = ReceiverHealth(1.0, 60.0, clock=clock, draw=lambda: 1.0)
    health.failed(health.start(), "connection refused")
    assert not health.may_start()
    clock.now += 1.0
    assert health.may_start()
    probe = health.start()
    # While the probe is out, nobody else talks to the receiver.
    assert not health.may_start()
    health.failed(probe, "connection refused")
    assert health.failures == 2
    clock.now += 1.9
    assert not health.may_start()
    clock.now += 0.1
    assert health.may_start()
    health.succeeded(health.start())
    assert health.healthy and health.may_start() and health.last_error is None


def test_receiver_health_counts_failures_of_parallel_requests_once() -> None:
    health = ReceiverHealth(1.0, 60.0, clock=Clock(), draw=lambda: 1.0)
    tokens = [health.start() for _ in range(4)]
    for token in tokens:
        health.failed(token, "connection reset")
    assert health.failures == 1


def test_receiver_health_honours_retry_after() -> None:
    clock = Clock()
    health = ReceiverHealth(1.0, 600.0, clock=clock, draw=lambda: 0.0)
    health.failed(health.start(), "HTTP 503", retry_after=30.0)
    assert health.next_try == clock.now + 30.0


def test_receiver_health_frees_the_probe_slot_when_a_request_is_abandoned() -> None:
    clock = Clock()
    health = ReceiverHealth(1.0, 60.0, clock=clock, draw=lambda: 0.0)
    health.failed(health.start(), "timeout")
    probe = health.start()
    assert not health.may_start()
    health.abandoned(probe)
    assert health.may_start()


def test_receiver_health_is_not_parked_by_a_clock_stepping_backwards() -> None:
    clock = Clock()
    health = ReceiverHealth(1.0, 60.0, clock=clock, draw=lambda: 1.0)
    health.failed(health.start(), "timeout")
    clock.now -= 3600.0
    assert health.may_start()
