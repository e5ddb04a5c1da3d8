"""Side-by-side cost of each expiry encoding, and of ``--with-descendants``.

Two measurements on one local emulator, in one run:

- **Encodings**: for every :class:`~sweeper.encodings.Encoding`, identical runner-shaped copies
  (only ``expires_at`` indexed, ~700-byte session data; expired ones spread over the 5 hours
  before the cutoff, live ones 1 to 2 hours after it) with the expiry stored in that encoding,
  cleared by the engine (explicit ``--format``, grace 0, no ``--max-fraction`` limit, no
  ``--verify``). Deletes/s next to int epoch seconds, the reference (the runner's own
  encoding). ISO-8601 ranges are read as projections (key and value), the others keys-only.
- **Descendants**: expired sessions with 0, 1 or 5 children each (``event`` entities in the
  session's entity group), cleared plainly, with ``--with-descendants``, and with
  ``--with-descendants --verify``; the calls each deleted session costs, and the time against
  the plain run with the same children. The reference for the ancestor queries runs beside
  them: ``--with-descendants`` with each worker making them one at a time, as the engine did
  before it made 8 at once.

As in ``bench_sweep.py``, each sweep runs in a fresh process, rounds alternate the order so
drift in the machine's speed hits all alike, and the figures are medians over the rounds; an
untimed sweep of each encoding warms the emulator up first. After
every sweep the survivors are counted: exactly the expired sessions must be gone (and their
children, with ``--with-descendants``; without it the children must all stay). The counts of
calls are the engine's own (``sweep_finished``'s ``queries``, ``lookups``, ``commits``,
``entities_read``), checked against the calls seen on the wire. Run with
``make bench-encodings`` (``python bench/bench_encodings.py --help``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The test helpers (emulators, proxy, seeding) live in tests/support, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sweep import counting_client
from google.cloud import datastore

from sweeper import engine
from sweeper.encodings import Encoding
from sweeper.engine import Sweep
from sweeper.logs import configure
from sweeper.retry import StopReason
from sweeper.settings import SweepSettings
from tests.support.emulator import FLAVOURS, Emulator, Flavour
from tests.support.proxy import TcpProxy
from tests.support.seed import Session, encode, names, put_entities, put_sessions

REFERENCE = Encoding.EPOCH_SECONDS
CHILD_KIND = "event"
# "one query at a time" is the reference for the ancestor queries: the engine as it was before
# each delete worker made them 8 at a time (the engine's DESCENDANT_QUERIES, which sizes the
# pool of readers; setting gate's copy changed nothing, and the reference ran 8 at a time).
SEQUENTIAL = "with descendants, one query at a time"
MODES = ("plain", SEQUENTIAL, "with descendants", "with descendants + verify")
_WIRE_CALLS = (
    "run_query",
    "run_aggregation_query",
    "lookup",
    "begin_transaction",
    "commit",
    "entities_read",
)


@dataclass(frozen=True)
class Spec:
    """One sweep, as the child process runs it."""

    kind: str
    encoding: Encoding
    with_descendants: bool = False
    verify: bool = False
    descendant_queries: int | None = None  # at once per worker; None: the engine's own


@dataclass(frozen=True)
class Outcome:
    """What one sweep did: the engine's counts, its time, and the calls seen on the wire."""

    elapsed: float
    deleted: int
    descendants_deleted: int
    queries: int
    lookups: int
    commits: int
    entities_read: int
    wire: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # why the sweep did not complete
    retries: int = 0

    def wire_mismatches(self) -> list[str]:
        """Where the engine's counts differ from the calls the client sent.

        A ``--verify`` transaction counts as one of ``commits`` (as documented), though it
        looks its keys up too: those lookups are not in ``lookups``. Lookups are compared only
        in a run without retries: a transaction that began and whose lookup then failed leaves
        one lookup fewer on the wire than transactions begun.
        """
        w = self.wire
        pairs = {
            "queries": (self.queries, w.get("run_query", 0) + w.get("run_aggregation_query", 0)),
            "commits": (self.commits, w.get("commit", 0)),
        }
        if not self.retries:
            pairs["lookups"] = (self.lookups, w.get("lookup", 0) - w.get("begin_transaction", 0))
        return [f"{k} {mine} vs {seen}" for k, (mine, seen) in pairs.items() if mine != seen]


