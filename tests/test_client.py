"""CoordClient against the real simulator on loopback, plus unit tables on a mock transport."""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from gated.api.client import CoordClient, SessionListing, parse_retry_after
from gated.api.models import SessionState
from gated.errors import (
    ApiAuthError,
    ApiConflictError,
    ApiError,
    ApiInvalidResponseError,
    ApiNotFoundError,
    ApiRateLimitedError,
    ApiRejectedError,
    ApiUnavailableError,
)
from gated.logs import configure_logging
from tests import simhelpers
from tests.simhelpers import SimulatorHandle

# pytest finds fixtures by name in the test module.
simulator = simhelpers.simulator

# Client deadline for requests that the simulator is set to hang, in seconds.
# Short so the tests stay fast. The hang lasts until the client gives up.
HANG_TIMEOUT_S = 0.3
# Upper bound for any single test step that must finish, in seconds. It only
# turns a hung test into a clear failure.
STEP_LIMIT_S = 20

MOMENT = datetime(2024, 5, 17, 8, 30, 15, 123000, tzinfo=UTC)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def make_client(sim: SimulatorHandle, **kwargs: Any) -> AsyncIterator[CoordClient]:
    options: dict[str, Any] = {
        "base_url": sim.base_url,
        "location_id": sim.location_id,
        "access_key": sim.access_key,
    }
    options.update(kwargs)
    async with CoordClient(**options) as client:
        yield client


