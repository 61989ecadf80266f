"""Tests of the durable state store, on SQLite files on disk."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from gated.api.models import Session
from gated.errors import StateError
from gated.state import DB_NAME, AsyncStore, GateEvent, Store, recovery
from gated.state.schema import SCHEMA_VERSION, Migration, migrate

T0 = datetime(2026, 3, 14, 9, 26, 53, 589793, tzinfo=UTC)


def make_session(number: int, **changes: Any) -> Session:
    fields: dict[str, Any] = {
        "id": str(number),
        "user_id": f"user-{number}",
        "start_time": None,
        "end_time": None,
        "code": f"CODE{number:06d}",
        "code_type": "barcode",
    }
    fields.update(changes)
    return Session(**fields)


def append(store: Store, number: int, **changes: Any) -> GateEvent:
    fields: dict[str, Any] = {
        "session_id": str(number),
        "lane": "entry-1",
        "kind": "start",
        "occurred_at": T0 + timedelta(seconds=number),
        "code_masked": "******XD4T",
    }
    fields.update(changes)
    return store.append_event(**fields)


def sync_level(store: Store) -> int:
    """Return the connection's synchronous level: 1 is NORMAL, 2 is FULL."""
    return int(store._conn.execute("PRAGMA synchronous").fetchone()[0])


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    opened = Store.open(state_dir)
    yield opened
    opened.close()


# --- opening -----------------------------------------------------------------


def test_open_creates_directory_and_database(state_dir: Path) -> None:
    with capture_logs() as logs, Store.open(state_dir) as opened:
        assert opened.path == state_dir / DB_NAME
        assert opened.recovered_from is None
        journal_mode = opened._conn.execute("PRAGMA journal_mode").fetchone()[0]
        version = opened._conn.execute("PRAGMA user_version").fetchone()[0]
        busy_timeout = opened._conn.execute("PRAGMA busy_timeout").fetchone()[0]

    assert journal_mode == "wal"
    assert version == SCHEMA_VERSION
    assert busy_timeout > 0
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE((state_dir / DB_NAME).stat().st_mode) == 0o640
    names = [entry["event"] for entry in logs]
    assert names == ["state.migrated", "state.opened", "state.closed"]
    opened_entry = logs[1]
    assert opened_entry["log_level"] == "info"
    assert opened_entry["path"] == str(state_dir / DB_NAME)
    assert opened_entry["schema_version"] == SCHEMA_VERSION
    assert opened_entry["sessions_cached"] == 0
    assert opened_entry["pending"] == 0


def test_reopen_keeps_data_and_skips_migration(state_dir: Path) -> None:
    with Store.open(state_dir) as first:
        first.replace_sessions([make_session(1)], synced_at=T0, etag=None, last_modified=None)
        append(first, 1)

    with capture_logs() as logs, Store.open(state_dir) as second:
        assert second.load_sessions() == [make_session(1)]
        assert second.backlog().pending == 1

    assert "state.migrated" not in [entry["event"] for entry in logs]
    assert logs[0]["event"] == "state.opened"
    assert logs[0]["sessions_cached"] == 1
    assert logs[0]["pending"] == 1
    assert not list(state_dir.glob("*.corrupt-*"))


def test_open_rejects_path_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")

    with pytest.raises(StateError, match="state directory") as info:
        Store.open(blocker)

    assert str(blocker) in str(info.value)
    assert "[state] directory" in str(info.value)


def test_open_rejects_database_path_that_is_a_directory(state_dir: Path) -> None:
    (state_dir / DB_NAME).mkdir(parents=True)

    with pytest.raises(StateError, match=DB_NAME):
        Store.open(state_dir)


def test_open_rejects_directory_not_writable() -> None:
    with tempfile.TemporaryDirectory() as base:
        state = Path(base) / "state"
        state.mkdir()
        os.chmod(base, 0o755)
        state.chmod(0o555)
        # NOTE: root passes every permission check, so as root the open runs
        # with the unprivileged effective uid 65534 and switches back afterwards.
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            with pytest.raises(StateError) as info:
                Store.open(state)
        finally:
            if as_root:
                os.seteuid(0)

    message = str(info.value)
    assert "not writable" in message
    assert str(state) in message
    assert "[state] directory" in message


# --- session cache -----------------------------------------------------------


