from __future__ import annotations

from datetime import UTC, datetime

from gated.api.models import Session
from gated.reconcile import diff_sessions

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def session(session_id: str, start: datetime | None = None) -> Session:
    return Session(session_id, "user", start, None, f"CODE{session_id}", "barcode")


def test_diff_unchanged_is_empty() -> None:
    listing = [session("1"), session("2")]
    upserts, deleted = diff_sessions({s.id: s for s in listing}, listing)
    assert upserts == []
    assert deleted == []


def test_diff_finds_new_changed_and_gone() -> None:
    previous = {s.id: s for s in [session("1"), session("2"), session("3")]}
    listing = [session("1", NOW), session("2"), session("4")]
    upserts, deleted = diff_sessions(previous, listing)
    assert [s.id for s in upserts] == ["1", "4"]
    assert deleted == ["3"]
