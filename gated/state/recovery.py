"""Detection of a damaged database file, and rescue of its undelivered journal rows.

A gate computer loses power without warning and its SD card can return wrong
bytes. Before the store opens the file for writing, ``inspect`` checks it
through a read-only connection, which never checkpoints, so a damaged file and
its ``-wal`` keep their content. ``rebuild`` then reads the journal of a copy
row by row, so one unreadable leaf page costs only the rows stored in it, and
moves the damaged files aside for inspection.

NOTE: rows below a damaged interior page of the journal's b-tree cannot be
reached by rowid and are lost. SQLite's recovery extension, which reads pages
directly, is not available through Python's sqlite3 module.
"""

# ruff: noqa: S608 -- queries interpolate only the column-list constants of
# gated.state.records; every value is a bound parameter.

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from gated.errors import StateError
from gated.state.records import EVENT_COLUMNS, GateEvent, event_from_row, event_to_row
from gated.state.schema import check_not_newer, migrate, read_version

# SQLite primary result codes that mean the file content is damaged or is not
# a database at all. Extended codes carry the primary code in the low byte.
_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26

# Deadline for taking a lock on the file, in seconds. Only gated writes the
# file, so another lock comes at most from an operator's sqlite3 shell or a
# backup copying it. After this long the open or write fails with StateError.
BUSY_TIMEOUT_S: Final = 5.0

# Maximum number of problems integrity_check reports. The first few are enough
# to log why the file was moved aside, and listing every bad page slows the start.
_MAX_INTEGRITY_PROBLEMS: Final = 10

# Maximum seq range that salvage_events probes row by row. Each probe is one
# rowid lookup, so this bounds the time spent on a damaged file. A wider or
# unreadable range is read by one table scan, which stops at the first bad page.
MAX_SALVAGE_SPAN: Final = 2_000_000

_COMPANION_SUFFIXES: Final = ("-wal", "-shm")

# The file contains redemption codes in clear, so only the gated user and its
# group may read it. SQLite gives the -wal and -shm files the same mode.
FILE_MODE: Final = 0o640

# The first 16 bytes of every SQLite file, and where its header stores the
# database size in pages (a 4-byte big-endian integer).
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_HEADER_PAGE_COUNT_OFFSET: Final = 28


@dataclass(slots=True)
class Salvage:
    """Undelivered journal rows read from a damaged file, in seq order."""

    events: list[GateEvent] = field(default_factory=list)
    # Rows that raised an error or held invalid values. Their status is
    # unknown, so some of them may have been delivered already.
    unreadable: int = 0
    # Why the journal could not be read to its end. An unknown number of
    # further rows is then lost.
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
        raise StateError(f"cannot open {path}: {exc}. Check that gated may read it") from exc
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


def rebuild(path: Path, problem: str, log: Any) -> Path:
    """Replace a damaged database by a new one with its readable undelivered events.

    The new database is built completely under a temporary name before the
    damaged file is moved aside, so a failure (a full disk) leaves the damaged
    file in place and the next start tries again. Returns the damaged file's
    new name. sqlite3 errors propagate to the caller, which translates them.
    """
    salvage = salvage_events(path)
    fresh = path.with_name(f"{path.name}.rebuild")
    try:
        _remove_database(fresh)
    except OSError as exc:
        raise StateError(f"cannot delete the leftover {fresh}: {exc.strerror}") from exc
    create_file(fresh)
    # A rollback journal leaves one self-contained file after close, which
    # the rename below can move alone.
    conn = sqlite3.connect(fresh, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = FULL")
        migrate(conn, log, path=fresh)
        carried, rejected = _insert_events(conn, salvage.events)
    finally:
        conn.close()
    moved = move_aside(path)
    try:
        fresh.rename(path)
        fsync_directory(path.parent)
    except OSError as exc:
        raise StateError(
            f"cannot rename the rebuilt database {fresh} to {path}: {exc.strerror}."
            f" Rename it by hand. The damaged file is now {moved}"
        ) from exc
    log.error("state.corrupt", path=str(path), moved_to=str(moved), reason=problem)
    unreadable = salvage.unreadable + rejected
    fields = {
        "path": str(path),
        "damaged": str(moved),
        "carried_over": carried,
        "unreadable": unreadable,
        "read_error": salvage.error,
    }
    if unreadable or salvage.error:
        log.error("state.salvaged", **fields)
    else:
        log.warning("state.salvaged", **fields)
    return moved


def _insert_events(conn: sqlite3.Connection, events: list[GateEvent]) -> tuple[int, int]:
    """Insert salvaged events in one transaction; return (inserted, rejected)."""
    inserted = 0
    rejected = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for event in events:
            try:
                conn.execute(
                    f"INSERT INTO events ({EVENT_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    event_to_row(event),
                )
            except sqlite3.IntegrityError:
                # A duplicate event_id or seq, which only damage produces.
                rejected += 1
            else:
                inserted += 1
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return inserted, rejected


def _remove_database(path: Path) -> None:
    """Delete a database file and its -wal and -shm files, left by an earlier failed rebuild."""
    for suffix in ("", *_COMPANION_SUFFIXES):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def create_file(path: Path) -> None:
    """Create an empty database file with FILE_MODE unless it exists.

    SQLite reads an empty file as a database with schema version 0.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise StateError(f"cannot create {path}: {exc.strerror}") from exc
    os.close(fd)
    fsync_directory(path.parent)


def move_aside(path: Path, now: datetime | None = None) -> Path:
    """Rename a damaged file and its -wal and -shm files, and return the new main path.

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
            f"cannot move the damaged database {path} aside to {target}: {exc.strerror}."
            " Move or delete it, with its -wal and -shm files, by hand"
        ) from exc
    return target


def fsync_directory(directory: Path) -> None:
    """Make renames and file creations in a directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def salvage_events(damaged: Path) -> Salvage:
    """Read the pending and poison journal rows that are still readable in a damaged file.

    The rows are read from a scratch copy beside the file, whose header is
    patched so that SQLite takes the database size from the file length. A file
    truncated by a crash or a file system repair is otherwise unreadable as a
    whole. When the copy cannot be made (no space), the damaged file is read as it is.
    """
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".salvage-", dir=damaged.parent))
    except OSError:
        return _read_undelivered(damaged)
    try:
        copy = _make_working_copy(damaged, scratch)
        return _read_undelivered(copy or damaged)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _make_working_copy(damaged: Path, scratch: Path) -> Path | None:
    """Copy the file and its -wal into ``scratch`` and return the copy, or None on failure."""
    copy = scratch / damaged.name
    try:
        shutil.copyfile(damaged, copy)
        wal = Path(f"{damaged}-wal")
        if wal.exists():
            shutil.copyfile(wal, f"{copy}-wal")
        with copy.open("r+b") as file:
            if file.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC:
                # A zero "database size in pages" field makes SQLite compute
                # the size from the file length instead of failing on pages
                # that a truncation cut off.
                file.seek(_HEADER_PAGE_COUNT_OFFSET)
                file.write(bytes(4))
    except OSError:
        return None
    return copy


def _read_undelivered(path: Path) -> Salvage:
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
        # The rows after the damaged page cannot be counted.
        salvage.error = f"the journal could not be read to its end: {exc}"


def _keep_undelivered(row: Any, salvage: Salvage) -> None:
    try:
        event = event_from_row(row)
    except ValueError:
        salvage.unreadable += 1
        return
    if event.status != "delivered":
        salvage.events.append(event)
