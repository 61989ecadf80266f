"""The daemon's control socket: live state for ``gated status``.

A UNIX stream socket at ``<runtime directory>/control.sock``, never a TCP
port, so file permissions govern access. The socket has mode 0660 in a
directory of mode 0750, so a technician must be root or in the daemon's group
to connect.

Protocol, one JSON object per line, UTF-8:

- The client sends one request line: ``{"command": "snapshot"}`` or
  ``{"command": "follow"}``.
- ``snapshot``: the server sends one line, ``DaemonState.snapshot()``, and
  closes the connection.
- ``follow``: the server sends ``{"following": true}`` once it is
  subscribed, then one line per gate decision (``DecisionRecord.to_json()``,
  code masked) until the client disconnects or the daemon stops. A client
  that falls more than ``SUBSCRIBER_BUFFER`` decisions behind gets
  ``{"error": ...}`` and is disconnected.
- Anything else gets ``{"error": "<reason>"}`` and the connection is closed.

A client that fails in any way is disconnected and logged at DEBUG (or at
WARNING for an unexpected error); it never affects the lanes.

Log events:

- ``control.listening`` and ``control.stopped`` (INFO).
- ``control.unavailable`` (ERROR): the socket could not be created. The gates
  keep working without it.
- ``control.request``, ``control.client_rejected`` and
  ``control.client_dropped`` (DEBUG).
- ``control.client_failed`` (WARNING, with the traceback): a bug in serving
  one client.
- ``control.accept_failed``: WARNING at the first failure in a row, then DEBUG.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
from anyio.abc import ByteStream, SocketListener, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from gated.config import GatedConfig
from gated.logs import get_logger

if TYPE_CHECKING:
    from gated.daemon import DaemonState

log = get_logger("control")

SOCKET_NAME: Final = "control.sock"
# Members of the daemon's group may connect; others may not.
SOCKET_MODE: Final = 0o660
# The same mode systemd gives the runtime directory (RuntimeDirectoryMode=0750).
DIRECTORY_MODE: Final = 0o750
# A client has this long to send its request line, in seconds. A person
# never types the request; `gated status` sends it right after connecting.
REQUEST_TIMEOUT_S: Final = 2.0
# Deadline for writing one reply line to a client, in seconds. A client that
# does not read for this long is disconnected instead of holding the slot.
SEND_TIMEOUT_S: Final = 5.0
# Maximum length of a request line, in bytes; a valid one is about 25 bytes.
MAX_REQUEST_BYTES: Final = 1024
# Clients served at once, snapshot and follow together. Each follower has its
# own subscription buffer, and a handful of technicians is plenty for one gate.
MAX_CLIENTS: Final = 8
# Pause after accept() failed (for example EMFILE: no file descriptors left),
# in seconds, so that a persistent failure does not spin the event loop.
ACCEPT_RETRY_S: Final = 0.5

COMMANDS: Final = ("snapshot", "follow")
TOO_LONG: Final = f"request line longer than {MAX_REQUEST_BYTES} bytes"
FOLLOW_ENDED: Final = "stream ended: the daemon is stopping, or this client fell behind"


class RequestError(Exception):
    """A client's request is invalid; the message is sent back to it."""


def control_socket_path(config: GatedConfig) -> Path:
    """Return the path of the control socket for this config."""
    return config.runtime.directory / SOCKET_NAME


def encode_line(data: Any) -> bytes:
    """Encode one protocol message as a JSON line."""
    return json.dumps(data, separators=(",", ":")).encode("utf-8") + b"\n"


def parse_request(line: bytes) -> str:
    """Return the command of a request line, or raise RequestError saying what is wrong."""
    # receive_until returns a line longer than its limit when the whole line
    # arrived in one chunk, so the limit is checked here too.
    if len(line) > MAX_REQUEST_BYTES:
        raise RequestError(TOO_LONG)
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(
            'invalid request: send one JSON line such as {"command": "snapshot"}'
        ) from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise RequestError('invalid request: expected a JSON object with a "command" string')
    command: str = request["command"]
    if command not in COMMANDS:
        raise RequestError(f"unknown command {command[:40]!r}: use {' or '.join(COMMANDS)}")
    return command


