"""Run the real daemon as a child process on pseudo-terminals, for end-to-end tests.

Each lane gets two ptys: the daemon opens the scanner's slave and the relay's
slave, and the test writes codes to the scanner's master and reads relay
commands from the relay's master. The daemon logs JSON lines to a file, which
the test reads to follow decisions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gated.config import lcus_frame
from gated.demo import Pty

RELAY_ON = lcus_frame(1, True)
RELAY_OFF = lcus_frame(1, False)

# Generous deadlines for a loaded 2-core CI machine; they bound a hung test,
# they are not speed targets.
READY_TIMEOUT_S = 30.0
DECISION_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


class PtyPair(Pty):
    """The demo's pty pair, with the reads and writes a test needs."""

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_available(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@dataclass
class LanePtys:
    name: str
    direction: str
    scanner: PtyPair
    relay: PtyPair
    relay_bytes: bytearray = field(default_factory=bytearray)

    def poll_relay(self) -> bytes:
        self.relay_bytes += self.relay.read_available()
        return bytes(self.relay_bytes)

    def pulses(self) -> int:
        """Count ON commands the daemon sent to this lane's relay."""
        return self.poll_relay().count(RELAY_ON)


def render_config(
    *,
    base_url: str,
    access_key: str,
    state_dir: Path,
    runtime_dir: Path,
    lanes: list[LanePtys],
    gate: dict[str, Any] | None = None,
    api: dict[str, Any] | None = None,
    log_level: str = "DEBUG",
) -> str:
    def values(table: dict[str, Any]) -> str:
        return "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())

    api_table = {
        "base_url": base_url,
        "location_id": "demo",
        "access_key": access_key,
        "timeout_s": 2.0,
        "poll_interval_s": 0.5,
        "lookup_timeout_s": 1.0,
        "max_backoff_s": 1.0,
        **(api or {}),
    }
    text = "[api]\n" + values(api_table)
    text += f'[state]\ndirectory = "{state_dir}"\n'
    text += f'[runtime]\ndirectory = "{runtime_dir}"\n'
    text += "[gate]\n" + values({"debounce_s": 1.0, **(gate or {})})
    text += f'[logging]\nlevel = "{log_level}"\njson = true\n'
    for lane in lanes:
        text += f'[[lanes]]\nname = "{lane.name}"\ndirection = "{lane.direction}"\n'
        text += f'[lanes.scanner]\nport = "{lane.scanner.path}"\n'
        text += (
            f'[lanes.relay]\ndriver = "serial"\nport = "{lane.relay.path}"\n'
            'board = "lcus-1"\npulse_ms = 50\nsettle_ms = 0\nmin_gap_ms = 0\n'
        )
    return text


class GateProcess:
    """The daemon in a child process, with its ptys, config and log."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        base_url: str,
        access_key: str,
        lanes: tuple[tuple[str, str], ...] = (("entry-1", "entry"), ("exit-1", "exit")),
        gate: dict[str, Any] | None = None,
        api: dict[str, Any] | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.lanes = {
            name: LanePtys(name, direction, PtyPair.open(), PtyPair.open())
            for name, direction in lanes
        }
        self.state_dir = tmp_path / "state"
        self.config_path = tmp_path / "gated.toml"
        self.config_path.write_text(
            render_config(
                base_url=base_url,
                access_key=access_key,
                state_dir=self.state_dir,
                runtime_dir=tmp_path / "run",
                lanes=list(self.lanes.values()),
                gate=gate,
                api=api,
            ),
            encoding="utf-8",
        )
        self.log_path = tmp_path / "gated.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._read_offset = 0
        self._events: list[dict[str, Any]] = []
        self.starts = 0

    # --- process ---------------------------------------------------------------

    def start(self, *, wait_ready: bool = True, env_extra: dict[str, str] | None = None) -> None:
        assert self.process is None or self.process.poll() is not None
        self.starts += 1
        log_file = self.log_path.open("ab")
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        env.update(env_extra or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gated", "run", "--config", str(self.config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log_file.close()
        if wait_ready:
            self.wait_for(
                lambda e: e.get("event") == "daemon.ready", READY_TIMEOUT_S, since_start=True
            )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
        for lane in self.lanes.values():
            lane.scanner.close()
            lane.relay.close()

    # --- log ---------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Return every JSON log event so far (non-JSON lines are kept as ``raw``)."""
        if self.log_path.exists():
            with self.log_path.open("rb") as handle:
                handle.seek(self._read_offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1
            self._read_offset += end
            for line in data[:end].splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"raw": line.decode("utf-8", "replace")}
                if not isinstance(event, dict):
                    event = {"raw": line.decode("utf-8", "replace")}
                event["_start"] = self.starts
                self._events.append(event)
        return self._events

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float = DECISION_TIMEOUT_S,
        *,
        since: int = 0,
        since_start: bool = False,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            events = self.events()
            for event in events[since:]:
                if since_start and event.get("_start") != self.starts:
                    continue
                if predicate(event):
                    return event
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode}; log:\n{self.log_text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no matching log event in {timeout_s} s; log tail:\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.01)

    def decisions(self, lane: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e.get("event") == "lane.decision" and (lane is None or e.get("lane") == lane)
        ]

    # --- lanes -------------------------------------------------------------------

    def scan(self, lane: str, data: bytes | str, *, terminator: bytes = b"\r\n") -> dict[str, Any]:
        """Type a code into a lane's scanner and return the decision event."""
        raw = data.encode() if isinstance(data, str) else data
        since = len(self.events())
        self.lanes[lane].scanner.write(raw + terminator)
        return self.wait_for(
            lambda e: e.get("event") == "lane.decision" and e.get("lane") == lane, since=since
        )

    def wait_relay_off(self, lane: str, pulses: int, timeout_s: float = DECISION_TIMEOUT_S) -> None:
        """Wait until the lane's relay got ``pulses`` ON commands each followed by OFF."""
        deadline = time.monotonic() + timeout_s
        ptys = self.lanes[lane]
        while time.monotonic() < deadline:
            data = ptys.poll_relay()
            if (
                data.count(RELAY_ON) >= pulses
                and data.rstrip(RELAY_OFF) != data
                and data.endswith(RELAY_OFF)
            ):
                return
            time.sleep(0.01)
        raise AssertionError(f"relay of {lane}: {bytes(ptys.relay_bytes).hex(' ')}")
