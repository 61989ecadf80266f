"""In-memory state of the simulated Coord location, safe to use from any thread.

Tests call ``SimState`` from their own thread while the server runs in another,
so every method takes one lock. ``wait_for`` blocks until a predicate on the
state is true, which lets a test wait for an event (a request arrived, a request
is hanging) instead of sleeping.
"""

from __future__ import annotations

import hmac
import itertools
import json
import math
import random
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from gated.api.models import format_timestamp
from gated.sim.faults import Faults

# Barcode alphabet: digits and capitals without I, L, O and U, which people
# misread as 1, 1, 0 and V. It has 32 symbols, so the low 5 bits of a random
# byte pick one without bias.
BARCODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
BARCODE_LENGTH = 10
NUMBER_LENGTH = 6
CODE_TYPES = ("barcode", "number")

# Price charged at the end of a session: per started hour, in US cents.
PRICE_PER_HOUR_MINOR = 300
CURRENCY = "USD"

# Bulk creation is for benchmarks. The cap keeps a typo from exhausting memory.
MAX_BULK_SESSIONS = 1_000_000
# Draws of a fresh random code before giving up because the codes in use
# crowd the code space (only possible for 6-digit numbers).
MAX_CODE_DRAWS = 100

_BYTE_TO_BARCODE_SYMBOL = bytes(ord(BARCODE_ALPHABET[b & 31]) for b in range(256))

TransitionOutcome = Literal["ok", "conflict", "not_found"]


@dataclass(slots=True)
class _SimSession:
    id: int
    user_id: str
    code: str
    code_type: str
    start_time: datetime | None = None
    end_time: datetime | None = None
    cost_minor: int | None = None
    # The JSON encoding, kept until the session changes, so that listing
    # 100,000 sessions re-encodes only the ones that changed.
    encoded: bytes | None = None

    def encode(self) -> bytes:
        if self.encoded is None:
            self.encoded = json.dumps(self.to_json()).encode()
        return self.encoded

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "user_id": self.user_id,
            "start_time": format_timestamp(self.start_time) if self.start_time else None,
            "end_time": format_timestamp(self.end_time) if self.end_time else None,
            "redemption_info": {"type": self.code_type, "code": self.code},
        }
        if self.cost_minor is not None:
            data["billing_info"] = {"cost": {"amount": self.cost_minor, "currency": CURRENCY}}
        return data


@dataclass(frozen=True, slots=True)
class Listing:
    """The session list as sent: the encoded JSON body and its validators."""

    body: bytes
    version: int
    last_modified: datetime

    @property
    def etag(self) -> str:
        return f'"v{self.version}"'


