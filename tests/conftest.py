"""Fixtures for every test tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """``logs.configure`` changes structlog globally (stream, level); undo it after every test."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
