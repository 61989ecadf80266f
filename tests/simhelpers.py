"""A running API simulator for tests: ``running_simulator()`` and the ``simulator`` fixture.

The simulator runs in its own thread with its own event loop, so a test's
event loop, a blocked daemon or a subprocess cannot stall it. Import the
fixture into a test module with ``from tests.simhelpers import simulator``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from gated.sim import API_PREFIX, Faults, SimState, serve

# How long wait_for blocks by default, in seconds. Generous because the
# machine running the tests may be loaded. A passing test never waits it out.
DEFAULT_WAIT_S = 10.0


@dataclass(frozen=True)
class SimulatorHandle:
    """Handle of a running simulator. Every method is safe to call from any thread."""

    state: SimState
    port: int

    @property
    def location_id(self) -> str:
        return self.state.location_id

    @property
    def access_key(self) -> str:
        return self.state.access_key

    @property
    def root_url(self) -> str:
        """Return the URL of the server root, where the ``/_sim/`` admin paths live."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + API_PREFIX

    def create_session(
        self, user_id: str | None = None, code_type: str = "barcode"
    ) -> dict[str, Any]:
        return self.state.create_session(user_id, code_type)

    def set_faults(self, **changes: Any) -> Faults:
        """Change the named fault fields, keeping the others (see ``Faults``)."""
        return self.state.update_faults(**changes)

    def clear_faults(self) -> None:
        self.state.clear_faults()

    def transitions(self) -> list[dict[str, Any]]:
        return self.state.transitions()

    def conflicts(self) -> dict[str, int]:
        return self.state.conflicts()

    def sessions(self) -> list[dict[str, Any]]:
        return self.state.sessions()

    def session(self, session_id: str) -> dict[str, Any] | None:
        return self.state.session(session_id)

    def wait_for(
        self, predicate: Callable[[SimState], bool], timeout_s: float = DEFAULT_WAIT_S
    ) -> None:
        """Block until ``predicate(state)`` is true, or fail the test after ``timeout_s``."""
        if not self.state.wait_for(predicate, timeout_s):
            pytest.fail(f"the simulator state did not reach the condition within {timeout_s} s")


@contextmanager
def running_simulator(
    location_id: str = "demo",
    access_key: str | None = None,
    *,
    backend: str = "asyncio",
    faults: Faults | None = None,
) -> Iterator[SimulatorHandle]:
    """Run a simulator on 127.0.0.1 on a free port for the duration of the block.

    Without ``access_key`` a random one is made, so that a test can search
    logs for it without false matches. A crash of the server is raised when
    the block exits.
    """
    key = access_key or f"sim-key-{secrets.token_hex(8)}"
    state = SimState(location_id, key, faults=faults)
    with start_blocking_portal(backend) as portal:
        future, port = portal.start_task(serve, state, "127.0.0.1", 0)
        try:
            yield SimulatorHandle(state, port)
        finally:
            future.cancel()
    if not future.cancelled() and future.exception() is not None:
        raise RuntimeError("the simulator crashed") from future.exception()


@pytest.fixture
def simulator() -> Iterator[SimulatorHandle]:
    with running_simulator() as handle:
        yield handle
