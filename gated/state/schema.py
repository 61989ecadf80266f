"""The database schema and its migrations.

``PRAGMA user_version`` stores the number of the last migration applied, and
a new file has 0. Each migration runs in its own transaction together with the
update of ``user_version``, so a crash in the middle leaves the file at the
previous version. Migrations are only ever appended: a released one is never
edited, because gates in the field have already applied it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gated.errors import StateError

MigrationStep = str | Callable[[sqlite3.Connection], None]


@dataclass(frozen=True, slots=True)
class Migration:
    """Steps (SQL statements or functions) that bring the schema to ``version``."""

    version: int
    description: str
    steps: tuple[MigrationStep, ...]


_INITIAL = Migration(
    version=1,
    description="session cache, sync metadata and gate event journal",
    steps=(
        # The API's session id is opaque text. The lanes look sessions up by
        # redemption code, which need not be unique across sessions.
        """
        CREATE TABLE sessions (
            id         TEXT PRIMARY KEY NOT NULL,
            user_id    TEXT,
            start_time TEXT,
            end_time   TEXT,
            code       TEXT,
            code_type  TEXT
        )
        """,
        "CREATE INDEX sessions_by_code ON sessions (code)",
        # One row: when the cache was last confirmed by a full list, and the
        # HTTP validators of that list.
        """
        CREATE TABLE sync_meta (
            singleton     INTEGER PRIMARY KEY CHECK (singleton = 1),
            synced_at     TEXT,
            etag          TEXT,
            last_modified TEXT
        )
        """,
        "INSERT INTO sync_meta (singleton) VALUES (1)",
        # AUTOINCREMENT keeps seq from being reused after the newest rows are
        # deleted, so journal order stays unambiguous.
        """
        CREATE TABLE events (
            seq          INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id     TEXT NOT NULL UNIQUE,
            session_id   TEXT NOT NULL,
            lane         TEXT NOT NULL,
            kind         TEXT NOT NULL CHECK (kind IN ('start', 'end')),
            occurred_at  TEXT NOT NULL,
            code_masked  TEXT,
            status       TEXT NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'delivered', 'poison')),
            attempts     INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            last_error   TEXT,
            delivered_at TEXT
        )
        """,
        "CREATE INDEX events_by_status ON events (status, seq)",
    ),
)

MIGRATIONS: tuple[Migration, ...] = (_INITIAL,)
SCHEMA_VERSION = MIGRATIONS[-1].version


def read_version(conn: sqlite3.Connection) -> int:
    """Return the schema version stored in the file (0 for a new file)."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def check_not_newer(version: int, path: object, latest: int = SCHEMA_VERSION) -> None:
    """Raise StateError when the file was written by a newer gated than this one."""
    if version > latest:
        raise StateError(
            f"{path} has schema version {version}, but this gated supports up to {latest},"
            " so it was written by a newer gated. Install that version again, or move the file"
            " away to start with an empty database (its pending journal events would then"
            " not be delivered)"
        )


def migrate(
    conn: sqlite3.Connection,
    log: Any,
    *,
    path: object,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> int:
    """Apply the migrations the file lacks, one transaction each; return the new version.

    The connection must be in autocommit mode (``isolation_level=None``).
    sqlite3 errors propagate to the caller, which translates them.
    """
    _check_sequence(migrations)
    latest = migrations[-1].version if migrations else 0
    current = read_version(conn)
    check_not_newer(current, path, latest)
    for migration in migrations:
        if migration.version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for step in migration.steps:
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn)
            # NOTE: user_version lives in the file header, which SQLite writes
            # inside the transaction, so a rollback also restores the version.
            conn.execute(f"PRAGMA user_version = {migration.version:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info(
            "state.migrated",
            from_version=current,
            to_version=migration.version,
            description=migration.description,
        )
        current = migration.version
    return current


def _check_sequence(migrations: Sequence[Migration]) -> None:
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, 3, ... in order, not {versions}")
