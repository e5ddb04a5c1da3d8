"""What only an interactive terminal or a signal concerns: the live progress line, stopping."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, TextIO

from sweeper.errors import EXIT_SIGINT, EXIT_SIGTERM
from sweeper.result import SweepResult


class ProgressLine:
    """A live line on an interactive terminal: deleted so far, rate, elapsed."""

    def __init__(self, stream: TextIO, every_s: float = 0.5) -> None:
        self._stream, self._every_s, self._last = stream, every_s, 0.0
        self._shown = False

    def show(self, result: SweepResult, elapsed_s: float, finished: bool) -> None:
        if not finished and elapsed_s - self._last < self._every_s:
            return
        self._last = elapsed_s
        if finished and not self._shown:
            return  # a run too short for a live line needs none
        done = result.matched if result.settings.dry_run else result.deleted
        verb = "would delete" if result.settings.dry_run else "deleted"
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        end = "\n" if finished else ""
        self._stream.write(
            f"\r{result.settings.kind}: {verb} {done} ({rate:.0f}/s), "
            f"{elapsed_s:.0f}s elapsed {end}"
        )
        self._stream.flush()
        self._shown = not finished
        self._last = 0.0 if finished else self._last


class StopOnSignal:
    """SIGTERM (pod eviction, job deadline) and SIGINT stop the run before its next batch."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.exit_code = EXIT_SIGTERM
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        self._event.set()

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
