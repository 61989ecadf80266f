"""Detection of a damaged database file, and rescue of its undelivered journal rows.

A gate computer loses power without warning and its SD card can return wrong
bytes. Before the store opens the file for writing, ``inspect`` reads it through
a read-only connection, which never checkpoints, so a damaged file and its
``-wal`` and ``-shm`` companions can be moved aside unchanged. ``salvage_events``
then reads the journal of the moved file row by row, so one unreadable page
costs only the rows stored in it.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from gated.errors import StateError
from gated.state.records import EVENT_COLUMNS, GateEvent, event_from_row
from gated.state.schema import check_not_newer, read_version

# SQLite primary result codes that mean the file content is damaged or is not
# a database at all. Extended codes carry the primary code in the low byte.
_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26

# Deadline for taking a lock on the file, in seconds. Only gated writes the
# file, so a lock is held at most by an operator's sqlite3 shell or a backup
# copying it; after this long the open or write fails with StateError.
BUSY_TIMEOUT_S: Final = 5.0

# Problems integrity_check reports at most. The first few are enough to log
# why the file was moved aside; a count of every bad page would only slow the start.
_MAX_INTEGRITY_PROBLEMS: Final = 10

# Largest seq range salvage_events probes row by row. Each probe is one rowid
# lookup, so this bounds the time spent on a damaged file; a wider range (or a
# damaged one) is read by one table scan instead, which stops at the first bad page.
MAX_SALVAGE_SPAN: Final = 2_000_000

_COMPANION_SUFFIXES: Final = ("-wal", "-shm")


@dataclass(slots=True)
class Salvage:
    """Undelivered journal rows read from a damaged file, in seq order."""

    events: list[GateEvent] = field(default_factory=list)
    # Rows that raised an error or held invalid values. Their status is
    # unknown, so some of them may have been delivered already.
    unreadable: int = 0
    # Set when the table could not be read to its end.
    error: str | None = None


def is_corruption(exc: sqlite3.Error) -> bool:
    """Return whether a sqlite3 error means the file is damaged or not a database."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def connect_read_only(path: Path) -> sqlite3.Connection:
    """Open a file read-only. Closing such a connection never checkpoints the WAL."""
    uri = f"file:{quote(str(path), safe='/')}?mode=ro"
    return sqlite3.connect(
        uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )


def inspect(path: Path) -> str | None:
    """Return why the file is damaged, or None when it is sound (or missing or empty).

    Raises StateError, without changing the file, when its schema is newer than
    this code or when it cannot be read for another reason (permissions, a lock
    held too long, an I/O error).
    """
    if not path.exists():
        return None
    try:
        conn = connect_read_only(path)
    except sqlite3.Error as exc:
        raise StateError(f"cannot open {path}: {exc}; check that gated may read it") from exc
    try:
        check_not_newer(read_version(conn), path)
        rows = conn.execute(f"PRAGMA integrity_check({_MAX_INTEGRITY_PROBLEMS:d})").fetchall()
    except sqlite3.Error as exc:
        if is_corruption(exc):
            return str(exc)
        raise StateError(f"cannot check {path}: {exc}") from exc
    finally:
        conn.close()
    problems = [str(row[0]) for row in rows]
    if problems == ["ok"]:
        return None
    return "; ".join(problems)


def move_aside(path: Path, now: datetime | None = None) -> Path:
    """Rename a damaged file and its -wal and -shm files; return the new main path.

    The new name is ``<name>.corrupt-<UTC timestamp>``, with ``-2``, ``-3`` ...
    appended when that name is taken. All three renames must succeed, because a
    stale -wal file left beside the new database would be replayed into it.
    """
    now = now or datetime.now(UTC)
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while any(Path(f"{target}{suffix}").exists() for suffix in ("", *_COMPANION_SUFFIXES)):
        counter += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
    try:
        path.rename(target)
        for suffix in _COMPANION_SUFFIXES:
            companion = Path(f"{path}{suffix}")
            if companion.exists():
                companion.rename(f"{target}{suffix}")
        fsync_directory(path.parent)
    except OSError as exc:
        raise StateError(
            f"cannot move the damaged database {path} aside to {target}: {exc.strerror};"
            " move or delete it (with its -wal and -shm files) by hand"
        ) from exc
    return target


def fsync_directory(directory: Path) -> None:
    """Make renames and file creations in a directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def salvage_events(path: Path) -> Salvage:
    """Read the pending and poison journal rows that are still readable in a damaged file."""
    salvage = Salvage()
    try:
        conn = connect_read_only(path)
    except sqlite3.Error as exc:
        salvage.error = str(exc)
        return salvage
    try:
        bounds = _seq_bounds(conn)
        if bounds is not None and bounds[1] - bounds[0] < MAX_SALVAGE_SPAN:
            _probe_rows(conn, range(bounds[0], bounds[1] + 1), salvage)
        else:
            _scan_rows(conn, salvage)
    except sqlite3.Error as exc:
        salvage.error = str(exc)
    finally:
        conn.close()
    return salvage


def _seq_bounds(conn: sqlite3.Connection) -> tuple[int, int] | None:
    """Return the lowest and highest seq, or None when neither b-tree edge is readable."""
    try:
        low, high = conn.execute("SELECT min(seq), max(seq) FROM events NOT INDEXED").fetchone()
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
    else:
        if low is None:
            return (1, 0)
        if isinstance(low, int) and isinstance(high, int):
            return (low, high)
    # AUTOINCREMENT records the highest seq ever used in its own table, which
    # may live on a page that is still readable.
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
        return None
    if row is None or not isinstance(row[0], int):
        return None
    return (1, row[0])


def _probe_rows(conn: sqlite3.Connection, seqs: range, salvage: Salvage) -> None:
    # NOT INDEXED keeps SQLite on the table's own b-tree: a rowid lookup walks
    # from the root, so it skips damaged leaf pages that a scan would stop at.
    query = f"SELECT {EVENT_COLUMNS} FROM events NOT INDEXED WHERE seq = ?"
    for seq in seqs:
        try:
            row = conn.execute(query, (seq,)).fetchone()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            salvage.unreadable += 1
            continue
        if row is not None:
            _keep_undelivered(row, salvage)


def _scan_rows(conn: sqlite3.Connection, salvage: Salvage) -> None:
    query = f"SELECT {EVENT_COLUMNS} FROM events NOT INDEXED ORDER BY seq"
    try:
        for row in conn.execute(query):
            _keep_undelivered(row, salvage)
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
        # The rows after the damaged page cannot be counted; one is the lower bound.
        salvage.unreadable += 1
        salvage.error = str(exc)


def _keep_undelivered(row: Any, salvage: Salvage) -> None:
    try:
        event = event_from_row(row)
    except ValueError:
        salvage.unreadable += 1
        return
    if event.status != "delivered":
        salvage.events.append(event)
