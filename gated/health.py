"""The daemon's view of the API link: online or offline, and since when.

Only transitions are logged, once each, with how long the previous state
lasted: a gate offline for an hour logs two lines, not 720.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from gated.logs import get_logger

log = get_logger("api")


class ApiHealth:
    def __init__(self, on_failure: Callable[[str], None] | None = None) -> None:
        # Called with "auth" or "unavailable" for every failed request (metrics).
        self._on_failure = on_failure
        # None until the first request ends, so that start-up is not logged as a recovery.
        self.online: bool | None = None
        self.since_mono = time.monotonic()
        self.since_wall = datetime.now(UTC)
        self.last_error: str | None = None
        self.failures = 0
        self.auth_failed = False
        # True while the listing returns 404, which means the location id is unknown.
        self.location_missing = False

    def record_success(self) -> None:
        self.auth_failed = False
        self.location_missing = False
        if self.online is True:
            return
        previous = self.online
        lasted = self._switch(online=True)
        self.last_error = None
        if previous is None:
            log.info("api.online")
        else:
            log.info("api.online", offline_for_s=round(lasted, 1), failures=self.failures)
        self.failures = 0

    def record_failure(self, error: str, *, auth: bool = False) -> None:
        if self._on_failure is not None:
            self._on_failure("auth" if auth else "unavailable")
        self.failures += 1
        self.last_error = error
        self.auth_failed = auth
        if self.online is False:
            log.debug("api.still_offline", error=error, failures=self.failures)
            return
        previous = self.online
        lasted = self._switch(online=False)
        if previous is None:
            log.warning("api.offline", error=error)
        else:
            log.warning("api.offline", error=error, online_for_s=round(lasted, 1))

    def _switch(self, *, online: bool) -> float:
        now = time.monotonic()
        lasted = now - self.since_mono
        self.online = online
        self.since_mono = now
        self.since_wall = datetime.now(UTC)
        return lasted