def sessions_for(encoding: Encoding, expired: int, live: int) -> list[Session]:
    """Expired ones over the 5 hours from 20 minutes ago back (as in ``bench_sweep.seed``).

    The sweeps run with no grace, so live ones start an hour from now: none may reach the
    cutoff while the kind is seeded and swept.
    """
    now = dt.datetime.now(dt.UTC)
    span = dt.timedelta(hours=5)
    out = [
        Session(f"e{i}", encode(now - dt.timedelta(minutes=20) - span * i / expired, encoding))
        for i in range(expired)
    ]
    out += [
        Session(f"l{i}", encode(now + dt.timedelta(hours=1) * (1 + i / live), encoding))
        for i in range(live)
    ]
    return out


def seed_children(client: datastore.Client, kind: str, parents: Iterable[str], each: int) -> int:
    """``each`` small ``event`` entities under every session named in ``parents``."""

    def children() -> Iterable[datastore.Entity]:
        for name in parents:
            parent = client.key(kind, name)
            for i in range(each):
                child = datastore.Entity(
                    client.key(CHILD_KIND, f"c{i}", parent=parent), exclude_from_indexes=("data",)
                )
                child.update({"type": "answer", "data": "x" * 200})
                yield child

    return put_entities(client, children())


def children_of(client: datastore.Client, kind: str) -> list[datastore.Key]:
    """The ``event`` keys whose parent is of ``kind``: keys-only pages of 1,000."""
    found: list[datastore.Key] = []
    cursor: bytes | None = None
    while True:
        query = client.query(kind=CHILD_KIND)
        query.keys_only()
        page = query.fetch(limit=1000, start_cursor=cursor)
        batch = [entity.key for entity in page]
        found += [key for key in batch if key.parent is not None and key.parent.kind == kind]
        cursor = page.next_page_token
        if not batch or cursor is None:
            return found


def sweep_in_child(spec: Spec, env: dict[str, str]) -> Outcome:
    """One sweep in a fresh process, as ``bench_sweep.py`` runs sweeper."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(asdict(spec))],
        env=env,
        stdout=subprocess.PIPE,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"sweep of {spec} crashed with exit code {proc.returncode}")
    return Outcome(**json.loads(proc.stdout))


def run_child(spec_json: str) -> None:
    raw = json.loads(spec_json)
    spec = Spec(**{**raw, "encoding": Encoding(raw["encoding"])})
    client, api = counting_client(os.environ.get("DATASTORE_PROJECT_ID", "sweeper-test"))
    settings = SweepSettings(
        kind=spec.kind,
        prop="expires_at",
        format=spec.encoding,
        grace=dt.timedelta(0),
        max_fraction=1.0,
        verify=spec.verify,
        with_descendants=spec.with_descendants,
    )
    if spec.descendant_queries is not None:
        vars(engine)["DESCENDANT_QUERIES"] = spec.descendant_queries  # the engine's own name
    started = time.perf_counter()
    result = Sweep(settings, client).run()
    elapsed = time.perf_counter() - started
    error = None
    if result.stopped_reason != StopReason.COMPLETE:
        error = f"stopped ({StopReason(result.stopped_reason).value}): {result.error}"
    outcome = Outcome(
        elapsed=elapsed,
        deleted=result.deleted,
        descendants_deleted=result.descendants_deleted,
        queries=result.queries,
        lookups=result.lookups,
        commits=result.commits,
        entities_read=result.entities_read,
        wire={k: v for k, v in api.counts.items() if k in _WIRE_CALLS},
        error=error,
        retries=result.retries,
    )
    print(json.dumps(asdict(outcome)))


@dataclass
class Runs:
    """One row's sweeps over all rounds: those that completed, and why others failed."""

    done: list[Outcome] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def median(self, value: Callable[[Outcome], float]) -> float | None:
        return statistics.median(value(o) for o in self.done) if self.done else None

    def add(self, label: str, round_no: int, outcome: Outcome) -> bool:
        """Record ``outcome``; False (and say so now) for a sweep that failed."""
        if outcome.error is None:
            self.done.append(outcome)
            return True
        self.failed.append(f"round {round_no + 1}: {outcome.error} after {outcome.elapsed:.0f} s")
        print(f"FAILED: {label}, round {round_no + 1}: {outcome.error}", file=sys.stderr)
        return False


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def progress(label: str, round_no: int, outcome: Outcome) -> None:
    """A line per sweep on stderr: a run takes minutes."""
    state = "failed" if outcome.error else "ok"
    print(
        f"round {round_no + 1} {label}: {state}, {outcome.elapsed:.1f} s, "
        f"{outcome.deleted} + {outcome.descendants_deleted} deleted",
        file=sys.stderr,
        flush=True,
    )


