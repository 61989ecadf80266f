"""Async client of the Coord Parking Access API, on httpx.

Every request carries the access key in the query string, as the API requires,
so the request URL is a secret. This module never logs a URL, and it translates
every httpx error into a gated ``ApiError`` whose message is built from the
method, the path template and the status only. Those errors are raised outside
the ``except`` block that caught the httpx error, so neither ``__cause__`` nor
``__context__`` links back to an httpx exception that contains the URL.

Each request runs under one overall deadline (``timeout_s``), which covers
connecting, sending and reading the whole body. A timeout is reported as
``ApiUnavailableError``, like a 5xx response or a dropped connection.

Events, all at DEBUG (callers decide what deserves WARNING or INFO):

- ``api.request``: a response arrived. Fields: ``method``, ``path`` (the
  template, never the URL), ``status``, ``elapsed_ms`` and ``session_id``
  when the path has one.
- ``api.request_failed``: no usable response. The same fields, with ``error``
  (the gated error class) instead of ``status``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, quote_plus

import anyio
import httpx

from gated.api.models import Session, format_timestamp, parse_session, parse_session_list
from gated.config import ApiSettings
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
from gated.logs import get_logger, redact, register_secret

# Deadline of one whole request (connect, send, read the body), in seconds,
# unless the caller gives another. A gate that waits longer than this for the
# API is better off deciding from its cache.
DEFAULT_TIMEOUT_S = 5.0

LIST_PATH = "/{location_id}/session"
SESSION_PATH = "/{location_id}/session/{session_id}"
DEFAULT_START_PATH = "/{location_id}/session/{session_id}/start"
DEFAULT_END_PATH = "/{location_id}/session/{session_id}/end"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class SessionListing:
    """Result of ``list_sessions``.

    ``sessions`` is None exactly when ``not_modified`` is true (a 304 response to
    a conditional request), and then the caller's cached copy is still current.
    ``etag`` and ``last_modified`` are the validators to send next time.
    """

    sessions: list[Session] | None
    etag: str | None
    last_modified: str | None
    not_modified: bool


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: httpx.Headers
    content: bytes


class CoordClient:
    """Client of one location of the Coord Parking Access API.

    Use it as an async context manager, or call ``aclose()`` when done. It
    works on asyncio and trio. ``start_path`` and ``end_path`` are templates
    with ``{location_id}`` and ``{session_id}`` placeholders, because the
    operator side of the API is not published and may differ per deployment.
    """

    def __init__(
        self,
        *,
        base_url: str,
        location_id: str,
        access_key: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        start_path: str = DEFAULT_START_PATH,
        end_path: str = DEFAULT_END_PATH,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not location_id:
            raise ValueError("location_id must not be empty")
        if not access_key:
            raise ValueError("access_key must not be empty")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
        # The key is registered in the form it has in a URL too, because httpx
        # logs the encoded URL at DEBUG and redaction matches text exactly.
        for form in {access_key, quote(access_key, safe=""), quote_plus(access_key)}:
            register_secret(form)
        self._access_key = access_key
        self._base_url = base_url.rstrip("/")
        self._location_id = location_id
        self._timeout_s = timeout_s
        self._start_path = start_path
        self._end_path = end_path
        self._log = get_logger("api")
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            # The configuration alone decides where the key goes, so httpx
            # ignores HTTP(S)_PROXY, SSL_CERT_FILE and .netrc from the environment.
            # NOTE: a site that needs a proxy or a private CA cannot use one yet.
            trust_env=False,
            headers={"Accept": "application/json"},
        )

    @classmethod
    def from_config(cls, api: ApiSettings, access_key: str) -> Self:
        """Build a client from the ``[api]`` section and the resolved access key."""
        return cls(
            base_url=api.base_url,
            location_id=api.location_id,
            access_key=access_key,
            timeout_s=api.timeout_s,
            start_path=api.start_path,
            end_path=api.end_path,
        )

    def __repr__(self) -> str:
        return f"CoordClient(base_url={self._base_url!r}, location_id={self._location_id!r})"

    @property
    def location_id(self) -> str:
        return self._location_id

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    # --- operations ----------------------------------------------------------

    async def list_sessions(
        self,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        timeout_s: float | None = None,
    ) -> SessionListing:
        """Fetch every session of the location, ended ones included.

        With ``etag`` or ``last_modified`` from an earlier listing the request is
        conditional, and an unchanged list comes back as ``not_modified``.
        """
        headers: dict[str, str] = {}
        if etag is not None:
            headers["If-None-Match"] = etag
        if last_modified is not None:
            headers["If-Modified-Since"] = last_modified
        response = await self._request(
            "GET", LIST_PATH, headers=headers, timeout_s=timeout_s, accept_304=bool(headers)
        )
        new_etag = response.headers.get("ETag")
        new_last_modified = response.headers.get("Last-Modified")
        if response.status == 304:
            return SessionListing(
                sessions=None,
                etag=new_etag or etag,
                last_modified=new_last_modified or last_modified,
                not_modified=True,
            )
        # A listing of 100,000 sessions takes seconds to decode and parse, so it
        # runs in a worker thread while the lanes go on deciding.
        sessions = await anyio.to_thread.run_sync(
            self._parse_body, "GET", LIST_PATH, response, parse_session_list
        )
        return SessionListing(
            sessions=sessions, etag=new_etag, last_modified=new_last_modified, not_modified=False
        )

    async def get_session(self, session_id: str, *, timeout_s: float | None = None) -> Session:
        """Fetch one session by id."""
        response = await self._request(
            "GET", SESSION_PATH, session_id=session_id, timeout_s=timeout_s
        )
        return self._parse_body("GET", SESSION_PATH, response, parse_session)

    async def start_session(self, session_id: str, *, start_time: datetime, lane: str) -> Session:
        """Mark the session started at ``start_time`` through ``lane``.

        Raises ApiConflictError when the session is already active or ended.
        """
        body = {"start_time": format_timestamp(start_time), "lane": lane}
        response = await self._request("PUT", self._start_path, session_id=session_id, body=body)
        return self._parse_body("PUT", self._start_path, response, parse_session)

    async def end_session(self, session_id: str, *, end_time: datetime, lane: str) -> Session:
        """Mark the session ended at ``end_time`` through ``lane``.

        Raises ApiConflictError when the session is already ended or was never
        started.
        """
        body = {"end_time": format_timestamp(end_time), "lane": lane}
        response = await self._request("PUT", self._end_path, session_id=session_id, body=body)
        return self._parse_body("PUT", self._end_path, response, parse_session)

    async def create_session(self, user_id: str) -> Session:
        """Create a session for ``user_id``. Only the demo and tests call this, not the daemon."""
        response = await self._request("POST", LIST_PATH, body={"user_id": user_id})
        return self._parse_body("POST", LIST_PATH, response, parse_session)

    # --- transport -----------------------------------------------------------

    def _build_path(self, template: str, session_id: str | None) -> str:
        values = {"location_id": quote(self._location_id, safe="")}
        if session_id is not None:
            if not session_id:
                raise ValueError("session_id must not be empty")
            values["session_id"] = quote(session_id, safe="")
        return template.format(**values)

    async def _request(
        self,
        method: str,
        template: str,
        *,
        session_id: str | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        accept_304: bool = False,
    ) -> _Response:
        """Send one request and return the response, or raise the matching ApiError.

        Only 2xx responses (and 304 when ``accept_304``) are returned.
        """
        deadline_s = self._timeout_s if timeout_s is None else timeout_s
        url = self._base_url + self._build_path(template, session_id)
        fields: dict[str, Any] = {"method": method, "path": template}
        if session_id is not None:
            fields["session_id"] = session_id

        started = time.monotonic()
        response, failure = await self._send(
            method=method,
            template=template,
            url=url,
            body=body,
            headers=headers,
            deadline_s=deadline_s,
        )
        fields["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
        if failure is not None:
            self._log.debug("api.request_failed", error=type(failure).__name__, **fields)
            raise failure
        assert response is not None

        self._log.debug("api.request", status=response.status, **fields)
        failure = _status_error(method, template, response, accept_304=accept_304)
        if failure is not None:
            raise failure
        return response

    async def _send(
        self,
        *,
        method: str,
        template: str,
        url: str,
        body: dict[str, Any] | None,
        headers: dict[str, str] | None,
        deadline_s: float,
    ) -> tuple[_Response | None, ApiError | None]:
        """Run the HTTP exchange and return the response or the translated error.

        The error is returned, not raised, so that the caller raises it outside
        this ``except`` block and it carries no httpx exception as context.
        """
        operation = f"{method} {template}"
        try:
            with anyio.fail_after(deadline_s):
                reply = await self._http.request(
                    method,
                    url,
                    params={"access_key": self._access_key},
                    json=body,
                    headers=headers,
                )
            return _Response(reply.status_code, reply.headers, reply.content), None
        except (TimeoutError, httpx.TimeoutException):
            return None, ApiUnavailableError(f"{operation} timed out after {deadline_s:g} s")
        except httpx.TransportError as exc:
            # Connect errors, resets, a connection closed before the response
            # (RemoteProtocolError) and the like: the service is unreachable.
            return None, ApiUnavailableError(f"{operation} failed: {_describe(exc)}")
        except httpx.HTTPError as exc:
            # Decoding errors of the body (a bad Content-Encoding, for example).
            return None, ApiInvalidResponseError(f"{operation} failed: {_describe(exc)}")

    def _parse_body(
        self, method: str, template: str, response: _Response, parse: Callable[[Any], _T]
    ) -> _T:
        operation = f"{method} {template}"
        data = _decode_json(operation, response)
        try:
            return parse(data)
        except ApiInvalidResponseError as exc:
            message = f"{operation} returned an invalid body: {exc}"
        raise ApiInvalidResponseError(message)


def _describe(exc: BaseException) -> str:
    """Return ``Type: message`` of an httpx error, with every registered secret removed."""
    text = str(exc) or "no detail"
    return redact(f"{type(exc).__name__}: {text}")


def _decode_json(operation: str, response: _Response) -> Any:
    content_type = response.headers.get("Content-Type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        received_type = media_type or "none"
        raise ApiInvalidResponseError(
            f"{operation} returned status {response.status} with content type {received_type!r},"
            " expected 'application/json'"
        )
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        pass
    status = response.status
    raise ApiInvalidResponseError(f"{operation} returned status {status} with invalid JSON")


# One return per status family keeps the mapping readable as a table.
def _status_error(
    method: str, template: str, response: _Response, *, accept_304: bool
) -> ApiError | None:
    """Return the ApiError that the status of ``response`` means, or None for success."""
    status = response.status
    operation = f"{method} {template}"
    if 200 <= status < 300 or (status == 304 and accept_304):
        return None
    if status in (401, 403):
        return ApiAuthError(f"{operation} was rejected with status {status}: check the access key")
    if status == 404:
        return ApiNotFoundError(
            f"{operation} returned status 404: the location or session is unknown"
        )
    if status == 409:
        return ApiConflictError(
            f"{operation} returned status 409: the session is already in or past that state",
            _conflict_session(response),
        )
    if status == 429:
        retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
        delay = "not given" if retry_after_s is None else f"{retry_after_s:g} s"
        return ApiRateLimitedError(
            f"{operation} was rate limited with status 429, retry after {delay}", retry_after_s
        )
    if 400 <= status < 500:
        return ApiRejectedError(f"{operation} was rejected with status {status}", status)
    if status >= 500:
        return ApiUnavailableError(f"{operation} failed with status {status}")
    return ApiInvalidResponseError(f"{operation} returned the unexpected status {status}")


def _conflict_session(response: _Response) -> Session | None:
    """Parse the current session that a 409 response carries, or return None."""
    try:
        return parse_session(json.loads(response.content))
    except (ValueError, UnicodeDecodeError, ApiInvalidResponseError):
        return None


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse a ``Retry-After`` header (seconds or an HTTP-date) into seconds from now.

    Returns None when the header is absent or invalid, and 0 for a date in the past.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (moment - reference).total_seconds())
