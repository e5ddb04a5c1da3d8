"""``--shard I/N``: N pods together delete exactly the expired set, nothing twice."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.engine import SweepResult
from sweeper.slices import Shard
from sweeper.testing.emulator import Emulator
from sweeper.testing.seed import encode
from tests.integration.helpers import ago, ahead, make_client, remaining, seed, sweep

S = Encoding.EPOCH_SECONDS


@pytest.mark.parametrize("encoding", [Encoding.EPOCH_SECONDS, Encoding.TIMESTAMP])
def test_shards_together_delete_exactly_the_expired_set(
    emulator: Emulator, client: datastore.Client, kind: str, encoding: Encoding
) -> None:
    # Expiries spread over 30 hours, so every shard owns several one-hour buckets.
    expired: list[object] = [encode(ago(minutes=20 + 3 * i), encoding) for i in range(600)]
    live: list[object] = [encode(ahead(minutes=i + 1), encoding) for i in range(60)]
    groups: dict[str, list[object]] = {"expired": expired, "live": live, "null": [None] * 10}
    seed(client, kind, groups)
    results: list[SweepResult] = []

    def pod(index: int) -> None:
        results.append(
            sweep(
                make_client(emulator),
                kind,
                encoding,
                shard=Shard(index, 3),
                workers=2,
                batch_size=50,
            )
        )

    pods = [threading.Thread(target=pod, args=(i,)) for i in range(3)]
    for thread in pods:
        thread.start()
    for thread in pods:
        thread.join()

    names = [f"{g}-{i}" for g, values in groups.items() for i in range(len(values))]
    assert remaining(client, kind, names) == {n for n in names if not n.startswith("expired")}
    assert sorted(r.deleted for r in results) == sorted(r.matched for r in results)
    assert sum(r.deleted for r in results) == 600  # nothing deleted twice
    assert all(r.deleted > 0 and r.exit_code == 0 for r in results)


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


def test_max_rate_slows_the_deletes(client: datastore.Client, kind: str) -> None:
    groups: dict[str, list[object]] = {"expired": [encode(ago(hours=1), S)] * 1500}
    seed(client, kind, groups)

    result = sweep(client, kind, S, max_rate=1000.0, batch_size=500)

    # The first batch goes at once; the other two wait for the budget: about a second.
    assert result.deleted == 1500
    assert result.throttle_wait_s >= 0.9
    assert result.duration_s >= 0.9


def test_ramp_up_starts_at_500_deletes_per_second(client: datastore.Client, kind: str) -> None:
    groups: dict[str, list[object]] = {"expired": [encode(ago(hours=1), S)] * 600}
    seed(client, kind, groups)

    result = sweep(client, kind, S, ramp_up=True, batch_size=200)

    # Three batches of 200 at 500/s: the first goes at once, the others wait 0.4 s and 0.8 s.
    assert result.deleted == 600
    assert result.throttle_wait_s >= 0.5
