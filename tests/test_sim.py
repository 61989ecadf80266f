"""The API simulator over real loopback HTTP: contract, faults, admin endpoints and CLI."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from gated.sim import Faults, SimState, serve
from gated.sim.cli import main as sim_main
from gated.sim.state import BARCODE_ALPHABET
from tests import simhelpers
from tests.simhelpers import running_simulator

KEY = "sim-test-key-5d1f"
# Upper bound for a step that must finish, in seconds. It only turns a hang
# into a clear failure.
STEP_LIMIT_S = 20


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Served:
    state: SimState
    http: httpx.AsyncClient
    port: int

    def api(self, path: str, *, key: str | None = KEY) -> str:
        query = f"?access_key={key}" if key is not None else ""
        return f"/v1/access/parking/demo{path}{query}"


@asynccontextmanager
async def served(state: SimState | None = None) -> AsyncIterator[Served]:
    """Run ``serve`` in the test's own event loop, with an HTTP client pointed at it."""
    state = state or SimState("demo", KEY)
    async with anyio.create_task_group() as group:
        port = await group.start(serve, state)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=STEP_LIMIT_S) as http:
            yield Served(state, http, port)
        group.cancel_scope.cancel()


# --- sessions ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_create_barcode_session() -> None:
    async with served() as sim:
        first = await sim.http.post(sim.api("/session"), json={"user_id": "u-1"})
        second = await sim.http.post(sim.api("/session"), json={"user_id": "u-2"})
    assert first.status_code == 201
    assert first.headers["content-type"] == "application/json"
    body = first.json()
    assert body["user_id"] == "u-1"
    assert body["start_time"] is None
    assert body["redemption_info"]["type"] == "barcode"
    code = body["redemption_info"]["code"]
    assert len(code) == 10
    assert set(code) <= set(BARCODE_ALPHABET)
    assert second.json()["id"] == body["id"] + 1


@pytest.mark.anyio
async def test_create_number_session() -> None:
    async with served() as sim:
        reply = await sim.http.post(sim.api("/session"), json={"user_id": "u", "type": "number"})
    info = reply.json()["redemption_info"]
    assert info["type"] == "number"
    assert re.fullmatch(r"[0-9]{6}", info["code"])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b"[1]", b'{"user_id": 5}', b'{"user_id": "u", "type": "qr"}'],
)
async def test_create_rejects_bad_body(body: bytes) -> None:
    async with served() as sim:
        reply = await sim.http.post(sim.api("/session"), content=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["status"] == 400


@pytest.mark.anyio
async def test_start_records_given_time_and_lane() -> None:
    async with served() as sim:
        session = sim.state.create_session("u")
        body = {"start_time": "2018-04-12T00:14:20.292Z", "lane": "entry-1"}
        reply = await sim.http.put(sim.api(f"/session/{session['id']}/start"), json=body)
    assert reply.status_code == 200
    assert reply.json()["start_time"] == "2018-04-12T00:14:20.292Z"
    [transition] = sim.state.transitions()
    assert transition["session_id"] == str(session["id"])
    assert transition["kind"] == "start"
    assert transition["lane"] == "entry-1"
    assert transition["time_given"] == "2018-04-12T00:14:20.292Z"


@pytest.mark.anyio
async def test_start_without_body_uses_now() -> None:
    async with served() as sim:
        session = sim.state.create_session("u")
        reply = await sim.http.put(sim.api(f"/session/{session['id']}/start"))
    assert reply.status_code == 200
    assert reply.json()["start_time"] is not None
    assert sim.state.transitions()[0]["time_given"] is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [{"start_time": "noon"}, {"start_time": "2018-04-12T00:14:20"}, {"start_time": 5}, {"lane": 3}],
)
async def test_start_rejects_bad_body(body: dict[str, Any]) -> None:
    async with served() as sim:
        session = sim.state.create_session("u")
        reply = await sim.http.put(sim.api(f"/session/{session['id']}/start"), json=body)
    assert reply.status_code == 400
    assert sim.state.transitions() == []


@pytest.mark.anyio
async def test_end_bills_started_hours() -> None:
    async with served() as sim:
        session_path = f"/session/{sim.state.create_session('u')['id']}"
        start = {"start_time": "2024-01-01T10:00:00Z"}
        await sim.http.put(sim.api(session_path + "/start"), json=start)
        reply = await sim.http.put(
            sim.api(session_path + "/end"), json={"end_time": "2024-01-01T11:30:00.000Z"}
        )
    assert reply.status_code == 200
    body = reply.json()
    assert body["end_time"] == "2024-01-01T11:30:00.000Z"
    assert body["billing_info"] == {"cost": {"amount": 600, "currency": "USD"}}


