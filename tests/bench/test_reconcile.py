"""Time and peak RSS of one reconcile poll of 10,000 and of 100,000 sessions.

Each run starts reconcile_child.py in a fresh process against the simulator in
this process, with an empty state directory. So every run is the first poll
of a new gate, with a full listing, a full index build and a full cache write.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gated.logs import configure_logging
from tests.bench.measure import load_average, write_results
from tests.simhelpers import running_simulator

pytestmark = [pytest.mark.bench, pytest.mark.timeout(900)]

CHILD_SCRIPT = Path(__file__).with_name("reconcile_child.py")
# Runs per size, of which the median is quoted. Fewer for the large size keep the
# whole benchmark under a few minutes on a small machine.
RUNS = {10_000: 5, 100_000: 3}
# Deadline of one child run, in seconds. It only bounds a hung benchmark.
CHILD_TIMEOUT_S = 300


def run_child(base_url: str, location_id: str, access_key: str, state_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "GATED_BENCH_ACCESS_KEY": access_key}
    completed = subprocess.run(
        [sys.executable, str(CHILD_SCRIPT), base_url, location_id, str(state_dir)],
        capture_output=True,
        env=env,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")[-4000:]
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def median_of(runs: list[dict[str, Any]], name: str) -> float:
    return round(statistics.median(run[name] for run in runs if name in run), 4)


@pytest.mark.parametrize("sessions", list(RUNS))
def test_reconcile_poll(tmp_path: Path, sessions: int) -> None:
    # The simulator logs each request unless the level is WARNING.
    configure_logging("WARNING", json=True)
    load_before = load_average()
    runs: list[dict[str, Any]] = []
    with running_simulator() as sim:
        sim.state.create_sessions(sessions)
        # Encode the listing once now, so no run pays the simulator's encoding.
        listing_bytes = len(sim.state.listing().body)
        for number in range(RUNS[sessions]):
            runs.append(
                run_child(sim.base_url, sim.location_id, sim.access_key, tmp_path / f"run-{number}")
            )

    for run in runs:
        assert run["successful_polls"] == 1
        assert run["sessions_indexed"] == sessions
        assert run["sessions_stored"] == sessions

    wall = median_of(runs, "wall_s")
    sqlite = median_of(runs, "sqlite_replace_s")
    summary = {
        "wall_s": wall,
        "list_sessions_s": median_of(runs, "list_sessions_s"),
        "index_replace_s": median_of(runs, "index_replace_s"),
        "sqlite_replace_s": sqlite,
        "sqlite_share": round(sqlite / wall, 2),
        "peak_rss_before_kib": median_of(runs, "peak_rss_before_kib"),
        "peak_rss_after_kib": median_of(runs, "peak_rss_after_kib"),
        "peak_rss_increase_kib": median_of(runs, "peak_rss_increase_kib"),
    }
    path = write_results(
        f"reconcile-{sessions}",
        {
            "sessions": sessions,
            "listing_bytes": listing_bytes,
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "median": summary,
            "runs": runs,
        },
    )
    print(
        f"\n[reconcile {sessions}] median of {len(runs)}: wall {wall} s "
        f"(listing {summary['list_sessions_s']} s, index {summary['index_replace_s']} s, "
        f"SQLite {sqlite} s = {summary['sqlite_share']:.0%}); peak RSS "
        f"{summary['peak_rss_before_kib']} -> {summary['peak_rss_after_kib']} KiB "
        f"(+{summary['peak_rss_increase_kib']} KiB); listing {listing_bytes} bytes; "
        f"written to {path}"
    )
