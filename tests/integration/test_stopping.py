"""Stopping on time in every phase: a real signal to a real process, against a real emulator.

Kubernetes sends SIGTERM and kills the pod 30 s later. From SIGTERM, SIGINT or the
``--max-runtime`` deadline to the process's exit, with ``sweep_finished`` logged, must take at
most ``STOP_BUDGET_S`` whatever the sweep is doing: deleting, scanning pages where nothing has
expired, walking a shard's slices, waiting on the throttle, backing off from a database that is
gone, or waiting on a call that never answers; after the sweep, forecasting a dry run or pushing
to a Pushgateway. ``sweeper inspect`` must stop in time too.

Each test starts ``python -m sweeper`` with JSON logs, waits (by reading its log) until it is in
the phase under test, sends the signal and measures the seconds to exit. The measurements are
printed at the end of the module, per phase and emulator.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pytest
from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.engine import LEGACY_DELETERS_PER_STREAM
from sweeper.retry import STOP_BUDGET_S
from tests.integration.helpers import (
    ago,
    ahead,
    group_names,
    make_client,
    remaining,
    seed,
    stored,
)
from tests.support.emulator import Emulator, free_port
from tests.support.proxy import BlackHole, TcpProxy
from tests.support.seed import Session, put_sessions

S = Encoding.EPOCH_SECONDS
PROJECT = "sweeper-test"
CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
# How long the test waits for a phase to be reached, or for a process that overran its budget
# (so that the overrun is measured and reported rather than hanging the suite).
PHASE_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 40.0

# Phase a/f: a scan of this many live entities behind SCAN_DELAY_S of latency each way. A scan
# page holds at most 500 entities (query.PAGE_SIZE) and costs a round trip of 2 x SCAN_DELAY_S
# at least, so the scan takes over 7 s whatever the machine: well past the 3 s deadline.
SCAN_ENTITIES = 6000
SCAN_DELAY_S = 0.3


# --- A real sweeper process, its log read as it comes ------------------------------------------


@dataclass
class Proc:
    """A ``python -m sweeper`` process whose JSON log lines (on stderr) are parsed as they
    arrive; ``err`` keeps stderr's other lines (the one-line error), ``raw`` every line."""

    popen: subprocess.Popen[str]
    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    readers: list[threading.Thread] = field(default_factory=list)
    spawned_at: float = field(default_factory=time.monotonic)
    signalled_at: float | None = None
    exited_at: float | None = None
    exited_wall: float | None = None

    @classmethod
    def start(cls, env: dict[str, str], *args: str) -> Proc:
        popen = subprocess.Popen(
            [sys.executable, "-m", "sweeper", *args],
            # The fraction guard is off (test_guards.py): these kinds hold mostly expired ones.
            env={"SWEEPER_MAX_FRACTION": "1", **os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc = cls(popen)
        proc.readers = [
            threading.Thread(target=proc._read, args=(popen.stdout,), daemon=True),
            threading.Thread(target=proc._read, args=(popen.stderr,), daemon=True),
        ]
        for reader in proc.readers:
            reader.start()
        return proc

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            now = time.monotonic()
            with self.cond:
                self.raw.append(line.rstrip("\n"))
                if line.startswith("{"):
                    self.lines.append((now, json.loads(line)))
                    self.cond.notify_all()
                elif stream is self.popen.stderr:
                    self.err.append(line)

    def wait_for(
        self,
        event: str,
        where: Callable[[dict[str, Any]], bool] = lambda _e: True,
        timeout: float = PHASE_TIMEOUT_S,
    ) -> tuple[float, dict[str, Any]]:
        """The first (arrival time, event) named ``event`` that satisfies ``where``."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for arrived, logged in self.lines[seen:]:
                    if logged.get("event") == event and where(logged):
                        return arrived, logged
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    break
                self.cond.wait(min(left, 0.2))
        self.kill()
        pytest.fail(f"no {event!r} within {timeout} s; the process logged:\n{self.tail()}")

    def send(self, sig: signal.Signals) -> float:
        assert self.popen.poll() is None, f"exited before the signal:\n{self.tail()}"
        self.signalled_at = time.monotonic()
        self.popen.send_signal(sig)
        return self.signalled_at

    def finish(self) -> int:
        """Wait for the exit (killing the process, by its own pid, once past the timeout)."""
        try:
            self.popen.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {EXIT_TIMEOUT_S} s after the signal:\n{self.tail()}")
        self.exited_at, self.exited_wall = time.monotonic(), time.time()
        for reader in self.readers:  # they reach EOF at exit: the last lines are in
            reader.join(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    @property
    def stderr(self) -> str:
        with self.cond:
            return "".join(self.err)

    def tail(self, n: int = 8) -> str:
        with self.cond:
            return "output:\n  " + "\n  ".join(self.raw[-n:])


def sweep_proc(env: dict[str, str], kind: str, *args: str) -> Proc:
    return Proc.start(env, "sweep", "--kind", kind, "--log-format", "json", *args)


def emulator_env(host: str, project: str = PROJECT) -> dict[str, str]:
    return {"DATASTORE_EMULATOR_HOST": host, "DATASTORE_PROJECT_ID": project}


# --- Measuring, asserting, and reporting ------------------------------------------------------

MEASURED: list[tuple[str, str, float, int, str]] = []


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    rows = [
        f"  {phase:<50} {flavour:<10} {took:6.2f} s  exit {code:<4} {note}"
        for phase, flavour, took, code, note in MEASURED
    ]
    text = "\n".join(
        [
            "",
            f"seconds from signal (or deadline) to exit; budget {STOP_BUDGET_S:.0f} s",
            f"  {'phase':<50} {'emulator':<10} {'seconds':>8}  exit",
            *rows,
        ]
    )
    if reporter is not None:
        reporter.write_line(text)
    else:
        print(text)


def stopped(
    proc: Proc,
    phase: str,
    flavour: str,
    code: int,
    reason: str,
    max_runtime_s: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """Wait for the exit; record and check the seconds to it, the exit code, a clean stderr,
    and the ``sweep_finished`` summary as the last line; return the summary.

    The seconds are counted from the signal, or with ``max_runtime_s`` from the run's deadline:
    ``max_runtime_s`` after the sweep started, which is when ``sweep_finished`` was logged
    less its ``duration_s`` (the engine starts its clock before anything it logs).
    """
    returned = proc.finish()
    summary = _last_event(proc)
    assert proc.exited_at is not None
    assert proc.exited_wall is not None
    if max_runtime_s is None:
        assert proc.signalled_at is not None
        took = proc.exited_at - proc.signalled_at
    elif summary.get("event") == "sweep_finished":
        logged = dt.datetime.fromisoformat(summary["timestamp"].replace("Z", "+00:00"))
        deadline = logged.timestamp() - summary["duration_s"] + max_runtime_s
        took = proc.exited_wall - deadline
        note = f"{note} (process ran {proc.exited_at - proc.spawned_at:.2f} s)".strip()
    else:  # no summary to date the deadline by: count from the spawn (an upper bound)
        took = proc.exited_at - proc.spawned_at - max_runtime_s
    MEASURED.append((phase, flavour, took, returned, f"{_note(summary)} {note}".strip()))
    context = f"{phase} on {flavour}: {took:.2f} s, exit {returned}\n{proc.tail()}"
    assert took <= STOP_BUDGET_S, context
    assert returned == code, context
    assert "Traceback" not in proc.stderr, context
    assert summary.get("event") == "sweep_finished", context
    assert summary["stopped_reason"] == reason, context
    return summary


def _last_event(proc: Proc) -> dict[str, Any]:
    with proc.cond:
        return proc.lines[-1][1] if proc.lines else {}


def _note(summary: dict[str, Any]) -> str:
    if summary.get("event") != "sweep_finished":
        return ""
    keys = (
        "stopped_reason",
        "matched",
        "deleted",
        "unconfirmed",
        "retries",
        "entities_read",
        "queries",
    )
    return " ".join(f"{k}={summary[k]}" for k in keys if k in summary)


def via(proxy: TcpProxy | BlackHole, emulator: Emulator | None = None) -> dict[str, str]:
    return emulator_env(proxy.host, emulator.project if emulator else PROJECT)


# --- Phases -------------------------------------------------------------------------------------


def test_sigterm_while_deleting_stops_before_the_next_batch(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """Deleting one key per commit: SIGTERM stops the run between batches, none half-done."""
    groups = {"expired": stored(ago(hours=1), S, 3000)}
    seed(client, kind, groups)
    proc = sweep_proc(emulator.env, kind, "--batch-size", "1", "--log-level", "debug")
    arrived, _ = proc.wait_for("batch_deleted")
    time.sleep(max(0.0, arrived + 0.5 - time.monotonic()))
    proc.send(signal.SIGTERM)
    summary = stopped(proc, "deleting (batch 1)", emulator.flavour, 143, "signal")

    left = remaining(client, kind, group_names(groups, "expired"))
    assert 0 < summary["deleted"] < 3000
    assert len(left) == 3000 - summary["deleted"]
    assert summary["unconfirmed"] == 0


@pytest.fixture
def live_kind(emulator: Emulator) -> str:
    """A kind of SCAN_ENTITIES sessions none of which has expired."""
    kind = f"eq-live-{time.monotonic_ns()}"
    seed(make_client(emulator), kind, {"live": stored(ahead(hours=2), S, SCAN_ENTITIES)})
    return kind


@pytest.fixture
def slow_link(emulator: Emulator) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", emulator.port), delay_s=SCAN_DELAY_S) as proxy:
        yield proxy


def test_a_scan_where_nothing_has_expired_stops_on_sigterm(
    emulator: Emulator, live_kind: str, slow_link: TcpProxy
) -> None:
    """(a) A scan pages through the whole kind and no page ever yields a key to delete."""
    proc = sweep_proc(via(slow_link, emulator), live_kind, "--scan", "--format", "epoch-seconds")
    arrived, _ = proc.wait_for("scan_started")
    time.sleep(max(0.0, arrived + 3.5 - time.monotonic()))  # a few pages in
    proc.send(signal.SIGTERM)
    summary = stopped(proc, "a. scan, nothing expired", emulator.flavour, 143, "signal")

    assert summary["matched"] == 0
    assert 0 < summary["entities_read"] < SCAN_ENTITIES  # stopped mid-scan, pages in


def test_a_scan_where_nothing_has_expired_stops_at_max_runtime(
    emulator: Emulator, live_kind: str, slow_link: TcpProxy
) -> None:
    """(f) The same scan with --max-runtime 3s and no signal: exit 0 on time."""
    proc = sweep_proc(
        via(slow_link, emulator),
        live_kind,
        "--scan",
        "--format",
        "epoch-seconds",
        "--max-runtime",
        "3s",
    )
    summary = stopped(
        proc,
        "f. scan, --max-runtime 3s (from deadline)",
        emulator.flavour,
        0,
        "max_runtime",
        max_runtime_s=3.0,
    )
    assert summary["matched"] == 0
    assert summary["entities_read"] < SCAN_ENTITIES


def test_b_a_shard_walking_many_slices_stops_on_sigterm(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """(b) ``--shard 0/2`` over values spread one per hour bucket, every one of them in
    shard 1's buckets: shard 0 probes bucket after bucket and never finds a key of its own."""
    now_bucket = int(time.time()) // 3600
    first = now_bucket - 3 if (now_bucket - 3) % 2 else now_bucket - 4  # odd: shard 1's
    values = [(first - 2 * i) * 3600 + 1800 for i in range(300)]
    put_sessions(client, kind, [Session(f"spread-{i}", v) for i, v in enumerate(values)])

    with TcpProxy(("127.0.0.1", emulator.port), delay_s=0.05) as proxy:
        proc = sweep_proc(via(proxy, emulator), kind, "--format", "epoch-seconds", "--shard", "0/2")
        arrived, _ = proc.wait_for("query_range")
        time.sleep(max(0.0, arrived + 1.5 - time.monotonic()))
        proc.send(signal.SIGTERM)
        summary = stopped(proc, "b. --shard 0/2 walking slices", emulator.flavour, 143, "signal")

    assert summary["matched"] == 0


THROTTLED = 2500  # expired sessions: many batches, of which the throttle lets one through
# Batches of 2 keys at --max-rate 1: each waits 2 s for its budget (the first too).
BATCH = 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_c_a_throttle_wait_stops_on_a_signal(
    emulator: Emulator, client: datastore.Client, kind: str, sig: signal.Signals
) -> None:
    """(c) ``--max-rate 1``: one batch goes, the other workers wait their turns of 2 s."""
    groups = {"expired": stored(ago(hours=1), S, THROTTLED)}
    seed(client, kind, groups)
    proc = sweep_proc(
        emulator.env,
        kind,
        *("--format", "epoch-seconds", "--max-rate", "1", "--batch-size", str(BATCH)),
        *("--log-level", "debug"),
    )
    arrived, _ = proc.wait_for("batch_deleted")
    time.sleep(max(0.0, arrived + 1.0 - time.monotonic()))
    proc.send(sig)
    summary = stopped(
        proc,
        f"c. throttle wait (--max-rate 1), {sig.name}",
        emulator.flavour,
        CODES[sig],
        "signal",
    )
    # One batch went, 1 s before the signal; the next waited on the throttle until it.
    assert summary["deleted"] == BATCH
    left = len(remaining(client, kind, group_names(groups, "expired")))
    assert left == THROTTLED - summary["deleted"]


def test_c_a_throttle_wait_stops_at_max_runtime(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """(f) The same wait with --max-runtime 6s and no signal: exit 0 on time. At 0.5 deletes/s
    the first batch goes 4 s after the first delete is asked for, the second 4 s later: past
    the deadline, however slowly the run got to its first batch (up to 2 s)."""
    groups = {"expired": stored(ago(hours=1), S, THROTTLED)}
    seed(client, kind, groups)
    proc = sweep_proc(
        emulator.env,
        kind,
        *("--format", "epoch-seconds", "--max-rate", "0.5", "--batch-size", str(BATCH)),
        *("--max-runtime", "6s"),
    )
    summary = stopped(
        proc,
        "f. throttle wait, --max-runtime 6s (from deadline)",
        emulator.flavour,
        0,
        "max_runtime",
        max_runtime_s=6.0,
    )
    assert summary["deleted"] == BATCH


def _long_backoff(event: dict[str, Any]) -> bool:
    """A retry about to wait two seconds or more: a signal sent now lands in the backoff."""
    return float(event.get("wait_s") or 0) >= 2.0


def test_d_retry_backoff_after_the_database_went_away_stops_on_sigterm(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """(d) Mid-run the database's port starts refusing connections (the proxy in front of it
    is gone): every call in flight fails and backs off; SIGTERM lands in a backoff."""
    groups = {"expired": stored(ago(hours=1), S, 3000)}
    seed(client, kind, groups)
    proxy = TcpProxy(("127.0.0.1", emulator.port), delay_s=0.02).start()
    try:
        proc = sweep_proc(
            via(proxy, emulator),
            kind,
            "--format",
            "epoch-seconds",
            "--batch-size",
            "5",
            "--log-level",
            "debug",
        )
        arrived, _ = proc.wait_for("batch_deleted")
        time.sleep(max(0.0, arrived + 0.5 - time.monotonic()))
    finally:
        proxy.refuse()  # new connections are refused, open ones are cut
    _, retrying = proc.wait_for("call_retrying", _long_backoff)
    backoff = f"(signal 0.2 s into a {retrying['wait_s']} s backoff)"
    time.sleep(0.2)
    proc.send(signal.SIGTERM)
    summary = stopped(
        proc,
        "d. retry backoff, database gone mid-run",
        emulator.flavour,
        143,
        "signal",
        note=backoff,
    )

    assert summary["retries"] > 0
    assert summary["failed"] == 0  # stopping is not failing
    # A commit cut mid-flight may have landed unacknowledged: never more left than not deleted.
    left = remaining(client, kind, group_names(groups, "expired"))
    assert len(left) <= 3000 - summary["deleted"]


def test_d_a_port_refused_from_the_start_fails_at_once() -> None:
    """(d) Nothing listens on the port from the start: no backoff to stop, since before any
    call has succeeded a refused connection is a mistake: exit 1 within seconds, one line
    naming the address. (A port that starts refusing mid-run is ridden out: the test above.)"""
    host = f"127.0.0.1:{free_port()}"
    proc = sweep_proc(emulator_env(host), "eq-session", "--format", "epoch-seconds")
    returned = proc.finish()
    assert proc.exited_at is not None
    took = proc.exited_at - proc.spawned_at
    MEASURED.append(("d. port refused from the start", "(none)", took, returned, "fails at once"))
    assert returned == 1, proc.tail()
    assert took < 10, proc.tail()
    assert proc.stderr.strip() == (
        f"sweeper: error: cannot reach the Datastore emulator at {host} "
        "(DATASTORE_EMULATOR_HOST): connection refused. Is it running, and are the host and "
        "port right?"
    )


def test_e_deletes_in_flight_that_never_answer_are_reported_unconfirmed(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """(e) Mid-run the network swallows everything, open connections stay open: the deletes
    and queries in flight never get an answer (the call deadline is 20 s). The run waits
    ``drain_s`` for them, then logs them as ``unconfirmed`` and exits."""
    total = 3000
    groups = {"expired": stored(ago(hours=1), S, total)}
    seed(client, kind, groups)
    with TcpProxy(("127.0.0.1", emulator.port), delay_s=0.02) as proxy:
        proc = sweep_proc(
            via(proxy, emulator), kind, "--format", "epoch-seconds", "--batch-size", "10"
        )
        arrived, _ = proc.wait_for("query_range")
        time.sleep(max(0.0, arrived + 1.0 - time.monotonic()))
        proxy.hold()
        time.sleep(1.0)  # every worker is now stuck in a call that will not be answered
        proc.send(signal.SIGTERM)
        summary = stopped(
            proc, "e. delete in flight, never answered", emulator.flavour, 143, "signal"
        )
    assert summary["unconfirmed"] > 0
    # Delete workers (at most two per stream, four streams) x batch size.
    assert summary["unconfirmed"] <= LEGACY_DELETERS_PER_STREAM * 4 * 10
    left = len(remaining(client, kind, group_names(groups, "expired")))
    # An unconfirmed delete may or may not have reached the database before the hold.
    assert total - summary["deleted"] - summary["unconfirmed"] <= left <= total - summary["deleted"]


def _wait_for_a_call(hole: BlackHole, proc: Proc) -> None:
    """Until the process has connected and sent a request into the black hole."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while hole.received == 0:
        if time.monotonic() > deadline or proc.popen.poll() is not None:
            proc.kill()
            pytest.fail(f"nothing reached the black hole:\n{proc.tail()}")
        time.sleep(0.05)
    time.sleep(0.5)


def test_e_a_first_call_that_never_answers_stops_on_sigterm() -> None:
    """(e) The database accepts the connection and never answers anything, from the start."""
    with BlackHole() as hole:
        proc = sweep_proc(via(hole), "eq-session", "--format", "epoch-seconds")
        _wait_for_a_call(hole, proc)
        proc.send(signal.SIGTERM)
        summary = stopped(proc, "e. first call never answered", "(none)", 143, "signal")
    assert summary["unconfirmed"] == 0  # no delete was ever sent


def test_e_listing_the_namespaces_when_nothing_answers_stops_on_sigterm() -> None:
    """(e) ``--all-namespaces`` waiting on a namespace listing that never answers."""
    with BlackHole() as hole:
        proc = sweep_proc(via(hole), "eq-session", "--format", "epoch-seconds", "--all-namespaces")
        _wait_for_a_call(hole, proc)
        proc.send(signal.SIGTERM)
        returned = proc.finish()
    assert proc.exited_at is not None
    assert proc.signalled_at is not None
    took = proc.exited_at - proc.signalled_at
    MEASURED.append(("e. namespace listing never answered", "(none)", took, returned, ""))
    context = f"{took:.2f} s, exit {returned}\n{proc.tail()}"
    assert took <= STOP_BUDGET_S, context
    assert returned == 143, context
    assert "Traceback" not in proc.stderr, context
    (finished,) = [e for _t, e in proc.lines if e.get("event") == "run_finished"]
    assert finished["stopped_reason"] == "signal", context


def test_f_a_first_call_that_never_answers_stops_at_max_runtime() -> None:
    """(f) The same black hole with --max-runtime 3s and no signal: the call waiting in the
    run's own thread is given no longer than the drain past the deadline."""
    with BlackHole() as hole:
        proc = sweep_proc(
            via(hole), "eq-session", "--format", "epoch-seconds", "--max-runtime", "3s"
        )
        summary = stopped(
            proc,
            "f. first call never answered, --max-runtime 3s",
            "(none)",
            0,
            "max_runtime",
            max_runtime_s=3.0,
        )
    assert summary["unconfirmed"] == 0


def test_g_inspect_against_a_black_hole_stops_on_sigterm() -> None:
    """(g) ``sweeper inspect`` waiting on a call that never answers: one line, exit 143."""
    with BlackHole() as hole:
        proc = Proc.start(
            via(hole),
            "inspect",
            "--kind",
            "eq-session",
            "--format",
            "epoch-seconds",
            "--log-format",
            "json",
        )
        _wait_for_a_call(hole, proc)
        signalled = proc.send(signal.SIGTERM)
        returned = proc.finish()
    assert proc.exited_at is not None
    took = proc.exited_at - signalled
    MEASURED.append(("g. inspect, black hole", "(none)", took, returned, ""))
    context = f"inspect: {took:.2f} s, exit {returned}\n{proc.tail()}"
    assert took <= STOP_BUDGET_S, context
    assert returned == 143, context
    err = proc.stderr
    assert "Traceback" not in err, context
    assert err.count("\n") == 1, context
    assert err.startswith("sweeper: error: "), context
    assert "SIGTERM" in err, context


def test_h_a_signal_during_the_dry_runs_closing_forecast_ends_it(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """(h) After a dry run's ``sweep_finished``, its forecast reads the database again: the
    network swallows those reads, and SIGTERM ends the command at once, cleanly (exit 143)."""
    seed(client, kind, {"expired": stored(ago(hours=1), S, 50)})
    # Latency enough that the forecast's reads are still to come when the test holds them.
    with TcpProxy(("127.0.0.1", emulator.port), delay_s=0.2) as proxy:
        proc = sweep_proc(via(proxy, emulator), kind, "--format", "epoch-seconds", "--dry-run")
        proc.wait_for("sweep_finished")
        proxy.hold()  # the forecast's reads now hang unanswered
        time.sleep(1.0)
        proc.send(signal.SIGTERM)
        summary = stopped(proc, "h. dry run's closing forecast", emulator.flavour, 143, "complete")
    assert summary["matched"] == 50
    assert not [e for _t, e in proc.lines if e.get("event") == "forecast"]


def test_i_a_signal_during_the_metrics_push_ends_it(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """(i) The run is done and pushes its figures to a Pushgateway that never answers: SIGTERM
    ends the push at once (its own deadline is 10 s) and the command exits 143."""
    groups = {"expired": stored(ago(hours=1), S, 20)}
    seed(client, kind, groups)
    with BlackHole() as gateway:
        proc = sweep_proc(
            emulator.env,
            kind,
            "--format",
            "epoch-seconds",
            "--pushgateway",
            f"http://{gateway.host}",
        )
        proc.wait_for("sweep_finished")
        _wait_for_a_call(gateway, proc)
        proc.send(signal.SIGTERM)
        summary = stopped(proc, "i. metrics push never answered", emulator.flavour, 143, "complete")
    assert summary["deleted"] == 20
    assert not remaining(client, kind, group_names(groups, "expired"))
