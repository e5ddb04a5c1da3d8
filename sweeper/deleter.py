"""How big each commit is: the batch sizer, and a batch's groups cut into commits.

Datastore refuses more than 500 mutations per commit; the gate (``sweeper.gate``) takes its
commits from :class:`Pending`, each at most the size :class:`BatchSizer` allows now.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.concurrency import Degradation, DegradationLog
from sweeper.settings import MAX_BATCH_SIZE

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


Descendants = Mapping[datastore.Key, Sequence[datastore.Key]]
# One part of a commit: (session, keys): the keys to delete if the session may go. The session
# itself is the last key of its group's last part.
Part = tuple[datastore.Key, list[datastore.Key]]


class Pending:
    """What is left to delete of one batch: per session, its descendants and then itself.

    A commit takes whole groups while they fit; a group larger than a commit goes over several,
    descendants first and the session last, so a run that stops in between leaves the session
    (still expired) for the next run to find its remaining descendants through.
    """

    def __init__(self, keys: Sequence[datastore.Key], descendants: Descendants | None) -> None:
        under = descendants or {}
        self._groups: deque[Part] = deque((k, [*under.get(k, ()), k]) for k in keys)

    def __len__(self) -> int:
        """Sessions not yet deleted (whole, or their last keys)."""
        return len(self._groups)

    def take(self, size: int, max_groups: int = MAX_BATCH_SIZE) -> list[Part]:
        """The next commit: at most ``size`` keys over at most ``max_groups`` sessions."""
        taken: list[Part] = []
        room = size
        for session, keys in self._groups:
            if len(taken) == max_groups:
                break
            if len(keys) > room:
                if not taken:  # a group larger than a commit: its first keys
                    taken.append((session, keys[:size]))
                break
            taken.append((session, keys))
            room -= len(keys)
        return taken

    def done(self, taken: list[Part], kept: frozenset[datastore.Key] = frozenset()) -> None:
        """``taken`` (from :meth:`take`) went, except the groups of sessions in ``kept``."""
        for session, keys in taken:
            rest = self._groups[0][1]
            if session in kept or len(keys) == len(rest):
                self._groups.popleft()
            else:
                del rest[: len(keys)]