@pytest.mark.anyio
async def test_conflicts_return_current_session() -> None:
    async with served() as sim:
        session_id = sim.state.create_session("u")["id"]
        start = sim.api(f"/session/{session_id}/start")
        end = sim.api(f"/session/{session_id}/end")

        end_pending = await sim.http.put(end)
        assert end_pending.status_code == 409
        assert end_pending.json()["start_time"] is None

        assert (await sim.http.put(start)).status_code == 200
        start_active = await sim.http.put(start)
        assert start_active.status_code == 409
        assert start_active.json()["start_time"] is not None
        assert start_active.json()["end_time"] is None

        assert (await sim.http.put(end)).status_code == 200
        for path in (start, end):
            ended = await sim.http.put(path)
            assert ended.status_code == 409
            assert ended.json()["end_time"] is not None
            assert "billing_info" in ended.json()

        log = (await sim.http.get("/_sim/log")).json()
    assert [t["kind"] for t in log["transitions"]] == ["start", "end"]
    assert log["conflicts"] == {str(session_id): 4}


@pytest.mark.anyio
async def test_access_key_is_required() -> None:
    async with served() as sim:
        missing = await sim.http.get(sim.api("/session", key=None))
        wrong = await sim.http.get(sim.api("/session", key="wrong"))
    assert missing.status_code == 401
    assert wrong.status_code == 401


@pytest.mark.anyio
async def test_unknown_paths_are_not_found() -> None:
    async with served() as sim:
        other_location = await sim.http.get(f"/v1/access/parking/other/session?access_key={KEY}")
        unknown_session = await sim.http.get(sim.api("/session/77"))
        text_id = await sim.http.get(sim.api("/session/abc"))
        unknown_end = await sim.http.put(sim.api("/session/77/end"))
        outside = await sim.http.get("/elsewhere")
        wrong_method = await sim.http.delete(sim.api("/session"))
    assert other_location.status_code == 404
    assert unknown_session.status_code == 404
    assert text_id.status_code == 404
    assert unknown_end.status_code == 404
    assert outside.status_code == 404
    assert wrong_method.status_code == 405


# --- conditional list ----------------------------------------------------------


@pytest.mark.anyio
async def test_list_etag_and_304() -> None:
    async with served() as sim:
        sim.state.create_session("u")
        first = await sim.http.get(sim.api("/session"))
        etag = first.headers["etag"]
        same = await sim.http.get(sim.api("/session"), headers={"If-None-Match": etag})
        weak = await sim.http.get(sim.api("/session"), headers={"If-None-Match": f"W/{etag}"})
        by_date = await sim.http.get(
            sim.api("/session"), headers={"If-Modified-Since": first.headers["last-modified"]}
        )
        sim.state.create_session("u")
        changed = await sim.http.get(sim.api("/session"), headers={"If-None-Match": etag})
    assert first.status_code == 200
    assert len(first.json()) == 1
    assert same.status_code == 304
    assert same.content == b""
    assert same.headers["etag"] == etag
    assert weak.status_code == 304
    assert by_date.status_code == 304
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert len(changed.json()) == 2


def test_etag_changes_across_reset() -> None:
    state = SimState("demo", KEY)
    state.create_session("u")
    before = state.listing().etag
    state.reset()
    assert state.listing().etag != before
    assert state.sessions() == []


# --- faults ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_faults_via_admin_endpoints() -> None:
    async with served() as sim:
        put = await sim.http.put(
            "/_sim/faults", json={"error_status": 503, "path_kind": "end", "latency_ms": 0}
        )
        assert put.status_code == 200
        assert put.json()["error_status"] == 503
        assert put.json()["path_kind"] == ["end"]

        session_id = sim.state.create_session("u")["id"]
        listed = await sim.http.get(sim.api("/session"))
        started = await sim.http.put(sim.api(f"/session/{session_id}/start"))
        ended = await sim.http.put(sim.api(f"/session/{session_id}/end"))
        assert listed.status_code == 200
        assert started.status_code == 200
        assert ended.status_code == 503
        assert ended.json()["error"]["status"] == 503

        patched = await sim.http.patch("/_sim/faults", json={"rate_limit_s": 4})
        assert patched.json()["error_status"] == 503
        assert patched.json()["rate_limit_s"] == 4
        limited = await sim.http.put(sim.api(f"/session/{session_id}/end"))
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "4"

        reset = await sim.http.post("/_sim/reset")
        assert reset.status_code == 200
        current = (await sim.http.get("/_sim/faults")).json()
    assert current == Faults().to_json()
    assert sim.state.sessions() == []
    # The ended session never ended: the fault responded before the state changed.
    assert [t["kind"] for t in sim.state.transitions()] == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"error_rate": 2}, "error_rate"),
        ({"error_status": 200}, "error_status"),
        ({"hang": "yes"}, "hang"),
        ({"path_kind": "lookup"}, "path_kind"),
        ({"latency": 5}, "unknown fault"),
    ],
)
async def test_invalid_faults_are_rejected(body: dict[str, Any], message: str) -> None:
    async with served() as sim:
        reply = await sim.http.put("/_sim/faults", json=body)
    assert reply.status_code == 400
    assert message in reply.json()["error"]["message"]
    assert sim.state.faults == Faults()


