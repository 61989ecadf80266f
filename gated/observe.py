"""Recent decisions and live state of the running daemon, for technicians.

Lanes publish each decision here; ``gated status`` reads a snapshot over the
control socket and ``--follow`` subscribes to the stream of decisions.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

# Decisions kept for `gated status`; older ones are only in the journal and logs.
RECENT_DECISIONS = 50
# Decisions a slow `status --follow` client may lag behind before it is dropped.
SUBSCRIBER_BUFFER = 100


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    at: datetime
    lane: str
    direction: str
    outcome: str
    opens: bool
    session_id: str | None
    code: str | None  # masked to its last 4 characters
    elapsed_ms: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


class Observer:
    def __init__(self) -> None:
        self.recent: collections.deque[DecisionRecord] = collections.deque(maxlen=RECENT_DECISIONS)
        self._subscribers: list[MemoryObjectSendStream[DecisionRecord]] = []
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._listeners: list[Callable[[DecisionRecord], None]] = []

    def add_listener(self, listener: Callable[[DecisionRecord], None]) -> None:
        """Call ``listener`` synchronously for every decision (metrics, the demo)."""
        self._listeners.append(listener)

    def publish(self, record: DecisionRecord) -> None:
        self.recent.append(record)
        self.counts[(record.lane, record.outcome)] += 1
        for listener in self._listeners:
            listener(record)
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(record)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                # A follower that cannot keep up is dropped rather than
                # slowing a lane down, and its stream ends.
                self._subscribers.remove(stream)
                stream.close()

    def subscribe(self) -> ObjectReceiveStream[DecisionRecord]:
        send, receive = anyio.create_memory_object_stream[DecisionRecord](SUBSCRIBER_BUFFER)
        self._subscribers.append(send)
        return receive

    def close(self) -> None:
        for stream in self._subscribers:
            stream.close()
        self._subscribers.clear()


def round_ms(seconds: float) -> float:
    return math.floor(seconds * 10_000 + 0.5) / 10
