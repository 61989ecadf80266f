"""`gated diag` against the simulator on loopback, ptys as ports, and SQLite on disk."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import serial

from gated.config import ScannerSettings, load_config
from gated.devices.framing import Framer
from gated.diag import (
    RELEASE_DATE,
    Check,
    Status,
    check_clock,
    check_database,
    check_relay,
    format_check,
    framing_hints,
    read_scan,
    run_diag,
    scan_lane,
)
from gated.state.store import DB_NAME, Store
from tests.harness import RELAY_OFF, RELAY_ON, LanePtys, PtyPair, render_config
from tests.simhelpers import SimulatorHandle, running_simulator

# Bounds a subprocess that hangs; a passing run takes about a second.
SUBPROCESS_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator() as handle:
        handle.create_session()
        handle.create_session()
        yield handle


# Installations made by the running test; their ptys are closed after it.
_installations: list[Installation] = []


@pytest.fixture(autouse=True)
def _clean_up(sim: SimulatorHandle) -> Iterator[None]:
    sim.clear_faults()
    yield
    sim.clear_faults()
    while _installations:
        _installations.pop().close()


@dataclass
class Installation:
    """A config file whose lanes use ptys, with a state directory on disk."""

    tmp_path: Path
    lanes: dict[str, LanePtys]
    config_path: Path
    state_dir: Path

    def lane(self, name: str = "entry-1") -> LanePtys:
        return self.lanes[name]

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.scanner.close()
            lane.relay.close()


def install(
    tmp_path: Path,
    sim: SimulatorHandle,
    *,
    access_key: str | None = None,
    base_url: str | None = None,
    api: dict[str, Any] | None = None,
    lane_names: tuple[tuple[str, str], ...] = (("entry-1", "entry"), ("exit-1", "exit")),
    scanner_extra: str = "",
) -> Installation:
    lanes = {
        name: LanePtys(name, direction, PtyPair.open(), PtyPair.open())
        for name, direction in lane_names
    }
    state_dir = tmp_path / "state"
    text = render_config(
        base_url=base_url or sim.base_url,
        access_key=access_key or sim.access_key,
        state_dir=state_dir,
        runtime_dir=tmp_path / "run",
        lanes=list(lanes.values()),
        api=api,
    )
    if scanner_extra:
        text = text.replace("[lanes.relay]", scanner_extra + "\n[lanes.relay]")
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "gated.toml"
    config_path.write_text(text, encoding="utf-8")
    Store.open(state_dir).close()
    setup = Installation(tmp_path, lanes, config_path, state_dir)
    _installations.append(setup)
    return setup


@pytest.fixture
def installation(tmp_path: Path, sim: SimulatorHandle) -> Installation:
    return install(tmp_path, sim)


def diag_args(config_path: Path, **overrides: Any) -> argparse.Namespace:
    values: dict[str, Any] = {
        "config": config_path,
        "json": False,
        "scan": False,
        "pulse": None,
        "yes": False,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def run(setup: Installation, answer: str = "", **overrides: Any) -> tuple[int, str, list[str]]:
    """Run diag in-process; return the exit status, the output and the questions asked."""
    out = io.StringIO()
    questions: list[str] = []

    def ask(question: str) -> str:
        questions.append(question)
        return answer

    status = run_diag(
        diag_args(setup.config_path, **overrides),
        out=out,
        ask=ask,
        synchronised=lambda: (True, "test"),
        scan_timeout_s=0.2,
    )
    return status, out.getvalue(), questions


def line_of(output: str, name: str) -> str:
    """Return the report line of the check named ``name``."""
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == name:
            return line
    raise AssertionError(f"no check {name!r} in:\n{output}")


def fix_after(output: str, name: str) -> str:
    """Return the text from the check's line up to the next check line."""
    lines = output.splitlines()
    start = lines.index(line_of(output, name))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if line[:4] in ("PASS", "FAIL", "WARN", "SKIP"):
            break
        block.append(line)
    return "\n".join(block)


# --- whole runs --------------------------------------------------------------------


