"""How fast a run deletes (:class:`Throttle`), and how many it may still delete
(:class:`Allowance`). Background: docs/scaling.md and docs/performance.md.

Three limits combine, in the spirit of Apache Beam's Datastore connector:

* **ramp-up**, Datastore's "500/50/5" rule, so that it has time to split the key ranges being
  hit; its clock starts at the first :meth:`Throttle.acquire` (querying is not write traffic),
  and the ``divisor`` shards of a run share it;
* **a hard cap** (``max_rate``);
* **adaptive throttling** (Google SRE book, "Handling Overload"): hold a request back with
  probability ``(requests - overload_ratio * accepts) / (requests + 1)`` over ``window_s``.

The rate limit is a token bucket, paid before (a commit cannot be split for the throttle's
sake). It starts empty and saves up at most ``BURST_S`` of the rate, so ``--max-rate`` is never
exceeded over a run. Every method is thread-safe; sleeping happens outside the lock, so one
waiting worker never blocks another's :meth:`Throttle.record`.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sweeper.logs import RefusedError

# Datastore's "500/50/5" rule.
BASE_RATE = 500.0
RAMP_FACTOR = 1.5
RAMP_INTERVAL_S = 300.0

# After 60 steps (five hours) the ramp allows ~2e13 operations/s, far past anything a database
# takes; it stops growing there so that the float arithmetic stays finite on very long runs.
MAX_RAMP_STEPS = 60
BURST_S = 1.0
BUCKET_S = 1.0  # the adaptive throttle's window moves in steps of this


@dataclass(frozen=True)
class ThrottleSettings:
    """How hard sweeper may push the database.

    ``overload_ratio`` is the SRE book's ``K``: with 1.25, up to one request in five may be
    refused before requests are held back. ``window_s`` is how long a refusal is remembered: a
    sweep sends few requests, so after a quota outage its retries' refusals outweigh the accepts
    while they stay in the window, and Beam's 120 s (or 60 s) kept a run crawling long after
    the outage ended. The retries' own backoff (``sweeper.retry``) protects the database then.
    Adaptive throttling costs nothing while the server accepts everything: on by default.
    """

    ramp_up: bool = True
    max_rate: float | None = None
    divisor: int = 1
    adaptive: bool = True
    overload_ratio: float = 1.25
    window_s: float = 20.0
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.divisor < 1:
            raise ValueError(f"divisor must be at least 1, got {self.divisor}")
        if self.max_rate is not None and not (0 < self.max_rate < math.inf):
            raise ValueError(f"max_rate must be a positive number, got {self.max_rate}")
        if not self.overload_ratio >= 1.0:
            # Below 1, a server that accepts everything would still be throttled.
            raise ValueError(f"overload_ratio must be at least 1, got {self.overload_ratio}")
        if not (0 < self.window_s < math.inf):
            raise ValueError(f"window_s must be a positive number, got {self.window_s}")
        if not (0 < self.backoff_s < math.inf):
            raise ValueError(f"backoff_s must be a positive number, got {self.backoff_s}")


@dataclass(frozen=True)
class RampSchedule:
    """The allowed rate as a step function of the seconds since the first write."""

    base: float | None  # ramp-up's starting rate; None when ramp-up is off
    cap: float | None  # max_rate

    @property
    def unlimited(self) -> bool:
        return self.base is None and self.cap is None

    def _step(self, elapsed: float) -> int:
        return min(math.floor(max(elapsed, 0.0) / RAMP_INTERVAL_S), MAX_RAMP_STEPS)

    def rate_at(self, elapsed: float) -> float:
        """Operations per second allowed at ``elapsed``; ``inf`` when nothing limits it."""
        ramp = math.inf if self.base is None else self.base * RAMP_FACTOR ** self._step(elapsed)
        return ramp if self.cap is None else min(ramp, self.cap)

    def _segment_end(self, elapsed: float) -> float:
        """Where the rate next changes after ``elapsed`` (``inf`` once it no longer grows)."""
        if self.base is None or self.rate_at(elapsed) == self.cap:
            return math.inf
        step = self._step(elapsed)
        return math.inf if step >= MAX_RAMP_STEPS else (step + 1) * RAMP_INTERVAL_S

    def accrued(self, start: float, end: float) -> float:
        """Operations the budget allows over ``[start, end]``: the rate's integral."""
        total = 0.0
        while start < end:
            stop = min(end, self._segment_end(start))
            total += self.rate_at(start) * (stop - start)
            start = stop
        return total

    def time_to_accrue(self, start: float, amount: float) -> float:
        """The earliest ``end`` with ``accrued(start, end) >= amount``."""
        while True:
            rate = self.rate_at(start)
            stop = self._segment_end(start)
            if amount <= rate * (stop - start):
                return start + amount / rate
            amount -= rate * (stop - start)
            start = stop