def test_sessions_round_trip(store: Store, state_dir: Path) -> None:
    paris = timezone(timedelta(hours=2))
    sessions = [
        make_session(1),
        make_session(2, start_time=T0, end_time=T0 + timedelta(minutes=90, microseconds=7)),
        make_session(3, start_time=datetime(2026, 3, 14, 11, 0, 0, 123000, tzinfo=paris)),
        make_session(4, user_id=None, code=None, code_type=None),
        make_session(5, id="c0ffee-5", code="Ünïcode 482913"),
    ]

    store.replace_sessions(sessions, synced_at=T0, etag='"v1"', last_modified="Sat, 14 Mar 2026")
    store.close()
    with Store.open(state_dir) as reopened:
        loaded = reopened.load_sessions()
        meta = reopened.sync_meta()

    assert loaded == sessions
    assert loaded[2].start_time == datetime(2026, 3, 14, 9, 0, 0, 123000, tzinfo=UTC)
    assert loaded[2].start_time is not None
    assert loaded[2].start_time.tzinfo == UTC
    assert meta.synced_at == T0
    assert meta.etag == '"v1"'
    assert meta.last_modified == "Sat, 14 Mar 2026"


def test_new_store_has_empty_sync_meta(store: Store) -> None:
    meta = store.sync_meta()

    assert meta.synced_at is None
    assert meta.etag is None
    assert meta.last_modified is None
    assert store.load_sessions() == []


def test_replace_sessions_replaces_whole_cache(store: Store) -> None:
    store.replace_sessions(
        [make_session(1), make_session(2)], synced_at=T0, etag='"v1"', last_modified=None
    )
    later = T0 + timedelta(seconds=5)

    store.replace_sessions(
        [make_session(2, start_time=T0), make_session(3)],
        synced_at=later,
        etag=None,
        last_modified="Sat, 14 Mar 2026",
    )

    assert store.load_sessions() == [make_session(2, start_time=T0), make_session(3)]
    meta = store.sync_meta()
    assert meta.synced_at == later
    assert meta.etag is None
    assert meta.last_modified == "Sat, 14 Mar 2026"


def test_replace_sessions_duplicate_id_keeps_last(store: Store) -> None:
    store.replace_sessions(
        [make_session(1), make_session(1, code="LATER0001")],
        synced_at=T0,
        etag=None,
        last_modified=None,
    )

    assert [session.code for session in store.load_sessions()] == ["LATER0001"]


def test_replace_sessions_bind_failure_keeps_old_cache(store: Store) -> None:
    old = [make_session(1), make_session(2)]
    store.replace_sessions(old, synced_at=T0, etag='"old"', last_modified=None)
    # The third row cannot be bound, so the failure comes after two inserts.
    broken = [make_session(10), make_session(11), make_session(12, user_id=["not", "text"])]

    with pytest.raises(StateError, match="replacing the session cache") as info:
        store.replace_sessions(
            broken, synced_at=T0 + timedelta(1), etag='"new"', last_modified=None
        )

    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert store.load_sessions() == old
    assert store.sync_meta().etag == '"old"'
    assert store.sync_meta().synced_at == T0


def test_replace_sessions_disk_full_keeps_old_cache(store: Store) -> None:
    old = [make_session(1), make_session(2)]
    store.replace_sessions(old, synced_at=T0, etag='"old"', last_modified=None)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    # Cap the file a few pages above its size, so the large list fills it midway.
    store._conn.execute(f"PRAGMA max_page_count = {pages + 3}")
    big = [make_session(number, user_id="u" * 400) for number in range(100, 2100)]

    with pytest.raises(StateError, match="full"):
        store.replace_sessions(big, synced_at=T0 + timedelta(1), etag='"new"', last_modified=None)

    assert store.load_sessions() == old
    assert store.sync_meta().etag == '"old"'
    store.upsert_session(make_session(3))
    assert len(store.load_sessions()) == 3


def test_replace_sessions_naive_timestamp_raises(store: Store) -> None:
    store.replace_sessions([make_session(1)], synced_at=T0, etag=None, last_modified=None)
    naive = make_session(2, start_time=datetime(2026, 3, 14, 9, 0))

    with pytest.raises(ValueError, match="no time zone"):
        store.replace_sessions([naive], synced_at=T0, etag=None, last_modified=None)
    with pytest.raises(ValueError, match="no time zone"):
        store.touch_sync(synced_at=datetime(2026, 3, 14, 9, 0))

    assert store.load_sessions() == [make_session(1)]


def test_touch_sync_changes_only_synced_at(store: Store) -> None:
    store.replace_sessions([make_session(1)], synced_at=T0, etag='"v1"', last_modified="L")
    later = T0 + timedelta(minutes=1)

    store.touch_sync(synced_at=later)

    meta = store.sync_meta()
    assert meta.synced_at == later
    assert meta.etag == '"v1"'
    assert meta.last_modified == "L"
    assert store.load_sessions() == [make_session(1)]


