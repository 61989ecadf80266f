"""``gated demo``: the real daemon on a simulator and pseudo-terminals, no hardware.

The demo starts the API simulator on a free loopback port and creates
sessions. It runs the daemon in this process with an entry and an exit lane,
whose scanners and relays are pseudo-terminals. Then it types codes into the
scanners and prints a timeline of what each gate did and why. The daemon's own log goes to a file in
the demo's temporary directory, whose path the demo prints.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import anyio
from anyio.abc import ObjectReceiveStream

from gated.api.client import CoordClient
from gated.config import GatedConfig, config_from_mapping, lcus_frame
from gated.daemon import DaemonState, run_daemon
from gated.logs import configure_logging
from gated.observe import DecisionRecord, Observer
from gated.sim.server import serve
from gated.sim.state import SimState
from gated.systemd.notify import Notifier

DEMO_ACCESS_KEY = "demo-access-key"
DEMO_LOCATION = "demo"

# The demo's config. The simulator's port, the state directory and the
# pseudo-terminal paths are filled in at run time; config/demo.toml shows it
# with example values.
DEMO_CONFIG_TEMPLATE = """\
[api]
base_url = "{base_url}"
location_id = "demo"
access_key = "demo-access-key"
timeout_s = 2.0
poll_interval_s = 1.0
lookup_timeout_s = 1.0
max_backoff_s = 2.0

[state]
directory = "{state_dir}"

[runtime]
directory = "{runtime_dir}"

[gate]
debounce_s = 1.0

[[lanes]]
name = "entry-1"
direction = "entry"
[lanes.scanner]
port = "{entry_scanner}"
[lanes.relay]
driver = "serial"
port = "{entry_relay}"
board = "lcus-1"
pulse_ms = 300
settle_ms = 0

[[lanes]]
name = "exit-1"
direction = "exit"
[lanes.scanner]
port = "{exit_scanner}"
terminator = "any"
terminators = ["#"]
[lanes.relay]
driver = "serial"
port = "{exit_relay}"
board = "lcus-1"
pulse_ms = 300
settle_ms = 0
"""

# How long the demo waits for the daemon to decide one scan, in seconds. A
# decision that needs the API has a 1 s lookup deadline in the demo config.
DECISION_TIMEOUT_S = 10.0
# How long the demo waits for the journal to reach the API after it recovers.
DELIVERY_TIMEOUT_S = 15.0


@dataclass
class Pty:
    """A pseudo-terminal: the daemon opens ``path``, the demo uses ``master``."""

    master: int
    slave: int
    path: str

    @classmethod
    def open(cls) -> Pty:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        return cls(master, slave, os.ttyname(slave))

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class Timeline:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._start = time.monotonic()

    def line(self, source: str, text: str) -> None:
        elapsed = time.monotonic() - self._start
        self._out.write(f"{elapsed:7.2f}s  {source:<9} {text}\n")
        self._out.flush()

    def story(self, text: str) -> None:
        self._out.write(f"\n          {text}\n")
        self._out.flush()


def describe(record: DecisionRecord) -> str:
    session = f" session {record.session_id}" if record.session_id else ""
    verdict = "OPEN " if record.opens else "SHUT "
    return (
        f"{verdict} code {record.code or '-':<12} -> {record.outcome}{session}"
        f"  ({record.elapsed_ms:.1f} ms)"
    )


def render_config(*, base_url: str, state_dir: str, runtime_dir: str, ptys: dict[str, Pty]) -> str:
    return DEMO_CONFIG_TEMPLATE.format(
        base_url=base_url,
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        entry_scanner=ptys["entry_scanner"].path,
        entry_relay=ptys["entry_relay"].path,
        exit_scanner=ptys["exit_scanner"].path,
        exit_relay=ptys["exit_relay"].path,
    )


async def watch_relay(
    lane: str, pty: Pty, timeline: Timeline, events: dict[str, anyio.Event]
) -> None:
    """Read LCUS frames from a relay pseudo-terminal and show the gate opening and closing."""
    on, off = lcus_frame(1, True), lcus_frame(1, False)
    buffer = b""
    was_on = False
    while True:
        await anyio.wait_readable(pty.master)
        try:
            buffer += os.read(pty.master, 64)
        except BlockingIOError:
            continue
        while len(buffer) >= 4:
            frame, buffer = buffer[:4], buffer[4:]
            if frame == on and not was_on:
                was_on = True
                timeline.line(lane, "gate relay ON: the barrier opens")
            elif frame == off and was_on:
                was_on = False
                timeline.line(lane, "gate relay OFF")
                events.setdefault(lane, anyio.Event()).set()


class Demo:
    def __init__(
        self,
        timeline: Timeline,
        sim: SimState,
        ptys: dict[str, Pty],
        decisions: ObjectReceiveStream[DecisionRecord],
        closed: dict[str, anyio.Event],
    ) -> None:
        self.timeline = timeline
        self.sim = sim
        self.ptys = ptys
        self.decisions = decisions
        self.closed = closed
        self.mismatches: list[str] = []

    async def scan(self, lane: str, data: bytes, expected: str | None) -> DecisionRecord:
        """Type ``data`` into a lane's scanner and wait for the decision."""
        scanner = self.ptys["entry_scanner" if lane == "entry-1" else "exit_scanner"]
        self.closed[lane] = anyio.Event()
        os.write(scanner.master, data)
        with anyio.fail_after(DECISION_TIMEOUT_S):
            async for record in self.decisions:
                if record.lane == lane:
                    break
        self.timeline.line(lane, describe(record))
        if expected is not None and record.outcome != expected:
            self.mismatches.append(f"{lane}: expected {expected}, got {record.outcome}")
            self.timeline.line(lane, f"!! expected {expected}")
        if record.opens:
            with anyio.move_on_after(DECISION_TIMEOUT_S):
                await self.closed[lane].wait()
        return record

    async def wait_delivered(self, session_id: str, kind: str) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            for transition in self.sim.transitions():
                if (
                    str(transition.get("session_id")) == session_id
                    and transition.get("kind") == kind
                ):
                    self.timeline.line(
                        "api",
                        f"received the {kind} of session {session_id}:"
                        f" lane time {transition.get('time_given')},"
                        f" received {transition.get('recorded_at')}",
                    )
                    return
            await anyio.sleep(0.1)
        self.mismatches.append(f"the {kind} of session {session_id} was not delivered")
        self.timeline.line("api", f"!! the {kind} of session {session_id} was not delivered")


