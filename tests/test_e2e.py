"""End to end: the daemon as a child process, devices on ptys, the simulator on loopback."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RELAY_OFF, RELAY_ON, GateProcess
from tests.simhelpers import running_simulator


def code_of(session: dict[str, Any]) -> str:
    return str(session["redemption_info"]["code"])


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    with running_simulator() as handle:
        yield handle


@pytest.fixture(scope="module")
def gate(sim: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GateProcess]:
    process = GateProcess(
        tmp_path_factory.mktemp("gate"), base_url=sim.base_url, access_key=sim.access_key
    )
    try:
        process.start()
        yield process
    finally:
        process.close()


@pytest.fixture(autouse=True)
def _no_faults(sim: Any) -> Iterator[None]:
    sim.clear_faults()
    yield
    sim.clear_faults()


def wait_transition(
    sim: Any, session_id: str, kind: str, timeout_s: float = 15.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for transition in sim.transitions():
            if transition["session_id"] == session_id and transition["kind"] == kind:
                return transition  # type: ignore[no-any-return]
        time.sleep(0.02)
    raise AssertionError(f"no {kind} of session {session_id} reached the simulator")


def test_relay_switched_off_first(gate: GateProcess) -> None:
    data = gate.lanes["entry-1"].poll_relay()
    assert data.startswith(RELAY_OFF)


def test_entry_starts_pending_session(gate: GateProcess, sim: Any) -> None:
    session = sim.create_session()
    before = gate.lanes["entry-1"].pulses()

    decision = gate.scan("entry-1", code_of(session))

    assert decision["outcome"] == "started"
    assert decision["opens"] is True
    assert decision["session_id"] == str(session["id"])
    assert decision["code"] == "*" * (len(code_of(session)) - 4) + code_of(session)[-4:]
    assert decision["elapsed_ms"] >= 0
    gate.wait_relay_off("entry-1", before + 1)
    transition = wait_transition(sim, str(session["id"]), "start")
    assert transition["lane"] == "entry-1"
    assert transition["time_given"] is not None


def test_duplicate_scan_no_second_pulse(gate: GateProcess, sim: Any) -> None:
    session = sim.create_session()
    code = code_of(session)
    first = gate.scan("entry-1", code)
    second = gate.scan("entry-1", code)
    assert first["outcome"] == "started"
    assert second["outcome"] == "duplicate_scan"
    assert second["opens"] is False
    pulses = gate.lanes["entry-1"].pulses()
    gate.wait_relay_off("entry-1", pulses)
    time.sleep(0.3)
    assert gate.lanes["entry-1"].pulses() == pulses
    wait_transition(sim, str(session["id"]), "start")
    assert [t["kind"] for t in sim.transitions() if t["session_id"] == str(session["id"])] == [
        "start"
    ]


def test_entry_refuses_active_session(gate: GateProcess, sim: Any) -> None:
    session = sim.create_session()
    assert gate.scan("entry-1", code_of(session))["outcome"] == "started"
    time.sleep(1.1)  # past debounce_s
    decision = gate.scan("entry-1", code_of(session))
    assert decision["outcome"] == "already_active"
    assert decision["opens"] is False


def test_exit_ends_active_session(gate: GateProcess, sim: Any) -> None:
    session = sim.create_session()
    assert gate.scan("entry-1", code_of(session))["outcome"] == "started"
    before = gate.lanes["exit-1"].pulses()
    decision = gate.scan("exit-1", code_of(session))
    assert decision["outcome"] == "ended"
    assert decision["opens"] is True
    gate.wait_relay_off("exit-1", before + 1)
    transition = wait_transition(sim, str(session["id"]), "end")
    assert transition["lane"] == "exit-1"


def test_exit_refuses_pending_session(gate: GateProcess, sim: Any) -> None:
    session = sim.create_session()
    decision = gate.scan("exit-1", code_of(session))
    assert decision["outcome"] == "not_started"
    assert decision["opens"] is False


def test_ended_session_refused_both_lanes(gate: GateProcess, sim: Any) -> None:
    session = sim.create_session()
    assert gate.scan("entry-1", code_of(session))["outcome"] == "started"
    assert gate.scan("exit-1", code_of(session))["outcome"] == "ended"
    time.sleep(1.1)
    assert gate.scan("exit-1", code_of(session))["outcome"] == "already_ended"
    assert gate.scan("entry-1", code_of(session))["outcome"] == "already_ended"


@pytest.mark.parametrize("lane", ["entry-1", "exit-1"])
def test_unknown_code_refused(gate: GateProcess, lane: str) -> None:
    before = gate.lanes[lane].pulses()
    decision = gate.scan(lane, f"NOPE-{lane}")
    assert decision["outcome"] == "unknown_code"
    assert decision["opens"] is False
    assert gate.lanes[lane].pulses() == before


@pytest.mark.parametrize("lane", ["entry-1", "exit-1"])
def test_junk_bytes_invalid_code(gate: GateProcess, lane: str) -> None:
    before = gate.lanes[lane].pulses()
    decision = gate.scan(lane, b"\x00\xff\x1b[A")
    assert decision["outcome"] == "invalid_code"
    assert decision["opens"] is False
    assert gate.lanes[lane].pulses() == before


def test_uncached_code_refused_while_api_hangs(gate: GateProcess, sim: Any) -> None:
    cached = sim.create_session()
    assert gate.scan("entry-1", code_of(cached))["outcome"] == "started"
    sim.set_faults(hang=True)
    fresh = sim.create_session()

    refused = gate.scan("entry-1", code_of(fresh))
    assert refused["outcome"] == "api_unavailable"
    assert refused["opens"] is False

    decision = gate.scan("exit-1", code_of(cached))
    assert decision["outcome"] == "ended"
    sim.clear_faults()
    wait_transition(sim, str(cached["id"]), "end")


def test_events_delivered_after_outage(gate: GateProcess, sim: Any) -> None:
    sessions = [sim.create_session() for _ in range(3)]
    for session in sessions:
        assert gate.scan("entry-1", code_of(session))["outcome"] == "started"
    sim.set_faults(error_status=503)
    for session in sessions:
        assert gate.scan("exit-1", code_of(session))["outcome"] == "ended"
    time.sleep(1.0)
    sim.clear_faults()
    for session in sessions:
        wait_transition(sim, str(session["id"]), "end")


def test_access_key_never_logged(gate: GateProcess, sim: Any) -> None:
    sim.set_faults(drop=True)
    gate.scan("entry-1", "NOT-A-SESSION-1")
    sim.clear_faults()
    assert sim.access_key not in gate.log_text()


def test_sigterm_exits_zero_relay_off(tmp_path: Path, sim: Any) -> None:
    process = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
    try:
        process.start()
        session = sim.create_session()
        assert process.scan("entry-1", code_of(session))["outcome"] == "started"
        process.wait_relay_off("entry-1", 1)
        assert process.stop(signal.SIGTERM) == 0
        # Off at start, the pulse, and off again at stop.
        entry = process.lanes["entry-1"].poll_relay()
        assert entry == RELAY_OFF + RELAY_ON + RELAY_OFF + RELAY_OFF, entry.hex(" ")
        exit_relay = process.lanes["exit-1"].poll_relay()
        assert exit_relay == RELAY_OFF + RELAY_OFF, exit_relay.hex(" ")
        events = [e.get("event") for e in process.events()]
        assert "daemon.stopped" in events
    finally:
        process.close()


def test_soft_passback_opens_and_logs(tmp_path: Path, sim: Any) -> None:
    process = GateProcess(
        tmp_path, base_url=sim.base_url, access_key=sim.access_key, gate={"passback": "soft"}
    )
    try:
        process.start()
        session = sim.create_session()
        before = process.lanes["exit-1"].pulses()
        decision = process.scan("exit-1", code_of(session))
        assert decision["outcome"] == "passback_violation"
        assert decision["opens"] is True
        assert decision["level"] == "warning"
        process.wait_relay_off("exit-1", before + 1)
        time.sleep(0.5)
        assert not [t for t in sim.transitions() if t["session_id"] == str(session["id"])]
    finally:
        process.close()


def test_relay_on_then_off_exact_bytes(tmp_path: Path, sim: Any) -> None:
    process = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
    try:
        process.start()
        session = sim.create_session()
        assert process.scan("entry-1", code_of(session))["outcome"] == "started"
        process.wait_relay_off("entry-1", 1)
        assert process.lanes["entry-1"].poll_relay() == RELAY_OFF + RELAY_ON + RELAY_OFF
    finally:
        process.close()


def test_scanner_unplug_replug_lane_recovers(tmp_path: Path, sim: Any) -> None:
    from tests.ptyhelpers import PtyDevice

    scanner = PtyDevice(link=tmp_path / "entry-scanner")
    process = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
    text = process.config_path.read_text(encoding="utf-8")
    process.config_path.write_text(
        text.replace(process.lanes["entry-1"].scanner.path, scanner.path, 1), encoding="utf-8"
    )
    try:
        process.start()
        process.wait_for(
            lambda e: e.get("event") == "scanner.opened" and e.get("lane") == "entry-1"
        )
        scanner.unplug()
        process.wait_for(lambda e: e.get("event") == "scanner.lost")
        time.sleep(1.0)  # several reconnect attempts while the device is away
        since = len(process.events())
        scanner.replug()
        process.wait_for(
            lambda e: e.get("event") == "scanner.opened" and e.get("lane") == "entry-1",
            since=since,
        )

        session = sim.create_session()
        since = len(process.events())
        scanner.write(code_of(session).encode() + b"\r\n")
        decision = process.wait_for(
            lambda e: e.get("event") == "lane.decision" and e.get("lane") == "entry-1",
            since=since,
        )
        assert decision["outcome"] == "started"
        process.wait_relay_off("entry-1", 1)
        lost = [e for e in process.events() if e.get("event") == "scanner.lost"]
        assert len(lost) == 1
        warnings = [e for e in process.events() if e.get("level") == "warning"]
        assert len(warnings) <= 3, warnings
    finally:
        process.close()
        scanner.close()
