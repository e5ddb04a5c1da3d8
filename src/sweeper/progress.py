"""What a run hands out and says as it goes: the --max-deletes budget, ``sweep_progress``."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from google.cloud.datastore import Key

from sweeper.result import Runtime, SweepResult
from sweeper.retry import RetryCounter


class DeleteBudget:
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


class ProgressLog:
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
