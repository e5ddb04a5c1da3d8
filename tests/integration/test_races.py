"""The refresh race, live: a web app refreshes sessions while sweeps run back to back.

Each "request" reads a session just before it expires, works for a few hundred milliseconds and
writes the whole entity back with a new expiry, as the eQ runner does. Sweeps run with
``--grace 0`` through a proxy that adds production-like latency, so a query and the delete of
the keys it found are hundreds of milliseconds apart. A refreshed session is lost when a sweep
found it expired before the write and deleted it after.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator

import pytest
from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.result import Runtime, SweepResult
from tests.integration.helpers import make_client, remaining, sweep
from tests.support.emulator import Emulator
from tests.support.proxy import TcpProxy
from tests.support.seed import Session, encode, put_sessions

MS = Encoding.EPOCH_MILLIS
CLUSTERS = 4  # expiry instants, 600 ms apart
PER_CLUSTER = 6  # sessions per instant: half refreshed by the app, half abandoned
WORK_S = 1.0  # how long a request holds the session before writing it back
# Deletes trail the query that found them by up to seconds, as under production's ramp-up
# throttle: most deletes then land after the refresh they race with, whatever else a sweep
# spends its time on, so the race is lost reliably without --verify.
DELETES_PER_S = 2.0


@pytest.fixture
def slow_link(emulator: Emulator) -> Iterator[Emulator]:
    """The same emulator behind 25 ms of latency each way, for the sweeper only."""
    with TcpProxy(("127.0.0.1", emulator.port), delay_s=0.025) as proxy:
        yield Emulator(emulator.flavour, project=emulator.project, port=proxy.port)


def web_request(client: datastore.Client, kind: str, name: str, expires: dt.datetime) -> None:
    time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds() - 0.05))
    entity = client.get(client.key(kind, name))
    time.sleep(WORK_S)
    if entity is not None:  # a session already swept cannot be refreshed
        entity["expires_at"] = encode(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1), MS)
        client.put(entity)


def race(emulator: Emulator, slow: Emulator, kind: str, verify: bool) -> tuple[set[str], set[str]]:
    """Run the race; return (refreshed sessions left, abandoned sessions left)."""
    app, sweeper_client = make_client(emulator), make_client(slow)
    start = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    sessions, requests = [], []
    for c in range(CLUSTERS):
        expires = start + dt.timedelta(milliseconds=600 * c)
        for i in range(PER_CLUSTER):
            name = f"{'active' if i % 2 else 'abandoned'}-{c}-{i}"
            sessions.append(Session(name, encode(expires, MS)))
            if i % 2:
                requests.append(
                    threading.Thread(target=web_request, args=(app, kind, name, expires))
                )
    put_sessions(app, kind, sessions)
    for request in requests:
        request.start()

    runs: list[SweepResult] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(r.is_alive() for r in requests) or len(runs) < 3):
        runs.append(
            sweep(
                sweeper_client,
                kind,
                MS,
                Runtime(),
                grace=dt.timedelta(0),
                verify=verify,
                batch_size=1,
                max_rate=DELETES_PER_S,
            )
        )
    for request in requests:
        request.join()
    runs.append(sweep(sweeper_client, kind, MS, grace=dt.timedelta(0), verify=verify))
    assert all(run.exit_code == 0 for run in runs)

    names = [s.name for s in sessions]
    left = remaining(app, kind, names)
    active = {n for n in names if n.startswith("active")}
    return left & active, left - active


def test_with_verify_no_refreshed_session_is_lost(
    emulator: Emulator, slow_link: Emulator, kind: str
) -> None:
    refreshed_left, abandoned_left = race(emulator, slow_link, kind, verify=True)

    assert len(refreshed_left) == CLUSTERS * PER_CLUSTER // 2
    assert abandoned_left == set()


def test_without_verify_the_race_loses_refreshed_sessions(
    emulator: Emulator, slow_link: Emulator, kind: str
) -> None:
    refreshed_left, abandoned_left = race(emulator, slow_link, kind, verify=False)

    assert len(refreshed_left) < CLUSTERS * PER_CLUSTER // 2
    assert abandoned_left == set()
