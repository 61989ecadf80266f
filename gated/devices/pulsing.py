"""The pulse and shutdown sequence shared by every relay driver.

Every driver keeps the relay off unless a pulse is running: ``pulse``
switches it off at the end even when the pulse is cancelled or fails, and
``aclose`` switches it off before releasing the device. Each of those OFF
commands runs in a shielded scope with its own deadline, so a cancelled lane
still leaves its gate closed.
"""

from __future__ import annotations

from typing import Any

import anyio

from gated.errors import DeviceBrokenError, DeviceError
from gated.logs import get_logger


class PulsingRelay:
    """The pulse and shutdown sequence shared by every driver.

    A driver implements ``_switch(on)``, which raises DeviceError on failure,
    ``_off_deadline_s()`` and ``_release()``.
    """

    name: str

    def __init__(self, lane: str, driver: str, name: str, pulse_ms: int) -> None:
        self.name = name
        self.lane = lane
        self._pulse_s = pulse_ms / 1000
        self._log: Any = get_logger("relay", lane=lane, driver=driver, relay=name)

    @property
    def available(self) -> bool:
        return True

    async def _switch(self, on: bool) -> None:
        raise NotImplementedError

    def _off_deadline_s(self) -> float:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    async def pulse(self) -> None:
        started = anyio.current_time()
        try:
            await self._switch_logged(on=True)
            await anyio.sleep(self._pulse_s)
        except BaseException:
            # Cancelled or failed: switch off, then let the exception go on.
            await self._off_shielded()
            raise
        if not await self._off_shielded():
            raise DeviceBrokenError(
                f"relay {self.name}: the OFF command after the pulse failed; the gate may stay open"
            )
        duration_ms = round((anyio.current_time() - started) * 1000)
        self._log.debug("relay.pulse", duration_ms=duration_ms)

    async def off(self) -> None:
        await self._switch_logged(on=False)

    async def aclose(self) -> None:
        await self._off_shielded()
        self._release()

    async def _switch_logged(self, *, on: bool) -> None:
        try:
            await self._switch(on)
        except DeviceError as exc:
            self._log.error("relay.failed", action="on" if on else "off", error=str(exc))
            raise

    async def _off_shielded(self) -> bool:
        """Switch off within ``_off_deadline_s``, even inside a cancelled scope.

        Returns False, after logging ``relay.failed``, when the command failed
        or timed out.
        """
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self._off_deadline_s()
            try:
                await self._switch_logged(on=False)
            except DeviceError:
                return False
        if scope.cancelled_caught:
            self._log.error(
                "relay.failed",
                action="off",
                error=f"timed out after {self._off_deadline_s():.1f} s",
            )
            return False
        return True
