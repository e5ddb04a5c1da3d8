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
