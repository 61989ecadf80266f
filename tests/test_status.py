"""The control socket and `gated status`: in-process servers, a real daemon, and the CLI."""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from structlog.testing import capture_logs

from gated import control, status
from gated.config import GatedConfig, config_from_mapping, load_config
from gated.control import control_socket_path, serve_control
from gated.daemon import DaemonState, run_daemon
from gated.health import ApiHealth
from gated.observe import DecisionRecord, Observer
from gated.sessions import SessionIndex
from gated.state import AsyncStore, Store
from gated.systemd.notify import Notifier
from tests.harness import GateProcess, LanePtys, PtyPair, render_config
from tests.simhelpers import SimulatorHandle, running_simulator

# Bounds a wait that a passing test never reaches.
WAIT_S = 15.0


# --- an in-process control socket over a DaemonState ------------------------------------


@dataclass
class FakeScanner:
    state: Any
    reconnects: int = 0


@dataclass
class FakeRelay:
    available: bool = True


@dataclass
class FakeLane:
    """The attributes of a Lane that the snapshot reads."""

    name: str
    direction: Any
    scanner: FakeScanner
    relay: FakeRelay


class Value:
    """An enum-like value with ``.value``, as the snapshot reads lane state."""

    def __init__(self, value: str) -> None:
        self.value = value


def minimal_config(tmp_path: Path) -> GatedConfig:
    return config_from_mapping(
        {
            "api": {"location_id": "demo", "access_key": "test-key-0c7d"},
            "state": {"directory": str(tmp_path / "state")},
            "runtime": {"directory": str(tmp_path / "run")},
            "lanes": [
                {
                    "name": "entry-1",
                    "direction": "entry",
                    "scanner": {"port": "/dev/null"},
                    "relay": {"driver": "log"},
                }
            ],
        },
        environ={},
    )


@pytest.fixture
def daemon_state(tmp_path: Path) -> Iterator[DaemonState]:
    config = minimal_config(tmp_path)
    store = AsyncStore(Store.open(config.state.directory))
    state = DaemonState(config, SessionIndex(), ApiHealth(), Observer(), store)
    state.lanes.append(
        FakeLane("entry-1", Value("entry"), FakeScanner(Value("connected"), 2), FakeRelay())
    )
    yield state
    # Closing the observer closes the subscription streams of followers.
    state.observer.close()
    store.store.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "control.sock"


@pytest.fixture
async def server(daemon_state: DaemonState, socket_path: Path) -> AsyncIterator[TaskGroup]:
    async with anyio.create_task_group() as tg:
        await tg.start(serve_control, daemon_state, socket_path)
        yield tg
        tg.cancel_scope.cancel()


class Client:
    """One connection to the control socket, read line by line."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.buffer = BufferedByteReceiveStream(stream)

    async def read_line(self) -> dict[str, Any]:
        """Read one JSON line; fail on end of stream."""
        with anyio.fail_after(WAIT_S):
            line = await self.buffer.receive_until(b"\n", 1_000_000)
        result = json.loads(line)
        assert isinstance(result, dict)
        return result

    async def read_to_end(self) -> bytes:
        data = b""
        with anyio.fail_after(WAIT_S):
            try:
                while True:
                    data += await self.buffer.receive()
            except anyio.EndOfStream:
                return data

    async def aclose(self) -> None:
        await self.stream.aclose()


class Clients:
    """Connections to the control socket, closed when the test ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened: list[Client] = []

    async def connect(self) -> Client:
        client = Client(await anyio.connect_unix(self.path))
        self.opened.append(client)
        return client

    async def request(self, payload: bytes) -> Client:
        client = await self.connect()
        await client.stream.send(payload)
        return client


@pytest.fixture
async def clients(socket_path: Path) -> AsyncIterator[Clients]:
    connections = Clients(socket_path)
    yield connections
    for client in connections.opened:
        await client.aclose()