def test_upsert_session_inserts_and_updates(store: Store) -> None:
    store.replace_sessions(
        [make_session(1), make_session(2)], synced_at=T0, etag=None, last_modified=None
    )

    store.upsert_session(make_session(3))
    store.upsert_session(make_session(1, start_time=T0, code="NEWCODE01"))

    assert store.load_sessions() == [
        make_session(1, start_time=T0, code="NEWCODE01"),
        make_session(2),
        make_session(3),
    ]
    assert store.get_session("1") == make_session(1, start_time=T0, code="NEWCODE01")
    assert store.get_session("404") is None
    assert store.sync_meta().synced_at == T0


def test_find_sessions_by_code_uses_index(store: Store) -> None:
    sessions = [make_session(number) for number in range(50)]
    sessions.append(make_session(99, code="CODE000007"))
    store.replace_sessions(sessions, synced_at=T0, etag=None, last_modified=None)

    found = store.find_sessions_by_code("CODE000007")
    plan = store._conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM sessions WHERE code = ?", ("CODE000007",)
    ).fetchall()

    assert [session.id for session in found] == ["7", "99"]
    assert store.find_sessions_by_code("NOSUCHCODE") == []
    assert any("sessions_by_code" in str(row) for row in plan)


# --- journal -----------------------------------------------------------------


def test_append_event_round_trip(store: Store, state_dir: Path) -> None:
    occurred = datetime(2026, 3, 14, 10, 26, 53, 589001, tzinfo=timezone(timedelta(hours=1)))

    event = store.append_event(
        session_id="42", lane="exit-2", kind="end", occurred_at=occurred, code_masked="**3456"
    )
    store.close()
    with Store.open(state_dir) as reopened:
        loaded = reopened.events()

    assert loaded == [event]
    assert len(event.event_id) == 32
    int(event.event_id, 16)
    assert event.seq == 1
    assert event.session_id == "42"
    assert event.lane == "exit-2"
    assert event.kind == "end"
    assert event.occurred_at == occurred
    assert event.occurred_at.tzinfo == UTC
    assert event.code_masked == "**3456"
    assert event.status == "pending"
    assert event.attempts == 0
    assert event.last_error is None
    assert event.delivered_at is None


def test_append_event_rejects_invalid_input(store: Store) -> None:
    with pytest.raises(ValueError, match="kind"):
        append(store, 1, kind="open")
    with pytest.raises(ValueError, match="session_id"):
        append(store, 1, session_id="")
    with pytest.raises(ValueError, match="lane"):
        append(store, 1, lane="")
    with pytest.raises(ValueError, match="no time zone"):
        append(store, 1, occurred_at=datetime(2026, 3, 14, 9, 0))

    assert store.events() == []


def test_event_ids_are_unique_and_seq_increases(store: Store) -> None:
    events = [append(store, number) for number in range(20)]

    assert len({event.event_id for event in events}) == 20
    assert [event.seq for event in events] == list(range(1, 21))


def test_pending_events_in_seq_order(store: Store) -> None:
    # occurred_at runs backwards, so an order by time would reverse the list.
    events = [append(store, 100 - number) for number in range(10)]
    store.mark_delivered(events[1].event_id, delivered_at=T0)
    store.mark_poison(events[2].event_id, reason="rejected: 422")

    pending = store.pending_events()
    first_three = store.pending_events(limit=3)

    expected = [event.event_id for index, event in enumerate(events) if index not in (1, 2)]
    assert [event.event_id for event in pending] == expected
    assert [event.event_id for event in first_three] == expected[:3]
    with pytest.raises(ValueError, match="limit"):
        store.pending_events(limit=0)


def test_mark_delivered_is_idempotent(store: Store) -> None:
    event = append(store, 1)
    first = T0 + timedelta(seconds=30)

    store.mark_delivered(event.event_id, delivered_at=first)
    store.mark_delivered(event.event_id, delivered_at=first + timedelta(hours=1))

    (stored,) = store.events()
    assert stored.status == "delivered"
    assert stored.delivered_at == first
    assert store.pending_events() == []


def test_record_failure_then_poison_then_delivered(store: Store) -> None:
    event = append(store, 1)

    store.record_failure(event.event_id, error="ApiUnavailableError: 503")
    store.record_failure(event.event_id, error="ApiUnavailableError: timed out")
    after_failures = store.events()[0]
    store.mark_poison(event.event_id, reason="ApiRejectedError: 422 invalid lane")
    poisoned = store.events()[0]
    store.mark_delivered(event.event_id, delivered_at=T0)
    delivered = store.events()[0]

    assert after_failures.attempts == 2
    assert after_failures.last_error == "ApiUnavailableError: timed out"
    assert after_failures.status == "pending"
    assert poisoned.status == "poison"
    assert poisoned.last_error == "ApiRejectedError: 422 invalid lane"
    assert poisoned.attempts == 2
    assert store.pending_events() == []
    assert delivered.status == "delivered"
    assert delivered.delivered_at == T0


