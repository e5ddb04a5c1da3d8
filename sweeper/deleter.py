"""How big each commit is: the batch sizer.

Datastore refuses more than 500 mutations per commit; the gate (``sweeper.gate``) packs its
groups into commits of at most the size :class:`BatchSizer` allows now.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from google.api_core import exceptions as gexc

from sweeper.concurrency import Degradation, DegradationLog

T = TypeVar("T")

# What one commit should take, and the fewest keys worth a round trip (Beam's floor too).
TARGET_COMMIT_S = 2.0
MIN_COMMIT_KEYS = 5


class BatchSizer:
    """Keys per commit, sized to what the database answers in.

    A fixed 500 keys fails on a database that takes longer than the call deadline to delete
    them (a legacy emulator holding half a million entities takes over 20 s): every attempt
    times out and the run fails having deleted nothing. As Apache Beam's Datastore connector
    does, the size follows the recent time per key so that a commit takes about
    ``target_s``; a commit that times out proves at least ``elapsed / keys`` per key, which
    cuts the size at once, and the retry sends the smaller commit. Sweeper aims lower than
    Beam's 6 s so that a commit in flight when the run must stop lands within the stop budget.
    """

    def __init__(
        self,
        maximum: int,
        clock: Callable[[], float],
        target_s: float = TARGET_COMMIT_S,
        minimum: int = MIN_COMMIT_KEYS,
    ) -> None:
        self.maximum = maximum
        self._minimum = min(minimum, maximum)
        self._clock = clock
        self._target_s = target_s
        self._per_key: float | None = None  # smoothed seconds per key
        self._lock = threading.Lock()
        self.size = maximum
        self._log = DegradationLog(maximum, clock)

    def observe(self, seconds: float, keys: int) -> None:
        """A commit of ``keys`` keys answered in ``seconds``."""
        with self._lock:
            sample = seconds / max(keys, 1)
            previous = self._per_key
            self._per_key = sample if previous is None else 0.5 * previous + 0.5 * sample
            # A commit answered within the target is no reason to send smaller ones: a first
            # call that also sets up the connection, or a small batch that is mostly round
            # trip, overstates the time per key.
            self._resize(shrink=seconds > self._target_s)

    def measure(self, keys: int, commit: Callable[[], T]) -> T:
        """Run one commit of ``keys`` keys and learn from how long it took, or that it timed out."""
        started = self._clock()
        try:
            value = commit()
        except gexc.DeadlineExceeded:
            self.timed_out(self._clock() - started, keys)
            raise
        self.observe(self._clock() - started, keys)
        return value

    def timed_out(self, seconds: float, keys: int) -> None:
        """A commit of ``keys`` keys was still unanswered after ``seconds``."""
        with self._lock:
            self._per_key = max(self._per_key or 0.0, seconds / max(keys, 1))
            self._resize()

    def refused(self, keys: int) -> None:
        """The database refused a larger commit as too big: send at most ``keys`` for now.

        Fast commits grow the size back (``observe``), so one heavy entity does not slow the
        rest of the run.
        """
        with self._lock:
            if keys < self.size:
                self._per_key = max(self._per_key or 0.0, self._target_s / max(keys, 1))
                self._resize()

    def _resize(self, shrink: bool = True) -> None:
        assert self._per_key is not None
        fits = int(self._target_s / self._per_key) if self._per_key > 0 else self.maximum
        size = max(self._minimum, min(self.maximum, fits))
        if not shrink:
            size = max(size, self.size)
        self._log.record(size)
        self.size = size

    def degradation(self) -> Degradation:
        with self._lock:
            return self._log.degradation()
