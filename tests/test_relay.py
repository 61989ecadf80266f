"""Relay drivers: exact bytes on real ptys, OFF on every exit path, gpio with a fake binding."""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from gated.config import (
    GpioRelaySettings,
    LogRelaySettings,
    SerialRelaySettings,
    TextRelaySettings,
    load_config,
)
from gated.devices import serialrelay
from gated.devices.relay import Relay, make_relay
from gated.errors import DeviceBrokenError, DeviceBusyError, DeviceError
from tests.ptyhelpers import PtyDevice, linked_pty_device, pty_device

__all__ = ["linked_pty_device", "pty_device"]

LCUS1_ON = bytes.fromhex("A0 01 01 A2")
LCUS1_OFF = bytes.fromhex("A0 01 00 A1")
# Allowance for the event loop clock in lower bounds of waits, in seconds:
# asyncio may run a timer up to its clock resolution early.
CLOCK_SLACK_S = 0.002
# Deadline of one wait in a test, in seconds; a passing test never waits this long.
WAIT_S = 10.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_leftover_ports() -> Iterator[None]:
    yield
    assert serialrelay._links == {}, "a test left a relay port open"


def lcus(port: str, **overrides: Any) -> SerialRelaySettings:
    values: dict[str, Any] = {
        "driver": "serial",
        "port": port,
        "board": "lcus-1",
        "pulse_ms": 50,
        "settle_ms": 0,
        "min_gap_ms": 0,
    }
    values.update(overrides)
    return SerialRelaySettings(**values)


# --- serial and text drivers on ptys ---------------------------------------------


@pytest.mark.anyio
async def test_lcus_off_at_open_and_pulse_bytes(pty_device: PtyDevice) -> None:
    relay = make_relay("entry-1", lcus(pty_device.path))
    await relay.open()
    assert relay.available
    assert await pty_device.read_exactly(4) == LCUS1_OFF
    await relay.pulse()
    assert await pty_device.read_exactly(8) == LCUS1_ON + LCUS1_OFF
    await relay.aclose()
    assert await pty_device.read_exactly(4) == LCUS1_OFF
    assert not relay.available


@pytest.mark.anyio
async def test_lcus_channel_frames(pty_device: PtyDevice) -> None:
    relay = make_relay("entry-1", lcus(pty_device.path, board="lcus-4", channel=3))
    await relay.open()
    await relay.pulse()
    await relay.aclose()
    expected = bytes.fromhex("A0 03 00 A3  A0 03 01 A4  A0 03 00 A3  A0 03 00 A3")
    assert await pty_device.read_exactly(16) == expected


@pytest.mark.anyio
async def test_raw_hex_commands(pty_device: PtyDevice) -> None:
    settings = lcus(pty_device.path, board=None, on="FE 05 00 00 FF 00", off="FE050000 0000")
    relay = make_relay("entry-1", settings)
    await relay.open()
    await relay.pulse()
    await relay.aclose()
    off = bytes.fromhex("FE 05 00 00 00 00")
    on = bytes.fromhex("FE 05 00 00 FF 00")
    assert await pty_device.read_exactly(24) == off + on + off + off


@pytest.mark.anyio
async def test_text_commands(pty_device: PtyDevice) -> None:
    settings = TextRelaySettings(
        driver="text", port=pty_device.path, pulse_ms=50, settle_ms=0, min_gap_ms=0
    )
    relay = make_relay("exit-1", settings)
    await relay.open()
    await relay.pulse()
    await relay.aclose()
    expected = b"relay off 0\r" + b"relay on 0\r" + b"relay off 0\r" + b"relay off 0\r"
    assert await pty_device.read_exactly(len(expected)) == expected


@pytest.mark.anyio
async def test_settle_before_first_command(pty_device: PtyDevice) -> None:
    relay = make_relay("entry-1", lcus(pty_device.path, settle_ms=150))
    before_open = anyio.current_time()
    await relay.open()
    [(arrived, chunk)] = await pty_device.read_timed(4)
    assert chunk == LCUS1_OFF
    assert arrived - before_open >= 0.150 - CLOCK_SLACK_S
    await relay.aclose()


