"""A fake monotonic clock, for tests that must not wait for real time to pass."""

from __future__ import annotations

import threading


class FakeClock:
    """A monotonic clock that moves only when told: by ``sleep`` (each one recorded), by
    ``advance``, by setting ``now``, or by ``step`` seconds every time it is read. Safe to share
    between threads."""

    def __init__(self, now: float = 1000.0, step: float = 0.0) -> None:
        self.now = now
        self.step = step
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.now += self.step
            return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def advance(self, seconds: float) -> None:
        self.sleep(seconds)
