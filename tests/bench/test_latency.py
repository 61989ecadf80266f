"""Scan-to-relay latency of the real daemon on ptys, beside a minimal floor process.

One sample runs from just before the ``write()`` that carries a code and its
CR into the scanner pty master to the moment ``poll()`` reports the first
relay byte readable on the relay pty master. Every measured code is a session
already in the daemon's cache, so the API is never asked for a decision. The
API condition (healthy, responding after 200 ms, hanging) only changes what the
background work (reconcile polls and journal delivery) does meanwhile.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gated.logs import configure_logging
from tests.bench.measure import load_average, percentile, summarize_us, write_results
from tests.harness import RELAY_OFF, RELAY_ON, GateProcess, PtyPair, render_config
from tests.simhelpers import SimulatorHandle, running_simulator

pytestmark = [pytest.mark.bench, pytest.mark.timeout(900)]

# Measured scans per condition. Each session gives one entry and one exit scan.
# GATED_BENCH_SCANS lowers it for a quick trial of the benchmark code itself.
SCANS = int(os.environ.get("GATED_BENCH_SCANS", "1000"))
# Sessions scanned at entry and exit before measuring, so imports, caches and
# the first connection to the API are warm. Their samples are discarded.
WARMUP_SESSIONS = 20
# Deadline for one relay frame, in seconds. It only bounds a hung benchmark:
# a scan that opens the gate sends ON within milliseconds.
RELAY_TIMEOUT_S = 5.0
# Deadline for the simulator to report a hanging request, in seconds. The
# harness config polls every 0.5 s, so one arrives well within it.
HANG_WAIT_S = 10.0
# Deadline for the daemon's first listing, in seconds. It only bounds a hung benchmark.
CACHE_TIMEOUT_S = 60.0
# Deadline for the floor process to open its ttys, in seconds.
FLOOR_READY_TIMEOUT_S = 10.0

FLOOR_SCRIPT = Path(__file__).with_name("floor.py")
# API faults per condition, and sessions added to the listing beside the
# scanned ones. The large listing shows what each reconcile poll costs the
# lanes: every gate event changes the listing, so every poll replaces the cache.
CONDITIONS: dict[str, tuple[dict[str, Any], int]] = {
    "healthy": ({}, 0),
    "api_200ms": ({"latency_ms": 200}, 0),
    "api_hanging": ({"hang": True}, 0),
    "healthy_10k_sessions": ({}, 10_000),
}


class QuietGateProcess(GateProcess):
    """A GateProcess whose config logs at INFO, the level a gate runs at in production."""

    def __init__(self, tmp_path: Path, **kwargs: Any) -> None:
        super().__init__(tmp_path, **kwargs)
        self.config_path.write_text(
            render_config(
                base_url=kwargs["base_url"],
                access_key=kwargs["access_key"],
                state_dir=self.state_dir,
                runtime_dir=tmp_path / "run",
                lanes=list(self.lanes.values()),
                gate=kwargs.get("gate"),
                api=kwargs.get("api"),
                log_level="INFO",
            ),
            encoding="utf-8",
        )


class RelayReader:
    """Reads relay frames from a pty master with poll(), never by sleeping."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.poller = select.poll()
        self.poller.register(master, select.POLLIN)

    def wait_readable(self, timeout_s: float) -> bool:
        return bool(self.poller.poll(round(timeout_s * 1000)))

    def read_until(self, received: bytes, done: Any, timeout_s: float) -> bytes:
        """Read until ``done(received)`` is true, and fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not done(received):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_readable(remaining):
                raise AssertionError(f"relay sent only {received.hex(' ')!r} in {timeout_s} s")
            try:
                received += os.read(self.master, 64)
            except BlockingIOError:
                continue
        return received

    def drain(self) -> bytes:
        received = b""
        while self.wait_readable(0):
            received += os.read(self.master, 4096)
        return received


def timed_scan(scanner: PtyPair, relay: RelayReader, code: bytes, *, wait_off: bool) -> int:
    """Type ``code`` with a CR and return nanoseconds until the first relay byte is readable.

    With ``wait_off`` it then reads on until the OFF frame, so the next scan
    starts with the relay shut and the pty empty.
    """
    started = time.perf_counter_ns()
    os.write(scanner.master, code + b"\r")
    if not relay.wait_readable(RELAY_TIMEOUT_S):
        raise AssertionError(f"no relay byte within {RELAY_TIMEOUT_S} s of scanning {code!r}")
    elapsed = time.perf_counter_ns() - started

    frames = relay.read_until(b"", lambda data: len(data) >= len(RELAY_ON), RELAY_TIMEOUT_S)
    if wait_off:
        frames = relay.read_until(
            frames, lambda data: len(data) >= len(RELAY_ON + RELAY_OFF), RELAY_TIMEOUT_S
        )
        assert frames == RELAY_ON + RELAY_OFF, f"unexpected relay bytes {frames.hex(' ')}"
    else:
        assert frames == RELAY_ON, f"unexpected relay bytes {frames.hex(' ')}"
    return elapsed


def measure_floor(scans: int) -> list[int]:
    """Run floor.py on two fresh ptys and time ``scans`` lines through it."""
    scanner, relay = PtyPair.open(), PtyPair.open()
    process = subprocess.Popen(
        [sys.executable, str(FLOOR_SCRIPT), scanner.path, relay.path],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        ready = select.select([process.stdout], [], [], FLOOR_READY_TIMEOUT_S)[0]
        assert ready, f"floor.py did not open its ttys within {FLOOR_READY_TIMEOUT_S} s"
        assert process.stdout.readline() == b"ready\n"

        reader = RelayReader(relay.master)
        code = b"FLOOR00000"
        for _ in range(WARMUP_SESSIONS * 2):
            timed_scan(scanner, reader, code, wait_off=False)
        return [timed_scan(scanner, reader, code, wait_off=False) for _ in range(scans)]
    finally:
        scanner.close()
        relay.close()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def scan_sessions(gate: GateProcess, codes: list[bytes]) -> dict[str, list[int]]:
    """Scan each code at the entry, then at the exit, and return the samples per direction."""
    entry, exit_ = gate.lanes["entry-1"], gate.lanes["exit-1"]
    entry_relay, exit_relay = RelayReader(entry.relay.master), RelayReader(exit_.relay.master)
    samples: dict[str, list[int]] = {"entry": [], "exit": []}
    for code in codes:
        try:
            samples["entry"].append(timed_scan(entry.scanner, entry_relay, code, wait_off=True))
            samples["exit"].append(timed_scan(exit_.scanner, exit_relay, code, wait_off=True))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; daemon log tail:\n{gate.log_text()[-3000:]}") from exc
    return samples


def decision_times_us(gate: GateProcess) -> list[int]:
    """Return the daemon's own elapsed time of each gate-opening decision, in microseconds."""
    return [
        round(event["elapsed_ms"] * 1000)
        for event in gate.decisions()
        if event.get("opens") and isinstance(event.get("elapsed_ms"), int | float)
    ]


