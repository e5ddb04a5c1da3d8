"""Side-by-side throughput: sweeper against the bare loop a user would write.

Seeds identical runner-shaped copies (int epoch-second ``expires_at``, only it indexed,
~700-byte session data) into a local emulator, then clears each copy with:

- ``sweeper``: the engine with its defaults (auto-detection, paging, retries, logs);
- ``bare``: keys-only query page of 500 on the expiry range, ``delete_multi``, repeat.

Rounds alternate the two so drift in the machine's speed hits both. Prints deletes/s and the
ratio to the bare loop. Run with ``make bench`` (``python bench/bench_sweep.py --help``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import statistics
import time
from collections.abc import Callable

from google.cloud import datastore
from google.cloud.datastore.query import PropertyFilter

from sweeper.encodings import Encoding
from sweeper.engine import Sweep
from sweeper.logs import configure
from sweeper.settings import SweepSettings
from sweeper.testing.emulator import FLAVOURS, running
from sweeper.testing.seed import Session, encode, put_sessions


def seed(client: datastore.Client, kind: str, expired: int, live: int) -> None:
    now = dt.datetime.now(dt.UTC)
    old = encode(now - dt.timedelta(hours=5), Encoding.EPOCH_SECONDS)
    new = encode(now + dt.timedelta(hours=1), Encoding.EPOCH_SECONDS)
    sessions = [Session(f"e{i}", old) for i in range(expired)]
    sessions += [Session(f"l{i}", new) for i in range(live)]
    put_sessions(client, kind, sessions, data_bytes=700)


def run_sweeper(client: datastore.Client, kind: str) -> int:
    settings = SweepSettings(
        kind=kind, prop="expires_at", format="auto", grace=dt.timedelta(minutes=15)
    )
    return Sweep(settings, client).run().deleted


def run_bare(client: datastore.Client, kind: str) -> int:
    cutoff = int(time.time()) - 15 * 60
    deleted = 0
    while True:
        query = client.query(kind=kind)
        query.keys_only()
        query.add_filter(filter=PropertyFilter("expires_at", ">=", 10**9))
        query.add_filter(filter=PropertyFilter("expires_at", "<", cutoff))
        keys = [entity.key for entity in query.fetch(limit=500)]
        if not keys:
            return deleted
        client.delete_multi(keys)
        deleted += len(keys)


APPROACHES: dict[str, Callable[[datastore.Client, str], int]] = {
    "sweeper": run_sweeper,
    "bare": run_bare,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expired", type=int, default=20_000)
    parser.add_argument("--live", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--emulator", choices=FLAVOURS, default="datastore")
    args = parser.parse_args()
    configure("json", "warning", io.StringIO())  # keep sweeper's logs out of the table

    rates: dict[str, list[float]] = {name: [] for name in APPROACHES}
    with running(args.emulator) as emulator:
        os.environ.update(emulator.env)
        client = datastore.Client(project=emulator.project)
        for round_no in range(args.rounds):
            order = list(APPROACHES) if round_no % 2 == 0 else list(reversed(APPROACHES))
            for name in order:
                kind = f"bench-{name}-{round_no}"
                seed(client, kind, args.expired, args.live)
                started = time.perf_counter()
                deleted = APPROACHES[name](client, kind)
                elapsed = time.perf_counter() - started
                if deleted != args.expired:
                    raise SystemExit(f"{name} deleted {deleted}, expected {args.expired}")
                rates[name].append(deleted / elapsed)

    bare = statistics.median(rates["bare"])
    print(
        f"\n{args.emulator} emulator, {args.expired} expired + {args.live} live, "
        f"{args.rounds} rounds (median)"
    )
    print(f"{'approach':<10} {'deletes/s':>10} {'vs bare':>8}   rounds")
    for name, values in rates.items():
        median = statistics.median(values)
        rounds = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:<10} {median:>10.0f} {median / bare:>7.2f}x   {rounds}")


if __name__ == "__main__":
    main()
