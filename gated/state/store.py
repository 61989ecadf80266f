"""The gate's durable memory: a SQLite file with the session cache and the event journal.

Durability rule: a journal write (``append_event`` and every status change)
commits with ``synchronous=FULL``, so the WAL is fsynced before the call
returns and the event survives a power cut. Cache writes (``replace_sessions``,
``touch_sync``, ``upsert_session``) commit with ``synchronous=NORMAL``. In WAL
mode that still keeps the file consistent, but a power cut may lose the last
cache commits, which the next poll of the API rebuilds. NORMAL spares the SD
card one fsync per poll. The level is a per-connection pragma that SQLite
rejects inside a transaction, so it is set before each BEGIN.

Every public method takes one lock, so a Store may be shared between threads.
sqlite3 errors are raised as StateError.
"""

# ruff: noqa: S608 -- queries interpolate only the column-list constants of
# gated.state.records; every value is a bound parameter.

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

from gated.api.models import Session
from gated.errors import StateError
from gated.logs import get_logger
from gated.state.records import (
    EVENT_COLUMNS,
    EVENT_KINDS,
    EVENT_STATUSES,
    SESSION_COLUMNS,
    Backlog,
    EventKind,
    GateEvent,
    SyncMeta,
    event_from_row,
    format_utc,
    parse_utc,
    session_from_row,
    session_to_row,
)
from gated.state.recovery import BUSY_TIMEOUT_S, create_file, inspect, is_corruption, rebuild
from gated.state.schema import migrate

DB_NAME: Final = "gated.db"
DIRECTORY_MODE: Final = 0o750
# Maximum length of last_error kept per event, in characters. API error texts
# are short, and the cap keeps a misbehaving server from growing the journal.
MAX_ERROR_LENGTH: Final = 500

SyncLevel = Literal["FULL", "NORMAL"]