def rounds_order(items: Sequence[Any], round_no: int) -> list[Any]:
    """Every other round in reverse, as ``bench_sweep.py`` alternates."""
    return list(items) if round_no % 2 == 0 else list(reversed(items))


def warm_up(
    seeder: datastore.Client, env: dict[str, str], sessions: int, clear: Callable[[], None]
) -> None:
    """Untimed sweeps first, of every encoding and of descendants: the emulator's first
    queries of each shape are slow (a JVM warming up), and would count against whichever run
    came first."""
    for encoding in Encoding:
        kind = f"warm-up-{encoding}"
        put_sessions(seeder, kind, sessions_for(encoding, sessions, 0))
        sweep_in_child(Spec(kind, encoding), env)
        clear()
    kind = "warm-up-descendants"
    seeded = sessions_for(REFERENCE, 100, 0)
    put_sessions(seeder, kind, seeded)
    seed_children(seeder, kind, (s.name for s in seeded), 1)
    sweep_in_child(Spec(kind, REFERENCE, with_descendants=True), env)
    clear()


class Lab:
    """The emulator the sweeps run against, and a client that seeds and checks.

    A sweep that fails on the legacy emulator can leave it unanswering for minutes (its
    commits still running), so the emulator is replaced, and warmed up, after one.
    """

    def __init__(self, flavour: Flavour, warm_up_sessions: int, latency_s: float) -> None:
        self.flavour = flavour
        self.warm_up_sessions = warm_up_sessions
        self.latency_s = latency_s
        self.emulator = Emulator(flavour)
        self.proxy: TcpProxy | None = None
        self.env: dict[str, str] = {}

    def start(self) -> None:
        self.emulator = Emulator(self.flavour).start()
        os.environ.update(self.emulator.env)
        self.env = dict(os.environ)
        if self.latency_s:  # the sweeps go through the delay; seeding and checks do not
            self.proxy = TcpProxy(("127.0.0.1", self.emulator.port), delay_s=self.latency_s)
            self.env["DATASTORE_EMULATOR_HOST"] = self.proxy.start().host
        self.seeder = datastore.Client(project=self.emulator.project)
        warm_up(self.seeder, self.env, self.warm_up_sessions, self.clear)

    def clear(self) -> None:
        """Empty the emulator before the next sweep (not timed).

        Both emulators slow down with everything they have held: deleting the entities of a
        run is not enough (on the Firestore emulator the same sweep of 1,000 sessions with
        ``--with-descendants --verify`` took 9.6 s in the first round and 56.7 s in the
        second). So each sweep starts from an emulator emptied by its reset endpoint.
        """
        self.emulator.reset()

    def restart(self) -> None:
        print("restarting the emulator after a failed sweep", file=sys.stderr, flush=True)
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.emulator.stop()


@contextmanager
def lab_running(flavour: Flavour, warm_up_sessions: int, latency_s: float) -> Iterator[Lab]:
    """A started :class:`Lab`, its emulator stopped at the end whatever happens."""
    started = Lab(flavour, warm_up_sessions, latency_s)
    try:
        started.start()
        yield started
    finally:
        started.stop()


