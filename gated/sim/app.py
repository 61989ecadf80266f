"""Routing of the simulator: one parsed request in, one reply out, no I/O.

API paths live under ``/v1/access/parking`` and need the access key in the
query string. Admin paths live under ``/_sim/``, which the real API does not
use, and need no key:

- ``GET /_sim/faults``, ``PUT /_sim/faults`` (replace the fault set),
  ``PATCH /_sim/faults`` (change the fields given)
- ``POST /_sim/reset``: forget sessions, transitions and faults
- ``GET /_sim/log``: ``{"transitions": [...], "conflicts": {session_id: count}}``
- ``POST /_sim/sessions`` ``{"count": N, "type": "barcode"}``: bulk creation
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from gated.sim.faults import Faults
from gated.sim.state import SimState

API_PREFIX = "/v1/access/parking"
ADMIN_PREFIX = "/_sim/"
JSON_TYPE = "application/json"


class BadRequestError(ValueError):
    """Invalid request body or parameter, sent to the client as 400 with this message."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    # Header names are in lower case, and a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes

    @classmethod
    def parse(cls, method: str, target: str, headers: dict[str, str], body: bytes) -> Request:
        parts = urlsplit(target)
        return cls(method, parts.path, parse_qs(parts.query), headers, body)

    @property
    def is_admin(self) -> bool:
        return self.path.startswith(ADMIN_PREFIX)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    # None: no body at all (304).
    body: bytes | None
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = field(default=())


def json_reply(status: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, json.dumps(data).encode(), headers=headers)