class Store:
    """Session cache and gate event journal in ``<directory>/gated.db``."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        recovered_from: Path | None,
        log: Any,
    ) -> None:
        # Call Store.open instead. This constructor takes a connection that is
        # already configured and migrated.
        self._conn = conn
        self._lock = threading.Lock()
        self._sync_level: SyncLevel | None = None
        self._closed = False
        self._log = log
        self.path = path
        self.recovered_from = recovered_from

    # --- opening and closing ---------------------------------------------------

    @classmethod
    def open(cls, directory: Path) -> Store:
        """Open or create the database, recovering it first when it is damaged.

        A file that fails the integrity check, or is not SQLite, is replaced by
        a new database that contains the readable pending and poison journal rows
        of the old one and an empty session cache. The old file is renamed to
        ``gated.db.corrupt-<UTC timestamp>`` and kept for inspection, and
        ``recovered_from`` is set to that name. Raises StateError when the
        directory is unusable, the file was written by a newer gated, or the
        replacement could not be built (the damaged file then stays in place).
        """
        log = get_logger("state")
        path = _prepare_directory(Path(directory)) / DB_NAME
        recovered_from: Path | None = None
        problem = inspect(path)
        if problem is not None:
            with _translate(path, "rebuilding the damaged database"):
                recovered_from = rebuild(path, problem, log)
        create_file(path)
        conn = _connect(path)
        try:
            with _translate(path, "migrating"):
                version = migrate(conn, log, path=path)
            store = cls(conn, path, recovered_from=recovered_from, log=log)
            backlog = store.backlog()
            cached = store._count_sessions()
        except BaseException:
            conn.close()
            raise
        log.info(
            "state.opened",
            path=str(path),
            schema_version=version,
            sessions_cached=cached,
            pending=backlog.pending,
            poison=backlog.poison,
            recovered_from=None if recovered_from is None else str(recovered_from),
        )
        return store

    def close(self) -> None:
        """Close the connection, which checkpoints the WAL into the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with _translate(self.path, "closing"):
                self._conn.close()
        self._log.info("state.closed", path=str(self.path))

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- session cache ---------------------------------------------------------

    def load_sessions(self) -> list[Session]:
        """Return every cached session, in the order they were stored."""
        rows = self._read(
            "loading sessions", f"SELECT {SESSION_COLUMNS} FROM sessions ORDER BY rowid"
        )
        return [self._session(row) for row in rows]

    def get_session(self, session_id: str) -> Session | None:
        """Return the cached session with this id, or None."""
        rows = self._read(
            "reading a session", f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?", session_id
        )
        return self._session(rows[0]) if rows else None

    def find_sessions_by_code(self, code: str) -> list[Session]:
        """Return the cached sessions whose redemption code is ``code`` (index lookup)."""
        rows = self._read(
            "looking up a code",
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE code = ? ORDER BY rowid",
            code,
        )
        return [self._session(row) for row in rows]

    def replace_sessions(
        self,
        sessions: list[Session],
        *,
        synced_at: datetime,
        etag: str | None,
        last_modified: str | None,
    ) -> None:
        """Replace the whole cache and the sync metadata in one transaction.

        When a session id appears twice, the later entry wins. On any error the
        old cache and metadata stay as they were.
        """
        rows = [session_to_row(session) for session in sessions]
        synced_text = format_utc(synced_at)
        with self._write("replacing the session cache", "NORMAL") as conn:
            conn.execute("DELETE FROM sessions")
            conn.executemany(
                f"INSERT OR REPLACE INTO sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute(
                "UPDATE sync_meta SET synced_at = ?, etag = ?, last_modified = ?",
                (synced_text, etag, last_modified),
            )

    def apply_session_changes(
        self,
        upserts: list[Session],
        deleted_ids: list[str],
        *,
        synced_at: datetime,
        etag: str | None,
        last_modified: str | None,
    ) -> None:
        """Write what changed since the last listing, and the sync metadata, in one transaction.

        A poll usually changes a handful of sessions, so this keeps the cache
        write (and the journal appends queued behind it) short.
        """
        rows = [session_to_row(session) for session in upserts]
        synced_text = format_utc(synced_at)
        with self._write("updating the session cache", "NORMAL") as conn:
            conn.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in deleted_ids])
            conn.executemany(
                f"INSERT OR REPLACE INTO sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute(
                "UPDATE sync_meta SET synced_at = ?, etag = ?, last_modified = ?",
                (synced_text, etag, last_modified),
            )

    def touch_sync(self, *, synced_at: datetime) -> None:
        """Record a poll that confirmed the cache unchanged (304 Not Modified)."""
        synced_text = format_utc(synced_at)
        with self._write("recording a sync", "NORMAL") as conn:
            conn.execute("UPDATE sync_meta SET synced_at = ?", (synced_text,))

    def upsert_session(self, session: Session) -> None:
        """Insert a session into the cache, or replace the cached one with the same id."""
        row = session_to_row(session)
        with self._write("storing a session", "NORMAL") as conn:
            conn.execute(
                f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id,"
                " start_time = excluded.start_time, end_time = excluded.end_time,"
                " code = excluded.code, code_type = excluded.code_type",
                row,
            )

    def sync_meta(self) -> SyncMeta:
        """Return when the cache was last synced, and the validators of that list."""
        rows = self._read(
            "reading sync metadata", "SELECT synced_at, etag, last_modified FROM sync_meta"
        )
        if not rows:
            return SyncMeta(synced_at=None, etag=None, last_modified=None)
        synced_at, etag, last_modified = rows[0]
        return SyncMeta(
            synced_at=None if synced_at is None else parse_utc(synced_at),
            etag=etag,
            last_modified=last_modified,
        )

    # --- journal ---------------------------------------------------------------

    def append_event(
        self,
        *,
        session_id: str,
        lane: str,
        kind: EventKind,
        occurred_at: datetime,
        code_masked: str | None,
    ) -> GateEvent:
        """Journal a gate event as pending, on stable storage when this returns.

        Raises ValueError for an empty session id or lane, an unknown kind or a
        naive timestamp, and StateError when the write fails.
        """
        if not session_id:
            raise ValueError("session_id must not be empty")
        if not lane:
            raise ValueError("lane must not be empty")
        if kind not in EVENT_KINDS:
            raise ValueError(f"kind must be 'start' or 'end', not {kind!r}")
        occurred_text = format_utc(occurred_at)
        event_id = uuid.uuid4().hex
        with self._write("appending a journal event", "FULL") as conn:
            cursor = conn.execute(
                "INSERT INTO events (event_id, session_id, lane, kind, occurred_at, code_masked)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (event_id, session_id, lane, kind, occurred_text, code_masked),
            )
            seq = cursor.lastrowid
        assert seq is not None
        return GateEvent(
            event_id=event_id,
            seq=seq,
            session_id=session_id,
            lane=lane,
            kind=kind,
            occurred_at=parse_utc(occurred_text),
            code_masked=code_masked,
            status="pending",
            attempts=0,
            last_error=None,
            delivered_at=None,
        )

    def pending_events(self, limit: int = 100) -> list[GateEvent]:
        """Return up to ``limit`` pending events, oldest seq first."""
        _check_limit(limit)
        rows = self._read(
            "reading pending events",
            f"SELECT {EVENT_COLUMNS} FROM events WHERE status = 'pending' ORDER BY seq LIMIT ?",
            limit,
        )
        return [self._event(row) for row in rows]

    def mark_delivered(self, event_id: str, *, delivered_at: datetime) -> None:
        """Mark a pending or poison event delivered. Repeating it changes nothing."""
        delivered_text = format_utc(delivered_at)
        with self._write("marking an event delivered", "FULL") as conn:
            self._require_event(conn, event_id)
            conn.execute(
                "UPDATE events SET status = 'delivered', delivered_at = ?"
                " WHERE event_id = ? AND status != 'delivered'",
                (delivered_text, event_id),
            )

    def mark_poison(self, event_id: str, *, reason: str) -> None:
        """Mark an event the API will never accept as poison, with ``reason`` as last_error.

        Raises StateError when the event is unknown or already delivered.
        """
        with self._write("marking an event poison", "FULL") as conn:
            self._require_event(conn, event_id, undelivered=True)
            conn.execute(
                "UPDATE events SET status = 'poison', last_error = ? WHERE event_id = ?",
                (reason[:MAX_ERROR_LENGTH], event_id),
            )

    def record_failure(self, event_id: str, *, error: str) -> None:
        """Count a failed delivery attempt and keep its error text.

        Raises StateError when the event is unknown or already delivered.
        """
        with self._write("recording a delivery failure", "FULL") as conn:
            self._require_event(conn, event_id, undelivered=True)
            conn.execute(
                "UPDATE events SET attempts = attempts + 1, last_error = ? WHERE event_id = ?",
                (error[:MAX_ERROR_LENGTH], event_id),
            )

    def backlog(self) -> Backlog:
        """Return the number of pending and poison events and the oldest pending time."""
        rows = self._read(
            "counting the backlog",
            "SELECT"
            " (SELECT count(*) FROM events WHERE status = 'pending'),"
            " (SELECT min(occurred_at) FROM events WHERE status = 'pending'),"
            " (SELECT count(*) FROM events WHERE status = 'poison')",
        )
        pending, oldest, poison = rows[0]
        return Backlog(
            pending=pending,
            oldest_pending_at=None if oldest is None else parse_utc(oldest),
            poison=poison,
        )

    def events(self, *, status: str | None = None, limit: int = 1000) -> list[GateEvent]:
        """Return the newest ``limit`` events (of one status, if given), oldest seq first."""
        _check_limit(limit)
        if status is not None and status not in EVENT_STATUSES:
            raise ValueError(f"status must be one of {', '.join(EVENT_STATUSES)}, not {status!r}")
        where = "" if status is None else "WHERE status = ?"
        parameters: tuple[Any, ...] = (limit,) if status is None else (status, limit)
        rows = self._read(
            "reading events",
            f"SELECT * FROM (SELECT {EVENT_COLUMNS} FROM events {where} ORDER BY seq DESC LIMIT ?)"
            " ORDER BY seq",
            *parameters,
        )
        return [self._event(row) for row in rows]

    def prune_delivered(self, *, before: datetime) -> int:
        """Delete the events delivered before ``before`` and return how many there were.

        The journal otherwise grows by every gate event, and the integrity check
        at open reads the whole file.
        """
        before_text = format_utc(before)
        with self._write("pruning delivered events", "FULL") as conn:
            cursor = conn.execute(
                "DELETE FROM events WHERE status = 'delivered' AND delivered_at < ?",
                (before_text,),
            )
            return cursor.rowcount

    # --- internals -------------------------------------------------------------

    @contextmanager
    def _write(self, action: str, level: SyncLevel) -> Iterator[sqlite3.Connection]:
        """Run the body in one write transaction committed with the given sync level."""
        with self._lock, _translate(self.path, action):
            conn = self._open_connection()
            if self._sync_level != level:
                conn.execute(f"PRAGMA synchronous = {level}")
                self._sync_level = level
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite already rolls back on some errors (SQLITE_FULL, I/O errors).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _read(self, action: str, query: str, *parameters: Any) -> list[Any]:
        with self._lock, _translate(self.path, action):
            return self._open_connection().execute(query, parameters).fetchall()

    def _open_connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StateError(f"the state store {self.path} is closed")
        return self._conn

    def _require_event(
        self, conn: sqlite3.Connection, event_id: str, *, undelivered: bool = False
    ) -> None:
        row = conn.execute("SELECT status FROM events WHERE event_id = ?", (event_id,)).fetchone()
        if row is None:
            raise StateError(f"journal event {event_id!r} not found in {self.path}")
        if undelivered and row[0] == "delivered":
            raise StateError(f"journal event {event_id!r} was already delivered")

    def _session(self, row: Any) -> Session:
        try:
            return session_from_row(row)
        except ValueError as exc:
            raise StateError(f"invalid session row in {self.path}: {exc}") from exc

    def _event(self, row: Any) -> GateEvent:
        try:
            return event_from_row(row)
        except ValueError as exc:
            raise StateError(f"invalid journal row in {self.path}: {exc}") from exc

    def _count_sessions(self) -> int:
        rows = self._read("counting sessions", "SELECT count(*) FROM sessions")
        return int(rows[0][0])


