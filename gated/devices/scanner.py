"""Read scan events from a serial scanner, across unplug, replug and a busy port.

``Scanner.run`` owns the port for the life of a lane. It reports readiness
after the first open attempt, whether or not the scanner is plugged in,
because a lane must start without its scanner. It then reads with
``anyio.wait_readable`` on the port's file descriptor, feeds the framer, and
sends each ``Code`` or ``Rejected`` to the lane. When the device goes away it
closes the port and reopens it with capped backoff, resolving the configured
path again on each try, so a ``/dev/serial/by-id/`` symlink that comes back
pointing at a new node works.

Log events:

- ``scanner.opened`` (INFO, with ``down_s``) and ``scanner.closed`` (INFO).
- ``scanner.lost`` (WARNING once per outage), ``scanner.port_busy`` (WARNING
  once per busy period), ``scanner.open_failed`` (WARNING once per kind of
  failure), and ``scanner.reconnecting`` (DEBUG, one per try).
- ``scanner.bytes`` (DEBUG, raw bytes in hex), ``scanner.code`` (DEBUG, the
  code masked) and ``scanner.rejected`` (INFO, reason and length).
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import serial

from gated.config import ScannerSettings
from gated.devices.framing import Code, Framer, ScanEvent
from gated.devices.serialport import (
    Backoff,
    close_quietly,
    device_changed,
    is_device_path,
    open_serial,
    port_fileno,
)
from gated.errors import DeviceBusyError, DeviceError
from gated.logs import get_logger, mask_code

# First delay before reopening a missing scanner, in seconds; it doubles with
# each failed try.
REOPEN_INITIAL_S = 0.05
# Cap of the reopen delay, in seconds: a scanner that is plugged back in
# reads codes again within this time.
REOPEN_CAP_S = 2.0
# A connection that lasted this long, in seconds, or delivered bytes, counts
# as a recovery: the backoff restarts from REOPEN_INITIAL_S and the next loss
# is logged at WARNING again. A device that opens and fails at once keeps
# backing off instead of looping.
STABLE_AFTER_S = 2.0
# Interval between checks that the device node still belongs to the open
# descriptor, in seconds. A stat() per second is cheap and catches an unplug
# that the driver does not report as a read error.
PRESENCE_CHECK_S = 1.0
# Max bytes taken per read; a scanner sends tens of bytes per code.
READ_CHUNK_BYTES = 4096
# Timeout of one read in the worker-thread fallback, in seconds. It bounds
# how long cancellation waits for the thread and how late idle_ms is applied.
THREAD_READ_TIMEOUT_S = 0.1


class ScannerState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    BUSY = "busy"
    CLOSED = "closed"


StateCallback = Callable[["ScannerState"], None]


class Scanner:
    """The serial scanner of one lane; see the module docstring."""

    def __init__(
        self,
        lane: str,
        settings: ScannerSettings,
        *,
        on_state_change: StateCallback | None = None,
    ) -> None:
        self.lane = lane
        self.settings = settings
        self.state = ScannerState.CONNECTING
        # Successful reopens after the first open.
        self.reconnects = 0
        self._on_state_change = on_state_change
        self._log = get_logger("scanner", lane=lane, port=settings.port)
        self._backoff = Backoff(REOPEN_INITIAL_S, REOPEN_CAP_S)
        self._down_since = 0.0
        self._opened_before = False
        # Kinds of open failure already logged at WARNING in this outage.
        self._reported: set[str] = set()

    async def run(
        self,
        send: anyio.abc.ObjectSendStream[ScanEvent],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read scan events into ``send`` until cancelled or until the receiver closes.

        Raises ConfigError when the port setting is invalid, since no retry
        can fix that. Every device failure is retried.
        The caller owns ``send`` and closes it.
        """
        self._down_since = anyio.current_time()
        started = False
        try:
            while True:
                handle = self._try_open()
                if not started:
                    task_status.started()
                    started = True
                if handle is None:
                    await self._wait_before_retry()
                    continue
                opened_at = anyio.current_time()
                try:
                    reason, got_bytes = await self._read_until_lost(handle, send)
                finally:
                    error = close_quietly(handle)
                    if error is not None:
                        self._log.debug("scanner.close_failed", error=error)
                stable = got_bytes or anyio.current_time() - opened_at >= STABLE_AFTER_S
                self._lost(reason, stable=stable)
                await self._wait_before_retry()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._log.info("scanner.receiver_closed")
        finally:
            self._set_state(ScannerState.CLOSED)
            self._log.info("scanner.closed", reconnects=self.reconnects)

    def _set_state(self, state: ScannerState) -> None:
        if state is self.state:
            return
        self.state = state
        if self._on_state_change is not None:
            self._on_state_change(state)

    # --- opening -------------------------------------------------------------

    def _try_open(self) -> Any | None:
        settings = self.settings
        try:
            handle = open_serial(
                settings.port,
                baudrate=settings.baudrate,
                bytesize=settings.bytesize,
                parity=settings.parity,
                stopbits=settings.stopbits,
                exclusive=settings.exclusive,
                timeout=0,
            )
        except DeviceBusyError as exc:
            if self.state is not ScannerState.BUSY:
                self._log.warning("scanner.port_busy", error=str(exc))
            self._set_state(ScannerState.BUSY)
            return None
        except DeviceError as exc:
            kind = type(exc).__name__
            if kind not in self._reported:
                self._reported.add(kind)
                self._log.warning("scanner.open_failed", error=str(exc))
            self._set_state(ScannerState.RECONNECTING)
            return None

        if port_fileno(handle) is None:
            handle.timeout = THREAD_READ_TIMEOUT_S
        down_s = round(anyio.current_time() - self._down_since, 3)
        if self._opened_before:
            self.reconnects += 1
        self._opened_before = True
        self._reported.clear()
        self._log.info("scanner.opened", down_s=down_s, reconnects=self.reconnects)
        self._set_state(ScannerState.CONNECTED)
        return handle

    async def _wait_before_retry(self) -> None:
        delay = self._backoff.next_delay()
        self._log.debug(
            "scanner.reconnecting",
            attempt=self._backoff.failures,
            delay_s=round(delay, 3),
            state=self.state.value,
        )
        await anyio.sleep(delay)

    def _lost(self, reason: str, *, stable: bool) -> None:
        self._down_since = anyio.current_time()
        # The loss itself is the warning for a missing device, so repeated
        # "not present" failures while it is unplugged stay at DEBUG.
        self._reported = {"DeviceBrokenError"}
        if stable:
            self._backoff.reset()
            self._log.warning("scanner.lost", error=reason)
        else:
            self._log.debug("scanner.lost", error=reason, repeat=True)
        self._set_state(ScannerState.RECONNECTING)

    # --- reading -------------------------------------------------------------

    async def _read_until_lost(
        self, handle: Any, send: anyio.abc.ObjectSendStream[ScanEvent]
    ) -> tuple[str, bool]:
        """Read until the device fails; return why, and whether any byte arrived."""
        fd = port_fileno(handle)
        if fd is None:
            return await self._read_in_thread(handle, send)
        framer = Framer(self.settings)
        port = self.settings.port
        check_presence = is_device_path(port)
        next_check = anyio.current_time() + PRESENCE_CHECK_S
        got_bytes = False
        while True:
            deadline = next_check if check_presence else math.inf
            idle_deadline = framer.deadline()
            if idle_deadline is not None:
                deadline = min(deadline, idle_deadline)
            data = b""
            with anyio.CancelScope(deadline=deadline):
                await anyio.wait_readable(fd)
                try:
                    data = os.read(fd, READ_CHUNK_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    return f"read failed: {exc.strerror or exc}", got_bytes
                if not data:
                    # A tty whose device is gone polls readable and reads
                    # empty (EOF) on Linux; a USB adapter may give EIO instead.
                    return "device reports readiness to read but returned no data", got_bytes

            now = anyio.current_time()
            if data:
                got_bytes = True
                self._log.debug("scanner.bytes", hex=data.hex(" "), count=len(data))
                await self._deliver(framer.feed(data, now), send)
            else:
                await self._deliver(framer.expire(now), send)
            if check_presence and now >= next_check:
                changed = device_changed(port, fd)
                if changed is not None:
                    return changed, got_bytes
                next_check = now + PRESENCE_CHECK_S

    async def _read_in_thread(
        self, handle: Any, send: anyio.abc.ObjectSendStream[ScanEvent]
    ) -> tuple[str, bool]:
        # NOTE: pyserial URLs without a file descriptor (loop://, rfc2217://)
        # are read from a worker thread with a short timeout, since there is
        # nothing to wait on. Each read returns within THREAD_READ_TIMEOUT_S.
        framer = Framer(self.settings)
        got_bytes = False
        while True:
            try:
                data = await anyio.to_thread.run_sync(handle.read, READ_CHUNK_BYTES)
            except (serial.SerialException, OSError) as exc:
                return f"read failed: {exc}", got_bytes
            now = anyio.current_time()
            if data:
                got_bytes = True
                self._log.debug("scanner.bytes", hex=data.hex(" "), count=len(data))
                await self._deliver(framer.feed(data, now), send)
            else:
                await self._deliver(framer.expire(now), send)

    async def _deliver(
        self, events: list[ScanEvent], send: anyio.abc.ObjectSendStream[ScanEvent]
    ) -> None:
        for event in events:
            if isinstance(event, Code):
                self._log.debug("scanner.code", code=mask_code(event.text))
            else:
                self._log.info("scanner.rejected", reason=event.reason.value, length=event.length)
            await send.send(event)
