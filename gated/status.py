"""``gated status``: show the running daemon's state, read over its control socket.

The config file is read only to find the socket (``[runtime] directory``).
Without ``--follow`` it prints one snapshot: the API link, the session cache,
the journal backlog, the lanes and the last decisions. With ``--follow`` it
prints one line per gate decision as it happens, until Ctrl-C. Codes arrive
masked from the daemon, so this module never receives a whole code.

Exit status: 0 on success and on Ctrl-C, 1 when the daemon cannot be reached
or ends the stream, 78 when the config file is invalid.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from gated.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, load_or_report
from gated.control import control_socket_path, encode_line
from gated.errors import GatedError

# Deadline for connecting to the socket, in seconds. A local connect either
# succeeds at once or fails at once unless the daemon's backlog is full.
CONNECT_TIMEOUT_S: Final = 2.0
# Deadline for the snapshot reply or the start of a follow stream, in
# seconds. The daemon builds a snapshot from memory, so a longer wait means
# its event loop is blocked.
REPLY_TIMEOUT_S: Final = 5.0
# Longest reply line read, in bytes. A snapshot with 50 decisions and a few
# lanes is about 15 KB.
MAX_LINE_BYTES: Final = 1_000_000
# Decisions shown in the text summary; --json shows every one the daemon keeps.
SHOWN_DECISIONS: Final = 10


class ControlError(GatedError):
    """The control socket could not be used; the message gives the cause and what to check."""


# --- client ------------------------------------------------------------------------


def _connect(path: Path, command: str) -> tuple[socket.socket, Any]:
    """Connect, send ``command`` and return the socket and a binary reader of it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(str(path))
        sock.settimeout(REPLY_TIMEOUT_S)
        sock.sendall(encode_line({"command": command}))
    except FileNotFoundError:
        sock.close()
        raise ControlError(
            f"the daemon is not running: no control socket at {path}."
            " Check the service with `systemctl status gated`."
        ) from None
    except ConnectionRefusedError:
        sock.close()
        raise ControlError(
            f"the daemon is not running: nothing accepts connections on {path}."
            " Check the service with `systemctl status gated`."
        ) from None
    except PermissionError:
        sock.close()
        raise ControlError(
            f"no permission to connect to {path}: run as root, or add your user to"
            " the gated group (`usermod -aG gated USER`, then log in again)."
        ) from None
    except TimeoutError:
        sock.close()
        raise ControlError(
            f"connecting to {path} timed out after {CONNECT_TIMEOUT_S:g} s;"
            " the daemon may be hung: check `systemctl status gated`."
        ) from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return sock, sock.makefile("rb")


def _read_message(reader: Any, path: Path, *, at_end: str) -> dict[str, Any]:
    """Read one JSON line; raise ControlError on timeout, end of stream or a bad line.

    ``at_end`` is the message of the ControlError raised at end of stream.
    """
    try:
        line = reader.readline(MAX_LINE_BYTES)
    except TimeoutError:
        raise ControlError(
            f"the daemon did not respond on {path} within {REPLY_TIMEOUT_S:g} s;"
            " it may be hung: check `systemctl status gated`."
        ) from None
    except OSError as exc:
        raise ControlError(f"reading from {path} failed: {exc.strerror or exc}") from None
    if not line:
        raise ControlError(at_end)
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ControlError(f"the daemon sent a line that is not JSON on {path}") from None
    if not isinstance(message, dict):
        raise ControlError(f"the daemon sent JSON that is not an object on {path}")
    if "error" in message:
        raise ControlError(f"the daemon returned an error: {message['error']}")
    return message


def _closed_early(path: Path) -> str:
    return (
        f"the daemon closed the connection on {path} without a reply;"
        " check its log with `journalctl -u gated`."
    )


def fetch_snapshot(path: Path) -> dict[str, Any]:
    """Return the daemon's snapshot; raise ControlError when it cannot be read."""
    sock, reader = _connect(path, "snapshot")
    with sock, reader:
        return _read_message(reader, path, at_end=_closed_early(path))