def test_healthy_installation_exits_zero(installation: Installation, sim: SimulatorHandle) -> None:
    status, output, _ = run(installation)

    assert status == 0, output
    for name in (
        "config",
        "state.directory",
        "state.database",
        "journal.backlog",
        "api.reachable",
        "api.access_key",
        "api.location",
        "clock.time",
        "clock.sync",
        "lane.entry-1.scanner",
        "lane.entry-1.relay",
        "lane.exit-1.scanner",
        "lane.exit-1.relay",
    ):
        assert line_of(output, name).startswith("PASS"), output
    assert "sessions (" in line_of(output, "api.location")
    assert "Result: PASS" in output
    assert sim.access_key not in output


def test_wrong_access_key_fails_naming_key(tmp_path: Path, sim: SimulatorHandle) -> None:
    wrong_key = "wrong-key-7c1f0e9a2b"
    setup = install(tmp_path, sim, access_key=wrong_key)

    status, output, _ = run(setup)

    assert status == 1
    assert line_of(output, "api.reachable").startswith("PASS")
    assert line_of(output, "api.access_key").startswith("FAIL")
    assert "api.access_key" in fix_after(output, "api.access_key").split("fix:")[1]
    assert line_of(output, "api.location").startswith("SKIP")
    assert wrong_key not in output
    assert sim.access_key not in output


def test_key_pasted_as_location_redacted(tmp_path: Path, sim: SimulatorHandle) -> None:
    setup = install(tmp_path, sim)
    text = setup.config_path.read_text()
    setup.config_path.write_text(
        text.replace('location_id = "demo"', f'location_id = "{sim.access_key}"')
    )

    status, output, _ = run(setup)
    _, json_output, _ = run(setup, json=True)

    assert status == 1
    assert line_of(output, "api.location").startswith("FAIL")
    assert "[REDACTED]" in line_of(output, "api.location")
    assert sim.access_key not in output
    assert sim.access_key not in json_output


def test_json_report_parses(tmp_path: Path, sim: SimulatorHandle) -> None:
    wrong_key = "wrong-key-json-55d0c1"
    setup = install(tmp_path, sim, access_key=wrong_key)

    status, output, _ = run(setup, json=True)

    checks = json.loads(output)
    assert status == 1
    assert isinstance(checks, list)
    assert all(set(check) >= {"name", "status", "detail", "fix"} for check in checks)
    by_name = {check["name"]: check for check in checks}
    assert by_name["api.access_key"]["status"] == "FAIL"
    assert "api.access_key" in by_name["api.access_key"]["fix"]
    assert by_name["config"]["status"] == "PASS"
    assert wrong_key not in output


def test_api_port_closed_fails(tmp_path: Path, sim: SimulatorHandle) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    setup = install(tmp_path, sim, base_url=f"http://127.0.0.1:{closed_port}/v1/access/parking")

    status, output, _ = run(setup)

    assert status == 1
    assert line_of(output, "api.reachable").startswith("FAIL")
    assert f"127.0.0.1:{closed_port}" in line_of(output, "api.reachable")
    assert line_of(output, "api.access_key").startswith("SKIP")
    assert "fix: check the network" in fix_after(output, "api.reachable")


def test_api_hang_times_out(tmp_path: Path, sim: SimulatorHandle) -> None:
    setup = install(tmp_path, sim, api={"timeout_s": 0.3})
    sim.set_faults(hang=True)

    status, output, _ = run(setup)

    assert status == 1
    assert line_of(output, "api.reachable").startswith("FAIL")
    assert "timed out" in line_of(output, "api.reachable")


def test_unknown_location_fails(tmp_path: Path, sim: SimulatorHandle) -> None:
    setup = install(tmp_path, sim)
    text = setup.config_path.read_text().replace('location_id = "demo"', 'location_id = "nowhere"')
    setup.config_path.write_text(text)

    status, output, _ = run(setup)

    assert status == 1
    assert line_of(output, "api.location").startswith("FAIL")
    assert "api.location_id" in fix_after(output, "api.location")


