"""Durable local state: the session cache and the write-ahead journal of gate events."""

from gated.state.async_store import AsyncStore
from gated.state.records import Backlog, EventKind, EventStatus, GateEvent, SyncMeta
from gated.state.store import DB_NAME, Store

__all__ = [
    "DB_NAME",
    "AsyncStore",
    "Backlog",
    "EventKind",
    "EventStatus",
    "GateEvent",
    "Store",
    "SyncMeta",
]
