"""Side-by-side whole-process timings: sweeper against the bare loop a user would write.

Seeds identical runner-shaped copies (int epoch-second ``expires_at``, only it indexed,
~700-byte session data) into a local emulator, then clears each copy with:

- ``sweeper``: the real command (``python -m sweeper sweep``) with its defaults (auto-detection,
  paging, retries, logs, and every delete at the version its page read);
- ``sweeper --no-verify``: the same, keys-only pages and blind commits;
- ``bare loop``: keys-only query page of 500 on the expiry range, ``delete_multi``, repeat;
- ``full-entity``: the incumbent's shape, whole entities read, deleted in batches;
- ``per-entity``: one delete call per key, as many hand-written scripts do;
- ``sweeper --scan`` against ``scan loop``: for an expiry no index holds, the whole kind read
  page by page (500 entities) and the expired ones deleted, by sweeper and by a bare loop;
- ``beam pipeline``: the Apache Beam pipeline the Dataflow bulk-delete template runs
  (``bench/beam_purge.py``, DirectRunner, in its own venv ``.venv-beam``). It reads the whole
  result in one unbounded query, which the Firestore emulator fails past ~4 MiB (about 4,500
  sessions of this shape).

What is timed is what a user or a CronJob waits for: each approach is a fresh process, timed
from its start to its exit (interpreter start, imports, connecting, the checks before the
first delete and the counts after the last included); its peak RSS is read from ``wait4``. The
loops run in a child that imports the Datastore client and nothing of sweeper. Rounds
alternate the order so drift in the machine's speed hits all alike. ``--latency-ms`` puts a
loopback proxy between the approaches and the emulator that delays every chunk each way, as
production's round trips do; ``--cut-every-s`` has it also drop every connection at that
interval (a bad network: only sweeper survives it, so run it with ``--only sweeper``). Prints
deletes/s over the whole process, the ratio to the bare
loop, sweeper's own time outside its deletes (``sweep_finished``: the process's wall time
minus ``deleting_s``), peak RSS and the calls per 1000 deletes. Run with ``make bench``
(``python bench/bench_sweep.py --help``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The test helpers (emulators, proxy, seeding) live in tests/support, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.cloud import datastore
from google.cloud.datastore.query import PropertyFilter


def seed(client: datastore.Client, kind: str, expired: int, live: int) -> None:
    # Imported here, not at the top: the loops' child process imports nothing of sweeper.
    from sweeper.encodings import Encoding  # noqa: PLC0415
    from tests.support.seed import Session, encode, put_sessions  # noqa: PLC0415

    S = Encoding.EPOCH_SECONDS
    # Expiries spread over the 5 hours before the grace, as a day of real sessions would be;
    # live ones over the next hour.
    now = dt.datetime.now(dt.UTC)
    span = dt.timedelta(hours=5)
    sessions = [
        Session(f"e{i}", encode(now - dt.timedelta(minutes=20) - span * i / expired, S))
        for i in range(expired)
    ]
    sessions += [
        Session(f"l{i}", encode(now + dt.timedelta(hours=1) * i / max(live, 1), S))
        for i in range(1, live + 1)
    ]
    put_sessions(client, kind, sessions, data_bytes=700)


# sweeper itself runs as the command a user types (``run_in_child``): these are its arguments.
SWEEPER_COMMANDS: dict[str, list[str]] = {
    "sweeper": [],
    "sweeper --no-verify": ["--no-verify"],
    "sweeper --scan": ["--scan", "--format", "epoch-seconds"],
}


def run_scan_loop(client: datastore.Client, kind: str) -> int:
    """What a user would write for an unindexed expiry: read the whole kind, delete the expired."""
    cutoff = int(time.time()) - 15 * 60
    deleted, cursor = 0, None
    while True:
        page = client.query(kind=kind).fetch(limit=500, start_cursor=cursor)
        found = list(page)
        cursor = page.next_page_token
        doomed = [e.key for e in found if 10**9 <= e.get("expires_at", 0) < cutoff]
        if doomed:
            client.delete_multi(doomed)
            deleted += len(doomed)
        if len(found) < 500 or cursor is None:
            return deleted


def _expired_query(client: datastore.Client, kind: str, keys_only: bool) -> datastore.Query:
    query: datastore.Query = client.query(kind=kind)
    if keys_only:
        query.keys_only()
    query.add_filter(filter=PropertyFilter("expires_at", ">=", 10**9))
    query.add_filter(filter=PropertyFilter("expires_at", "<", int(time.time()) - 15 * 60))
    return query


def run_bare(client: datastore.Client, kind: str, keys_only: bool = True) -> int:
    """What a user would write: keys-only page of 500, delete_multi, repeat."""
    deleted = 0
    while keys := [e.key for e in _expired_query(client, kind, keys_only).fetch(limit=500)]:
        client.delete_multi(keys)
        deleted += len(keys)
    return deleted


def run_full_entity(client: datastore.Client, kind: str) -> int:
    """The incumbent Dataflow purge's shape: read whole entities, delete them in batches."""
    return run_bare(client, kind, keys_only=False)