def record(code: str | None = "******XD4T", outcome: str = "started") -> DecisionRecord:
    return DecisionRecord(
        at=datetime(2026, 12, 3, 12, 1, 2, tzinfo=UTC),
        lane="entry-1",
        direction="entry",
        outcome=outcome,
        opens=outcome == "started",
        session_id="s-123",
        code=code,
        elapsed_ms=12.3,
    )


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_snapshot_over_socket(
    clients: Clients, server: TaskGroup, daemon_state: DaemonState, socket_path: Path
) -> None:
    daemon_state.observer.publish(record())

    stream = await clients.request(b'{"command": "snapshot"}\n')
    reply = await stream.read_line()
    rest = await stream.read_to_end()

    assert reply == json.loads(json.dumps(daemon_state.snapshot()))
    assert reply["lanes"][0]["name"] == "entry-1"
    assert reply["lanes"][0]["scanner"] == "connected"
    assert reply["recent_decisions"][0]["code"] == "******XD4T"
    assert rest == b""


@pytest.mark.anyio
async def test_socket_modes_and_cleanup(daemon_state: DaemonState, socket_path: Path) -> None:
    # The unit file runs the daemon with UMask=0077; the modes must not depend on it.
    saved_umask = os.umask(0o077)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(serve_control, daemon_state, socket_path)
            socket_mode = stat.S_IMODE(os.lstat(socket_path).st_mode)
            directory_mode = stat.S_IMODE(os.stat(socket_path.parent).st_mode)
            is_socket = stat.S_ISSOCK(os.lstat(socket_path).st_mode)
            leftovers = sorted(p.name for p in socket_path.parent.iterdir())
            tg.cancel_scope.cancel()
    finally:
        os.umask(saved_umask)

    assert is_socket
    assert socket_mode == 0o660
    assert directory_mode == 0o750
    assert leftovers == ["control.sock"]
    assert not socket_path.exists()


@pytest.mark.anyio
async def test_stale_socket_replaced(
    clients: Clients, daemon_state: DaemonState, socket_path: Path
) -> None:
    socket_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(socket_path))
    stale.close()

    async with anyio.create_task_group() as tg:
        await tg.start(serve_control, daemon_state, socket_path)
        stream = await clients.request(b'{"command": "snapshot"}\n')
        reply = await stream.read_line()
        tg.cancel_scope.cancel()

    assert reply["lanes"][0]["name"] == "entry-1"


@pytest.mark.anyio
async def test_non_socket_file_left_alone(daemon_state: DaemonState, socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True)
    socket_path.write_text("not a socket")

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(serve_control, daemon_state, socket_path)

    assert socket_path.read_text() == "not a socket"
    events = [entry for entry in logs if entry["event"] == "control.unavailable"]
    assert len(events) == 1
    assert events[0]["log_level"] == "error"
    assert "not a socket" in events[0]["error"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"command": "reboot"}\n', "unknown command 'reboot'"),
        (b"snapshot please\n", "invalid request"),
        (b'["snapshot"]\n', "invalid request"),
        (b"x" * 2000 + b"\n", "longer than 1024 bytes"),
    ],
)
async def test_bad_request_gets_error(
    clients: Clients, server: TaskGroup, socket_path: Path, payload: bytes, expected: str
) -> None:
    stream = await clients.request(payload)
    reply = await stream.read_line()

    assert expected in reply["error"]
    assert await stream.read_to_end() == b""


@pytest.mark.anyio
async def test_silent_client_dropped(
    clients: Clients, daemon_state: DaemonState, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 0.1)
    async with anyio.create_task_group() as tg:
        await tg.start(serve_control, daemon_state, socket_path)
        stream = await clients.connect()
        data = await stream.read_to_end()
        # The server still serves others after dropping one.
        other = await clients.request(b'{"command": "snapshot"}\n')
        reply = await other.read_line()
        tg.cancel_scope.cancel()

    assert data == b""
    assert "lanes" in reply


@pytest.mark.anyio
async def test_client_limit_rejects_extra(
    clients: Clients, daemon_state: DaemonState, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 2)
    async with anyio.create_task_group() as tg:
        await tg.start(serve_control, daemon_state, socket_path)
        followers = [await clients.request(b'{"command": "follow"}\n') for _ in range(2)]
        for follower in followers:
            assert await follower.read_line() == {"following": True}

        extra = await clients.request(b'{"command": "snapshot"}\n')
        rejected = await extra.read_line()

        # Once a follower leaves, its slot is free again.
        await followers[0].aclose()
        with anyio.fail_after(WAIT_S):
            while True:
                retry = await clients.request(b'{"command": "snapshot"}\n')
                reply = await retry.read_line()
                if "error" not in reply:
                    break
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()

    assert "too many clients" in rejected["error"]
    assert "lanes" in reply


