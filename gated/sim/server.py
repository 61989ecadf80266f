"""HTTP/1.1 server of the simulator: anyio TCP listeners, h11 for the protocol.

The server owns every connection byte by byte, so it can hang before a
response, close a connection instead of responding, or label a body with the
wrong type. Each connection serves requests one after another (keep-alive)
until the client closes it, sends ``Connection: close``, idles too long or
breaks the protocol.

Events: ``sim.listening`` (INFO), ``sim.request`` (INFO, with method, path
without the query, kind, status, fault and elapsed_ms), ``sim.connection_failed``
(DEBUG). The query string, which contains the access key, is never logged.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import h11
from anyio.abc import SocketAttribute

from gated.logs import get_logger
from gated.sim.app import Reply, Request, classify, error_reply, handle
from gated.sim.state import SimState

# A request (head and body) must arrive within this many seconds of the
# previous response, or the connection is closed. httpx drops idle pooled
# connections after 5 s, so 30 s never cuts a live client short.
REQUEST_READ_TIMEOUT_S = 30.0
# Deadline for writing one response into the socket, in seconds.
SEND_TIMEOUT_S = 10.0
# Largest request head and body accepted, in bytes. The API's bodies are tiny.
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
RECEIVE_CHUNK_BYTES = 64 * 1024
# How long a rejected request's remaining bytes are read and discarded before
# the connection is closed, in seconds (see _reject).
LINGER_S = 2.0
# How often a hanging request checks whether the hang fault was cleared, in
# seconds. Tests clear faults from another thread, so there is no event to
# wait on across event loops.
HANG_POLL_S = 0.02

GARBAGE_BODY = b"<html><body>502 Bad Gateway: upstream sent garbage</body></html>"

_log = get_logger("sim")


class _ClientGone(Exception):
    """The client closed the connection or broke the protocol."""


async def serve(
    sim: SimState,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the simulated API until cancelled, reporting the bound port to ``task_status``."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        # S610 confuses anyio's typed attributes with Django's QuerySet.extra.
        bound_port: int = listener.extra(SocketAttribute.local_port)  # noqa: S610
        _log.info("sim.listening", host=host, port=bound_port, location_id=sim.location_id)
        task_status.started(bound_port)
        await listener.serve(partial(_serve_connection, sim))


async def _serve_connection(sim: SimState, stream: anyio.abc.SocketStream) -> None:
    async with stream:
        try:
            await _Connection(sim, stream).run()
        except (_ClientGone, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            _log.debug("sim.connection_failed", error=type(exc).__name__)
        except TimeoutError:
            _log.debug("sim.connection_failed", error="TimeoutError")


class _Connection:
    def __init__(self, sim: SimState, stream: anyio.abc.SocketStream) -> None:
        self.sim = sim
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    async def run(self) -> None:
        while True:
            with anyio.fail_after(REQUEST_READ_TIMEOUT_S):
                request = await self._read_request()
            if request is None:
                return
            keep_open = await self._respond(request)
            if not keep_open or self.h11.our_state is not h11.DONE:
                return
            if self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()

    async def _receive(self) -> None:
        """Feed the next bytes from the socket to h11, or EOF as an empty read."""
        try:
            data = await self.stream.receive(RECEIVE_CHUNK_BYTES)
        except anyio.EndOfStream:
            data = b""
        self.h11.receive_data(data)

    async def _read_request(self) -> Request | None:
        """Read one whole request, or return None when the client closed cleanly."""
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                await self._reject(exc.error_status_hint, "the request is not valid HTTP/1.1")
                raise _ClientGone from None
            if event is h11.NEED_DATA:
                await self._receive()
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    await self._reject(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
                    raise _ClientGone
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _to_request(head, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:
                # PAUSED cannot occur here: the cycle restarts only after a full response.
                raise _ClientGone

    async def _reject(self, status: int, message: str) -> None:
        """Respond to an unreadable request, then close without resetting the connection."""
        # h11 lets a server respond from IDLE too, for a request line it could not parse.
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        await self._send(error_reply(status, message))
        # Closing a socket with unread input makes the kernel send RST, which
        # can destroy the response before the client reads it. So the write side
        # is shut first and the rest of the request is read and discarded.
        await self.stream.send_eof()
        with anyio.move_on_after(LINGER_S):
            try:
                while True:
                    await self.stream.receive(RECEIVE_CHUNK_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    async def _respond(self, request: Request) -> bool:
        """Respond to one request with any fault it meets. Return False to close the connection."""
        started = time.monotonic()
        kind = classify(request)
        action = None
        if not request.is_admin:
            self.sim.note_request()
            faults = self.sim.faults
            action = faults.pick(kind, self.sim.rng)
            if faults.latency_ms and faults.applies_to(kind):
                await anyio.sleep(faults.latency_ms / 1000)

        fields: dict[str, Any] = {"method": request.method, "path": request.path, "kind": kind}
        if action == "drop":
            _log.info("sim.request", status=None, fault=action, **fields)
            return False
        if action == "hang" and not await self._hang(kind):
            _log.info("sim.request", status=None, fault=action, **fields)
            return False

        reply = self._reply(request, action)
        await self._send(reply)
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        _log.info("sim.request", status=reply.status, fault=action, elapsed_ms=elapsed_ms, **fields)
        return True

    def _reply(self, request: Request, action: str | None) -> Reply:
        if action == "rate_limit":
            seconds = self.sim.faults.rate_limit_s or 0
            return error_reply(429, "rate limited", (("Retry-After", str(seconds)),))
        if action == "error":
            status = self.sim.faults.error_status or 500
            return error_reply(status, f"simulated failure with status {status}")
        reply = handle(self.sim, request)
        if action == "garbage":
            return Reply(200, GARBAGE_BODY, headers=reply.headers)
        if action == "wrong_content_type":
            return Reply(200, reply.body or b"{}", content_type="text/html", headers=reply.headers)
        return reply

    async def _hang(self, kind: str | None) -> bool:
        """Wait until the hang fault no longer covers ``kind``. Return False if the client left."""
        client_left = False

        async def watch_client(scope: anyio.CancelScope) -> None:
            nonlocal client_left
            try:
                while True:
                    data = await self.stream.receive(RECEIVE_CHUNK_BYTES)
                    # Pipelined bytes are kept for the next request.
                    self.h11.receive_data(data)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                client_left = True
            scope.cancel()

        self.sim.note_hang(+1)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch_client, group.cancel_scope)
                # Polled, because faults change from other threads (see HANG_POLL_S).
                while self.sim.faults.hang and self.sim.faults.applies_to(kind):  # noqa: ASYNC110
                    await anyio.sleep(HANG_POLL_S)
                group.cancel_scope.cancel()
        finally:
            self.sim.note_hang(-1)
        return not client_left

    async def _send(self, reply: Reply) -> None:
        headers = [
            ("Date", formatdate(usegmt=True)),
            ("Server", "gated-sim"),
            *reply.headers,
        ]
        if reply.body is not None:
            headers.append(("Content-Type", reply.content_type))
            headers.append(("Content-Length", str(len(reply.body))))
        head = h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
        data = self.h11.send(head) or b""
        if reply.body:
            data += self.h11.send(h11.Data(data=reply.body)) or b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        with anyio.fail_after(SEND_TIMEOUT_S):
            await self.stream.send(data)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _to_request(head: h11.Request, body: bytes) -> Request:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
    return Request.parse(head.method.decode("ascii"), head.target.decode("latin-1"), headers, body)
