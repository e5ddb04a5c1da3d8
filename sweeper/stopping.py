"""When a sweep must stop, waits that end the moment it must, and what it may still delete.

Kubernetes sends SIGTERM and kills the pod ``terminationGracePeriodSeconds`` later (30 s by
default); whatever has not been logged by then is lost. A sweep spends its time in four kinds
of places: Datastore calls, retry backoff, throttle waits and the loops between them. A stop
check only before each delete batch misses most of them (a scan where nothing has expired, a
shard walking empty slices, a five-minute throttle wait), so here every wait is cut into short
slices with a check before each, and every Datastore call is preceded by a check (see
:class:`sweeper.retry.Retrier`). A check that finds the run stopping raises :class:`Stopped`,
which unwinds whichever thread it is in without being mistaken for a failure.

Calls already in flight cannot be cut short from the client; the engine gives them a short
drain and then reports the run without them (see ``sweeper.engine``).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence

from sweeper.errors import RefusedError

# The longest a wait goes without looking at the stop flag and the deadline.
WAIT_SLICE_S = 0.2


class StopReason(enum.StrEnum):
    """Why a sweep ended: the ``stopped_reason`` of ``sweep_finished``."""

    COMPLETE = "complete"
    MAX_DELETES = "max_deletes"
    MAX_RUNTIME = "max_runtime"
    SIGNAL = "signal"
    ERROR = "error"


class Stopped(BaseException):
    """The run must stop now (a signal or the deadline). Not an error: nothing failed.

    A ``BaseException``, like ``KeyboardInterrupt``, so that code catching ``Exception`` to
    count a failed batch or wrap a Datastore error lets it through untouched.
    """

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Stopper:
    """Answers "must the run stop, and why" from any thread, and waits interruptibly.

    ``deadline`` is a value of ``monotonic`` (``--max-runtime``), or None for none.
    """

    def __init__(
        self,
        stop_requested: Callable[[], bool],
        monotonic: Callable[[], float],
        sleep: Callable[[float], None],
        deadline: float | None = None,
    ) -> None:
        self._stop_requested = stop_requested
        self._monotonic = monotonic
        self._sleep = sleep
        self.deadline = deadline

    def reason(self) -> StopReason | None:
        if self._stop_requested():
            return StopReason.SIGNAL
        if self.deadline is not None and self._monotonic() >= self.deadline:
            return StopReason.MAX_RUNTIME
        return None

    def stopping(self) -> bool:
        """Whether the run must stop: what every loop of the run asks between its steps."""
        return self.reason() is not None

    def check(self) -> None:
        """Raise :class:`Stopped` if the run must stop."""
        reason = self.reason()
        if reason is not None:
            raise Stopped(reason)

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` in short slices; raise :class:`Stopped` as soon as the run must stop.

        The slices are counted, not timed, so an injected sleep that returns at once (unit
        tests) still ends the wait after ``seconds / WAIT_SLICE_S`` checks.
        """
        left = seconds
        while left > 0:
            self.check()
            step = min(left, WAIT_SLICE_S)
            self._sleep(step)
            left -= step
        self.check()


# -- The allowance: what a run may still delete --------------------------------------------------
# How many entities a run may still delete: ``--max-deletes``, and the fraction guard's share.
#
# Counted in entities, children included (the gate's rule 3): a commit reserves what it would
# delete before it is sent, and gives back what did not go.


class Capped(Exception):
    """--max-deletes is reached: what is left waits for the next run."""


class Allowance:
    """Entities a run may still delete: ``--max-deletes``, and the fraction guard's share.

    A commit reserves its entities before it is sent (rule 3) and gives back what did not go.
    Reaching ``--max-deletes`` ends the run quietly; passing the guard's share refuses it.
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