class SimState:
    """Sessions, fault set, transition log and counters of one simulated location."""

    def __init__(
        self,
        location_id: str,
        access_key: str,
        *,
        faults: Faults | None = None,
        seed: int | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not location_id or not access_key:
            raise ValueError("location_id and access_key must not be empty")
        self.location_id = location_id
        self.access_key = access_key
        self._clock = clock or (lambda: datetime.now(UTC))
        self._changed = threading.Condition(threading.RLock())
        # Faults only need a reproducible sequence, not unpredictable numbers.
        self.rng = random.Random(seed)  # noqa: S311
        self._faults = faults or Faults()
        # NOTE: the version survives reset() and only grows, so a client that
        # cached an ETag before a reset never gets a false 304 after it.
        self._version = 0
        self._clear()

    def __repr__(self) -> str:
        return f"SimState(location_id={self.location_id!r})"

    def _clear(self) -> None:
        self._sessions: dict[int, _SimSession] = {}
        self._codes: set[str] = set()
        self._next_id = itertools.count(1)
        self._transitions: list[dict[str, Any]] = []
        self._conflicts: Counter[str] = Counter()
        self._listing: Listing | None = None
        self._last_modified = self._clock().replace(microsecond=0)
        self.requests_seen = 0
        self.hanging = 0

    def _touch(self) -> None:
        """Record a change of the session list. The caller must hold the lock."""
        self._version += 1
        self._listing = None
        self._last_modified = self._clock().replace(microsecond=0)

    def _notify(self) -> None:
        self._changed.notify_all()

    # --- access ---------------------------------------------------------------

    def key_matches(self, key: str | None) -> bool:
        """Tell whether ``key`` is the access key, in constant time."""
        if key is None:
            return False
        return hmac.compare_digest(key.encode(), self.access_key.encode())

    @property
    def faults(self) -> Faults:
        with self._changed:
            return self._faults

    def set_faults(self, faults: Faults) -> None:
        with self._changed:
            self._faults = faults
            self._notify()

    def update_faults(self, **changes: Any) -> Faults:
        """Change the named fault fields and keep the others, or raise ValueError."""
        with self._changed:
            self._faults = Faults.from_mapping(changes, base=self._faults)
            self._notify()
            return self._faults

    def clear_faults(self) -> None:
        self.set_faults(Faults())

    def reset(self) -> None:
        """Forget every session, transition and fault. The ETag still changes."""
        with self._changed:
            self._faults = Faults()
            self._clear()
            self._touch()
            self._notify()

    # --- counters for tests -------------------------------------------------------

    def note_request(self) -> None:
        with self._changed:
            self.requests_seen += 1
            self._notify()

    def note_hang(self, delta: int) -> None:
        with self._changed:
            self.hanging += delta
            self._notify()

    def wait_for(self, predicate: Callable[[SimState], bool], timeout_s: float) -> bool:
        """Block until ``predicate(self)`` is true, or return False after ``timeout_s``."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout_s)

    # --- sessions --------------------------------------------------------------

    def _fresh_code(self, code_type: str) -> str:
        for _ in range(MAX_CODE_DRAWS):
            if code_type == "number":
                code = f"{secrets.randbelow(10**NUMBER_LENGTH):0{NUMBER_LENGTH}d}"
            else:
                raw = secrets.token_bytes(BARCODE_LENGTH)
                code = raw.translate(_BYTE_TO_BARCODE_SYMBOL).decode("ascii")
            if code not in self._codes:
                return code
        raise ValueError(f"no unused {code_type} code left after {MAX_CODE_DRAWS} draws")

    def _add(self, user_id: str, code_type: str, code: str | None = None) -> _SimSession:
        if code is None or code in self._codes:
            code = self._fresh_code(code_type)
        session = _SimSession(
            id=next(self._next_id), user_id=user_id, code=code, code_type=code_type
        )
        self._sessions[session.id] = session
        self._codes.add(code)
        return session

    def create_session(
        self, user_id: str | None = None, code_type: str = "barcode"
    ) -> dict[str, Any]:
        """Create a pending session with a fresh code and return it as JSON data.

        ``code_type`` is ``barcode`` (10 symbols) or ``number`` (6 digits).
        Raises ValueError for another type.
        """
        _check_code_type(code_type)
        with self._changed:
            session = self._add(user_id or str(uuid.uuid4()), code_type)
            self._touch()
            self._notify()
            return session.to_json()

    def create_sessions(self, count: int, code_type: str = "barcode") -> tuple[int, int]:
        """Create ``count`` pending sessions for random users and return the first and last id.

        The user ids are random 128-bit values in UUID layout, without the
        version bits of a real UUID 4.
        """
        _check_code_type(code_type)
        if not 1 <= count <= MAX_BULK_SESSIONS:
            raise ValueError(f"count must be from 1 to {MAX_BULK_SESSIONS}, not {count}")
        # Random bytes are drawn in two big blocks instead of per session,
        # which makes 100,000 sessions several times faster.
        barcodes = secrets.token_bytes(count * BARCODE_LENGTH).translate(_BYTE_TO_BARCODE_SYMBOL)
        users = secrets.token_hex(count * 16)
        with self._changed:
            ids = []
            for index in range(count):
                code = None
                if code_type == "barcode":
                    at = index * BARCODE_LENGTH
                    code = barcodes[at : at + BARCODE_LENGTH].decode("ascii")
                user = users[index * 32 : (index + 1) * 32]
                user_id = f"{user[:8]}-{user[8:12]}-{user[12:16]}-{user[16:20]}-{user[20:]}"
                ids.append(self._add(user_id, code_type, code).id)
            self._touch()
            self._notify()
            return ids[0], ids[-1]

    def session(self, session_id: str) -> dict[str, Any] | None:
        """Return one session as JSON data, or None when the id is unknown."""
        with self._changed:
            found = self._find(session_id)
            return found.to_json() if found else None

    def sessions(self) -> list[dict[str, Any]]:
        with self._changed:
            return [session.to_json() for session in self._sessions.values()]

    def listing(self) -> Listing:
        """Return the encoded session list, encoding it at most once per version."""
        with self._changed:
            if self._listing is None:
                body = b"[" + b",".join(s.encode() for s in self._sessions.values()) + b"]"
                self._listing = Listing(body, self._version, self._last_modified)
            return self._listing

    def _find(self, session_id: str) -> _SimSession | None:
        if not session_id.isdigit():
            return None
        return self._sessions.get(int(session_id))

    def start(
        self, session_id: str, *, start_time: datetime | None, lane: str | None
    ) -> tuple[TransitionOutcome, dict[str, Any] | None]:
        """Start a pending session at ``start_time`` (None: now).

        Returns the outcome and the session after the call. A session that is
        already active or ended is a conflict and stays as it was.
        """
        with self._changed:
            session = self._find(session_id)
            if session is None:
                return "not_found", None
            if session.start_time is not None or session.end_time is not None:
                self._conflicts[str(session.id)] += 1
                self._notify()
                return "conflict", session.to_json()
            session.start_time = start_time or self._clock()
            session.encoded = None
            self._log_transition(session, "start", lane, start_time)
            return "ok", session.to_json()

    def end(
        self, session_id: str, *, end_time: datetime | None, lane: str | None
    ) -> tuple[TransitionOutcome, dict[str, Any] | None]:
        """End an active session at ``end_time`` (None: now) and bill it.

        A pending or ended session is a conflict and stays as it was.
        """
        with self._changed:
            session = self._find(session_id)
            if session is None:
                return "not_found", None
            if session.start_time is None or session.end_time is not None:
                self._conflicts[str(session.id)] += 1
                self._notify()
                return "conflict", session.to_json()
            session.end_time = end_time or self._clock()
            session.cost_minor = _price(session.start_time, session.end_time)
            session.encoded = None
            self._log_transition(session, "end", lane, end_time)
            return "ok", session.to_json()

    def _log_transition(
        self, session: _SimSession, kind: str, lane: str | None, given: datetime | None
    ) -> None:
        self._transitions.append(
            {
                "session_id": str(session.id),
                "kind": kind,
                "lane": lane,
                "time_given": format_timestamp(given) if given else None,
                "recorded_at": format_timestamp(self._clock()),
            }
        )
        self._touch()
        self._notify()

    def transitions(self) -> list[dict[str, Any]]:
        """Return every start and end that succeeded, oldest first."""
        with self._changed:
            return [dict(item) for item in self._transitions]

    def conflicts(self) -> dict[str, int]:
        """Return how many 409 responses each session id got."""
        with self._changed:
            return dict(self._conflicts)


def _check_code_type(code_type: str) -> None:
    if code_type not in CODE_TYPES:
        raise ValueError(f"code type must be one of {', '.join(CODE_TYPES)}, not {code_type!r}")


def _price(start: datetime, end: datetime) -> int:
    """Charge every started hour, and at least one hour when the clocks disagree."""
    hours = math.ceil((end - start).total_seconds() / 3600)
    return max(1, hours) * PRICE_PER_HOUR_MINOR
