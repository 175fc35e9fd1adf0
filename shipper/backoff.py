"""When to try again: exponential backoff with full jitter, and Retry-After parsing.

backoff_seconds is a pure function of the attempt number (the jitter draw is
an argument), so the schedule is tested on its own, without clocks or sleeps.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime


def backoff_seconds(
    attempt: int,
    *,
    base: float,
    cap: float,
    jitter: float,
    retry_after: float | None = None,
) -> float:
    """Delay before attempt number `attempt + 1`, after `attempt` consecutive failures.

    Full jitter: a uniform draw (jitter in [0, 1)) from [0, min(cap, base * 2**(attempt-1))].
    A server's Retry-After is a floor, clamped to cap so that a bogus header
    cannot park the shipper for days.
    """
    if attempt < 1:
        return 0.0
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    # Clamp the exponent: 2.0**1024 raises OverflowError, while base * 2.0**1000
    # at worst becomes inf, which min() turns into cap.
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 1000))
    delay = jitter * ceiling
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, cap))
    return delay


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


class ReceiverHealth:
    """Backoff per receiver, not per episode: a receiver that is down is probed, not hammered.

    After a receiver-level failure nobody talks to it until next_try; then one
    request goes alone (the probe) and only its success lets the others through.
    Failures of requests that were already in flight when the first one failed
    count once, so N parallel uploads do not push the backoff N steps at once.
    """

    def __init__(
        self,
        base: float,
        cap: float,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.base = base
        self.cap = cap
        self.clock = clock
        self.draw = draw
        self.failures = 0
        self.next_try = 0.0
        self.last_error: str | None = None
        self.probing = False
        self.generation = 0

    @property
    def healthy(self) -> bool:
        return self.failures == 0

    def may_start(self) -> bool:
        if self.failures == 0:
            return True
        now = self.clock()
        # A wall clock stepped backwards must not park us for longer than cap.
        due = now >= self.next_try or self.next_try - now > self.cap + 1.0
        return due and not self.probing

    def start(self) -> int:
        """Call before a request; returns the token to pass to the outcome methods."""
        if self.failures:
            self.probing = True
        return self.generation

    def succeeded(self, token: int) -> None:
        """The receiver answered something other than a receiver-level failure."""
        del token
        self.failures = 0
        self.probing = False
        self.last_error = None
        self.generation += 1

    def failed(self, token: int, reason: str, retry_after: float | None = None) -> None:
        self.probing = False
        if token != self.generation:
            return
        self.generation += 1
        self.failures += 1
        self.last_error = reason
        self.next_try = self.clock() + backoff_seconds(
            self.failures,
            base=self.base,
            cap=self.cap,
            jitter=self.draw(),
            retry_after=retry_after,
        )

    def abandoned(self, token: int) -> None:
        """The request ended without an answer that says anything (e.g. shutdown)."""
        del token
        self.probing = False
