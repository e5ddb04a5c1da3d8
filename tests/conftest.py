"""Fixtures for every test tier."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from types import FrameType

import pytest
import structlog


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI time limit, ``timeout make test``) stops the suite as Ctrl-C does: the
    session ends at once and every fixture's teardown runs (the emulators' watchdogs cover
    the cases where none can: SIGKILL)."""
    signal.signal(signal.SIGTERM, _interrupted)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """``logs.configure`` changes structlog globally (stream, level); undo it after every test."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
