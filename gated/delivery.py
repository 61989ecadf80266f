"""Deliver journaled gate events to the API, at least once, in order per session.

Outcomes of one delivery attempt:

- 2xx, or 409 whose body shows the requested state: delivered. A 409 without
  a readable body is settled by reading the session.
- 401/403: the access key is wrong. Nothing is delivered until it is fixed,
  so every event waits and the loop backs off to the maximum.
- 429: wait at least ``Retry-After``.
- 404: poison only when reading the session returns 404 too and the
  location's listing still works; otherwise retried.
- 408, 421, 425 (what an unwell proxy returns): retried.
- another 4xx (400, 422, a 409 showing another state): the API will never
  take the event. It is set aside as poison (kept in the journal for
  inspection, logged at ERROR) and does not block the events behind it.
- 5xx, timeouts, dropped connections, unparseable responses: retried with capped
  exponential backoff and jitter. A later event of the same session waits
  behind it, so a start is never overtaken by its end.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskStatus

from gated.api.client import CoordClient
from gated.api.models import Session, SessionState
from gated.backoff import Backoff
from gated.errors import (
    ApiAuthError,
    ApiConflictError,
    ApiError,
    ApiNotFoundError,
    ApiRateLimitedError,
    ApiRejectedError,
    StateError,
)
from gated.health import ApiHealth
from gated.logs import get_logger
from gated.sessions import SessionIndex
from gated.state import AsyncStore, GateEvent

log = get_logger("journal")

# Events fetched from the journal per round; more wait for the next round.
BATCH_SIZE = 100
# How often an idle delivery loop checks for pending events it was not woken for
# (requeued by another process), in seconds.
IDLE_RECHECK_S = 30.0
# Passing failures after which a round stops and backs off.
MAX_TRANSIENT_FAILURES = 3
# Client errors that a proxy or load balancer returns while it is unwell
# (408 Request Timeout, 421 Misdirected Request, 425 Too Early): retried.
PASSING_CLIENT_ERRORS = frozenset({408, 421, 425})


def _shows_requested_state(event: GateEvent, session: Session | None) -> bool:
    if session is None:
        return False
    if event.kind == "start":
        return session.state in (SessionState.ACTIVE, SessionState.ENDED)
    return session.state is SessionState.ENDED


class _Retry(Exception):
    """The attempt failed for a reason that passes: wait ``delay_s`` and try again."""

    def __init__(self, delay_s: float | None) -> None:
        self.delay_s = delay_s


class Delivery:
    def __init__(
        self,
        *,
        client: CoordClient,
        store: AsyncStore,
        index: SessionIndex,
        health: ApiHealth,
        max_backoff_s: float,
    ) -> None:
        self._client = client
        self._store = store
        self._index = index
        self._health = health
        self._backoff = Backoff(initial_s=0.5, max_s=max_backoff_s)
        self._wake = anyio.Event()
        self.delivered = 0
        self.poisoned = 0

    def notify(self) -> None:
        """Wake the loop: a new event was journaled."""
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = anyio.Event()
            try:
                delay = await self.deliver_due()
            except StateError as exc:
                # The journal could not be read or updated (disk full, I/O
                # error). Events stay pending and are sent again, which the
                # 409 rule makes safe, so the lanes keep running meanwhile.
                delay = self._backoff.next_delay()
                log.error("journal.store_failed", error=str(exc), retry_in_s=round(delay, 2))
            if delay is None:
                # Also look again now and then, for events requeued by
                # `gated journal --requeue` from another process.
                with anyio.move_on_after(IDLE_RECHECK_S):
                    await self._wake.wait()
            else:
                # New events do not cut a backoff short: the API is still unwell.
                log.debug("journal.retry_wait", wait_s=round(delay, 2))
                await anyio.sleep(delay)

    async def deliver_due(self) -> float | None:
        """Send every pending event once; return the wait before the next round, or None.

        A round stops early after ``MAX_TRANSIENT_FAILURES`` passing failures,
        because an API that times out would otherwise hold every event of the
        batch for a whole request deadline each.
        """
        events = await self._store.pending_events(limit=BATCH_SIZE)
        blocked: set[str] = set()
        transient_failures = 0
        fixed_delay: float | None = None
        for event in events:
            if event.session_id in blocked:
                continue
            try:
                await self._deliver(event)
            except _Retry as retry:
                blocked.add(event.session_id)
                if retry.delay_s is not None:
                    # Rate limits and auth failures hold for every event.
                    fixed_delay = retry.delay_s
                    break
                transient_failures += 1
                if transient_failures >= MAX_TRANSIENT_FAILURES:
                    break
        if fixed_delay is not None:
            return fixed_delay
        if transient_failures:
            return self._backoff.next_delay()
        self._backoff.reset()
        if len(events) == BATCH_SIZE:
            return 0.0
        return None

    async def _deliver(self, event: GateEvent) -> None:
        started = time.monotonic()
        try:
            await self._send(event)
        except ApiConflictError as exc:
            await self._settle_conflict(event, exc.session, started)
            return
        except ApiNotFoundError as exc:
            await self._settle_not_found(event, str(exc), started)
            return
        except ApiRejectedError as exc:
            if exc.status in PASSING_CLIENT_ERRORS:
                await self._failed(event, str(exc))
                raise _Retry(None) from None
            self._health.record_success()
            await self._poison(event, str(exc))
            return
        except ApiAuthError as exc:
            self._health.record_failure(str(exc), auth=True)
            await self._failed(event, str(exc))
            log.error("journal.auth_failed", event_id=event.event_id, session_id=event.session_id)
            raise _Retry(self._backoff.max_s) from None
        except ApiRateLimitedError as exc:
            await self._failed(event, str(exc))
            raise _Retry(max(exc.retry_after_s or 0.0, self._backoff.next_delay())) from None
        except ApiError as exc:
            self._health.record_failure(str(exc))
            await self._failed(event, str(exc))
            raise _Retry(None) from None
        await self._delivered(event, started, conflict=False)

    async def _settle_conflict(
        self, event: GateEvent, session: Session | None, started: float
    ) -> None:
        """Decide a 409: delivered if the session is in the requested state, else poison.

        A 409 whose body could not be parsed (a proxy's page, a lost body) is
        checked with a fresh read of the session before anything is decided.
        """
        if session is None:
            session = await self._read_session(event)
        if _shows_requested_state(event, session):
            await self._delivered(event, started, conflict=True)
            return
        assert session is not None
        await self._poison(event, f"409 conflict: session is {session.state.value}")

    async def _settle_not_found(self, event: GateEvent, error: str, started: float) -> None:
        """Decide a 404: poison only when a read of the session confirms it is unknown.

        A 404 can also come from a proxy being redeployed or a wrong base URL.
        Both pass or get fixed, so poisoning every event then would lose them.
        """
        try:
            session = await self._client.get_session(event.session_id)
        except ApiNotFoundError:
            if self._health.location_missing:
                await self._failed(event, error)
                raise _Retry(self._backoff.max_s) from None
            self._health.record_success()
            await self._poison(event, f"{error}; the session is not found")
            return
        except ApiError as exc:
            await self._failed(event, str(exc))
            raise _Retry(None) from None
        if _shows_requested_state(event, session):
            await self._delivered(event, started, conflict=True)
            return
        await self._failed(event, f"{error}; the session exists, so the request is retried")
        raise _Retry(None)

    async def _read_session(self, event: GateEvent) -> Session:
        try:
            return await self._client.get_session(event.session_id)
        except ApiError as exc:
            await self._failed(event, f"409 without a readable body; reading it failed: {exc}")
            raise _Retry(None) from None

    async def _send(self, event: GateEvent) -> Session:
        if event.kind == "start":
            return await self._client.start_session(
                event.session_id, start_time=event.occurred_at, lane=event.lane
            )
        return await self._client.end_session(
            event.session_id, end_time=event.occurred_at, lane=event.lane
        )

    async def _delivered(self, event: GateEvent, started: float, *, conflict: bool) -> None:
        self._health.record_success()
        await self._store.mark_delivered(event.event_id, delivered_at=datetime.now(UTC))
        # The session the API returned is not written to the index: a listing
        # requested later may already be newer, and the overlay covers the gap.
        self._index.mark_delivered(event.event_id)
        self.delivered += 1
        log.info(
            "journal.delivered",
            event_id=event.event_id,
            session_id=event.session_id,
            lane=event.lane,
            kind=event.kind,
            attempts=event.attempts + 1,
            conflict=conflict,
            lag_s=round((datetime.now(UTC) - event.occurred_at).total_seconds(), 3),
            elapsed_ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _poison(self, event: GateEvent, reason: str) -> None:
        await self._store.mark_poison(event.event_id, reason=reason)
        self._index.drop_event(event.event_id)
        self.poisoned += 1
        log.error(
            "journal.poison",
            event_id=event.event_id,
            session_id=event.session_id,
            lane=event.lane,
            kind=event.kind,
            reason=reason,
            poison_total=self.poisoned,
        )

    async def _failed(self, event: GateEvent, error: str) -> None:
        try:
            await self._store.record_failure(event.event_id, error=error)
        except StateError as exc:
            log.error("journal.store_failed", event_id=event.event_id, error=str(exc))
        log.debug(
            "journal.delivery_failed",
            event_id=event.event_id,
            session_id=event.session_id,
            attempts=event.attempts + 1,
            error=error,
        )
