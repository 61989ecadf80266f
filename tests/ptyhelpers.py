"""Pseudo-terminals that stand in for USB serial devices in tests.

``PtyDevice`` makes a pty pair. The code under test opens ``device.path``, the
slave side, as it would open ``/dev/ttyUSB0``, and the test plays the device
on the master side with ``write``, ``read`` and ``read_exactly``. With
``link=`` the device is reached through a symlink, as through
``/dev/serial/by-id/``. ``unplug`` closes the master and removes the symlink,
and ``replug`` makes a new pty behind the same symlink.

Facts about Linux ptys that the tests rely on, each checked in test_scanner.py:

- After the master is closed, the slave node disappears.
- Then a read on an open slave descriptor returns EOF or fails with EIO, and a
  write fails with EIO.
- pyserial flushes the input queue when it opens a port, so bytes written to
  the master before the port is opened are lost.
"""

from __future__ import annotations

import contextlib
import os
import tty
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

# Deadline of one read on the master in tests, in seconds: long enough for a
# loaded 2-core CI machine, short enough that a missing byte fails fast.
READ_TIMEOUT_S = 5.0


class PtyDevice:
    """A pty pair that plays a serial device; see the module docstring."""

    def __init__(self, link: Path | None = None) -> None:
        self.link = link
        self.master = -1
        self._slave = -1
        self.slave_path = ""
        self._open_pair()

    def _open_pair(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        self.master, self._slave = master, slave
        self.slave_path = os.ttyname(slave)
        # The helper keeps its own slave descriptor open, as a real device
        # exists whether or not gated has it open. It never reads from it.
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
            self.link.symlink_to(self.slave_path)

    @property
    def path(self) -> str:
        """Path that the code under test opens: the symlink if there is one."""
        return str(self.link) if self.link is not None else self.slave_path

    @property
    def plugged(self) -> bool:
        return self.master >= 0

    def write(self, data: bytes) -> None:
        """Send bytes from the device to the port, as a scanner would."""
        view = memoryview(data)
        while view:
            written = os.write(self.master, view)
            view = view[written:]

    async def read(self, timeout_s: float = READ_TIMEOUT_S) -> bytes:
        """Return the bytes the port sent to the device, waiting for at least one."""
        with anyio.fail_after(timeout_s):
            await anyio.wait_readable(self.master)
            return os.read(self.master, 4096)

    async def read_exactly(self, count: int, timeout_s: float = READ_TIMEOUT_S) -> bytes:
        """Return exactly ``count`` bytes sent by the port, or raise TimeoutError."""
        received = bytearray()
        with anyio.fail_after(timeout_s):
            while len(received) < count:
                await anyio.wait_readable(self.master)
                received += os.read(self.master, count - len(received))
        return bytes(received)

    async def read_timed(
        self, count: int, timeout_s: float = READ_TIMEOUT_S
    ) -> list[tuple[float, bytes]]:
        """Return ``count`` bytes as (arrival time, chunk) pairs, time from anyio's clock."""
        chunks: list[tuple[float, bytes]] = []
        total = 0
        with anyio.fail_after(timeout_s):
            while total < count:
                await anyio.wait_readable(self.master)
                chunk = os.read(self.master, count - total)
                chunks.append((anyio.current_time(), chunk))
                total += len(chunk)
        return chunks

    def pending(self) -> bytes:
        """Return whatever the port sent that has not been read yet, without waiting."""
        os.set_blocking(self.master, False)
        try:
            return os.read(self.master, 4096)
        except BlockingIOError:
            return b""
        finally:
            os.set_blocking(self.master, True)

    def unplug(self) -> None:
        """Close the pty and remove the symlink, as when a USB device is pulled out."""
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
        for fd in (self.master, self._slave):
            if fd >= 0:
                os.close(fd)
        self.master = self._slave = -1

    def replug(self) -> None:
        """Make a new pty behind the same symlink, as when the device comes back."""
        if self.plugged:
            self.unplug()
        self._open_pair()

    def close(self) -> None:
        self.unplug()

    def __enter__(self) -> PtyDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def pty_device() -> Iterator[PtyDevice]:
    """A pty device without a symlink."""
    with PtyDevice() as device:
        yield device


@pytest.fixture
def linked_pty_device(tmp_path: Path) -> Iterator[PtyDevice]:
    """A pty device reached through a symlink, like ``/dev/serial/by-id/...``."""
    with PtyDevice(link=tmp_path / "usb-Scanner_1234-if00") as device:
        yield device