@pytest.mark.anyio
async def test_admin_wrong_method_and_path() -> None:
    async with served() as sim:
        wrong_method = await sim.http.delete("/_sim/faults")
        unknown = await sim.http.get("/_sim/nothing")
    assert wrong_method.status_code == 405
    assert "GET" in wrong_method.headers["allow"]
    assert unknown.status_code == 404


@pytest.mark.anyio
async def test_garbage_runs_request_then_garbles() -> None:
    async with served() as sim:
        session_id = sim.state.create_session("u")["id"]
        sim.state.update_faults(garbage=True)
        reply = await sim.http.put(sim.api(f"/session/{session_id}/start"))
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.content)
    assert [t["kind"] for t in sim.state.transitions()] == ["start"]


@pytest.mark.anyio
async def test_wrong_content_type_keeps_json() -> None:
    async with served() as sim:
        sim.state.create_session("u")
        sim.state.update_faults(wrong_content_type=True)
        reply = await sim.http.get(sim.api("/session"))
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/html"
    assert len(json.loads(reply.content)) == 1


@pytest.mark.anyio
async def test_drop_closes_without_response() -> None:
    async with served() as sim:
        sim.state.update_faults(drop=True)
        with pytest.raises(httpx.RemoteProtocolError):
            await sim.http.get(sim.api("/session"))


@pytest.mark.anyio
async def test_latency_delays_response() -> None:
    # The response cannot arrive before the latency passed, so the short read
    # timeout always fires whatever the machine's speed. Connecting gets a
    # generous deadline, because a loaded machine may be slow to accept.
    async with served() as sim:
        sim.state.update_faults(latency_ms=2000)
        with pytest.raises(httpx.ReadTimeout):
            await sim.http.get(sim.api("/session"), timeout=httpx.Timeout(5.0, read=0.05))
        sim.state.clear_faults()
        reply = await sim.http.get(sim.api("/session"))
    assert reply.status_code == 200


@pytest.mark.anyio
async def test_hang_responds_once_cleared() -> None:
    async with served() as sim:
        replies: list[httpx.Response] = []

        async def request() -> None:
            replies.append(await sim.http.get(sim.api("/session")))

        sim.state.update_faults(hang=True)
        with anyio.fail_after(STEP_LIMIT_S):
            async with anyio.create_task_group() as group:
                group.start_soon(request)
                await anyio.to_thread.run_sync(
                    sim.state.wait_for, lambda state: state.hanging == 1, STEP_LIMIT_S
                )
                assert replies == []
                sim.state.clear_faults()
    assert [reply.status_code for reply in replies] == [200]
    assert sim.state.hanging == 0


@pytest.mark.anyio
async def test_hang_ends_when_client_leaves() -> None:
    async with served() as sim:
        sim.state.update_faults(hang=True)
        with pytest.raises(httpx.ReadTimeout):
            await sim.http.get(sim.api("/session"), timeout=0.2)
        left = await anyio.to_thread.run_sync(
            sim.state.wait_for, lambda state: state.hanging == 0, STEP_LIMIT_S
        )
    assert left


def test_error_rate_draws() -> None:
    faults = Faults(error_status=500, error_rate=0.5)
    rng = random.Random(7)
    picks = [faults.pick("list", rng) for _ in range(1000)]
    assert 400 < picks.count("error") < 600
    assert set(picks) == {"error", None}
    assert Faults(error_status=500, error_rate=0.0).pick("list", rng) is None


def test_path_kind_limits_faults() -> None:
    faults = Faults.from_mapping({"drop": True, "path_kind": "start,end"})
    rng = random.Random(1)
    assert faults.pick("start", rng) == "drop"
    assert faults.pick("end", rng) == "drop"
    assert faults.pick("list", rng) is None
    assert faults.pick(None, rng) is None
    assert Faults(drop=True).pick(None, rng) == "drop"


