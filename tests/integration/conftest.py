"""Integration fixtures: real emulators, started by the suite on free loopback ports.

Every test runs against both the legacy Datastore emulator and the Firestore emulator in
Datastore mode, unless ``DATASTORE_EMULATOR_HOST`` is set: then that one emulator is reused
(a legacy one must run with ``--consistency=1.0`` for the exact-count tests), its tests carry
its true flavour in their ids, and every test of the other flavour is skipped with a reason
that ``-ra`` shows. The flavour is found out by asking the emulator (see :func:`flavour_of`);
``SWEEPER_TEST_EMULATOR_FLAVOUR=datastore|firestore``, if set, must agree with it.

The emulators keep everything in memory, and the suite writes millions of entities (backlogs
far larger than a page, on purpose). Left to pile up, they fill the legacy emulator's heap
until it stops answering mid-suite, so every emulator the suite started is reset after each
test (a reused one is never reset: its data is not ours).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore

from tests.integration.helpers import make_client
from tests.support.emulator import FLAVOURS, Emulator, Flavour

pytestmark = pytest.mark.integration

REUSED_HOST = os.environ.get("DATASTORE_EMULATOR_HOST")
STARTED: list[Emulator] = []  # the emulators this suite started and may reset
FLAVOUR_VARIABLE = "SWEEPER_TEST_EMULATOR_FLAVOUR"


def flavour_of(emulator: Emulator) -> Flavour:
    """Which emulator answers at ``emulator.host``, asked without writing anything.

    A read-only transaction looks up 26 keys in 26 entity groups: the legacy Datastore
    emulator refuses more than 25 entity groups per transaction, the Firestore emulator in
    Datastore mode does not.
    """
    client = make_client(emulator)
    keys = [client.key("sweeper-flavour-probe", f"group-{i}") for i in range(26)]
    transaction = client.transaction(read_only=True)
    try:
        transaction.begin(timeout=10)
        client.get_multi(keys, transaction=transaction, timeout=10)
    except gexc.InvalidArgument as exc:
        if "entity groups" in str(exc):
            return "datastore"
        raise
    finally:
        with contextlib.suppress(Exception):  # the probe only reads: a failed rollback is moot
            transaction.rollback(timeout=10)
    return "firestore"


def reused_flavour(emulator: Emulator) -> Flavour:
    """The flavour of the emulator at ``DATASTORE_EMULATOR_HOST``; fails the run if unknown."""
    declared = os.environ.get(FLAVOUR_VARIABLE, "").strip()
    if declared and declared not in FLAVOURS:
        pytest.fail(
            f"{FLAVOUR_VARIABLE}={declared!r}: expected one of {', '.join(FLAVOURS)}",
            pytrace=False,
        )
    try:
        found = flavour_of(emulator)
    except Exception as exc:
        pytest.fail(
            f"DATASTORE_EMULATOR_HOST={REUSED_HOST}: cannot tell which emulator runs there "
            f"({type(exc).__name__}: {exc}); unset it to let the suite start both",
            pytrace=False,
        )
    if declared and declared != found:
        pytest.fail(
            f"{FLAVOUR_VARIABLE}={declared} but the emulator at DATASTORE_EMULATOR_HOST="
            f"{REUSED_HOST} is the {found} one",
            pytrace=False,
        )
    return found


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs two workers with ``--dist loadgroup``) every test
    of one emulator flavour runs in the same worker: each worker starts one emulator, and the
    two run side by side, instead of each worker starting both."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        flavour = callspec.params.get("emulator") if callspec is not None else None
        if flavour is not None:
            item.add_marker(pytest.mark.xdist_group(flavour))


@pytest.fixture(scope="session")
def _reused() -> Iterator[tuple[str, Flavour] | None]:
    """(project, flavour) of the emulator reused from ``DATASTORE_EMULATOR_HOST``, if any."""
    if not REUSED_HOST:
        yield None
        return
    port = int(REUSED_HOST.rsplit(":", 1)[1])
    project = os.environ.get("DATASTORE_PROJECT_ID", "sweeper-test")
    yield project, reused_flavour(Emulator("datastore", project=project, port=port))


@pytest.fixture(scope="session", params=FLAVOURS)
def emulator(
    request: pytest.FixtureRequest, _reused: tuple[str, Flavour] | None
) -> Iterator[Emulator]:
    flavour: Flavour = request.param
    if _reused is not None:
        project, reused = _reused
        if flavour != reused:
            pytest.skip(
                f"{flavour} emulator NOT TESTED: DATASTORE_EMULATOR_HOST={REUSED_HOST} reuses "
                f"one {reused} emulator; unset DATASTORE_EMULATOR_HOST to test both"
            )
        assert REUSED_HOST is not None
        yield Emulator(flavour, project=project, port=int(REUSED_HOST.rsplit(":", 1)[1]))
        return
    emu = Emulator(flavour).start()
    STARTED.append(emu)
    try:
        yield emu
    finally:
        STARTED.remove(emu)
        emu.stop()


@pytest.fixture(autouse=True)
def _reset_after_test() -> Iterator[None]:
    """Drop what a test wrote, so the next one starts with an emulator as light as new.

    Tests never share data (each uses kinds of its own, seeded by function-scoped fixtures),
    so this changes no outcome. It keeps their timings honest too: the legacy emulator's
    queries slow down as it fills, and a forecast compared with a run's time would fail.
    """
    yield
    for emu in STARTED:
        emu.reset()


@pytest.fixture
def client(emulator: Emulator) -> datastore.Client:
    return make_client(emulator)


@pytest.fixture
def kind() -> str:
    """A kind of its own for each test, so tests never see each other's data."""
    return f"eq-session-{uuid.uuid4().hex[:10]}"
