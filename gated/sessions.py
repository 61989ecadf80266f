"""The in-memory index that lanes decide from: sessions by code, with local events on top.

The index mirrors the SQLite cache and serves lookups without I/O. A lane that
starts or ends a session records the event here at once, so the next scan of
the same code finds the new state before the API has it. Such local events win
over what the API lists until the API has provably seen them: an event stays in
the overlay while it is pending, and after delivery until a listing requested
after the delivery has been applied. Without that second rule a listing fetched
just before the delivery would roll the session back and let the code open the
gate a second time.

Every method runs on the event loop and never awaits, so readers and writers
never see a half-updated index.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime

import anyio

from gated.api.models import Session, SessionState

_STATE_RANK = {SessionState.PENDING: 0, SessionState.ACTIVE: 1, SessionState.ENDED: 2}


@dataclass(slots=True)
class LocalEvent:
    event_id: str
    session_id: str
    kind: str  # "start" or "end"
    occurred_at: datetime
    # Monotonic time at which the API acknowledged the event, or None while pending.
    delivered_mono: float | None = None


def apply_event(session: Session, kind: str, occurred_at: datetime) -> Session:
    """Return the session as it is after a local start or end event."""
    if kind == "start":
        if session.start_time is not None:
            return session
        return replace(session, start_time=occurred_at)
    if session.end_time is not None:
        return session
    return replace(session, start_time=session.start_time or occurred_at, end_time=occurred_at)


class SessionIndex:
    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self._by_code: dict[str, Session] = {}
        self._overlay: dict[str, LocalEvent] = {}
        self._commit_lock: anyio.Lock | None = None
        # Monotonic and wall time of the last listing applied; None before the first.
        self.synced_mono: float | None = None
        self.synced_wall: datetime | None = None

    @property
    def commit_lock(self) -> anyio.Lock:
        """Lock held by a lane from reading a session's state to recording its event."""
        if self._commit_lock is None:
            self._commit_lock = anyio.Lock()
        return self._commit_lock

    def __len__(self) -> int:
        return len(self._by_id)

    def lookup(self, code: str) -> Session | None:
        """Return the session whose redemption code is exactly ``code``."""
        return self._by_code.get(code)

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def age_s(self, now_mono: float | None = None) -> float | None:
        """Seconds since the last applied listing, or None if there was none."""
        if self.synced_mono is None:
            return None
        return (time.monotonic() if now_mono is None else now_mono) - self.synced_mono

    def load(
        self,
        sessions: Iterable[Session],
        pending: Iterable[LocalEvent],
        *,
        synced_wall: datetime | None,
        age_s: float | None,
    ) -> None:
        """Fill the index at start from the SQLite cache and the undelivered journal."""
        self._overlay = {event.event_id: event for event in pending}
        self._rebuild(sessions)
        self.synced_wall = synced_wall
        self.synced_mono = None if age_s is None else time.monotonic() - max(age_s, 0.0)

    def replace(
        self, sessions: Iterable[Session], *, requested_mono: float, synced_wall: datetime
    ) -> None:
        """Replace the index with a full listing requested at ``requested_mono``."""
        self._drop_acknowledged(requested_mono)
        self._rebuild(sessions)
        self.synced_mono = requested_mono
        self.synced_wall = synced_wall

    def install(self, built: BuiltIndex, *, requested_mono: float, synced_wall: datetime) -> None:
        """Replace the index with tables from ``build_index``, then apply the overlay.

        The same result as ``replace``, but the expensive part ran elsewhere:
        here only the local events, usually a handful, are applied.
        """
        self._drop_acknowledged(requested_mono)
        self._by_id = built.by_id
        self._by_code = built.by_code
        for event in self._overlay.values():
            session = self._by_id.get(event.session_id)
            if session is not None:
                self._insert(apply_event(session, event.kind, event.occurred_at))
        self.synced_mono = requested_mono
        self.synced_wall = synced_wall

    def mark_synced(self, *, requested_mono: float, synced_wall: datetime) -> None:
        """Record a listing that reported no change (304 Not Modified)."""
        self.synced_mono = requested_mono
        self.synced_wall = synced_wall

    def record_local(self, event: LocalEvent) -> Session | None:
        """Apply a start or end that a lane has journaled; return the new session state."""
        self._overlay[event.event_id] = event
        session = self._by_id.get(event.session_id)
        if session is None:
            return None
        updated = apply_event(session, event.kind, event.occurred_at)
        self._insert(updated)
        return updated

    def mark_delivered(self, event_id: str) -> None:
        event = self._overlay.get(event_id)
        if event is not None:
            event.delivered_mono = time.monotonic()

    def drop_event(self, event_id: str) -> None:
        """Forget a local event the API will never accept (a poison event)."""
        self._overlay.pop(event_id, None)

    @property
    def overlay_size(self) -> int:
        return len(self._overlay)

    def _drop_acknowledged(self, requested_mono: float) -> None:
        """Forget local events delivered before a listing was requested: it shows them."""
        for event_id, event in list(self._overlay.items()):
            if event.delivered_mono is not None and event.delivered_mono < requested_mono:
                del self._overlay[event_id]

    def _rebuild(self, sessions: Iterable[Session]) -> None:
        self._by_id = {}
        self._by_code = {}
        by_session: dict[str, list[LocalEvent]] = {}
        for event in self._overlay.values():
            by_session.setdefault(event.session_id, []).append(event)
        for listed in sessions:
            current = listed
            for event in by_session.get(listed.id, ()):
                current = apply_event(current, event.kind, event.occurred_at)
            self._insert(current)

    def _insert(self, session: Session) -> None:
        _insert_into(self._by_id, self._by_code, session)


def _insert_into(by_id: dict[str, Session], by_code: dict[str, Session], session: Session) -> None:
    previous = by_id.get(session.id)
    if (
        previous is not None
        and previous.code
        and previous.code != session.code
        and by_code.get(previous.code) is previous
    ):
        del by_code[previous.code]
    by_id[session.id] = session
    if not session.code:
        return
    holder = by_code.get(session.code)
    # A code can come back on a new session once the old one ended: the
    # session that can still change (pending or active) owns the code.
    if holder is None or holder.id == session.id or _prefer(session, holder):
        by_code[session.code] = session


@dataclass(frozen=True, slots=True)
class BuiltIndex:
    """Lookup tables built from a listing away from the event loop, before the overlay."""

    by_id: dict[str, Session]
    by_code: dict[str, Session]


def build_index(sessions: Iterable[Session]) -> BuiltIndex:
    """Build the lookup tables of a listing; safe to run in a worker thread."""
    by_id: dict[str, Session] = {}
    by_code: dict[str, Session] = {}
    for session in sessions:
        _insert_into(by_id, by_code, session)
    return BuiltIndex(by_id, by_code)


def _prefer(candidate: Session, holder: Session) -> bool:
    candidate_open = candidate.state is not SessionState.ENDED
    holder_open = holder.state is not SessionState.ENDED
    if candidate_open != holder_open:
        return candidate_open
    return _STATE_RANK[candidate.state] <= _STATE_RANK[holder.state]
