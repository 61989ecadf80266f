"""Keep the local session cache reconciled with the API.

Every ``poll_interval_s`` the reconciler lists the location's sessions and
replaces the cache (SQLite, then the in-memory index) in one step. It sends
``If-None-Match``/``If-Modified-Since`` when the API gave an ``ETag`` or
``Last-Modified``, waits at least ``Retry-After`` after a 429, and backs off
exponentially with jitter while the API fails. Lanes call ``lookup`` for a code
the cache does not know, which refreshes at once under a short deadline.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Literal

import anyio
from anyio.abc import TaskStatus

from gated.api.client import CoordClient
from gated.api.models import Session
from gated.backoff import Backoff
from gated.errors import (
    ApiAuthError,
    ApiError,
    ApiNotFoundError,
    ApiRateLimitedError,
    StateError,
)
from gated.health import ApiHealth
from gated.logs import get_logger
from gated.sessions import BuiltIndex, SessionIndex, build_index
from gated.state import AsyncStore

log = get_logger("reconcile")

# After an authorisation failure the key will not fix itself: poll slowly so the
# API is not hammered, but often enough to notice a key fixed on the server side.
AUTH_FAILURE_DELAY_S = 60.0
# While the API is offline, cache misses try a lookup at most this often, in
# seconds; the others are refused at once as api_unavailable.
OFFLINE_LOOKUP_INTERVAL_S = 10.0
# Listings at least this long have their lookup tables built in a worker
# thread, because building them on the event loop would stall the lanes
# (an estimate: about 2 ms per 1,000 sessions on the benchmark machine).
OFFLOAD_SESSIONS = 2_000


def diff_sessions(
    previous: dict[str, Session], sessions: list[Session]
) -> tuple[list[Session], list[str]]:
    """Return the sessions that are new or changed, and the ids that disappeared."""
    upserts = [session for session in sessions if previous.get(session.id) != session]
    current = {session.id for session in sessions}
    deleted = [session_id for session_id in previous if session_id not in current]
    return upserts, deleted


class Reconciler:
    def __init__(
        self,
        *,
        client: CoordClient,
        store: AsyncStore,
        index: SessionIndex,
        health: ApiHealth,
        poll_interval_s: float,
        max_backoff_s: float,
        max_cache_age_s: float,
        offline_policy: Literal["cached", "deny"],
    ) -> None:
        self._client = client
        self._store = store
        self._index = index
        self._health = health
        self._poll_interval_s = poll_interval_s
        self._backoff = Backoff(initial_s=min(1.0, poll_interval_s), max_s=max_backoff_s)
        self._max_cache_age_s = max_cache_age_s
        self._offline_policy = offline_policy
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._not_before_mono = 0.0
        self._last_success_started = float("-inf")
        self._lookup_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._written_requested = float("-inf")
        self._last_offline_lookup = float("-inf")
        # The sessions as last written to SQLite, by id; None forces a full rewrite.
        self._stored: dict[str, Session] | None = None
        # Monotonic request time of the listing the index holds; an older
        # listing that arrives late is not applied over a newer one.
        self._applied_requested = float("-inf")
        self._stale = False
        self.polls = 0

    async def restore(self, cached: list[Session]) -> None:
        """Load the validators saved by the last run and the sessions the cache holds."""
        self._stored = {session.id: session for session in cached}
        meta = await self._store.sync_meta()
        self._etag = meta.etag
        self._last_modified = meta.last_modified

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            delay = await self.poll()
            self.cache_is_stale()
            await anyio.sleep(delay)

    async def poll(self) -> float:
        """Refresh once with the ordinary deadline; return seconds until the next poll."""
        try:
            await self._refresh(timeout_s=None)
        except ApiRateLimitedError as exc:
            wait = max(exc.retry_after_s or 0.0, self._backoff.next_delay())
            log.warning(
                "reconcile.rate_limited", retry_after_s=exc.retry_after_s, wait_s=round(wait, 2)
            )
            return wait
        except ApiAuthError:
            log.error("reconcile.auth_failed", retry_in_s=AUTH_FAILURE_DELAY_S)
            return AUTH_FAILURE_DELAY_S
        except ApiError as exc:
            wait = self._backoff.next_delay()
            log.debug("reconcile.retry", error=str(exc), wait_s=round(wait, 2))
            return wait
        except StateError as exc:
            # The cache could not be written; the index is still updated, so
            # lanes keep deciding. The next poll tries the write again.
            log.error("reconcile.store_failed", error=str(exc))
            return self._poll_interval_s
        self._backoff.reset()
        return self._poll_interval_s

    async def lookup(self, *, timeout_s: float) -> bool:
        """Refresh at once for a cache miss; return False when the API did not respond in time.

        Lookups run one at a time. When a lookup waited for another one whose
        refresh started after this lookup was requested, it reuses that result,
        so several lanes missing at once send one listing.

        NOTE: the API has no lookup by code, so a miss fetches the whole
        listing. At a location whose listing takes longer than the lookup
        deadline to fetch (about 100,000 sessions on the benchmark machine),
        a code created since the last poll is refused as api_unavailable and
        admitted after the next poll.
        """
        requested_at = time.monotonic()
        if requested_at < self._not_before_mono:
            log.debug("reconcile.lookup_skipped", reason="rate_limited")
            return False
        if self._health.online is False:
            # Each lookup against an unreachable API blocks its lane for the
            # whole deadline, and cached codes queue behind it.
            if requested_at - self._last_offline_lookup < OFFLINE_LOOKUP_INTERVAL_S:
                log.debug("reconcile.lookup_skipped", reason="offline")
                return False
            self._last_offline_lookup = requested_at
        with anyio.move_on_after(timeout_s) as scope:
            async with self._lookup_lock:
                if self._last_success_started >= requested_at:
                    return True
                try:
                    await self._refresh(timeout_s=timeout_s)
                except ApiError as exc:
                    log.debug("reconcile.lookup_failed", error=str(exc))
                    return False
                except StateError as exc:
                    log.error("reconcile.store_failed", error=str(exc))
                return True
        if scope.cancelled_caught:
            log.debug("reconcile.lookup_timeout", timeout_s=timeout_s)
        return False

    def cache_is_stale(self) -> bool:
        """Return whether the deny policy applies now; log when that changes."""
        if self._offline_policy != "deny":
            return False
        age = self._index.age_s()
        stale = age is None or age > self._max_cache_age_s
        if stale != self._stale:
            self._stale = stale
            if stale:
                log.warning(
                    "cache.stale",
                    policy="deny",
                    age_s=None if age is None else round(age, 1),
                    max_cache_age_s=self._max_cache_age_s,
                )
            else:
                log.info("cache.fresh", policy="deny", age_s=None if age is None else round(age, 1))
        return stale

    async def _refresh(self, *, timeout_s: float | None) -> None:
        requested = time.monotonic()
        try:
            listing = await self._client.list_sessions(
                etag=self._etag, last_modified=self._last_modified, timeout_s=timeout_s
            )
        except ApiRateLimitedError as exc:
            self._not_before_mono = time.monotonic() + (exc.retry_after_s or 0.0)
            raise
        except ApiAuthError as exc:
            self._health.record_failure(str(exc), auth=True)
            raise
        except ApiError as exc:
            self._health.record_failure(str(exc))
            self._health.location_missing = isinstance(exc, ApiNotFoundError)
            raise

        self._health.record_success()
        self.polls += 1

        built: BuiltIndex | None = None
        sessions = listing.sessions
        if sessions is not None and len(sessions) >= OFFLOAD_SESSIONS:
            built = await anyio.to_thread.run_sync(build_index, sessions)
        if requested < self._applied_requested:
            log.debug("reconcile.outdated_listing_skipped")
            return
        self._applied_requested = requested

        now = datetime.now(UTC)
        if listing.not_modified or sessions is None:
            self._index.mark_synced(requested_mono=requested, synced_wall=now)
            self._last_success_started = max(self._last_success_started, requested)
            await self._store.touch_sync(synced_at=now)
            log.debug("reconcile.not_modified", sessions=len(self._index))
            return

        if built is None:
            self._index.replace(sessions, requested_mono=requested, synced_wall=now)
        else:
            self._index.install(built, requested_mono=requested, synced_wall=now)
        # Set only now: a lookup that reuses this listing must find it installed.
        self._last_success_started = max(self._last_success_started, requested)

        try:
            # Shielded, so a stop right after a poll still leaves its listing
            # on disk for a restart without network. NOTE: a lookup's deadline
            # therefore does not cover this write, usually a few changed rows.
            with anyio.CancelScope(shield=True):
                await self._write_cache(
                    requested, sessions, now, listing.etag, listing.last_modified
                )
        except BaseException:
            # The disk cache is now behind the index. Without validators the
            # next poll fetches a full listing and writes it, where a 304 would
            # only have refreshed the sync time of stale rows.
            self._etag = self._last_modified = None
            raise
        self._etag = listing.etag
        self._last_modified = listing.last_modified
        log.debug(
            "reconcile.replaced",
            sessions=len(sessions),
            elapsed_ms=round((time.monotonic() - requested) * 1000, 1),
        )

    async def _write_cache(
        self,
        requested: float,
        sessions: list[Session],
        synced_at: datetime,
        etag: str | None,
        last_modified: str | None,
    ) -> None:
        """Write the listing to SQLite: only the changes when the last write is known.

        Writes run one at a time, and a listing older than the one already
        written is not written over it.
        """
        async with self._write_lock:
            if requested < self._written_requested:
                return
            previous = self._stored
            self._stored = None  # unknown until this write succeeds
            if previous is None:
                await self._store.replace_sessions(
                    sessions, synced_at=synced_at, etag=etag, last_modified=last_modified
                )
            else:
                upserts, deleted = await anyio.to_thread.run_sync(diff_sessions, previous, sessions)
                await self._store.apply_session_changes(
                    upserts, deleted, synced_at=synced_at, etag=etag, last_modified=last_modified
                )
            self._stored = {session.id: session for session in sessions}
            self._written_requested = requested
