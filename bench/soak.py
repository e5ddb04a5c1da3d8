"""Soak: sessions written, refreshed and swept on a schedule; how long expired ones linger.

A writer and a refresher act as the eQ runner does, recording every write (the ground truth);
the real CLI sweeps every --schedule seconds; lookups tell when each session disappeared.
Prints the delay after expiry + grace, the live sessions lost and the backlog, and writes a
PNG. What it does and the definitions: docs/retention.md. Run with ``make soak``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The test helpers (emulators, proxy, seeding) live in tests/support, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.cloud import datastore
from matplotlib.figure import Figure  # no pyplot, no display: the PNG only

from tests.support.emulator import FLAVOURS, running
from tests.support.seed import runner_eq_session

REPO = Path(__file__).resolve().parent.parent
KIND = "eq-session"
NATIVE_TTL = "typically within 24 h (86,400 s), only for Timestamp values"  # datastore/docs/ttl
DATA = "x" * 700  # the runner's encrypted session blob, roughly
REFRESH_AGAIN = 0.5  # the chance of one more request after a refresh
LEAD = (0.5, 3.0)  # a request comes this many seconds before the session expires
WORK = (0.2, 0.5)  # seconds of work between a request's read and its write
LOOKUP_CHUNK = 500  # keys per lookup (Datastore takes at most 1000)


@dataclass
class Write:
    value: int  # the expires_at stored: int epoch seconds
    sent: float
    acked: float | None = None  # None while in flight
    read: float | None = None  # a refresh: when it read the session


@dataclass
class Truth:
    name: str
    ttl: float
    writes: list[Write]
    last_present: float  # last known to exist: a lookup's issue, or a write's ack
    measured: bool  # created before the cohort closed
    gone_by: float | None = None  # answer time of the first lookup that did not find it
    gone_after: float | None = None  # last_present at that moment


@dataclass
class Run:
    spawned: float
    exited: float
    exit_code: int
    finished: dict[str, Any]  # its sweep_finished event
    error: str  # the last line of its stderr
    cutoff: float | None
    start: float  # sweep_started to sweep_finished: its deletes fall in here
    end: float


@dataclass
class Outcome:
    truth: Truth
    run: Run | None  # None: it vanished while no run was going
    lower: float  # the deletion happened after this...
    upper: float  # ...and by this
    expiry: int  # the latest expiry written by ``upper``
    delay: float  # upper - (expiry + grace)
    lost: bool


def iso(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


class Soak:
    """The ground truth, and the threads that write, refresh, sweep and look sessions up."""

    def __init__(self, args: argparse.Namespace, t0: float) -> None:
        self.args, self.grace, self.t0 = args, args.grace, t0
        self.cohort_until = t0 + args.duration
        self.rng = random.Random(1)
        self.lock = threading.Lock()
        self.sessions: dict[str, Truth] = {}
        self.found_gone: list[tuple[str, float]] = []  # a request found its session gone
        self.too_late = 0  # a request came after expiry: the runner refuses it
        self.errors: list[str] = []
        self.found_again: set[str] = set()  # found gone, then found again
        self.runs: list[Run] = []
        self.samples: list[tuple[float, int, int]] = []  # (at, backlog, live stored)
        self.requests: list[tuple[float, str]] = []  # a heap: (when, session)
        self.stop_traffic, self.stop_all = threading.Event(), threading.Event()
        self.proc: subprocess.Popen[str] | None = None
        self.command = [
            *(sys.executable, "-m", "sweeper", "sweep", "--kind", KIND),
            *("--format", "epoch-seconds", "--grace", f"{args.grace}s", "--log-format", "json"),
            *args.sweep_arg,
        ]

    def pending(self) -> list[Truth]:  # not yet found gone
        with self.lock:
            return [t for t in self.sessions.values() if t.gone_by is None]

    def look_up(self, client: datastore.Client, names: list[str]) -> int:
        """Look sessions up by key and note what was found; returns how many exist."""
        found = 0
        for i in range(0, len(names), LOOKUP_CHUNK):
            chunk, issued = names[i : i + LOOKUP_CHUNK], time.time()
            present = {e.key.name for e in client.get_multi([client.key(KIND, n) for n in chunk])}
            answered, found = time.time(), found + len(present)
            with self.lock:
                for truth in (self.sessions[name] for name in chunk):
                    if truth.name not in present:
                        if truth.gone_by is None:
                            truth.gone_by, truth.gone_after = answered, truth.last_present
                        continue
                    if truth.gone_by is not None:
                        self.found_again.add(truth.name)
                    truth.last_present = max(truth.last_present, issued)
        return found

    def writer(self, client: datastore.Client) -> None:
        """New sessions at a steady rate, one put each, as the runner creates them."""
        interval, next_at = 1 / self.args.rate, time.monotonic()
        while not self.stop_traffic.wait(max(0.0, next_at - time.monotonic())):
            next_at += interval
            name, ttl = str(uuid.uuid4()), self.rng.uniform(*self.args.ttl)
            expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl)
            user = f"user-{name[:8]}"
            entity = runner_eq_session(client, KIND, name, expires, user_id=user, session_data=DATA)
            sent = time.time()
            try:
                client.put(entity)
            except Exception as exc:
                self.errors.append(f"create {name}: {exc!r}")
                continue
            value, acked = entity["expires_at"], time.time()
            with self.lock:
                measured = sent < self.cohort_until
                self.sessions[name] = Truth(name, ttl, [Write(value, sent, acked)], acked, measured)
            self.plan(name, value, self.args.refresh_fraction)

    def plan(self, name: str, expiry: int, chance: float) -> None:
        """Maybe a request shortly before it expires; none to the cohort once it has closed."""
        with self.lock:
            if time.time() >= self.cohort_until and self.sessions[name].measured:
                return
            if self.rng.random() < chance:
                heapq.heappush(self.requests, (expiry - self.rng.uniform(*LEAD), name))

    def refresher(self, client: datastore.Client) -> None:  # up to 16 requests at once
        pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="request")
        while not self.stop_traffic.wait(0.02):
            with self.lock:
                due = []
                while self.requests and self.requests[0][0] <= time.time():
                    due.append(heapq.heappop(self.requests)[1])
            for name in due:
                pool.submit(self.request, client, name)
        pool.shutdown(wait=True, cancel_futures=True)

    def request(self, client: datastore.Client, name: str) -> None:
        """As the runner's: get it, check its expiry, work, put it whole with now + timeout."""
        read = time.time()
        try:
            entity = client.get(client.key(KIND, name))
            if entity is None:
                self.found_gone.append((name, read))
                return
            with self.lock:
                if entity["expires_at"] < time.time():  # the runner's _is_session_valid
                    self.too_late += 1
                    return
                work, truth = self.rng.uniform(*WORK), self.sessions[name]
            time.sleep(work)
            user, data = entity["user_id"], entity["session_data"]
            born = dt.datetime.fromisoformat(entity["created_at"])
            expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=truth.ttl)
            refreshed = runner_eq_session(
                client, KIND, name, expires, user_id=user, session_data=data, created_at=born
            )
            write = Write(refreshed["expires_at"], time.time(), read=read)
            with self.lock:
                truth.writes.append(write)
            client.put(refreshed)
            with self.lock:
                write.acked = time.time()
                if truth.gone_by is None:
                    truth.last_present = max(truth.last_present, write.acked)
            self.plan(name, write.value, REFRESH_AGAIN)
        except Exception as exc:
            self.errors.append(f"refresh {name}: {exc!r}")

    def scheduler(self, client: datastore.Client) -> None:
        """The CLI every --schedule seconds, never two at once; every session looked up after."""
        tick, every = 1, self.args.schedule
        while not self.stop_all.wait(max(0.0, self.t0 + tick * every - time.time())):
            self.runs.append(self.sweep())
            self.look_up(client, [t.name for t in self.pending()])
            if time.time() > self.cohort_until and not any(t.measured for t in self.pending()):
                return  # drained
            # Ticks missed while the run went on are skipped, as concurrencyPolicy: Forbid.
            tick = max(tick + 1, math.floor((time.time() - self.t0) / every) + 1)

    def sweep(self) -> Run:
        spawned = time.time()
        pipe = subprocess.PIPE
        self.proc = proc = subprocess.Popen(self.command, stdout=pipe, stderr=pipe, text=True)
        _out, err = proc.communicate()
        exited = time.time()
        logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        events = {event.get("event"): event for event in reversed(logged)}  # the first of each
        plain = [line for line in err.splitlines() if not line.startswith("{")]  # the error
        started, finished = events.get("sweep_started", {}), events.get("sweep_finished", {})
        cutoff = events.get("sweep_started", finished).get("cutoff")
        return Run(
            *(spawned, exited, proc.returncode, finished, (plain or [""])[-1]),
            cutoff=iso(cutoff) if cutoff else None,
            start=iso(started["timestamp"]) if "timestamp" in started else spawned,
            end=iso(finished["timestamp"]) if "timestamp" in finished else exited,
        )

    def sampler(self, client: datastore.Client) -> None:
        """Every --sample seconds, the sessions past expiry + grace: how many are still stored."""
        while True:
            now, pending = time.time(), self.pending()
            due = [t.name for t in pending if t.writes[-1].value + self.grace < now]
            self.samples.append((now, self.look_up(client, due), len(pending) - len(due)))
            if self.stop_all.wait(max(0.0, now + self.args.sample - time.time())):
                return


