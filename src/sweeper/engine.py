"""The sweep: detect the encoding, page through expired keys, delete them in batches.

Everything that varies is injected (client, clock, monotonic time, sleep, stop signal), so the
same code runs against production, the emulator and unit tests that never wait. The engine
never raises for an operational failure: it returns a :class:`SweepResult` and always logs
exactly one ``sweep_finished`` event, which operators alert on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import structlog
from google.cloud import datastore
from google.cloud.datastore import Key

from sweeper.deleter import BatchDeleter, BatchFailed, Deleter, VerifyingDeleter, chunks
from sweeper.detect import check_indexed, detect_encoding
from sweeper.encodings import Encoding
from sweeper.errors import (
    DatastoreError,
    SweeperError,
    describe_exception,
)
from sweeper.pipeline import Pipeline
from sweeper.result import Runtime, SweepResult
from sweeper.retry import PUSHBACK, Retrier, RetryCounter
from sweeper.settings import SweepSettings
from sweeper.sources import expired_streams
from sweeper.throttle import Throttle, ThrottleSettings

__all__ = ["Runtime", "Sweep", "SweepResult", "sweep_targets"]


class Sweep:
    """One run over one kind. Create, then call :meth:`run` once."""

    def __init__(
        self, settings: SweepSettings, client: datastore.Client, runtime: Runtime | None = None
    ) -> None:
        self.settings = settings
        self.client = client
        self.runtime = runtime or Runtime()
        self._counter = RetryCounter()
        self._throttle = Throttle(
            ThrottleSettings(
                ramp_up=settings.ramp_up, max_rate=settings.max_rate, divisor=settings.shard.count
            ),
            clock=self.runtime.monotonic,
            sleep=self.runtime.sleep,
        )
        self._retrier = Retrier(
            self.runtime.retry_policy, self._counter, self.runtime.sleep, self._pushed_back
        )
        self._log = structlog.get_logger("sweeper").bind(kind=settings.kind)
        self._lock = threading.Lock()  # the result's counts, updated by every worker

    def run(self) -> SweepResult:
        rt, s = self.runtime, self.settings
        started = rt.monotonic()
        cutoff = rt.now() - s.grace
        result = SweepResult(s, cutoff, s.format_label)
        self._log.info(
            "sweep_started",
            **{k: v for k, v in result.summary().items() if k in _START_FIELDS},
            grace_s=s.grace.total_seconds(),
        )
        try:
            encoding = s.format if isinstance(s.format, Encoding) else self._detect()
            if encoding is not None:
                result.format = encoding.value
                self._sweep(encoding, result, started)
        except SweeperError as exc:
            result.stopped_reason, result.error = "error", exc.message
        except Exception as exc:  # anything the client raises once retries are spent
            result.stopped_reason, result.error = "error", _datastore_failure(exc)
        finally:
            result.retries = self._counter.retries
            result.duration_s = rt.monotonic() - started
            if rt.on_progress is not None:
                rt.on_progress(result, result.duration_s, True)
            log = self._log.error if result.stopped_reason == "error" else self._log.info
            log("sweep_finished", **result.summary())
        return result

    def _detect(self) -> Encoding | None:
        s = self.settings
        encoding = detect_encoding(self.client, self._retrier, s.kind, s.prop)
        if encoding is None:
            self._log.warning("no_expiry_values", property=s.prop, hint="nothing to sweep")
        return encoding

    def _sweep(self, encoding: Encoding, result: SweepResult, started: float) -> None:
        s = self.settings
        deleter: Deleter = (
            VerifyingDeleter(self.client, self._retrier, encoding, s.prop, result.cutoff)
            if s.verify
            else BatchDeleter(self.client, self._retrier)
        )
        progress = _Progress(self._log, self.runtime, self._counter, started, s.dry_run)
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
            reason = self._stop_reason(started)
            if reason is not None:
                with self._lock:
                    if result.stopped_reason == "complete":
                        result.stopped_reason = reason
            return reason is not None

        def count_reads(n: int) -> None:
            with self._lock:
                result.entities_read += n

        streams = expired_streams(
            self.client,
            self._retrier,
            s,
            encoding,
            result.cutoff,
            log=self._log,
            on_read=count_reads,
        )
        Pipeline(s.workers, process, should_stop).run([batches(st) for st in streams])
        if budget.capped and result.stopped_reason == "complete":
            result.stopped_reason = "max_deletes"
        if result.matched == 0 and not s.scan and isinstance(s.format, Encoding):
            check_indexed(self.client, self._retrier, s.kind, s.prop)

    def _process(self, deleter: Deleter, batch: Sequence[Key], result: SweepResult) -> None:
        with self._lock:
            result.matched += len(batch)
        if not self.settings.dry_run:
            if self.settings.verify:
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
        if waited:
            with self._lock:
                result.throttle_wait_s += waited
        try:
            deleted = deleter.delete(batch)
        except BatchFailed as exc:
            with self._lock:
                result.deleted += exc.deleted
                result.failed += len(batch) - exc.deleted
            raise DatastoreError(
                f"deleting a batch of {len(batch)} keys failed after "
                f"{self._counter.retries} retries in this run: {describe_exception(exc.cause)}"
            ) from exc
        self._throttle.record(accepted=True)
        with self._lock:
            result.deleted += deleted
            result.skipped += len(batch) - deleted
        self._log.debug("batch_deleted", keys=len(batch), deleted=deleted)

    def _stop_reason(self, started: float) -> str | None:
        s, rt = self.settings, self.runtime
        if rt.stop_requested():
            return "signal"
        if s.max_runtime is not None and rt.monotonic() - started >= s.max_runtime.total_seconds():
            return "max_runtime"
        return None


_START_FIELDS = ("namespace", "database", "property", "format", "cutoff", "dry_run")


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
        results.append(Sweep(settings, client_for(settings), rt).run())
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
            stopped_reason="signal" if rt.stop_requested() else ("error" if failed else "complete"),
        )
    return results