@pytest.mark.anyio
async def test_min_gap_between_commands(pty_device: PtyDevice) -> None:
    relay = make_relay("entry-1", lcus(pty_device.path, pulse_ms=50, min_gap_ms=200))
    await relay.open()
    await pty_device.read_exactly(4)
    # open() has written OFF after this point, so ON waits out the gap, and
    # OFF waits out the gap again although the pulse is only 50 ms.
    before_pulse = anyio.current_time()
    await relay.pulse()
    chunks = await pty_device.read_timed(8)
    assert b"".join(chunk for _, chunk in chunks) == LCUS1_ON + LCUS1_OFF
    off_arrived = chunks[-1][0]
    assert off_arrived - before_pulse >= 0.200 - CLOCK_SLACK_S
    await relay.aclose()


@pytest.mark.anyio
async def test_cancelled_pulse_sends_off(pty_device: PtyDevice) -> None:
    relay = make_relay("entry-1", lcus(pty_device.path, pulse_ms=10_000))
    await relay.open()
    await pty_device.read_exactly(4)
    with capture_logs() as logs:
        async with anyio.create_task_group() as group:
            group.start_soon(relay.pulse)
            assert await pty_device.read_exactly(4) == LCUS1_ON
            group.cancel_scope.cancel()
    assert await pty_device.read_exactly(4) == LCUS1_OFF
    assert pty_device.pending() == b""
    assert not [entry for entry in logs if entry["event"] == "relay.failed"]
    await relay.aclose()


@pytest.mark.anyio
async def test_pulse_cancelled_during_settle_still_sends_off(pty_device: PtyDevice) -> None:
    relay = make_relay("entry-1", lcus(pty_device.path, settle_ms=300))
    with anyio.move_on_after(0.05):
        await relay.open()
    # The OFF of the cancelled open() was never written; the shielded OFF
    # of the cancelled pulse below must still reach the board.
    with anyio.move_on_after(0):
        await relay.pulse()
    assert await pty_device.read_exactly(4) == LCUS1_OFF
    await relay.pulse()
    assert await pty_device.read_exactly(8) == LCUS1_ON + LCUS1_OFF
    await relay.aclose()


@pytest.mark.anyio
async def test_interrupted_open_sends_off_before_on(pty_device: PtyDevice) -> None:
    relay = make_relay("entry-1", lcus(pty_device.path, settle_ms=300))
    with anyio.move_on_after(0.05):
        await relay.open()
    await relay.pulse()
    assert await pty_device.read_exactly(12) == LCUS1_OFF + LCUS1_ON + LCUS1_OFF
    await relay.aclose()


@pytest.mark.anyio
async def test_off_first_after_reopen(linked_pty_device: PtyDevice) -> None:
    device = linked_pty_device
    relay = make_relay("entry-1", lcus(device.path))
    await relay.open()
    assert await device.read_exactly(4) == LCUS1_OFF

    device.unplug()
    with pytest.raises(DeviceBrokenError):
        await relay.pulse()
    assert not relay.available

    device.replug()
    # The relay reads as available again once the node is back and the
    # backoff after the failed reopen (at most REOPEN_CAP_S) has passed.
    with anyio.fail_after(WAIT_S):
        while not relay.available:
            await anyio.sleep(serialrelay.REOPEN_INITIAL_S)
    await relay.pulse()
    assert await device.read_exactly(12) == LCUS1_OFF + LCUS1_ON + LCUS1_OFF
    await relay.aclose()


@pytest.mark.anyio
async def test_replug_while_idle_pulses_once(linked_pty_device: PtyDevice) -> None:
    device = linked_pty_device
    relay = make_relay("entry-1", lcus(device.path))
    await relay.open()
    await device.read_exactly(4)
    device.replug()
    with capture_logs() as logs:
        await relay.pulse()
    assert await device.read_exactly(12) == LCUS1_OFF + LCUS1_ON + LCUS1_OFF
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["relay.lost"]
    await relay.aclose()