def create_codes(sim: SimulatorHandle, count: int) -> list[bytes]:
    return [sim.create_session()["redemption_info"]["code"].encode() for _ in range(count)]


@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_scan_to_relay_latency(tmp_path: Path, condition: str) -> None:
    # The simulator runs in this process and logs each request. At WARNING it
    # stays quiet and takes less CPU from the measuring thread.
    configure_logging("WARNING", json=True)
    load_before = load_average()
    floor_samples = measure_floor(SCANS)

    with running_simulator() as sim:
        warmup_codes = create_codes(sim, WARMUP_SESSIONS)
        codes = create_codes(sim, SCANS // 2)
        faults, extra_sessions = CONDITIONS[condition]
        if extra_sessions:
            sim.state.create_sessions(extra_sessions)
        gate = QuietGateProcess(
            tmp_path,
            base_url=sim.base_url,
            access_key=sim.access_key,
            gate={"debounce_s": 0},
        )
        try:
            gate.start()
            # The first successful poll logs api.online and then fills the index
            # with no await in between, so after this event every code is cached.
            gate.wait_for(lambda event: event.get("event") == "api.online", CACHE_TIMEOUT_S)
            for lane in gate.lanes.values():
                RelayReader(lane.relay.master).drain()
            scan_sessions(gate, warmup_codes)
            decisions_before = len(decision_times_us(gate))

            sim.set_faults(**faults)
            if condition == "api_hanging":
                sim.wait_for(lambda state: state.hanging >= 1, HANG_WAIT_S)
            samples = scan_sessions(gate, codes)
            hanging_after = sim.state.hanging

            sim.clear_faults()
            assert gate.stop() == 0
            daemon_decisions = decision_times_us(gate)[decisions_before:]
        finally:
            gate.close()

    all_samples = samples["entry"] + samples["exit"]
    assert len(all_samples) == 2 * (SCANS // 2)
    assert len(daemon_decisions) == len(all_samples)
    if condition == "api_hanging":
        assert hanging_after >= 1

    daemon = summarize_us(all_samples)
    floor = summarize_us(floor_samples)
    decided = sorted(daemon_decisions)
    results = {
        "condition": condition,
        "faults": faults,
        "extra_sessions": extra_sessions,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "floor": floor,
        "daemon": daemon,
        "daemon_entry": summarize_us(samples["entry"]),
        "daemon_exit": summarize_us(samples["exit"]),
        "daemon_decision_elapsed_us": {
            "p50": percentile(decided, 0.50),
            "p99": percentile(decided, 0.99),
        },
        "ratio_to_floor": {
            "p50": round(daemon["p50_us"] / floor["p50_us"], 1),
            "p99": round(daemon["p99_us"] / floor["p99_us"], 1),
        },
    }
    path = write_results(f"latency-{condition}", results)
    print(
        f"\n[{condition}] {daemon['count']} scans: p50 {daemon['p50_us']} us, "
        f"p99 {daemon['p99_us']} us, min {daemon['min_us']} us, max {daemon['max_us']} us; "
        f"floor p50 {floor['p50_us']} us, p99 {floor['p99_us']} us; "
        f"ratio p50 {results['ratio_to_floor']['p50']}x, p99 {results['ratio_to_floor']['p99']}x; "
        f"load {load_before} -> {results['load_average_after']}; written to {path}"
    )
