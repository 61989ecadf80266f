"""``gated journal``: list undelivered gate events and put poison events back in the queue.

The tool opens the state database directly with SQLite, beside a running
daemon (WAL mode lets both use it). It never moves or repairs the file: that
is the daemon's job at start. A requeued event is picked up by the running
daemon's delivery loop within ``IDLE_RECHECK_S`` of ``gated.delivery``.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path
from typing import TextIO

from gated.state import DB_NAME

# How long the tool waits for the daemon's write lock, in seconds.
BUSY_TIMEOUT_S = 5.0

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78


def _connect(directory: Path) -> sqlite3.Connection:
    path = directory / DB_NAME
    if not path.exists():
        raise FileNotFoundError(f"no journal at {path}; has the daemon run with this config?")
    return sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)


def list_events(directory: Path, out: TextIO) -> int:
    """Print pending and poison events, oldest first."""
    with _connect(directory) as conn:
        rows = conn.execute(
            "SELECT event_id, status, session_id, lane, kind, occurred_at, attempts, last_error"
            " FROM events WHERE status IN ('pending', 'poison') ORDER BY seq"
        ).fetchall()
    if not rows:
        out.write("journal: every event has been delivered\n")
        return EXIT_OK
    for event_id, status, session_id, lane, kind, occurred_at, attempts, error in rows:
        out.write(
            f"{status:<8} {event_id}  session {session_id}  {lane} {kind} at {occurred_at}"
            f"  attempts {attempts}"
        )
        out.write(f"  last error: {error}\n" if error else "\n")
    pending = sum(1 for row in rows if row[1] == "pending")
    out.write(f"journal: {pending} pending, {len(rows) - pending} poison\n")
    return EXIT_OK


def requeue(directory: Path, event_id: str, out: TextIO, err: TextIO) -> int:
    """Put one poison event back in the delivery queue."""
    with _connect(directory) as conn:
        conn.execute("PRAGMA synchronous = FULL")
        cursor = conn.execute(
            "UPDATE events SET status = 'pending', attempts = 0"
            " WHERE event_id = ? AND status = 'poison'",
            (event_id,),
        )
        changed = cursor.rowcount
    if changed != 1:
        err.write(
            f"gated journal: no poison event with id {event_id!r}; list them with"
            " `gated journal --config PATH`\n"
        )
        return EXIT_FAILURE
    out.write(f"journal: event {event_id} is pending again; the daemon delivers it next\n")
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    from gated.cli import load_or_report  # noqa: PLC0415 - the CLI imports this module

    config = load_or_report(args.config, require_access_key=False)
    if config is None:
        return EXIT_CONFIG
    try:
        if args.requeue:
            return requeue(config.state.directory, args.requeue, sys.stdout, sys.stderr)
        return list_events(config.state.directory, sys.stdout)
    except (OSError, sqlite3.Error) as exc:
        sys.stderr.write(f"gated journal: {exc}\n")
        return EXIT_FAILURE
