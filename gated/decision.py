"""The gate rule: what happens when a code is scanned at a lane. Pure, no I/O.

Every scan ends in exactly one ``Outcome``. The lane module supplies the facts
(the session the code belongs to, whether the scan repeats a recent one, the
cache's age, the relay's health) and acts on the ``Decision``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from gated.api.models import SessionState


class Direction(enum.StrEnum):
    ENTRY = "entry"
    EXIT = "exit"


class Outcome(enum.StrEnum):
    # The gate opens.
    STARTED = "started"  # entry lane: a pending session was started
    ENDED = "ended"  # exit lane: an active session was ended
    PASSBACK_VIOLATION = "passback_violation"  # soft anti-passback: opened, logged
    # The gate stays shut.
    UNKNOWN_CODE = "unknown_code"  # no session has this code, even after a lookup
    ALREADY_ACTIVE = "already_active"  # entry lane: the session already started
    NOT_STARTED = "not_started"  # exit lane: the session never started
    ALREADY_ENDED = "already_ended"
    DUPLICATE_SCAN = "duplicate_scan"  # same code, same lane, within debounce_s
    API_UNAVAILABLE = "api_unavailable"  # cache miss and the lookup failed or timed out
    CACHE_STALE = "cache_stale"  # offline_policy "deny" and the cache is too old
    INVALID_CODE = "invalid_code"  # fails the lane's pattern or has control bytes
    INCOMPLETE_CODE = "incomplete_code"  # a partial code timed out with no terminator
    TOO_LONG = "too_long"  # a line longer than max_length
    RELAY_UNAVAILABLE = "relay_unavailable"  # would open, but the relay is missing
    JOURNAL_FAILED = "journal_failed"  # would open, but the event could not be made durable
    INTERNAL_ERROR = "internal_error"  # an unexpected error; the gate stays shut

    @property
    def opens(self) -> bool:
        return self in _OPENING


_OPENING = frozenset({Outcome.STARTED, Outcome.ENDED, Outcome.PASSBACK_VIOLATION})

EventKind = Literal["start", "end"]


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    # The journal event to write before the relay pulses, if any.
    event: EventKind | None = None

    @property
    def opens(self) -> bool:
        return self.outcome.opens


def decide(
    direction: Direction,
    state: SessionState | None,
    *,
    passback: Literal["hard", "soft"] = "hard",
) -> Decision:
    """Decide a scan of a known-valid, non-duplicate code from the session's state.

    ``state`` is None when no session has the code. Anti-passback: an entry
    lane rejects an active session and an exit lane a pending one. With
    ``passback="soft"`` both open without touching the session, and the
    outcome ``passback_violation`` records it.
    """
    if state is None:
        return Decision(Outcome.UNKNOWN_CODE)
    if state is SessionState.ENDED:
        return Decision(Outcome.ALREADY_ENDED)
    if direction is Direction.ENTRY:
        if state is SessionState.PENDING:
            return Decision(Outcome.STARTED, event="start")
        violation = Outcome.ALREADY_ACTIVE
    else:
        if state is SessionState.ACTIVE:
            return Decision(Outcome.ENDED, event="end")
        violation = Outcome.NOT_STARTED
    if passback == "soft":
        return Decision(Outcome.PASSBACK_VIOLATION)
    return Decision(violation)
