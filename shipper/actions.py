"""What the shipper does about each verdict: a table from Verdict to Action, no I/O.

shipper.effects carries an Action out (queue, receiver health, packed copy, log line);
keeping the decision here lets tests read the whole mapping without a queue or a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from shipper.outcome import Verdict


class Action(StrEnum):
    BACK_OFF_RECEIVER = "back-off-receiver"  # every upload waits for the receiver
    HOLD = "hold"  # our token is refused: every upload waits, slowly, for a new one
    SHIP = "ship"  # record shipped, drop our packed copy
    PARK_COMMIT = "park-commit"  # fatal for every waiting episode of the commit
    REHASH = "rehash"  # forget the hash and the packed copy, prepare again
    FATAL_AFTER_REHASH = "fatal-after-rehash"  # the digest still differs after re-hashing
    FATAL = "fatal"  # parked until an operator runs `retry`
    RETRY_EPISODE = "retry-episode"  # this episode backs off; the receiver is fine


BY_VERDICT: Mapping[Verdict, Action] = MappingProxyType(
    {
        Verdict.RETRY_RECEIVER: Action.BACK_OFF_RECEIVER,
        Verdict.HELD: Action.HOLD,
        Verdict.SHIPPED: Action.SHIP,
        Verdict.STALE: Action.PARK_COMMIT,
        Verdict.DIGEST_MISMATCH: Action.REHASH,
        Verdict.FATAL: Action.FATAL,
        Verdict.RETRY_EPISODE: Action.RETRY_EPISODE,
        # An upload ends with a final answer; PROCEED there means none came: try again.
        Verdict.PROCEED: Action.RETRY_EPISODE,
    }
)

# The receiver did not answer as the contract says (or refused our token): these do not
# count as the receiver being well again, every other action does.
RECEIVER_UNWELL = frozenset({Action.BACK_OFF_RECEIVER, Action.HOLD})


def action_for(verdict: Verdict, digest_retries: int, digest_mismatch_attempts: int) -> Action:
    """The action for an upload's verdict; a digest mismatch re-hashes only so often."""
    action = BY_VERDICT[verdict]
    if action is Action.REHASH and digest_retries >= digest_mismatch_attempts:
        return Action.FATAL_AFTER_REHASH
    return action


def receiver_answered(action: Action) -> bool:
    """Whether the answer behind this action shows a receiver that works (and takes our token)."""
    return action not in RECEIVER_UNWELL
