"""The ``serial`` and ``text`` relay drivers: boards switched by commands on a serial port.

``serial`` sends raw bytes (an LCUS preset or configured hex), ``text`` sends
ASCII commands such as Numato's ``relay on 0\\r``. Both keep the port open
between pulses. Lanes that drive two channels of one board share one open
port, so their commands are serialised and spaced by ``min_gap_ms``.

Reconnection is lazy: a failed write closes the port and marks the relay
unavailable, and the next ``pulse``, ``off`` or ``open`` reopens it. The
first reopen after a failure is tried at once. Each later failed open pushes
the next try out by a capped, jittered backoff, and a call before then fails
at once without touching the device. After every (re)open the port waits
``settle_ms``, then switches every channel of that board off, because the
board may have lost power and its state is unknown.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

from gated.config import SerialRelaySettings, TextRelaySettings
from gated.devices.pulsing import PulsingRelay
from gated.devices.serialport import (
    Backoff,
    close_quietly,
    is_device_path,
    open_serial,
    write_all,
)
from gated.errors import DeviceBrokenError, DeviceClosedError, DeviceError
from gated.logs import get_logger

# Deadline of one command write, in seconds. A command is 4 to 20 bytes,
# which an adapter sends in a few ms even at 9600 baud, so a write still
# pending after 1 s means the adapter hangs.
WRITE_TIMEOUT_S = 1.0
# First delay before another reopen after a failed one, in seconds.
REOPEN_INITIAL_S = 0.1
# Cap of that delay, in seconds: a board plugged back in works again
# for the first pulse after at most this long.
REOPEN_CAP_S = 2.0


class SerialLink:
    """One open relay port, shared by every relay channel on that board."""

    def __init__(self, port: str, baudrate: int) -> None:
        self.port = port
        self.baudrate = baudrate
        self.settle_s = 0.0
        self.gap_s = 0.0
        self.users: list[SerialRelay] = []
        self._handle: Any = None
        self._lock = anyio.Lock()
        # Loop time before which the next command must not be written.
        self._not_before = 0.0
        self._backoff = Backoff(REOPEN_INITIAL_S, REOPEN_CAP_S)
        # time.monotonic() before which no reopen is tried. It is not on the
        # event loop clock because ``ready`` may be read outside the loop.
        self._next_try = 0.0
        # True from a (re)open until every channel has been switched off.
        self._off_pending = False
        self._failure_logged = False
        self._log = get_logger("relay", port=port)

    @property
    def is_open(self) -> bool:
        return self._handle is not None

    def ready(self) -> bool:
        """Return True when a command now would be written or would try a reopen.

        A closed port counts as ready once its backoff has passed and its
        device node exists, so callers that skip unavailable relays still
        trigger the lazy reopen when the board comes back.
        """
        if self._handle is not None:
            return True
        if time.monotonic() < self._next_try:
            return False
        return not is_device_path(self.port) or os.path.exists(self.port)

    def worst_case_s(self) -> float:
        """Upper bound of one command's wait, in seconds, including a reopen."""
        per_command = self.gap_s + WRITE_TIMEOUT_S
        return self.settle_s + per_command * (len(self.users) + 1)

    async def send(self, command: bytes, *, is_off: bool = False) -> None:
        """Write one command, reopening the port first if it is closed.

        After a (re)open every channel is switched off first, and then an OFF
        command is not repeated.
        """
        async with self._lock:
            if self._handle is None:
                await self._reopen_locked()
            if self._off_pending:
                await self._switch_all_off_locked()
                if is_off:
                    return
            await self._write_locked(command)

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            close_quietly(handle)
            self._log.info("relay.closed")

    async def _reopen_locked(self) -> None:
        now = time.monotonic()
        if now < self._next_try:
            raise DeviceBrokenError(
                f"relay port {self.port!r} is unavailable; next try in {self._next_try - now:.1f} s"
            )
        try:
            self._handle = open_serial(self.port, baudrate=self.baudrate, exclusive=True)
        except DeviceError as exc:
            self._next_try = now + self._backoff.next_delay()
            if self._failure_logged:
                self._log.debug("relay.reconnecting", error=str(exc))
            else:
                self._failure_logged = True
                self._log.warning("relay.open_failed", error=str(exc))
            raise
        self._backoff.reset()
        self._failure_logged = False
        self._not_before = anyio.current_time() + self.settle_s
        self._off_pending = True
        self._log.info("relay.opened", settle_ms=round(self.settle_s * 1000))

    async def _switch_all_off_locked(self) -> None:
        # Stays pending until every OFF is written, so an OFF sequence that
        # was cancelled or failed is repeated before any other command.
        for user in self.users:
            await self._write_locked(user.off_bytes)
        self._off_pending = False

    async def _write_locked(self, command: bytes) -> None:
        await anyio.sleep_until(self._not_before)
        if self._handle is None:
            raise DeviceClosedError(f"relay port {self.port!r} was closed by gated")
        try:
            await write_all(self._handle, command, timeout_s=WRITE_TIMEOUT_S)
        except DeviceError as exc:
            self._mark_broken(str(exc))
            raise
        finally:
            self._not_before = anyio.current_time() + self.gap_s

    def _mark_broken(self, reason: str) -> None:
        handle, self._handle = self._handle, None
        close_quietly(handle)
        self._next_try = time.monotonic()
        self._log.warning("relay.lost", error=reason)