def error_reply(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return json_reply(status, {"error": {"status": status, "message": message}}, headers)


def _segments(path: str) -> list[str] | None:
    """Split an API path after the prefix into decoded segments, or return None."""
    if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
        return None
    rest = path[len(API_PREFIX) :].strip("/")
    return [unquote(part) for part in rest.split("/")] if rest else []


def classify(request: Request) -> str | None:
    """Return the path kind of an API request (list, create, get, start, end), or None."""
    segments = _segments(request.path)
    if segments is None or len(segments) < 2 or segments[1] != "session":
        return None
    if len(segments) == 2:
        return {"GET": "list", "POST": "create"}.get(request.method)
    if len(segments) == 3 and request.method == "GET":
        return "get"
    if len(segments) == 4 and request.method == "PUT" and segments[3] in ("start", "end"):
        return segments[3]
    return None


# One return per route keeps the dispatch readable as a table.
def handle(sim: SimState, request: Request) -> Reply:
    """Build the response to one request from the state."""
    if request.is_admin:
        return _handle_admin(sim, request)
    segments = _segments(request.path)
    if segments is None:
        return error_reply(404, f"path not found: the API is under {API_PREFIX}")
    keys = request.query.get("access_key")
    if not sim.key_matches(keys[-1] if keys else None):
        return error_reply(401, "the access_key query parameter is missing or wrong")
    if len(segments) < 2 or segments[1] != "session" or len(segments) > 4:
        return error_reply(404, "no such path")
    if segments[0] != sim.location_id:
        return error_reply(404, "unknown location")
    if len(segments) == 2:
        return _handle_collection(sim, request)
    if len(segments) == 3:
        if request.method != "GET":
            return _method_not_allowed("GET")
        found = sim.session(segments[2])
        return json_reply(200, found) if found else error_reply(404, "unknown session")
    if segments[3] not in ("start", "end"):
        return error_reply(404, "no such path")
    if request.method != "PUT":
        return _method_not_allowed("PUT")
    return _handle_transition(sim, request, segments[2], segments[3])


def _method_not_allowed(allowed: str) -> Reply:
    return error_reply(405, f"use {allowed} on this path", (("Allow", allowed),))


def _handle_collection(sim: SimState, request: Request) -> Reply:
    if request.method == "GET":
        return _list_sessions(sim, request)
    if request.method != "POST":
        return _method_not_allowed("GET, POST")
    try:
        body = _json_object(request.body, required=True)
    except BadRequestError as exc:
        return error_reply(400, str(exc))
    user_id = body.get("user_id")
    code_type = body.get("type", "barcode")
    if not isinstance(user_id, str) or not user_id:
        return error_reply(400, "user_id must be a non-empty string")
    try:
        return json_reply(201, sim.create_session(user_id, code_type))
    except ValueError as exc:
        return error_reply(400, str(exc))


def _list_sessions(sim: SimState, request: Request) -> Reply:
    listing = sim.listing()
    validators = (
        ("ETag", listing.etag),
        ("Last-Modified", format_datetime(listing.last_modified, usegmt=True)),
    )
    if _not_modified(request, listing.etag, listing.last_modified):
        return Reply(304, None, headers=validators)
    return Reply(200, listing.body, headers=validators)


def _not_modified(request: Request, etag: str, last_modified: datetime) -> bool:
    """Evaluate If-None-Match, or If-Modified-Since when it is absent (RFC 9110)."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
        return "*" in tags or etag in tags
    if_modified_since = request.headers.get("if-modified-since")
    if if_modified_since is None:
        return False
    try:
        since = parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError, IndexError):
        return False
    return since.tzinfo is not None and last_modified <= since


def _handle_transition(sim: SimState, request: Request, session_id: str, kind: str) -> Reply:
    try:
        moment, lane = _transition_body(request.body, kind)
    except BadRequestError as exc:
        return error_reply(400, str(exc))
    if kind == "start":
        outcome, session = sim.start(session_id, start_time=moment, lane=lane)
    else:
        outcome, session = sim.end(session_id, end_time=moment, lane=lane)
    if outcome == "not_found":
        return error_reply(404, "unknown session")
    return json_reply(409 if outcome == "conflict" else 200, session)


def _transition_body(raw: bytes, kind: str) -> tuple[datetime | None, str | None]:
    """Parse the optional ``{"<kind>_time": ..., "lane": ...}`` body of start and end."""
    body = _json_object(raw, required=False)
    moment = _timestamp(body.get(f"{kind}_time"), f"{kind}_time")
    lane = body.get("lane")
    if lane is not None and not isinstance(lane, str):
        raise BadRequestError(f"lane must be a string, not {lane!r}")
    return moment, lane


def _json_object(raw: bytes, *, required: bool) -> dict[str, Any]:
    if not raw.strip():
        if required:
            raise BadRequestError("the request body must be a JSON object")
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequestError("the request body must be a JSON object")
    return data


def _timestamp(value: Any, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequestError(f"{name} must be an ISO 8601 string like 2018-04-12T00:14:20.292Z")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequestError(f"{name} {value[:40]!r} is not an ISO 8601 timestamp") from None
    if moment.tzinfo is None:
        raise BadRequestError(f"{name} {value[:40]!r} has no UTC offset: end it with Z")
    return moment


# --- admin -------------------------------------------------------------------


def _handle_admin(sim: SimState, request: Request) -> Reply:
    name = request.path[len(ADMIN_PREFIX) :].strip("/")
    routes = {
        ("faults", "GET"): _get_faults,
        ("faults", "PUT"): _put_faults,
        ("faults", "PATCH"): _put_faults,
        ("reset", "POST"): _reset,
        ("log", "GET"): _get_log,
        ("sessions", "POST"): _create_bulk,
    }
    route = routes.get((name, request.method))
    if route is not None:
        try:
            return route(sim, request)
        except ValueError as exc:
            return error_reply(400, str(exc))
    allowed = [method for (path, method) in routes if path == name]
    if allowed:
        return _method_not_allowed(", ".join(allowed))
    return error_reply(404, "admin path not found: use faults, reset, log or sessions")


def _get_faults(sim: SimState, request: Request) -> Reply:
    return json_reply(200, sim.faults.to_json())


def _put_faults(sim: SimState, request: Request) -> Reply:
    body = _json_object(request.body, required=True)
    if request.method == "PATCH":
        faults = sim.update_faults(**body)
    else:
        faults = Faults.from_mapping(body)
        sim.set_faults(faults)
    return json_reply(200, faults.to_json())


def _reset(sim: SimState, request: Request) -> Reply:
    sim.reset()
    return json_reply(200, {"reset": True})


def _get_log(sim: SimState, request: Request) -> Reply:
    return json_reply(200, {"transitions": sim.transitions(), "conflicts": sim.conflicts()})


def _create_bulk(sim: SimState, request: Request) -> Reply:
    body = _json_object(request.body, required=True)
    count = body.get("count")
    if isinstance(count, bool) or not isinstance(count, int):
        raise BadRequestError(f"count must be an integer, not {count!r}")
    first, last = sim.create_sessions(count, body.get("type", "barcode"))
    return json_reply(201, {"created": count, "first_id": first, "last_id": last})