# --- raw HTTP/1.1 behaviour --------------------------------------------------------


def raw_exchange(port: int, payload: bytes) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=STEP_LIMIT_S) as conn:
        conn.sendall(payload)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.anyio
async def test_pipelined_requests_on_one_connection() -> None:
    async with served() as sim:
        target = sim.api("/session").encode()
        payload = (
            b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        response = await anyio.to_thread.run_sync(raw_exchange, sim.port, payload)
    assert response.count(b"HTTP/1.1 200 OK\r\n") == 2


@pytest.mark.anyio
async def test_malformed_request_gets_400() -> None:
    async with served() as sim:
        payload = b"NOT HTTP AT ALL\r\n\r\n"
        response = await anyio.to_thread.run_sync(raw_exchange, sim.port, payload)
    assert response.startswith(b"HTTP/1.1 400 ")


@pytest.mark.anyio
async def test_oversized_body_gets_413() -> None:
    async with served() as sim:
        head = b"POST " + sim.api("/session").encode() + b" HTTP/1.1\r\nHost: x\r\n"
        payload = head + b"Content-Length: 2000000\r\n\r\n" + b"x" * 2_000_000
        response = await anyio.to_thread.run_sync(raw_exchange, sim.port, payload)
    assert response.startswith(b"HTTP/1.1 413 ")


# --- bulk creation and the in-thread helper ----------------------------------------------


def test_bulk_create_hundred_thousand() -> None:
    # Runs on one backend only: the work is in SimState, not in the event loop.
    with running_simulator() as sim, httpx.Client(base_url=sim.root_url, timeout=60) as http:
        reply = http.post("/_sim/sessions", json={"count": 100_000})
        listed = http.get(sim.base_url + "/demo/session", params={"access_key": sim.access_key})
        too_many = http.post("/_sim/sessions", json={"count": 10**7})
    assert reply.status_code == 201
    assert reply.json() == {"created": 100_000, "first_id": 1, "last_id": 100_000}
    sessions = listed.json()
    assert len(sessions) == 100_000
    assert len({s["redemption_info"]["code"] for s in sessions}) == 100_000
    assert too_many.status_code == 400


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_running_simulator_handle(backend: str) -> None:
    with running_simulator(location_id="lot-7", backend=backend) as sim:
        created = sim.create_session(user_id="u-9", code_type="number")
        sim.set_faults(latency_ms=1)
        sim.set_faults(error_status=500, path_kind="end")
        faults = sim.state.faults
        with httpx.Client(base_url=sim.base_url) as http:
            listed = http.get("/lot-7/session", params={"access_key": sim.access_key})
            admin = http.get(sim.root_url + "/_sim/faults")
        sim.clear_faults()
    assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1/access/parking"
    assert created["user_id"] == "u-9"
    assert faults.latency_ms == 1
    assert faults.error_status == 500
    assert listed.status_code == 200
    assert listed.json() == sim.sessions()
    assert admin.json()["path_kind"] == ["end"]
    assert sim.state.faults == Faults()


def test_simulator_fixture_is_exported() -> None:
    assert callable(simhelpers.simulator)


# --- CLI ---------------------------------------------------------------------------


CLI_ENTRY = "import sys; from gated.sim.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_stops_on_signal(stop_signal: signal.Signals) -> None:
    key = "cli-secret-key-93be"
    command = [sys.executable, "-c", CLI_ENTRY, "--port", "0", "--access-key", key]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    ) as process:
        try:
            base_url = process.stdout.readline().strip() if process.stdout else ""
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1/access/parking", base_url)
            reply = httpx.get(f"{base_url}/demo/session", params={"access_key": key})
            process.send_signal(stop_signal)
            stdout, stderr = process.communicate(timeout=STEP_LIMIT_S)
        finally:
            if process.poll() is None:
                process.kill()
    assert reply.status_code == 200
    assert process.returncode == 0
    assert stdout == ""
    assert "sim.request" in stderr
    assert "sim.stopping" in stderr
    assert key not in stderr


def test_cli_rejects_bad_arguments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sim_main(["--port", "0", "--access-key", "k", "--error-rate", "3"]) == 2
    assert "error_rate" in capsys.readouterr().err
    monkeypatch.delenv("GATED_SIM_ACCESS_KEY", raising=False)
    assert sim_main(["--port", "0"]) == 2
    assert "--access-key" in capsys.readouterr().err
