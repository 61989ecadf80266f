"""The daemon and systemd: notify messages over a real datagram socket, SIGTERM handling."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RELAY_OFF, GateProcess
from tests.simhelpers import running_simulator

# Bounds a hung test; not a speed target.
RECEIVE_TIMEOUT_S = 20.0


@pytest.fixture
def sim() -> Iterator[Any]:
    with running_simulator() as handle:
        yield handle


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(0.2)
    try:
        yield server, path
    finally:
        server.close()


def receive_until(server: socket.socket, predicate: Any, seen: list[str]) -> str:
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            message = server.recv(4096).decode()
        except TimeoutError:
            continue
        seen.append(message)
        if predicate(message):
            return message
    raise AssertionError(f"no matching notify message; received {seen}")


def code_of(session: dict[str, Any]) -> str:
    return str(session["redemption_info"]["code"])


def test_ready_with_api_down_then_status_and_stopping(
    tmp_path: Path, sim: Any, notify_socket: tuple[socket.socket, str]
) -> None:
    server, path = notify_socket
    sim.set_faults(hang=True)
    gate = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
    seen: list[str] = []
    try:
        gate.start(wait_ready=False, env_extra={"NOTIFY_SOCKET": path})
        receive_until(server, lambda m: "READY=1" in m, seen)
        status = receive_until(server, lambda m: m.startswith("STATUS="), seen)
        assert "sessions cached" in status
        assert "entry-1=connected" in status
        assert "exit-1=connected" in status
        assert gate.stop(signal.SIGTERM) == 0
        receive_until(server, lambda m: "STOPPING=1" in m, seen)
    finally:
        sim.clear_faults()
        gate.close()


def test_abstract_notify_socket(tmp_path: Path, sim: Any) -> None:
    name = f"gated-test-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(0.2)
    gate = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
    seen: list[str] = []
    try:
        gate.start(wait_ready=False, env_extra={"NOTIFY_SOCKET": "@" + name})
        receive_until(server, lambda m: "READY=1" in m, seen)
    finally:
        gate.close()
        server.close()


def test_watchdog_pings_from_daemon(
    tmp_path: Path, sim: Any, notify_socket: tuple[socket.socket, str]
) -> None:
    server, path = notify_socket
    gate = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
    seen: list[str] = []
    try:
        gate.start(wait_ready=False, env_extra={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        receive_until(server, lambda m: "READY=1" in m, seen)
        for _ in range(3):
            receive_until(server, lambda m: m == "WATCHDOG=1", seen)
    finally:
        gate.close()


def test_sigterm_keeps_undelivered_events(tmp_path: Path, sim: Any) -> None:
    gate = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
    try:
        gate.start()
        sessions = [sim.create_session() for _ in range(2)]
        gate.wait_for(
            lambda e: e.get("event") == "reconcile.replaced" and e.get("sessions", 0) >= 2
        )
        sim.set_faults(drop=True)
        for session in sessions:
            assert gate.scan("entry-1", code_of(session))["outcome"] == "started"
        assert gate.stop(signal.SIGTERM) == 0
        assert gate.lanes["entry-1"].poll_relay().endswith(RELAY_OFF)
        assert sim.transitions() == []

        sim.clear_faults()
        gate.start()
        deadline = time.monotonic() + 15.0
        while len(sim.transitions()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(t["session_id"] for t in sim.transitions()) == sorted(
            str(s["id"]) for s in sessions
        )
    finally:
        gate.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_exported_by_daemon(tmp_path: Path, sim: Any) -> None:
    import httpx

    gate = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
    port = free_port()
    with gate.config_path.open("a", encoding="utf-8") as config:
        config.write(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    try:
        gate.start()
        session = sim.create_session()
        assert gate.scan("entry-1", code_of(session))["outcome"] == "started"
        assert gate.scan("exit-1", "NO-SUCH-CODE")["outcome"] == "unknown_code"
        deadline = time.monotonic() + 10.0
        while True:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
            if "gated_sessions_cached" in text and 'outcome="unknown_code"' in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert 'gated_decisions_total{lane="entry-1",outcome="started"} 1.0' in text
        assert 'gated_decisions_total{lane="exit-1",outcome="unknown_code"} 1.0' in text
        assert "gated_decision_seconds_bucket" in text
    finally:
        gate.close()