def test_long_error_text_is_capped(store: Store) -> None:
    event = append(store, 1)

    store.record_failure(event.event_id, error="x" * 10_000)

    last_error = store.events()[0].last_error
    assert last_error is not None
    assert 0 < len(last_error) <= 500


def test_delivered_event_rejects_poison_and_failure(store: Store) -> None:
    event = append(store, 1)
    store.mark_delivered(event.event_id, delivered_at=T0)

    with pytest.raises(StateError, match="already delivered"):
        store.mark_poison(event.event_id, reason="late")
    with pytest.raises(StateError, match="already delivered"):
        store.record_failure(event.event_id, error="late")

    (stored,) = store.events()
    assert stored.status == "delivered"
    assert stored.attempts == 0


def test_unknown_event_id_raises(store: Store) -> None:
    unknown = "0" * 32

    with pytest.raises(StateError, match="not found"):
        store.mark_delivered(unknown, delivered_at=T0)
    with pytest.raises(StateError, match="not found"):
        store.mark_poison(unknown, reason="x")
    with pytest.raises(StateError, match="not found"):
        store.record_failure(unknown, error="x")


def test_backlog_counts_pending_and_poison(store: Store) -> None:
    assert store.backlog().pending == 0
    assert store.backlog().oldest_pending_at is None

    events = [append(store, number) for number in (5, 1, 9, 3)]
    store.mark_delivered(events[1].event_id, delivered_at=T0)
    store.mark_poison(events[2].event_id, reason="rejected")

    backlog = store.backlog()
    assert backlog.pending == 2
    assert backlog.poison == 1
    # The oldest undelivered event by time is number 3, though number 5 has the lower seq.
    assert backlog.oldest_pending_at == T0 + timedelta(seconds=3)


def test_events_returns_newest_in_seq_order(store: Store) -> None:
    events = [append(store, number) for number in range(10)]
    for event in events[:4]:
        store.mark_delivered(event.event_id, delivered_at=T0)

    newest = store.events(limit=3)
    delivered = store.events(status="delivered", limit=2)

    assert [event.seq for event in newest] == [8, 9, 10]
    assert [event.seq for event in delivered] == [3, 4]
    assert len(store.events()) == 10
    assert store.events(status="poison") == []
    with pytest.raises(ValueError, match="status"):
        store.events(status="lost")


def test_prune_delivered_deletes_only_old_delivered(store: Store) -> None:
    events = [append(store, number) for number in range(4)]
    store.mark_delivered(events[0].event_id, delivered_at=T0)
    store.mark_delivered(events[1].event_id, delivered_at=T0 + timedelta(days=10))
    store.mark_poison(events[2].event_id, reason="rejected")

    deleted = store.prune_delivered(before=T0 + timedelta(days=1))
    newer = append(store, 9)

    assert deleted == 1
    assert [event.event_id for event in store.events()] == [
        events[1].event_id,
        events[2].event_id,
        events[3].event_id,
        newer.event_id,
    ]
    assert newer.seq == 5


def test_journal_commits_full_and_cache_normal(store: Store) -> None:
    # NOTE: the level a commit used is read back after the call, because
    # the store sets it before BEGIN and only the next write changes it.
    store.replace_sessions([make_session(1)], synced_at=T0, etag=None, last_modified=None)
    after_replace = sync_level(store)
    event = append(store, 1)
    after_append = sync_level(store)
    store.touch_sync(synced_at=T0)
    after_touch = sync_level(store)
    store.record_failure(event.event_id, error="503")
    after_failure = sync_level(store)
    store.upsert_session(make_session(2))
    after_upsert = sync_level(store)
    store.mark_delivered(event.event_id, delivered_at=T0)
    after_delivered = sync_level(store)

    assert after_replace == 1
    assert after_append == 2
    assert after_touch == 1
    assert after_failure == 2
    assert after_upsert == 1
    assert after_delivered == 2


def test_store_is_safe_across_threads(store: Store) -> None:
    errors: list[BaseException] = []

    def worker(lane: str) -> None:
        try:
            for number in range(25):
                append(store, number, lane=lane)
        except Exception as exc:  # noqa: BLE001 -- reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"lane-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    events = store.events()
    assert len(events) == 100
    assert sorted(event.seq for event in events) == list(range(1, 101))


