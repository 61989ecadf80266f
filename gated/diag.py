"""``gated diag``: check a gate installation step by step, for technicians.

Checks, in order, each reported as PASS, FAIL, WARN or SKIP with a detail and,
when it does not pass, a ``fix:`` line:

1. ``config``: the config file is valid (every problem is listed).
2. ``state.directory`` and ``state.database``: the state directory is
   writable and ``gated.db`` passes SQLite's integrity check. The file is
   opened read-only, so diag never changes it, even while the daemon runs.
3. ``journal.backlog``: undelivered gate events, the oldest one, and poison
   events (events the API rejected for good).
4. ``api.reachable``, ``api.access_key``, ``api.location``: one listing of
   the location's sessions, with the config's timeout.
5. ``clock.time`` and ``clock.sync``: the clock is not before this release,
   and it is synchronised when the system can tell.
6. ``lane.<name>.scanner`` and ``lane.<name>.relay``: each port opens.

``--scan`` then waits for one scan per lane and shows the raw bytes beside
the code the lane's framing settings make of them. ``--pulse LANE`` pulses
one relay after confirmation.

Exit status: 0 when no check failed (WARN and SKIP do not fail), 1 when one
failed, 78 when the config file is invalid, because nothing else can be
checked then, and 130 after Ctrl-C.

The output never contains the API access key, because the key is registered
as a secret and every printed line is redacted.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

import anyio
import serial

from gated.api.client import CoordClient, SessionListing
from gated.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from gated.config import (
    GatedConfig,
    GpioRelaySettings,
    LaneSettings,
    LogRelaySettings,
    RelaySettings,
    ScannerSettings,
    access_key,
    load_config,
)
from gated.devices.framing import Code, Framer, Rejected, ScanEvent
from gated.devices.serialport import close_quietly, open_serial
from gated.errors import (
    ApiAuthError,
    ApiError,
    ApiNotFoundError,
    ApiRateLimitedError,
    ApiUnavailableError,
    ConfigError,
    DeviceBrokenError,
    DeviceBusyError,
    DeviceError,
    StateError,
)
from gated.logs import configure_logging, get_logger, redact, register_secret
from gated.state.recovery import connect_read_only, inspect
from gated.state.store import DB_NAME, Store

# This version of gated was released on this date, so a clock that shows an
# earlier time is wrong: a Raspberry Pi without a battery-backed clock starts
# at its last shutdown time, or at 1970, until network time arrives.
RELEASE_DATE: Final = datetime(2026, 12, 1, tzinfo=UTC)
# Age of the oldest undelivered journal event above which diag warns, in
# seconds. The daemon normally delivers an event within seconds, so an older
# one means that the API has been unreachable or rejecting events.
BACKLOG_WARN_AGE_S: Final = 600.0
# Free space below this on the state file system is a warning, in bytes.
# Each journal event takes well under 1 KB, so this leaves room for days of
# offline traffic while the operator reacts.
MIN_FREE_BYTES: Final = 50 * 1024 * 1024
# Deadline of `timedatectl show`, in seconds. It responds at once over D-Bus,
# or fails at once when systemd is not running.
TIMEDATECTL_TIMEOUT_S: Final = 5.0
# File systemd-timesyncd creates once the clock is synchronised.
TIMESYNC_FLAG: Final = Path("/run/systemd/timesync/synchronized")
# How long --scan waits for the first byte from each scanner, in seconds:
# enough to walk to the lane and present a code.
SCAN_TIMEOUT_S: Final = 30.0
# After the first code or rejection, --scan keeps reading for this long, in
# seconds, so that bytes sent after the terminator (LF after CR) are shown too.
SCAN_TRAILING_S: Final = 0.3
# Timeout of one serial read during --scan, in seconds; it bounds how late
# the idle timeout of the framing settings is applied.
SCAN_POLL_S: Final = 0.05
# Bytes shown in the --scan report; a scanner sends tens of bytes per code.
SCAN_SHOWN_BYTES: Final = 256
# Exit status after Ctrl-C, as shells report a process ended by SIGINT.
EXIT_INTERRUPTED: Final = 130

log = get_logger("diag")


class Status(enum.StrEnum):
    PASS = "PASS"  # noqa: S105 - a check status, not a password
    FAIL = "FAIL"
    WARN = "WARN"
    SKIP = "SKIP"


@dataclass
class Check:
    """The result of one check. ``data`` contains machine-readable details for --json."""

    name: str
    status: Status
    detail: str
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "name": self.name,
            "status": self.status.value,
            "detail": redact(self.detail),
            "fix": None if self.fix is None else redact(self.fix),
        }
        if self.data:
            result["data"] = self.data
        return result


class Report:
    """Collect checks and print them: each at once as text, or all at the end as JSON."""

    def __init__(self, out: TextIO, *, json_output: bool) -> None:
        self.out = out
        self.json_output = json_output
        self.checks: list[Check] = []
        self.name_width = 24

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        if not self.json_output:
            self.out.write(format_check(check, self.name_width))
            self.out.flush()
        return check

    def extend(self, checks: Sequence[Check]) -> None:
        for check in checks:
            self.add(check)

    def say(self, text: str) -> None:
        """Print an instruction for the technician, outside the report itself."""
        stream = sys.stderr if self.json_output else self.out
        stream.write(redact(text) + "\n")
        stream.flush()

    @property
    def failed(self) -> bool:
        return any(check.status is Status.FAIL for check in self.checks)

    def finish(self) -> int:
        """Print the summary (or the JSON report) and return the exit status."""
        if self.json_output:
            self.out.write(json.dumps([check.to_json() for check in self.checks], indent=2) + "\n")
        else:
            counts = Counter(check.status for check in self.checks)
            verdict = "FAIL" if self.failed else "PASS"
            summary = ", ".join(f"{counts[status]} {status.value}" for status in Status)
            self.out.write(f"\n{len(self.checks)} checks: {summary}. Result: {verdict}\n")
        self.out.flush()
        return EXIT_FAILURE if self.failed else EXIT_OK


def format_check(check: Check, name_width: int = 24) -> str:
    """Format a check as text lines: status, name, detail, then ``fix:`` when given."""
    indent = " " * 6
    detail_lines = redact(check.detail).splitlines() or [""]
    lines = [f"{check.status.value:<4}  {check.name:<{name_width}} {detail_lines[0]}"]
    lines += [f"{indent}{' ' * (name_width + 1)}{line}" for line in detail_lines[1:]]
    if check.fix:
        lines.append(f"{indent}fix: {redact(check.fix)}")
    return "\n".join(lines) + "\n"


# --- 1. config ----------------------------------------------------------------------


def check_config(path: Path) -> tuple[GatedConfig | None, Check]:
    """Load the config file; return it (or None) and the check."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        count = len(exc.problems)
        detail = f"{path}: {count} {_plural(count, 'problem')}\n" + "\n".join(exc.problems)
        fix = (
            "correct each key listed above in the config file, then run"
            f" `gated check-config --config {path}`"
        )
        if any(problem.startswith("api.access_key: missing") for problem in exc.problems):
            # Outside the service there is no systemd credential directory.
            fix = (
                "the service gets the key as a systemd credential, which a shell does not"
                " have: run diag as `sudo CREDENTIALS_DIRECTORY=/etc/gated"
                f" /opt/gated/bin/gated diag --config {path}` when the key is in"
                " /etc/gated/access_key (the technician's guide shows the encrypted variant)"
            )
        return None, Check("config", Status.FAIL, detail, fix, {"problems": exc.problems})
    if config.api.access_key is not None:
        register_secret(config.api.access_key.get_secret_value())
    lanes = ", ".join(f"{lane.name} ({lane.direction})" for lane in config.lanes)
    return config, Check("config", Status.PASS, f"{path}: valid; lanes: {lanes}")