async def scripted(demo: Demo, alice: dict[str, object], bob: dict[str, object]) -> None:
    alice_code = str(_code(alice)).encode()
    bob_code = str(_code(bob)).encode()
    tl = demo.timeline

    tl.story("Alice arrives at the entry and scans the barcode in her app.")
    await demo.scan("entry-1", alice_code + b"\r\n", "started")

    tl.story("The scanner reads her phone screen a second time.")
    await demo.scan("entry-1", alice_code + b"\r\n", "duplicate_scan")

    tl.story("A stranger tries a made-up code that no session has.")
    await demo.scan("entry-1", b"FAKE-0000\r\n", "unknown_code")

    tl.story("Bob types his number on the exit keypad without having come in.")
    await demo.scan("exit-1", bob_code + b"#", "not_started")

    await anyio.sleep(1.1)  # past the demo's debounce_s
    tl.story("Alice's code is passed back to a second car at the entry.")
    await demo.scan("entry-1", alice_code + b"\r\n", "already_active")

    tl.story("The network goes down: the simulator now drops every request.")
    demo.sim.update_faults(drop=True)
    await anyio.sleep(1.5)
    tl.story("Bob enters while the API is unreachable; the lane decides from its local cache.")
    await demo.scan("entry-1", bob_code + b"\r\n", "started")

    tl.story("The network comes back, and the journaled entry is delivered.")
    demo.sim.clear_faults()
    await demo.wait_delivered(str(bob["id"]), "start")

    tl.story("Alice leaves through the exit.")
    await demo.scan("exit-1", alice_code + b"\r\n", "ended")
    await demo.wait_delivered(str(alice["id"]), "end")

    await anyio.sleep(1.1)
    tl.story("Her code is scanned at the exit again.")
    await demo.scan("exit-1", alice_code + b"\r\n", "already_ended")

    tl.story("A scanner glitch sends control bytes.")
    await demo.scan("exit-1", b"\x00\x7f\x1b[A\r\n", "invalid_code")


def _code(session: dict[str, object]) -> object:
    info = session.get("redemption_info")
    return info.get("code") if isinstance(info, dict) else info