def test_closed_store_raises(state_dir: Path) -> None:
    opened = Store.open(state_dir)
    opened.close()
    opened.close()

    with pytest.raises(StateError, match="closed"):
        opened.load_sessions()
    with pytest.raises(StateError, match="closed"):
        append(opened, 1)


def test_locked_database_raises_state_error(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gated.state.store.BUSY_TIMEOUT_S", 0.05)
    opened = Store.open(state_dir)
    other = sqlite3.connect(state_dir / DB_NAME, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StateError, match="appending a journal event") as info:
            append(opened, 1)
        other.execute("ROLLBACK")
        append(opened, 2)
    finally:
        other.close()
        opened.close()

    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert "locked" in str(info.value)


# --- durability ----------------------------------------------------------------

_APPEND_ON_REQUEST = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from gated.state import Store
store = Store.open(Path(sys.argv[1]))
for number, _ in enumerate(sys.stdin):
    event = store.append_event(
        session_id=f"s{number}", lane="entry-1", kind="start",
        occurred_at=datetime.now(UTC), code_masked=None,
    )
    print("appended", event.event_id, flush=True)
"""


def test_appended_events_survive_sigkill(state_dir: Path, tmp_path: Path) -> None:
    # The child appends one event per line it reads and prints its id. The
    # parent requests the next event only after reading the id, and kills the
    # child instead once it has `expected_count` ids, so the kill lands right
    # after append_event returned. SIGKILL leaves no chance to flush or close.
    # NOTE: this shows each event was committed before append_event returned,
    # not that fsync reached the disk; only a power cut would show that.
    expected_count = 37
    printed: list[str] = []
    with (tmp_path / "child-stderr.txt").open("w+") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _APPEND_ON_REQUEST, str(state_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            child.stdin.write("next\n")
            child.stdin.flush()
            for line in child.stdout:
                if not line.startswith("appended "):
                    continue
                printed.append(line.split()[1])
                if len(printed) == expected_count:
                    child.send_signal(signal.SIGKILL)
                    break
                child.stdin.write("next\n")
                child.stdin.flush()
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=60)
            child.stdin.close()
            child.stdout.close()
        stderr.seek(0)
        child_errors = stderr.read()

    assert len(printed) == expected_count, child_errors
    assert child.returncode == -signal.SIGKILL
    with Store.open(state_dir) as reopened:
        stored = reopened.events(limit=10_000)
        recovered_from = reopened.recovered_from

    assert recovered_from is None
    assert [event.event_id for event in stored] == printed
    assert all(event.status == "pending" for event in stored)


# --- corruption ------------------------------------------------------------------


def populate(state_dir: Path, count: int = 300) -> list[GateEvent]:
    """Fill a store with sessions and events (every third delivered); return the undelivered."""
    with Store.open(state_dir) as filling:
        sessions = [make_session(number, user_id="u" * 60) for number in range(count)]
        filling.replace_sessions(sessions, synced_at=T0, etag='"v"', last_modified=None)
        for number in range(count):
            event = append(filling, number)
            if number % 3 == 0:
                filling.mark_delivered(event.event_id, delivered_at=T0)
            elif number % 10 == 1:
                filling.mark_poison(event.event_id, reason="rejected")
        undelivered = [
            event for event in filling.events(limit=10_000) if event.status != "delivered"
        ]
    # Closing checkpointed the WAL, so every row is now in the main file.
    assert not (state_dir / f"{DB_NAME}-wal").exists()
    return undelivered


def overwrite_middle(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.seek(size // 2)
        file.write(b"\xa5" * 8192)


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def write_garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def write_text(path: Path) -> None:
    path.write_text("[state]\ndirectory = '/var/lib/gated'\n")


def events_leaves(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """Return the page size and the (page number, row count) of each journal leaf, in seq order.

    seq runs 1..N without gaps and the leaves store it in order, so leaf k
    contains the seqs that follow the rows of leaves 0..k-1.
    """
    conn = sqlite3.connect(path)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        leaves = conn.execute(
            "SELECT pageno, ncell FROM dbstat WHERE name = 'events' AND pagetype = 'leaf'"
            " ORDER BY path"
        ).fetchall()
    finally:
        conn.close()
    return page_size, leaves


def open_damaged(state_dir: Path) -> tuple[Store, list[dict[str, Any]]]:
    with capture_logs() as logs:
        opened = Store.open(state_dir)
    return opened, logs


def log_entry(logs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    matches = [entry for entry in logs if entry["event"] == name]
    assert len(matches) == 1, [entry["event"] for entry in logs]
    return matches[0]


@pytest.mark.parametrize(
    "damage", [overwrite_middle, truncate_half, write_garbage, write_text], ids=lambda f: f.__name__
)
def test_damaged_file_is_moved_aside(state_dir: Path, damage: Any) -> None:
    undelivered = populate(state_dir)
    path = state_dir / DB_NAME
    damage(path)
    damaged_digest = file_digest(path)

    opened, logs = open_damaged(state_dir)
    with opened:
        moved = opened.recovered_from
        carried = opened.events(limit=10_000)
        sessions = opened.load_sessions()
        meta = opened.sync_meta()
        check = opened._conn.execute("PRAGMA integrity_check").fetchall()

    assert moved is not None
    assert moved.parent == state_dir
    assert moved.name.startswith(f"{DB_NAME}.corrupt-")
    assert file_digest(moved) == damaged_digest
    assert check == [("ok",)]
    assert sessions == []
    assert meta.synced_at is None
    # Every carried event is an undelivered original, unchanged.
    assert set(carried) <= set(undelivered)
    assert [event.seq for event in carried] == sorted(event.seq for event in carried)
    corrupt = log_entry(logs, "state.corrupt")
    assert corrupt["log_level"] == "error"
    assert corrupt["path"] == str(path)
    assert corrupt["moved_to"] == str(moved)
    assert corrupt["reason"]
    salvaged = log_entry(logs, "state.salvaged")
    assert salvaged["carried_over"] == len(carried)
    assert log_entry(logs, "state.opened")["recovered_from"] == str(moved)


def test_overwritten_middle_carries_over_pending(state_dir: Path) -> None:
    undelivered = populate(state_dir)
    overwrite_middle(state_dir / DB_NAME)

    opened, _ = open_damaged(state_dir)
    with opened:
        carried = opened.events(limit=10_000)

    assert len(carried) > 0
    assert set(carried) <= set(undelivered)


def test_truncated_file_carries_over_prefix(state_dir: Path) -> None:
    undelivered = populate(state_dir)
    path = state_dir / DB_NAME
    page_size, leaves = events_leaves(path)
    # Cut the file right after the third leaf of the journal, so the rows of
    # the first three leaves survive and the others are gone.
    kept_leaves = leaves[:3]
    assert [page for page, _ in kept_leaves] == sorted(page for page, _ in kept_leaves)
    assert all(page > kept_leaves[-1][0] for page, _ in leaves[3:])
    os.truncate(path, kept_leaves[-1][0] * page_size)
    kept_seqs = sum(cells for _, cells in kept_leaves)

    opened, logs = open_damaged(state_dir)
    with opened:
        carried = opened.events(limit=10_000)

    assert carried == [event for event in undelivered if event.seq <= kept_seqs]
    salvaged = log_entry(logs, "state.salvaged")
    assert salvaged["unreadable"] == sum(cells for _, cells in leaves[3:])
    assert salvaged["log_level"] == "error"


def test_not_a_database_is_replaced(state_dir: Path) -> None:
    state_dir.mkdir()
    write_text(state_dir / DB_NAME)

    opened, logs = open_damaged(state_dir)
    with opened:
        moved = opened.recovered_from
        carried = opened.events()
        append(opened, 1)

    assert moved is not None
    assert moved.read_text().startswith("[state]")
    assert carried == []
    assert "not a database" in log_entry(logs, "state.corrupt")["reason"]


def test_damaged_leaf_page_loses_only_its_rows(state_dir: Path) -> None:
    undelivered = populate(state_dir)
    path = state_dir / DB_NAME
    page_size, leaves = events_leaves(path)
    assert len(leaves) >= 3
    (_, first_cells), (damaged_page, damaged_cells) = leaves[0], leaves[1]
    lost = set(range(first_cells + 1, first_cells + damaged_cells + 1))
    with path.open("r+b") as file:
        file.seek((damaged_page - 1) * page_size)
        file.write(b"\xff" * page_size)

    opened, logs = open_damaged(state_dir)
    with opened:
        carried = opened.events(limit=10_000)

    assert carried == [event for event in undelivered if event.seq not in lost]
    salvaged = log_entry(logs, "state.salvaged")
    assert salvaged["unreadable"] == damaged_cells
    assert salvaged["log_level"] == "error"


def damage_session_page(path: Path) -> None:
    """Overwrite the first leaf page of the session cache, leaving the journal readable."""
    conn = sqlite3.connect(path)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (page,) = conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'sessions' AND pagetype = 'leaf'"
            " ORDER BY path LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    with path.open("r+b") as file:
        file.seek((page - 1) * page_size)
        file.write(b"\xff" * page_size)


def test_failed_rebuild_keeps_damaged_file(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    undelivered = populate(state_dir)
    path = state_dir / DB_NAME
    damage_session_page(path)
    damaged_digest = file_digest(path)

    def disk_full(*args: Any, **kwargs: Any) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as patch:
        patch.setattr("gated.state.recovery.migrate", disk_full)
        with pytest.raises(StateError, match="rebuilding the damaged database"):
            Store.open(state_dir)
    assert file_digest(path) == damaged_digest
    assert not list(state_dir.glob("*.corrupt-*"))

    opened, _ = open_damaged(state_dir)
    with opened:
        carried = opened.events(limit=10_000)
        moved = opened.recovered_from

    assert moved is not None
    assert file_digest(moved) == damaged_digest
    assert carried == undelivered
    assert not list(state_dir.glob("*.rebuild*"))


def test_damaged_file_keeps_its_wal(state_dir: Path, tmp_path: Path) -> None:
    # Copy the files while a store is open, which is what a power cut leaves:
    # the newest events exist only in the -wal file.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    with Store.open(state_dir) as live:
        live.replace_sessions(
            [make_session(number, user_id="u" * 60) for number in range(200)],
            synced_at=T0,
            etag=None,
            last_modified=None,
        )
        live._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size, session_page = live._conn.execute(
            "SELECT (SELECT page_size FROM pragma_page_size), pageno FROM dbstat"
            " WHERE name = 'sessions' AND pagetype = 'leaf' ORDER BY path LIMIT 1"
        ).fetchone()
        in_wal = [append(live, number) for number in range(5)]
        for suffix in ("", "-wal", "-shm"):
            (crashed / f"{DB_NAME}{suffix}").write_bytes(
                (state_dir / f"{DB_NAME}{suffix}").read_bytes()
            )
    wal_digest = file_digest(crashed / f"{DB_NAME}-wal")
    # Damage a session page in the main file; the events are in the WAL only.
    with (crashed / DB_NAME).open("r+b") as file:
        file.seek((session_page - 1) * page_size)
        file.write(b"\xff" * page_size)

    opened, _ = open_damaged(crashed)
    with opened:
        moved = opened.recovered_from
        carried = opened.events()

    assert moved is not None
    assert file_digest(Path(f"{moved}-wal")) == wal_digest
    assert Path(f"{moved}-shm").exists()
    assert carried == in_wal


def test_move_aside_picks_a_free_name(tmp_path: Path) -> None:
    now = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)
    path = tmp_path / DB_NAME
    path.write_bytes(b"first")
    Path(f"{path}-wal").write_bytes(b"first wal")

    first = recovery.move_aside(path, now)
    path.write_bytes(b"second")
    second = recovery.move_aside(path, now)

    assert first.name == f"{DB_NAME}.corrupt-20260314T092653Z"
    assert second.name == f"{DB_NAME}.corrupt-20260314T092653Z-2"
    assert first.read_bytes() == b"first"
    assert Path(f"{first}-wal").read_bytes() == b"first wal"
    assert second.read_bytes() == b"second"
    assert not path.exists()
    assert not Path(f"{path}-wal").exists()


# --- schema versions -----------------------------------------------------------


def test_newer_schema_raises_and_leaves_file(state_dir: Path) -> None:
    state_dir.mkdir()
    path = state_dir / DB_NAME
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE future (x)")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = file_digest(path)

    with pytest.raises(StateError, match=f"schema version {SCHEMA_VERSION + 1}") as info:
        Store.open(state_dir)

    assert "newer gated" in str(info.value)
    assert file_digest(path) == before
    assert sorted(entry.name for entry in state_dir.iterdir()) == [DB_NAME]


def test_empty_file_is_migrated_from_zero(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / DB_NAME).write_bytes(b"")

    with capture_logs() as logs, Store.open(state_dir) as opened:
        append(opened, 1)
        version = opened._conn.execute("PRAGMA user_version").fetchone()[0]

    migrated = log_entry(logs, "state.migrated")
    assert migrated["from_version"] == 0
    assert migrated["to_version"] == SCHEMA_VERSION
    assert migrated["log_level"] == "info"
    assert version == SCHEMA_VERSION


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    def fail(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("simulated failure")

    migrations = [
        Migration(1, "first", ("CREATE TABLE one (x)",)),
        Migration(2, "second", ("CREATE TABLE two (x)", fail)),
    ]
    logger = _CapturedLogger()
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="simulated"):
            migrate(conn, logger, path="m.db", migrations=migrations)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()

    assert version == 1
    assert tables == {"one"}
    assert [call["to_version"] for call in logger.calls] == [1]


def test_migrations_apply_in_order(tmp_path: Path) -> None:
    logger = _CapturedLogger()
    migrations = [
        Migration(1, "first", ("CREATE TABLE one (x)",)),
        Migration(2, "second", ("INSERT INTO one VALUES (2)",)),
        Migration(3, "third", (lambda conn: conn.execute("INSERT INTO one VALUES (3)"),)),
    ]
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        migrate(conn, logger, path="m.db", migrations=migrations[:2])
        version = migrate(conn, logger, path="m.db", migrations=migrations)
        rows = conn.execute("SELECT x FROM one ORDER BY rowid").fetchall()
        with pytest.raises(ValueError, match="in order"):
            migrate(conn, logger, path="m.db", migrations=[migrations[1], migrations[0]])
    finally:
        conn.close()

    assert version == 3
    assert rows == [(2,), (3,)]
    assert [call["to_version"] for call in logger.calls] == [1, 2, 3]


class _CapturedLogger:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.calls.append({"event": event, **fields})


# --- AsyncStore ------------------------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_async_store_round_trip(state_dir: Path) -> None:
    async with await AsyncStore.open(state_dir) as store:
        await store.replace_sessions(
            [make_session(1)], synced_at=T0, etag='"a"', last_modified=None
        )
        await store.upsert_session(make_session(2))
        await store.touch_sync(synced_at=T0 + timedelta(seconds=1))
        event = await store.append_event(
            session_id="1", lane="entry-1", kind="start", occurred_at=T0, code_masked=None
        )
        await store.record_failure(event.event_id, error="503")
        pending = await store.pending_events()
        await store.mark_delivered(event.event_id, delivered_at=T0)
        other = await store.append_event(
            session_id="2", lane="exit-1", kind="end", occurred_at=T0, code_masked=None
        )
        await store.mark_poison(other.event_id, reason="rejected")
        sessions = await store.load_sessions()
        found = await store.find_sessions_by_code("CODE000002")
        single = await store.get_session("1")
        meta = await store.sync_meta()
        backlog = await store.backlog()
        events = await store.events()
        pruned = await store.prune_delivered(before=T0 + timedelta(days=1))

    assert sessions == [make_session(1), make_session(2)]
    assert found == [make_session(2)]
    assert single == make_session(1)
    assert meta.synced_at == T0 + timedelta(seconds=1)
    assert meta.etag == '"a"'
    assert [item.attempts for item in pending] == [1]
    assert [item.status for item in events] == ["delivered", "poison"]
    assert backlog.pending == 0
    assert backlog.poison == 1
    assert pruned == 1
    with pytest.raises(StateError, match="closed"):
        await store.load_sessions()


@pytest.mark.anyio
async def test_async_store_runs_off_event_loop_thread(store: Store) -> None:
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    store._conn.set_trace_callback(lambda statement: threads.add(threading.get_ident()))
    async_store = AsyncStore(store)

    await async_store.append_event(
        session_id="1", lane="entry-1", kind="start", occurred_at=T0, code_masked=None
    )
    await async_store.load_sessions()

    store._conn.set_trace_callback(None)
    assert threads
    assert loop_thread not in threads


@pytest.mark.anyio
async def test_async_store_concurrent_appends(store: Store) -> None:
    async_store = AsyncStore(store)

    async def append_some(lane: str) -> None:
        for number in range(10):
            await async_store.append_event(
                session_id=str(number), lane=lane, kind="start", occurred_at=T0, code_masked=None
            )

    async with anyio.create_task_group() as group:
        for index in range(5):
            group.start_soon(append_some, f"lane-{index}")

    events = await async_store.events()
    assert len(events) == 50
    assert sorted(event.seq for event in events) == list(range(1, 51))


def test_apply_session_changes_writes_diff(tmp_path: Path) -> None:
    synced = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    first = Session("1", "u1", None, None, "AAAA1111", "barcode")
    second = Session("2", "u2", None, None, "BBBB2222", "barcode")
    with Store.open(tmp_path) as store:
        store.replace_sessions([first, second], synced_at=synced, etag='"v1"', last_modified=None)
        started = Session("1", "u1", synced, None, "AAAA1111", "barcode")
        third = Session("3", "u3", None, None, "CCCC3333", "barcode")
        store.apply_session_changes(
            [started, third], ["2"], synced_at=synced, etag='"v2"', last_modified=None
        )
        by_id = {session.id: session for session in store.load_sessions()}
        meta = store.sync_meta()
    assert sorted(by_id) == ["1", "3"]
    assert by_id["1"].start_time == synced
    assert meta.etag == '"v2"'
