"""Soak: sessions written, refreshed and swept on a schedule; how long expired ones linger.

One emulator. In this process a writer creates eq-session entities exactly as the eQ runner
does (int epoch-second ``expires_at``, only it indexed) at a steady rate with short expiries,
and a refresher does what the runner does on a request to an active session: read it, check
that it has not expired, work a few hundred milliseconds, write the whole entity back with a
new expiry. Every write is recorded in memory: the ground truth. Alongside, a scheduler runs
the real CLI (``python -m sweeper sweep ...``, a subprocess, as a CronJob would) every
``--schedule`` seconds, skipping a tick while a run is still going (``concurrencyPolicy:
Forbid``). After each run every tracked session is looked up by key, and every ``--sample``
seconds the sessions past expiry + grace are (lookups are strongly consistent), to learn when
each one disappeared and how many expired ones are still stored (the backlog).

The sessions measured are those created in the first ``--duration`` seconds (the cohort).
Then, by default, writing and refreshing go on (so the store stays in its steady state) while
the sweeps drain the cohort: the soak ends once every cohort session is gone, so every one's
delay is measured and none is left out as "not yet swept". ``--after quiet`` stops all traffic
instead, as when a survey closes.

Reports the delay from each session's final expiry + grace to its deletion (p50, p99, max),
the live sessions lost (removed by a run whose own cutoff said keep them: must be 0) and the
backlog over time. Prints a table and writes ``docs/soak.png``. Definitions and a measured
run: ``docs/retention.md``. Run with ``make soak`` (``python bench/soak.py --help``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: write the PNG only

import matplotlib.pyplot as plt
from google.cloud import datastore

from sweeper.testing.emulator import FLAVOURS, running
from sweeper.testing.seed import runner_epoch_seconds, runner_eq_session

REPO = Path(__file__).resolve().parent.parent
# Datastore's TTL documentation: "Data is typically deleted within 24 hours after its
# expiration date." (https://cloud.google.com/datastore/docs/ttl)
NATIVE_TTL_S = 24 * 3600
LOOKUP_CHUNK = 500  # keys per lookup (Datastore takes at most 1000)
SESSION_DATA = "x" * 700  # the runner's encrypted session blob, roughly


# --- the ground truth ---------------------------------------------------------------------------


@dataclass
class Write:
    """One write of a session: its create or a refresh. ``acked`` is None while in flight."""

    value: int  # the expires_at stored: int epoch seconds
    sent: float
    acked: float | None = None
    read: float | None = None  # a refresh: when it read the session


@dataclass
class Truth:
    """What the writer and the refresher did to one session, and what lookups saw of it."""

    name: str
    ttl: float
    writes: list[Write]
    last_present: float  # when it was last known to exist: a lookup's issue, or a write's ack
    measured: bool  # created before the cohort closed (--duration): its delay is reported
    gone_by: float | None = None  # answer time of the first lookup that did not find it
    gone_after: float | None = None  # last_present at that moment

    @property
    def expiry(self) -> int:
        """The latest expiry written (or being written)."""
        return self.writes[-1].value

    def expiry_before(self, instant: float) -> int:
        """The latest expiry among the writes sent by ``instant``."""
        return max(w.value for w in self.writes if w.sent <= instant)


class Ledger:
    """The ground truth, shared by every thread."""

    def __init__(self, grace: float, cohort_until: float) -> None:
        self.grace = grace
        self.cohort_until = cohort_until  # sessions created before this are measured
        self._lock = threading.Lock()
        self.sessions: dict[str, Truth] = {}
        # A request that found its (unexpired) session gone: the user would be logged out.
        self.refresh_found_gone: list[tuple[str, float]] = []
        self.refresh_too_late = 0  # the request came after expiry: the runner refuses it
        self.errors: list[str] = []
        self.found_again: set[str] = set()  # found gone, then found again (resurrected)

    def created(self, name: str, ttl: float, value: int, sent: float, acked: float) -> None:
        with self._lock:
            self.sessions[name] = Truth(
                name, ttl, [Write(value, sent, acked)], acked, sent < self.cohort_until
            )

    def measured(self, name: str) -> bool:
        with self._lock:
            return self.sessions[name].measured

    def ttl(self, name: str) -> float:
        with self._lock:
            return self.sessions[name].ttl

    def refresh_sent(self, name: str, value: int, read: float, sent: float) -> Write:
        write = Write(value, sent, read=read)
        with self._lock:
            self.sessions[name].writes.append(write)
        return write

    def refresh_acked(self, name: str, write: Write, acked: float) -> None:
        with self._lock:
            write.acked = acked
            truth = self.sessions[name]
            if truth.gone_by is None:
                truth.last_present = max(truth.last_present, acked)

    def found_gone_by_request(self, name: str, when: float) -> None:
        with self._lock:
            self.refresh_found_gone.append((name, when))

    def too_late(self) -> None:
        with self._lock:
            self.refresh_too_late += 1

    def error(self, what: str) -> None:
        with self._lock:
            self.errors.append(what)

    def tracked(self) -> list[str]:
        """Sessions not yet found gone."""
        with self._lock:
            return [t.name for t in self.sessions.values() if t.gone_by is None]

    def cohort_left(self) -> int:
        """Measured sessions not yet found gone."""
        with self._lock:
            return sum(t.measured and t.gone_by is None for t in self.sessions.values())

    def due(self, now: float) -> tuple[list[str], int]:
        """Sessions past expiry + grace not yet found gone, and how many others are stored."""
        with self._lock:
            pending = [(t.name, t.expiry) for t in self.sessions.values() if t.gone_by is None]
        due = [name for name, expiry in pending if expiry + self.grace < now]
        return due, len(pending) - len(due)

    def seen(
        self, present: Iterable[str], gone: Iterable[str], issued: float, answered: float
    ) -> None:
        """A lookup issued at ``issued`` and answered at ``answered`` found ``present`` only."""
        with self._lock:
            for name in present:
                truth = self.sessions[name]
                if truth.gone_by is not None:
                    self.found_again.add(name)
                truth.last_present = max(truth.last_present, issued)
            for name in gone:
                truth = self.sessions[name]
                if truth.gone_by is None:
                    truth.gone_by, truth.gone_after = answered, truth.last_present


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def look_up(client: datastore.Client, kind: str, ledger: Ledger, names: Sequence[str]) -> int:
    """Look sessions up by key, note what was found; returns how many exist."""
    found_total = 0
    for chunk in chunks(names, LOOKUP_CHUNK):
        issued = time.time()
        found = client.get_multi([client.key(kind, name) for name in chunk])
        answered = time.time()
        present = {entity.key.name for entity in found}
        ledger.seen(present, [n for n in chunk if n not in present], issued, answered)
        found_total += len(present)
    return found_total


# --- the web app: writer and refresher ----------------------------------------------------------


@dataclass(frozen=True)
class Load:
    rate: float
    ttl: tuple[float, float]
    refresh_fraction: float
    refresh_again: float
    lead: tuple[float, float]
    work: tuple[float, float]


class Refresher:
    """Requests to active sessions, each shortly before the session would expire.

    A request does what the runner's request loader does: get the session, treat it as gone
    if it has expired, and otherwise write it back whole with ``expires_at = now + timeout``;
    here with a few hundred milliseconds of work between the read and the write.
    """

    def __init__(
        self,
        client: datastore.Client,
        *,
        kind: str,
        ledger: Ledger,
        load: Load,
        rng: random.Random,
        stop: threading.Event,
    ) -> None:
        self._client, self._kind, self._ledger, self._load = client, kind, ledger, load
        self._rng, self._stop = rng, stop
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="request")

    def plan(self, name: str, expiry: int, first: bool) -> None:
        """Maybe schedule a request to this session shortly before it expires.

        Once the cohort has closed, its sessions get no new request (their users are done), so
        that all of them expire, and are swept, within a bounded time.
        """
        chance = self._load.refresh_fraction if first else self._load.refresh_again
        if time.time() >= self._ledger.cohort_until and self._ledger.measured(name):
            return
        with self._lock:
            if self._rng.random() >= chance:
                return
            at = expiry - self._rng.uniform(*self._load.lead)
            self._seq += 1
            heapq.heappush(self._heap, (at, self._seq, name))

    def run(self) -> None:
        while not self._stop.wait(0.02):
            now, due = time.time(), []
            with self._lock:
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
            for name in due:
                self._pool.submit(self._request, name)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _request(self, name: str) -> None:
        try:
            self._refresh(name)
        except Exception as exc:
            self._ledger.error(f"refresh {name}: {exc!r}")

    def _refresh(self, name: str) -> None:
        client, kind, ledger = self._client, self._kind, self._ledger
        read = time.time()
        entity = client.get(client.key(kind, name))
        if entity is None:
            ledger.found_gone_by_request(name, read)
            return
        if entity["expires_at"] < time.time():  # the runner's _is_session_valid
            ledger.too_late()
            return
        with self._lock:
            work = self._rng.uniform(*self._load.work)
        time.sleep(work)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ledger.ttl(name))
        value = runner_epoch_seconds(expires)
        assert value is not None
        refreshed = runner_eq_session(
            client,
            kind,
            name,
            expires,
            user_id=entity["user_id"],
            session_data=entity["session_data"],
            created_at=dt.datetime.fromisoformat(entity["created_at"]),
        )
        write = ledger.refresh_sent(name, value, read, time.time())
        client.put(refreshed)
        ledger.refresh_acked(name, write, time.time())
        self.plan(name, value, first=False)


def write_sessions(
    client: datastore.Client,
    *,
    kind: str,
    ledger: Ledger,
    refresher: Refresher,
    load: Load,
    rng: random.Random,
    stop: threading.Event,
) -> None:
    """New sessions at a steady rate, one put each, as the runner creates them."""
    interval, next_at = 1 / load.rate, time.monotonic()
    while not stop.is_set():
        wait = next_at - time.monotonic()
        if wait > 0:
            stop.wait(wait)
            continue
        next_at += interval
        name, ttl = str(uuid.uuid4()), rng.uniform(*load.ttl)
        now = dt.datetime.now(dt.UTC)
        expires = now + dt.timedelta(seconds=ttl)
        entity = runner_eq_session(
            client,
            kind,
            name,
            expires,
            user_id=f"user-{name[:8]}",
            session_data=SESSION_DATA,
            created_at=now,
            updated_at=now,
        )
        sent = time.time()
        try:
            client.put(entity)
        except Exception as exc:
            ledger.error(f"create {name}: {exc!r}")
            continue
        value = runner_epoch_seconds(expires)
        assert value is not None
        ledger.created(name, ttl, value, sent, time.time())
        refresher.plan(name, value, first=True)


# --- the scheduled sweeps -----------------------------------------------------------------------


def iso_seconds(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass
class Run:
    """One CLI run, as the scheduler saw it and as it logged itself."""

    index: int
    spawned: float
    exited: float
    exit_code: int
    events: dict[str, dict[str, Any]]
    stderr: str

    @property
    def finished(self) -> dict[str, Any]:
        return self.events.get("sweep_finished", {})

    @property
    def cutoff(self) -> float | None:
        logged = self.events.get("sweep_started", self.finished).get("cutoff")
        return iso_seconds(logged) if logged else None

    @property
    def window(self) -> tuple[float, float]:
        """From the run's sweep_started to its sweep_finished: its deletes fall in here."""
        started = self.events.get("sweep_started", {}).get("timestamp")
        finished = self.finished.get("timestamp")
        return (
            iso_seconds(started) if started else self.spawned,
            iso_seconds(finished) if finished else self.exited,
        )

    @property
    def deleted(self) -> int:
        return int(self.finished.get("deleted", 0))


