"""Command line: ``gated run | check-config | sim | demo | diag | status | journal``.

Exit statuses follow sysexits: 0 success, 64 usage error, 69 a device needed at
start is unavailable, 78 invalid configuration (the unit file stops systemd from
restarting on it, because a restart cannot fix a config file), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import anyio

from gated import __version__
from gated.config import DEFAULT_CONFIG_PATH, GatedConfig, load_config
from gated.errors import ConfigError, DeviceError, StateError
from gated.logs import configure_logging, get_logger, register_secret

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 64
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"TOML config file (default: {DEFAULT_CONFIG_PATH})",
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gated", description="Gate controller daemon for parking facilities.")
    parser.add_argument("--version", action="version", version=f"gated {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon until SIGTERM or SIGINT")
    _config_argument(run)

    check = commands.add_parser(
        "check-config", help="validate a config file without opening any device or connection"
    )
    _config_argument(check)

    commands.add_parser(
        "sim", help="serve a simulator of the Coord Parking Access API", add_help=False
    )

    demo = commands.add_parser(
        "demo", help="run a scripted two-lane demo on a simulator and pseudo-terminals"
    )
    demo.add_argument(
        "--interactive", action="store_true", help="type codes yourself instead of the script"
    )
    demo.add_argument(
        "--print-config", action="store_true", help="print the demo's config file and exit"
    )

    diag = commands.add_parser("diag", help="check config, state, API and devices, for technicians")
    _config_argument(diag)
    diag.add_argument("--json", action="store_true", help="print the report as JSON")
    diag.add_argument(
        "--scan", action="store_true", help="wait for a scan on each lane and show its raw bytes"
    )
    diag.add_argument("--pulse", metavar="LANE", help="pulse the relay of LANE after confirmation")
    diag.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation before --pulse"
    )

    journal = commands.add_parser(
        "journal", help="list undelivered gate events, or requeue a poison event"
    )
    _config_argument(journal)
    journal.add_argument(
        "--requeue", metavar="EVENT_ID", help="put this poison event back in the delivery queue"
    )

    status = commands.add_parser("status", help="show the running daemon's state")
    _config_argument(status)
    status.add_argument("--follow", action="store_true", help="stream decisions as they happen")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["sim"]:
        from gated.sim.cli import main as sim_main  # noqa: PLC0415 - optional extra

        return sim_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "run":
        return _run(args.config)
    if args.command == "demo":
        from gated.demo import main as demo_main  # noqa: PLC0415 - keeps `run` lean

        return demo_main(interactive=args.interactive, print_config=args.print_config)
    if args.command == "diag":
        from gated.diag import main as diag_main  # noqa: PLC0415

        return diag_main(args)
    if args.command == "journal":
        from gated.journal_cli import main as journal_main  # noqa: PLC0415

        return journal_main(args)
    if args.command == "status":
        from gated.status import main as status_main  # noqa: PLC0415

        return status_main(args)
    return EXIT_USAGE


def load_or_report(path: Path, *, require_access_key: bool = True) -> GatedConfig | None:
    """Load the config, or print one line per problem to stderr and return None."""
    try:
        config = load_config(path, require_access_key=require_access_key)
    except ConfigError as exc:
        print(f"gated: invalid configuration in {path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None
    if config.api.access_key is not None:
        register_secret(config.api.access_key.get_secret_value())
    return config


def _check_config(path: Path) -> int:
    config = load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    lanes = ", ".join(f"{lane.name} ({lane.direction})" for lane in config.lanes)
    print(f"{path}: valid; lanes: {lanes}")
    return EXIT_OK


def _run(path: Path) -> int:
    config = load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    configure_logging(config.logging.level, json=config.logging.json_lines)
    log = get_logger("daemon")
    from gated.daemon import run_daemon  # noqa: PLC0415 - imports the device stack

    try:
        anyio.run(lambda: run_daemon(config))
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("daemon.config_invalid", problem=problem)
        return EXIT_CONFIG
    except DeviceError as exc:
        log.error("daemon.device_unavailable", error=str(exc))
        return EXIT_UNAVAILABLE
    except StateError as exc:
        log.error("daemon.state_unavailable", error=str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK
