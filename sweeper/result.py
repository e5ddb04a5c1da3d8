"""What one sweep reports (the ``sweep_finished`` contract, ``sweep_progress`` on the way, what
is left once it is done, and the summary a person reads), what the guard puts before an
operator, and the outside world a sweep is given. It sits below the reads, the delete and the
guard that write into it."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sweeper.concurrency import Degradation
from sweeper.encodings import Rule
from sweeper.logs import EXIT_FAILURE, EXIT_OK
from sweeper.retry import RetryCounter, RetryPolicy, StopEvent, StopReason
from sweeper.rpc import Count
from sweeper.settings import SweepSettings


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Exposure:
    """What a run would delete (``due``), against what carries the property (``carrying``)."""

    due: Count
    carrying: Count

    @property
    def fraction(self) -> float | None:
        """due / carrying when both counts are exact; None when a limit leaves it unknown."""
        if self.carrying.n == 0:
            return 0.0
        if self.due.lower_bound or self.carrying.lower_bound:
            return None
        return self.due.n / self.carrying.n

    def within(self, share: float) -> bool:
        """Whether the run surely deletes at most ``share``; an unknown fraction is not within,
        unless even the largest it could be (exact due over a capped carrying) is."""
        if share >= 1.0:
            return True
        fraction = self.fraction
        if fraction is not None:
            return fraction <= share
        return not self.due.lower_bound and self.due.n / self.carrying.n <= share


@dataclass(frozen=True)
class Plan:
    """What an operator is shown before a sweep deletes, and asked to agree to."""

    project: str
    database: str | None
    namespace: str | None
    rule: Rule
    exposure: Exposure


@dataclass(frozen=True)
class Runtime:
    """The outside world, injectable: tests pass a fake clock, a no-op sleep, a stop flag."""

    now: Callable[[], dt.datetime] = utc_now
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    stop: StopEvent = field(default_factory=StopEvent)  # what every sweep's ``Stopper`` asks
    # Called after every batch with the counts so far, the seconds elapsed and whether the run
    # is over (the CLI draws a live line on a terminal); None for none.
    on_progress: Callable[[SweepResult, float, bool], None] | None = None
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    # Asked before a sweep deletes, with what it is about to do (a person at a terminal);
    # None: nothing asks (a CronJob, CI, --yes).
    confirm: Callable[[Plan], bool] | None = None
    progress_every_s: float = 10.0
    # How often a run that must stop looks again at the deletes still in flight (which get
    # ``retry.DRAIN_S`` to land): together well inside STOP_BUDGET_S.
    poll_s: float = 0.1


@dataclass
class SweepResult:
    """The counts of one run; :meth:`summary` is the ``sweep_finished`` contract, whose fields
    docs/reference.md defines."""

    settings: SweepSettings
    cutoff: dt.datetime
    format: str
    matched: int = 0
    deleted: int = 0
    deleting_s: float | None = None
    project: str | None = None
    failed: int = 0
    skipped: int = 0
    entities_read: int = 0
    throttle_wait_s: float = 0.0
    retries: int = 0
    batches: int = 0
    duration_s: float = 0.0
    stopped_reason: StopReason = StopReason.COMPLETE
    error: str | None = None
    # Sent, unanswered when the run stopped: maybe gone (deleting them again is harmless).
    unconfirmed: int = 0
    # Found gone when a commit whose answer was lost was sent again, but not shown deleted by
    # it: not in ``deleted``, but counted against --max-deletes.
    unattributed: int = 0
    left_alone: int = 0
    descendants_matched: int = 0
    descendants_deleted: int = 0
    other_encodings: tuple[str, ...] = ()
    concurrency: Degradation | None = None
    commit_size: Degradation | None = None
    verify: bool = False
    clock_source: str = "local"
    clock_skew_s: float | None = None
    due_fraction: float | None = None
    retention: Retention | None = None  # measured after the run
    queries: int = 0
    lookups: int = 0
    commits: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.verify = bool(self.settings.verify)

    @property
    def held_nothing(self) -> bool:
        """Nothing carried the property after the run, nor was any of it due before: the
        target holds nothing to sweep (a run that deleted the last of it is no such case)."""
        return self.retention is not None and self.retention.empty and self.matched == 0

    @property
    def dry_run_refused(self) -> bool:
        """Whether the fraction guard would refuse the real run of what this dry run matched
        (its own rule, against what carries the property after it)."""
        if self.retention is None:
            return False
        exposure = Exposure(Count(self.matched, "scan"), self.retention.carrying)
        return not exposure.within(self.settings.max_fraction)

    @property
    def exit_code(self) -> int:
        failed = self.stopped_reason in (StopReason.ERROR, StopReason.DECLINED)
        return EXIT_FAILURE if failed else EXIT_OK

    def add(self, **counts: float) -> None:
        """Add to counts, under the run's lock: the one way the workers write them."""
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def stop(self, reason: StopReason) -> None:
        """Record why the run ended; the first reason other than "complete" wins."""
        if self.stopped_reason == StopReason.COMPLETE:
            self.stopped_reason = reason

    def summary(self) -> dict[str, Any]:
        s = self.settings
        fields: dict[str, Any] = {
            "project": self.project if self.project is not None else s.project,
            "kind": s.kind,
            "namespace": s.namespace,
            "database": s.database,
            "property": s.prop,
            "format": self.format,
            "cutoff": self.cutoff.isoformat().replace("+00:00", "Z"),
            "clock_source": self.clock_source,
            "clock_skew_s": None if self.clock_skew_s is None else round(self.clock_skew_s, 3),
            "dry_run": s.dry_run,
            "verify": self.verify,
            "scan": s.scan,
            "workers": s.workers,
            "shard": str(s.shard),
            "matched": self.matched,
            "deleted": self.deleted,
            "skipped": self.skipped,
            "failed": self.failed,
            "entities_read": self.entities_read,
            "retries": self.retries,
            "throttle_wait_s": round(self.throttle_wait_s, 3),
            "batches": self.batches,
            "duration_s": round(self.duration_s, 3),
            "deleting_s": None if self.deleting_s is None else round(self.deleting_s, 3),
            "stopped_reason": StopReason(self.stopped_reason).value,
            "unconfirmed": self.unconfirmed,
            "unattributed": self.unattributed,
            "left_alone": self.left_alone,
            "with_descendants": s.with_descendants,
            "descendants_matched": self.descendants_matched,
            "descendants_deleted": self.descendants_deleted,
            "due_fraction": None if self.due_fraction is None else round(self.due_fraction, 4),
            **(self.retention.fields() if self.retention else _NOT_MEASURED),
            "queries": self.queries,
            "lookups": self.lookups,
            "commits": self.commits,
            "other_encodings": list(self.other_encodings),
            **_degradation("concurrency", self.concurrency),
            **_degradation("commit_size", self.commit_size),
        }
        if self.error is not None:
            fields["error"] = self.error
        return fields


