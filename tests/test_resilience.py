"""The daemon under API faults, poison events, a corrupt database and restarts.

Each test runs the real daemon as a child process against the simulator on
loopback, with scanners and relays on ptys and SQLite on disk.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import GateProcess
from tests.simhelpers import running_simulator


def code_of(session: dict[str, Any]) -> str:
    return str(session["redemption_info"]["code"])


def kinds_of(sim: Any, session: dict[str, Any]) -> list[str]:
    return [t["kind"] for t in sim.transitions() if t["session_id"] == str(session["id"])]


def wait_kinds(
    sim: Any, session: dict[str, Any], expected: list[str], timeout_s: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while kinds_of(sim, session) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"session {session['id']}: {kinds_of(sim, session)} != {expected}")
        time.sleep(0.02)


@pytest.fixture
def sim() -> Iterator[Any]:
    with running_simulator() as handle:
        yield handle


@pytest.fixture
def gate(sim: Any, tmp_path: Path) -> Iterator[GateProcess]:
    process = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
    try:
        yield process
    finally:
        process.close()


def cache_sessions(gate: GateProcess, count: int, sim: Any) -> list[dict[str, Any]]:
    """Create sessions and wait until a poll has put them in the daemon's cache."""
    sessions = [sim.create_session() for _ in range(count)]
    since = len(gate.events())
    gate.wait_for(
        lambda e: e.get("event") == "reconcile.replaced" and e.get("sessions", 0) >= count,
        since=since,
    )
    return sessions


@pytest.mark.parametrize(
    "faults",
    [
        {"error_status": 500},
        {"garbage": True},
        {"wrong_content_type": True},
        {"drop": True},
        {"hang": True},
    ],
    ids=["500", "garbage", "wrong-content-type", "drop", "hang"],
)
def test_api_fault_cached_opens_uncached_refused(
    gate: GateProcess, sim: Any, faults: dict[str, Any]
) -> None:
    gate.start()
    cached = cache_sessions(gate, 1, sim)[0]
    sim.set_faults(**faults)
    fresh = sim.create_session()

    decision = gate.scan("entry-1", code_of(cached))
    assert decision["outcome"] == "started"

    refused = gate.scan("entry-1", code_of(fresh))
    assert refused["outcome"] == "api_unavailable"
    assert refused["opens"] is False

    sim.clear_faults()
    wait_kinds(sim, cached, ["start"])
    time.sleep(1.1)  # past debounce_s
    assert gate.scan("entry-1", code_of(fresh))["outcome"] == "started"
    wait_kinds(sim, fresh, ["start"])


def test_rate_limit_honoured_then_delivered(gate: GateProcess, sim: Any) -> None:
    gate.start()
    cached = cache_sessions(gate, 1, sim)[0]
    sim.set_faults(rate_limit_s=2)
    assert gate.scan("entry-1", code_of(cached))["outcome"] == "started"
    gate.wait_for(lambda e: e.get("event") == "reconcile.rate_limited")
    assert kinds_of(sim, cached) == []
    sim.clear_faults()
    wait_kinds(sim, cached, ["start"])


def test_poison_event_does_not_block_next(gate: GateProcess, sim: Any) -> None:
    gate.start()
    first, second = cache_sessions(gate, 2, sim)
    assert gate.scan("entry-1", code_of(second))["outcome"] == "started"
    wait_kinds(sim, second, ["start"])

    # Queue a start and then an end while the API is down.
    sim.set_faults(drop=True)
    assert gate.scan("entry-1", code_of(first))["outcome"] == "started"
    assert gate.scan("exit-1", code_of(second))["outcome"] == "ended"

    # The API now rejects every start: the first event is poison, the end behind it is delivered.
    sim.set_faults(drop=False, error_status=422, path_kind=["start"])
    poison = gate.wait_for(lambda e: e.get("event") == "journal.poison")
    assert poison["session_id"] == str(first["id"])
    assert poison["lane"] == "entry-1"
    assert poison["level"] == "error"
    wait_kinds(sim, second, ["start", "end"])
    assert kinds_of(sim, first) == []

    with sqlite3.connect(gate.state_dir / "gated.db") as conn:
        rows = conn.execute("SELECT session_id, status FROM events ORDER BY seq").fetchall()
    assert (str(first["id"]), "poison") in rows
    assert (str(second["id"]), "delivered") in rows


def test_corrupt_database_set_aside_and_rebuilt(gate: GateProcess, sim: Any) -> None:
    gate.start()
    cached = cache_sessions(gate, 3, sim)
    assert gate.stop() == 0

    db = gate.state_dir / "gated.db"
    size = db.stat().st_size
    with db.open("r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\xde\xad\xbe\xef" * 1024)

    gate.start()
    corrupt = gate.wait_for(lambda e: e.get("event") == "state.corrupt", since_start=True)
    assert corrupt["level"] == "error"
    assert list(gate.state_dir.glob("gated.db.corrupt-*"))
    gate.wait_for(lambda e: e.get("event") == "reconcile.replaced", since_start=True)
    assert gate.scan("entry-1", code_of(cached[0]))["outcome"] == "started"
    wait_kinds(sim, cached[0], ["start"])


def test_restart_offline_decides_from_disk_cache(gate: GateProcess, sim: Any) -> None:
    gate.start()
    cached = cache_sessions(gate, 2, sim)
    assert gate.stop() == 0

    sim.set_faults(drop=True)
    gate.start()
    assert gate.scan("entry-1", code_of(cached[0]))["outcome"] == "started"
    assert gate.scan("exit-1", code_of(cached[1]))["outcome"] == "not_started"
    sim.clear_faults()
    wait_kinds(sim, cached[0], ["start"])


