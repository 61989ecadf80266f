"""The Store for async code: each call runs in a worker thread.

A journal commit waits for fsync, which can take from milliseconds to seconds
on an SD card. In a worker thread it cannot stall the event loop, which serves
every lane. One CapacityLimiter token per store runs the calls one at a time
and leaves anyio's default thread pool to other work.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar

import anyio
import anyio.to_thread

from gated.api.models import Session
from gated.state.records import Backlog, EventKind, GateEvent, SyncMeta
from gated.state.store import Store

T = TypeVar("T")

# Time aclose waits for the last commit and the WAL checkpoint, in seconds.
# Closing only folds the WAL into the file, so after this long the daemon stops
# waiting and exits. SQLite finishes the checkpoint at the next open.
CLOSE_TIMEOUT_S: Final = 10.0


class AsyncStore:
    """Async wrapper of a Store, with the same methods as Store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    async def open(cls, directory: Path) -> AsyncStore:
        """Open the Store in a worker thread, because the integrity check reads the whole file."""
        store = await anyio.to_thread.run_sync(Store.open, directory)
        return cls(store)

    async def _run(self, call: partial[T]) -> T:
        # Cancellation waits for the thread: a commit that has started is
        # finished and its result dropped, so the file and the lock stay sound.
        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def aclose(self) -> None:
        """Close the Store, waiting at most CLOSE_TIMEOUT_S, even when cancelled."""
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await anyio.to_thread.run_sync(
                self.store.close, limiter=self._limiter, abandon_on_cancel=True
            )

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- session cache ---------------------------------------------------------

    async def load_sessions(self) -> list[Session]:
        return await self._run(partial(self.store.load_sessions))

    async def get_session(self, session_id: str) -> Session | None:
        return await self._run(partial(self.store.get_session, session_id))

    async def find_sessions_by_code(self, code: str) -> list[Session]:
        return await self._run(partial(self.store.find_sessions_by_code, code))

    async def replace_sessions(
        self,
        sessions: list[Session],
        *,
        synced_at: datetime,
        etag: str | None,
        last_modified: str | None,
    ) -> None:
        await self._run(
            partial(
                self.store.replace_sessions,
                sessions,
                synced_at=synced_at,
                etag=etag,
                last_modified=last_modified,
            )
        )

    async def apply_session_changes(
        self,
        upserts: list[Session],
        deleted_ids: list[str],
        *,
        synced_at: datetime,
        etag: str | None,
        last_modified: str | None,
    ) -> None:
        await self._run(
            partial(
                self.store.apply_session_changes,
                upserts,
                deleted_ids,
                synced_at=synced_at,
                etag=etag,
                last_modified=last_modified,
            )
        )

    async def touch_sync(self, *, synced_at: datetime) -> None:
        await self._run(partial(self.store.touch_sync, synced_at=synced_at))

    async def upsert_session(self, session: Session) -> None:
        await self._run(partial(self.store.upsert_session, session))

    async def sync_meta(self) -> SyncMeta:
        return await self._run(partial(self.store.sync_meta))

    # --- journal ---------------------------------------------------------------

    async def append_event(
        self,
        *,
        session_id: str,
        lane: str,
        kind: EventKind,
        occurred_at: datetime,
        code_masked: str | None,
    ) -> GateEvent:
        return await self._run(
            partial(
                self.store.append_event,
                session_id=session_id,
                lane=lane,
                kind=kind,
                occurred_at=occurred_at,
                code_masked=code_masked,
            )
        )

    async def pending_events(self, limit: int = 100) -> list[GateEvent]:
        return await self._run(partial(self.store.pending_events, limit))

    async def mark_delivered(self, event_id: str, *, delivered_at: datetime) -> None:
        await self._run(partial(self.store.mark_delivered, event_id, delivered_at=delivered_at))

    async def mark_poison(self, event_id: str, *, reason: str) -> None:
        await self._run(partial(self.store.mark_poison, event_id, reason=reason))

    async def record_failure(self, event_id: str, *, error: str) -> None:
        await self._run(partial(self.store.record_failure, event_id, error=error))

    async def backlog(self) -> Backlog:
        return await self._run(partial(self.store.backlog))

    async def events(self, *, status: str | None = None, limit: int = 1000) -> list[GateEvent]:
        return await self._run(partial(self.store.events, status=status, limit=limit))

    async def prune_delivered(self, *, before: datetime) -> int:
        return await self._run(partial(self.store.prune_delivered, before=before))
