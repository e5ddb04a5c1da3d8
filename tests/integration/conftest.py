"""Integration fixtures: real emulators, started by the suite on free loopback ports.

Every test runs against both the legacy Datastore emulator and the Firestore emulator in
Datastore mode, unless ``DATASTORE_EMULATOR_HOST`` is set, in which case that emulator is reused
(and must run with ``--consistency=1.0`` for the exact-count tests).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from google.cloud import datastore

from sweeper.testing.emulator import FLAVOURS, Emulator
from tests.integration.helpers import make_client

pytestmark = pytest.mark.integration

REUSED_HOST = os.environ.get("DATASTORE_EMULATOR_HOST")


@pytest.fixture(scope="session", params=FLAVOURS[:1] if REUSED_HOST else FLAVOURS)
def emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    if REUSED_HOST:
        port = REUSED_HOST.rsplit(":", 1)[1]
        project = os.environ.get("DATASTORE_PROJECT_ID", "sweeper-test")
        yield Emulator(request.param, project=project, port=int(port))
        return
    emu = Emulator(request.param).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def client(emulator: Emulator) -> datastore.Client:
    return make_client(emulator)


@pytest.fixture
def kind() -> str:
    """A kind of its own for each test, so tests never see each other's data."""
    return f"eq-session-{uuid.uuid4().hex[:10]}"