def follow_decisions(
    path: Path,
    on_decision: Callable[[dict[str, Any]], None],
    *,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Call ``on_decision`` for every decision until the stream ends.

    ``on_ready`` runs once the daemon has confirmed the subscription, so no
    later decision is missed. Raises ControlError when the connection fails
    or the daemon ends the stream; Ctrl-C raises KeyboardInterrupt as usual.
    """
    sock, reader = _connect(path, "follow")
    with sock, reader:
        _read_message(reader, path, at_end=_closed_early(path))
        # Decisions may be hours apart, so after the confirmation the read
        # has no deadline; a daemon that stops closes the socket.
        sock.settimeout(None)
        if on_ready is not None:
            on_ready()
        while True:
            on_decision(
                _read_message(
                    reader,
                    path,
                    at_end="the daemon closed the stream; it may have stopped:"
                    " check `systemctl status gated`.",
                )
            )


# --- formatting --------------------------------------------------------------------


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def format_time(value: Any) -> str:
    """Format an ISO 8601 timestamp in local time, or ``?`` when it is missing or invalid."""
    moment = _parse_time(value)
    if moment is None:
        return "?"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_duration(seconds: float) -> str:
    """Format a duration for people: ``42 s``, ``12 min 05 s``, ``3 h 07 min``, ``2 d 4 h``."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _since(value: Any, now: datetime) -> str:
    moment = _parse_time(value)
    if moment is None:
        return "?"
    return f"{format_time(value)} ({format_duration((now - moment).total_seconds())} ago)"


def _api_line(api: dict[str, Any], now: datetime) -> str:
    online = api.get("online")
    since = _since(api.get("since"), now)
    if online is None:
        text = f"connecting, no answer yet (started {since})"
    elif online:
        text = f"online since {since}"
    else:
        text = f"OFFLINE since {since}"
    if api.get("auth_failed"):
        text += "; the access key was rejected: check api.access_key, then run `gated diag`"
    elif not online and api.get("last_error"):
        text += f"; last error: {api['last_error']}"
    return text


def _cache_line(cache: dict[str, Any], now: datetime) -> str:
    sessions = cache.get("sessions", "?")
    if cache.get("synced_at") is None:
        return f"{sessions} sessions, never synced with the API"
    return f"{sessions} sessions, synced {_since(cache.get('synced_at'), now)}"


def _journal_line(journal: dict[str, Any], now: datetime) -> str:
    pending = journal.get("pending", "?")
    text = f"{pending} pending"
    if journal.get("oldest_pending_at") is not None:
        text += f", oldest {_since(journal.get('oldest_pending_at'), now)}"
    poison = journal.get("poison", 0)
    text += f"; {poison} poison"
    if poison:
        text += " (events the API rejected for good; see docs/technician.md)"
    return text


def format_decision(record: dict[str, Any]) -> str:
    """Format one decision as a line: time, lane, outcome, masked code, session, ms."""
    elapsed = record.get("elapsed_ms")
    elapsed_text = f"{elapsed:.1f} ms" if isinstance(elapsed, int | float) else "? ms"
    return (
        f"{format_time(record.get('at'))}  {record.get('lane', '?'):<12}"
        f" {record.get('outcome', '?'):<18} {'OPEN' if record.get('opens') else 'shut':<4}"
        f"  code {record.get('code') or '-':<14} session {record.get('session_id') or '-':<12}"
        f" {elapsed_text}"
    )


def format_snapshot(snapshot: dict[str, Any], now: datetime | None = None) -> str:
    """Format a snapshot as the text summary ``gated status`` prints."""
    now = now or datetime.now(UTC)
    lines = [
        f"gated running since {_since(snapshot.get('started_at'), now)}",
        f"API:      {_api_line(snapshot.get('api') or {}, now)}",
        f"Cache:    {_cache_line(snapshot.get('cache') or {}, now)}",
        f"Journal:  {_journal_line(snapshot.get('journal') or {}, now)}",
        "",
        "Lanes:",
        f"  {'NAME':<12} {'DIRECTION':<9} {'SCANNER':<12} {'RECONNECTS':>10}  RELAY",
    ]
    lanes = snapshot.get("lanes") or []
    for lane in lanes:
        relay = "available" if lane.get("relay_available") else "UNAVAILABLE"
        lines.append(
            f"  {lane.get('name', '?'):<12} {lane.get('direction', '?'):<9}"
            f" {lane.get('scanner', '?'):<12} {lane.get('scanner_reconnects', '?'):>10}  {relay}"
        )
    if not lanes:
        lines.append("  (no lane is running)")
    decisions = snapshot.get("recent_decisions") or []
    latest = decisions[-SHOWN_DECISIONS:]
    lines += ["", f"Last decisions ({len(latest)} of {len(decisions)} kept, oldest first):"]
    lines += [f"  {format_decision(record)}" for record in latest]
    if not decisions:
        lines.append("  (none since the daemon started)")
    return "\n".join(lines)


# --- command -----------------------------------------------------------------------


def show_snapshot(path: Path, *, json_output: bool, out: TextIO, err: TextIO) -> int:
    """Print one snapshot; return the exit status."""
    try:
        snapshot = fetch_snapshot(path)
    except ControlError as exc:
        print(f"gated status: {exc}", file=err)
        return EXIT_FAILURE
    if json_output:
        print(json.dumps(snapshot, indent=2), file=out)
    else:
        print(format_snapshot(snapshot), file=out)
    return EXIT_OK


def show_follow(path: Path, *, json_output: bool, out: TextIO, err: TextIO) -> int:
    """Print decisions as they happen until Ctrl-C (0) or until the stream ends (1)."""

    def ready() -> None:
        print(f"gated status: following decisions on {path}; press Ctrl-C to stop", file=err)
        err.flush()

    def print_decision(record: dict[str, Any]) -> None:
        line = json.dumps(record) if json_output else format_decision(record)
        print(line, file=out)
        out.flush()

    try:
        follow_decisions(path, print_decision, on_ready=ready)
    except KeyboardInterrupt:
        return EXIT_OK
    except ControlError as exc:
        print(f"gated status: {exc}", file=err)
    return EXIT_FAILURE


def main(args: argparse.Namespace) -> int:
    """Run ``gated status`` with the parsed command line."""
    # The status tool only needs the runtime directory, never the API key,
    # which a standard install keeps readable by the service alone.
    config = load_or_report(args.config, require_access_key=False)
    if config is None:
        return EXIT_CONFIG
    path = control_socket_path(config)
    if args.follow:
        return show_follow(path, json_output=args.json, out=sys.stdout, err=sys.stderr)
    return show_snapshot(path, json_output=args.json, out=sys.stdout, err=sys.stderr)