class Scheduler:
    """Runs the CLI every ``schedule`` seconds, never two at once; checks every session after."""

    def __init__(
        self,
        command: list[str],
        env: dict[str, str],
        schedule: float,
        client: datastore.Client,
        *,
        kind: str,
        ledger: Ledger,
        stop: threading.Event,
    ) -> None:
        self._command, self._env, self._schedule = command, env, schedule
        self._client, self._kind, self._ledger, self._stop = client, kind, ledger, stop
        self.runs: list[Run] = []
        self.cohort_closed = threading.Event()
        self.drained = threading.Event()
        self._proc: subprocess.Popen[str] | None = None

    def run(self, started: float) -> None:
        tick = 1
        while not self._stop.wait(max(0.0, started + tick * self._schedule - time.time())):
            self.runs.append(self._sweep(len(self.runs) + 1))
            look_up(self._client, self._kind, self._ledger, self._ledger.tracked())
            if self.cohort_closed.is_set() and not self._ledger.cohort_left():
                self.drained.set()
                return
            # Ticks missed while the run went on are skipped, as concurrencyPolicy: Forbid.
            tick = max(tick + 1, math.floor((time.time() - started) / self._schedule) + 1)

    def _sweep(self, index: int) -> Run:
        spawned = time.time()
        self._proc = proc = subprocess.Popen(
            self._command,
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = proc.communicate()
        exited = time.time()
        events: dict[str, dict[str, Any]] = {}
        for line in out.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                events.setdefault(event.get("event", ""), event)
        return Run(index, spawned, exited, proc.returncode, events, err.strip())

    def interrupt(self) -> None:
        """Stop the run in flight, ours, by its own pid (SIGTERM: it logs its summary)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()


@dataclass
class Sample:
    at: float
    backlog: int  # past expiry + grace, still stored
    live: int  # stored, not yet past expiry + grace


def sample_backlog(
    client: datastore.Client,
    *,
    kind: str,
    ledger: Ledger,
    every: float,
    samples: list[Sample],
    stop: threading.Event,
) -> None:
    while True:
        now = time.time()
        due, live = ledger.due(now)
        samples.append(Sample(now, look_up(client, kind, ledger, due), live))
        if stop.wait(max(0.0, now + every - time.time())):
            return


# --- analysis -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one session left: the run that removed it, when, and whether it had the right."""

    name: str
    run: Run | None  # None: it vanished while no run was going
    lower: float  # the deletion happened after this...
    upper: float  # ...and by this
    expiry: int  # its latest expiry written by ``upper``
    delay: float  # upper - (expiry + grace)
    lost: bool


def outcomes(ledger: Ledger, runs: Sequence[Run]) -> list[Outcome]:
    result = []
    for truth in ledger.sessions.values():
        if truth.gone_by is None or truth.gone_after is None:
            continue
        lo, hi = truth.gone_after, truth.gone_by
        run = next((r for r in runs if r.spawned < hi and r.exited > lo), None)
        if run is not None:
            start, end = run.window
            lo, hi = max(lo, start), min(hi, end)
        expiry = truth.expiry_before(hi)
        cutoff = run.cutoff if run is not None else None
        lost = run is None or cutoff is None or expiry >= cutoff
        result.append(Outcome(truth.name, run, lo, hi, expiry, hi - (expiry + ledger.grace), lost))
    return result


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def refreshes_during_runs(ledger: Ledger, runs: Sequence[Run]) -> int:
    """Refreshes whose read-to-ack span overlapped a run's process."""
    count = 0
    for truth in ledger.sessions.values():
        for w in truth.writes[1:]:
            end = w.acked if w.acked is not None else w.sent
            start = w.read if w.read is not None else w.sent
            if any(r.spawned < end and r.exited > start for r in runs):
                count += 1
    return count


# --- the picture --------------------------------------------------------------------------------


def plot(
    path: Path,
    *,
    title: str,
    t0: float,
    cohort_until: float,
    drain: str,
    samples: Sequence[Sample],
    runs: Sequence[Run],
    results: Sequence[Outcome],
    unswept: int,
    lost: Sequence[Outcome],
    grace: float,
    schedule: float,
) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8.5), gridspec_kw={"hspace": 0.42})
    fig.suptitle(title, fontsize=11)

    xs = [(s.at - t0) / 60 for s in samples]
    top.step(xs, [s.live for s in samples], where="post", color="0.6", lw=1, label="live sessions")
    top.step(
        xs, [s.backlog for s in samples], where="post", color="tab:red", lw=1.4, label="backlog"
    )
    labelled: set[str] = set()
    for r in runs:
        start, end = r.window
        label = "sweep run" if r.exit_code == 0 else f"failed run (exit {r.exit_code})"
        top.axvspan(
            (start - t0) / 60,
            (max(end, start + 0.5) - t0) / 60,  # at least half a second wide, to be seen
            color="tab:blue" if r.exit_code == 0 else "black",
            alpha=0.35,
            lw=0,
            label=None if label in labelled else label,
        )
        labelled.add(label)
    top.axvline((cohort_until - t0) / 60, color="k", ls=":", lw=1)
    top.annotate(
        f"{drain} \u2192",
        xy=((cohort_until - t0) / 60, 0.6),
        xycoords=("data", "axes fraction"),
        xytext=(4, 0),
        textcoords="offset points",
        fontsize=8,
    )
    if samples:
        peak = max(samples, key=lambda s: s.backlog)
        top.annotate(
            f"max {peak.backlog}",
            xy=((peak.at - t0) / 60, peak.backlog),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color="tab:red",
        )
    if lost:
        top.plot(
            [(o.upper - t0) / 60 for o in lost],
            [0] * len(lost),
            "kx",
            ms=8,
            label=f"live session lost ({len(lost)})",
        )
    top.set_xlabel("minutes since start")
    top.set_ylabel("sessions stored")
    top.set_title(
        f"Backlog: sessions past expiry + grace ({grace:g} s) still stored, "
        f"sweeps every {schedule:g} s",
        fontsize=10,
    )
    top.set_ylim(bottom=0)
    top.legend(loc="lower center", bbox_to_anchor=(0.5, 1.09), fontsize=8, ncols=5, frameon=False)

    delays = sorted(o.delay for o in results)
    if delays:
        n = len(delays)
        bottom.step(delays, [(i + 1) / n for i in range(n)], where="post", color="tab:blue")
        right = max(delays[-1], schedule) * 1.12
        marks: list[tuple[str, float]] = []
        for label, value in (
            ("p50", percentile(delays, 50)),
            ("p99", percentile(delays, 99)),
            ("max", delays[-1]),
        ):
            text = f"{label} {value:.1f} s"
            if marks and value - marks[-1][1] < right / 40:  # too close to read apart
                marks[-1] = (f"{marks[-1][0]}, {text}", value)
            else:
                marks.append((text, value))
        for text, value in marks:
            bottom.axvline(value, color="tab:blue", ls="--", lw=0.8)
            bottom.annotate(
                text,
                xy=(value, 0.04),
                xytext=(3, 0),
                textcoords="offset points",
                rotation=90,
                fontsize=8,
                va="bottom",
            )
        bottom.axvline(schedule, color="0.5", ls=":", lw=1)
        bottom.annotate(
            "schedule\ninterval",
            xy=(schedule, 0.5),
            xytext=(-3, 0),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color="0.4",
        )
        bottom.set_xlim(min(0.0, delays[0]) - 0.5, right)
        ratio = NATIVE_TTL_S / delays[-1] if delays[-1] > 0 else float("inf")
        bottom.annotate(
            f"native TTL: \u201ctypically within 24 hours\u201d = {NATIVE_TTL_S:,} s,\n"
            f"{ratio:,.0f}\u00d7 this run's max: far to the right of this axis \u2192\n"
            "(and never for this data: TTL honours Timestamp values only,\n"
            "the runner stores int epoch seconds)",
            xy=(0.02, 0.96),
            xycoords="axes fraction",
            ha="left",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round", "fc": "lightyellow", "ec": "0.6"},
        )
    bottom.set_ylim(0, 1.02)
    bottom.set_xlabel("delay from expiry + grace to deletion (s)")
    bottom.set_ylabel("fraction of sessions swept")
    never = f"; {unswept:,} measured sessions never swept, not shown" if unswept else ""
    bottom.set_title(
        f"Delay after expiry + grace, {len(delays):,} sessions (CDF){never}",
        fontsize=10,
        color="tab:red" if unswept else "black",
    )
    bottom.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--emulator", choices=FLAVOURS, default="firestore")
    p.add_argument(
        "--duration",
        type=float,
        default=360,
        help="seconds during which the sessions measured are created (then the drain)",
    )
    p.add_argument(
        "--after",
        choices=("traffic", "quiet"),
        default="traffic",
        help="during the drain: keep writing and refreshing new sessions (steady state), "
        "or stop all traffic (as when a survey closes)",
    )
    p.add_argument("--rate", type=float, default=20, help="sessions created per second")
    p.add_argument("--ttl", type=float, nargs=2, default=(20, 60), metavar=("MIN", "MAX"))
    p.add_argument("--refresh-fraction", type=float, default=0.3, help="sessions refreshed")
    p.add_argument(
        "--refresh-again", type=float, default=0.5, help="chance of one more after a refresh"
    )
    p.add_argument(
        "--lead",
        type=float,
        nargs=2,
        default=(0.5, 3.0),
        metavar=("MIN", "MAX"),
        help="a request comes this many seconds before the session expires",
    )
    p.add_argument("--work-ms", type=float, nargs=2, default=(200, 500), metavar=("MIN", "MAX"))
    p.add_argument("--grace", type=int, default=10, help="seconds (sweep --grace)")
    p.add_argument("--schedule", type=float, default=15, help="seconds between run starts")
    p.add_argument("--sample", type=float, default=2, help="seconds between backlog samples")
    p.add_argument("--kind", default="eq-session")
    p.add_argument(
        "--sweep-arg",
        action="append",
        default=[],
        help="one more argument for every sweep run, e.g. --sweep-arg=--verify",
    )
    p.add_argument("--png", type=Path, default=REPO / "docs" / "soak.png")
    p.add_argument("--json", type=Path, help="also write the figures and every run here")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    load = Load(
        rate=args.rate,
        ttl=tuple(args.ttl),
        refresh_fraction=args.refresh_fraction,
        refresh_again=args.refresh_again,
        lead=tuple(args.lead),
        work=(args.work_ms[0] / 1000, args.work_ms[1] / 1000),
    )
    rng = random.Random(args.seed)
    command = [
        sys.executable,
        "-m",
        "sweeper",
        "sweep",
        "--kind",
        args.kind,
        "--format",
        "epoch-seconds",
        "--grace",
        f"{args.grace}s",
        "--log-format",
        "json",
        *args.sweep_arg,
    ]
    with running(args.emulator) as emulator:
        os.environ.update(emulator.env)
        env = {**os.environ, **emulator.env}
        app, sweeps_client, sampler_client = (
            datastore.Client(project=emulator.project) for _ in range(3)
        )
        stop_writing, stop_all = threading.Event(), threading.Event()
        t0 = time.time()
        ledger = Ledger(args.grace, cohort_until=t0 + args.duration)
        refresher = Refresher(
            app, kind=args.kind, ledger=ledger, load=load, rng=rng, stop=stop_writing
        )
        scheduler = Scheduler(
            command, env, args.schedule, sweeps_client, kind=args.kind, ledger=ledger, stop=stop_all
        )
        samples: list[Sample] = []
        threads = [
            threading.Thread(
                target=write_sessions,
                args=(app,),
                kwargs={
                    "kind": args.kind,
                    "ledger": ledger,
                    "refresher": refresher,
                    "load": load,
                    "rng": rng,
                    "stop": stop_writing,
                },
                name="writer",
            ),
            threading.Thread(target=refresher.run, name="refresher"),
            threading.Thread(target=scheduler.run, args=(t0,), name="scheduler"),
            threading.Thread(
                target=sample_backlog,
                args=(sampler_client,),
                kwargs={
                    "kind": args.kind,
                    "ledger": ledger,
                    "every": args.sample,
                    "samples": samples,
                    "stop": stop_all,
                },
                name="sampler",
            ),
        ]
        for thread in threads:
            thread.start()
        print(
            f"soak: {args.emulator} emulator on {emulator.host}; measuring the sessions created "
            f"in the first {args.duration:g} s, then draining ({args.after})",
            file=sys.stderr,
        )
        try:
            stop_all.wait(max(0.0, ledger.cohort_until - time.time()))
            if args.after == "quiet":
                stop_writing.set()
                threads[0].join()
                threads[1].join()
            scheduler.cohort_closed.set()
            # No request is planned for a cohort session once the cohort has closed, but one
            # planned before may still come (up to ttl max later) and extend it by ttl max;
            # then grace, and up to two schedule intervals (one tick skipped), and a margin.
            drain_s = 2 * load.ttl[1] + load.work[1] + args.grace + 3 * args.schedule + 30
            scheduler.drained.wait(drain_s)
        finally:
            stop_writing.set()
            stop_all.set()
            scheduler.interrupt()
            for thread in threads:
                thread.join()
        ended = time.time()
        # The last run's deletes, if the scheduler stopped before looking; then what is left.
        look_up(app, args.kind, ledger, ledger.tracked())
        query = app.query(kind=args.kind)
        query.keys_only()
        left = {entity.key.name for entity in query.fetch()}

    report(
        args,
        ledger=ledger,
        runs=scheduler.runs,
        samples=samples,
        left=left,
        t0=t0,
        ended=ended,
    )


