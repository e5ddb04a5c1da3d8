"""The run: one :class:`Sweep` per target (per namespace with ``--all-namespaces``), by the
path docs/development.md follows. Everything that varies is injected (``result.Runtime``), so
unit tests never wait. Nothing here raises for an operational failure: every sweep returns a
:class:`SweepResult` and logs exactly one ``sweep_finished``."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import structlog
from google.cloud import datastore

from sweeper import checks, guard
from sweeper.concurrency import CallLimiter, Pipeline, together
from sweeper.deleter import LEGACY_LIMIT, BatchSizer, refused_error
from sweeper.encodings import Encoding, Rule
from sweeper.gate import DESCENDANT_QUERIES, Gate
from sweeper.logs import SweeperError, describe_exception, is_bug, report_bug
from sweeper.result import ProgressLog, Runtime, SweepResult
from sweeper.retry import (
    DRAIN_S,
    PUSHBACK,
    Retrier,
    RetryCounter,
    Stopped,
    Stopper,
    StopReason,
)
from sweeper.rpc import Count
from sweeper.settings import MAX_BATCH_SIZE, SweepSettings
from sweeper.target import Target, expired_streams, namespaces
from sweeper.throttle import Allowance, Capped, Throttle, ThrottleSettings

# A commit is one call, answered faster than the stream's next page: one delete worker per
# stream keeps up (a second one gained nothing in bench/bench_sweep.py). Where a transaction
# takes at most 25 entity groups (``LEGACY_LIMIT``), a page is 20 commits and they set the pace:
# two per stream (the legacy emulator at 60 ms each way: 0.67x the bare loop with one, 1.20x).
DELETERS_PER_STREAM = 1
LEGACY_DELETERS_PER_STREAM = 2


@dataclass(frozen=True)
class Budget:
    """Shared by the sweeps of an ``--all-namespaces`` run: the stop flag and ``--max-runtime``
    deadline, which end the whole run, and the throttle, whose ramp-up goes on across namespaces."""

    stopper: Stopper
    throttle: Throttle

    @classmethod
    def start(cls, settings: SweepSettings, rt: Runtime, deadline: float | None = None) -> Budget:
        """A fresh budget; ``deadline`` is a value of ``rt.monotonic`` (a lone sweep sets its
        own once it runs)."""
        s = settings
        stopper = Stopper(rt.stop, rt.monotonic, rt.sleep, deadline)
        limits = ThrottleSettings(ramp_up=s.ramp_up, max_rate=s.max_rate, divisor=s.shard.count)
        return cls(stopper, Throttle(limits, clock=rt.monotonic, sleep=stopper.pause))


class Sweep:
    """One run over one kind: call :meth:`run` once. ``client`` may be a function that builds
    it, which can fail (no credentials, no project) and still owes a ``sweep_finished``."""

    def __init__(
        self,
        settings: SweepSettings,
        client: datastore.Client | Callable[[], datastore.Client],
        runtime: Runtime | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.settings = settings
        self._client = client
        self.runtime = rt = runtime or Runtime()
        self._counter = RetryCounter()
        self._own_budget = budget is None
        budget = budget or Budget.start(settings, rt)
        self._stopper, self._throttle = budget.stopper, budget.throttle
        # A query stream and its delete workers per worker (and the delete workers' ancestor
        # queries): nothing waits for a place unless connection loss has cut the limit.
        calls = 1 + LEGACY_DELETERS_PER_STREAM * (
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

    def run(self) -> SweepResult:
        """Sweep, in the caller's thread: a signal stops it wherever it waits (``StopEvent``),
        the deadline at its next check. Deletes in flight then get ``DRAIN_S`` to land, so the
        counts stay exact; one still unanswered is left to its worker (a daemon: the process
        can exit under it), and the summary counts its keys as unconfirmed."""
        rt, s = self.runtime, self.settings
        started = rt.monotonic()
        if self._own_budget and s.max_runtime is not None:
            self._stopper.deadline = started + s.max_runtime.total_seconds()
        # Provisional, for a summary of a run that fails before it reads the database's clock.
        result = SweepResult(s, rt.now() - s.grace, str(s.format))
        try:
            with rt.stop.interrupting():
                self._body(result)
        except Stopped as stop:  # a signal, raised wherever the body was, or the deadline
            self._end(result, stop.reason)
        except SweeperError as exc:
            self._end(result, StopReason.ERROR, exc.message)
        except Exception as exc:  # what the client raises once retries are spent, or a bug
            failure = f"Datastore call failed: {describe_exception(exc)}"
            self._end(
                result, StopReason.ERROR, report_bug(self._log, exc) if is_bug(exc) else failure
            )
        for _ in range(round(DRAIN_S / rt.poll_s)):  # counted: an injected sleep returns at once
            if not self._in_flight():
                break
            rt.sleep(rt.poll_s)
        with result.lock:
            if self._in_flight():
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

    def _in_flight(self) -> int:
        """Keys handed to a delete call not yet answered."""
        return 0 if self._gate is None else self._gate.committer.in_flight

    def _body(self, result: SweepResult) -> None:
        """The checks and the deletes, in their order (``sweeper.checks``)."""
        s, log = self.settings, self._log
        client = self._client() if callable(self._client) else self._client
        with result.lock:
            result.project = client.project
        target = Target(client, self._retrier, s.kind, s.prop)
        # The stored values, read beside the clock (neither needs the other): a round trip less.
        _, stored = together(
            partial(self._set_cutoff, target, result), partial(checks.read_stored, target, s)
        )
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

    def _set_cutoff(self, target: Target, result: SweepResult) -> None:
        """The run's one cutoff, by the database's clock if it has one (``--verify`` too)."""
        reading = checks.read_clock(target, self.runtime.now)
        with result.lock:
            result.cutoff = reading.now - self.settings.grace
            result.clock_source, result.clock_skew_s = reading.source, reading.skew_s
            result.verify = self.settings.verify
            fields = result.summary()
        self._log.info(
            "sweep_started",
            **{k: v for k, v in fields.items() if k in _START_FIELDS},
            grace_s=self.settings.grace.total_seconds(),
        )
        if reading.source == "local":
            self._log.info("clock_local", hint="the database reports no time: local clock used")
        elif reading.skew_s is not None and abs(reading.skew_s) > checks.SKEW_WARNING_S:
            self._log.warning(
                "clock_skew",
                skew_s=round(reading.skew_s, 3),
                hint="this host's clock is off; the cutoff uses the database's time",
            )

    def _end(self, result: SweepResult, reason: StopReason, error: str | None = None) -> None:
        with result.lock:
            if reason == StopReason.ERROR:
                result.stopped_reason, result.error = reason, error
            else:
                result.stop(reason)

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
        # Only Firestore in Datastore mode reports its time; elsewhere (the legacy emulator) a
        # transaction takes at most 25 entity groups: start there (a refusal costs a wait).
        server = result.clock_source == "server"
        deleters = (DELETERS_PER_STREAM if server else LEGACY_DELETERS_PER_STREAM) * s.workers
        self._gate = gate = Gate(
            target,
            Rule(s.kind, s.prop, encoding, result.cutoff),
            verify=result.verify,
            transaction_groups=MAX_BATCH_SIZE if server else LEGACY_LIMIT,
            dry_run=s.dry_run,
            with_descendants=s.with_descendants,
            sizer=self._sizer,
            allowance=allowance,
            throttle=self._throttle,
            result=result,
            should_stop=self._stopper.stopping,
            on_batch=partial(progress.maybe_log, result),
            readers=DESCENDANT_QUERIES * deleters,
        )
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
        pipeline = Pipeline(deleters, gate.delete, self._stopper.stopping)
        try:
            with contextlib.suppress(Capped):  # --max-deletes reached: the allowance says so
                pipeline.run(streams)
        finally:
            with result.lock:
                result.deleting_s = rt.monotonic() - progress.started
        reason = self._stopper.reason()
        if reason is not None:
            self._end(result, reason)
        if gate.allowance.capped:
            self._end(result, StopReason.MAX_DELETES)
        refused = refused_error(gate.committer.refused)
        if refused is not None:
            self._end(result, StopReason.ERROR, refused)
        return seen

    def _pushed_back(self, error: BaseException) -> None:
        """Overload and contention make the adaptive throttle hold back (Beam's approach)."""
        if isinstance(error, PUSHBACK):
            self._throttle.record(accepted=False)


_START_FIELDS: tuple[str, ...] = ("namespace", "database", "property", "format", "cutoff")
_START_FIELDS += ("clock_source", "clock_skew_s", "dry_run")


# -- a run of several sweeps ----------------------------------------------------------------------

ClientFor = Callable[[SweepSettings], datastore.Client]


def sweep_targets(
    targets: Sequence[SweepSettings],
    client_for: ClientFor,
    runtime: Runtime | None = None,
    overall: bool = False,
) -> list[SweepResult]:
    """Sweep each target in turn (every namespace of one with ``all_namespaces``) until a
    signal; a failed one does not stop the others. With ``overall``, or any target over all
    namespaces, a final ``run_finished`` sums the run up."""
    rt = runtime or Runtime()
    started = rt.monotonic()
    results: list[SweepResult] = []
    for settings in targets:
        if rt.stop.is_set():
            break
        if settings.all_namespaces:
            results.extend(_every_namespace(settings, client_for, rt))
        else:
            results.append(Sweep(settings, partial(client_for, settings), rt).run())
    if overall or any(t.all_namespaces for t in targets):
        _run_finished(targets, results, rt, started)
    return results


def each_namespace(
    settings: SweepSettings, client_for: ClientFor, retrier: Retrier
) -> Iterator[SweepSettings]:
    """``settings`` once per namespace of its database, as they are listed (a page of 500
    at a time: a project with thousands of tenants is never held in memory at once)."""
    for page in namespaces(client_for(settings), retrier):
        for namespace in page:
            # One tenant without the kind is no mistake: the run fails if none has it.
            yield replace(settings, namespace=namespace, all_namespaces=False, allow_empty=True)


def _every_namespace(
    settings: SweepSettings, client_for: ClientFor, rt: Runtime
) -> list[SweepResult]:
    """One sweep per namespace, all under one ``Budget`` (one deadline, one ramp-up)."""
    limit = settings.max_runtime
    deadline = None if limit is None else rt.monotonic() + limit.total_seconds()
    budget = Budget.start(settings, rt, deadline)
    retrier = Retrier(rt.retry_policy, RetryCounter(), clock=rt.monotonic, stopper=budget.stopper)
    results: list[SweepResult] = []
    log = structlog.get_logger("sweeper")
    why: str | None = None
    listing = each_namespace(settings, client_for, retrier)
    try:
        while True:
            with rt.stop.interrupting():  # a signal ends a listing call that never answers
                one = next(listing, None)
            if one is None or budget.stopper.reason() is not None:  # the deadline, a signal
                break
            results.append(Sweep(one, partial(client_for, one), rt, budget).run())
    except Stopped:
        pass
    except Exception as exc:  # the listing failed, after its retries (or a bug)
        why = report_bug(log, exc) if is_bug(exc) else describe_exception(exc)
    error = None
    if why is not None:
        error = (
            f"listing the namespaces failed: {why}. Nothing more was swept; name the "
            "namespaces with --namespace, or one --config target each"
        )
        log.error("namespaces_failed", kind=settings.kind, error=error)
    elif (
        budget.stopper.reason() is None
        and not settings.allow_empty
        and all(r.held_nothing for r in results)  # none, or none holding anything
    ):
        error = checks.empty_target(settings, every_namespace=True)
        log.error("target_empty", kind=settings.kind, error=error)
    if error is not None:
        failed = SweepResult(settings, rt.now() - settings.grace, str(settings.format))
        failed.stopped_reason, failed.error = StopReason.ERROR, error
        results.append(failed)
    return results


def _run_finished(
    targets: Sequence[SweepSettings], results: list[SweepResult], rt: Runtime, started: float
) -> None:
    failed = [r.settings.label for r in results if r.error]
    timed_out = any(r.stopped_reason == StopReason.MAX_RUNTIME for r in results)
    reason = StopReason.SIGNAL if rt.stop.is_set() else StopReason.ERROR if failed else None
    reason = reason or (StopReason.MAX_RUNTIME if timed_out else StopReason.COMPLETE)
    log = structlog.get_logger("sweeper")
    (log.error if failed else log.info)(
        "run_finished",
        targets=len(targets),
        swept=len(results),
        namespaces=len({(r.settings.database, r.settings.namespace) for r in results}),
        failed_targets=failed,
        matched=sum(r.matched for r in results),
        deleted=sum(r.deleted for r in results),
        descendants_deleted=sum(r.descendants_deleted for r in results),
        skipped=sum(r.skipped for r in results),
        duration_s=round(rt.monotonic() - started, 3),
        stopped_reason=reason.value,
    )