class _Window:
    """Requests and accepts over the last ``window_s`` seconds, in one-second buckets."""

    def __init__(self, window_s: float) -> None:
        self._span = max(1, math.ceil(window_s / BUCKET_S))
        self._sent: deque[tuple[int, bool]] = deque()  # (bucket, accepted) per request
        self.accepts = 0

    @property
    def requests(self) -> int:
        return len(self._sent)

    def add(self, now: float, accepted: bool) -> None:
        self.expire(now)
        self._sent.append((math.floor(now / BUCKET_S), accepted))
        self.accepts += accepted

    def expire(self, now: float) -> None:
        oldest = math.floor(now / BUCKET_S) - self._span + 1
        while self._sent and self._sent[0][0] < oldest:
            self.accepts -= self._sent.popleft()[1]


class Throttle:
    """Decides when each delete batch may be sent; shared by all delete workers of one run."""

    def __init__(
        self,
        settings: ThrottleSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        base = BASE_RATE / settings.divisor if settings.ramp_up else None
        self._schedule = RampSchedule(base=base, cap=settings.max_rate)
        self._lock = threading.Lock()
        self._window = _Window(settings.window_s)
        self._start: float | None = None  # clock at the first acquire
        self._tokens = 0.0  # empty at the first acquire: no burst to start with
        self._updated = 0.0  # seconds since _start at which _tokens holds

    def acquire(self, operations: int) -> float:
        """Block until ``operations`` may be sent; return the seconds spent waiting. Push-back
        is waited out first, ``backoff_s`` at a time (the sweep slows down, not stops), and only
        then is the rate budget reserved: a worker backing off holds none."""
        if operations < 1:
            raise ValueError(f"operations must be at least 1, got {operations}")
        waited = 0.0
        while self._held_back():
            self._sleep(self._settings.backoff_s)
            waited += self._settings.backoff_s
        wait = self._reserve(operations)
        if wait > 0:
            self._sleep(wait)
        return waited + wait

    def refund(self, operations: int) -> None:
        """Give back what :meth:`acquire` reserved for a request the server refused outright
        (too many entity groups, too big): it deleted nothing, so it costs no rate."""
        with self._lock:
            if not self._schedule.unlimited:
                self._tokens += operations

    def record(self, accepted: bool) -> None:
        """Report one sent request: ``accepted=False`` when the server refused it for load. A
        request held back by :meth:`acquire` counts once, when it is sent: counting every
        re-check would let the throttle's own waiting keep it engaged."""
        if not self._settings.adaptive:
            return
        with self._lock:
            self._window.add(self._clock(), accepted)

    def _held_back(self) -> bool:
        """Draw whether the server's recent refusals say this request should wait."""
        with self._lock:
            window = self._window
            window.expire(self._clock())
            excess = window.requests - self._settings.overload_ratio * window.accepts
            probability = excess / (window.requests + 1)
            return probability > 0.0 and self._rng.random() < probability

    def _reserve(self, operations: int) -> float:
        """Take ``operations`` from the bucket; return how long the caller must wait first."""
        with self._lock:
            if self._schedule.unlimited:
                return 0.0
            now = self._clock()
            if self._start is None:
                self._start = now
            elapsed = now - self._start
            # Bring the bucket up to now (or to the last grant, if that is later), then find
            # when it holds ``operations``.
            grant = max(elapsed, self._updated)
            accrued = self._schedule.accrued(self._updated, grant)
            burst = self._schedule.rate_at(grant) * BURST_S
            self._tokens = min(self._tokens + accrued, burst)
            if self._tokens < operations:
                grant = self._schedule.time_to_accrue(grant, operations - self._tokens)
                self._tokens = float(operations)
            self._tokens -= operations
            self._updated = grant
            return max(0.0, grant - elapsed)


class Capped(Exception):
    """--max-deletes is reached: what is left waits for the next run."""


class Allowance:
    """Entities a run may still delete: ``--max-deletes``, and the fraction guard's share.

    Counted in entities, children included: a commit reserves its entities before it is sent
    (the gate's rule 3) and gives back what did not go. Reaching ``--max-deletes`` ends the run
    quietly; passing the guard's share refuses it.
    """

    def __init__(self, cap: int | None, guard: int | None = None, guard_note: str = "") -> None:
        self._cap, self._guard, self._note = cap, guard, guard_note
        self._used = 0
        self._lock = threading.Lock()
        self.capped = False

    def left(self) -> int | None:
        """Entities left under --max-deletes (None: no cap); the guard's share is no cap."""
        with self._lock:
            return None if self._cap is None else max(0, self._cap - self._used)

    def reserve(self, sizes: Sequence[int]) -> int:
        """How many of the groups of ``sizes`` (in order) may go; reserves their entities."""
        with self._lock:
            taken, used = 0, self._used
            for size in sizes:
                if self._guard is not None and used + size > self._guard:
                    raise RefusedError(
                        f"refusing to go on: this run has deleted {self._used} entities, and "
                        f"the next commit would pass --max-fraction's share of {self._guard} "
                        f"entities{self._note}. Nothing more was deleted."
                    )
                if self._cap is not None and used + size > self._cap:
                    self.capped = True
                    break
                used += size
                taken += 1
            self._used = used
            return taken

    def release(self, entities: int) -> None:
        with self._lock:
            self._used -= entities