def test_invalid_config_exits_78(tmp_path: Path) -> None:
    config_path = tmp_path / "gated.toml"
    config_path.write_text('[api]\nlocation_id = ""\n[gate]\npassback = "maybe"\n')
    out = io.StringIO()

    status = run_diag(diag_args(config_path), out=out, ask=lambda _: "")

    output = out.getvalue()
    assert status == 78
    assert line_of(output, "config").startswith("FAIL")
    assert "api.location_id" in output
    assert "gate.passback" in output
    assert "lanes" in output
    assert "fix: correct each key" in output


def test_missing_key_names_credential(
    tmp_path: Path, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = install(tmp_path, sim)
    text = setup.config_path.read_text()
    setup.config_path.write_text(text.replace(f'access_key = "{sim.access_key}"\n', ""))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("GATED_API__ACCESS_KEY", raising=False)

    missing_status, missing_output, _ = run(setup)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "access_key").write_text(sim.access_key + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    found_status, found_output, _ = run(setup)

    assert missing_status == 78
    assert "api.access_key: missing" in missing_output
    assert "CREDENTIALS_DIRECTORY=/etc/gated" in missing_output
    assert found_status == 0, found_output
    assert sim.access_key not in found_output


def test_scanner_port_busy_says_busy(installation: Installation) -> None:
    port = installation.lane().scanner.path
    holder = serial.Serial(port, exclusive=True)
    try:
        status, output, _ = run(installation)
    finally:
        holder.close()

    assert status == 1
    block = fix_after(output, "lane.entry-1.scanner")
    assert block.startswith("FAIL")
    assert "busy" in block
    assert "systemctl stop gated" in block
    assert "gated status" in block
    assert line_of(output, "lane.exit-1.scanner").startswith("PASS")


def test_relay_port_busy_says_busy(installation: Installation) -> None:
    holder = serial.Serial(installation.lane("exit-1").relay.path, exclusive=True)
    try:
        status, output, _ = run(installation)
    finally:
        holder.close()

    assert status == 1
    assert "busy" in line_of(output, "lane.exit-1.relay")
    assert line_of(output, "lane.exit-1.relay").startswith("FAIL")


def test_missing_scanner_port_fails(tmp_path: Path, sim: SimulatorHandle) -> None:
    setup = install(tmp_path, sim)
    missing = str(tmp_path / "ttyUSB9")
    text = setup.config_path.read_text().replace(setup.lane().scanner.path, missing)
    setup.config_path.write_text(text)

    status, output, _ = run(setup)

    assert status == 1
    assert line_of(output, "lane.entry-1.scanner").startswith("FAIL")
    assert "/dev/serial/by-id/" in fix_after(output, "lane.entry-1.scanner")


# --- state and journal --------------------------------------------------------------


def test_database_missing_is_warning(tmp_path: Path, sim: SimulatorHandle) -> None:
    setup = install(tmp_path, sim)
    (setup.state_dir / DB_NAME).unlink()

    status, output, _ = run(setup)

    assert status == 0, output
    assert line_of(output, "state.database").startswith("WARN")
    assert line_of(output, "journal.backlog").startswith("SKIP")
    assert not (setup.state_dir / DB_NAME).exists()


def test_damaged_database_fails_untouched(tmp_path: Path, sim: SimulatorHandle) -> None:
    setup = install(tmp_path, sim)
    database = setup.state_dir / DB_NAME
    garbage = b"this is not a database " * 200
    database.write_bytes(garbage)

    status, output, _ = run(setup)

    assert status == 1
    assert line_of(output, "state.database").startswith("FAIL")
    assert "systemctl restart gated" in fix_after(output, "state.database")
    assert database.read_bytes() == garbage
    assert sorted(p.name for p in setup.state_dir.iterdir()) == [DB_NAME]


def test_diag_leaves_database_unchanged(installation: Installation) -> None:
    database = installation.state_dir / DB_NAME
    before = database.read_bytes()

    run(installation)

    assert database.read_bytes() == before


def test_old_backlog_and_poison_warn(tmp_path: Path, sim: SimulatorHandle) -> None:
    setup = install(tmp_path, sim)
    now = datetime.now(UTC)
    with Store.open(setup.state_dir) as store:
        old = store.append_event(
            session_id="s-1",
            lane="entry-1",
            kind="start",
            occurred_at=now - timedelta(hours=2),
            code_masked="****1234",
        )
        poison = store.append_event(
            session_id="s-2", lane="exit-1", kind="end", occurred_at=now, code_masked=None
        )
        store.mark_poison(poison.event_id, reason="rejected with status 422")
    config = load_config(setup.config_path)

    checks = {check.name: check for check in check_database(config, now)}

    backlog = checks["journal.backlog"]
    assert backlog.status is Status.WARN
    assert backlog.data["pending"] == 1
    assert backlog.data["poison"] == 1
    assert backlog.data["oldest_pending_at"] == old.occurred_at.isoformat()
    assert backlog.fix is not None
    assert "not being delivered" in backlog.fix
    assert "poison" in backlog.fix
    assert checks["state.database"].status is Status.PASS


def test_recent_backlog_passes(tmp_path: Path, sim: SimulatorHandle) -> None:
    setup = install(tmp_path, sim)
    now = datetime.now(UTC)
    with Store.open(setup.state_dir) as store:
        store.append_event(
            session_id="s-1", lane="entry-1", kind="start", occurred_at=now, code_masked=None
        )

    checks = {c.name: c for c in check_database(load_config(setup.config_path), now)}

    assert checks["journal.backlog"].status is Status.PASS
    assert checks["journal.backlog"].data["pending"] == 1


# --- clock -------------------------------------------------------------------------


def test_clock_before_release_fails() -> None:
    checks = check_clock(datetime(2020, 1, 1, tzinfo=UTC), lambda: (True, "test"))

    assert checks[0].name == "clock.time"
    assert checks[0].status is Status.FAIL
    assert checks[0].fix is not None
    assert "timedatectl set-ntp true" in checks[0].fix


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        ((True, "timedatectl"), Status.PASS),
        ((False, "timedatectl"), Status.WARN),
        ((None, "cannot tell"), Status.SKIP),
    ],
)
def test_clock_sync_states(probe: tuple[bool | None, str], expected: Status) -> None:
    checks = check_clock(RELEASE_DATE + timedelta(days=1), lambda: probe)

    assert checks[0].status is Status.PASS
    assert checks[1].name == "clock.sync"
    assert checks[1].status is expected


