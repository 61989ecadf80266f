"""One reconcile poll in a fresh process, for the reconcile benchmark.

Run as ``python reconcile_child.py BASE_URL LOCATION_ID STATE_DIR`` with the
access key in the GATED_BENCH_ACCESS_KEY environment variable, so it never
shows in a process listing. It builds a CoordClient, an AsyncStore in
STATE_DIR, a SessionIndex and a Reconciler, runs ``poll()`` once and prints
one JSON object: wall time, the time of each step, and the peak RSS before
and after the poll. A separate process keeps the RSS free of the simulator
and of pytest.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from gated.api.client import CoordClient
from gated.health import ApiHealth
from gated.logs import configure_logging
from gated.reconcile import Reconciler
from gated.sessions import SessionIndex
from gated.state import DB_NAME, AsyncStore

# Deadline of the listing request, in seconds. A listing of 100,000 sessions
# is about 17 MB of JSON, which the daemon's usual 5 s could cut short on a
# loaded machine. The benchmark measures the poll, not the deadline.
LISTING_TIMEOUT_S = 120.0


def peak_rss_kib() -> int:
    """Return this program's peak resident set size, in KiB, from VmHWM in /proc/self/status.

    VmHWM belongs to the address space that exec created. ru_maxrss does not
    suit here: Linux carries the peak of the address space that exec replaced
    into it, so a child of a large pytest process starts with pytest's peak.
    """
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line")


def ru_maxrss_kib() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def timed_async(
    steps: dict[str, float], name: str, call: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await call(*args, **kwargs)
        finally:
            steps[name] = steps.get(name, 0.0) + time.perf_counter() - started

    return wrapper


def timed_sync(steps: dict[str, float], name: str, call: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            steps[name] = steps.get(name, 0.0) + time.perf_counter() - started

    return wrapper


async def poll_once(
    base_url: str, location_id: str, access_key: str, state_dir: Path
) -> dict[str, Any]:
    rss_start = peak_rss_kib()
    ru_maxrss_start = ru_maxrss_kib()
    steps: dict[str, float] = {}
    store = await AsyncStore.open(state_dir)
    index = SessionIndex()
    async with CoordClient(
        base_url=base_url,
        location_id=location_id,
        access_key=access_key,
        timeout_s=LISTING_TIMEOUT_S,
    ) as client:
        reconciler = Reconciler(
            client=client,
            store=store,
            index=index,
            health=ApiHealth(),
            poll_interval_s=5.0,
            max_backoff_s=30.0,
            max_cache_age_s=24 * 3600.0,
            offline_policy="cached",
        )
        # The steps are timed by wrapping the instances' methods, so the
        # Reconciler runs unchanged.
        client.list_sessions = timed_async(steps, "list_sessions_s", client.list_sessions)  # type: ignore[method-assign]
        store.replace_sessions = timed_async(steps, "sqlite_replace_s", store.replace_sessions)  # type: ignore[method-assign]
        index.replace = timed_sync(steps, "index_replace_s", index.replace)  # type: ignore[method-assign]

        rss_before = peak_rss_kib()
        started = time.perf_counter()
        await reconciler.poll()
        wall_s = time.perf_counter() - started
        rss_after = peak_rss_kib()
        indexed = len(index)
        polls = reconciler.polls
    await store.aclose()

    with sqlite3.connect(state_dir / DB_NAME) as conn:
        stored = conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
    conn.close()
    return {
        "wall_s": round(wall_s, 4),
        **{name: round(value, 4) for name, value in steps.items()},
        "successful_polls": polls,
        "sessions_indexed": indexed,
        "sessions_stored": stored,
        "peak_rss_start_kib": rss_start,
        "peak_rss_before_kib": rss_before,
        "peak_rss_after_kib": rss_after,
        "peak_rss_increase_kib": rss_after - rss_before,
        "ru_maxrss_start_kib": ru_maxrss_start,
        "ru_maxrss_after_kib": ru_maxrss_kib(),
    }


def main() -> int:
    base_url, location_id, state_dir = sys.argv[1:4]
    access_key = os.environ["GATED_BENCH_ACCESS_KEY"]
    configure_logging("WARNING", json=True, stream=sys.stderr)
    result = anyio.run(poll_once, base_url, location_id, access_key, Path(state_dir))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