def bench_encodings(args: argparse.Namespace, lab: Lab) -> dict[Encoding, Runs]:
    tallies = {e: Runs() for e in Encoding}
    live = {f"l{i}" for i in range(args.live)}
    for round_no in range(args.repeat):
        for encoding in rounds_order(list(Encoding), round_no):
            kind = f"enc-{encoding}-{round_no}"
            put_sessions(
                lab.seeder, kind, sessions_for(encoding, args.expired, args.live), data_bytes=700
            )
            outcome = sweep_in_child(Spec(kind, encoding), lab.env)
            progress(str(encoding), round_no, outcome)
            if not tallies[encoding].add(str(encoding), round_no, outcome):
                lab.restart()
                continue
            left = names(lab.seeder, kind)
            if outcome.deleted != args.expired or left != live:
                raise SystemExit(
                    f"{encoding}: deleted {outcome.deleted} of {args.expired} expired; "
                    f"{len(left)} left, {len(left - live)} of them expired, "
                    f"{len(live - left)} live ones gone"
                )
            lab.clear()
    return tallies


def report_encodings(args: argparse.Namespace, tallies: dict[Encoding, Runs]) -> None:
    def rate(o: Outcome) -> float:
        return o.deleted / o.elapsed

    base = tallies[REFERENCE].median(rate)
    print(
        f"\nEncodings: {args.emulator} emulator, {args.latency_ms:g} ms added each way, "
        f"{args.expired} expired + {args.live} live "
        f"sessions, median of {args.repeat} rounds"
    )
    print(
        f"| encoding | deletes/s | vs {REFERENCE} | queries | lookups | commits | entities read "
        "| entities returned on the wire |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for encoding, runs in tallies.items():
        print(
            f"| {encoding} | {fmt(runs.median(rate), '.0f')} | {ratio(runs.median(rate), base)} "
            f"| {fmt(runs.median(lambda o: o.queries), '.0f')} "
            f"| {fmt(runs.median(lambda o: o.lookups), '.0f')} "
            f"| {fmt(runs.median(lambda o: o.commits), '.0f')} "
            f"| {fmt(runs.median(lambda o: o.entities_read), '.0f')} "
            f"| {fmt(runs.median(lambda o: o.wire.get('entities_read', 0)), '.0f')} |"
        )
    print(
        "entities read: the engine's entities_read; entities returned on the wire: entities "
        "and projections in query results, and entities found by lookups"
    )
    report_failures({str(e): runs for e, runs in tallies.items()})


def bench_descendants(args: argparse.Namespace, lab: Lab) -> dict[tuple[int, str], Runs]:
    tallies = {(c, m): Runs() for c in args.children for m in MODES}
    for round_no in range(args.repeat):
        for each, mode in rounds_order(list(tallies), round_no):
            kind = f"desc-{each}-{MODES.index(mode)}-{round_no}"
            seeded = sessions_for(REFERENCE, args.sessions, 0)
            put_sessions(lab.seeder, kind, seeded, data_bytes=700)
            seed_children(lab.seeder, kind, (s.name for s in seeded), each)
            with_descendants = mode != "plain"
            spec = Spec(
                kind,
                REFERENCE,
                with_descendants,
                verify=mode.endswith("verify"),
                descendant_queries=1 if mode == SEQUENTIAL else None,
            )
            outcome = sweep_in_child(spec, lab.env)
            label = f"{each} children, {mode}"
            progress(label, round_no, outcome)
            if not tallies[(each, mode)].add(label, round_no, outcome):
                lab.restart()
                continue
            check_descendants(
                lab.seeder, kind, outcome, args.sessions, each, with_descendants=with_descendants
            )
            lab.clear()
    return tallies


def check_descendants(
    client: datastore.Client,
    kind: str,
    outcome: Outcome,
    sessions: int,
    each: int,
    *,
    with_descendants: bool,
) -> None:
    """Every session gone; its children gone with ``--with-descendants``, all kept without."""
    left = names(client, kind)
    children = children_of(client, kind)
    expected_children = 0 if with_descendants else sessions * each
    expected_deleted = sessions * each if with_descendants else 0
    if (
        outcome.deleted != sessions
        or left
        or len(children) != expected_children
        or outcome.descendants_deleted != expected_deleted
    ):
        raise SystemExit(
            f"{kind}: deleted {outcome.deleted} of {sessions} sessions ({len(left)} left) and "
            f"{outcome.descendants_deleted} descendants; {len(children)} children left, "
            f"{expected_children} expected"
        )


def report_descendants(args: argparse.Namespace, tallies: dict[tuple[int, str], Runs]) -> None:
    def per_session(count: Callable[[Outcome], int]) -> Callable[[Outcome], float]:
        return lambda o: count(o) / o.deleted

    def elapsed(o: Outcome) -> float:
        return o.elapsed

    def entity_rate(o: Outcome) -> float:
        return (o.deleted + o.descendants_deleted) / o.elapsed

    print(
        f"\nDescendants: {args.emulator} emulator, {args.latency_ms:g} ms added each way, "
        f"{args.sessions} expired sessions, "
        f"median of {args.repeat} rounds; per session deleted, and time against the plain "
        "run with as many children"
    )
    print(
        "| children/session | mode | queries/session | lookups/session | commits "
        "| descendants deleted | entities deleted/s | time vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (each, mode), runs in tallies.items():
        plain = tallies[(each, "plain")].median(elapsed)
        print(
            f"| {each} | {mode} "
            f"| {fmt(runs.median(per_session(lambda o: o.queries)), '.2f')} "
            f"| {fmt(runs.median(per_session(lambda o: o.lookups)), '.2f')} "
            f"| {fmt(runs.median(lambda o: o.commits), '.0f')} "
            f"| {fmt(runs.median(lambda o: o.descendants_deleted), '.0f')} "
            f"| {fmt(runs.median(entity_rate), '.0f')} "
            f"| {ratio(runs.median(elapsed), plain)} |"
        )
    report_failures({f"{each} children, {mode}": runs for (each, mode), runs in tallies.items()})


def report_failures(tallies: dict[str, Runs]) -> None:
    """The sweeps that failed, and whether the engine's counts agree with the wire's."""
    for label, runs in tallies.items():
        if runs.failed:
            print(
                f"FAILED {label}: {len(runs.failed)} of {len(runs.failed) + len(runs.done)} "
                f"rounds (figures from the rest): {'; '.join(runs.failed)}"
            )
    found = {
        label: sorted({m for o in runs.done for m in o.wire_mismatches()})
        for label, runs in tallies.items()
    }
    if not any(found.values()):
        print(
            "engine's counts of queries, lookups and commits match the calls on the wire "
            "(lookups: in runs without retries)"
        )
    for label, mismatches in found.items():
        if mismatches:
            print(f"{label}: engine vs wire: {'; '.join(mismatches)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expired", type=int, default=10_000, help="per encoding")
    parser.add_argument("--live", type=int, default=1_000, help="per encoding")
    parser.add_argument("--sessions", type=int, default=2_000, help="with descendants")
    parser.add_argument("--children", type=int, nargs="+", default=[0, 1, 5])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--emulator", choices=FLAVOURS, default="datastore")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="delay added each way by a loopback proxy between the sweeps and the emulator, "
        "as production's round trips add",
    )
    parser.add_argument("--only", nargs="*", choices=("encodings", "descendants"), default=None)
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure("json", "warning", io.StringIO())  # keep sweeper's logs out of the table
    if args.child:
        run_child(args.child)
        return

    parts = args.only or ("encodings", "descendants")
    failed = False
    latency_s = args.latency_ms / 1000
    with lab_running(args.emulator, min(args.expired, 1_000), latency_s) as bench:
        if "encodings" in parts:
            by_encoding = bench_encodings(args, bench)
            report_encodings(args, by_encoding)
            failed |= any(runs.failed for runs in by_encoding.values())
        if "descendants" in parts:
            by_children = bench_descendants(args, bench)
            report_descendants(args, by_children)
            failed |= any(runs.failed for runs in by_children.values())
    if failed:
        raise SystemExit("some sweeps failed: see FAILED above")


if __name__ == "__main__":
    main()
