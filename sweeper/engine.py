"""The sweep: detect the encoding, page through expired keys, delete them in batches.

Everything that varies is injected (client, clock, monotonic time, sleep, stop signal), so the
same code runs against production, the emulator and unit tests that never wait. The engine
never raises for an operational failure: it returns a :class:`SweepResult` and always logs
exactly one ``sweep_finished`` event, which operators alert on.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import structlog
from google.cloud import datastore

from sweeper import checks, guard
from sweeper.checks import SKEW_WARNING_S, Stored, read_clock
from sweeper.concurrency import Background, CallLimiter, Pipeline, together
from sweeper.deleter import LEGACY_LIMIT, BatchSizer, refused_error
from sweeper.encodings import Encoding
from sweeper.gate import (
    DESCENDANT_QUERIES,
    Gate,
    Rule,
)
from sweeper.logs import SweeperError, describe_exception, is_bug, report_bug
from sweeper.result import ProgressLog, Runtime, SweepResult
from sweeper.retry import (
    PUSHBACK,
    Allowance,
    Capped,
    Retrier,
    RetryCounter,
    Stopped,
    Stopper,
    StopReason,
)
from sweeper.settings import MAX_BATCH_SIZE, SweepSettings
from sweeper.sources import expired_streams
from sweeper.target import Count, Target
from sweeper.throttle import Throttle, ThrottleSettings

__all__ = ["Budget", "Runtime", "Sweep", "SweepResult"]


# A commit is one call (its deletes at the versions its page read), answered faster than the
# stream's next page: one delete worker per stream keeps up. On the Firestore emulator with 60
# ms each way, 15,000 sessions took 3.24 s start to exit with one (3.29x the bare loop) and
# 3.52 s with two (3.24x), the whole process timed by bench/bench_sweep.py.
DELETERS_PER_STREAM = 1


@dataclass(frozen=True)
class Budget:
    """What the sweeps of one run share when it sweeps one kind in many namespaces
    (``--all-namespaces``): the stop flag and the ``--max-runtime`` deadline, which end the
    whole run and not each namespace's part of it, and the throttle, whose ramp-up goes on
    from namespace to namespace instead of starting again at its base rate in each."""

    stopper: Stopper
    throttle: Throttle

    @classmethod
    def start(cls, settings: SweepSettings, rt: Runtime, deadline: float | None = None) -> Budget:
        """A fresh budget; ``deadline`` is a value of ``rt.monotonic`` (a lone sweep sets its
        own once it runs)."""
        stopper = Stopper(rt.stop_requested, rt.monotonic, rt.sleep, deadline)
        throttle = Throttle(
            ThrottleSettings(
                ramp_up=settings.ramp_up,
                max_rate=settings.max_rate,
                divisor=settings.shard.count,
            ),
            clock=rt.monotonic,
            sleep=stopper.pause,
        )
        return cls(stopper, throttle)


class Sweep:
    """One run over one kind. Create, then call :meth:`run` once.

    ``client`` is a Datastore client, or a function that builds one: building it can fail
    (no credentials, no project), and that failure still owes the operator a
    ``sweep_finished`` event.
    """

    def __init__(
        self,
        settings: SweepSettings,
        client: datastore.Client | Callable[[], datastore.Client],
        runtime: Runtime | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.settings = settings
        self._connect: Callable[[], datastore.Client] = (
            client if callable(client) else lambda: client
        )
        self.runtime = rt = runtime or Runtime()
        self._counter = RetryCounter()
        self._own_budget = budget is None
        self._budget = budget or Budget.start(settings, rt)
        self._stopper = self._budget.stopper
        self._throttle = self._budget.throttle
        # A query stream and its delete workers per worker (and the delete workers' ancestor
        # queries): nothing waits for a place unless connection loss has cut the limit.
        calls = 1 + DELETERS_PER_STREAM * (
            1 + (DESCENDANT_QUERIES if settings.with_descendants else 0)
        )
        self._limiter = CallLimiter(calls * settings.workers, rt.monotonic, self._stopper.check)
        self._sizer = BatchSizer(settings.batch_size, rt.monotonic)
        self._retrier = Retrier(
            rt.retry_policy,
            self._counter,
            on_failure=self._pushed_back,
            clock=rt.monotonic,
            stopper=self._stopper,
            limiter=self._limiter,
        )
        self._log = structlog.get_logger("sweeper").bind(kind=settings.kind)
        self._gate: Gate | None = None  # the run's one way to a delete, once it is set up
        self._abandoned = False

    def run(self) -> SweepResult:
        """Sweep in a thread of its own, so that a stop is honoured whatever it is doing.

        Once the run must stop (signal or deadline), calls in flight get ``drain_s`` to land;
        a call still hanging after that is abandoned and the summary says how many keys it
        carried. The process can exit under it: the thread is a daemon.
        """
        rt, s = self.runtime, self.settings
        started = rt.monotonic()
        if self._own_budget and s.max_runtime is not None:
            self._stopper.deadline = started + s.max_runtime.total_seconds()
        # Provisional, for a summary of a run that fails before it reads the database's clock.
        result = SweepResult(s, rt.now() - s.grace, s.format_label)
        body = Background(partial(self._body, result, started), f"sweep-{s.kind}")
        self._await(body)
        with result.lock:
            if body.running(0):
                self._abandoned = True
                result.stop(self._stopper.reason() or StopReason.SIGNAL)
                result.unconfirmed += self._in_flight()
            result.retries = self._counter.retries
            calls = self._counter.calls
            result.queries, result.lookups = calls["query"], calls["lookup"]
            result.commits = calls["delete"] + calls["verify"]
            result.duration_s = rt.monotonic() - started
            result.concurrency = self._limiter.degradation()
            result.commit_size = self._sizer.degradation()
            summary = result.summary()
        if rt.on_progress is not None:
            deleting = result.duration_s if result.deleting_s is None else result.deleting_s
            rt.on_progress(result, deleting, True)
        log = self._log.error if result.stopped_reason == StopReason.ERROR else self._log.info
        log("sweep_finished", **summary)
        return result

    def _await(self, body: Background[None]) -> None:
        rt = self.runtime
        while body.running(rt.poll_s):
            if self._stopper.stopping():
                break
        # Stopping: deletes in flight get up to drain_s to land, so the counts stay exact; a
        # query or a wait has nothing worth waiting for beyond one more poll to unwind.
        drain_until = rt.monotonic() + rt.drain_s
        body.running(rt.poll_s)
        while body.running(0) and self._in_flight() and rt.monotonic() < drain_until:
            body.running(rt.poll_s)

    def _in_flight(self) -> int:
        """Keys handed to a delete call not yet answered."""
        return 0 if self._gate is None else self._gate.ledger.in_flight

    def _body(self, result: SweepResult, started: float) -> None:
        try:
            client = self._connect()
            with result.lock:
                result.project = client.project
            target = Target(client, self._retrier, self.settings.kind, self.settings.prop)
            # The stored values are read while the clock is: neither needs the other, and on
            # a link of 60 ms each way that is a round trip less before the first delete.
            _, stored = together(
                partial(self._set_cutoff, target, result),
                partial(checks.read_stored, target, self.settings),
            )
            self._sweep(target, result, stored)
        except Stopped as stop:
            self._end(result, stop.reason)
        except SweeperError as exc:
            self._end(result, StopReason.ERROR, exc.message)
        except Exception as exc:  # what the client raises once retries are spent, or a bug
            if is_bug(exc):
                self._end(result, StopReason.ERROR, report_bug(self._log, exc))
            else:
                self._end(result, StopReason.ERROR, _datastore_failure(exc))

    def _set_cutoff(self, target: Target, result: SweepResult) -> None:
        """One cutoff per run, from the database's clock where it reports one.

        ``--verify`` re-checks against this same cutoff.
        """
        s = self.settings
        reading = read_clock(target, self.runtime.now)
        with result.lock:
            result.cutoff = reading.now - s.grace
            result.clock_source, result.clock_skew_s = reading.source, reading.skew_s
            result.verify = s.verify
            fields = result.summary()
        self._log.info(
            "sweep_started",
            **{k: v for k, v in fields.items() if k in _START_FIELDS},
            grace_s=s.grace.total_seconds(),
        )
        skew = reading.skew_s
        if reading.source == "local":
            self._log.info("clock_local", hint="the database reports no time: local clock used")
        elif skew is not None and abs(skew) > SKEW_WARNING_S:
            self._log.warning(
                "clock_skew",
                skew_s=round(skew, 3),
                hint="this host's clock is off; the cutoff uses the database's time",
            )

    def _end(self, result: SweepResult, reason: StopReason, error: str | None = None) -> None:
        with result.lock:
            if self._abandoned:  # the summary is out already: leave it as logged
                return
            if reason == StopReason.ERROR:
                result.stopped_reason, result.error = reason, error
            else:
                result.stop(reason)

    def _sweep(self, target: Target, result: SweepResult, stored: Stored) -> None:
        """The checks and the deletes, in their order (``sweeper.checks``)."""
        s, log = self.settings, self._log
        encoding = checks.choose_encoding(s, stored, result, log)
        scanned = None
        if encoding is not None:
            result.format = encoding.value
            confirm = self.runtime.confirm
            allowance = guard.allowance(target, s, encoding, result, confirm=confirm, log=log)
            seen = self._delete_expired(
                target, encoding, result, allowance, stored.smallest(s, encoding)
            )
            if s.scan:
                # No index holds a scan's values: what it read is what is known of them.
                complete = result.stopped_reason == StopReason.COMPLETE
                if complete:
                    checks.scan_census(s, encoding, seen, result, log)
                read = sum(seen.values())
                scanned = Count(read, "scan", None if complete else read)
        if result.stopped_reason in (StopReason.COMPLETE, StopReason.MAX_DELETES):
            checks.retention(target, s, encoding, result, log, scanned=scanned)

    def _delete_expired(
        self,
        target: Target,
        encoding: Encoding,
        result: SweepResult,
        allowance: Allowance,
        smallest: int | None,
    ) -> Counter[str]:
        """Drain the expired streams, every key through the one gate (``sweeper.gate``); a
        scan's census of the encodings it read."""
        s, rt = self.settings, self.runtime
        progress = ProgressLog(self._log, rt, self._counter, rt.monotonic(), s.dry_run)
        gate = Gate(
            target,
            Rule(s.kind, s.prop, encoding, result.cutoff),
            verify=result.verify,
            # Only Firestore in Datastore mode reports its time; elsewhere (the legacy
            # emulator) a transaction takes at most 25 entity groups: start there, rather than
            # pay a refused commit (and its throttle wait) to learn it.
            transaction_groups=MAX_BATCH_SIZE if result.clock_source == "server" else LEGACY_LIMIT,
            dry_run=s.dry_run,
            with_descendants=s.with_descendants,
            sizer=self._sizer,
            allowance=allowance,
            throttle=self._throttle,
            result=result,
            should_stop=self._stopper.stopping,
            on_batch=lambda: self._progress(progress, result),
            readers=DESCENDANT_QUERIES * DELETERS_PER_STREAM * s.workers,
        )
        self._gate = gate

        seen: Counter[str] = Counter()
        streams = expired_streams(
            target,
            s,
            encoding,
            result.cutoff,
            smallest=smallest,
            log=self._log,
            on_read=lambda n: result.add(entities_read=n),
            seen=seen,
            on_left_alone=lambda n: result.add(left_alone=n),
        )
        try:
            with contextlib.suppress(Capped):  # --max-deletes reached: the allowance says so
                Pipeline(DELETERS_PER_STREAM * s.workers, gate.delete, self._stopper.stopping).run(
                    streams
                )
        finally:
            with result.lock:
                result.deleting_s = rt.monotonic() - progress.started
        reason = self._stopper.reason()
        if reason is not None:
            self._end(result, reason)
        if gate.allowance.capped:
            self._end(result, StopReason.MAX_DELETES)
        refused = refused_error(gate.ledger.refused)
        if refused is not None:
            self._end(result, StopReason.ERROR, refused)
        return seen

    def _progress(self, progress: ProgressLog, result: SweepResult) -> None:
        with result.lock:
            progress.maybe_log(result)

    def _pushed_back(self, error: BaseException) -> None:
        """Overload and contention make the adaptive throttle hold back (Beam's approach)."""
        if isinstance(error, PUSHBACK):
            self._throttle.record(accepted=False)


_START_FIELDS = (
    "namespace",
    "database",
    "property",
    "format",
    "cutoff",
    "clock_source",
    "clock_skew_s",
    "dry_run",
)


def _datastore_failure(exc: BaseException) -> str:
    return f"Datastore call failed: {describe_exception(exc)}"
