"""Scanner: reading codes, unplug and replug, a busy port, through real ptys."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import serial
from structlog.testing import capture_logs

from gated.config import ScannerSettings
from gated.devices.framing import Code, Rejected, RejectReason, ScanEvent
from gated.devices.scanner import REOPEN_CAP_S, REOPEN_INITIAL_S, Scanner, ScannerState
from gated.errors import ConfigError
from tests.ptyhelpers import PtyDevice, linked_pty_device, pty_device

__all__ = ["linked_pty_device", "pty_device"]

# Deadline of one wait for a scanner event or state, in seconds. A passing
# test never waits this long, so it can be generous for a loaded CI machine.
WAIT_S = 10.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class StateRecorder:
    """State-change callback that tests can wait on."""

    def __init__(self) -> None:
        self.states: list[ScannerState] = []
        self._changed: anyio.Event | None = None

    def __call__(self, state: ScannerState) -> None:
        self.states.append(state)
        if self._changed is not None:
            self._changed.set()

    async def wait_for(self, state: ScannerState, *, count: int = 1) -> None:
        with anyio.fail_after(WAIT_S):
            while self.states.count(state) < count:
                self._changed = anyio.Event()
                await self._changed.wait()


class LogWatcher:
    """structlog processor that lets a test wait for the n-th event of a name."""

    def __init__(self) -> None:
        self._changed: anyio.Event | None = None
        self.entries: list[MutableMapping[str, Any]] = []

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        self.entries.append(dict(event_dict, log_level=method_name))
        if self._changed is not None:
            self._changed.set()
        return event_dict

    def named(self, name: str) -> list[MutableMapping[str, Any]]:
        return [entry for entry in self.entries if entry["event"] == name]

    async def wait_for(self, name: str, *, count: int = 1) -> None:
        with anyio.fail_after(WAIT_S):
            while len(self.named(name)) < count:
                self._changed = anyio.Event()
                await self._changed.wait()


def scanner_settings(port: str, **overrides: Any) -> ScannerSettings:
    return ScannerSettings(port=port, **overrides)


@asynccontextmanager
async def running_scanner(
    settings: ScannerSettings, recorder: StateRecorder
) -> AsyncIterator[tuple[Scanner, anyio.abc.ObjectReceiveStream[ScanEvent]]]:
    send, receive = anyio.create_memory_object_stream[ScanEvent](16)
    scanner = Scanner("entry-1", settings, on_state_change=recorder)
    async with anyio.create_task_group() as group, send, receive:
        await group.start(scanner.run, send)
        yield scanner, receive
        group.cancel_scope.cancel()


async def next_event(receive: anyio.abc.ObjectReceiveStream[ScanEvent]) -> ScanEvent:
    with anyio.fail_after(WAIT_S):
        return await receive.receive()


# --- facts about Linux ptys that the helpers rely on ---------------------------


def test_pty_master_close_breaks_slave(pty_device: PtyDevice) -> None:
    path = pty_device.slave_path
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        pty_device.unplug()
        assert not os.path.exists(path)
        readable, _, _ = select.select([fd], [], [], WAIT_S)
        assert readable == [fd]
        # A hung-up tty may read as EOF (seen on Linux 6.18) or fail with
        # EIO; the scanner treats both as a lost device.
        outcome: bytes | int
        try:
            outcome = os.read(fd, 16)
        except OSError as exc:
            outcome = exc.errno or 0
        assert outcome in (b"", errno.EIO)
        with pytest.raises(OSError, match="Input/output error"):
            os.write(fd, b"x")
    finally:
        os.close(fd)


def test_pyserial_open_flushes_earlier_input(pty_device: PtyDevice) -> None:
    pty_device.write(b"early")
    # Wait until the bytes reached the slave's input queue; the helper's
    # own slave descriptor shares that queue.
    readable, _, _ = select.select([pty_device._slave], [], [], WAIT_S)
    assert readable
    handle = serial.serial_for_url(pty_device.path, timeout=WAIT_S)
    try:
        assert handle.in_waiting == 0
        pty_device.write(b"late")
        assert handle.read(4) == b"late"
    finally:
        handle.close()


# --- reading -------------------------------------------------------------------


@pytest.mark.anyio
async def test_scanner_reads_code(pty_device: PtyDevice) -> None:
    recorder = StateRecorder()
    async with running_scanner(scanner_settings(pty_device.path), recorder) as (scanner, receive):
        await recorder.wait_for(ScannerState.CONNECTED)
        pty_device.write(b"ABCD1234\r")
        assert await next_event(receive) == Code("ABCD1234", b"ABCD1234")
        assert scanner.reconnects == 0
    assert recorder.states == [ScannerState.CONNECTED, ScannerState.CLOSED]


@pytest.mark.anyio
async def test_scanner_idle_rejects_partial_code(pty_device: PtyDevice) -> None:
    recorder = StateRecorder()
    settings = scanner_settings(pty_device.path, idle_ms=20)
    async with running_scanner(settings, recorder) as (_, receive):
        await recorder.wait_for(ScannerState.CONNECTED)
        pty_device.write(b"ABCD")
        event = await next_event(receive)
        assert isinstance(event, Rejected)
        assert event.reason is RejectReason.INCOMPLETE_CODE
        pty_device.write(b"EFGH5678\r")
        assert await next_event(receive) == Code("EFGH5678", b"EFGH5678")


@pytest.mark.anyio
async def test_scanner_idle_terminator(pty_device: PtyDevice) -> None:
    recorder = StateRecorder()
    settings = scanner_settings(pty_device.path, terminator="idle", idle_ms=20)
    async with running_scanner(settings, recorder) as (_, receive):
        await recorder.wait_for(ScannerState.CONNECTED)
        pty_device.write(b"ABCD1234")
        assert await next_event(receive) == Code("ABCD1234", b"ABCD1234")


@pytest.mark.anyio
async def test_scanner_logs_raw_bytes_and_masks_code(pty_device: PtyDevice) -> None:
    recorder = StateRecorder()
    watcher = LogWatcher()
    with capture_logs(processors=[watcher]):
        async with running_scanner(scanner_settings(pty_device.path), recorder) as (_, receive):
            await recorder.wait_for(ScannerState.CONNECTED)
            pty_device.write(b"Q7K2M9XD4T\r")
            await next_event(receive)
    raw = watcher.named("scanner.bytes")
    assert [entry["hex"] for entry in raw] == ["51 37 4b 32 4d 39 58 44 34 54 0d"]
    assert raw[0]["log_level"] == "debug"
    assert [entry["code"] for entry in watcher.named("scanner.code")] == ["******XD4T"]
    assert watcher.named("scanner.opened")[0]["log_level"] == "info"


@pytest.mark.anyio
async def test_scanner_stops_when_receiver_closes(pty_device: PtyDevice) -> None:
    recorder = StateRecorder()
    send, receive = anyio.create_memory_object_stream[ScanEvent](1)
    scanner = Scanner("entry-1", scanner_settings(pty_device.path), on_state_change=recorder)
    with anyio.fail_after(WAIT_S), send:
        async with anyio.create_task_group() as group:
            await group.start(scanner.run, send)
            await recorder.wait_for(ScannerState.CONNECTED)
            receive.close()
            pty_device.write(b"ABCD1234\r")
    assert scanner.state is ScannerState.CLOSED


@pytest.mark.anyio
async def test_invalid_port_url_raises_config_error() -> None:
    scanner = Scanner("entry-1", scanner_settings("nosuchscheme://x"))
    send, receive = anyio.create_memory_object_stream[ScanEvent](1)
    async with send, receive:
        with pytest.raises(ConfigError, match="nosuchscheme"):
            await scanner.run(send)


@pytest.mark.anyio
async def test_loop_url_uses_thread_fallback() -> None:
    recorder = StateRecorder()
    async with running_scanner(scanner_settings("loop://"), recorder) as (scanner, _):
        await recorder.wait_for(ScannerState.CONNECTED)
        assert scanner.state is ScannerState.CONNECTED
    assert recorder.states[-1] is ScannerState.CLOSED


# --- hot-plug --------------------------------------------------------------------


@pytest.mark.anyio
async def test_scanner_starts_without_device(tmp_path: Path) -> None:
    link = tmp_path / "usb-Scanner_1234-if00"
    recorder = StateRecorder()
    async with running_scanner(scanner_settings(str(link)), recorder) as (scanner, receive):
        # The task has started although there is nothing to open yet.
        assert scanner.state is ScannerState.RECONNECTING
        with PtyDevice(link=link) as device:
            await recorder.wait_for(ScannerState.CONNECTED)
            device.write(b"ABCD1234\r")
            assert await next_event(receive) == Code("ABCD1234", b"ABCD1234")
        assert scanner.reconnects == 0


@pytest.mark.anyio
async def test_scanner_survives_replug(linked_pty_device: PtyDevice) -> None:
    device = linked_pty_device
    recorder = StateRecorder()
    watcher = LogWatcher()
    with capture_logs(processors=[watcher]):
        async with running_scanner(scanner_settings(device.path), recorder) as (scanner, receive):
            await recorder.wait_for(ScannerState.CONNECTED)
            device.write(b"ABCD1234\r")
            assert await next_event(receive) == Code("ABCD1234", b"ABCD1234")

            device.unplug()
            await recorder.wait_for(ScannerState.RECONNECTING)
            await watcher.wait_for("scanner.reconnecting", count=5)
            device.replug()
            await recorder.wait_for(ScannerState.CONNECTED, count=2)
            device.write(b"EFGH5678\r")
            assert await next_event(receive) == Code("EFGH5678", b"EFGH5678")
            assert scanner.reconnects == 1

    warnings = [entry for entry in watcher.entries if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in warnings] == ["scanner.lost"]
    retries = watcher.named("scanner.reconnecting")
    assert all(entry["log_level"] == "debug" for entry in retries)
    # The delay between tries grows and stays capped, so an unplugged
    # scanner is retried a few times per second at most.
    delays = [entry["delay_s"] for entry in retries]
    assert delays[0] >= REOPEN_INITIAL_S / 2
    assert delays == sorted(delays)
    assert max(delays) <= REOPEN_CAP_S
    assert delays[4] >= REOPEN_INITIAL_S * 2**4 / 2
    opened = watcher.named("scanner.opened")
    assert len(opened) == 2
    assert opened[1]["down_s"] > 0
    assert opened[1]["reconnects"] == 1


@pytest.mark.anyio
async def test_scanner_follows_symlink_to_new_device(tmp_path: Path) -> None:
    link = tmp_path / "usb-Scanner_1234-if00"
    recorder = StateRecorder()
    with PtyDevice(link=link) as first:
        async with running_scanner(scanner_settings(str(link)), recorder) as (_, receive):
            await recorder.wait_for(ScannerState.CONNECTED)
            # The old pty stays open, so no read error reports the change:
            # only the periodic check of the node behind the link does.
            with PtyDevice(link=link) as second:
                await recorder.wait_for(ScannerState.CONNECTED, count=2)
                second.write(b"ABCD1234\r")
                assert await next_event(receive) == Code("ABCD1234", b"ABCD1234")
            assert first.plugged


@pytest.mark.anyio
async def test_scanner_waits_for_busy_port(pty_device: PtyDevice) -> None:
    holder = serial.serial_for_url(pty_device.path, do_not_open=True)
    holder.exclusive = True
    holder.open()
    recorder = StateRecorder()
    watcher = LogWatcher()
    try:
        with capture_logs(processors=[watcher]):
            settings = scanner_settings(pty_device.path)
            async with running_scanner(settings, recorder) as (scanner, receive):
                assert scanner.state is ScannerState.BUSY
                await watcher.wait_for("scanner.reconnecting", count=3)
                holder.close()
                await recorder.wait_for(ScannerState.CONNECTED)
                pty_device.write(b"ABCD1234\r")
                assert await next_event(receive) == Code("ABCD1234", b"ABCD1234")
    finally:
        holder.close()
    busy = watcher.named("scanner.port_busy")
    assert len(busy) == 1
    assert busy[0]["log_level"] == "warning"
    assert recorder.states[:2] == [ScannerState.BUSY, ScannerState.CONNECTED]