# --- relay drivers -------------------------------------------------------------------


def test_log_relay_passes(tmp_path: Path, sim: SimulatorHandle) -> None:
    setup = install(tmp_path, sim, lane_names=(("entry-1", "entry"),))
    text = setup.config_path.read_text()
    relay_table = text[text.index("[lanes.relay]") :]
    setup.config_path.write_text(text.replace(relay_table, '[lanes.relay]\ndriver = "log"\n'))
    lane = load_config(setup.config_path).lanes[0]

    check = check_relay(lane)

    assert check.status is Status.PASS
    assert "log driver" in check.detail


def gpio_lane(tmp_path: Path, sim: SimulatorHandle, chip: Path) -> Any:
    setup = install(tmp_path, sim, lane_names=(("entry-1", "entry"),))
    text = setup.config_path.read_text()
    relay_table = text[text.index("[lanes.relay]") :]
    gpio = f'[lanes.relay]\ndriver = "gpio"\nchip = "{chip}"\nline = 17\n'
    setup.config_path.write_text(text.replace(relay_table, gpio))
    return load_config(setup.config_path).lanes[0]


def test_gpio_relay_without_binding_fails(
    tmp_path: Path, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gpiod", None)  # makes `import gpiod` fail
    lane = gpio_lane(tmp_path, sim, tmp_path / "gpiochip0")

    check = check_relay(lane)

    assert check.status is Status.FAIL
    assert check.fix is not None
    assert "gpiod" in check.fix


def test_gpio_relay_chip_checked(
    tmp_path: Path, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("gpiod")
    fake.request_lines = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    fake.__version__ = "2.2.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gpiod", fake)
    chip = tmp_path / "gpiochip0"

    missing = check_relay(gpio_lane(tmp_path / "a", sim, chip))
    chip.write_bytes(b"")
    present = check_relay(gpio_lane(tmp_path / "b", sim, chip))

    assert missing.status is Status.FAIL
    assert "does not exist" in missing.detail
    assert present.status is Status.PASS
    assert "2.2.0" in present.detail


# --- --pulse -----------------------------------------------------------------------


def test_pulse_with_yes_writes_relay(installation: Installation) -> None:
    relay = installation.lane().relay

    status, output, questions = run(installation, pulse="entry-1", yes=True)

    data = relay.read_available()
    assert status == 0, output
    assert questions == []
    assert line_of(output, "lane.entry-1.pulse").startswith("PASS")
    assert RELAY_ON in data
    assert data.endswith(RELAY_OFF)
    assert data.index(RELAY_OFF) < data.index(RELAY_ON)
    assert installation.lane("exit-1").relay.read_available() == b""


def test_pulse_asks_and_accepts_yes(installation: Installation) -> None:
    status, output, questions = run(installation, answer="y\n", pulse="entry-1")

    assert status == 0, output
    assert questions == ["Pulse the relay of entry-1 now? [y/N] "]
    assert RELAY_ON in installation.lane().relay.read_available()


def test_pulse_declined_switches_nothing(installation: Installation) -> None:
    status, output, questions = run(installation, answer="\n", pulse="entry-1")

    assert status == 0, output
    assert len(questions) == 1
    assert line_of(output, "lane.entry-1.pulse").startswith("SKIP")
    assert installation.lane().relay.read_available() == b""


def test_pulse_unknown_lane_fails(installation: Installation) -> None:
    status, output, _ = run(installation, pulse="entry-9", yes=True)

    assert status == 1
    assert "entry-1, exit-1" in fix_after(output, "lane.entry-9.pulse")


def test_pulse_busy_relay_fails(installation: Installation) -> None:
    holder = serial.Serial(installation.lane().relay.path, exclusive=True)
    try:
        status, output, _ = run(installation, pulse="entry-1", yes=True)
    finally:
        holder.close()

    assert status == 1
    assert "busy" in line_of(output, "lane.entry-1.pulse")
    assert RELAY_ON not in installation.lane().relay.read_available()


# --- --scan ------------------------------------------------------------------------


def scan_with(
    installation: Installation, data: bytes, *, timeout_s: float = 5.0, **scanner: Any
) -> Check:
    config = load_config(installation.config_path)
    lane = config.lanes[0]
    if scanner:
        lane = lane.model_copy(update={"scanner": lane.scanner.model_copy(update=scanner)})
    pty = installation.lane(lane.name).scanner
    return scan_lane(lane, prompt=lambda _lane: pty.write(data), timeout_s=timeout_s)


def test_scan_shows_hex_and_code(installation: Installation) -> None:
    check = scan_with(installation, b"]Q1ABC123\r\n", strip_aim=True)

    assert check.status is Status.PASS, format_check(check)
    assert "code 'ABC123'" in check.detail
    assert "5d 51 31 41 42 43 31 32 33 0d 0a" in check.detail
    assert "as text: ]Q1ABC123\\r\\n" in check.detail
    assert check.data["codes"] == ["ABC123"]


def test_scan_wrong_terminator_hints(installation: Installation) -> None:
    check = scan_with(installation, b"ABC123\n", terminator="cr", idle_ms=50)

    assert check.status is Status.FAIL
    assert "incomplete_code" in check.detail
    assert "41 42 43 31 32 33 0a" in check.detail
    assert check.fix is not None
    assert 'terminator = "any"' in check.fix


def test_scan_whitespace_only_fails(installation: Installation) -> None:
    # Whitespace frames no event, so the scan waits out its whole timeout.
    check = scan_with(installation, b"\r\n", timeout_s=0.5)

    assert check.status is Status.FAIL
    assert "only whitespace" in check.detail
    assert "0d 0a" in check.detail


def test_scan_timeout_without_bytes(installation: Installation) -> None:
    config = load_config(installation.config_path)

    check = scan_lane(config.lanes[0], prompt=lambda _lane: None, timeout_s=0.2)

    assert check.status is Status.FAIL
    assert "no byte arrived" in check.detail
    assert check.fix is not None
    assert "keyboard (HID)" in check.fix


class ScriptedPort:
    """A port whose reads return scripted chunks, for read_scan with a fake clock."""

    def __init__(self, chunks: list[bytes], clock: list[float]) -> None:
        self.chunks = chunks
        self.clock = clock
        self.timeout: float | None = None

    def read(self, size: int) -> bytes:
        self.clock[0] += 0.05
        return self.chunks.pop(0) if self.chunks else b""


def test_read_scan_keeps_trailing_bytes() -> None:
    clock = [0.0]
    port = ScriptedPort([b"AB", b"CD12\r", b"\n"], clock)
    framer = Framer(ScannerSettings(port="/dev/null"))

    raw, events = read_scan(port, framer, timeout_s=30.0, clock=lambda: clock[0])

    assert raw == b"ABCD12\r\n"
    assert [getattr(event, "text", None) for event in events] == ["ABCD12"]
    assert clock[0] < 1.0


@pytest.mark.parametrize(
    ("raw", "settings", "expected"),
    [
        (b"\x02ABC123\x03", {}, "stx_etx = true"),
        (b"ABC123\r", {"stx_etx": True}, "stx_etx = false"),
        (b"]Q1ABC123\r", {"pattern": "[0-9]+"}, "strip_aim = true"),
        (b"ABC123", {}, 'terminator = "idle"'),
        (b"ABC123\r", {"terminator": "lf"}, 'terminator = "any"'),
        (b"ABC123\n", {"terminator": "crlf"}, 'terminator = "any"'),
        (b"AB\xf3\xe1\r", {}, "baudrate"),
        (b"ABC 12\r", {}, "pattern"),
    ],
)
def test_framing_hints(raw: bytes, settings: dict[str, Any], expected: str) -> None:
    scanner = ScannerSettings(port="/dev/null", **settings)
    framer = Framer(scanner)
    events = framer.feed(raw, 0.0) + framer.expire(1e9)

    hints = framing_hints(raw, scanner, events)

    assert any(expected in hint for hint in hints), hints


def test_scan_command_line(tmp_path: Path, sim: SimulatorHandle) -> None:
    """The real `gated diag --scan` prompts, then reports the bytes typed into the pty."""
    setup = install(tmp_path, sim, lane_names=(("entry-1", "entry"),))
    pty = setup.lane().scanner
    process = subprocess.Popen(
        [sys.executable, "-m", "gated", "diag", "--config", str(setup.config_path), "--scan"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        lines = []
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while time.monotonic() < deadline:
            line = process.stdout.readline().decode()
            assert line, "diag ended before prompting for a scan"
            lines.append(line)
            if "present a code" in line:
                break
        pty.write(b"QR-778899\r\n")
        rest, errors = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    output = "".join(lines) + rest.decode()
    assert process.returncode == 0, output + errors.decode()
    scan = fix_after(output, "lane.entry-1.scan")
    assert scan.startswith("PASS")
    assert "code 'QR-778899'" in scan
    assert "51 52 2d 37 37 38 38 39 39 0d 0a" in scan
    assert sim.access_key not in output + errors.decode()


def test_scan_skipped_when_port_busy(installation: Installation) -> None:
    holder = serial.Serial(installation.lane().scanner.path, exclusive=True)
    try:
        status, output, _ = run(installation, scan=True)
    finally:
        holder.close()

    assert status == 1
    assert line_of(output, "lane.entry-1.scan").startswith("SKIP")
    assert not line_of(output, "lane.exit-1.scan").startswith("SKIP")
