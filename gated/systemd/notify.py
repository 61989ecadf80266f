"""Client of the systemd service notification protocol (``sd_notify``), without libsystemd.

The protocol: systemd passes the path of an ``AF_UNIX`` datagram socket in
``$NOTIFY_SOCKET``; the service sends newline-separated ``KEY=VALUE`` fields,
one message per datagram. A path starting with ``@`` names a socket in the
abstract namespace, where the ``@`` stands for a leading NUL byte. The fields
gated sends are ``READY=1``, ``STOPPING=1``, ``WATCHDOG=1`` and ``STATUS=``
(see the sd_notify(3) man page for the full list).

Without ``$NOTIFY_SOCKET`` (the daemon was started by hand or by a test), every
call is a no-op that returns False, so callers never need to check.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping

from gated.logs import get_logger

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

# `systemctl status` shows STATUS= on one line; longer text is cut to this many
# characters so a status built from an error message cannot flood the unit state.
MAX_STATUS_CHARS = 200

# sun_path in <sys/un.h> has 108 bytes on Linux: a path needs one of them for
# its trailing NUL, an abstract name (leading NUL included) may use all of them.
_SUN_PATH_BYTES = 108


class Notifier:
    """Sender of service state notifications to the systemd service manager.

    ``socket_path`` defaults to ``$NOTIFY_SOCKET``. An empty, missing or
    invalid path disables the notifier: ``enabled`` is False and every send
    returns False. A failed send returns False instead of raising, and never
    blocks the caller, because the socket is non-blocking. The first failure is
    logged at WARNING and repeats at DEBUG until a send succeeds again.
    """

    def __init__(
        self, socket_path: str | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        # The logger is bound here, not at import, so that it follows the
        # logging configuration the daemon sets up after importing this module.
        self._log = get_logger("systemd")
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        if socket_path is None:
            socket_path = self._environ.get(NOTIFY_SOCKET_ENV, "")
        self.socket_path = socket_path
        self._address = self._parse_address(socket_path) if socket_path else None
        self.enabled: bool = self._address is not None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failures = 0

    # --- Fields ---------------------------------------------------------------

    def ready(self) -> bool:
        """Tell systemd that start-up finished; a ``Type=notify`` unit becomes active."""
        return self.send("READY=1")

    def stopping(self) -> bool:
        """Tell systemd that an orderly shutdown began."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """Reset the service watchdog timer (``WatchdogSec=``)."""
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``.

        Line breaks become spaces and text longer than ``MAX_STATUS_CHARS`` is cut.
        """
        line = " ".join(text.split())
        if len(line) > MAX_STATUS_CHARS:
            line = line[: MAX_STATUS_CHARS - 3] + "..."
        return self.send(f"STATUS={line}")

    def watchdog_interval_s(self) -> float | None:
        """Return the watchdog timeout systemd set for this process, in seconds.

        Returns None when the notifier is disabled, when ``$WATCHDOG_USEC`` is
        unset or invalid, or when ``$WATCHDOG_PID`` is set to another process
        (the variables were inherited from a parent and do not apply here).
        The caller pings at half this interval or more often.
        """
        if not self.enabled:
            return None
        usec_text = self._environ.get(WATCHDOG_USEC_ENV, "")
        if not usec_text:
            return None
        pid_text = self._environ.get(WATCHDOG_PID_ENV, "")
        if pid_text:
            if not _is_decimal(pid_text):
                self._log.warning("notify.invalid_watchdog_pid", value=pid_text)
                return None
            if int(pid_text) != os.getpid():
                self._log.debug("notify.watchdog_for_other_pid", watchdog_pid=int(pid_text))
                return None
        if not _is_decimal(usec_text) or int(usec_text) == 0:
            self._log.warning("notify.invalid_watchdog_usec", value=usec_text)
            return None
        return int(usec_text) / 1_000_000

    # --- Transport --------------------------------------------------------------

    def send(self, *fields: str) -> bool:
        """Send the fields as one datagram, joined by newlines; return whether it was sent.

        Each field is ``KEY=VALUE`` without a line break. A malformed field
        sends nothing, because a stray newline would let one value inject
        another assignment.
        """
        if self._address is None:
            return False
        for field in fields:
            key, sep, _ = field.partition("=")
            if not sep or not key or "\n" in field:
                self._log.warning("notify.invalid_field", field=field[:40])
                return False
        if not fields:
            return False
        # "replace" turns lone surrogates (from undecodable bytes) into "?".
        message = "\n".join(fields).encode("utf-8", errors="replace")

        with self._lock:
            try:
                sock = self._get_socket()
                # MSG_DONTWAIT: a stalled service manager cannot stall the event
                # loop. MSG_NOSIGNAL: no SIGPIPE, whatever the signal setup.
                sock.sendto(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self._address)
            except OSError as exc:
                self._record_failure(exc, fields)
                return False
            if self._failures:
                self._log.info("notify.recovered", failures=self._failures, socket=self.socket_path)
                self._failures = 0
        return True

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _parse_address(self, path: str) -> str | bytes | None:
        """Return the ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None if invalid."""
        if path.startswith("@"):
            # An abstract socket: its name is the bytes after a leading NUL.
            address: str | bytes = b"\0" + path[1:].encode("utf-8")
            max_size = _SUN_PATH_BYTES
            size = len(address)
        elif path.startswith("/"):
            address = path
            max_size = _SUN_PATH_BYTES - 1
            size = len(os.fsencode(path))
        else:
            # NOTE: systemd 254 and later may pass "vsock:CID:PORT" to a guest VM;
            # gated runs on the host, so those addresses are rejected here.
            self._log.warning(
                "notify.invalid_socket", socket=path, reason="not an absolute path or @name"
            )
            return None
        if size < 2 or size > max_size:
            self._log.warning("notify.invalid_socket", socket=path, reason="empty or too long")
            return None
        return address

    def _get_socket(self) -> socket.socket:
        if self._socket is None:
            # Python creates sockets with SOCK_CLOEXEC (PEP 446), so child
            # processes do not inherit it.
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        return self._socket

    def _record_failure(self, exc: OSError, fields: tuple[str, ...]) -> None:
        self._failures += 1
        event = {
            "socket": self.socket_path,
            "fields": [field.partition("=")[0] for field in fields],
            "error": exc,
            "failures": self._failures,
        }
        if self._failures == 1:
            self._log.warning("notify.send_failed", **event)
        else:
            self._log.debug("notify.send_failed", **event)


def _is_decimal(text: str) -> bool:
    # str.isdigit() alone accepts characters such as "²" that int() rejects.
    return text.isascii() and text.isdigit()