def report(
    args: argparse.Namespace,
    *,
    ledger: Ledger,
    runs: Sequence[Run],
    samples: Sequence[Sample],
    left: set[str],
    t0: float,
    ended: float,
) -> None:
    results = outcomes(ledger, runs)
    sessions = ledger.sessions
    measured = [o for o in results if sessions[o.name].measured]
    lost = [o for o in results if o.lost]
    delays = [o.delay for o in measured]
    resolution = [o.upper - o.lower for o in measured]
    cohort = [t for t in sessions.values() if t.measured]
    cohort_left = [t for t in cohort if t.gone_by is None]
    refreshed = [t for t in sessions.values() if len(t.writes) > 1]
    peak = max(samples, key=lambda s: s.backlog) if samples else Sample(t0, 0, 0)
    durations = [float(r.finished.get("duration_s", r.exited - r.spawned)) for r in runs]
    # Found gone, then found again: a write re-created it after a delete.
    gone = {t.name for t in sessions.values() if t.gone_by is not None}
    resurrected = sorted(ledger.found_again | (left & gone))

    def p(values: Sequence[float], q: float) -> float | None:
        return round(percentile(values, q), 2) if values else None

    figures: dict[str, Any] = {
        "emulator": args.emulator,
        "after": args.after,
        "duration_s": args.duration,
        "wall_s": round(ended - t0, 1),
        "rate_per_s": args.rate,
        "grace_s": args.grace,
        "schedule_s": args.schedule,
        "sweep_args": args.sweep_arg,
        "sessions_written": len(sessions),
        "cohort": len(cohort),
        "cohort_rate_per_s": round(len(cohort) / args.duration, 2),
        "cohort_swept": len(measured),
        "cohort_not_swept": len(cohort_left),
        "cohort_not_swept_due": sum(t.expiry + ledger.grace < ended for t in cohort_left),
        "sessions_refreshed": len(refreshed),
        "refreshes": sum(len(t.writes) - 1 for t in sessions.values()),
        "refreshes_during_a_run": refreshes_during_runs(ledger, runs),
        "refreshes_refused_expired": ledger.refresh_too_late,
        "requests_found_session_gone": len(ledger.refresh_found_gone),
        "runs": len(runs),
        "runs_failed": sum(r.exit_code != 0 for r in runs),
        "run_duration_s_p50": p(durations, 50),
        "run_duration_s_max": round(max(durations), 2) if durations else None,
        "clock_sources": sorted({str(r.finished.get("clock_source")) for r in runs}),
        "deleted_by_runs": sum(r.deleted for r in runs),
        "sessions_seen_gone": len(gone),
        "vanished_outside_runs": sum(o.run is None for o in results),
        "stored_at_end": len(left),
        "resurrected": len(resurrected),
        "delay_s_p50": p(delays, 50),
        "delay_s_p99": p(delays, 99),
        "delay_s_max": round(max(delays), 2) if delays else None,
        "delay_s_min": round(min(delays), 2) if delays else None,
        "timing_resolution_s_p50": p(resolution, 50),
        "timing_resolution_s_max": round(max(resolution), 2) if resolution else None,
        "live_lost": len(lost),
        "max_backlog": peak.backlog,
        "max_backlog_at_s": round(peak.at - t0, 1),
        "live_sessions_max": max((s.live for s in samples), default=0),
        "errors": len(ledger.errors),
    }
    print_table(figures)
    for what in ledger.errors[:20]:
        print(f"error: {what}")
    for name, when in ledger.refresh_found_gone:
        print(f"REQUEST FOUND ITS SESSION GONE: {name} at {when - t0:.1f} s")
    for o in lost:
        writes = ", ".join(
            f"{w.value} sent {w.sent - t0:.2f}s acked "
            + (f"{w.acked - t0:.2f}s" if w.acked is not None else "never")
            for w in sessions[o.name].writes
        )
        print(
            f"LOST {o.name}: gone between {o.lower - t0:.2f}s and {o.upper - t0:.2f}s, "
            f"expiry {o.expiry}, writes [{writes}]"
        )
        print(f"  run: {json.dumps(o.run.finished if o.run else None)}")
    failures: dict[str, list[int]] = {}
    for r in runs:
        if r.exit_code != 0:
            failures.setdefault(r.stderr.splitlines()[-1] if r.stderr else "", []).append(r.index)
    for message, indexes in failures.items():
        print(f"runs {indexes} failed: {message}")
    for name in resurrected[:20]:
        print(f"RESURRECTED {name}")

    title = (
        f"sweeper soak, {args.emulator} emulator: runner-shaped sessions at {args.rate:g}/s, "
        f"{len(refreshed):,} of {len(sessions):,} refreshed; live sessions lost: {len(lost)}"
    )
    drain = "cohort closes, traffic goes on" if args.after == "traffic" else "all traffic stops"
    plot(
        args.png,
        title=title,
        t0=t0,
        cohort_until=ledger.cohort_until,
        drain=drain,
        samples=samples,
        runs=runs,
        results=measured,
        unswept=len(cohort_left),
        lost=lost,
        grace=args.grace,
        schedule=args.schedule,
    )
    print(f"\nwrote {args.png}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"figures": figures, "runs": [r.finished for r in runs]}, indent=2, default=str
            )
        )
        print(f"wrote {args.json}")


