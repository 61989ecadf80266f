"""The daemon: wire the lanes, the reconciler and the delivery loop, and run them.

Start order matters for safety. Every relay is opened and switched off first,
before anything touches the disk or waits on the network. Then the local state
is opened, so that lanes can decide offline from the first scan. Readiness is
reported to systemd once the lanes run, never waiting for the API. At stop the
relays are switched off again inside a shielded scope with its own deadline.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from gated.api.client import CoordClient
from gated.api.models import Session
from gated.config import GatedConfig, access_key
from gated.control import control_socket_path, serve_control
from gated.delivery import Delivery
from gated.devices.relay import Relay, make_relay
from gated.devices.scanner import Scanner, ScannerState
from gated.errors import StateError
from gated.health import ApiHealth
from gated.lane import Lane
from gated.logs import get_logger
from gated.metrics import Metrics, create_metrics
from gated.observe import Observer
from gated.reconcile import Reconciler
from gated.sessions import LocalEvent, SessionIndex
from gated.state import AsyncStore, Backlog, Store
from gated.systemd.notify import Notifier
from gated.systemd.watchdog import run_watchdog

log = get_logger("daemon")

# Deadline for switching every relay off and closing devices at stop, in
# seconds. systemd's TimeoutStopSec is longer, so a stuck device cannot turn
# a clean stop into a SIGKILL.
SHUTDOWN_TIMEOUT_S = 3.0
# How often the status line (systemd STATUS=, metrics) is refreshed, in seconds.
STATUS_INTERVAL_S = 2.0
# Delivered events read at start to cover a disk cache older than them, and
# the clock margin when comparing their delivery time with the last sync.
RECENT_DELIVERED_EVENTS = 10_000
SYNC_MARGIN = timedelta(seconds=60)
# How often delivered journal events older than [state] retention_days are
# deleted, in seconds; pending and poison events are never pruned.
PRUNE_INTERVAL_S = 3600.0
# A loop iteration that overshoots its sleep by more than this is a blocked
# event loop, and the watchdog ping is withheld so systemd restarts the daemon.
MAX_LOOP_LAG_S = 2.0


@dataclass
class DaemonState:
    """Live parts of a running daemon, for status reporting and tests."""

    config: GatedConfig
    index: SessionIndex
    health: ApiHealth
    observer: Observer
    store: AsyncStore
    lanes: list[Lane] = field(default_factory=list)
    started_wall: datetime = field(default_factory=lambda: datetime.now(UTC))
    backlog: Backlog = field(default_factory=lambda: Backlog(0, None, 0))

    def status_line(self) -> str:
        """Return the one-line summary that systemd shows in ``systemctl status``."""
        if self.health.online is None:
            link = "connecting"
        else:
            link = "online" if self.health.online else "offline"
        lanes = " ".join(f"{lane.name}={lane.scanner.state.value}" for lane in self.lanes)
        return (
            f"{link}; {len(self.index)} sessions cached;"
            f" backlog {self.backlog.pending} (poison {self.backlog.poison}); {lanes}"
        )

    def snapshot(self) -> dict[str, Any]:
        """Return the state shown by ``gated status``, as JSON-ready data."""
        age = self.index.age_s()
        return {
            "started_at": self.started_wall.isoformat(),
            "api": {
                "online": self.health.online,
                "since": self.health.since_wall.isoformat(),
                "last_error": self.health.last_error,
                "auth_failed": self.health.auth_failed,
            },
            "cache": {
                "sessions": len(self.index),
                "synced_at": self.index.synced_wall.isoformat() if self.index.synced_wall else None,
                "age_s": None if age is None else round(age, 1),
            },
            "journal": {
                "pending": self.backlog.pending,
                "oldest_pending_at": (
                    self.backlog.oldest_pending_at.isoformat()
                    if self.backlog.oldest_pending_at
                    else None
                ),
                "poison": self.backlog.poison,
            },
            "lanes": [
                {
                    "name": lane.name,
                    "direction": lane.direction.value,
                    "scanner": lane.scanner.state.value,
                    "scanner_reconnects": lane.scanner.reconnects,
                    "relay_available": lane.relay.available,
                }
                for lane in self.lanes
            ],
            "recent_decisions": [record.to_json() for record in self.observer.recent],
        }


async def open_relays(config: GatedConfig) -> list[Relay]:
    """Open every relay and switch it off; on failure close the ones opened and re-raise."""
    relays: list[Relay] = []
    try:
        for lane in config.lanes:
            relay = make_relay(lane.name, lane.relay)
            # A driver whose open() fails cleans up after itself, so only the
            # relays opened before it are closed here.
            await relay.open()
            relays.append(relay)
    except BaseException:
        await close_relays(relays)
        raise
    return relays


async def close_relays(relays: list[Relay]) -> None:
    """Switch every relay off and close it, shielded and under SHUTDOWN_TIMEOUT_S."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_TIMEOUT_S) as scope:
        for relay in relays:
            await relay.aclose()
    if scope.cancelled_caught:
        log.error("daemon.relay_close_timeout", timeout_s=SHUTDOWN_TIMEOUT_S)