# Retention is measured only after a run that got to the end of its work.
_NOT_MEASURED: dict[str, Any] = {
    "carrying": None,
    "carrying_is_lower_bound": False,
    "empty": None,
    "expired_left": None,
    "expired_left_is_lower_bound": False,
    "oldest_expired": None,
}


def _degradation(name: str, d: Degradation | None) -> dict[str, Any]:
    """What a bad network or a slow database cost the run: how low a limit went, for how long."""
    if d is None:
        return {}
    return {
        f"{name}_max": d.maximum,
        f"{name}_min": d.minimum,
        f"{name}_reductions": d.reductions,
        f"{name}_reduced_s": round(d.reduced_s, 3),
    }


class ProgressLog:
    """``sweep_progress`` events, at most one per ``progress_every_s``."""

    def __init__(
        self, log: Any, runtime: Runtime, counter: RetryCounter, started: float, dry_run: bool
    ) -> None:
        self._log, self._rt, self._counter, self.started = log, runtime, counter, started
        self._next = started + runtime.progress_every_s
        self._dry_run = dry_run

    def maybe_log(self, result: SweepResult) -> None:
        with result.lock:
            now = self._rt.monotonic()
            if self._rt.on_progress is not None:
                self._rt.on_progress(result, now - self.started, False)
            if now < self._next:
                return
            self._next = now + self._rt.progress_every_s
            elapsed = max(now - self.started, 1e-9)
            done = result.matched if self._dry_run else result.deleted
            self._log.info(
                "sweep_progress",
                matched=result.matched,
                deleted=result.deleted,
                retries=self._counter.retries,
                elapsed_s=round(elapsed, 1),
                per_s=round(done / elapsed, 1),
            )


# Counts after a run stop here and say so: enough to tell "keeping up" from "falling behind",
# cheap on any database (at most 10 reads as an aggregation).
RETENTION_COUNT_LIMIT = 10_000