def print_table(f: dict[str, Any]) -> None:
    extra = f" {' '.join(f['sweep_args'])}" if f["sweep_args"] else ""
    rows = [
        ("emulator", f"{f['emulator']} ({'/'.join(f['clock_sources'])} clock)"),
        (
            "sessions measured",
            f"{f['cohort']:,} created in the first {f['duration_s']:g} s "
            f"({f['cohort_rate_per_s']:g}/s); {f['cohort_swept']:,} swept, "
            f"{f['cohort_not_swept']} not ({f['cohort_not_swept_due']} of them due)",
        ),
        (
            "sessions written in all",
            f"{f['sessions_written']:,} (drain with {f['after']}), {f['wall_s']:g} s in all",
        ),
        (
            "refreshed",
            f"{f['sessions_refreshed']:,} sessions, {f['refreshes']:,} refreshes "
            f"({f['refreshes_during_a_run']:,} overlapping a run; "
            f"{f['refreshes_refused_expired']} came after expiry and were refused)",
        ),
        (
            "sweep runs",
            f"{f['runs']}, every {f['schedule_s']:g} s, --grace {f['grace_s']}s{extra}; "
            f"{f['runs_failed']} failed; duration_s p50 {f['run_duration_s_p50']}, "
            f"max {f['run_duration_s_max']}",
        ),
        (
            "swept",
            f"{f['sessions_seen_gone']:,} sessions seen gone; runs reported "
            f"{f['deleted_by_runs']:,} deleted",
        ),
        (
            "delay after expiry + grace (measured)",
            f"p50 {f['delay_s_p50']} s, p99 {f['delay_s_p99']} s, max {f['delay_s_max']} s "
            f"(min {f['delay_s_min']} s; deletion instant known within "
            f"{f['timing_resolution_s_p50']} s p50, {f['timing_resolution_s_max']} s max)",
        ),
        ("native TTL, documented", "typically within 24 h (86,400 s); Timestamp values only"),
        ("LIVE SESSIONS LOST", f["live_lost"]),
        ("requests that found their session gone", f["requests_found_session_gone"]),
        (
            "max backlog",
            f"{f['max_backlog']:,} sessions at {f['max_backlog_at_s']:g} s "
            f"(live sessions stored: up to {f['live_sessions_max']:,})",
        ),
        (
            "at the end",
            f"{f['stored_at_end']:,} stored, {f['resurrected']} resurrected, "
            f"{f['vanished_outside_runs']} vanished outside a run, {f['errors']} errors",
        ),
    ]
    print("\n| soak | |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
