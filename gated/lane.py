"""One lane: scanner codes in, decisions out, the relay pulsed when the gate opens.

The order of a scan that opens the gate is fixed, because it is what makes the
gate safe across crashes and power cuts:

1. decide from local state (no network call when the code is in the cache);
2. write the journal event and wait until it is durable;
3. record the event in the in-memory index and wake the delivery loop;
4. log the decision and pulse the relay.

A crash before step 2 leaves no trace and the gate shut. A crash after it
leaves a journaled event that the next start delivers, whether or not the
relay pulsed.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Literal

import anyio
from anyio.abc import TaskStatus

from gated.config import GateSettings, LaneSettings
from gated.decision import Decision, Direction, Outcome, decide
from gated.delivery import Delivery
from gated.devices.framing import Rejected, ScanEvent
from gated.devices.relay import Relay
from gated.devices.scanner import Scanner
from gated.errors import DeviceError, StateError
from gated.logs import get_logger, mask_code
from gated.observe import DecisionRecord, Observer, round_ms
from gated.reconcile import Reconciler
from gated.sessions import LocalEvent, SessionIndex
from gated.state import AsyncStore

# Scans waiting for a decision; a scanner that sends faster than the lane
# decides waits on the serial buffer, which the kernel bounds.
SCAN_QUEUE = 16
# Time allowed beyond pulse_ms for the relay's on and off commands, in seconds;
# it bounds how long a stop waits for a pulse in progress.
PULSE_GRACE_S = 2.0

# Refusals caused by the gate, not by the code. A re-scan right after one of
# them is decided again instead of being ignored as a duplicate.
_RETRYABLE = frozenset(
    {
        Outcome.API_UNAVAILABLE,
        Outcome.CACHE_STALE,
        Outcome.RELAY_UNAVAILABLE,
        Outcome.JOURNAL_FAILED,
        Outcome.INTERNAL_ERROR,
    }
)


class Lane:
    def __init__(
        self,
        settings: LaneSettings,
        gate: GateSettings,
        *,
        scanner: Scanner,
        relay: Relay,
        index: SessionIndex,
        store: AsyncStore,
        reconciler: Reconciler,
        delivery: Delivery,
        observer: Observer,
        lookup_timeout_s: float,
    ) -> None:
        self.name = settings.name
        self.direction = Direction(settings.direction)
        self.passback: Literal["hard", "soft"] = settings.passback or gate.passback
        self.debounce_s = gate.debounce_s
        self.scanner = scanner
        self.relay = relay
        self._index = index
        self._store = store
        self._reconciler = reconciler
        self._delivery = delivery
        self._observer = observer
        self._lookup_timeout_s = lookup_timeout_s
        self._pulse_deadline_s = settings.relay.pulse_ms / 1000 + PULSE_GRACE_S
        self._recent_codes: dict[str, float] = {}
        self._log = get_logger("lane", lane=self.name, direction=self.direction.value)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[ScanEvent](SCAN_QUEUE)
        async with send, receive, anyio.create_task_group() as tg:
            await tg.start(self.scanner.run, send)
            task_status.started()
            async for scan in receive:
                await self.handle(scan)

    async def handle(self, scan: ScanEvent) -> DecisionRecord:
        """Decide one scan, journal and open as needed; return the logged decision."""
        started = time.monotonic()
        if isinstance(scan, Rejected):
            return self._publish(Decision(Outcome(scan.reason)), None, None, started)
        code = scan.text
        session_id: str | None = None
        try:
            decision, session_id = await self._decide(code, started)
        except Exception:  # noqa: BLE001 - one bad scan must not stop the lane
            # NOTE: an unexpected error ends this decision only; the gate stays
            # shut and the lane goes on with the next scan.
            self._log.exception("lane.internal_error", code=mask_code(code))
            decision = Decision(Outcome.INTERNAL_ERROR)
        if decision.outcome not in _RETRYABLE:
            self._recent_codes[code] = time.monotonic()
        record = self._publish(decision, session_id, code, started)
        if decision.opens:
            await self._pulse(record)
        return record

    async def _decide(self, code: str, started: float) -> tuple[Decision, str | None]:
        if self._is_duplicate(code, started):
            return Decision(Outcome.DUPLICATE_SCAN), None
        if self._reconciler.cache_is_stale():
            return Decision(Outcome.CACHE_STALE), None

        session = self._index.lookup(code)
        if session is None:
            answered = await self._reconciler.lookup(timeout_s=self._lookup_timeout_s)
            if not answered:
                return Decision(Outcome.API_UNAVAILABLE), None
            session = self._index.lookup(code)
        if session is None:
            return Decision(Outcome.UNKNOWN_CODE), None

        # Invariant: a session's state is read, journaled and updated in the
        # index under the lock shared by every lane, so two lanes scanning the
        # same code at once cannot both start (or both end) the session.
        async with self._index.commit_lock:
            current = self._index.get(session.id) or session
            decision = decide(self.direction, current.state, passback=self.passback)
            if decision.opens and not self.relay.available:
                return Decision(Outcome.RELAY_UNAVAILABLE), session.id
            if decision.event is None:
                return decision, session.id
            # Shielded: once the commit starts, a stop waits for it and for
            # the index update, so a durable event is never missing from the
            # index the next scan reads.
            with anyio.CancelScope(shield=True):
                journaled = await self._journal(decision, session.id, code)
            return journaled  # noqa: RET504 - a return inside the shield would hide it from mypy

    async def _journal(
        self, decision: Decision, session_id: str, code: str
    ) -> tuple[Decision, str | None]:
        assert decision.event is not None
        occurred_at = datetime.now(UTC)
        try:
            event = await self._store.append_event(
                session_id=session_id,
                lane=self.name,
                kind=decision.event,
                occurred_at=occurred_at,
                code_masked=mask_code(code),
            )
        except StateError as exc:
            self._log.error("lane.journal_failed", session_id=session_id, error=str(exc))
            return Decision(Outcome.JOURNAL_FAILED), session_id
        self._index.record_local(
            LocalEvent(event.event_id, session_id, decision.event, occurred_at)
        )
        self._delivery.notify()
        return decision, session_id

    def _is_duplicate(self, code: str, now: float) -> bool:
        horizon = now - self.debounce_s
        for seen_code, seen_at in list(self._recent_codes.items()):
            if seen_at < horizon:
                del self._recent_codes[seen_code]
        return code in self._recent_codes

    def _publish(
        self, decision: Decision, session_id: str | None, code: str | None, started: float
    ) -> DecisionRecord:
        elapsed = time.monotonic() - started
        record = DecisionRecord(
            at=datetime.now(UTC),
            lane=self.name,
            direction=self.direction.value,
            outcome=decision.outcome.value,
            opens=decision.opens,
            session_id=session_id,
            code=mask_code(code),
            elapsed_ms=round_ms(elapsed),
        )
        level = "warning" if decision.outcome is Outcome.PASSBACK_VIOLATION else "info"
        getattr(self._log, level)(
            "lane.decision",
            outcome=record.outcome,
            opens=record.opens,
            session_id=session_id,
            code=record.code,
            elapsed_ms=record.elapsed_ms,
        )
        self._observer.publish(record)
        return record

    async def _pulse(self, record: DecisionRecord) -> None:
        # Shielded with a deadline: a stop that arrives after the event was
        # journaled still lets the car through, instead of leaving a started
        # session with the barrier shut.
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._pulse_deadline_s):
                await self.relay.pulse()
        except DeviceError as exc:
            self._log.error(
                "relay.failed", session_id=record.session_id, outcome=record.outcome, error=str(exc)
            )
