"""What a run says as it goes: ``sweep_progress`` events."""

from __future__ import annotations

from typing import Any

from sweeper.result import Runtime, SweepResult
from sweeper.retry import RetryCounter


class ProgressLog:
    """``sweep_progress`` events, at most one per ``progress_every_s``."""

    def __init__(
        self, log: Any, runtime: Runtime, counter: RetryCounter, started: float, dry_run: bool
    ) -> None:
        self._log, self._rt, self._counter, self.started = log, runtime, counter, started
        self._next = started + runtime.progress_every_s
        self._dry_run = dry_run

    def maybe_log(self, result: SweepResult) -> None:
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
