"""Logging setup: structlog events with stable names and no secrets.

Log-level policy, followed by every module:

- INFO: state changes (device connected, API online/offline, daemon started or
  stopped), with how long the previous state lasted, and every gate decision.
- WARNING: the first failure of a kind (API unreachable, device lost).
- DEBUG: retries and repeats of a failure already reported, raw scanner bytes.
- ERROR: a failure that loses function (poison journal event, relay write failed),
  with the traceback when it was unexpected.

Event names are dotted and stable (``lane.decision``, ``scanner.opened``,
``journal.delivered``) so that tests and log pipelines can match on them.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(secret: str) -> None:
    """Add a value that must never appear in any log line (the API access key)."""
    if secret:
        with _secrets_lock:
            _secrets.add(secret)


def clear_secrets() -> None:
    """Forget every registered secret (for tests that build clients with throwaway keys)."""
    with _secrets_lock:
        _secrets.clear()


def redact(text: str) -> str:
    """Return text with every registered secret replaced by ``[REDACTED]``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def mask_code(code: str | None) -> str | None:
    """Mask a redemption code to its last 4 characters: ``Q7K2M9XD4T`` -> ``******XD4T``.

    Codes of 4 characters or fewer are masked whole, because their last 4
    characters would be the code itself.
    """
    if code is None:
        return None
    if len(code) <= 4:
        return "*" * len(code)
    return "*" * (len(code) - 4) + code[-4:]


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def redact_processor(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor that scrubs registered secrets from every field.

    It runs last before rendering, so formatted tracebacks are scrubbed too.
    """
    if not _secrets:
        return event_dict
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(value)
    return event_dict


class _RedactingFilter(logging.Filter):
    """Scrub secrets from stdlib records (httpx and httpcore log request URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            record.msg = redact(record.getMessage())
            record.args = None
        return True


def configure_logging(
    level: str = "INFO", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger.

    ``json=None`` picks JSON lines when the stream is not a terminal (journald
    reads them) and readable console lines when it is.
    """
    stream = stream or sys.stdout
    if json is None:
        json = not stream.isatty()
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        message = f"invalid log level {level!r}: use DEBUG, INFO, WARNING or ERROR"
        raise ValueError(message)  # noqa: TRY004 - a bad value, not a bad type

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
        shared_tail: list[Any] = [structlog.processors.format_exc_info, redact_processor]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        shared_tail = [redact_processor]

    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *shared_tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )

    # Route stdlib logging (httpx, httpcore) through the same redaction. httpx
    # logs each request URL at INFO, and that URL contains the access key, so its
    # loggers are kept at WARNING unless DEBUG is asked for, and filtered always.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RedactingFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(numeric_level)
    library_level = logging.DEBUG if numeric_level <= logging.DEBUG else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(library_level)


def get_logger(name: str, **context: Any) -> Any:
    """Return a structlog logger bound to ``component=name`` and the given context.

    The logger stays lazy, so a module-level logger follows ``configure_logging``
    calls made after the module was imported.
    """
    return structlog.get_logger(component=name, **context)
