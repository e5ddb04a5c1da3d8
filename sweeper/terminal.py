"""What only an interactive terminal or a signal concerns: the live progress line, stopping."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, TextIO, TypeVar

from sweeper.guard import Exposure, Plan, describe
from sweeper.logs import EXIT_SIGINT, EXIT_SIGTERM, SweeperError
from sweeper.result import SweepResult
from sweeper.retry import StopEvent, Stopped, StopReason
from sweeper.target import Count

# How often the question looks at the stop flag while it waits for an answer.
_POLL_S = 0.1

T = TypeVar("T")


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
        with self._lock:
            self._show(result, elapsed_s, finished)

    def _show(self, result: SweepResult, elapsed_s: float, finished: bool) -> None:
        if finished:
            self.clear()
            self._last = 0.0  # the next target starts afresh
        elif elapsed_s - self._last >= self._every_s:
            done = result.matched if result.settings.dry_run else result.deleted
            verb = "would delete" if result.settings.dry_run else "deleted"
            rate = done / elapsed_s if elapsed_s > 0 else 0.0
            text = f"{result.settings.kind}: {verb} {done} ({rate:.0f}/s), {elapsed_s:.0f}s elapsed"
            self._stream.write("\r" + text.ljust(self._width))
            self._stream.flush()
            self._width, self._last = len(text), elapsed_s

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0


def summary(results: Sequence[SweepResult], signal_name: str = "a signal") -> str:
    """What a person at a terminal reads at the end of ``sweep``: per target what went, what
    is left, how long the deletes took, and what to do next if anything was refused or left.
    The whole ``sweep_finished`` is still there for machines (``--log-format json``) and at
    ``--log-level debug``."""
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
    if r.stopped_reason in (StopReason.DECLINED, StopReason.SIGNAL):  # one line: a person's
        why = (
            "not confirmed"
            if r.stopped_reason == StopReason.DECLINED
            else f"stopped by {signal_name}"
        )
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
    next_step = _NEXT.get(str(r.stopped_reason))
    if next_step and not s.dry_run:
        lines.append(f"  {next_step}")
    elif s.dry_run and r.matched:
        lines.append(f"  {_after_dry_run(r)}")
    return "\n".join(lines)


def _after_dry_run(r: SweepResult) -> str:
    """What to do next: never to run what the fraction guard would refuse (its own rule, over
    what the dry run matched and what carries the property after it)."""
    s, kept = r.settings, r.retention
    if kept is None or Exposure(Count(r.matched, "scan"), kept.carrying).within(s.max_fraction):
        return "run again without --dry-run to delete them"
    carrying = kept.carrying.n
    return (
        f"a run without --dry-run would be refused: {_n(r.matched)} of the {_n(carrying)} "
        f"carrying {s.prop} ({r.matched / carrying:.0%}) is more than --max-fraction "
        f"{s.max_fraction:g}. If this is a backlog, not a mistake, run it once with "
        "--max-fraction 1"
    )


_NEXT = {
    "max_deletes": "stopped at --max-deletes: run again to go on",
    "max_runtime": "stopped at --max-runtime: run again to go on",
}


def _n(count: int) -> str:
    return f"{count:,}"


class StopOnSignal:
    """SIGTERM (pod eviction, job deadline) and SIGINT set the run's stop ``event`` (and, while
    a sweep or a report runs, stop it where it waits: ``retry.StopEvent``)."""

    def __init__(self) -> None:
        self.event = StopEvent()
        self.exit_code = EXIT_SIGTERM
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return "SIGINT" if self.exit_code == EXIT_SIGINT else "SIGTERM"

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        self.event.signalled()

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def ask_before_deleting(plan: Plan, stopping: Callable[[], bool]) -> bool:
    """Show the person at the terminal on stdin what the sweep is about to delete, and ask
    (default: no; end of input is no).

    The question goes to that terminal itself, whatever stdout and stderr are piped to, and
    the answer is read from it unbuffered while the stop flag is watched: Ctrl-C at the
    question stops the run (exit 130). A thread left blocked in stdin's buffered reader
    instead crashed the interpreter at exit ("could not acquire lock for <stdin>").
    """
    fd = os.open(os.ttyname(sys.stdin.fileno()), os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, f"sweeper is about to delete:\n{describe(plan)}\n".encode())
        while True:
            os.write(fd, f"Delete these {plan.exposure.due.n:,} entities? [y/N]: ".encode())
            answer = _read_line(fd, stopping)
            if answer is None:  # end of input
                os.write(fd, b"\n")
                return False
            if answer.strip().lower() in ("", "n", "no", "y", "yes"):
                return answer.strip().lower() in ("y", "yes")
            os.write(fd, b"Please answer y or n.\n")
    except Stopped:  # Ctrl-C: the terminal has echoed ``^C``; end its line
        os.write(fd, b"\n")
        raise
    finally:
        os.close(fd)


def _read_line(fd: int, stopping: Callable[[], bool]) -> str | None:
    """A line typed at the terminal ``fd`` (None at end of input); raises :class:`Stopped` once
    the run must stop."""
    typed = b""
    while not typed.endswith(b"\n"):
        if stopping():
            raise Stopped(StopReason.SIGNAL)
        if select.select([fd], [], [], _POLL_S)[0]:
            chunk = os.read(fd, 1024)
            if not chunk:
                return None
            typed += chunk
    return typed.decode(errors="replace")


class StoppedBySignal(SweeperError):
    """A command without a summary of its own (``inspect``) was stopped by a signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_until_signal(stop: StopOnSignal, what: str, fn: Callable[[], T]) -> T:
    """``fn``, ended at once by SIGTERM/SIGINT whatever call it waits for.

    For read-only work such as ``inspect``: there is nothing to drain, so the command ends
    (one line, exit 143/130) as soon as the signal arrives.
    """
    try:
        with stop.event.interrupting():
            return fn()
    except Stopped:
        raise StoppedBySignal(
            f"{what} stopped by {stop.name}; nothing was changed", stop.exit_code
        ) from None
