from __future__ import annotations

import time
from datetime import UTC, datetime

from gated.api.models import Session, SessionState
from gated.sessions import LocalEvent, SessionIndex

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def pending(session_id: str, code: str) -> Session:
    return Session(session_id, "user", None, None, code, "barcode")


def active(session_id: str, code: str) -> Session:
    return Session(session_id, "user", NOW, None, code, "barcode")


def ended(session_id: str, code: str) -> Session:
    return Session(session_id, "user", NOW, NOW, code, "barcode")


def test_lookup_by_code() -> None:
    index = SessionIndex()
    index.replace([pending("1", "AAAA1111")], requested_mono=time.monotonic(), synced_wall=NOW)
    found = index.lookup("AAAA1111")
    assert found is not None
    assert found.id == "1"
    assert index.lookup("aaaa1111") is None
    assert index.lookup("BBBB") is None


def test_local_start_survives_older_listing() -> None:
    index = SessionIndex()
    index.replace([pending("1", "AAAA1111")], requested_mono=time.monotonic(), synced_wall=NOW)
    index.record_local(LocalEvent("e1", "1", "start", NOW))
    assert index.lookup("AAAA1111").state is SessionState.ACTIVE  # type: ignore[union-attr]

    # The API has not received the start yet, so the listing still shows it pending.
    index.replace([pending("1", "AAAA1111")], requested_mono=time.monotonic(), synced_wall=NOW)
    assert index.lookup("AAAA1111").state is SessionState.ACTIVE  # type: ignore[union-attr]


def test_delivered_event_kept_until_newer_listing() -> None:
    index = SessionIndex()
    index.replace([pending("1", "AAAA1111")], requested_mono=time.monotonic(), synced_wall=NOW)
    requested_before_delivery = time.monotonic()
    index.record_local(LocalEvent("e1", "1", "start", NOW))
    index.mark_delivered("e1")

    # A listing requested before the delivery may not show it yet.
    index.replace(
        [pending("1", "AAAA1111")], requested_mono=requested_before_delivery, synced_wall=NOW
    )
    assert index.lookup("AAAA1111").state is SessionState.ACTIVE  # type: ignore[union-attr]
    assert index.overlay_size == 1

    # A listing requested after the delivery is the truth, and the overlay is dropped.
    index.replace([active("1", "AAAA1111")], requested_mono=time.monotonic(), synced_wall=NOW)
    assert index.overlay_size == 0
    assert index.lookup("AAAA1111").state is SessionState.ACTIVE  # type: ignore[union-attr]


def test_poison_event_dropped() -> None:
    index = SessionIndex()
    index.replace([pending("1", "AAAA1111")], requested_mono=time.monotonic(), synced_wall=NOW)
    index.record_local(LocalEvent("e1", "1", "start", NOW))
    index.drop_event("e1")
    index.replace([pending("1", "AAAA1111")], requested_mono=time.monotonic(), synced_wall=NOW)
    assert index.lookup("AAAA1111").state is SessionState.PENDING  # type: ignore[union-attr]


def test_reused_code_goes_to_open_session() -> None:
    index = SessionIndex()
    sessions = [ended("1", "CODE1234"), pending("2", "CODE1234")]
    index.replace(sessions, requested_mono=time.monotonic(), synced_wall=NOW)
    assert index.lookup("CODE1234").id == "2"  # type: ignore[union-attr]
    index.replace(list(reversed(sessions)), requested_mono=time.monotonic(), synced_wall=NOW)
    assert index.lookup("CODE1234").id == "2"  # type: ignore[union-attr]


def test_end_event_on_pending_session_sets_both_times() -> None:
    index = SessionIndex()
    index.replace([active("1", "AAAA1111")], requested_mono=time.monotonic(), synced_wall=NOW)
    updated = index.record_local(LocalEvent("e1", "1", "end", NOW))
    assert updated is not None
    assert updated.state is SessionState.ENDED


def test_load_restores_overlay_and_age() -> None:
    index = SessionIndex()
    index.load(
        [pending("1", "AAAA1111")],
        [LocalEvent("e1", "1", "start", NOW)],
        synced_wall=NOW,
        age_s=120.0,
    )
    assert index.lookup("AAAA1111").state is SessionState.ACTIVE  # type: ignore[union-attr]
    age = index.age_s()
    assert age is not None
    assert 119.0 < age < 180.0


def test_age_unknown_before_first_sync() -> None:
    assert SessionIndex().age_s() is None


def test_install_matches_replace() -> None:
    from gated.sessions import build_index

    listing = [pending("1", "AAAA1111"), ended("2", "CODE1234"), pending("3", "CODE1234")]
    replaced = SessionIndex()
    installed = SessionIndex()
    for index in (replaced, installed):
        index.replace(listing, requested_mono=time.monotonic(), synced_wall=NOW)
        index.record_local(LocalEvent("e1", "1", "start", NOW))

    requested = time.monotonic()
    replaced.replace(listing, requested_mono=requested, synced_wall=NOW)
    installed.install(build_index(listing), requested_mono=requested, synced_wall=NOW)

    for code in ("AAAA1111", "CODE1234"):
        assert replaced.lookup(code) == installed.lookup(code)
    assert installed.lookup("AAAA1111").state is SessionState.ACTIVE  # type: ignore[union-attr]
    assert installed.lookup("CODE1234").id == "3"  # type: ignore[union-attr]
