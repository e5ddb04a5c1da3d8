"""The sweep: detect the encoding, page through expired keys, delete them in batches.

Everything that varies is injected (client, clock, monotonic time, sleep, stop signal), so the
same code runs against production, the emulator and unit tests that never wait. The engine
never raises for an operational failure: it returns a :class:`SweepResult` and always logs
exactly one ``sweep_finished`` event, which operators alert on.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import structlog
from google.cloud import datastore
from google.cloud.datastore import Key

from sweeper.clock import SKEW_WARNING_S, read_clock
from sweeper.concurrency import CallLimiter
from sweeper.deleter import (
    BatchDeleter,
    BatchFailed,
    BatchSizer,
    Deleter,
    VerifyingDeleter,
    chunks,
)
from sweeper.detect import check_explicit, detect_encoding
from sweeper.encodings import Encoding, expired_range
from sweeper.errors import (
    DatastoreError,
    RefusedError,
    SweeperError,
    describe_exception,
)
from sweeper.guard import Plan, check_fraction, measure
from sweeper.pipeline import Pipeline
from sweeper.result import Runtime, SweepResult
from sweeper.retention import measure_retention
from sweeper.retry import PUSHBACK, Retrier, RetryCounter
from sweeper.settings import SweepSettings
from sweeper.sources import expired_streams
from sweeper.stopping import Stopped, Stopper, StopReason
from sweeper.throttle import Throttle, ThrottleSettings

__all__ = ["Runtime", "Sweep", "SweepResult", "sweep_targets"]


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
    ) -> None:
        self.settings = settings
        self._connect: Callable[[], datastore.Client] = (
            client if callable(client) else lambda: client
        )
        self.runtime = rt = runtime or Runtime()
        self._counter = RetryCounter()
        self._stopper = Stopper(rt.stop_requested, rt.monotonic, rt.sleep)
        # A query stream and a delete worker per worker: nothing waits for a place unless
        # connection loss has cut the limit.
        self._limiter = CallLimiter(2 * settings.workers, rt.monotonic, self._stopper.check)
        self._sizer = BatchSizer(settings.batch_size, rt.monotonic)
        self._throttle = Throttle(
            ThrottleSettings(
                ramp_up=settings.ramp_up, max_rate=settings.max_rate, divisor=settings.shard.count
            ),
            clock=rt.monotonic,
            sleep=self._stopper.pause,
        )
        self._retrier = Retrier(
            rt.retry_policy,
            self._counter,
            on_failure=self._pushed_back,
            clock=rt.monotonic,
            stopper=self._stopper,
            limiter=self._limiter,
        )
        self._log = structlog.get_logger("sweeper").bind(kind=settings.kind)
        self._lock = threading.Lock()  # the result's counts, updated by every worker
        self._in_flight = 0  # keys handed to a delete call not yet answered
        self._abandoned = False

    def run(self) -> SweepResult:
        """Sweep in a thread of its own, so that a stop is honoured whatever it is doing.

        Once the run must stop (signal or deadline), calls in flight get ``drain_s`` to land;
        a call still hanging after that is abandoned and the summary says how many keys it
        carried. The process can exit under it: the thread is a daemon.
        """
        rt, s = self.runtime, self.settings
        started = rt.monotonic()
        if s.max_runtime is not None:
            self._stopper.deadline = started + s.max_runtime.total_seconds()
        # Provisional, for a summary of a run that fails before it reads the database's clock.
        result = SweepResult(s, rt.now() - s.grace, s.format_label)
        body = threading.Thread(
            target=self._body, args=(result, started), name=f"sweep-{s.kind}", daemon=True
        )
        body.start()
        self._await(body)
        with self._lock:
            if body.is_alive():
                self._abandoned = True
                result.stop(self._stopper.reason() or StopReason.SIGNAL)
                result.unconfirmed = self._in_flight
            result.retries = self._counter.retries
            calls = self._counter.calls
            result.queries, result.lookups = calls["query"], calls["lookup"]
            result.commits = calls["delete"] + calls["verify"]
            result.duration_s = rt.monotonic() - started
            result.concurrency = self._limiter.degradation()
            result.commit_size = self._sizer.degradation()
            summary = result.summary()
        if rt.on_progress is not None:
            rt.on_progress(result, result.duration_s, True)
        log = self._log.error if result.stopped_reason == StopReason.ERROR else self._log.info
        log("sweep_finished", **summary)
        return result

    def _await(self, body: threading.Thread) -> None:
        rt = self.runtime
        while body.is_alive():
            body.join(rt.poll_s)
            if self._stopper.reason() is not None:
                break
        # Stopping: deletes in flight get up to drain_s to land, so the counts stay exact; a
        # query or a wait has nothing worth waiting for beyond one more poll to unwind.
        drain_until = rt.monotonic() + rt.drain_s
        body.join(rt.poll_s)
        while body.is_alive() and self._in_flight and rt.monotonic() < drain_until:
            body.join(rt.poll_s)

    def _body(self, result: SweepResult, started: float) -> None:
        try:
            client = self._connect()
            self._set_cutoff(client, result)
            self._sweep(client, result)
        except Stopped as stop:
            self._end(result, stop.reason)
        except SweeperError as exc:
            self._end(result, StopReason.ERROR, exc.message)
        except Exception as exc:  # anything the client raises once retries are spent
            self._end(result, StopReason.ERROR, _datastore_failure(exc))

    def _set_cutoff(self, client: datastore.Client, result: SweepResult) -> None:
        """One cutoff per run, from the database's clock where it reports one.

        ``--verify`` re-checks against this same cutoff.
        """
        s = self.settings
        reading = read_clock(client, self._retrier, s.kind, self.runtime.now)
        with self._lock:
            result.cutoff = reading.now - s.grace
            result.clock_source, result.clock_skew_s = reading.source, reading.skew_s
            # A database that reports no read time is not Firestore in Datastore mode: its
            # queries may return stale index entries, and a session refreshed after its entry
            # was read would be deleted blindly. Re-check each key there unless told otherwise.
            result.verify = s.verify if s.verify is not None else reading.source == "local"
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
        with self._lock:
            if self._abandoned:  # the summary is out already: leave it as logged
                return
            if reason == StopReason.ERROR:
                result.stopped_reason, result.error = reason, error
            else:
                result.stop(reason)

    def _sweep(self, client: datastore.Client, result: SweepResult) -> None:
        s = self.settings
        if isinstance(s.format, Encoding):
            encoding: Encoding | None = s.format
            if not s.scan:
                others = check_explicit(client, self._retrier, s.kind, s.prop, s.format)
                self._note_others(result, others)
        else:
            encoding = self._detect(client)
        if encoding is not None:
            result.format = encoding.value
            self._guard(client, encoding, result)
            self._delete_expired(client, encoding, result)
        if result.stopped_reason in (StopReason.COMPLETE, StopReason.MAX_DELETES):
            self._measure_retention(client, encoding, result)

    def _guard(self, client: datastore.Client, encoding: Encoding, result: SweepResult) -> None:
        """Before the first batch: refuse a run over --max-fraction; on a terminal, ask."""
        s, confirm = self.settings, self.runtime.confirm
        window = expired_range(encoding, result.cutoff)
        if s.dry_run or s.scan or window.empty or (s.max_fraction >= 1 and confirm is None):
            return
        exposure = measure(client, self._retrier, s.kind, s.prop, window)
        result.due_fraction = exposure.fraction
        self._log.info(
            "exposure_counted",
            due=exposure.due.n,
            carrying=exposure.carrying.n,
            fraction=exposure.fraction,
            max_fraction=s.max_fraction,
        )
        check_fraction(exposure, s.max_fraction, s.kind, s.prop)
        if exposure.due.n == 0 or confirm is None:
            return
        plan = Plan(
            client.project,
            client.database or None,
            client.namespace or None,
            s.kind,
            s.prop,
            encoding,
            result.cutoff,
            exposure,
        )
        if not confirm(plan):
            raise RefusedError("not confirmed at the prompt; nothing was deleted")

    def _measure_retention(
        self, client: datastore.Client, encoding: Encoding | None, result: SweepResult
    ) -> None:
        s = self.settings
        retention = measure_retention(
            client, self._retrier, s.kind, s.prop, encoding=encoding, cutoff=result.cutoff
        )
        result.retention = retention
        if retention.empty:
            self._log.warning(
                "target_empty",
                property=s.prop,
                hint="no entity carries this property: check the kind, namespace and property",
            )

    def _detect(self, client: datastore.Client) -> Encoding | None:
        s = self.settings
        encoding = detect_encoding(client, self._retrier, s.kind, s.prop)
        if encoding is None:
            self._log.warning("no_expiry_values", property=s.prop, hint="nothing to sweep")
        return encoding

    def _delete_expired(
        self, client: datastore.Client, encoding: Encoding, result: SweepResult
    ) -> None:
        s, rt = self.settings, self.runtime
        deleter: Deleter = (
            VerifyingDeleter(
                client, self._retrier, encoding, s.prop, result.cutoff, sizer=self._sizer
            )
            if result.verify
            else BatchDeleter(client, self._retrier, sizer=self._sizer)
        )
        progress = _Progress(self._log, rt, self._counter, rt.monotonic(), s.dry_run)
        budget = _Budget(s.max_deletes)

        def batches(pages: Iterator[list[Key]]) -> Iterator[Sequence[Key]]:
            for page in pages:
                for batch in chunks(page, s.batch_size):
                    taken = budget.take(batch)
                    if not taken:
                        return
                    yield taken

        def process(batch: Sequence[Key]) -> None:
            self._process(deleter, batch, result)
            with self._lock:
                progress.maybe_log(result)

        def should_stop() -> bool:
            reason = self._stopper.reason()
            if reason is not None:
                self._end(result, reason)
            return reason is not None

        def count_reads(n: int) -> None:
            with self._lock:
                result.entities_read += n

        seen: Counter[str] = Counter()
        streams = expired_streams(
            client,
            self._retrier,
            s,
            encoding,
            result.cutoff,
            log=self._log,
            on_read=count_reads,
            seen=seen,
        )
        Pipeline(s.workers, process, should_stop).run([batches(st) for st in streams])
        if budget.capped:
            self._end(result, StopReason.MAX_DELETES)
        if s.scan and result.stopped_reason == StopReason.COMPLETE:
            self._note_others(result, _scan_census(s, encoding, seen))

    def _note_others(self, result: SweepResult, others: tuple[str, ...]) -> None:
        """Values of other encodings are left alone, but an operator should know they exist."""
        result.other_encodings = others
        if others:
            self._log.warning(
                "other_encodings_present",
                property=self.settings.prop,
                swept=result.format,
                left_alone=list(others),
            )

    def _process(self, deleter: Deleter, batch: Sequence[Key], result: SweepResult) -> None:
        with self._lock:
            result.matched += len(batch)
        if not self.settings.dry_run:
            if result.verify:
                with self._lock:
                    result.entities_read += len(batch)  # the transaction looks each key up
            self._delete(deleter, batch, result)
        with self._lock:
            result.batches += 1

    def _pushed_back(self, error: BaseException) -> None:
        """Overload and contention make the adaptive throttle hold back (Beam's approach)."""
        if isinstance(error, PUSHBACK):
            self._throttle.record(accepted=False)

    def _delete(self, deleter: Deleter, batch: Sequence[Key], result: SweepResult) -> None:
        waited = self._throttle.acquire(len(batch))
        with self._lock:
            result.throttle_wait_s += waited
            self._in_flight += len(batch)
        try:
            deleted = deleter.delete(batch)
        except BatchFailed as exc:
            with self._lock:
                self._in_flight -= len(batch)
                result.deleted += exc.deleted
                if isinstance(exc.cause, Stopped):  # stopping, not failing: the rest is kept
                    raise exc.cause from None
                result.failed += len(batch) - exc.deleted
            raise DatastoreError(
                f"deleting a batch of {len(batch)} keys failed after "
                f"{self._counter.retries} retries in this run: {describe_exception(exc.cause)}"
            ) from exc
        self._throttle.record(accepted=True)
        with self._lock:
            self._in_flight -= len(batch)
            result.deleted += deleted
            result.skipped += len(batch) - deleted
        self._log.debug("batch_deleted", keys=len(batch), deleted=deleted)


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


class _Budget:
    """``--max-deletes``: hands out keys until the cap, then notes whether more were waiting."""

    def __init__(self, limit: int | None) -> None:
        self._left = limit
        self.capped = False
        self._lock = threading.Lock()

    def take(self, batch: Sequence[Key]) -> Sequence[Key]:
        with self._lock:
            if self._left is None:
                return batch
            if self._left == 0:
                self.capped = True
                return ()
            taken = batch[: self._left]
            self._left -= len(taken)
            if len(taken) < len(batch):  # the cap fell inside this batch: keys are left
                self.capped = True
            return taken


class _Progress:
    """``sweep_progress`` events, at most one per ``progress_every_s``."""

    def __init__(
        self, log: Any, runtime: Runtime, counter: RetryCounter, started: float, dry_run: bool
    ) -> None:
        self._log, self._rt, self._counter, self._started = log, runtime, counter, started
        self._next = started + runtime.progress_every_s
        self._dry_run = dry_run

    def maybe_log(self, result: SweepResult) -> None:
        now = self._rt.monotonic()
        if self._rt.on_progress is not None:
            self._rt.on_progress(result, now - self._started, False)
        if now < self._next:
            return
        self._next = now + self._rt.progress_every_s
        elapsed = max(now - self._started, 1e-9)
        done = result.matched if self._dry_run else result.deleted
        self._log.info(
            "sweep_progress",
            matched=result.matched,
            deleted=result.deleted,
            retries=self._counter.retries,
            elapsed_s=round(elapsed, 1),
            per_s=round(done / elapsed, 1),
        )


def _scan_census(s: SweepSettings, encoding: Encoding, seen: Counter[str]) -> tuple[str, ...]:
    """After a whole scan: the other encodings read, or a refusal if none was ``encoding``."""
    others = tuple(sorted(name for name in seen if name != encoding.value))
    if seen and not seen[encoding.value]:
        held = ", ".join(f"{seen[name]} {name}" for name in others)
        raise RefusedError(
            f"--scan --format {encoding.value} of {s.kind}.{s.prop} could never delete "
            f"anything: of the {sum(seen.values())} values it read, none is "
            f"{encoding.value} ({held}). Nothing was deleted; choose the --format they hold."
        )
    return others


def _datastore_failure(exc: BaseException) -> str:
    return f"Datastore call failed: {describe_exception(exc)}"


def sweep_targets(
    targets: Sequence[SweepSettings],
    client_for: Callable[[SweepSettings], datastore.Client],
    runtime: Runtime | None = None,
    overall: bool = False,
) -> list[SweepResult]:
    """Sweep each target in turn, each with its own ``sweep_finished``; a signal stops them all.

    A failed target does not stop the others (they are independent kinds); with ``overall``
    a final ``run_finished`` event sums the run up for the operator's alert.
    """
    rt = runtime or Runtime()
    started = rt.monotonic()
    results: list[SweepResult] = []
    for settings in targets:
        if rt.stop_requested():
            break
        results.append(Sweep(settings, partial(client_for, settings), rt).run())
    if overall:
        failed = [f"{r.settings.kind}.{r.settings.prop}" for r in results if r.error]
        log = structlog.get_logger("sweeper")
        (log.error if failed else log.info)(
            "run_finished",
            targets=len(targets),
            swept=len(results),
            failed_targets=failed,
            matched=sum(r.matched for r in results),
            deleted=sum(r.deleted for r in results),
            duration_s=round(rt.monotonic() - started, 3),
            stopped_reason=(
                StopReason.SIGNAL
                if rt.stop_requested()
                else (StopReason.ERROR if failed else StopReason.COMPLETE)
            ).value,
        )
    return results
