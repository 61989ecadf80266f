"""Serial port helpers shared by the scanner and the serial relay drivers.

pyserial and OS errors are translated here into gated's device errors:
``DeviceBusyError`` for a port locked by another process,
``DeviceBrokenError`` for a device that is missing or failed, ``DeviceError``
for anything else (no permission, not a serial port). An invalid port URL or
setting is a ``ConfigError``, because retrying cannot fix it.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from typing import Any

import anyio
import serial

from gated.errors import (
    ConfigError,
    DeviceBrokenError,
    DeviceBusyError,
    DeviceClosedError,
    DeviceError,
)

# errno values that mean the device node is gone or the device stopped
# responding: unplugged, re-enumerated, or a USB adapter that reset.
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EIO, errno.EPIPE})
# errno values of a port that another process holds: flock() without wait
# fails with EAGAIN (EWOULDBLOCK on some platforms), and some drivers return
# EBUSY from open().
_BUSY_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


def is_device_path(port: str) -> bool:
    """Return True for a filesystem path, False for a pyserial URL such as ``loop://``."""
    return "://" not in port


def open_serial(
    port: str,
    *,
    baudrate: int,
    bytesize: int = 8,
    parity: str = "N",
    stopbits: int = 1,
    exclusive: bool = True,
    timeout: float | None = 0,
) -> Any:
    """Open a port with pyserial in non-blocking mode and return the pyserial object.

    ``port`` is a device path (a ``/dev/serial/by-id/`` symlink is resolved
    on every call) or a pyserial URL. Raises DeviceBusyError,
    DeviceBrokenError, DeviceError or ConfigError, as described in the module
    docstring.
    """
    try:
        handle = serial.serial_for_url(port, do_not_open=True)
        handle.baudrate = baudrate
        handle.bytesize = bytesize
        handle.parity = parity
        handle.stopbits = stopbits
        handle.timeout = timeout
        handle.exclusive = exclusive
    except ValueError as exc:
        raise ConfigError([f"port {port!r}: {exc}"]) from exc
    except serial.SerialException as exc:
        raise _translate(port, exc) from exc
    try:
        handle.open()
    except ValueError as exc:
        raise ConfigError([f"port {port!r}: {exc}"]) from exc
    except (serial.SerialException, OSError) as exc:
        raise _translate(port, exc) from exc
    return handle


def _translate(port: str, exc: OSError) -> DeviceError:
    code = exc.errno
    if code in _BUSY_ERRNOS or "exclusively lock" in str(exc):
        return DeviceBusyError(
            f"port {port!r} is held by another process; stop it (see `fuser {port}`)"
        )
    if code in _MISSING_ERRNOS:
        return DeviceBrokenError(f"port {port!r} is not present: {exc.strerror or exc}")
    if code in _DENIED_ERRNOS:
        return DeviceError(
            f"no permission to open port {port!r}; add the gated user to the"
            " group that owns the device (usually dialout)"
        )
    return DeviceError(f"port {port!r} cannot be opened: {exc}")


def close_quietly(handle: Any) -> str | None:
    """Close a pyserial port; return the error text if closing failed, else None.

    A port whose device is gone can fail on close, and nothing is left to do
    about it then.
    """
    try:
        handle.close()
    except (OSError, serial.SerialException) as exc:
        return str(exc)
    return None


def port_fileno(handle: Any) -> int | None:
    """Return the file descriptor of an open port, or None for a URL without one."""
    fileno = getattr(handle, "fileno", None)
    if fileno is None:
        return None
    try:
        fd = fileno()
    except (OSError, serial.SerialException, AttributeError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def device_changed(port: str, fd: int) -> str | None:
    """Return why the open ``fd`` is no longer the device at ``port``, or None.

    The node disappears when a USB device is unplugged, and a by-id symlink
    points to a new node when it comes back. Either way the open descriptor
    is stale. Only character devices are compared.
    """
    try:
        current = os.stat(port)
    except FileNotFoundError:
        return "device node disappeared"
    except OSError as exc:
        return f"device node cannot be checked: {exc.strerror}"
    try:
        opened = os.fstat(fd)
    except OSError as exc:
        return f"open device cannot be checked: {exc.strerror}"
    if stat.S_ISCHR(current.st_mode) and current.st_rdev != opened.st_rdev:
        return "device node now belongs to another device"
    return None


async def write_all(handle: Any, data: bytes, *, timeout_s: float) -> None:
    """Write every byte of ``data`` within ``timeout_s`` seconds, without blocking the loop.

    Raises DeviceBrokenError when the device fails or the write times out,
    and DeviceClosedError when the port was already closed.
    """
    if not getattr(handle, "is_open", False):
        raise DeviceClosedError("the port was closed by gated")
    fd = port_fileno(handle)
    if fd is None:
        await _write_in_thread(handle, data, timeout_s)
        return
    view = memoryview(data)
    try:
        with anyio.fail_after(timeout_s):
            while view:
                try:
                    written = os.write(fd, view)
                except BlockingIOError:
                    await anyio.wait_writable(fd)
                    continue
                view = view[written:]
    except TimeoutError as exc:
        raise DeviceBrokenError(
            f"write timed out after {timeout_s} s with {len(view)} of {len(data)} bytes unsent"
        ) from exc
    except OSError as exc:
        raise DeviceBrokenError(f"write failed: {exc.strerror or exc}") from exc


async def _write_in_thread(handle: Any, data: bytes, timeout_s: float) -> None:
    # NOTE: ports without a file descriptor (pyserial URLs such as loop://)
    # are written from a worker thread, bounded by pyserial's write_timeout.
    handle.write_timeout = timeout_s
    try:
        await anyio.to_thread.run_sync(handle.write, data)
    except (serial.SerialException, OSError) as exc:
        raise DeviceBrokenError(f"write failed: {exc}") from exc


class Backoff:
    """Capped exponential backoff with jitter for reopening a device.

    Each delay is drawn from [d/2, d], where d doubles from ``initial_s`` up
    to ``cap_s``, so no delay exceeds ``cap_s`` and retries from several
    processes do not line up.
    """

    def __init__(self, initial_s: float, cap_s: float) -> None:
        self._initial_s = initial_s
        self._cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        """Count a failure and return the delay in seconds before the next try."""
        base = min(self._cap_s, self._initial_s * 2.0 ** min(self.failures, 32))
        self.failures += 1
        # Jitter spreads retries out; it is not used for anything secret.
        return random.uniform(base / 2, base)  # noqa: S311

    def reset(self) -> None:
        self.failures = 0