def outcomes(soak: Soak) -> list[Outcome]:
    """Each session found gone: the interval it went in, narrowed to the one run overlapping it."""
    result = []
    for truth in soak.sessions.values():
        if truth.gone_by is None or truth.gone_after is None:
            continue
        lo, hi = truth.gone_after, truth.gone_by
        run = next((r for r in soak.runs if r.spawned < hi and r.exited > lo), None)
        if run is not None:
            lo, hi = max(lo, run.start), min(hi, run.end)
        expiry = max(w.value for w in truth.writes if w.sent <= hi)  # an in-flight one too
        lost = run is None or run.cutoff is None or expiry >= run.cutoff
        result.append(Outcome(truth, run, lo, hi, expiry, hi - (expiry + soak.grace), lost))
    return result


def spread(values: list[float]) -> list[float]:
    """p50, p99 and max (nan when there are no values)."""
    if not values:
        return [math.nan] * 3
    q = statistics.quantiles(values * 2 if len(values) == 1 else values, n=100, method="inclusive")
    return [round(v, 2) for v in (q[49], q[98], max(values))]


def report(soak: Soak, ended: float, left: set[str]) -> None:
    args, t0, runs, grace = soak.args, soak.t0, soak.runs, soak.grace
    truths = list(soak.sessions.values())
    results = outcomes(soak)
    measured = [o for o in results if o.truth.measured]
    lost = [o for o in results if o.lost]
    cohort = sum(t.measured for t in truths)
    cohort_left = [t for t in truths if t.measured and t.gone_by is None]
    refreshes = [w for t in truths for w in t.writes[1:]]
    overlapping = sum(
        any(r.spawned < (w.acked or w.sent) and r.exited > (w.read or w.sent) for r in runs)
        for w in refreshes
    )
    gone = {t.name for t in truths if t.gone_by is not None}
    resurrected = sorted(soak.found_again | (left & gone))  # a write re-created it after a delete
    vanished = sum(o.run is None for o in results)
    peak = max(soak.samples, key=lambda s: s[1], default=(t0, 0, 0))
    delays = [o.delay for o in measured]
    d50, d99, dmax = spread(delays)
    r50, _, rmax = spread([o.upper - o.lower for o in measured])
    u50, _, umax = spread([float(r.finished.get("duration_s", r.exited - r.spawned)) for r in runs])
    clocks = "/".join(sorted({str(r.finished.get("clock_source")) for r in runs}))
    table = {
        "emulator": f"{args.emulator} ({clocks} clock)",
        "sessions measured": f"{cohort:,} created in the first {args.duration:g} s "
        f"({cohort / args.duration:g}/s); {len(measured):,} swept, {len(cohort_left)} not "
        f"({sum(t.writes[-1].value + grace < ended for t in cohort_left)} of them due)",
        "sessions written in all": f"{len(truths):,}; {ended - t0:.1f} s, drain with {args.after}",
        "refreshed": f"{sum(len(t.writes) > 1 for t in truths):,} sessions, "
        f"{len(refreshes):,} refreshes ({overlapping:,} overlapping a run; "
        f"{soak.too_late} came after expiry and were refused)",
        "sweep runs": f"{len(runs)}, every {args.schedule:g} s, --grace {grace}s"
        f"{''.join(' ' + a for a in args.sweep_arg)}; {sum(r.exit_code != 0 for r in runs)} "
        f"failed; duration_s p50 {u50}, max {umax}",
        "swept": f"{len(gone):,} sessions seen gone; runs reported "
        f"{sum(int(r.finished.get('deleted', 0)) for r in runs):,} deleted",
        "delay after expiry + grace (measured)": f"p50 {d50} s, p99 {d99} s, max {dmax} s "
        f"(min {min(delays, default=math.nan):.2f} s; deletion instant known within {r50} s "
        f"p50, {rmax} s max)",
        "native TTL, documented": NATIVE_TTL,
        "LIVE SESSIONS LOST": len(lost),
        "requests that found their session gone": len(soak.found_gone),
        "max backlog": f"{peak[1]:,} sessions at {peak[0] - t0:.1f} s (live sessions stored: "
        f"up to {max((s[2] for s in soak.samples), default=0):,})",
        "at the end": f"{len(left):,} stored, {len(resurrected)} resurrected, {vanished} "
        f"vanished outside a run, {len(soak.errors)} errors",
    }
    print("\n| soak | |\n|---|---|")
    for label, value in table.items():
        print(f"| {label} | {value} |")
    for what in soak.errors[:20]:
        print(f"error: {what}")
    for name, when in soak.found_gone:
        print(f"REQUEST FOUND ITS SESSION GONE: {name} at {when - t0:.1f} s")
    for o in lost:
        writes = [(w.value, w.sent - t0, w.acked and w.acked - t0) for w in o.truth.writes]
        print(f"LOST {o.truth.name} in {o.lower - t0:.2f}..{o.upper - t0:.2f} s, expiry {o.expiry}")
        print(f"  writes (value, sent, acked): {writes}\n  run: {o.run and o.run.finished}")
    failed = [(i, r.error) for i, r in enumerate(runs, 1) if r.exit_code != 0]
    for error in dict.fromkeys(e for _, e in failed):
        print(f"runs {[i for i, e in failed if e == error]} failed: {error}")
    for name in resurrected[:20]:
        print(f"RESURRECTED {name}")
    plot(soak, measured, lost, unswept=len(cohort_left))
    print(f"\nwrote {args.png}")
    if args.json:
        summaries = {"table": table, "runs": [r.finished for r in runs]}
        args.json.write_text(json.dumps(summaries, indent=2))
        print(f"wrote {args.json}")