# Open relay ports by configured path, so that two lanes on one board share it.
_links: dict[str, SerialLink] = {}


def _attach(relay: SerialRelay, settings: SerialRelaySettings | TextRelaySettings) -> SerialLink:
    link = _links.get(settings.port)
    if link is None:
        link = _links[settings.port] = SerialLink(settings.port, settings.baudrate)
    elif link.baudrate != settings.baudrate:
        raise DeviceError(
            f"relay port {settings.port!r} is configured with baudrate {link.baudrate}"
            f" and {settings.baudrate} by two lanes; use the same value"
        )
    # Two lanes on one board may set different timings; the strictest wins.
    link.settle_s = max(link.settle_s, settings.settle_ms / 1000)
    link.gap_s = max(link.gap_s, settings.min_gap_ms / 1000)
    link.users.append(relay)
    return link


def _detach(relay: SerialRelay, link: SerialLink) -> None:
    if relay in link.users:
        link.users.remove(relay)
    if not link.users:
        link.close()
        if _links.get(link.port) is link:
            del _links[link.port]


class SerialRelay(PulsingRelay):
    """A relay channel switched by commands on a serial port; see the module docstring."""

    def __init__(self, lane: str, settings: SerialRelaySettings | TextRelaySettings) -> None:
        if isinstance(settings, SerialRelaySettings) and settings.board is not None:
            name = f"{settings.board} channel {settings.channel} on {settings.port}"
        else:
            name = f"{settings.driver} on {settings.port}"
        super().__init__(lane, settings.driver, name, settings.pulse_ms)
        self.settings = settings
        self.on_bytes = settings.on_bytes
        self.off_bytes = settings.off_bytes
        self._link: SerialLink | None = None

    @property
    def available(self) -> bool:
        # True also for a closed port whose device is back, because only the
        # next command reopens it.
        return self._link is not None and self._link.ready()

    async def open(self) -> None:
        if self._link is None:
            self._link = _attach(self, self.settings)
        try:
            await self._link.send(self.off_bytes, is_off=True)
        except DeviceError as exc:
            # The board may be plugged in later; the next command reopens it.
            self._log.warning("relay.unavailable", error=str(exc))

    async def _switch(self, on: bool) -> None:
        link = self._link
        if link is None:
            raise DeviceClosedError(f"relay {self.name} is not open; call open() first")
        if not on:
            await link.send(self.off_bytes, is_off=True)
            return
        was_open = link.is_open
        try:
            await link.send(self.on_bytes)
        except DeviceBrokenError:
            if not was_open:
                raise
            # The first write on a port that was open failed, as when the
            # adapter was replugged while idle. ON never reached the board,
            # so one reopen (which sends OFF first) and a retry cannot open
            # the gate twice.
            await link.send(self.on_bytes)

    def _off_deadline_s(self) -> float:
        if self._link is None:
            return WRITE_TIMEOUT_S
        return self._link.worst_case_s()

    def _release(self) -> None:
        if self._link is not None:
            _detach(self, self._link)
            self._link = None
