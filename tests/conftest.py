"""Shared test setup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Each test starts and ends with structlog's defaults, so a test that configures
    logging to its own (later closed) stream cannot break the tests after it."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
