"""Delivery decisions with a scripted client and store: one piece, fakes only."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from gated.api.models import Session
from gated.delivery import Delivery
from gated.errors import ApiConflictError, ApiNotFoundError, ApiRejectedError, StateError
from gated.health import ApiHealth
from gated.sessions import SessionIndex
from gated.state import GateEvent

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def event(session_id: str = "1", kind: str = "start") -> GateEvent:
    return GateEvent(
        event_id=f"e-{session_id}-{kind}",
        seq=1,
        session_id=session_id,
        lane="entry-1",
        kind=kind,  # type: ignore[arg-type]
        occurred_at=NOW,
        code_masked="****1234",
        status="pending",
        attempts=0,
        last_error=None,
        delivered_at=None,
    )


def active(session_id: str = "1") -> Session:
    return Session(session_id, "u", NOW, None, "CODE1234", "barcode")


def pending(session_id: str = "1") -> Session:
    return Session(session_id, "u", None, None, "CODE1234", "barcode")


@dataclass
class FakeStore:
    events: list[GateEvent]
    delivered: list[str] = field(default_factory=list)
    poisoned: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    fail_marking: int = 0

    async def pending_events(self, limit: int = 100) -> list[GateEvent]:
        done = set(self.delivered) | set(self.poisoned)
        return [e for e in self.events if e.event_id not in done][:limit]

    async def mark_delivered(self, event_id: str, *, delivered_at: datetime) -> None:
        if self.fail_marking:
            self.fail_marking -= 1
            raise StateError("database or disk is full")
        self.delivered.append(event_id)

    async def mark_poison(self, event_id: str, *, reason: str) -> None:
        self.poisoned.append(event_id)

    async def record_failure(self, event_id: str, *, error: str) -> None:
        self.failures.append(error)


@dataclass
class FakeClient:
    start_error: Exception | None = None
    get_result: Session | Exception | None = None
    starts: int = 0

    async def start_session(self, session_id: str, **_: Any) -> Session:
        self.starts += 1
        if self.start_error is not None:
            raise self.start_error
        return active(session_id)

    async def get_session(self, session_id: str, **_: Any) -> Session:
        if isinstance(self.get_result, Exception):
            raise self.get_result
        assert self.get_result is not None
        return self.get_result


def delivery(client: FakeClient, store: FakeStore) -> Delivery:
    return Delivery(
        client=client,  # type: ignore[arg-type]
        store=store,  # type: ignore[arg-type]
        index=SessionIndex(),
        health=ApiHealth(),
        max_backoff_s=1.0,
    )


@pytest.mark.anyio
async def test_conflict_without_body_checked_by_read() -> None:
    store = FakeStore([event()])
    client = FakeClient(start_error=ApiConflictError("409", None), get_result=active())
    assert await delivery(client, store).deliver_due() is None
    assert store.delivered == ["e-1-start"]
    assert store.poisoned == []


@pytest.mark.anyio
async def test_conflict_decided_by_session_state() -> None:
    ended = Session("1", "u", NOW, NOW, "CODE1234", "barcode")
    store = FakeStore([event(kind="start")])
    client = FakeClient(start_error=ApiConflictError("409", ended))
    # A start that meets an ended session is delivered: the session did start.
    await delivery(client, store).deliver_due()
    assert store.delivered == ["e-1-start"]

    store = FakeStore([event(kind="start")])
    client = FakeClient(start_error=ApiConflictError("409", None), get_result=pending())
    await delivery(client, store).deliver_due()
    assert store.poisoned == ["e-1-start"]


@pytest.mark.anyio
async def test_not_found_confirmed_is_poison() -> None:
    store = FakeStore([event()])
    client = FakeClient(
        start_error=ApiNotFoundError("404"), get_result=ApiNotFoundError("404 again")
    )
    await delivery(client, store).deliver_due()
    assert store.poisoned == ["e-1-start"]


@pytest.mark.anyio
async def test_not_found_but_session_exists_is_retried() -> None:
    store = FakeStore([event()])
    client = FakeClient(start_error=ApiNotFoundError("404 from a proxy"), get_result=pending())
    delay = await delivery(client, store).deliver_due()
    assert delay is not None
    assert store.poisoned == []
    assert store.delivered == []


@pytest.mark.anyio
async def test_not_found_while_location_missing_is_retried() -> None:
    store = FakeStore([event()])
    client = FakeClient(start_error=ApiNotFoundError("404"), get_result=ApiNotFoundError("404"))
    subject = delivery(client, store)
    subject._health.location_missing = True
    assert await subject.deliver_due() is not None
    assert store.poisoned == []


@pytest.mark.anyio
async def test_request_timeout_status_is_retried() -> None:
    store = FakeStore([event()])
    client = FakeClient(start_error=ApiRejectedError("408", status=408))
    assert await delivery(client, store).deliver_due() is not None
    assert store.poisoned == []
    client.start_error = ApiRejectedError("400", status=400)
    await delivery(client, store).deliver_due()
    assert store.poisoned == ["e-1-start"]


@pytest.mark.anyio
async def test_round_stops_after_three_transient_failures() -> None:
    from gated.errors import ApiUnavailableError

    store = FakeStore([event(str(i)) for i in range(10)])
    client = FakeClient(start_error=ApiUnavailableError("timed out"))
    assert await delivery(client, store).deliver_due() is not None
    assert client.starts == 3


@pytest.mark.anyio
async def test_store_error_does_not_stop_delivery() -> None:
    store = FakeStore([event()], fail_marking=1)
    client = FakeClient()
    subject = delivery(client, store)
    with anyio.move_on_after(5.0):
        async with anyio.create_task_group() as tg:
            await tg.start(subject.run)
            while not store.delivered:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert store.delivered == ["e-1-start"]
    assert client.starts == 2
