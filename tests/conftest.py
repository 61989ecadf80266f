"""Shared fixtures: anyio backend selection and a clean logging setup per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from gated.logs import clear_secrets


@pytest.fixture
def anyio_backend() -> str:
    # Modules whose code must run on both backends override this fixture
    # with params=["asyncio", "trio"].
    return "asyncio"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    # Secrets registered by one test (a client built with key "k") would
    # otherwise redact every "k" in the output of the tests after it.
    structlog.reset_defaults()
    clear_secrets()
    yield
    structlog.reset_defaults()
    clear_secrets()