def free_port() -> int:
    """Return a loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- happy path ----------------------------------------------------------------


@pytest.mark.anyio
async def test_session_lifecycle(simulator: SimulatorHandle) -> None:
    async with make_client(simulator) as client:
        created = await client.create_session("user-1")
        assert created.state is SessionState.PENDING
        assert created.user_id == "user-1"
        assert created.code_type == "barcode"
        assert created.code is not None

        listing = await client.list_sessions()
        assert listing.not_modified is False
        assert listing.sessions == [created]

        fetched = await client.get_session(created.id)
        assert fetched == created

        started = await client.start_session(created.id, start_time=MOMENT, lane="entry-1")
        assert started.state is SessionState.ACTIVE
        assert started.start_time == MOMENT

        end = MOMENT + timedelta(minutes=45)
        ended = await client.end_session(created.id, end_time=end, lane="exit-1")
        assert ended.state is SessionState.ENDED
        assert ended.end_time == end

    transitions = simulator.transitions()
    assert [(t["kind"], t["lane"]) for t in transitions] == [
        ("start", "entry-1"),
        ("end", "exit-1"),
    ]
    assert transitions[0]["time_given"] == "2024-05-17T08:30:15.123Z"


@pytest.mark.anyio
async def test_number_code_session_parses(simulator: SimulatorHandle) -> None:
    created = simulator.create_session(code_type="number")
    async with make_client(simulator) as client:
        session = await client.get_session(str(created["id"]))
    assert session.code_type == "number"
    assert session.code == created["redemption_info"]["code"]


@pytest.mark.anyio
async def test_conditional_list_not_modified(simulator: SimulatorHandle) -> None:
    simulator.create_session()
    async with make_client(simulator) as client:
        first = await client.list_sessions()
        assert first.etag is not None
        assert first.last_modified is not None

        by_etag = await client.list_sessions(etag=first.etag)
        assert by_etag == SessionListing(None, first.etag, first.last_modified, True)

        by_date = await client.list_sessions(last_modified=first.last_modified)
        assert by_date.not_modified is True
        assert by_date.sessions is None

        simulator.create_session()
        changed = await client.list_sessions(etag=first.etag)
    assert changed.not_modified is False
    assert changed.sessions is not None
    assert len(changed.sessions) == 2
    assert changed.etag != first.etag


# --- error mapping -------------------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_key_raises_auth_error(simulator: SimulatorHandle) -> None:
    async with make_client(simulator, access_key="not-the-key") as client:
        with pytest.raises(ApiAuthError, match="status 401"):
            await client.list_sessions()


@pytest.mark.anyio
async def test_status_403_raises_auth_error(simulator: SimulatorHandle) -> None:
    simulator.set_faults(error_status=403)
    async with make_client(simulator) as client:
        with pytest.raises(ApiAuthError, match="status 403"):
            await client.list_sessions()


@pytest.mark.anyio
async def test_unknown_session_raises_not_found(simulator: SimulatorHandle) -> None:
    async with make_client(simulator) as client:
        with pytest.raises(ApiNotFoundError):
            await client.get_session("999")


@pytest.mark.anyio
async def test_unknown_location_raises_not_found(simulator: SimulatorHandle) -> None:
    async with make_client(simulator, location_id="elsewhere") as client:
        with pytest.raises(ApiNotFoundError):
            await client.list_sessions()


@pytest.mark.anyio
async def test_start_twice_raises_conflict_with_session(simulator: SimulatorHandle) -> None:
    session_id = str(simulator.create_session()["id"])
    async with make_client(simulator) as client:
        await client.start_session(session_id, start_time=MOMENT, lane="entry-1")
        with pytest.raises(ApiConflictError) as caught:
            await client.start_session(session_id, start_time=MOMENT, lane="entry-2")
    assert caught.value.session is not None
    assert caught.value.session.id == session_id
    assert caught.value.session.state is SessionState.ACTIVE
    assert caught.value.session.start_time == MOMENT
    assert simulator.conflicts() == {session_id: 1}


@pytest.mark.anyio
async def test_end_pending_raises_conflict(simulator: SimulatorHandle) -> None:
    session_id = str(simulator.create_session()["id"])
    async with make_client(simulator) as client:
        with pytest.raises(ApiConflictError) as caught:
            await client.end_session(session_id, end_time=MOMENT, lane="exit-1")
    assert caught.value.session is not None
    assert caught.value.session.state is SessionState.PENDING


@pytest.mark.anyio
async def test_rate_limit_carries_retry_after(simulator: SimulatorHandle) -> None:
    simulator.set_faults(rate_limit_s=7)
    async with make_client(simulator) as client:
        with pytest.raises(ApiRateLimitedError) as caught:
            await client.list_sessions()
    assert caught.value.retry_after_s == 7.0


@pytest.mark.anyio
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_raises_unavailable(simulator: SimulatorHandle, status: int) -> None:
    simulator.set_faults(error_status=status)
    async with make_client(simulator) as client:
        with pytest.raises(ApiUnavailableError, match=f"status {status}"):
            await client.list_sessions()


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 422])
async def test_other_4xx_raises_rejected(simulator: SimulatorHandle, status: int) -> None:
    simulator.set_faults(error_status=status)
    async with make_client(simulator) as client:
        with pytest.raises(ApiRejectedError) as caught:
            await client.list_sessions()
    assert caught.value.status == status


@pytest.mark.anyio
async def test_hang_times_out_as_unavailable(simulator: SimulatorHandle) -> None:
    simulator.set_faults(hang=True)
    async with make_client(simulator, timeout_s=HANG_TIMEOUT_S) as client:
        with anyio.fail_after(STEP_LIMIT_S), pytest.raises(ApiUnavailableError, match="timed out"):
            await client.list_sessions()
    # The simulator notices that the client gave up and stops hanging.
    simulator.wait_for(lambda state: state.hanging == 0)


@pytest.mark.anyio
async def test_per_call_timeout_overrides_default(simulator: SimulatorHandle) -> None:
    session_id = str(simulator.create_session()["id"])
    simulator.set_faults(hang=True, path_kind="get")
    async with make_client(simulator, timeout_s=STEP_LIMIT_S) as client:
        with anyio.fail_after(STEP_LIMIT_S), pytest.raises(ApiUnavailableError):
            await client.get_session(session_id, timeout_s=HANG_TIMEOUT_S)
        listing = await client.list_sessions()
    assert listing.sessions is not None


@pytest.mark.anyio
async def test_drop_raises_unavailable(simulator: SimulatorHandle) -> None:
    simulator.set_faults(drop=True)
    async with make_client(simulator) as client:
        with pytest.raises(ApiUnavailableError, match="failed"):
            await client.list_sessions()


@pytest.mark.anyio
async def test_refused_connection_raises_unavailable() -> None:
    port = free_port()
    async with CoordClient(
        base_url=f"http://127.0.0.1:{port}/v1/access/parking", location_id="demo", access_key="k"
    ) as client:
        with pytest.raises(ApiUnavailableError):
            await client.list_sessions()


@pytest.mark.anyio
async def test_garbage_body_raises_invalid_response(simulator: SimulatorHandle) -> None:
    simulator.set_faults(garbage=True)
    async with make_client(simulator) as client:
        with pytest.raises(ApiInvalidResponseError, match="invalid JSON"):
            await client.list_sessions()


@pytest.mark.anyio
async def test_wrong_content_type_raises_invalid_response(simulator: SimulatorHandle) -> None:
    simulator.set_faults(wrong_content_type=True)
    async with make_client(simulator) as client:
        with pytest.raises(ApiInvalidResponseError, match="text/html"):
            await client.list_sessions()


@pytest.mark.anyio
async def test_outer_cancellation_is_not_translated(simulator: SimulatorHandle) -> None:
    simulator.set_faults(hang=True)
    async with make_client(simulator, timeout_s=STEP_LIMIT_S) as client:
        with anyio.move_on_after(HANG_TIMEOUT_S) as scope:
            await client.list_sessions()
    # A swallowed cancellation would have raised ApiUnavailableError instead.
    assert scope.cancelled_caught


# --- unit tables on a mock transport -----------------------------------------------------


def mock_client(handler: Any) -> CoordClient:
    return CoordClient(
        base_url="http://api.test/v1/access/parking",
        location_id="loc 1",
        access_key="unit-key",
        transport=httpx.MockTransport(handler),
    )


def json_response(status: int, data: Any, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=data, headers=headers)


REDEMPTION_SHAPES = [
    ({"type": "barcode", "code": "Q7K2M9XD4T"}, "Q7K2M9XD4T", "barcode"),
    ({"type": "number", "code": "482913"}, "482913", "number"),
    ({"type": "number", "code": 482913}, "482913", "number"),
    ({"barcode": "Q7K2M9XD4T"}, "Q7K2M9XD4T", "barcode"),
    ({"number": "482913"}, "482913", "number"),
    ({"value": "ABCD1234"}, "ABCD1234", "value"),
    ("Q7K2M9XD4T", "Q7K2M9XD4T", None),
    (None, None, None),
    ({"type": "barcode"}, None, "barcode"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("redemption", "code", "code_type"), REDEMPTION_SHAPES)
async def test_redemption_shapes_parse(
    redemption: Any, code: str | None, code_type: str | None
) -> None:
    body = {"id": 5, "user_id": "u", "redemption_info": redemption, "surprise": [1, 2]}
    async with mock_client(lambda request: json_response(200, body)) as client:
        session = await client.get_session("5")
    assert session.code == code
    assert session.code_type == code_type


@pytest.mark.anyio
async def test_request_shape_on_the_wire() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return json_response(200, {"id": "a/b c", "start_time": "2024-05-17T08:30:15.123Z"})

    async with mock_client(handler) as client:
        await client.start_session("a/b c", start_time=MOMENT, lane="entry-1")
    request = seen[0]
    assert request.method == "PUT"
    assert request.url.raw_path.split(b"?")[0] == (
        b"/v1/access/parking/loc%201/session/a%2Fb%20c/start"
    )
    assert request.url.params["access_key"] == "unit-key"
    assert json.loads(request.content) == {
        "start_time": "2024-05-17T08:30:15.123Z",
        "lane": "entry-1",
    }


@pytest.mark.anyio
async def test_custom_paths_are_used() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return json_response(200, {"id": 3, "end_time": "2024-05-17T09:00:00Z"})

    client = CoordClient(
        base_url="http://api.test/v1",
        location_id="L",
        access_key="unit-key",
        end_path="/checkout/{location_id}/{session_id}",
        transport=httpx.MockTransport(handler),
    )
    async with client:
        await client.end_session("3", end_time=MOMENT, lane="exit-1")
    assert seen == ["/v1/checkout/L/3"]


LAST_MODIFIED = "Fri, 17 May 2024 08:30:15 GMT"


@pytest.mark.anyio
async def test_conditional_headers_are_sent() -> None:
    seen: list[httpx.Headers] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(304, headers={"ETag": '"v9"'})

    async with mock_client(handler) as client:
        listing = await client.list_sessions(etag='"v8"', last_modified=LAST_MODIFIED)
    assert seen[0]["If-None-Match"] == '"v8"'
    assert seen[0]["If-Modified-Since"] == LAST_MODIFIED
    assert listing.not_modified is True
    assert listing.etag == '"v9"'


@pytest.mark.anyio
async def test_unasked_304_is_invalid() -> None:
    async with mock_client(lambda request: httpx.Response(304)) as client:
        with pytest.raises(ApiInvalidResponseError, match="304"):
            await client.list_sessions()


WRONG_SHAPES = [
    {"sessions": "not a list"},
    [{"id": 1}, {"no_id": True}],
    [{"id": 1, "start_time": "yesterday"}],
    [{"id": True}],
    "just text",
]


@pytest.mark.anyio
@pytest.mark.parametrize("body", WRONG_SHAPES)
async def test_wrong_shape_raises_invalid_response(body: Any) -> None:
    async with mock_client(lambda request: json_response(200, body)) as client:
        with pytest.raises(ApiInvalidResponseError, match="invalid body"):
            await client.list_sessions()


@pytest.mark.anyio
async def test_wrapped_list_is_accepted() -> None:
    body = {"sessions": [{"id": 1}, {"id": "x-2"}], "total": 2}
    async with mock_client(lambda request: json_response(200, body)) as client:
        listing = await client.list_sessions()
    assert listing.sessions is not None
    assert [s.id for s in listing.sessions] == ["1", "x-2"]


@pytest.mark.anyio
async def test_conflict_with_unreadable_body_has_no_session() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, content=b"<html>conflict</html>")

    async with mock_client(handler) as client:
        with pytest.raises(ApiConflictError) as caught:
            await client.start_session("1", start_time=MOMENT, lane="entry-1")
    assert caught.value.session is None


@pytest.mark.anyio
async def test_rate_limit_without_retry_after() -> None:
    async with mock_client(lambda request: httpx.Response(429)) as client:
        with pytest.raises(ApiRateLimitedError) as caught:
            await client.list_sessions()
    assert caught.value.retry_after_s is None


@pytest.mark.anyio
async def test_empty_session_id_is_rejected() -> None:
    async with mock_client(lambda request: json_response(200, {})) as client:
        with pytest.raises(ValueError, match="session_id"):
            await client.get_session("")


NOW = datetime(2024, 5, 17, 8, 30, 0, tzinfo=UTC)
RETRY_AFTER_CASES = [
    (None, None),
    ("7", 7.0),
    (" 120 ", 120.0),
    ("1.5", 1.5),
    ("0", 0.0),
    ("-3", None),
    ("soon", None),
    ("", None),
    ("nan", None),
    (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
    (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
]


@pytest.mark.parametrize(("header", "expected"), RETRY_AFTER_CASES)
def test_retry_after_parsing(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == expected


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="location_id"):
        CoordClient(base_url="http://x", location_id="", access_key="k")
    with pytest.raises(ValueError, match="access_key"):
        CoordClient(base_url="http://x", location_id="L", access_key="")
    with pytest.raises(ValueError, match="timeout_s"):
        CoordClient(base_url="http://x", location_id="L", access_key="k", timeout_s=0)


# --- the access key never leaks --------------------------------------------------------


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """Configure logging at DEBUG into a buffer and restore the stdlib root logger after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging("DEBUG", json=True, stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def exception_texts(error: BaseException) -> list[str]:
    """Return str() and repr() of an exception and of every cause and context behind it."""
    texts: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current), *map(str, current.args)]
        pending += [current.__cause__, current.__context__]
    return texts