@pytest.mark.anyio
async def test_follow_streams_decisions(
    clients: Clients, server: TaskGroup, daemon_state: DaemonState, socket_path: Path
) -> None:
    stream = await clients.request(b'{"command": "follow"}\n')
    assert await stream.read_line() == {"following": True}

    daemon_state.observer.publish(record("******XD4T", "started"))
    daemon_state.observer.publish(record(None, "invalid_code"))
    first = await stream.read_line()
    second = await stream.read_line()

    assert first == record("******XD4T", "started").to_json()
    assert second["outcome"] == "invalid_code"
    assert second["code"] is None


@pytest.mark.anyio
async def test_follow_ends_when_daemon_stops(
    clients: Clients, server: TaskGroup, daemon_state: DaemonState, socket_path: Path
) -> None:
    stream = await clients.request(b'{"command": "follow"}\n')
    assert await stream.read_line() == {"following": True}

    daemon_state.observer.close()
    last = await stream.read_line()

    assert "stream ended" in last["error"]
    assert await stream.read_to_end() == b""


@pytest.mark.anyio
async def test_follower_disconnect_unsubscribes(
    clients: Clients, server: TaskGroup, daemon_state: DaemonState, socket_path: Path
) -> None:
    stream = await clients.request(b'{"command": "follow"}\n')
    assert await stream.read_line() == {"following": True}

    await stream.aclose()
    # The server notices the closed client when it next writes to it or reads
    # its end of stream. Publishes in the meantime must not fail.
    for _ in range(5):
        daemon_state.observer.publish(record())
    stream = await clients.request(b'{"command": "snapshot"}\n')
    reply = await stream.read_line()

    assert len(reply["recent_decisions"]) == 5


# --- the `gated status` client against an in-process server ----------------------------


@pytest.mark.anyio
async def test_status_prints_summary(
    server: TaskGroup, daemon_state: DaemonState, socket_path: Path
) -> None:
    daemon_state.observer.publish(record())
    out, err = io.StringIO(), io.StringIO()

    code = await anyio.to_thread.run_sync(
        lambda: status.show_snapshot(socket_path, json_output=False, out=out, err=err)
    )

    text = out.getvalue()
    assert code == 0, err.getvalue()
    assert "entry-1" in text
    assert "connected" in text
    assert "******XD4T" in text
    assert "s-123" in text
    assert "12.3 ms" in text


@pytest.mark.anyio
async def test_status_json_is_snapshot(
    server: TaskGroup, daemon_state: DaemonState, socket_path: Path
) -> None:
    out, err = io.StringIO(), io.StringIO()

    code = await anyio.to_thread.run_sync(
        lambda: status.show_snapshot(socket_path, json_output=True, out=out, err=err)
    )

    assert code == 0, err.getvalue()
    assert json.loads(out.getvalue())["lanes"][0]["name"] == "entry-1"


@pytest.mark.anyio
async def test_status_follow_prints_decisions(
    server: TaskGroup, daemon_state: DaemonState, socket_path: Path
) -> None:
    received: list[dict[str, Any]] = []
    ready = anyio.Event()
    token = anyio.lowlevel.current_token()

    def on_ready() -> None:
        anyio.from_thread.run_sync(ready.set, token=token)

    def follow() -> None:
        try:
            status.follow_decisions(socket_path, received.append, on_ready=on_ready)
        except status.ControlError as exc:
            received.append({"ended": str(exc)})

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, follow)
        with anyio.fail_after(WAIT_S):
            await ready.wait()
        daemon_state.observer.publish(record())
        daemon_state.observer.close()

    assert received[0]["code"] == "******XD4T"
    assert "stream ended" in received[1]["ended"]


