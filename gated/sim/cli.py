"""The ``gated sim`` command: run the API simulator until SIGINT or SIGTERM.

On start it prints one line to stdout, the base URL of the API, so a script can
read it when ``--port 0`` picked a free port. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import anyio

from gated.logs import configure_logging, get_logger, register_secret
from gated.sim.app import API_PREFIX
from gated.sim.faults import PATH_KINDS, Faults
from gated.sim.server import serve
from gated.sim.state import MAX_BULK_SESSIONS, SimState

ACCESS_KEY_ENV = "GATED_SIM_ACCESS_KEY"

# Exit statuses: 0 after a clean stop by signal, 2 for invalid arguments
# (as argparse does), 1 when the port cannot be bound.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gated sim",
        description="Serve a simulated Coord Parking Access API for tests and demos.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="TCP port, 0 for a free one (default: %(default)s)"
    )
    parser.add_argument("--location-id", default="demo", help="location id (default: %(default)s)")
    parser.add_argument(
        "--access-key",
        help=f"access key that clients must send (default: the {ACCESS_KEY_ENV} variable)",
    )
    parser.add_argument(
        "--sessions", type=int, default=0, help="pending sessions to create at start"
    )
    parser.add_argument(
        "--seed", type=int, help="seed of the error_rate draws, for repeatable runs"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])

    faults = parser.add_argument_group("faults (also settable at run time via PUT /_sim/faults)")
    faults.add_argument("--latency-ms", type=int, help="delay every response by this many ms")
    faults.add_argument("--error-status", type=int, help="respond with this HTTP status (400-599)")
    faults.add_argument(
        "--error-rate", type=float, help="share of requests, 0 to 1, that get --error-status"
    )
    faults.add_argument(
        "--rate-limit-s", type=int, help="respond 429 with Retry-After set to this many seconds"
    )
    faults.add_argument("--hang", action="store_true", help="read requests and never respond")
    faults.add_argument(
        "--drop", action="store_true", help="close the connection without a response"
    )
    faults.add_argument(
        "--garbage", action="store_true", help="respond 200 with a body that is not JSON"
    )
    faults.add_argument(
        "--wrong-content-type", action="store_true", help="respond with JSON labelled text/html"
    )
    faults.add_argument(
        "--fault-path-kind",
        default="any",
        help=f"limit faults to these request kinds: any, or a comma list of {','.join(PATH_KINDS)}",
    )
    return parser


def faults_from_args(args: argparse.Namespace) -> Faults:
    """Build the start-up fault set from the parsed flags, or raise ValueError."""
    data: dict[str, Any] = {"path_kind": args.fault_path_kind}
    for name in ("latency_ms", "error_status", "error_rate", "rate_limit_s"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    for name in ("hang", "drop", "garbage", "wrong_content_type"):
        if getattr(args, name):
            data[name] = True
    return Faults.from_mapping(data)


def main(argv: list[str]) -> int:
    """Run ``gated sim`` with the arguments after ``sim`` and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    access_key = args.access_key or os.environ.get(ACCESS_KEY_ENV)
    if not access_key:
        parser.print_usage(sys.stderr)
        print(f"gated sim: give --access-key or set {ACCESS_KEY_ENV}", file=sys.stderr)
        return EXIT_USAGE
    try:
        _check_ranges(args)
        faults = faults_from_args(args)
    except ValueError as exc:
        print(f"gated sim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    register_secret(access_key)
    configure_logging(args.log_level, stream=sys.stderr)

    sim = SimState(args.location_id, access_key, faults=faults, seed=args.seed)
    if args.sessions:
        sim.create_sessions(args.sessions)
    status: int = anyio.run(_run, sim, args.host, args.port, backend=args.backend)
    return status


def _check_ranges(args: argparse.Namespace) -> None:
    if not 0 <= args.sessions <= MAX_BULK_SESSIONS:
        raise ValueError(f"--sessions must be from 0 to {MAX_BULK_SESSIONS}, not {args.sessions}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, not {args.port}")


async def _run(sim: SimState, host: str, port: int) -> int:
    log = get_logger("sim")
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as group:
            bind_error: OSError | None = None
            try:
                bound_port = await group.start(serve, sim, host, port)
            except OSError as exc:
                bind_error = exc
            if bind_error is not None:
                log.error("sim.bind_failed", host=host, port=port, error=str(bind_error))
                return EXIT_FAILED
            url_host = f"[{host}]" if ":" in host else host
            print(f"http://{url_host}:{bound_port}{API_PREFIX}", flush=True)
            async for signum in signals:
                log.info("sim.stopping", signal=signal.Signals(signum).name)
                break
            group.cancel_scope.cancel()
    return EXIT_OK
