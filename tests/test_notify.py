"""The sd_notify client and the watchdog, against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from gated.systemd.notify import MAX_STATUS_CHARS, Notifier
from gated.systemd.watchdog import run_watchdog

# How long a test waits for a datagram that must arrive, in seconds.
RECEIVE_TIMEOUT_S = 5.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    # The watchdog must work on both backends the daemon supports.
    return str(request.param)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """Return a datagram socket bound in tmp_path, standing in for systemd, and its path."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECEIVE_TIMEOUT_S)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> bytes:
    return sock.recv(65536)


def drain(sock: socket.socket) -> list[bytes]:
    """Return every datagram already queued on sock, without waiting."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(sock.recv(65536))
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(timeout)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- Notifier ------------------------------------------------------------------


def test_ready_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier(path)

    assert notifier.enabled
    assert notifier.ready() is True
    assert receive(sock) == b"READY=1"
    notifier.close()


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.status("3 lanes up, API online"), b"STATUS=3 lanes up, API online"),
    ],
    ids=["ready", "stopping", "watchdog", "status"],
)
def test_field_datagrams(receiver: tuple[socket.socket, str], call: Any, expected: bytes) -> None:
    sock, path = receiver
    notifier = Notifier(path)

    assert call(notifier) is True
    assert receive(sock) == expected
    notifier.close()


def test_status_undecodable_text(receiver: tuple[socket.socket, str]) -> None:
    # Text decoded with errors="surrogateescape" contains lone surrogates.
    sock, path = receiver
    notifier = Notifier(path)

    assert notifier.status("scanner sent \udcff") is True
    assert receive(sock) == b"STATUS=scanner sent ?"
    notifier.close()


def test_send_joins_fields(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier(path)

    assert notifier.send("READY=1", "STATUS=started") is True
    assert receive(sock) == b"READY=1\nSTATUS=started"
    notifier.close()


def test_status_one_line_capped(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier(path)

    notifier.status("API offline:\nconnection refused\r\n  retrying")
    assert receive(sock) == b"STATUS=API offline: connection refused retrying"

    notifier.status("x" * 1000)
    value = receive(sock).decode().removeprefix("STATUS=")
    assert len(value) == MAX_STATUS_CHARS
    assert value.endswith("...")
    notifier.close()


def test_invalid_field_sends_nothing(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier(path)

    with capture_logs() as logs:
        assert notifier.send("STATUS=ok\nREADY=1") is False
        assert notifier.send("READY") is False
        assert notifier.send("=1") is False
        assert notifier.send() is False

    assert drain(sock) == []
    assert [entry["event"] for entry in logs].count("notify.invalid_field") == 3
    notifier.close()


def test_abstract_socket() -> None:
    name = f"gated-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(RECEIVE_TIMEOUT_S)
    try:
        notifier = Notifier("@" + name)
        assert notifier.enabled
        assert notifier.ready() is True
        assert receive(sock) == b"READY=1"
        notifier.close()
    finally:
        sock.close()


def test_socket_from_environment(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()

    assert notifier.enabled
    assert notifier.stopping() is True
    assert receive(sock) == b"STOPPING=1"
    notifier.close()


def test_disabled_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    fds_before = open_fd_count()
    notifier = Notifier()

    assert notifier.enabled is False
    assert notifier.ready() is False
    assert notifier.status("idle") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval_s() is None
    assert open_fd_count() == fds_before


def test_empty_path_disables() -> None:
    notifier = Notifier("", environ={"NOTIFY_SOCKET": "/run/systemd/notify"})

    assert notifier.enabled is False
    assert notifier.ready() is False


@pytest.mark.parametrize(
    "value",
    ["relative/notify.sock", "@", "/", "/" + "x" * 200, "vsock:2:1234"],
    ids=["relative", "bare-at", "root", "too-long", "vsock"],
)
def test_invalid_socket_disables(value: str) -> None:
    with capture_logs() as logs:
        notifier = Notifier(value)

    assert notifier.enabled is False
    assert notifier.ready() is False
    assert [entry["event"] for entry in logs] == ["notify.invalid_socket"]
    assert logs[0]["log_level"] == "warning"


def test_missing_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "absent.sock"))

    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False

    failures = [entry for entry in logs if entry["event"] == "notify.send_failed"]
    assert [entry["log_level"] for entry in failures] == ["warning", "debug", "debug"]
    assert failures[0]["fields"] == ["READY"]
    assert failures[2]["failures"] == 3
    notifier.close()


def test_recovers_after_failure(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    notifier = Notifier(path)
    with capture_logs() as logs:
        assert notifier.ready() is False

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(RECEIVE_TIMEOUT_S)
        try:
            assert notifier.ready() is True
            assert receive(sock) == b"READY=1"
        finally:
            sock.close()

    events = [(entry["event"], entry["log_level"]) for entry in logs]
    assert events == [("notify.send_failed", "warning"), ("notify.recovered", "info")]
    notifier.close()


def test_sends_reuse_one_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier(path)
    fds_before = open_fd_count()

    # Linux queues 10 datagrams per AF_UNIX socket by default
    # (net.unix.max_dgram_qlen), so the receiver is drained in between.
    for _ in range(4):
        for _ in range(5):
            assert notifier.watchdog() is True
        assert len(drain(sock)) == 5

    assert open_fd_count() == fds_before + 1
    notifier.close()
    assert open_fd_count() == fds_before


@pytest.mark.timeout(30)
def test_full_queue_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    # The test never reads the receiver, so its queue fills up. A blocking send
    # would hang here until the per-test timeout; a non-blocking one returns False.
    _, path = receiver
    notifier = Notifier(path)

    with capture_logs():
        results = [notifier.watchdog() for _ in range(10_000)]

    assert results[0] is True
    assert results[-1] is False
    notifier.close()


# --- Watchdog interval from the environment ---------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "3²"}, None),
        ({}, None),
    ],
    ids=[
        "usec",
        "own-pid",
        "other-pid",
        "invalid-pid",
        "half-second",
        "zero",
        "negative",
        "with-unit",
        "superscript",
        "unset",
    ],
)
def test_watchdog_interval(
    receiver: tuple[socket.socket, str], environ: dict[str, str], expected: float | None
) -> None:
    _, path = receiver
    notifier = Notifier(path, environ=environ)

    assert notifier.watchdog_interval_s() == expected


# --- Watchdog task -------------------------------------------------------------------


async def wait_for_datagram(sock: socket.socket) -> bytes:
    """Return the next datagram, letting the event loop run while waiting."""
    with anyio.fail_after(RECEIVE_TIMEOUT_S):
        while True:
            messages = drain(sock)
            if messages:
                return messages[0]
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_watchdog_cadence(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier(path)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_watchdog(notifier, interval_s=0.05, max_lag_s=1.0))
        await anyio.sleep(0.5)
        tg.cancel_scope.cancel()

    pings = drain(sock)
    # About 11 pings: one at start, then one per 0.05 s for 0.5 s. The bounds
    # are wide because the machine running the tests may be busy.
    assert set(pings) == {b"WATCHDOG=1"}
    assert 3 <= len(pings) <= 15
    notifier.close()


@pytest.mark.anyio
async def test_watchdog_skips_blocked_loop(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier(path)

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_watchdog(notifier, interval_s=0.3, max_lag_s=0.1))
            assert await wait_for_datagram(sock) == b"WATCHDOG=1"

            # Block the event loop past the watchdog's next deadline, as a
            # synchronous call would. Its sleep then ends about 0.3 s late.
            time.sleep(0.6)
            await anyio.sleep(0.05)
            skipped = drain(sock)

            # The ping after the skipped one is sent on time again.
            assert await wait_for_datagram(sock) == b"WATCHDOG=1"
            tg.cancel_scope.cancel()

    assert skipped == []
    lags = [entry for entry in logs if entry["event"] == "watchdog.loop_lag"]
    assert len(lags) == 1
    assert lags[0]["log_level"] == "warning"
    assert lags[0]["lag_s"] > 0.1
    notifier.close()


@pytest.mark.anyio
async def test_watchdog_unhealthy_stops_pings(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier(path)
    healthy = False

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: run_watchdog(
                    notifier, interval_s=0.05, max_lag_s=1.0, is_healthy=lambda: healthy
                )
            )
            await anyio.sleep(0.3)
            while_unhealthy = drain(sock)

            healthy = True
            assert await wait_for_datagram(sock) == b"WATCHDOG=1"
            tg.cancel_scope.cancel()

    assert while_unhealthy == []
    events = [(entry["event"], entry["log_level"]) for entry in logs]
    assert events.count(("watchdog.unhealthy", "warning")) == 1
    assert ("watchdog.still_unhealthy", "debug") in events
    assert events.count(("watchdog.healthy", "info")) == 1
    notifier.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("interval_s", "max_lag_s"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (float("nan"), 1.0)]
)
async def test_watchdog_rejects_bad_arguments(interval_s: float, max_lag_s: float) -> None:
    notifier = Notifier("")

    with pytest.raises(ValueError, match="must be positive"):
        await run_watchdog(notifier, interval_s=interval_s, max_lag_s=max_lag_s)