def run_per_entity(client: datastore.Client, kind: str) -> int:
    """Many hand-written scripts: one delete call per key."""
    deleted = 0
    while keys := [e.key for e in _expired_query(client, kind, True).fetch(limit=500)]:
        for key in keys:
            client.delete(key)
        deleted += len(keys)
    return deleted


LOOPS: dict[str, Callable[[datastore.Client, str], int]] = {
    "bare loop": run_bare,
    "full-entity": run_full_entity,
    "per-entity": run_per_entity,
    "scan loop": run_scan_loop,
}
BEAM = "beam pipeline"
APPROACHES = [*SWEEPER_COMMANDS, *LOOPS, BEAM]
BEAM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-beam" / "bin" / "python"

_KEY_ONLY = 3  # EntityResult.ResultType.KEY_ONLY


class CountingApi:
    """Wraps the client's Datastore API to count RPCs and the entities they read."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self.counts: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._api, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            response = attr(*args, **kwargs)
            self.counts[name] += 1
            if name == "run_query" and response.batch.entity_result_type != _KEY_ONLY:
                self.counts["entities_read"] += len(response.batch.entity_results)
            if name == "lookup":
                self.counts["entities_read"] += len(response.found)
            return response

        return counted


def counting_client(project: str) -> tuple[datastore.Client, CountingApi]:
    client = datastore.Client(project=project)
    api = CountingApi(client._datastore_api)
    client._datastore_api_internal = api
    return client, api


@dataclass
class Tally:
    """One approach's figures over all rounds."""

    rates: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    outside: list[float] = field(default_factory=list)  # sweeper: wall - deleting_s
    peak_rss_mib: list[float] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expired", type=int, default=10_000)
    parser.add_argument("--live", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--emulator", choices=("datastore", "firestore"), default="datastore")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="delay added each way by a loopback proxy, as production has",
    )
    parser.add_argument(
        "--cut-every-s",
        type=float,
        default=None,
        help="the proxy drops every open connection at this interval (a bad network)",
    )
    parser.add_argument("--only", nargs="*", choices=APPROACHES, default=APPROACHES)
    parser.add_argument("--child", nargs=2, metavar=("APPROACH", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(*args.child)
        return
    from tests.support.emulator import running  # noqa: PLC0415
    from tests.support.proxy import TcpProxy  # noqa: PLC0415

    tallies = {name: Tally() for name in args.only}
    with (
        running(args.emulator) as emulator,
        TcpProxy(
            ("127.0.0.1", emulator.port),
            delay_s=args.latency_ms / 1000,
            cut_every_s=(args.cut_every_s, args.cut_every_s) if args.cut_every_s else None,
        ) as proxy,
    ):
        os.environ.update(emulator.env)
        seeder = datastore.Client(project=emulator.project)  # seeds directly, without delay
        for round_no in range(args.rounds):
            order = args.only if round_no % 2 == 0 else list(reversed(args.only))
            for name in order:
                kind = f"bench-{name.replace(' ', '').replace('-', '')}-{round_no}"
                seed(seeder, kind, args.expired, args.live)
                child_env = {**os.environ, "DATASTORE_EMULATOR_HOST": proxy.host}
                outcome, rss_kib = run_in_child(name, kind, child_env)
                # A commit whose answer a drop took is found applied when it is sent again;
                # where the database cannot show by whom, sweeper counts it unattributed.
                gone = outcome["deleted"] + outcome.get("unattributed", 0)
                if gone != args.expired:
                    raise SystemExit(f"{name} deleted {gone}, not {args.expired}")
                tally = tallies[name]
                tally.rates.append(gone / outcome["elapsed"])
                tally.walls.append(outcome["elapsed"])
                if "deleting_s" in outcome:
                    tally.outside.append(outcome["elapsed"] - outcome["deleting_s"])
                tally.peak_rss_mib.append(rss_kib / 1024)
                tally.counts.update(outcome["counts"])
    report(args, tallies, proxy.cuts)


def run_in_child(name: str, kind: str, env: dict[str, str]) -> tuple[dict[str, Any], int]:
    """Run one approach as a fresh process, timed from its start to its exit; its peak RSS
    is its own (from wait4)."""
    project = env.get("DATASTORE_PROJECT_ID", "sweeper-test")
    if name in SWEEPER_COMMANDS:
        # A backlog (91% of the kind due): the fraction guard would refuse it, as it should a
        # first run over a backlog; everything else is sweeper's default.
        command = [sys.executable, "-m", "sweeper", "sweep", "--project", project]
        command += ["--kind", kind, "--grace", "15m", "--max-fraction", "1"]
        command += ["--log-format", "json", *SWEEPER_COMMANDS[name]]
    elif name == BEAM:
        if not BEAM_PYTHON.exists():
            raise SystemExit(
                "beam pipeline: create its venv first: python3 -m venv .venv-beam && "
                ".venv-beam/bin/pip install -r bench/beam_requirements.txt"
            )
        cutoff = str(int(time.time()) - 15 * 60)
        script = str(Path(__file__).with_name("beam_purge.py"))
        command = [str(BEAM_PYTHON), script, "--project", project, "--kind", kind]
        command += ["--cutoff", cutoff]
    else:
        command = [sys.executable, __file__, "--child", name, kind]
    started = time.perf_counter()
    # sweeper logs to stderr; the loops and Beam print their JSON line on stdout.
    errors = subprocess.STDOUT if name in SWEEPER_COMMANDS else None
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        tail = b"\n".join(output.splitlines()[-3:]).decode(errors="replace")
        raise SystemExit(
            f"{name} failed with exit code {os.waitstatus_to_exitcode(status)}:\n{tail}"
        )
    outcome = _outcome(name, output)
    outcome["elapsed"] = elapsed
    return outcome, usage.ru_maxrss  # KiB on Linux


def _outcome(name: str, output: bytes) -> dict[str, Any]:
    """What the child reports: sweeper's ``sweep_finished``, a loop's or Beam's JSON line."""
    lines = [json.loads(line) for line in output.splitlines() if line.startswith(b"{")]
    if name not in SWEEPER_COMMANDS:
        found: dict[str, Any] = lines[-1]
        found.setdefault("counts", {})  # Beam's calls are not counted
        return found
    (done,) = [e for e in lines if e.get("event") == "sweep_finished"]
    counts = {
        "run_query": done["queries"],
        "entities_read": done["entities_read"],
        "commit": done["commits"],
        "retries": done["retries"],
        "unattributed": done["unattributed"],
        "halvings": done["concurrency_reductions"],
    }
    return {
        "deleted": done["deleted"],
        "unattributed": done["unattributed"],
        "deleting_s": done["deleting_s"],
        "counts": counts,
    }


def run_child(name: str, kind: str) -> None:
    client, api = counting_client(os.environ.get("DATASTORE_PROJECT_ID", "sweeper-test"))
    deleted = LOOPS[name](client, kind)
    print(json.dumps({"deleted": deleted, "counts": dict(api.counts)}))


def report(args: argparse.Namespace, tallies: dict[str, Tally], cuts: int) -> None:
    bare = tallies.get("bare loop")
    base = statistics.median(bare.rates) if bare else None
    per_k = 1000 / (args.expired * args.rounds)
    print(
        f"\n{args.emulator} emulator, {args.latency_ms:g} ms added each way, {args.expired} "
        f"expired + {args.live} live sessions, whole process, median of {args.rounds} rounds"
    )
    print(
        "| approach | wall s | deletes/s | vs bare loop | outside deletes s | peak RSS MiB "
        "| per 1000 deleted: queries | entities read | commits |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    scan_loop = tallies.get("scan loop")
    scan_base = statistics.median(scan_loop.rates) if scan_loop else None
    for name, t in tallies.items():
        median = statistics.median(t.rates)
        ratio = f"{median / base:.2f}x" if base else "-"
        if name == "sweeper --scan" and scan_base:  # a scan is compared with a scan
            ratio = f"{median / scan_base:.2f}x the scan loop"
        outside = f"{statistics.median(t.outside):.2f}" if t.outside else "-"
        c = t.counts
        print(
            f"| {name} | {statistics.median(t.walls):.2f} | {median:.0f} | {ratio} | {outside} "
            f"| {statistics.median(t.peak_rss_mib):.0f} | {c['run_query'] * per_k:.1f} "
            f"| {c['entities_read'] * per_k:.0f} | {c['commit'] * per_k:.1f} |"
        )
    if args.cut_every_s:
        print(
            f"\nThe proxy dropped every connection {cuts} times in all, "
            f"{args.cut_every_s:g} s apart."
        )
        for name, t in tallies.items():
            if name in SWEEPER_COMMANDS:
                c = t.counts
                print(
                    f"{name}, over {args.rounds} rounds: {c['retries']} calls sent again, "
                    f"{c['halvings']} halvings of the calls in flight, {c['unattributed']} "
                    "deletes found applied after their answer was lost (unattributed)"
                )


if __name__ == "__main__":
    main()