# --- 2 and 3. state -----------------------------------------------------------------


def _format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024:
            return f"{count:.0f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def check_state_directory(directory: Path) -> Check:
    """Check that the state directory exists, is writable and has free space."""
    name = "state.directory"
    fix_create = (
        f"create {directory} owned by the gated user with mode 0700"
        " (systemd's StateDirectory= does that), or set [state] directory"
    )
    if not directory.exists():
        return Check(name, Status.FAIL, f"{directory} does not exist", fix_create)
    if not directory.is_dir():
        return Check(name, Status.FAIL, f"{directory} is not a directory", fix_create)
    owner = _owner(directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        return Check(
            name,
            Status.FAIL,
            f"{directory} is not writable by this user (owner {owner})",
            "run diag as root (sudo gated diag), or make the directory writable by the gated user",
        )
    free = shutil.disk_usage(directory).free
    detail = f"{directory}: writable, owner {owner}, {_format_bytes(free)} free"
    if free < MIN_FREE_BYTES:
        return Check(
            name,
            Status.WARN,
            detail,
            f"free space on that file system (less than {_format_bytes(MIN_FREE_BYTES)} left):"
            " a full disk makes every opening decision fail as journal_failed",
        )
    return Check(name, Status.PASS, detail, data={"free_bytes": free})


def _owner(path: Path) -> str:
    try:
        return f"{path.owner()}:{path.group()}"
    except (KeyError, OSError):
        info = path.stat()
        return f"{info.st_uid}:{info.st_gid}"


def check_database(config: GatedConfig, now: datetime) -> list[Check]:
    """Check ``gated.db`` read-only: integrity, cache age and the journal backlog."""
    path = config.state.directory / DB_NAME
    if not path.exists():
        return [
            Check(
                "state.database",
                Status.WARN,
                f"{path} does not exist yet",
                "none needed before the first start: gated creates it",
            ),
            Check("journal.backlog", Status.SKIP, "no database yet"),
        ]
    try:
        problem = inspect(path)
    except StateError as exc:
        return [
            Check(
                "state.database",
                Status.FAIL,
                str(exc),
                "run diag as root (sudo gated diag); if it still fails, the file was"
                " written by a newer gated or the disk has I/O errors (see `dmesg`)",
            ),
            Check("journal.backlog", Status.SKIP, "the database could not be read"),
        ]
    if problem is not None:
        return [
            Check(
                "state.database",
                Status.FAIL,
                f"{path} is damaged: {problem}",
                "restart gated (`systemctl restart gated`): it moves the file aside as"
                " gated.db.corrupt-<time>, keeps its undelivered events and rebuilds the"
                " cache from the API",
            ),
            Check("journal.backlog", Status.SKIP, "the database is damaged"),
        ]
    try:
        store = Store(connect_read_only(path), path, recovered_from=None, log=log)
        with store:
            backlog = store.backlog()
            meta = store.sync_meta()
            sessions = len(store.load_sessions())
    except (StateError, sqlite3.Error) as exc:
        return [
            Check("state.database", Status.FAIL, str(exc), "run diag as root (sudo gated diag)"),
            Check("journal.backlog", Status.SKIP, "the database could not be read"),
        ]
    return [
        _database_check(config, path, sessions, meta.synced_at, now),
        _backlog_check(backlog.pending, backlog.oldest_pending_at, backlog.poison, now),
    ]


def _database_check(
    config: GatedConfig, path: Path, sessions: int, synced_at: datetime | None, now: datetime
) -> Check:
    name = "state.database"
    data: dict[str, Any] = {"sessions": sessions, "synced_at": None}
    if synced_at is None:
        detail = f"{path}: integrity ok; {sessions} sessions cached, never synced with the API"
        return Check(name, Status.PASS, detail, data=data)
    age_s = (now - synced_at).total_seconds()
    data.update(synced_at=synced_at.isoformat(), age_s=round(age_s, 1))
    detail = (
        f"{path}: integrity ok; {sessions} sessions cached, last synced"
        f" {synced_at.strftime('%Y-%m-%d %H:%M:%S')} UTC ({age_s / 60:.0f} min ago)"
    )
    if age_s > config.gate.max_cache_age_s:
        policy = config.gate.offline_policy
        effect = (
            "every code is refused as cache_stale"
            if policy == "deny"
            else "lanes still decide from it"
        )
        return Check(
            name,
            Status.WARN,
            detail + f"; older than max_cache_age_s ({config.gate.max_cache_age_s:g} s)",
            f"the API has not been reached for that long, and with offline_policy"
            f" {policy!r} {effect}: fix the API checks below",
            data,
        )
    return Check(name, Status.PASS, detail, data=data)


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else noun + "s"


def _backlog_check(pending: int, oldest: datetime | None, poison: int, now: datetime) -> Check:
    name = "journal.backlog"
    data: dict[str, Any] = {
        "pending": pending,
        "oldest_pending_at": None if oldest is None else oldest.isoformat(),
        "poison": poison,
    }
    detail = f"{pending} undelivered {_plural(pending, 'event')}"
    old = False
    if oldest is not None:
        age_s = (now - oldest).total_seconds()
        old = age_s > BACKLOG_WARN_AGE_S
        detail += (
            f", oldest from {oldest.strftime('%Y-%m-%d %H:%M:%S')} UTC ({age_s / 60:.0f} min ago)"
        )
    detail += f"; {poison} poison {_plural(poison, 'event')}"
    fixes = []
    if old:
        fixes.append(
            f"events older than {BACKLOG_WARN_AGE_S / 60:.0f} min are not being delivered:"
            " fix the API checks below; the daemon retries by itself"
        )
    if poison:
        fixes.append(
            "poison events were rejected by the API for good and need a manual"
            " correction in the operator's back office; `journalctl -u gated | grep"
            " journal.poison` lists them with the reason"
        )
    if fixes:
        return Check(name, Status.WARN, detail, "; ".join(fixes), data)
    return Check(name, Status.PASS, detail, data=data)


# --- 4. API -----------------------------------------------------------------------


async def _list_sessions(config: GatedConfig) -> tuple[SessionListing | ApiError, float]:
    """List the sessions once; return the listing or the error, and the request's time in ms.

    The time covers the request only, not the creation of the HTTP client.
    """
    async with CoordClient.from_config(config.api, access_key(config)) as client:
        started = time.monotonic()
        try:
            result: SessionListing | ApiError = await client.list_sessions()
        except ApiError as exc:
            result = exc
        return result, (time.monotonic() - started) * 1000


def _api_host(config: GatedConfig) -> str:
    """Return the API's host and port; diag never prints a URL."""
    parts = urlsplit(config.api.base_url)
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host


def check_api(config: GatedConfig) -> list[Check]:
    """List the location's sessions once; report reachability, the key and the location."""
    host = _api_host(config)
    location = config.api.location_id
    listing, elapsed_ms = anyio.run(_list_sessions, config)
    if isinstance(listing, ApiError):
        return _api_failure(listing, host, location, elapsed_ms, config.api.timeout_s)
    sessions = listing.sessions or []
    states = Counter(session.state.value for session in sessions)
    by_state = ", ".join(f"{states[state]} {state}" for state in ("pending", "active", "ended"))
    return [
        Check(
            "api.reachable",
            Status.PASS,
            f"{host} answered in {elapsed_ms:.0f} ms",
            data={"latency_ms": round(elapsed_ms, 1)},
        ),
        Check("api.access_key", Status.PASS, "accepted"),
        Check(
            "api.location",
            Status.PASS,
            f"location {location!r} found: {len(sessions)} sessions ({by_state})",
            data={"sessions": len(sessions), **states},
        ),
    ]


def _api_failure(
    exc: ApiError, host: str, location: str, elapsed_ms: float, timeout_s: float
) -> list[Check]:
    answered = Check(
        "api.reachable",
        Status.PASS,
        f"{host} answered in {elapsed_ms:.0f} ms",
        data={"latency_ms": round(elapsed_ms, 1)},
    )
    if isinstance(exc, ApiAuthError):
        return [
            answered,
            Check(
                "api.access_key",
                Status.FAIL,
                f"rejected: {exc}",
                "set api.access_key (or api.access_key_file, GATED_API__ACCESS_KEY or the"
                f" systemd credential access_key) to the key issued for location {location!r}",
            ),
            Check("api.location", Status.SKIP, "not checked: the access key was rejected"),
        ]
    if isinstance(exc, ApiNotFoundError):
        return [
            answered,
            Check("api.access_key", Status.PASS, "not rejected"),
            Check(
                "api.location",
                Status.FAIL,
                f"location {location!r} not found: {exc}",
                "set api.location_id to the id of this car park, and check api.base_url",
            ),
        ]
    if isinstance(exc, ApiRateLimitedError):
        answered.status = Status.WARN
        answered.detail += f", but rate limited: {exc}"
        answered.fix = "wait, then run diag again; other gates may share this access key"
        skipped = "not checked: the request was rate limited"
        return [
            answered,
            Check("api.access_key", Status.SKIP, skipped),
            Check("api.location", Status.SKIP, skipped),
        ]
    if isinstance(exc, ApiUnavailableError):
        first = Check(
            "api.reachable",
            Status.FAIL,
            f"{host}: {exc}",
            f"check the network, DNS and firewall between this computer and {host}, and"
            f" api.base_url; api.timeout_s is {timeout_s:g} s. Gates keep deciding from"
            " the cache meanwhile",
        )
    else:
        first = Check(
            "api.reachable",
            Status.FAIL,
            f"{host} answered, but not as the Coord API does: {exc}",
            "check api.base_url: it must be the parking access API, for example"
            " https://api.coord.co/v1/access/parking",
        )
    skipped = "not checked: the API did not answer"
    return [
        first,
        Check("api.access_key", Status.SKIP, skipped),
        Check("api.location", Status.SKIP, skipped),
    ]


# --- 5. clock ----------------------------------------------------------------------


def clock_synchronised() -> tuple[bool | None, str]:
    """Return whether the system clock is synchronised (None: cannot tell) and the source."""
    timedatectl = shutil.which("timedatectl")
    if timedatectl is not None:
        try:
            result = subprocess.run(  # noqa: S603 - fixed arguments, absolute path
                [timedatectl, "show", "-p", "NTPSynchronized", "--value"],
                capture_output=True,
                text=True,
                timeout=TIMEDATECTL_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is not None and result.returncode == 0:
            value = result.stdout.strip()
            if value in ("yes", "no"):
                return value == "yes", "timedatectl"
    if TIMESYNC_FLAG.exists():
        return True, str(TIMESYNC_FLAG)
    return None, "neither timedatectl nor systemd-timesyncd answered"


def check_clock(
    now: datetime, synchronised: Callable[[], tuple[bool | None, str]] = clock_synchronised
) -> list[Check]:
    """Check that the clock is not before the release date, and that it is synchronised."""
    system_time = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    set_clock = (
        "enable network time with `timedatectl set-ntp true` and check that an NTP server is"
        " reachable; a Raspberry Pi without a real-time clock needs network time at every boot"
    )
    if now < RELEASE_DATE:
        time_check = Check(
            "clock.time",
            Status.FAIL,
            f"the system time {system_time} is before {RELEASE_DATE:%Y-%m-%d}, when this gated was"
            " released; session times and the cache age are wrong",
            set_clock,
        )
    else:
        time_check = Check("clock.time", Status.PASS, system_time)
    state, source = synchronised()
    if state is None:
        sync_check = Check("clock.sync", Status.SKIP, f"cannot tell: {source}")
    elif state:
        sync_check = Check("clock.sync", Status.PASS, f"synchronised (from {source})")
    else:
        sync_check = Check(
            "clock.sync", Status.WARN, f"not synchronised (from {source})", set_clock
        )
    return [time_check, sync_check]


# --- 6. devices ---------------------------------------------------------------------


def _busy_fix(port: str) -> str:
    return (
        f"the port {port} is probably held by the running gated service. `gated status`"
        " shows how the service sees it. To test the port itself (or to use --scan or"
        " --pulse), stop the service first with `systemctl stop gated`; no gate opens"
        " while it is stopped"
    )


def _port_failure(name: str, port: str, exc: DeviceError | ConfigError) -> Check:
    """Turn a failure to open a port into a check naming the cause and the fix."""
    if isinstance(exc, DeviceBusyError):
        detail = f"port {port} is busy: another process holds it (`fuser {port}` names it)"
        return Check(name, Status.FAIL, detail, _busy_fix(port))
    if isinstance(exc, DeviceBrokenError):
        return Check(
            name,
            Status.FAIL,
            str(exc),
            "check the cable and the port setting; `ls -l /dev/serial/by-id/` lists the"
            " connected USB serial devices by stable name",
        )
    if isinstance(exc, ConfigError):
        return Check(name, Status.FAIL, "; ".join(exc.problems), "correct the port setting")
    return Check(
        name,
        Status.FAIL,
        str(exc),
        "run diag as root, or add this user to the group that owns the port (usually dialout)",
    )


def _open_scanner(settings: ScannerSettings) -> Any:
    return open_serial(
        settings.port,
        baudrate=settings.baudrate,
        bytesize=settings.bytesize,
        parity=settings.parity,
        stopbits=settings.stopbits,
        exclusive=True,
    )


def check_scanner(lane: LaneSettings) -> Check:
    """Open the lane's scanner port exclusively and close it again."""
    name = f"lane.{lane.name}.scanner"
    settings = lane.scanner
    try:
        handle = _open_scanner(settings)
    except (DeviceError, ConfigError) as exc:
        return _port_failure(name, settings.port, exc)
    close_quietly(handle)
    line = f"{settings.baudrate} {settings.bytesize}{settings.parity}{settings.stopbits}"
    return Check(name, Status.PASS, f"{settings.port} opens ({line})")


def check_relay(lane: LaneSettings) -> Check:
    """Check that the lane's relay can be driven, without switching it."""
    name = f"lane.{lane.name}.relay"
    settings = lane.relay
    if isinstance(settings, LogRelaySettings):
        return Check(name, Status.PASS, "log driver: pulses are only logged, no relay is wired")
    if isinstance(settings, GpioRelaySettings):
        return _check_gpio(name, settings)
    try:
        handle = open_serial(settings.port, baudrate=settings.baudrate, exclusive=True)
    except (DeviceError, ConfigError) as exc:
        return _port_failure(name, settings.port, exc)
    close_quietly(handle)
    return Check(name, Status.PASS, f"{settings.driver} driver: {settings.port} opens")


def _check_gpio(name: str, settings: GpioRelaySettings) -> Check:
    # Imported here: the gpio driver module is only needed for gpio relays.
    from gated.devices.gpiorelay import INSTALL_HINT, import_gpiod  # noqa: PLC0415

    try:
        module = import_gpiod()
    except DeviceError as exc:
        return Check(name, Status.FAIL, str(exc), INSTALL_HINT)
    if not callable(getattr(module, "request_lines", None)):
        return Check(
            name, Status.FAIL, "the installed gpiod binding is the old v1 API", INSTALL_HINT
        )
    chip = Path(settings.chip)
    if not chip.exists():
        return Check(
            name,
            Status.FAIL,
            f"GPIO chip {chip} does not exist",
            "set chip to one of the chips `ls /dev/gpiochip*` lists",
        )
    if not os.access(chip, os.R_OK | os.W_OK):
        return Check(
            name,
            Status.FAIL,
            f"no permission to use {chip}",
            "run diag as root, or add this user to the group that owns the chip (usually gpio)",
        )
    version = getattr(module, "__version__", "?")
    # NOTE: the line itself is not requested, because the running service
    # has requested it and a second request would fail or disturb it.
    return Check(
        name,
        Status.PASS,
        f"gpiod {version} binding present; {chip} usable (line {settings.line} not requested)",
    )


# --- --scan ---------------------------------------------------------------------------


def read_scan(
    handle: Any, framer: Framer, *, timeout_s: float, clock: Callable[[], float] = time.monotonic
) -> tuple[bytes, list[ScanEvent]]:
    """Read until one scan is framed (plus SCAN_TRAILING_S) or ``timeout_s`` passes.

    Returns every byte received and the events the framer made of them. A
    partial line still pending at the end is ended as the framer would end it
    after ``idle_ms`` of silence.
    """
    handle.timeout = SCAN_POLL_S
    received = bytearray()
    events: list[ScanEvent] = []
    stop_at = clock() + timeout_s
    while clock() < stop_at:
        chunk = handle.read(4096)
        now = clock()
        if chunk:
            received += chunk
            events += framer.feed(chunk, now)
        else:
            events += framer.expire(now)
        if events:
            stop_at = min(stop_at, now + SCAN_TRAILING_S)
    events += framer.expire(math.inf)
    return bytes(received), events


def _printable(data: bytes) -> str:
    """Show bytes as text with escapes for everything that is not printable ASCII."""
    named = {0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t", 0x02: "<STX>", 0x03: "<ETX>", 0x1D: "<GS>"}
    return "".join(
        named.get(byte, chr(byte) if 0x20 <= byte <= 0x7E else f"\\x{byte:02x}") for byte in data
    )


def framing_hints(raw: bytes, settings: ScannerSettings, events: list[ScanEvent]) -> list[str]:
    """Suggest scanner settings from the raw bytes of a scan that was not read as one code."""
    hints: list[str] = []
    body = raw.strip(b"\r\n")
    if any(byte > 0x7E for byte in raw):
        hints.append(
            "bytes above 0x7E usually mean a wrong baudrate, bytesize or parity: set them"
            " to the scanner's values (often 9600 or 115200 baud, 8N1)"
        )
    if raw[:1] == b"\x02" and b"\x03" in raw and not settings.stx_etx:
        hints.append("the scanner frames codes with STX and ETX: set stx_etx = true")
    if settings.stx_etx and b"\x02" not in raw:
        hints.append("no STX byte arrived: set stx_etx = false")
    if body[:1] == b"]" and len(body) > 3 and not settings.strip_aim:
        hints.append(
            f"the code starts with the AIM identifier {_printable(body[:3])!r}:"
            " set strip_aim = true"
        )
    if not settings.stx_etx:
        hints += _terminator_hints(raw, settings)
    for event in events:
        if isinstance(event, Rejected) and event.reason == "too_long":
            hints.append(
                f"the line is longer than max_length ({settings.max_length} bytes):"
                " raise max_length, or check the terminator"
            )
    if not hints and any(isinstance(event, Rejected) for event in events):
        hints.append(
            f"the code does not match pattern {settings.pattern!r}: change pattern to accept it,"
            " or configure the scanner to send only the code"
        )
    return hints


def _terminator_hints(raw: bytes, settings: ScannerSettings) -> list[str]:
    ending = raw.rstrip()
    trailer = raw[len(ending) :]
    endings = {b"\r\n": "crlf", b"\r": "cr", b"\n": "lf"}
    sent = endings.get(trailer[-2:]) or endings.get(trailer[-1:])
    custom = any(raw.endswith(terminator) for terminator in settings.terminator_bytes)
    if settings.terminator == "idle" or custom:
        return []
    if sent is None:
        return [
            'no CR or LF came after the code: set terminator = "idle", add the scanner\'s'
            " suffix to terminators, or configure the scanner to send CR after each code"
        ]
    accepted = {"any": {"cr", "lf", "crlf"}, "cr": {"cr", "crlf"}, "lf": {"lf", "crlf"}}
    if settings.terminator == "crlf" and sent != "crlf":
        return [f'the scanner ends codes with {sent.upper()}: set terminator = "any"']
    if sent not in accepted.get(settings.terminator, {"crlf"}):
        return [f'the scanner ends codes with {sent.upper()}: set terminator = "any"']
    return []


def scan_lane(
    lane: LaneSettings, *, prompt: Callable[[LaneSettings], None], timeout_s: float = SCAN_TIMEOUT_S
) -> Check:
    """Wait for one scan on a lane and report its raw bytes and the parsed code."""
    name = f"lane.{lane.name}.scan"
    try:
        handle = _open_scanner(lane.scanner)
    except (DeviceError, ConfigError) as exc:
        return _port_failure(name, lane.scanner.port, exc)
    try:
        prompt(lane)
        raw, events = read_scan(handle, Framer(lane.scanner), timeout_s=timeout_s)
    except (serial.SerialException, OSError) as exc:
        # diag reads the port itself, so pyserial's errors end here.
        return Check(
            name,
            Status.FAIL,
            f"reading {lane.scanner.port} failed: {exc}",
            "check the cable: the device went away during the scan",
        )
    finally:
        close_quietly(handle)

    if not raw:
        return Check(
            name,
            Status.FAIL,
            f"no byte arrived within {timeout_s:g} s",
            "check that the scanner is in serial mode (USB CDC or virtual COM port), not"
            " keyboard (HID) mode, and that a code is presented; see the scanner's manual",
        )
    return _scan_result(name, raw, events, lane.scanner)


def _scan_result(
    name: str, raw: bytes, events: list[ScanEvent], settings: ScannerSettings
) -> Check:
    """Build the --scan check from the bytes received and the events framed from them."""
    head = raw[:SCAN_SHOWN_BYTES]
    more = f" (first {SCAN_SHOWN_BYTES} of {len(raw)})" if len(raw) > SCAN_SHOWN_BYTES else ""
    byte_lines = [f"bytes{more}: {head.hex(' ')}", f"as text: {_printable(head)}"]
    codes = [event.text for event in events if isinstance(event, Code)]
    rejected = [event.reason.value for event in events if isinstance(event, Rejected)]
    data: dict[str, Any] = {"raw_hex": raw.hex(" "), "codes": codes, "rejected": rejected}

    if codes and not rejected:
        parsed = ", ".join(repr(code) for code in codes)
        return Check(name, Status.PASS, "\n".join([f"code {parsed}", *byte_lines]), data=data)
    if not codes and not rejected:
        # The framer drops lines of whitespace only.
        return Check(
            name,
            Status.FAIL,
            "\n".join(["only whitespace arrived, no code", *byte_lines]),
            "present the code again; if this repeats, check the scanner's output settings",
            data,
        )

    outcome = ", ".join(f"rejected as {reason}" for reason in rejected)
    if codes:
        outcome = f"code {', '.join(repr(code) for code in codes)}; also {outcome}"
    hints = framing_hints(raw, settings, events)
    fix = "; ".join(hints) + " (in this lane's [lanes.scanner] table)"
    return Check(name, Status.FAIL, "\n".join([outcome, *byte_lines]), fix, data)


# --- --pulse ----------------------------------------------------------------------------


async def _pulse(lane: LaneSettings) -> None:
    # Imported here: the relay drivers are needed only for --pulse.
    from gated.devices.relay import make_relay  # noqa: PLC0415

    relay = make_relay(lane.name, lane.relay)
    try:
        await relay.open()
        if not relay.available:
            raise DeviceError(f"relay {relay.name} did not open; see the warning above")
        await relay.pulse()
    finally:
        await relay.aclose()


def _relay_commands(settings: RelaySettings) -> str:
    on = getattr(settings, "on_bytes", None)
    off = getattr(settings, "off_bytes", None)
    if isinstance(on, bytes) and isinstance(off, bytes):
        return f" (sent {on.hex(' ').upper()}, then {off.hex(' ').upper()})"
    return ""


def pulse_lane(
    config: GatedConfig, lane_name: str, *, confirmed: bool, ask: Callable[[str], str]
) -> Check:
    """Pulse one lane's relay once, after confirmation, and switch it off."""
    name = f"lane.{lane_name}.pulse"
    lane = next((lane for lane in config.lanes if lane.name == lane_name), None)
    if lane is None:
        names = ", ".join(lane.name for lane in config.lanes)
        return Check(name, Status.FAIL, f"no lane is named {lane_name!r}", f"use one of: {names}")
    opened = check_relay(lane)
    if opened.status is Status.FAIL:
        return Check(name, Status.FAIL, opened.detail, opened.fix)
    if not confirmed:
        answer = ask(f"Pulse the relay of {lane_name} now? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return Check(name, Status.SKIP, "not confirmed; the relay was not switched")
    try:
        anyio.run(_pulse, lane)
    except DeviceError as exc:
        return Check(
            name,
            Status.FAIL,
            str(exc),
            "check the relay board's cable and power, and the [lanes.relay] settings",
        )
    commands = _relay_commands(lane.relay)
    return Check(
        name,
        Status.PASS,
        f"relay switched on for {lane.relay.pulse_ms} ms, then off{commands};"
        " check that the barrier opened",
    )


# --- command -----------------------------------------------------------------------------


def run_diag(
    args: argparse.Namespace,
    *,
    out: TextIO,
    ask: Callable[[str], str],
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    synchronised: Callable[[], tuple[bool | None, str]] = clock_synchronised,
    scan_timeout_s: float = SCAN_TIMEOUT_S,
) -> int:
    """Run the checks that ``args`` selects, print the report and return the exit status."""
    report = Report(out, json_output=args.json)
    if not args.json:
        report.say(f"gated diag: {args.config}")
    config, config_check = check_config(args.config)
    report.add(config_check)
    if config is None:
        report.finish()
        return EXIT_CONFIG
    longest = max(len(f"lane.{lane.name}.scanner") for lane in config.lanes)
    report.name_width = max(report.name_width, longest)

    report.add(check_state_directory(config.state.directory))
    report.extend(check_database(config, now()))
    report.extend(check_api(config))
    report.extend(check_clock(now(), synchronised))
    scanners_open: dict[str, bool] = {}
    for lane in config.lanes:
        scanner = report.add(check_scanner(lane))
        scanners_open[lane.name] = scanner.status is Status.PASS
        report.add(check_relay(lane))

    if args.scan:
        for lane in config.lanes:
            if not scanners_open[lane.name]:
                report.add(
                    Check(f"lane.{lane.name}.scan", Status.SKIP, "the scanner port did not open")
                )
                continue

            def prompt(lane: LaneSettings) -> None:
                report.say(
                    f"lane {lane.name}: present a code to the scanner on {lane.scanner.port}"
                    f" (waiting up to {scan_timeout_s:g} s)"
                )

            report.add(scan_lane(lane, prompt=prompt, timeout_s=scan_timeout_s))
    if args.pulse is not None:
        report.add(pulse_lane(config, args.pulse, confirmed=args.yes, ask=ask))
    return report.finish()


def _ask_on_terminal(question: str, *, stream: TextIO) -> str:
    stream.write(question)
    stream.flush()
    try:
        return input()
    except EOFError:
        return ""


def main(args: argparse.Namespace) -> int:
    """Run ``gated diag`` with the parsed command line."""
    # Warnings of the modules diag uses (a relay that does not open) go to
    # stderr, so that stdout holds only the report.
    configure_logging("WARNING", json=False, stream=sys.stderr)
    prompt_stream = sys.stderr if args.json else sys.stdout
    try:
        return run_diag(
            args,
            out=sys.stdout,
            ask=lambda question: _ask_on_terminal(question, stream=prompt_stream),
        )
    except KeyboardInterrupt:
        # Ports and relays are closed (and relays switched off) on the way out.
        print("\ngated diag: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
