"""The session object of the Coord Parking Access API, parsed tolerantly.

Unknown fields are ignored. ``redemption_info`` is accepted as
``{"type": ..., "code": ...}``, with ``barcode``, ``number`` or ``value`` in
place of ``code``, or as a bare string.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gated.errors import ApiInvalidResponseError

_CODE_KEYS = ("code", "barcode", "number", "value")


class SessionState(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Session:
    """One parking session. ``id`` is kept as the text the API sent (int or str)."""

    id: str
    user_id: str | None
    start_time: datetime | None
    end_time: datetime | None
    code: str | None
    code_type: str | None

    @property
    def state(self) -> SessionState:
        if self.end_time is not None:
            return SessionState.ENDED
        if self.start_time is not None:
            return SessionState.ACTIVE
        return SessionState.PENDING


def format_timestamp(moment: datetime) -> str:
    """Format a UTC timestamp as the API does: ``2018-04-12T00:14:20.292Z``."""
    if moment.tzinfo is None:
        raise ValueError("timestamps sent to the API must be timezone-aware")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_timestamp(value: Any, field: str) -> datetime | None:
    """Parse an ISO 8601 timestamp; naive ones are taken as UTC."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiInvalidResponseError(f"session field {field!r} is not a timestamp string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ApiInvalidResponseError(
            f"session field {field!r} is not an ISO 8601 timestamp: {value[:40]!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_redemption(value: Any) -> tuple[str | None, str | None]:
    """Return ``(code, type)`` from any accepted shape of ``redemption_info``."""
    if value is None:
        return None, None
    if isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value).strip()
        return (text or None), None
    if isinstance(value, dict):
        code_type = value.get("type")
        for key in _CODE_KEYS:
            code = value.get(key)
            if isinstance(code, str | int) and not isinstance(code, bool):
                text = str(code).strip()
                if text:
                    return text, code_type if isinstance(code_type, str) else key
        return None, code_type if isinstance(code_type, str) else None
    raise ApiInvalidResponseError(
        "session field 'redemption_info' is neither an object nor a string"
    )


def parse_session(data: Any) -> Session:
    """Build a Session from one decoded JSON object; raise ApiInvalidResponseError."""
    if not isinstance(data, dict):
        raise ApiInvalidResponseError(f"a session must be a JSON object, not {type(data).__name__}")
    raw_id = data.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, int | str) or raw_id == "":
        raise ApiInvalidResponseError("session has no valid 'id'")
    user_id = data.get("user_id")
    code, code_type = parse_redemption(data.get("redemption_info"))
    return Session(
        id=str(raw_id),
        user_id=str(user_id) if user_id is not None else None,
        start_time=parse_timestamp(data.get("start_time"), "start_time"),
        end_time=parse_timestamp(data.get("end_time"), "end_time"),
        code=code,
        code_type=code_type,
    )


def parse_session_list(data: Any) -> list[Session]:
    """Parse the body of ``GET /{location_id}/session``.

    A list is expected; an object with a ``sessions`` or ``data`` list is
    accepted too. One malformed entry fails the whole list, because replacing
    the cache with a partial list would forget sessions.
    """
    if isinstance(data, dict):
        for key in ("sessions", "data", "items"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise ApiInvalidResponseError(
            f"the session list must be a JSON array, not {type(data).__name__}"
        )
    return [parse_session(item) for item in data]
