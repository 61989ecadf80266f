"""Shared fixtures: anyio backend selection and a clean logging setup per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture
def anyio_backend() -> str:
    # Modules whose code must run on both backends override this fixture
    # with params=["asyncio", "trio"].
    return "asyncio"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