async def interactive(demo: Demo, out: TextIO) -> None:
    out.write(
        "\nType a lane and a code, for example 'entry Q7K2M9XD4T' or 'exit 482913';"
        " 'new' creates a session; 'quit' or end of input stops.\n"
    )
    while True:
        out.write("> ")
        out.flush()
        line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line or line.strip() in {"quit", "exit-demo", "q"}:
            return
        words = line.split()
        if words == ["new"]:
            session = demo.sim.create_session()
            out.write(f"session {session['id']}: code {_code(session)}\n")
            continue
        if len(words) != 2 or words[0] not in {"entry", "exit"}:
            out.write("usage: entry CODE | exit CODE | new | quit\n")
            continue
        lane = "entry-1" if words[0] == "entry" else "exit-1"
        await demo.scan(lane, words[1].encode() + b"\r\n", expected=None)


async def run_demo(*, interactive_mode: bool, out: TextIO) -> int:
    timeline = Timeline(out)
    ptys: dict[str, Pty] = {}
    # The directory is kept after the demo, so the daemon's log can be read.
    tmp = Path(tempfile.mkdtemp(prefix="gated-demo-"))
    log_path = tmp / "gated.log"
    with log_path.open("w", encoding="utf-8") as log_file:
        configure_logging("DEBUG", json=True, stream=log_file)
        try:
            for name in ("entry_scanner", "entry_relay", "exit_scanner", "exit_relay"):
                ptys[name] = Pty.open()
            return await _run(timeline, ptys, tmp, log_path, interactive_mode, out)
        finally:
            for pty in ptys.values():
                pty.close()
            out.write(f"demo: the daemon's log is {log_path}\n")


async def _run(
    timeline: Timeline,
    ptys: dict[str, Pty],
    tmp: Path,
    log_path: Path,
    interactive_mode: bool,
    out: TextIO,
) -> int:
    sim = SimState(DEMO_LOCATION, DEMO_ACCESS_KEY)
    async with anyio.create_task_group() as tg:
        port = await tg.start(functools.partial(serve, sim, "127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{port}/v1/access/parking"
        timeline.line("setup", f"API simulator listening on {base_url}")

        async with CoordClient(
            base_url=base_url, location_id=DEMO_LOCATION, access_key=DEMO_ACCESS_KEY
        ) as client:
            alice = await client.create_session("alice")
        # The API creates barcode sessions; the simulator also makes number codes
        # for keypad lanes, which the client cannot ask for.
        bob_data = sim.create_session(user_id="bob", code_type="number")
        alice_data = sim.session(alice.id) or {"id": alice.id}
        timeline.line("setup", f"Alice booked session {alice.id} (barcode {alice.code})")
        timeline.line("setup", f"Bob booked session {bob_data['id']} (number {_code(bob_data)})")

        text = render_config(
            base_url=base_url,
            state_dir=str(tmp / "state"),
            runtime_dir=str(tmp / "run"),
            ptys=ptys,
        )
        config = _parse(text)
        observer = Observer()
        decisions = observer.subscribe()
        closed: dict[str, anyio.Event] = {}
        for lane in ("entry-1", "exit-1"):
            relay_pty = ptys["entry_relay" if lane == "entry-1" else "exit_relay"]
            tg.start_soon(watch_relay, lane, relay_pty, timeline, closed)
        state: DaemonState = await tg.start(
            functools.partial(
                run_daemon,
                config,
                observer=observer,
                notifier=Notifier(""),
                handle_signals=False,
            )
        )
        timeline.line(
            "setup",
            f"daemon running with lanes {', '.join(lane.name for lane in state.lanes)}",
        )
        demo = Demo(timeline, sim, ptys, decisions, closed)
        if interactive_mode:
            await interactive(demo, out)
        else:
            await anyio.sleep(0.5)  # the first poll fills the cache
            await scripted(demo, alice_data, bob_data)
        tg.cancel_scope.cancel()

    out.write("\n")
    if demo.mismatches:
        for mismatch in demo.mismatches:
            out.write(f"demo: unexpected result: {mismatch}\n")
        return 1
    out.write("demo: every gate decided as expected.\n")
    return 0


def _parse(text: str) -> GatedConfig:
    import tomllib  # noqa: PLC0415

    return config_from_mapping(tomllib.loads(text), environ={})


def main(*, interactive: bool = False, print_config: bool = False) -> int:
    if print_config:
        sys.stdout.write(DEMO_CONFIG_TEMPLATE)
        return 0
    return anyio.run(functools.partial(run_demo, interactive_mode=interactive, out=sys.stdout))
