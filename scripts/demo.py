"""``make demo``: a real sweep against a local emulator, start to finish.

Starts the legacy Datastore emulator on a free loopback port, seeds sessions shaped like the eQ
runner's, runs ``sweeper sweep --dry-run``, then ``sweeper sweep`` (which the fraction guard
refuses: most of the kind is due), then ``sweeper sweep --max-fraction 1`` as an operator would
for a first run over a backlog, shows what is left, and stops the emulator it started.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

# The test helpers (emulators, proxy, seeding) live in tests/support, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.cloud import datastore

from sweeper.encodings import Encoding
from tests.support.emulator import running
from tests.support.seed import MISSING, Session, encode, put_sessions

KIND = "eq-session"
GROUPS = {  # name: (how many, expiry relative to now, or a fixed value)
    "expired": 3000,
    "live": 1000,
    "in-flight (null expiry)": 200,
    "no expiry property": 50,
    "expired within the grace": 100,
}

SLUGS = ("expired", "live", "in-flight", "no-expiry", "within-grace")


def demo_sessions(now: dt.datetime) -> list[Session]:
    def seconds(delta: dt.timedelta) -> object:
        return encode(now + delta, Encoding.EPOCH_SECONDS)

    expiries: dict[str, object] = {
        "expired": seconds(-dt.timedelta(hours=5)),
        "live": seconds(dt.timedelta(minutes=30)),
        "in-flight (null expiry)": None,
        "no expiry property": MISSING,
        "expired within the grace": seconds(-dt.timedelta(minutes=5)),
    }
    return [
        Session(f"{slug}-{i}", expiries[group])
        for slug, group in zip(SLUGS, GROUPS, strict=True)
        for i in range(GROUPS[group])
    ]


def count(client: datastore.Client) -> int:
    query = client.query(kind=KIND)
    query.keys_only()
    return sum(1 for _ in query.fetch())


def sweep(env: dict[str, str], *args: str) -> int:
    command = [
        sys.executable,
        "-m",
        "sweeper",
        "sweep",
        "--kind",
        KIND,
        "--log-format",
        "console",
        *args,
    ]
    print(f"\n$ sweeper sweep --kind {KIND} --log-format console {' '.join(args)}", flush=True)
    return subprocess.run(command, env=env, check=False).returncode


def main() -> int:
    print("Starting a local Datastore emulator ...", flush=True)
    with running("datastore") as emulator:
        env = {**os.environ, **emulator.env}
        os.environ.update(emulator.env)
        client = datastore.Client(project=emulator.project)
        put_sessions(client, KIND, demo_sessions(dt.datetime.now(dt.UTC)), data_bytes=700)
        print(f"Emulator at {emulator.host}, project {emulator.project}; seeded {KIND}:")
        for group, how_many in GROUPS.items():
            print(f"  {how_many:>5}  {group}")
        # A first run over a backlog: most of the kind is due, which the fraction guard takes
        # for a mistake (exit 1, nothing deleted) until the operator says it is a backlog.
        # --yes: on a terminal sweeper would show the plan and ask; the demo answers for you.
        codes = [
            sweep(env, "--dry-run"),
            sweep(env, "--yes"),
            sweep(env, "--yes", "--max-fraction", "1"),
        ]
        left = count(client)
        expected = sum(GROUPS.values()) - GROUPS["expired"]
        print(
            f"\n{left} sessions left (expected {expected}: everything but the expired ones). "
            f"Exit codes: {codes} (expected [0, 1, 0]: the dry run, the guard's refusal, the sweep)"
        )
        return 0 if codes == [0, 1, 0] and left == expected else 1


if __name__ == "__main__":
    sys.exit(main())
