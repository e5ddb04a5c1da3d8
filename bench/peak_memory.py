"""Peak memory of a real ``sweeper sweep`` run, to size the CronJob's pod (deploy/cronjob.yaml).

Starts a local emulator (the legacy Datastore one unless ``--emulator firestore``), seeds
runner-shaped sessions (int epoch-second ``expires_at``, only it indexed, ~700-byte session
data), all expired, one kind per scenario,
and runs the installed ``sweeper`` console script as the CronJob does (JSON logs to stderr)
under GNU time (``/usr/bin/time -v``, Debian package ``time``). Reads "Maximum resident set
size" and the ``sweep_finished`` summary, and prints a table. The peak should not grow with the
backlog: sweeper holds one page of keys (at most 500) at a time.

Run: ``.venv/bin/python bench/peak_memory.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The test helpers (emulators, proxy, seeding) live in tests/support, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.cloud import datastore

from sweeper.encodings import Encoding
from tests.support.emulator import FLAVOURS, running
from tests.support.seed import Session, encode, put_sessions

GNU_TIME = "/usr/bin/time"
MAX_RSS = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")
CPU_TIME = re.compile(r"(?:User|System) time \(seconds\):\s*([\d.]+)")


@dataclass(frozen=True)
class Measurement:
    expired: int
    exit_code: int
    deleted: int | None
    stopped_reason: str | None
    wall_s: float
    cpu_s: float  # user + system
    max_rss_kib: int
    error: str  # sweeper's one-line error on stderr, if any


def sweeper_command() -> str:
    """The console script installed beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "sweeper"
    if beside.exists():
        return str(beside)
    found = shutil.which("sweeper")
    if found is None:
        raise SystemExit("the sweeper console script is not installed (pip install -e .)")
    return found


def seed(client: datastore.Client, kind: str, expired: int) -> None:
    old = encode(dt.datetime.now(dt.UTC) - dt.timedelta(hours=5), Encoding.EPOCH_SECONDS)
    put_sessions(client, kind, (Session(f"e{i}", old) for i in range(expired)), data_bytes=700)


def summary(stderr: str) -> dict[str, object]:
    """The ``sweep_finished`` event from the JSON log lines (empty if there is none); GNU
    time's own lines, on the same stream, are skipped."""
    for line in reversed(stderr.splitlines()):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == "sweep_finished":
            return event
    return {}


def measure(env: dict[str, str], kind: str, expired: int) -> Measurement:
    command = [
        GNU_TIME,
        "-v",
        sweeper_command(),
        "sweep",
        "--kind",
        kind,
        "--format",
        "epoch-seconds",
        # Every seeded session is expired: a first run over a backlog, which the fraction
        # guard refuses unless told (as the runbook's first run is).
        "--max-fraction",
        "1",
        # The 0 row's kind holds nothing at all, which fails a run unless it may be empty.
        "--allow-empty",
        "--log-format",
        "json",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - started
    match = MAX_RSS.search(done.stderr)
    if match is None:
        raise SystemExit(f"no 'Maximum resident set size' from {GNU_TIME}: {done.stderr[-500:]}")
    finished = summary(done.stderr)
    deleted = finished.get("deleted")
    reason = finished.get("stopped_reason")
    return Measurement(
        expired=expired,
        exit_code=done.returncode,
        deleted=deleted if isinstance(deleted, int) else None,
        stopped_reason=reason if isinstance(reason, str) else None,
        wall_s=wall_s,
        cpu_s=sum(float(seconds) for seconds in CPU_TIME.findall(done.stderr)),
        max_rss_kib=int(match.group(1)),
        error=next(
            (line for line in done.stderr.splitlines() if line.startswith("sweeper: error")), ""
        ),
    )


def print_table(rows: list[Measurement]) -> None:
    header = ("expired", "deleted", "exit", "stopped", "wall s", "cpu s", "peak RSS")
    print("{:>8} {:>8} {:>4} {:>9} {:>7} {:>6} {:>10}".format(*header))
    for row in rows:
        deleted = "-" if row.deleted is None else str(row.deleted)
        print(
            f"{row.expired:>8} {deleted:>8} {row.exit_code:>4} {row.stopped_reason or '-':>9} "
            f"{row.wall_s:>7.1f} {row.cpu_s:>6.1f} {row.max_rss_kib / 1024:>6.1f} MiB"
        )
        if row.error:
            print(f"{'':>8} {row.error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--expired",
        type=int,
        nargs="+",
        default=[0, 5_000, 60_000],
        help="expired sessions to seed, one run (and kind) each (default: 0 5000 60000)",
    )
    parser.add_argument("--emulator", choices=FLAVOURS, default="datastore")
    args = parser.parse_args()
    if not Path(GNU_TIME).exists():
        raise SystemExit(f"{GNU_TIME} is missing: apt-get install time")

    rows: list[Measurement] = []
    with running(args.emulator) as emulator:
        env = {**os.environ, **emulator.env}
        os.environ.update(emulator.env)
        client = datastore.Client(project=emulator.project)
        for expired in args.expired:
            kind = f"peak-memory-{expired}"
            print(f"seeding {expired} expired sessions into {kind} ...", flush=True)
            seed(client, kind, expired)
            rows.append(measure(env, kind, expired))
    print()
    print_table(rows)
    ok = all(row.exit_code == 0 and row.deleted == row.expired for row in rows)
    if not ok:
        print("some run did not delete everything it should have", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