@pytest.mark.anyio
async def test_follow_json_lines_until_stop(
    server: TaskGroup, daemon_state: DaemonState, socket_path: Path
) -> None:
    out, err = io.StringIO(), io.StringIO()
    codes: list[int] = []

    def follow() -> None:
        codes.append(status.show_follow(socket_path, json_output=True, out=out, err=err))

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, follow)
        with anyio.fail_after(WAIT_S):
            while "following decisions" not in err.getvalue():
                await anyio.sleep(0.01)
        daemon_state.observer.publish(record())
        daemon_state.observer.close()

    assert codes == [1]
    assert json.loads(out.getvalue()) == record().to_json()
    assert "stream ended" in err.getvalue()


def test_status_daemon_not_running(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "run" / "control.sock"

    code = status.show_snapshot(path, json_output=False, out=out, err=err)

    assert code == 1
    assert str(path) in err.getvalue()
    assert "systemctl status gated" in err.getvalue()
    assert out.getvalue() == ""


def test_status_stale_socket_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    out, err = io.StringIO(), io.StringIO()

    code = status.show_follow(path, json_output=False, out=out, err=err)

    assert code == 1
    assert "not running" in err.getvalue()
    assert "systemctl status gated" in err.getvalue()


def test_status_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    invalid = tmp_path / "invalid.toml"
    invalid.write_text("[api]\n")
    valid = tmp_path / "gated.toml"
    valid.write_text(
        '[api]\nlocation_id = "demo"\naccess_key = "k-1"\n'
        f'[runtime]\ndirectory = "{tmp_path / "run"}"\n'
        '[[lanes]]\nname = "a"\ndirection = "entry"\n[lanes.scanner]\nport = "/dev/null"\n'
        '[lanes.relay]\ndriver = "log"\n'
    )

    invalid_code = status.main(argparse.Namespace(config=invalid, follow=False, json=False))
    missing_code = status.main(argparse.Namespace(config=valid, follow=False, json=False))

    err = capsys.readouterr().err
    assert invalid_code == 78
    assert missing_code == 1
    assert str(tmp_path / "run" / "control.sock") in err


def test_status_needs_no_access_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gated.toml"
    config.write_text(
        '[api]\nlocation_id = "demo"\n'
        f'[runtime]\ndirectory = "{tmp_path / "run"}"\n'
        '[[lanes]]\nname = "a"\ndirection = "entry"\n[lanes.scanner]\nport = "/dev/null"\n'
        '[lanes.relay]\ndriver = "log"\n'
    )

    code = status.main(argparse.Namespace(config=config, follow=False, json=False))

    err = capsys.readouterr().err
    assert code == 1
    assert "access_key" not in err
    assert "not running" in err


def test_format_snapshot_offline_backlog() -> None:
    now = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
    snapshot = {
        "started_at": (now - timedelta(hours=3)).isoformat(),
        "api": {
            "online": False,
            "since": (now - timedelta(minutes=12, seconds=5)).isoformat(),
            "last_error": "GET /{location_id}/session timed out after 5 s",
            "auth_failed": False,
        },
        "cache": {"sessions": 120, "synced_at": (now - timedelta(minutes=12)).isoformat()},
        "journal": {
            "pending": 3,
            "oldest_pending_at": (now - timedelta(minutes=5)).isoformat(),
            "poison": 1,
        },
        "lanes": [
            {
                "name": "exit-1",
                "direction": "exit",
                "scanner": "reconnecting",
                "scanner_reconnects": 4,
                "relay_available": False,
            }
        ],
        "recent_decisions": [record().to_json()],
    }

    text = status.format_snapshot(snapshot, now)

    assert "OFFLINE since" in text
    assert "(12 min 05 s ago)" in text
    assert "timed out after 5 s" in text
    assert "120 sessions" in text
    assert "3 pending, oldest" in text
    assert "1 poison" in text
    assert "reconnecting" in text
    assert "UNAVAILABLE" in text
    assert "started" in text


def test_format_snapshot_tolerates_missing_fields() -> None:
    text = status.format_snapshot({"api": {"auth_failed": True, "online": False}})

    assert "access key was rejected" in text
    assert "(no lane is running)" in text
    assert "(none since the daemon started)" in text


# --- a real daemon, in process, serving its control socket ------------------------------


@dataclass
class RunningGate:
    config: GatedConfig
    lanes: dict[str, LanePtys]
    sim: SimulatorHandle
    socket_path: Path


@pytest.fixture
def gate_config(tmp_path: Path) -> Iterator[RunningGate]:
    with running_simulator() as sim:
        lanes = {
            name: LanePtys(name, direction, PtyPair.open(), PtyPair.open())
            for name, direction in (("entry-1", "entry"), ("exit-1", "exit"))
        }
        config_path = tmp_path / "gated.toml"
        config_path.write_text(
            render_config(
                base_url=sim.base_url,
                access_key=sim.access_key,
                state_dir=tmp_path / "state",
                runtime_dir=tmp_path / "run",
                lanes=list(lanes.values()),
                log_level="WARNING",
            )
        )
        config = load_config(config_path)
        try:
            yield RunningGate(config, lanes, sim, control_socket_path(config))
        finally:
            for lane in lanes.values():
                lane.scanner.close()
                lane.relay.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_running_daemon_status_and_follow(gate_config: RunningGate) -> None:
    gate = gate_config
    session = gate.sim.create_session()
    code = str(session["redemption_info"]["code"])

    received: list[dict[str, Any]] = []
    ready = anyio.Event()
    token = anyio.lowlevel.current_token()

    class FirstDecision(Exception):
        pass

    def follow() -> None:
        def on_decision(decision: dict[str, Any]) -> None:
            received.append(decision)
            raise FirstDecision

        with contextlib.suppress(FirstDecision):
            status.follow_decisions(
                gate.socket_path,
                on_decision,
                on_ready=lambda: anyio.from_thread.run_sync(ready.set, token=token),
            )

    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: run_daemon(
                gate.config,
                notifier=Notifier(environ={}),
                handle_signals=False,
                task_status=task_status,
            )
        )
        snapshot = await anyio.to_thread.run_sync(status.fetch_snapshot, gate.socket_path)
        async with anyio.create_task_group() as follow_group:
            follow_group.start_soon(anyio.to_thread.run_sync, follow)
            with anyio.fail_after(WAIT_S):
                await ready.wait()
            gate.lanes["entry-1"].scanner.write(code.encode() + b"\r\n")
        tg.cancel_scope.cancel()

    assert [lane["name"] for lane in snapshot["lanes"]] == ["entry-1", "exit-1"]
    assert received[0]["lane"] == "entry-1"
    assert received[0]["outcome"] == "started"
    assert received[0]["code"] == "*" * (len(code) - 4) + code[-4:]
    assert received[0]["session_id"] == str(session["id"])
    assert not gate.socket_path.exists()
    gc.collect()  # an unclosed scan queue would raise a ResourceWarning here