async def serve_control(
    state: DaemonState,
    path: Path,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled.

    Reports readiness once the socket accepts connections. When the socket
    cannot be created, it logs ``control.unavailable`` at ERROR, reports
    readiness anyway and returns, because the gates work without it.
    """
    try:
        listener, socket_stat = await _listen(path)
    except OSError as exc:
        # An OS error with a known cause: its traceback would add nothing.
        log.error("control.unavailable", path=str(path), error=str(exc))
        task_status.started()
        return
    log.info("control.listening", path=str(path), max_clients=MAX_CLIENTS)
    server = _ControlServer(state)
    try:
        async with listener, anyio.create_task_group() as tg:
            task_status.started()
            await server.accept_forever(listener, tg)
    finally:
        _remove_own_socket(path, socket_stat)
        log.info("control.stopped", path=str(path))


async def _listen(path: Path) -> tuple[SocketListener, os.stat_result]:
    """Create the listening socket at ``path``; return it and the socket file's stat.

    A stale socket left by a crash is replaced. The socket is bound under a
    temporary name, given SOCKET_MODE, then renamed into place, so no client
    can connect while its mode is still the one the umask gave it. Raises
    OSError; a non-socket file at ``path`` is reported as FileExistsError and
    left alone.
    """
    directory = path.parent
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        pass
    else:
        # mkdir applies the umask (the unit file sets 0077), so the mode is set
        # explicitly to let the group in.
        os.chmod(directory, DIRECTORY_MODE)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(
                f"{path} exists and is not a socket; remove it or set [runtime] directory"
            )
    # NOTE: the temporary name is at most as long as SOCKET_NAME (pids have at
    # most 7 digits on Linux), so it fits in sun_path whenever the path does.
    temporary = directory / f".tmp{os.getpid()}"
    listener = await anyio.create_unix_listener(temporary, mode=SOCKET_MODE)
    try:
        # rename() replaces a stale socket atomically.
        os.rename(temporary, path)
        return listener, os.lstat(path)
    except BaseException:
        await listener.aclose()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _remove_own_socket(path: Path, own: os.stat_result) -> None:
    """Remove the socket file unless another process has replaced it since."""
    try:
        current = os.lstat(path)
        if (current.st_dev, current.st_ino) == (own.st_dev, own.st_ino):
            os.unlink(path)
    except OSError as exc:
        log.debug("control.cleanup_failed", path=str(path), error=str(exc))


class _ControlServer:
    def __init__(self, state: DaemonState) -> None:
        self._state = state
        self._clients = 0
        self._accept_failures = 0

    async def accept_forever(self, listener: SocketListener, tg: TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                self._accept_failures += 1
                level = log.warning if self._accept_failures == 1 else log.debug
                level("control.accept_failed", error=str(exc), failures=self._accept_failures)
                await anyio.sleep(ACCEPT_RETRY_S)
                continue
            self._accept_failures = 0
            if self._clients >= MAX_CLIENTS:
                log.debug("control.client_rejected", clients=self._clients)
                tg.start_soon(self._reject, stream)
                continue
            self._clients += 1
            tg.start_soon(self._serve_client, stream)

    async def _reject(self, stream: ByteStream) -> None:
        async with stream:
            with contextlib.suppress(*_CLIENT_ERRORS):
                await _send(
                    stream, {"error": f"too many clients (at most {MAX_CLIENTS}); retry later"}
                )

    async def _serve_client(self, stream: ByteStream) -> None:
        try:
            async with stream:
                await self._handle(stream)
        except _CLIENT_ERRORS as exc:
            log.debug("control.client_dropped", error=f"{type(exc).__name__}: {exc}")
        except Exception:
            # A bug in serving one client must not stop the lanes that share
            # this task group; the traceback is logged for the bug report.
            log.warning("control.client_failed", exc_info=True)
        finally:
            self._clients -= 1

    async def _handle(self, stream: ByteStream) -> None:
        buffered = BufferedByteReceiveStream(stream)
        try:
            with anyio.fail_after(REQUEST_TIMEOUT_S):
                line = await buffered.receive_until(b"\n", MAX_REQUEST_BYTES)
            command = parse_request(line)
        except anyio.DelimiterNotFound:
            await _send(stream, {"error": TOO_LONG})
            return
        except RequestError as exc:
            log.debug("control.request", command=None, error=str(exc))
            await _send(stream, {"error": str(exc)})
            return
        log.debug("control.request", command=command)
        if command == "snapshot":
            await _send(stream, self._state.snapshot())
            return
        await self._follow(stream, buffered)

    async def _follow(self, stream: ByteStream, buffered: BufferedByteReceiveStream) -> None:
        decisions = self._state.observer.subscribe()
        async with decisions, anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, buffered, tg.cancel_scope)
            # Client errors are handled here, inside the task group, because
            # a task group may wrap what escapes it in an ExceptionGroup.
            try:
                await _send(stream, {"following": True})
                async for record in decisions:
                    await _send(stream, record.to_json())
                # The observer ends a subscription when the daemon stops or
                # when this client fell too far behind.
                await _send(stream, {"error": FOLLOW_ENDED})
            except _CLIENT_ERRORS as exc:
                log.debug("control.client_dropped", error=f"{type(exc).__name__}: {exc}")
            tg.cancel_scope.cancel()


# Errors that mean "this client went away or misbehaved": it is dropped.
_CLIENT_ERRORS: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    TimeoutError,
    OSError,
)


async def _send(stream: ByteStream, data: Any) -> None:
    with anyio.fail_after(SEND_TIMEOUT_S):
        await stream.send(encode_line(data))


async def _cancel_on_disconnect(
    buffered: BufferedByteReceiveStream, scope: anyio.CancelScope
) -> None:
    """Cancel ``scope`` when a following client closes its end.

    A follower sends nothing after its request, so any read returns only at
    end of stream; extra bytes are read and discarded.
    """
    with contextlib.suppress(*_CLIENT_ERRORS):
        while True:
            await buffered.receive()
    scope.cancel()
