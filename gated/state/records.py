"""Records the store returns, and their conversion to and from SQLite rows.

Timestamps are stored as ISO 8601 UTC text with microseconds and a ``Z``
(``2018-04-12T00:14:20.292000Z``). That text sorts in time order and converts
back to the same aware datetime.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from gated.api.models import Session

EventKind = Literal["start", "end"]
EventStatus = Literal["pending", "delivered", "poison"]

EVENT_KINDS: Final = ("start", "end")
EVENT_STATUSES: Final = ("pending", "delivered", "poison")

# Column lists shared by the store and the recovery code, in the order the
# row converters below expect.
EVENT_COLUMNS: Final = (
    "event_id, seq, session_id, lane, kind, occurred_at, code_masked,"
    " status, attempts, last_error, delivered_at"
)
SESSION_COLUMNS: Final = "id, user_id, start_time, end_time, code, code_type"


@dataclass(frozen=True, slots=True)
class GateEvent:
    """One start or end a lane performed, as journaled before the relay pulsed."""

    event_id: str
    seq: int
    session_id: str
    lane: str
    kind: EventKind
    occurred_at: datetime
    code_masked: str | None
    status: EventStatus
    attempts: int
    last_error: str | None
    delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class SyncMeta:
    """State of the session cache: when it was last confirmed, and the HTTP validators."""

    synced_at: datetime | None
    etag: str | None
    last_modified: str | None


@dataclass(frozen=True, slots=True)
class Backlog:
    """Journal events not yet delivered to the API."""

    pending: int
    oldest_pending_at: datetime | None
    poison: int


def format_utc(moment: datetime) -> str:
    """Format an aware datetime as stored text; raise ValueError for a naive one."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamp {moment.isoformat()} has no time zone; pass an aware datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(text: str) -> datetime:
    """Parse stored timestamp text; raise ValueError when it is not one."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"stored timestamp {text!r} has no time zone")
    return moment.astimezone(UTC)


def _optional_utc(text: str | None) -> datetime | None:
    return None if text is None else parse_utc(text)


def session_to_row(session: Session) -> tuple[Any, ...]:
    """Convert a session to the parameters of SESSION_COLUMNS."""
    return (
        session.id,
        session.user_id,
        None if session.start_time is None else format_utc(session.start_time),
        None if session.end_time is None else format_utc(session.end_time),
        session.code,
        session.code_type,
    )


def session_from_row(row: sqlite3.Row | tuple[Any, ...]) -> Session:
    """Build a Session from a row selected with SESSION_COLUMNS."""
    session_id, user_id, start_time, end_time, code, code_type = row
    return Session(
        id=session_id,
        user_id=user_id,
        start_time=_optional_utc(start_time),
        end_time=_optional_utc(end_time),
        code=code,
        code_type=code_type,
    )


def event_from_row(row: sqlite3.Row | tuple[Any, ...]) -> GateEvent:
    """Build a GateEvent from a row selected with EVENT_COLUMNS.

    Raises ValueError when a field has the wrong type or value, which only a
    damaged file produces because the schema's CHECK constraints reject such rows.
    """
    (
        event_id,
        seq,
        session_id,
        lane,
        kind,
        occurred_at,
        code_masked,
        status,
        attempts,
        last_error,
        delivered_at,
    ) = row
    _require(isinstance(event_id, str) and len(event_id) == 32, "event_id", event_id)
    _require(isinstance(seq, int) and seq > 0, "seq", seq)
    _require(isinstance(session_id, str) and session_id != "", "session_id", session_id)
    _require(isinstance(lane, str) and lane != "", "lane", lane)
    _require(kind in EVENT_KINDS, "kind", kind)
    _require(isinstance(occurred_at, str), "occurred_at", occurred_at)
    _require(code_masked is None or isinstance(code_masked, str), "code_masked", code_masked)
    _require(status in EVENT_STATUSES, "status", status)
    _require(isinstance(attempts, int) and attempts >= 0, "attempts", attempts)
    _require(last_error is None or isinstance(last_error, str), "last_error", last_error)
    _require(delivered_at is None or isinstance(delivered_at, str), "delivered_at", delivered_at)
    return GateEvent(
        event_id=event_id,
        seq=seq,
        session_id=session_id,
        lane=lane,
        kind=kind,
        occurred_at=parse_utc(occurred_at),
        code_masked=code_masked,
        status=status,
        attempts=attempts,
        last_error=last_error,
        delivered_at=_optional_utc(delivered_at),
    )


def event_to_row(event: GateEvent) -> tuple[Any, ...]:
    """Convert an event to the parameters of EVENT_COLUMNS."""
    return (
        event.event_id,
        event.seq,
        event.session_id,
        event.lane,
        event.kind,
        format_utc(event.occurred_at),
        event.code_masked,
        event.status,
        event.attempts,
        event.last_error,
        None if event.delivered_at is None else format_utc(event.delivered_at),
    )


def _require(condition: bool, field: str, value: object) -> None:
    if not condition:
        raise ValueError(f"journal row has an invalid {field}: {value!r:.60}")