def plot(soak: Soak, measured: list[Outcome], lost: list[Outcome], unswept: int) -> None:
    """Above, the backlog over time with the sweeps marked; below, the delays' CDF."""
    args, t0 = soak.args, soak.t0
    fig = Figure(figsize=(10, 8.5), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    xs = [(at - t0) / 60 for at, _, _ in soak.samples]
    top.step(xs, [s[2] for s in soak.samples], where="post", color="0.6", label="live sessions")
    backlog = [s[1] for s in soak.samples]
    peak = f"backlog (max {max(backlog, default=0)})"
    top.step(xs, backlog, where="post", color="tab:red", label=peak)
    for ok, color, label in ((True, "tab:blue", "sweep run"), (False, "black", "failed run")):
        starts = [(r.start - t0) / 60 for r in soak.runs if (r.exit_code == 0) == ok]
        if starts:
            axis = top.get_xaxis_transform()
            top.vlines(starts, 0, 1, transform=axis, color=color, lw=0.8, alpha=0.5, label=label)
    drain = "cohort closes, traffic goes on" if args.after == "traffic" else "all traffic stops"
    top.axvline((soak.cohort_until - t0) / 60, color="k", ls=":", label=drain)
    if lost:
        xs_lost = [(o.upper - t0) / 60 for o in lost]
        top.plot(xs_lost, [0] * len(lost), "kx", ms=8, label=f"live session lost ({len(lost)})")
    top_y = 1.3 * max((s[2] + s[1] for s in soak.samples), default=1)
    top.set(xlabel="minutes since start", ylabel="sessions stored", ylim=(0, top_y))
    top.set_title(
        f"sweeper soak, {args.emulator} emulator, {args.rate:g} sessions/s: {len(lost)} live "
        f"sessions lost\nthe backlog: sessions past expiry + {args.grace} s grace, still stored"
    )
    top.legend(loc="upper center", ncols=5, fontsize=8)

    delays = sorted(o.delay for o in measured)
    n = len(delays)
    bottom.step(delays, [(i + 1) / n for i in range(n)], where="post", color="tab:blue")
    marks = zip(("p50", "p99", "max"), spread(delays), ("--", "-.", ":"), strict=True)
    for name, value, ls in marks if n else ():
        bottom.axvline(value, color="tab:blue", ls=ls, lw=0.8, label=f"{name} {value:.1f} s")
    bottom.axvline(args.schedule, color="0.5", label=f"schedule interval ({args.schedule:g} s)")
    bottom.set(ylim=(0, 1.02), ylabel="fraction of sessions swept")
    bottom.set_xlabel(f"delay from expiry + grace to deletion (s); native TTL: {NATIVE_TTL}")
    never = f"; {unswept:,} measured sessions never swept, not shown" if unswept else ""
    color = "tab:red" if unswept else "k"
    bottom.set_title(f"Delay after expiry + grace, {n:,} sessions (CDF){never}", color=color)
    bottom.grid(alpha=0.3)
    bottom.legend(loc="lower right", fontsize=8)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = p.add_argument
    add("--emulator", choices=FLAVOURS, default="firestore", help="which emulator")
    add("--duration", type=float, default=360, help="seconds the measured sessions are made in")
    add("--after", choices=("traffic", "quiet"), default="traffic", help="traffic in the drain")
    add("--rate", type=float, default=20, help="sessions created per second")
    add("--ttl", type=float, nargs=2, default=(20, 60), metavar=("MIN", "MAX"), help="timeouts, s")
    add("--refresh-fraction", type=float, default=0.3, help="share of sessions refreshed")
    add("--grace", type=int, default=10, help="seconds (sweep --grace)")
    add("--schedule", type=float, default=15, help="seconds between run starts")
    add("--sample", type=float, default=2, help="seconds between backlog lookups")
    add("--sweep-arg", action="append", default=[], help="more for each run: --sweep-arg=--verify")
    add("--png", type=Path, default=REPO / "docs" / "soak.png", help="the figure")
    add("--json", type=Path, help="also write the table and every run's summary here")
    args = p.parse_args()
    with running(args.emulator) as emulator:
        os.environ.update(emulator.env)  # for the clients and the CLI runs
        soak = Soak(args, t0=time.time())
        app = datastore.Client(project=emulator.project)
        threads = [
            threading.Thread(target=f, args=(datastore.Client(project=emulator.project),))
            for f in (soak.writer, soak.refresher, soak.scheduler, soak.sampler)
        ]
        for thread in threads:
            thread.start()
        print(f"soak on {emulator.host}: {args.duration:g} s, then the drain", file=sys.stderr)
        try:
            time.sleep(max(0.0, soak.cohort_until - time.time()))
            if args.after == "quiet":
                soak.stop_traffic.set()
                for thread in threads[:2]:  # the writer and the refresher
                    thread.join()
            # The drain: a request planned before the close may still come (up to ttl max
            # later) and add ttl max; then grace, two intervals (one tick skipped), and a margin.
            threads[2].join(2 * args.ttl[1] + WORK[1] + args.grace + 3 * args.schedule + 30)
        finally:
            soak.stop_traffic.set()
            soak.stop_all.set()
            if soak.proc is not None and soak.proc.poll() is None:
                soak.proc.terminate()  # the run in flight, ours, by its pid: it logs its summary
            for thread in threads:
                thread.join()
        ended = time.time()
        # The last run's deletes, if the scheduler stopped before looking; then what is left.
        soak.look_up(app, [t.name for t in soak.pending()])
        left = {e.key.name for e in app.query(kind=KIND, projection=["__key__"]).fetch()}
    report(soak, ended, left)


if __name__ == "__main__":
    main()
