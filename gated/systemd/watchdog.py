"""The systemd watchdog ping, sent only while the event loop is responsive.

systemd kills and restarts a unit with ``WatchdogSec=`` that sends no
``WATCHDOG=1`` within that time. The ping is sent from the event loop itself,
so a loop blocked by a synchronous call sends no pings and gets restarted. A
loop that still runs but wakes timers late (a blocking call every few seconds)
would keep pinging, so each ping also requires that the sleep before it ended
on time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from gated.logs import get_logger
from gated.systemd.notify import Notifier


def _always_healthy() -> bool:
    return True


async def run_watchdog(
    notifier: Notifier,
    *,
    interval_s: float,
    max_lag_s: float,
    is_healthy: Callable[[], bool] = _always_healthy,
) -> None:
    """Send ``WATCHDOG=1`` every ``interval_s`` seconds until cancelled.

    The first ping goes out at once. Before each later ping the task measures
    how far its sleep overshot, with the monotonic clock. An overshoot above
    ``max_lag_s`` means the event loop was blocked, so that ping is skipped and
    ``watchdog.loop_lag`` is logged at WARNING. A ping is also skipped while
    ``is_healthy()`` returns False. With half of ``$WATCHDOG_USEC`` as
    ``interval_s``, the ping after a skipped one is due just as the timeout
    expires, so one skip usually gets the service restarted. A third of it
    tolerates one skip and not two.

    ``is_healthy`` runs on the event loop and must not block. An exception
    from it propagates, which ends the daemon's task group.

    Raises ValueError if ``interval_s`` or ``max_lag_s`` is not positive.
    """
    if not interval_s > 0:
        raise ValueError(f"watchdog interval_s must be positive, not {interval_s!r}")
    if not max_lag_s > 0:
        raise ValueError(f"watchdog max_lag_s must be positive, not {max_lag_s!r}")

    log = get_logger("systemd")
    log.info("watchdog.started", interval_s=interval_s, max_lag_s=max_lag_s)
    unhealthy_since: float | None = None
    lag_s = 0.0
    while True:
        if lag_s > max_lag_s:
            log.warning("watchdog.loop_lag", lag_s=round(lag_s, 3), max_lag_s=max_lag_s)
        elif not is_healthy():
            if unhealthy_since is None:
                unhealthy_since = time.monotonic()
                log.warning("watchdog.unhealthy")
            else:
                log.debug(
                    "watchdog.still_unhealthy",
                    unhealthy_for_s=round(time.monotonic() - unhealthy_since, 1),
                )
        else:
            if unhealthy_since is not None:
                log.info(
                    "watchdog.healthy",
                    unhealthy_for_s=round(time.monotonic() - unhealthy_since, 1),
                )
                unhealthy_since = None
            notifier.watchdog()

        started = time.monotonic()
        await anyio.sleep(interval_s)
        # The sleep ends late by the time the loop spent in other callbacks
        # once the deadline passed. A blocking call that ended before the
        # deadline is not seen, but the loop is responsive again by then.
        lag_s = time.monotonic() - started - interval_s