@dataclass(frozen=True)
class Retention:
    """What is left after a run (native TTL hides it): past the cutoff, and in all (``carrying``),
    without which a misnamed target's "0 expired left" would read as "keeping up"."""

    carrying: Count
    expired_left: Count | None = None  # None: no encoding, nothing could be past the cutoff
    oldest_expired: dt.datetime | None = None
    # A scan's values are in no index: what it read is all that is known, and what is left
    # past the cutoff would take another full read to count.
    scanned: bool = False

    @property
    def empty(self) -> bool:
        """No entity carries the property: the target is probably misnamed."""
        return self.carrying.n == 0

    def fields(self) -> dict[str, Any]:
        left, oldest = self.expired_left, self.oldest_expired
        return {
            "carrying": self.carrying.n,
            "carrying_is_lower_bound": self.carrying.lower_bound,
            "empty": self.empty,
            "expired_left": None if self.scanned else (left.n if left else 0),
            "expired_left_is_lower_bound": bool(left and left.lower_bound),
            "oldest_expired": oldest.isoformat().replace("+00:00", "Z") if oldest else None,
        }


def terminal_summary(results: Sequence[SweepResult], signal_name: str = "a signal") -> str:
    """What a person at a terminal reads at the end of ``sweep``: per target what went, what
    is left, how long the deletes took, and what to do next if anything was refused or left."""
    # A lone failure is worded once, by the error line that follows (exit 1); of several, each.
    blocks = [_summary_of(r, len(results) > 1, signal_name) for r in results]
    if len(results) > 1:
        deleted = sum(r.deleted + r.descendants_deleted for r in results)
        failed = sum(1 for r in results if r.error)
        blocks.append(
            f"in all: {_n(deleted)} deleted in {len(results)} sweeps"
            + (f", {failed} failed" if failed else "")
        )
    return "\n".join(blocks)


def _summary_of(r: SweepResult, say_error: bool, signal_name: str) -> str:
    s = r.settings
    where = s.kind + (f" (namespace {s.namespace})" if s.namespace else "")
    if r.error is not None:
        gone = f"; {_n(r.deleted)} deleted before it" if r.deleted else "; nothing deleted"
        return f"{where}: error{gone}" + (f"\n  {r.error}" if say_error else "")
    entities = r.deleted + r.descendants_deleted
    took = r.deleting_s if r.deleting_s is not None else r.duration_s
    if r.stopped_reason in ("declined", "signal"):  # one line: a person's
        why = "not confirmed" if r.stopped_reason == "declined" else f"stopped by {signal_name}"
        if not entities:
            return f"{where}: {why}; nothing was deleted"
        return f"{where}: {why} after deleting {_n(entities)} in {took:.1f} s; run again to go on"
    if s.dry_run:
        head = f"{where}: dry run, would delete {_n(r.matched)}; nothing was deleted"
    elif r.matched == 0:
        head = f"{where}: nothing was due"
    else:
        rate = f", {entities / took:,.0f}/s" if took > 0 else ""
        under = f" ({_n(r.descendants_deleted)} under them)" if r.descendants_deleted else ""
        head = f"{where}: deleted {_n(entities)}{under} in {took:.1f} s{rate}"
    lines = [head]
    kept = []
    if r.skipped:
        kept.append(f"{_n(r.skipped)} kept (live again when checked)")
    if r.failed:
        kept.append(f"{_n(r.failed)} could not be deleted (see delete_refused in the log)")
    if kept:
        lines.append("  " + "; ".join(kept))
    left = r.retention.expired_left if r.retention and not s.dry_run else None
    if left is not None and left.n:
        more = "at least " if left.lower_bound else ""
        lines.append(f"  left past the cutoff: {more}{_n(left.n)}")
    if s.dry_run and r.matched:
        lines.append(f"  {_after_dry_run(r)}")
    elif r.stopped_reason in ("max_deletes", "max_runtime") and not s.dry_run:
        option = "--max-deletes" if r.stopped_reason == "max_deletes" else "--max-runtime"
        lines.append(f"  stopped at {option}: run again to go on")
    return "\n".join(lines)


def _after_dry_run(r: SweepResult) -> str:
    """What to do next: never to run what the fraction guard would refuse (its own rule, over
    what the dry run matched and what carries the property after it)."""
    s, kept = r.settings, r.retention
    if kept is None or not r.dry_run_refused:
        return "run again without --dry-run to delete them"
    carrying = kept.carrying.n
    return (
        f"a run without --dry-run would be refused: {_n(r.matched)} of the {_n(carrying)} "
        f"carrying {s.prop} ({r.matched / carrying:.0%}) is more than --max-fraction "
        f"{s.max_fraction:g}. If this is a backlog, not a mistake, run it once with "
        "--max-fraction 1"
    )


def _n(count: int) -> str:
    return f"{count:,}"
