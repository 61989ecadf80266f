"""Crash safety: the daemon is SIGKILLed at random moments while cars come and go.

At the end, every journaled event has reached the API exactly once, no session
was started or ended twice, every relay pulse belongs to a decision whose
session change reached the API, and the journal is empty.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.harness import GateProcess
from tests.simhelpers import running_simulator

SEED = 20261204
SCANS = 24
# The soak run, selected with `-m soak`: about 8 minutes on 2 cores.
SOAK_SCANS = 300
KILL_PROBABILITY = 0.4
# Drain deadline for the journal after the last restart, in seconds.
DRAIN_TIMEOUT_S = 30.0


def code_of(session: dict[str, Any]) -> str:
    return str(session["redemption_info"]["code"])


def pending_in_journal(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "gated.db") as conn:
        (count,) = conn.execute("SELECT count(*) FROM events WHERE status = 'pending'").fetchone()
    return int(count)


def test_kill_loop_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    run_kill_loop(tmp_path, scans=SCANS, seed=SEED)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_kill_loop_soak(tmp_path: Path) -> None:
    run_kill_loop(tmp_path, scans=SOAK_SCANS, seed=SEED + 1)


def run_kill_loop(tmp_path: Path, *, scans: int, seed: int) -> None:
    rng = random.Random(seed)
    with running_simulator() as sim:
        sessions = [sim.create_session() for _ in range(12)]
        gate = GateProcess(
            tmp_path,
            base_url=sim.base_url,
            access_key=sim.access_key,
            gate={"debounce_s": 0.0},
        )
        try:
            gate.start()
            kills = 0
            for _ in range(scans):
                session = rng.choice(sessions)
                lane = rng.choice(["entry-1", "exit-1"])
                gate.lanes[lane].scanner.write(code_of(session).encode() + b"\r\n")
                time.sleep(rng.uniform(0.0, 0.15))
                if rng.random() < KILL_PROBABILITY:
                    gate.kill()
                    kills += 1
                    # Drain what the dead daemon did not read, so the next one
                    # starts from a clean line; keep the relay bytes.
                    for ptys in gate.lanes.values():
                        ptys.poll_relay()
                    gate.start()
                else:
                    time.sleep(0.1)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            gate.stop()
            gate.start()
            while pending_in_journal(gate.state_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert gate.stop() == 0
        finally:
            gate.close()

        transitions = sim.transitions()

    assert kills >= scans // 5, "the seed should kill the daemon several times"
    per_session_kind = Counter((t["session_id"], t["kind"]) for t in transitions)
    assert all(count == 1 for count in per_session_kind.values()), per_session_kind

    assert pending_in_journal(gate.state_dir) == 0

    opening = [
        e
        for e in gate.events()
        if e.get("event") == "lane.decision" and e.get("outcome") in ("started", "ended")
    ]
    for decision in opening:
        kind = "start" if decision["outcome"] == "started" else "end"
        assert per_session_kind[(decision["session_id"], kind)] == 1, decision

    decided = {(d["session_id"], "start" if d["outcome"] == "started" else "end") for d in opening}
    # A transition with no logged decision can only come from a kill between the
    # journal commit and the log line. Such a transition still has a journal row.
    with sqlite3.connect(gate.state_dir / "gated.db") as conn:
        journaled = {
            (str(session_id), kind)
            for session_id, kind in conn.execute("SELECT session_id, kind FROM events")
        }
    assert set(per_session_kind) <= journaled | decided

    for name, ptys in gate.lanes.items():
        pulses = ptys.pulses()
        lane_opening = [d for d in opening if d["lane"] == name]
        assert pulses <= len(lane_opening), (name, pulses, len(lane_opening))
