"""Simulator of the Coord Parking Access API, for tests, demos and benchmarks.

``SimState`` keeps one location in memory, and ``serve`` serves it over
HTTP/1.1 on a TCP port. ``gated.sim.cli.main`` is the ``gated sim`` command.
"""

from gated.sim.app import ADMIN_PREFIX, API_PREFIX
from gated.sim.faults import PATH_KINDS, Faults
from gated.sim.server import serve
from gated.sim.state import SimState

__all__ = ["ADMIN_PREFIX", "API_PREFIX", "PATH_KINDS", "Faults", "SimState", "serve"]