async def run_daemon(
    config: GatedConfig,
    *,
    observer: Observer | None = None,
    notifier: Notifier | None = None,
    handle_signals: bool = True,
    extra_task: Callable[[DaemonState, TaskGroup], Awaitable[None]] | None = None,
    task_status: TaskStatus[DaemonState] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT (or cancellation); return normally on a clean stop."""
    started = time.monotonic()
    notifier = notifier or Notifier()
    observer = observer or Observer()
    log.info("daemon.starting", lanes=[lane.name for lane in config.lanes])

    relays = await open_relays(config)
    try:
        await _run_with_relays(
            config, relays, observer, notifier, handle_signals, extra_task, started, task_status
        )
    finally:
        notifier.stopping()
        await close_relays(relays)
        observer.close()
        log.info("daemon.stopped", uptime_s=round(time.monotonic() - started, 1))


async def _run_with_relays(
    config: GatedConfig,
    relays: list[Relay],
    observer: Observer,
    notifier: Notifier,
    handle_signals: bool,
    extra_task: Callable[[DaemonState, TaskGroup], Awaitable[None]] | None,
    started: float,
    task_status: TaskStatus[DaemonState],
) -> None:
    store = AsyncStore(await anyio.to_thread.run_sync(Store.open, config.state.directory))
    metrics: Metrics | None = None
    try:
        metrics = create_metrics(config.metrics.listen)
        index = SessionIndex()
        cached = await _load_index(store, index)
        health = ApiHealth(on_failure=metrics.api_error)
        async with CoordClient.from_config(config.api, access_key(config)) as client:
            reconciler = Reconciler(
                client=client,
                store=store,
                index=index,
                health=health,
                poll_interval_s=config.api.poll_interval_s,
                max_backoff_s=config.api.max_backoff_s,
                max_cache_age_s=config.gate.max_cache_age_s,
                offline_policy=config.gate.offline_policy,
            )
            await reconciler.restore(cached)
            delivery = Delivery(
                client=client,
                store=store,
                index=index,
                health=health,
                max_backoff_s=config.api.max_backoff_s,
            )
            state = DaemonState(config, index, health, observer, store)
            observer.add_listener(
                lambda record: metrics.decision(
                    record.lane, record.outcome, record.elapsed_ms / 1000
                )
            )
            async with anyio.create_task_group() as tg:
                if handle_signals:
                    tg.start_soon(_stop_on_signal, tg, notifier)
                for lane_settings, relay in zip(config.lanes, relays, strict=True):
                    scanner = Scanner(
                        lane_settings.name,
                        lane_settings.scanner,
                        on_state_change=_count_reconnects(lane_settings.name, metrics),
                    )
                    lane = Lane(
                        lane_settings,
                        config.gate,
                        scanner=scanner,
                        relay=relay,
                        index=index,
                        store=store,
                        reconciler=reconciler,
                        delivery=delivery,
                        observer=observer,
                        lookup_timeout_s=config.api.lookup_timeout_s,
                    )
                    state.lanes.append(lane)
                    await tg.start(lane.run)
                await tg.start(delivery.run)
                await tg.start(reconciler.run)
                await tg.start(serve_control, state, control_socket_path(config))
                tg.start_soon(_report_status, state, notifier, metrics)
                tg.start_soon(_prune_journal, store, config.state.retention_days)
                interval = notifier.watchdog_interval_s()
                if interval is not None:
                    tg.start_soon(
                        lambda: run_watchdog(
                            notifier, interval_s=interval / 2, max_lag_s=MAX_LOOP_LAG_S
                        )
                    )
                if extra_task is not None:
                    await extra_task(state, tg)
                notifier.ready()
                log.info(
                    "daemon.ready",
                    lanes=len(state.lanes),
                    sessions_cached=len(index),
                    startup_ms=round((time.monotonic() - started) * 1000, 1),
                )
                task_status.started(state)
    finally:
        with anyio.CancelScope(shield=True):
            if metrics is not None:
                await metrics.aclose()
            await store.aclose()


def _count_reconnects(lane: str, metrics: Metrics) -> Callable[[ScannerState], None]:
    connected_before = False

    def on_state_change(state: ScannerState) -> None:
        nonlocal connected_before
        if state is ScannerState.CONNECTED:
            if connected_before:
                metrics.scanner_reconnect(lane)
            connected_before = True

    return on_state_change


async def _load_index(store: AsyncStore, index: SessionIndex) -> list[Session]:
    """Fill the index from the disk cache and the journal; return the cached sessions."""
    sessions = await store.load_sessions()
    meta = await store.sync_meta()
    pending = await store.pending_events(limit=1_000_000)

    # Events delivered after the cache was last written are not in it, because
    # the daemon stopped before the next poll or a power cut lost the write.
    # They go on top as well. Without them, a restart while the API is
    # unreachable would find the session in its old state and open again.
    delivered = [
        event
        for event in await store.events(status="delivered", limit=RECENT_DELIVERED_EVENTS)
        if meta.synced_at is None
        or event.delivered_at is None
        or event.delivered_at >= meta.synced_at - SYNC_MARGIN
    ]
    now_mono = time.monotonic()
    # Oldest first, so that each session's events apply in the order they happened.
    overlay = [
        LocalEvent(e.event_id, e.session_id, e.kind, e.occurred_at, delivered_mono=now_mono)
        for e in delivered
    ]
    overlay += [LocalEvent(e.event_id, e.session_id, e.kind, e.occurred_at) for e in pending]

    age = None
    if meta.synced_at is not None:
        age = (datetime.now(UTC) - meta.synced_at).total_seconds()
        if age < 0:
            # The clock went back since the last sync (a board without a
            # battery-backed clock): the age is unknown, so treat it as stale.
            log.warning("cache.clock_behind", synced_at=meta.synced_at.isoformat())
            age = None

    index.load(sessions, overlay, synced_wall=meta.synced_at, age_s=age)
    log.info(
        "cache.loaded",
        sessions=len(index),
        pending_events=len(pending),
        recently_delivered_events=len(delivered),
        synced_at=meta.synced_at.isoformat() if meta.synced_at else None,
    )
    return sessions


async def _report_status(state: DaemonState, notifier: Notifier, metrics: Metrics) -> None:
    last = ""
    while True:
        try:
            state.backlog = await state.store.backlog()
        except StateError as exc:
            log.error("daemon.status_failed", error=str(exc))
        metrics.set_backlog(state.backlog.pending)
        metrics.set_sessions_cached(len(state.index))
        metrics.set_online(bool(state.health.online))
        line = state.status_line()
        if line != last:
            notifier.status(line)
            last = line
        await anyio.sleep(STATUS_INTERVAL_S)


async def _prune_journal(store: AsyncStore, retention_days: float) -> None:
    while True:
        before = datetime.now(UTC) - timedelta(days=retention_days)
        try:
            pruned = await store.prune_delivered(before=before)
        except StateError as exc:
            log.error("journal.prune_failed", error=str(exc))
        else:
            if pruned:
                log.info("journal.pruned", events=pruned, before=before.isoformat())
        await anyio.sleep(PRUNE_INTERVAL_S)


async def _stop_on_signal(tg: TaskGroup, notifier: Notifier) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("daemon.stopping", signal=signal.Signals(signum).name)
            notifier.stopping()
            tg.cancel_scope.cancel()
            return
