"""Gate relays: the interface lanes use, the ``log`` driver and the factory.

Every driver keeps the relay off unless a pulse is running: ``open`` switches
it off first, ``pulse`` switches it off at the end even when the pulse is
cancelled or fails, and ``aclose`` switches it off before releasing the
device. Each of those OFF commands runs in a shielded scope with its own
deadline, so a cancelled lane still leaves its gate closed.

Log events: ``relay.pulse`` (DEBUG, with ``duration_ms``), ``relay.failed``
(ERROR, with ``action`` and ``error``), and ``relay.on`` / ``relay.off``
(INFO) from the ``log`` driver.
"""

from __future__ import annotations

from typing import Any, Protocol, assert_never

import anyio
import anyio.lowlevel

from gated.config import (
    GpioRelaySettings,
    LogRelaySettings,
    RelaySettings,
    SerialRelaySettings,
    TextRelaySettings,
)
from gated.devices.gpiorelay import GpioRelay
from gated.devices.pulsing import PulsingRelay
from gated.devices.serialrelay import SerialRelay


class Relay(Protocol):
    """A gate relay. Methods other than ``aclose`` raise DeviceError when the device fails."""

    name: str

    @property
    def available(self) -> bool:
        """False while the device is missing, or failed and waiting out its backoff.

        A serial relay whose port was closed after a failure is reopened by
        the next ``pulse`` or ``off``, and reads as available as soon as that
        reopen would be tried, so a caller may skip pulses while this is False.
        """
        ...

    async def open(self) -> None:
        """Open the device and switch the relay off.

        Raises DeviceError only when the device can never work as configured
        (for example a missing GPIO binding). A serial device that is not
        plugged in is not an error here: the relay stays unavailable.
        """
        ...

    async def pulse(self) -> None:
        """Switch the relay on for ``pulse_ms``, then off, even when cancelled."""
        ...

    async def off(self) -> None:
        """Switch the relay off."""
        ...

    async def aclose(self) -> None:
        """Switch the relay off with a bounded wait, then release the device.

        Raises no DeviceError: a failed OFF is logged as ``relay.failed``.
        """
        ...


# Deadline of the OFF sent by the log driver, in seconds; it only logs.
_LOG_OFF_DEADLINE_S = 1.0


class LogRelay(PulsingRelay):
    """A relay that only logs, for bench setups and dry runs."""

    def __init__(self, lane: str, settings: LogRelaySettings) -> None:
        super().__init__(lane, "log", "log", settings.pulse_ms)

    async def open(self) -> None:
        await self.off()

    async def _switch(self, on: bool) -> None:
        await anyio.lowlevel.checkpoint()
        self._log.info("relay.on" if on else "relay.off")

    def _off_deadline_s(self) -> float:
        return _LOG_OFF_DEADLINE_S

    def _release(self) -> None:
        return None


def make_relay(lane: str, settings: RelaySettings, *, gpiod_module: Any = None) -> Relay:
    """Return the relay driver for a lane's ``[lanes.relay]`` settings.

    ``gpiod_module`` replaces the ``gpiod`` binding of the gpio driver in tests.
    """
    if isinstance(settings, LogRelaySettings):
        return LogRelay(lane, settings)
    if isinstance(settings, SerialRelaySettings | TextRelaySettings):
        return SerialRelay(lane, settings)
    if isinstance(settings, GpioRelaySettings):
        return GpioRelay(lane, settings, binding=gpiod_module)
    assert_never(settings)
