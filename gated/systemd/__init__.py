"""Integration with the systemd service manager: readiness, status and the watchdog."""

from gated.systemd.notify import Notifier
from gated.systemd.watchdog import run_watchdog

__all__ = ["Notifier", "run_watchdog"]