@pytest.mark.anyio
async def test_open_without_device_is_not_fatal(tmp_path: Path) -> None:
    relay = make_relay("entry-1", lcus(str(tmp_path / "missing")))
    with capture_logs() as logs:
        await relay.open()
    assert not relay.available
    assert "relay.open_failed" in [entry["event"] for entry in logs]
    await relay.aclose()


@pytest.mark.anyio
async def test_two_channels_share_one_board(pty_device: PtyDevice) -> None:
    first = make_relay("entry-1", lcus(pty_device.path, board="lcus-2", channel=1))
    second = make_relay("exit-1", lcus(pty_device.path, board="lcus-2", channel=2))
    await first.open()
    await second.open()
    await second.pulse()
    await first.aclose()
    await second.aclose()
    expected = bytes.fromhex(
        "A0 01 00 A1  A0 02 00 A2  A0 02 01 A3  A0 02 00 A2  A0 01 00 A1  A0 02 00 A2"
    )
    assert await pty_device.read_exactly(24) == expected


@pytest.mark.anyio
async def test_shared_board_rejects_other_baudrate(pty_device: PtyDevice) -> None:
    first = make_relay("entry-1", lcus(pty_device.path, board="lcus-2", channel=1))
    second = make_relay("exit-1", lcus(pty_device.path, board="lcus-2", channel=2, baudrate=19200))
    await first.open()
    with pytest.raises(DeviceError, match="baudrate"):
        await second.open()
    await second.aclose()
    await first.aclose()


# --- log driver ----------------------------------------------------------------


@pytest.mark.anyio
async def test_log_relay_events() -> None:
    relay = make_relay("entry-1", LogRelaySettings(driver="log", pulse_ms=50))
    with capture_logs() as logs:
        await relay.open()
        await relay.pulse()
        await relay.aclose()
    events = [(entry["event"], entry["log_level"]) for entry in logs]
    assert events == [
        ("relay.off", "info"),
        ("relay.on", "info"),
        ("relay.off", "info"),
        ("relay.pulse", "debug"),
        ("relay.off", "info"),
    ]
    pulse = next(entry for entry in logs if entry["event"] == "relay.pulse")
    assert pulse["duration_ms"] >= 50 - CLOCK_SLACK_S * 1000


# --- gpio driver with a fake binding ---------------------------------------------


class FakeLineRequest:
    def __init__(self, values: list[tuple[int | str, str]], fail_on: str | None) -> None:
        self.values = values
        self.fail_on = fail_on
        self.released = False

    def set_value(self, line: int | str, value: str) -> None:
        if value == self.fail_on:
            raise OSError(errno.EIO, "Input/output error")
        self.values.append((line, value))

    def release(self) -> None:
        self.released = True


def fake_gpiod(*, fail_on: str | None = None, request_error: Exception | None = None) -> Any:
    """A stand-in for the libgpiod v2 binding that records every call."""
    calls: dict[str, Any] = {"values": []}

    def request_lines(chip: str, *, consumer: str, config: dict[Any, Any]) -> FakeLineRequest:
        if request_error is not None:
            raise request_error
        calls.update(chip=chip, consumer=consumer, config=config)
        calls["request"] = FakeLineRequest(calls["values"], fail_on)
        return calls["request"]

    line = SimpleNamespace(
        Direction=SimpleNamespace(OUTPUT="output"),
        Value=SimpleNamespace(ACTIVE="active", INACTIVE="inactive"),
    )
    return SimpleNamespace(
        request_lines=request_lines, line=line, LineSettings=lambda **kw: kw, calls=calls
    )


def gpio(**overrides: Any) -> GpioRelaySettings:
    values: dict[str, Any] = {"driver": "gpio", "line": 17, "pulse_ms": 50}
    values.update(overrides)
    return GpioRelaySettings(**values)


@pytest.mark.anyio
async def test_gpio_pulse_sequence() -> None:
    binding = fake_gpiod()
    relay = make_relay("entry-1", gpio(active_low=True), gpiod_module=binding)
    await relay.open()
    calls = binding.calls
    assert calls["chip"] == "/dev/gpiochip0"
    assert calls["config"] == {
        17: {"direction": "output", "output_value": "inactive", "active_low": True}
    }
    await relay.pulse()
    await relay.aclose()
    assert calls["values"] == [(17, "inactive"), (17, "active"), (17, "inactive"), (17, "inactive")]
    assert calls["request"].released
    assert not relay.available