def _prepare_directory(directory: Path) -> Path:
    """Create the state directory if missing and check that gated may write in it."""
    fix = "Create it writable by the gated user, or set [state] directory to another path"
    try:
        directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(
            f"cannot create the state directory {directory}: {exc.strerror}. {fix}"
        ) from exc
    if not directory.is_dir():
        raise StateError(f"the state directory {directory} is not a directory. {fix}")
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        raise StateError(f"the state directory {directory} is not writable. {fix}")
    return directory


def _connect(path: Path) -> sqlite3.Connection:
    """Open the file read-write in WAL mode, in autocommit mode for explicit transactions."""
    with _translate(path, "opening"):
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            _enable_wal(conn, path)
            conn.execute("PRAGMA synchronous = FULL")
            # Cheap checks of each b-tree cell read, so damage that appears
            # after the open check raises an error instead of returning wrong rows.
            conn.execute("PRAGMA cell_size_check = ON")
        except BaseException:
            conn.close()
            raise
    return conn


def _enable_wal(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StateError(
            f"{path} cannot use WAL mode (journal mode is {mode!r})."
            " Put the state directory on a local file system"
        )


@contextmanager
def _translate(path: Path, action: str) -> Iterator[None]:
    """Raise sqlite3 errors as StateError naming the action and the file."""
    try:
        yield
    except sqlite3.Error as exc:
        hint = ". Restart gated to move the damaged file aside" if is_corruption(exc) else ""
        raise StateError(f"{action} failed on {path}: {exc}{hint}") from exc


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
