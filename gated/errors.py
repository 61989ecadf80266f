"""The exception families of gated.

Errors from pyserial, httpx, sqlite3 and the OS are caught only in the module
that talks to them and re-raised as one of these, chained with ``from exc``.
Cancellation is never wrapped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gated.api.models import Session


class GatedError(Exception):
    """Root of every error gated raises on purpose."""


class ConfigError(GatedError):
    """The configuration is invalid; ``problems`` has one line per invalid key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


# --- API -------------------------------------------------------------------


class ApiError(GatedError):
    """The Coord API request failed. Messages never contain the request URL."""


class ApiAuthError(ApiError):
    """401 or 403: the access key is missing, wrong or lacks rights. Not retried."""


class ApiNotFoundError(ApiError):
    """404: the location or the session is unknown. Not retried."""


class ApiRejectedError(ApiError):
    """Another 4xx (400, 422, ...): the API will never accept this request."""

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


class ApiConflictError(ApiError):
    """409: the session is already in or past the requested state.

    ``session`` is the current session from the response body, or None when the
    body could not be parsed.
    """

    def __init__(self, message: str, session: Session | None) -> None:
        self.session = session
        super().__init__(message)


class ApiRateLimitedError(ApiError):
    """429: wait at least ``retry_after_s`` seconds before the next request."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class ApiUnavailableError(ApiError):
    """5xx, a timeout or a dropped connection: the service is unwell. Retried."""


class ApiInvalidResponseError(ApiError):
    """The API returned a body gated cannot parse (bad JSON, wrong shape or type)."""


# --- Devices ---------------------------------------------------------------


class DeviceError(GatedError):
    """A serial or GPIO device failed."""


class DeviceBusyError(DeviceError):
    """The port is held by another process (it was opened exclusively)."""


class DeviceBrokenError(DeviceError):
    """The device went away or failed under us: unplugged, EIO, hangup."""


class DeviceClosedError(DeviceError):
    """The device was closed by gated itself; reading or writing it is a bug."""


# --- Local state -------------------------------------------------------------


class StateError(GatedError):
    """The local SQLite state could not be read or written."""