def test_deny_policy_refuses_stale_cache(sim: Any, tmp_path: Path) -> None:
    gate = GateProcess(
        tmp_path,
        base_url=sim.base_url,
        access_key=sim.access_key,
        gate={"offline_policy": "deny", "max_cache_age_s": 1.0},
    )
    try:
        gate.start()
        cached = cache_sessions(gate, 1, sim)[0]
        sim.set_faults(hang=True)
        gate.wait_for(lambda e: e.get("event") == "cache.stale")
        decision = gate.scan("entry-1", code_of(cached))
        assert decision["outcome"] == "cache_stale"
        assert decision["opens"] is False
        sim.clear_faults()
        gate.wait_for(lambda e: e.get("event") == "cache.fresh")
        time.sleep(1.1)
        assert gate.scan("entry-1", code_of(cached))["outcome"] == "started"
        stale_events = [e for e in gate.events() if e.get("event") == "cache.stale"]
        assert len(stale_events) == 1
    finally:
        gate.close()


def test_offline_transition_logged_once(gate: GateProcess, sim: Any) -> None:
    gate.start()
    cache_sessions(gate, 1, sim)
    sim.set_faults(drop=True)
    gate.wait_for(lambda e: e.get("event") == "api.offline")
    time.sleep(2.0)  # several failed polls
    sim.clear_faults()
    online = gate.wait_for(lambda e: e.get("event") == "api.online" and "offline_for_s" in e)
    assert online["offline_for_s"] >= 1.0
    offline_events = [e for e in gate.events() if e.get("event") == "api.offline"]
    assert len(offline_events) == 1


def test_restart_offline_remembers_delivered_start(gate: GateProcess, sim: Any) -> None:
    gate.start()
    session = cache_sessions(gate, 1, sim)[0]
    # Listings fail from now on, so the disk cache never learns of the start.
    sim.set_faults(drop=True, path_kind=["list"])
    assert gate.scan("entry-1", code_of(session))["outcome"] == "started"
    wait_kinds(sim, session, ["start"])
    gate.wait_for(lambda e: e.get("event") == "journal.delivered")
    gate.kill()

    sim.set_faults(drop=True, path_kind="any")
    gate.start()
    decision = gate.scan("entry-1", code_of(session))
    assert decision["outcome"] == "already_active"
    assert decision["opens"] is False


@pytest.mark.parametrize("status", [404, 408])
def test_passing_client_error_not_poison(gate: GateProcess, sim: Any, status: int) -> None:
    gate.start()
    session = cache_sessions(gate, 1, sim)[0]
    sim.set_faults(error_status=status, path_kind=["start"])
    assert gate.scan("entry-1", code_of(session))["outcome"] == "started"
    gate.wait_for(lambda e: e.get("event") == "journal.delivery_failed")
    sim.clear_faults()
    wait_kinds(sim, session, ["start"])
    assert not [e for e in gate.events() if e.get("event") == "journal.poison"]


def test_two_entry_lanes_same_code_open_once(sim: Any, tmp_path: Path) -> None:
    gate = GateProcess(
        tmp_path,
        base_url=sim.base_url,
        access_key=sim.access_key,
        lanes=(("entry-1", "entry"), ("entry-2", "entry")),
    )
    try:
        gate.start()
        sessions = cache_sessions(gate, 5, sim)
        for session in sessions:
            since = len(gate.events())
            line = code_of(session).encode() + b"\r\n"
            gate.lanes["entry-1"].scanner.write(line)
            gate.lanes["entry-2"].scanner.write(line)
            for lane in ("entry-1", "entry-2"):
                gate.wait_for(
                    lambda e, lane=lane: (
                        e.get("event") == "lane.decision" and e.get("lane") == lane
                    ),
                    since=since,
                )
        outcomes = [
            (d["session_id"], d["outcome"])
            for d in gate.decisions()
            if d["outcome"] in ("started", "already_active")
        ]
        for session in sessions:
            mine = sorted(outcome for sid, outcome in outcomes if sid == str(session["id"]))
            assert mine == ["already_active", "started"], (session["id"], mine)
    finally:
        gate.close()


def test_journal_requeue_delivers_poison_event(gate: GateProcess, sim: Any) -> None:
    import subprocess
    import sys

    def journal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gated", "journal", "--config", str(gate.config_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    gate.start()
    poisoned, later = cache_sessions(gate, 2, sim)
    sim.set_faults(error_status=422, path_kind=["start"])
    assert gate.scan("entry-1", code_of(poisoned))["outcome"] == "started"
    event = gate.wait_for(lambda e: e.get("event") == "journal.poison")
    sim.clear_faults()

    listing = journal()
    assert listing.returncode == 0, listing.stderr
    assert f"poison   {event['event_id']}" in listing.stdout

    assert journal("--requeue", "no-such-event").returncode == 1
    requeued = journal("--requeue", event["event_id"])
    assert requeued.returncode == 0, requeued.stderr

    # A new event wakes the delivery loop, which then sends both.
    assert gate.scan("entry-1", code_of(later))["outcome"] == "started"
    wait_kinds(sim, poisoned, ["start"])
    wait_kinds(sim, later, ["start"])
    assert "every event has been delivered" in journal().stdout