@pytest.mark.anyio
async def test_access_key_never_leaks(simulator: SimulatorHandle, log_buffer: io.StringIO) -> None:
    key = simulator.access_key
    session_id = str(simulator.create_session()["id"])
    errors: list[ApiError] = []

    async def attempt(call: Any) -> None:
        try:
            await call()
        except ApiError as exc:
            errors.append(exc)

    async with make_client(simulator, timeout_s=HANG_TIMEOUT_S) as client:
        assert key not in repr(client)
        await client.list_sessions()
        await client.start_session(session_id, start_time=MOMENT, lane="entry-1")
        await attempt(lambda: client.start_session(session_id, start_time=MOMENT, lane="e"))
        await attempt(lambda: client.get_session("404"))
        faults: list[dict[str, Any]] = [
            {"error_status": 500},
            {"rate_limit_s": 2},
            {"hang": True},
            {"drop": True},
            {"garbage": True},
            {"wrong_content_type": True},
        ]
        for fault in faults:
            simulator.clear_faults()
            simulator.set_faults(**fault)
            await attempt(client.list_sessions)
        simulator.clear_faults()

    refused = CoordClient(
        base_url=f"http://127.0.0.1:{free_port()}/v1/access/parking",
        location_id=simulator.location_id,
        access_key=key,
    )
    async with refused:
        await attempt(refused.list_sessions)

    assert len(errors) == 9
    for error in errors:
        for text in exception_texts(error):
            assert key not in text, f"{type(error).__name__} exposes the key: {text}"
    logged = log_buffer.getvalue()
    assert "api.request" in logged
    assert "api.request_failed" in logged
    assert key not in logged


@pytest.mark.anyio
async def test_request_events_name_template_not_url(simulator: SimulatorHandle) -> None:
    # capture_logs bypasses the redaction processor, so this checks what the
    # client itself puts into events.
    key = simulator.access_key
    session_id = str(simulator.create_session()["id"])
    with capture_logs() as events:
        async with make_client(simulator) as client:
            await client.get_session(session_id)
            simulator.set_faults(drop=True)
            with pytest.raises(ApiUnavailableError):
                await client.list_sessions()
    api_events = [event for event in events if event["event"].startswith("api.")]
    assert [event["event"] for event in api_events] == ["api.request", "api.request_failed"]
    assert api_events[0]["path"] == "/{location_id}/session/{session_id}"
    assert api_events[0]["status"] == 200
    assert api_events[0]["session_id"] == session_id
    assert api_events[0]["log_level"] == "debug"
    assert api_events[1]["error"] == "ApiUnavailableError"
    assert api_events[1]["log_level"] == "debug"
    for event in api_events:
        assert key not in repr(event)
        assert "127.0.0.1" not in repr(event)
