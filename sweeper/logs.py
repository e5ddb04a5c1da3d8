"""What an operator reads: the logs (JSON for Cloud Logging, docs/metrics.md, or console), what
a person at a terminal reads instead (a live line, a summary), and :class:`SweeperError`: what
goes wrong for an operator, with a one-line message and the exit code a scheduler should see
(``cli.main`` alone prints it).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TextIO

import structlog
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from structlog.typing import EventDict, Processor, WrappedLogger

if TYPE_CHECKING:  # the result's module logs through this one
    from sweeper.result import SweepResult

LogFormat = Literal["json", "console"]
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_severity(_logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Cloud Logging's level field; ``warn`` is spelled out as Cloud Logging expects."""
    level = "warning" if method == "warn" else method
    event_dict["severity"] = "ERROR" if level == "exception" else level.upper()
    return event_dict


# The run's full records: on a person's terminal the command prints a short summary instead
# (:func:`summary`), and these show at ``--log-level debug`` only.
SUMMARY_EVENTS = frozenset({"sweep_finished", "run_finished"})


def configure(
    log_format: LogFormat,
    level: str = "info",
    stream: TextIO | None = None,
    *,
    person: bool = False,
    before_each: Callable[[], None] | None = None,
) -> None:
    """``person``: a console log on an interactive terminal, where SUMMARY_EVENTS are hidden."""
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    out = stream if stream is not None else sys.stderr
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        processors += [
            add_severity,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str),
        ]
    else:
        if person and level != "debug":
            processors.append(_hide_summaries)
        if before_each is not None:  # e.g. take the live progress line off the terminal
            processors.append(lambda _logger, _method, event: (before_each(), event)[1])
        processors += [
            structlog.processors.add_log_level,
            # https://no-color.org: NO_COLOR set and not empty turns colours off.
            structlog.dev.ConsoleRenderer(colors=out.isatty() and not os.environ.get("NO_COLOR")),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            int(logging.getLevelName(level.upper()))
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def _hide_summaries(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    if event_dict.get("event") in SUMMARY_EVENTS:
        raise structlog.DropEvent
    return event_dict


class ProgressLine:
    """A live line on an interactive terminal: deleted so far, rate, elapsed. It is taken off
    before each log line (``clear``), which would otherwise be printed into it, and at the end,
    where the summary says the same."""

    def __init__(self, stream: TextIO, every_s: float = 0.5) -> None:
        self._stream, self._every_s, self._last = stream, every_s, 0.0
        self._width = 0  # of the line on the terminal; 0: none
        # Delete workers draw it, any thread's log line takes it off.
        self._lock = threading.RLock()

    def show(self, result: SweepResult, elapsed_s: float, finished: bool) -> None:
        s = result.settings
        with self._lock:
            if finished:
                self.clear()
                self._last = 0.0  # the next target starts afresh
            elif elapsed_s - self._last >= self._every_s:
                done = result.matched if s.dry_run else result.deleted
                verb = "would delete" if s.dry_run else "deleted"
                rate = done / elapsed_s if elapsed_s > 0 else 0.0
                text = f"{s.kind}: {verb} {done} ({rate:.0f}/s), {elapsed_s:.0f}s elapsed"
                self._stream.write("\r" + text.ljust(self._width))
                self._stream.flush()
                self._width, self._last = len(text), elapsed_s

    def clear(self) -> None:
        with self._lock:
            if self._width:
                self._stream.write("\r" + " " * self._width + "\r")
                self._stream.flush()
                self._width = 0


def summary(results: Sequence[SweepResult], signal_name: str = "a signal") -> str:
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


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class SweeperError(Exception):
    """A failure with a message fit for one line of operator output."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(SweeperError):
    """An option value that can never work; nothing was touched."""

    exit_code = EXIT_USAGE


class RefusedError(SweeperError):
    """The stored data is ambiguous, so sweeping it could delete live sessions."""


class DatastoreError(SweeperError):
    """Datastore failed (unreachable, permission denied, retries exhausted)."""


# What a Datastore call raises when the database, the network or the credentials fail: an
# operator's problem. Anything else escaping a sweep is a bug, its traceback logged to be fixed.
CALL_FAILURES = (gexc.GoogleAPIError, auth_exc.GoogleAuthError, ConnectionError, TimeoutError)


def is_bug(exc: BaseException) -> bool:
    return not isinstance(exc, (SweeperError, *CALL_FAILURES))


def report_bug(log: Any, exc: BaseException) -> str:
    """Log a bug's traceback at error level (``internal_error``); its one-line message."""
    log.error("internal_error", exc_info=exc)
    return f"internal error: {describe_exception(exc)}"


def one_line(text: str, limit: int = 500) -> str:
    """Collapse whitespace so a message never spans lines, and bound its length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe_exception(exc: BaseException) -> str:
    """A short, one-line description of a client exception, without a traceback."""
    detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return one_line(f"{type(exc).__name__}: {detail}")