# --- the real daemon as a child process, and the `gated status` command line -----------


def test_status_command_against_daemon(tmp_path: Path) -> None:
    with running_simulator() as sim:
        gate = GateProcess(tmp_path, base_url=sim.base_url, access_key=sim.access_key)
        try:
            gate.start()
            command = [sys.executable, "-m", "gated", "status", "--config", str(gate.config_path)]
            snapshot = subprocess.run(
                [*command, "--json"], capture_output=True, timeout=WAIT_S, check=False
            )
            assert snapshot.returncode == 0, snapshot.stderr.decode()
            lanes = [lane["name"] for lane in json.loads(snapshot.stdout)["lanes"]]
            assert lanes == ["entry-1", "exit-1"]

            session = sim.create_session()
            code = str(session["redemption_info"]["code"])
            with subprocess.Popen(
                [*command, "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            ) as follower:
                try:
                    assert follower.stderr is not None
                    assert follower.stdout is not None
                    assert b"following decisions" in follower.stderr.readline()
                    gate.lanes["entry-1"].scanner.write(code.encode() + b"\r\n")
                    line = follower.stdout.readline().decode()
                    follower.send_signal(signal.SIGINT)
                    assert follower.wait(timeout=WAIT_S) == 0
                finally:
                    if follower.poll() is None:
                        follower.kill()
            assert "entry-1" in line
            assert "started" in line
            assert "*" * (len(code) - 4) + code[-4:] in line
            assert code not in line
        finally:
            gate.close()

    stopped = subprocess.run(
        [sys.executable, "-m", "gated", "status", "--config", str(gate.config_path)],
        capture_output=True,
        timeout=WAIT_S,
        check=False,
    )
    assert stopped.returncode == 1
    assert "systemctl status gated" in stopped.stderr.decode()