@pytest.mark.anyio
async def test_gpio_line_name_and_digits() -> None:
    binding = fake_gpiod()
    relay = make_relay("entry-1", gpio(line="17"), gpiod_module=binding)
    await relay.open()
    assert list(binding.calls["config"]) == [17]
    await relay.aclose()
    binding = fake_gpiod()
    relay = make_relay("entry-1", gpio(line="GPIO17"), gpiod_module=binding)
    await relay.open()
    assert list(binding.calls["config"]) == ["GPIO17"]
    await relay.aclose()


@pytest.mark.anyio
async def test_gpio_cancelled_pulse_ends_inactive() -> None:
    binding = fake_gpiod()
    relay = make_relay("entry-1", gpio(pulse_ms=10_000), gpiod_module=binding)
    await relay.open()
    with anyio.move_on_after(0.05):
        await relay.pulse()
    assert binding.calls["values"] == [(17, "inactive"), (17, "active"), (17, "inactive")]
    await relay.aclose()


@pytest.mark.anyio
async def test_gpio_failed_off_raises_and_logs() -> None:
    binding = fake_gpiod()
    relay = make_relay("entry-1", gpio(), gpiod_module=binding)
    await relay.open()
    binding.calls["request"].fail_on = "inactive"
    with capture_logs() as logs, pytest.raises(DeviceBrokenError, match="gate may stay open"):
        await relay.pulse()
    failed = [entry for entry in logs if entry["event"] == "relay.failed"]
    assert [(entry["action"], entry["log_level"]) for entry in failed] == [("off", "error")]
    await relay.aclose()


@pytest.mark.anyio
async def test_gpio_binding_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import gpiod` raise ImportError.
    monkeypatch.setitem(sys.modules, "gpiod", None)
    relay = make_relay("entry-1", gpio())
    with pytest.raises(DeviceError, match=r"virtual environment.*pip install 'gpiod>=2'"):
        await relay.open()


@pytest.mark.anyio
async def test_gpio_v1_binding_rejected() -> None:
    v1 = SimpleNamespace(Chip=object, LINE_REQ_DIR_OUT=3)
    relay = make_relay("entry-1", gpio(), gpiod_module=v1)
    with pytest.raises(DeviceError, match=r"v1 API.*gpiod>=2"):
        await relay.open()


@pytest.mark.parametrize(
    ("error", "expected_type", "message"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file"), DeviceError, "not found"),
        (PermissionError(errno.EACCES, "Permission denied"), DeviceError, "gpio group"),
        (OSError(errno.EBUSY, "Device or resource busy"), DeviceBusyError, "another program"),
        (ValueError("unknown line name"), DeviceError, "line 17 not found"),
    ],
)
@pytest.mark.anyio
async def test_gpio_open_errors(
    error: Exception, expected_type: type[DeviceError], message: str
) -> None:
    relay = make_relay("entry-1", gpio(), gpiod_module=fake_gpiod(request_error=error))
    with pytest.raises(expected_type, match=message):
        await relay.open()
    assert not relay.available


def test_every_driver_satisfies_relay_protocol(tmp_path: Path) -> None:
    relays: list[Relay] = [
        make_relay("a", LogRelaySettings(driver="log")),
        make_relay("a", lcus(str(tmp_path / "tty"))),
        make_relay("a", gpio(), gpiod_module=fake_gpiod()),
    ]
    assert [relay.name for relay in relays] == [
        "log",
        f"lcus-1 channel 1 on {tmp_path / 'tty'}",
        "gpio /dev/gpiochip0 line 17",
    ]


@pytest.mark.parametrize("name", ["relays.toml", "keypad-lane.toml"])
def test_example_config_is_valid(name: str) -> None:
    config = load_config(Path(__file__).parent.parent / "config" / name, environ={})
    for lane in config.lanes:
        make_relay(lane.name, lane.relay, gpiod_module=fake_gpiod())
