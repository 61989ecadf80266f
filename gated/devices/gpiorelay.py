"""The ``gpio`` relay driver: a relay HAT or board on a GPIO line, through libgpiod.

It uses the v2 API of the libgpiod Python binding (``gpiod.request_lines``
with ``LineSettings``), which is imported only when a gpio relay is opened.
A missing binding, a v1 binding, a missing chip or an unknown line raises
DeviceError at ``open``, so a misconfigured gate fails at start and not at
the first car. The line is requested as an output that starts inactive.
``active_low`` is passed to the kernel, so ``Value.ACTIVE`` always means
"relay on" whatever the wiring.
"""

from __future__ import annotations

import errno
import importlib
from typing import Any

from gated.config import GpioRelaySettings
from gated.devices.pulsing import PulsingRelay
from gated.errors import DeviceBrokenError, DeviceBusyError, DeviceClosedError, DeviceError

# Deadline of the OFF command, in seconds. Setting a line is one ioctl that
# returns in microseconds; the deadline only bounds a hung driver.
OFF_DEADLINE_S = 1.0
INSTALL_HINT = (
    "install gpiod >= 2 into gated's virtual environment (`/opt/gated/bin/pip install 'gpiod>=2'`)"
)


def import_gpiod() -> Any:
    """Import the libgpiod binding, or raise DeviceError naming the package to install."""
    try:
        return importlib.import_module("gpiod")
    except ImportError as exc:
        raise DeviceError(
            f"the gpio relay needs the libgpiod Python binding: {INSTALL_HINT}"
        ) from exc


class GpioRelay(PulsingRelay):
    """A relay on one GPIO line; see the module docstring."""

    def __init__(self, lane: str, settings: GpioRelaySettings, *, binding: Any = None) -> None:
        name = f"gpio {settings.chip} line {settings.line}"
        super().__init__(lane, "gpio", name, settings.pulse_ms)
        self.settings = settings
        # A line given as digits in quotes ("17") is an offset, not a name.
        line = settings.line
        self._line: int | str = int(line) if isinstance(line, str) and line.isdigit() else line
        self._binding = binding
        self._values: Any = None
        self._request: Any = None

    @property
    def available(self) -> bool:
        return self._request is not None

    async def open(self) -> None:
        module = self._binding if self._binding is not None else import_gpiod()
        if not callable(getattr(module, "request_lines", None)):
            raise DeviceError(
                "the installed gpiod binding is the old v1 API without request_lines;"
                f" {INSTALL_HINT}"
            )
        line_api = module.line
        self._values = line_api.Value
        line_settings = module.LineSettings(
            direction=line_api.Direction.OUTPUT,
            output_value=line_api.Value.INACTIVE,
            active_low=self.settings.active_low,
        )
        chip = self.settings.chip
        try:
            self._request = module.request_lines(
                chip, consumer=f"gated-{self.lane}", config={self._line: line_settings}
            )
        except FileNotFoundError as exc:
            raise DeviceError(
                f"GPIO chip {chip!r} not found; list the chips with `gpiodetect`"
            ) from exc
        except PermissionError as exc:
            raise DeviceError(
                f"no permission to open GPIO chip {chip!r}; add the gated user to the gpio group"
            ) from exc
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceBusyError(
                    f"GPIO line {self._line!r} on {chip!r} is used by another program;"
                    " see `gpioinfo`"
                ) from exc
            raise DeviceError(f"GPIO chip {chip!r} cannot be opened: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise DeviceError(f"GPIO line {self._line!r} not found on {chip!r}: {exc}") from exc
        await self.off()

    async def _switch(self, on: bool) -> None:
        if self._request is None:
            raise DeviceClosedError(f"relay {self.name} is not open; call open() first")
        value = self._values.ACTIVE if on else self._values.INACTIVE
        try:
            self._request.set_value(self._line, value)
        except (OSError, ValueError) as exc:
            raise DeviceBrokenError(f"setting GPIO line {self._line!r} failed: {exc}") from exc

    def _off_deadline_s(self) -> float:
        return OFF_DEADLINE_S

    def _release(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            try:
                request.release()
            except (OSError, ValueError) as exc:
                self._log.debug("relay.release_failed", error=str(exc))
