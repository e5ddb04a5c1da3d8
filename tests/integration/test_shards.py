"""``--shard I/N``: N pods together delete exactly the expired set, nothing twice."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from typing import Any

import pytest
from google.cloud import datastore

from sweeper.encodings import Encoding, to_micros
from sweeper.result import SweepResult
from sweeper.settings import Shard
from tests.integration.helpers import (
    RecordingClient,
    ago,
    ahead,
    recording_client,
    remaining,
    seed,
    sweep,
)
from tests.support.emulator import Emulator
from tests.support.seed import encode

S = Encoding.EPOCH_SECONDS


SHARDS = 3
HOUR_US = 3_600_000_000


def expiry_hour(value: object) -> int:
    """The one-hour bucket of expiry time a stored value lies in (the grid shards are cut on)."""
    if isinstance(value, dt.datetime):
        return to_micros(value) // HOUR_US
    assert isinstance(value, int)
    return value // 3600


def run_pods(clients: list[RecordingClient], kind: str, encoding: Encoding) -> list[SweepResult]:
    """One sweep per shard, all at once, each pod with its own client."""
    results: dict[int, SweepResult] = {}

    def pod(index: int) -> None:
        results[index] = sweep(
            clients[index], kind, encoding, shard=Shard(index, SHARDS), workers=2, batch_size=50
        )

    pods = [threading.Thread(target=pod, args=(i,)) for i in range(SHARDS)]
    for thread in pods:
        thread.start()
    for thread in pods:
        thread.join()
    return [results[i] for i in range(SHARDS)]


@pytest.mark.parametrize("encoding", [Encoding.EPOCH_SECONDS, Encoding.TIMESTAMP])
def test_shards_together_delete_exactly_the_expired_set(
    emulator: Emulator, client: datastore.Client, kind: str, encoding: Encoding
) -> None:
    # Expiries spread over 30 hours, so every shard owns several one-hour buckets.
    expired: list[object] = [encode(ago(minutes=20 + 3 * i), encoding) for i in range(600)]
    live: list[object] = [encode(ahead(minutes=i + 1), encoding) for i in range(60)]
    groups: dict[str, list[object]] = {"expired": expired, "live": live, "null": [None] * 10}
    seed(client, kind, groups)
    names = [f"{g}-{i}" for g, values in groups.items() for i in range(len(values))]
    expired_names = {f"expired-{i}" for i in range(len(expired))}
    hour_of = {f"expired-{i}": expiry_hour(value) for i, value in enumerate(expired)}

    # First the pods only record what they would delete: with nothing deleted, no pod can hide
    # an overlap by deleting first, so each pod's keys are exactly the part it claims.
    dry = [recording_client(emulator, delete=False) for _ in range(SHARDS)]
    results = run_pods(dry, kind, encoding)

    claimed = [pod.handed_over for pod in dry]
    for index, (keys, result) in enumerate(zip(claimed, results, strict=True)):
        assert len(keys) == len(set(keys)), f"shard {index} matched keys twice"
        assert (result.matched, result.deleted, result.exit_code) == (len(keys), len(keys), 0)
        assert keys, f"shard {index} matched nothing"
        # docs/performance.md: bucket b of expiry time belongs to shard b % N.
        owners = {hour_of[k] % SHARDS if k in hour_of else None for k in keys}
        assert owners == {index}, f"shard {index} matched keys of {owners}"
    for a, b in itertools.combinations(range(SHARDS), 2):
        assert not set(claimed[a]) & set(claimed[b]), f"shards {a} and {b} overlap"
    assert set().union(*claimed) == expired_names, "a bucket was skipped or a live key matched"
    assert sum(len(keys) for keys in claimed) == len(expired)
    assert len(remaining(client, kind, names)) == len(names)

    # Then for real, all at once: exactly the expired set goes, each key deleted by one pod.
    pods = [recording_client(emulator) for _ in range(SHARDS)]
    results = run_pods(pods, kind, encoding)

    assert remaining(client, kind, names) == {n for n in names if n not in expired_names}
    assert [set(pod.handed_over) for pod in pods] == [set(keys) for keys in claimed]
    assert sum(r.deleted for r in results) == len(expired)  # nothing deleted twice
    assert all(r.exit_code == 0 and r.failed == 0 for r in results)


@pytest.mark.parametrize("encoding", [Encoding.EPOCH_SECONDS, Encoding.TIMESTAMP])
def test_a_stray_value_from_2001_costs_a_shard_a_query_or_two_not_thousands(
    client: datastore.Client, kind: str, encoding: Encoding
) -> None:
    """Buckets are found by probing, so a shard's queries follow the data, not its span.

    Walking every one-hour bucket from 2001 to now would take ~55,000 queries per shard of 4.
    """
    recent: list[object] = [encode(ago(minutes=20 + 2 * i), encoding) for i in range(300)]
    stray = dt.datetime(2001, 9, 10, tzinfo=dt.UTC)  # just inside every encoding's band
    seed(client, kind, {"recent": recent})
    seed(client, f"{kind}-stray", {"recent": recent, "stray": [encode(stray, encoding)]})

    def queries_per_shard(target: str) -> list[int]:
        runs = [sweep(client, target, encoding, shard=Shard(i, 4), workers=2) for i in range(4)]
        assert all(r.exit_code == 0 for r in runs)
        return [r.queries for r in runs]

    without = queries_per_shard(kind)
    with_stray = queries_per_shard(f"{kind}-stray")

    assert remaining(client, f"{kind}-stray", ["stray-0", "recent-0", "recent-299"]) == set()
    assert max(without) < 40
    assert all(b - a <= 3 for a, b in zip(without, with_stray, strict=True)), (
        without,
        with_stray,
    )


def test_parallel_streams_delete_exactly_the_expired_set(
    client: datastore.Client, kind: str
) -> None:
    expired = [ago(minutes=20 + i) for i in range(900)]
    groups: dict[str, list[object]] = {
        "expired": [encode(t, S) for t in expired],
        "live": [encode(ahead(hours=1), S)] * 50,
    }
    seed(client, kind, groups)

    result = sweep(client, kind, S, workers=8, batch_size=40, grace=dt.timedelta(minutes=15))

    names = [f"{g}-{i}" for g, values in groups.items() for i in range(len(values))]
    assert remaining(client, kind, names) == {n for n in names if n.startswith("live")}
    assert (result.matched, result.deleted, result.failed) == (900, 900, 0)


@pytest.mark.parametrize("path", [{}, {"scan": True}, {"with_descendants": True}], ids=str)
def test_max_rate_slows_the_deletes(
    client: datastore.Client, kind: str, path: dict[str, Any]
) -> None:
    """--max-rate 400 over 2,000 deletes ran at 490/s: the first batch went before its budget.
    Every path's commits go through the one throttle."""
    # Two batches each; with descendants half as many sessions (each costs an ancestor query,
    # which the legacy emulator answers about 130 a second).
    size = 200 if path.get("with_descendants") else 400
    groups: dict[str, list[object]] = {"expired": [encode(ago(hours=1), S)] * (2 * size)}
    seed(client, kind, groups)

    result = sweep(client, kind, S, max_rate=400.0, batch_size=size, **path)

    # Every batch waits for its budget, the first too: never faster than 400/s. (Where the
    # database is itself slower than that, as the legacy emulator's 25-group transactions
    # are, the workers wait less: the run's time is what the cap bounds.)
    assert result.deleted == 2 * size
    assert result.throttle_wait_s > 0
    assert result.deleting_s is not None
    assert result.deleted / result.deleting_s <= 400.0


def test_ramp_up_starts_at_500_deletes_per_second(client: datastore.Client, kind: str) -> None:
    groups: dict[str, list[object]] = {"expired": [encode(ago(hours=1), S)] * 600}
    seed(client, kind, groups)

    result = sweep(client, kind, S, ramp_up=True, batch_size=200)

    # Three batches of 200 at 500/s: the first goes at once, the others wait 0.4 s and 0.8 s.
    assert result.deleted == 600
    assert result.throttle_wait_s >= 0.5
