"""The one retry policy for every Datastore call sweeper makes (the client's own retries are
off; docs/design.md, "Batched deletes with retry"), and the run's one stop.

Retries are bounded by time and by the run's progress, not by a count: one dropped connection
fails every call in flight together, so a handful of drops would exhaust any small count.
"""

from __future__ import annotations

import enum
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import structlog
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    stop_never,
    wait_random_exponential,
)

from sweeper.concurrency import CallLimiter
from sweeper.logs import EXIT_SIGINT, EXIT_SIGTERM, DatastoreError, describe_exception

T = TypeVar("T")


# Errors after which a commit may have been applied although its answer never came: a lost
# connection (gRPC reports UNKNOWN or CANCELLED when one breaks mid-call), a timeout.
AMBIGUOUS = (
    *(gexc.DeadlineExceeded, gexc.ServiceUnavailable, gexc.Unknown, gexc.Cancelled),
    *(gexc.InternalServerError, ConnectionError, TimeoutError),
)
# Transient by Datastore's own guidance: those, contention, overload, a token not fetched.
TRANSIENT = (
    *(*AMBIGUOUS, gexc.Aborted, gexc.ResourceExhausted, gexc.GatewayTimeout),
    auth_exc.TransportError,
)

# The server telling us to slow down: these feed the adaptive throttle.
PUSHBACK = (gexc.ResourceExhausted, gexc.Aborted)

# Handed to the client so it does not retry behind our back (and outside our counts).
NO_CLIENT_RETRY = Retry(predicate=lambda _exc: False)

# Per-call deadline. A black-holed host costs at most this per attempt. Deletes are sized to
# answer well within it (``deleter.BatchSizer``), and a call that times out shrinks them.
CALL_TIMEOUT_S = 20.0

# From SIGTERM, SIGINT or the --max-runtime deadline to the sweep_finished summary, in every
# phase. Kubernetes kills a pod 30 s after SIGTERM by default; this leaves room to spare.
STOP_BUDGET_S = 10.0


# Before any call of a run has succeeded, a refused connection or a host name that does not
# resolve is a configuration mistake, not an outage: the call gives up after this many attempts
# (a second or two) instead of riding it out for --give-up-after, as kubectl answers at once.
REFUSED_ATTEMPTS = 3
_NOT_THERE = {"Connection refused": "connection refused", "errors resolving": "no such host"}


def not_there(exc: BaseException) -> str | None:
    """What a refused connection or an unknown host says, or None for any other error."""
    if not isinstance(exc, gexc.ServiceUnavailable):
        return None
    return next((why for text, why in _NOT_THERE.items() if text in str(exc)), None)


def unreachable(why: str) -> DatastoreError:
    host = os.environ.get("DATASTORE_EMULATOR_HOST")
    if host:
        return DatastoreError(
            f"cannot reach the Datastore emulator at {host} (DATASTORE_EMULATOR_HOST): {why}. "
            "Is it running, and are the host and port right?"
        )
    return DatastoreError(f"cannot reach Datastore: {why}. Check the network, proxy or firewall")


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) and not too_large(exc)


def too_large(exc: BaseException) -> bool:
    """An answer larger than gRPC takes (4 MiB): RESOURCE_EXHAUSTED, but no quota. The same
    call fails the same way every time; a smaller one goes (``Target``'s pages shrink)."""
    return isinstance(exc, gexc.ResourceExhausted) and "larger than max" in str(exc)


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff. A call is retried while some call of the run succeeded
    within ``stall_s`` (so a CronJob against a dead database fails instead of hanging) and it is
    younger than ``max_delay_s``. ``max_attempts`` is for tests."""

    max_attempts: int | None = None
    max_delay_s: float = 120.0
    initial_wait_s: float = 0.5
    max_wait_s: float = 10.0
    stall_s: float = 60.0
    call_timeout_s: float = CALL_TIMEOUT_S


@dataclass
class RetryCounter:
    """Retries over the whole run (queries and deletes alike), and when a call last succeeded."""

    retries: int = 0
    last_success: float | None = None
    # Calls that succeeded, by kind ("query", "lookup", "delete", "verify"): what was billed.
    calls: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self) -> None:
        with self._lock:  # delete workers retry concurrently
            self.retries += 1

    def succeeded(self, now: float, what: str | None = None) -> None:
        with self._lock:
            self.last_success = now
            if what is not None:
                self.calls[what] += 1


class Retrier:
    """Runs a call under the policy, counting and logging each retry."""

    def __init__(
        self,
        policy: RetryPolicy,
        counter: RetryCounter,
        sleep: Callable[[float], None] = time.sleep,
        on_failure: Callable[[BaseException], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        stopper: Stopper | None = None,
        limiter: CallLimiter | None = None,
    ) -> None:
        self.policy = policy
        self._counter = counter
        # A stopper makes backoff interruptible: the run stops mid-wait, not after it.
        self._sleep = stopper.pause if stopper is not None else sleep
        self._on_failure = on_failure  # told of every failed attempt (adaptive throttling)
        self._clock = clock
        self._stopper = stopper
        self._limiter = limiter
        self._limits = stop_after_delay(policy.max_delay_s) | (
            stop_never if policy.max_attempts is None else stop_after_attempt(policy.max_attempts)
        )
        self._log = structlog.get_logger("sweeper.retry")

    @property
    def timeout(self) -> float:
        """A read's deadline: the policy's, never past the run's (a hung read holds up no stop)."""
        return self._bounded(0.0)

    @property
    def delete_timeout(self) -> float:
        """A commit's deadline: the policy's, at most ``DRAIN_S`` (time to land) past the run's."""
        return self._bounded(DRAIN_S)

    def _bounded(self, past_deadline: float) -> float:
        left = None if self._stopper is None else self._stopper.time_left()
        if left is None:
            return self.policy.call_timeout_s
        return max(0.1, min(self.policy.call_timeout_s, left + past_deadline))

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry transient errors; re-raise the last error once the policy gives up
        (:class:`Stopped` when the run is stopping)."""
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=self._gives_up,
            wait=wait_random_exponential(
                multiplier=self.policy.initial_wait_s, max=self.policy.max_wait_s
            ),
            sleep=self._sleep,
            before_sleep=lambda state: self._before_sleep(what, state),
            reraise=True,
        )
        try:
            value: T = retrying(self._attempt, what, fn)
        except gexc.ServiceUnavailable as exc:
            why = not_there(exc)
            if why is not None and not self._counter.calls:
                raise unreachable(why) from exc
            raise
        return value

    def _gives_up(self, state: RetryCallState) -> bool:
        return self._limits(state) or self._stalled(state) or self._unreached(state)

    def _stalled(self, state: RetryCallState) -> bool:
        """No call of the run has succeeded for ``stall_s``: the database is gone."""
        now, last = self._clock(), self._counter.last_success
        if last is None:  # the first failure of the run starts the clock
            self._counter.succeeded(now)
            return False
        return now - last >= self.policy.stall_s

    def _unreached(self, state: RetryCallState) -> bool:
        """No connection reaches the database, and no call of the run ever has."""
        error = state.outcome.exception() if state.outcome is not None else None
        first = not self._counter.calls and state.attempt_number >= REFUSED_ATTEMPTS
        return first and error is not None and not_there(error) is not None

    def _attempt(self, what: str, fn: Callable[[], T]) -> T:
        if self._stopper is not None:
            self._stopper.check()
        with self._limiter.slot() if self._limiter is not None else nullcontext():
            value = fn()
        self._counter.succeeded(self._clock(), what)
        return value

    def _before_sleep(self, what: str, state: RetryCallState) -> None:
        self._counter.add()
        error = state.outcome.exception() if state.outcome is not None else None
        if error is not None and self._on_failure is not None:
            self._on_failure(error)
        self._log.warning(
            "call_retrying",
            call=what,
            attempt=state.attempt_number,
            wait_s=round(state.upcoming_sleep, 3),
            error=describe_exception(error) if error is not None else None,
        )


# -- Stopping: every wait is cut into short slices with a check before each, as is every call
# (:class:`Retrier`): a check only before each batch would miss most of a run's time (a scan
# where nothing expired, a five-minute throttle wait).

WAIT_SLICE_S = 0.2  # the longest a wait goes without looking at the stop flag and deadline
# Once a run must stop, deletes already in flight get this long to land, so that the counts
# stay exact (``sweeper.engine``); no delete is given longer past the run's deadline.
DRAIN_S = 5.0


class StopReason(enum.StrEnum):
    """Why a sweep ended: the ``stopped_reason`` of ``sweep_finished``."""

    COMPLETE = "complete"
    MAX_DELETES = "max_deletes"
    MAX_RUNTIME = "max_runtime"
    SIGNAL = "signal"
    # A person answered no (or nothing) at the question before the deletes: exit 1, but no error.
    DECLINED = "declined"
    ERROR = "error"


class Stopped(BaseException):
    """The run must stop now (a signal, the deadline, a person's no). Not an error: a
    ``BaseException``, so code catching ``Exception`` for failed batches lets it through."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class StopEvent(threading.Event):
    """The run's stop flag, set by :class:`StopOnSignal` or a test. While the main thread runs
    a sweep, a report, a dry run's forecast or the push (:meth:`interrupting`), a signal also
    raises :class:`Stopped` in it, once, wherever it waits (a call that never answers too: gRPC
    looks at signals every 200 ms)."""

    def __init__(self) -> None:
        super().__init__()
        self._armed = False

    @contextmanager
    def interrupting(self, *, stopped_already: bool = True) -> Iterator[None]:
        """``stopped_already`` off: a signal that came before does not stop what follows (the
        push of a run it stopped), one that comes now does."""
        if stopped_already and self.is_set():
            raise Stopped(StopReason.SIGNAL)
        self._armed = threading.current_thread() is threading.main_thread()
        try:
            yield
        finally:
            self._armed = False

    def signalled(self) -> None:
        """A signal arrived (in the main thread, as Python runs handlers)."""
        self.set()
        if self._armed:
            self._armed = False  # once: what unwinds after it runs to its end
            raise Stopped(StopReason.SIGNAL)


class StopOnSignal:
    """SIGTERM (pod eviction, job deadline) and SIGINT set the run's stop ``event``."""

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


class Stopper:
    """The run's one stop, asked from any thread: the stop event and the ``--max-runtime``
    deadline (a value of ``monotonic``, or None)."""

    def __init__(
        self,
        event: threading.Event,
        monotonic: Callable[[], float],
        sleep: Callable[[float], None],
        deadline: float | None = None,
    ) -> None:
        self._event, self._monotonic, self._sleep = event, monotonic, sleep
        self.deadline = deadline

    def reason(self) -> StopReason | None:
        if self._event.is_set():
            return StopReason.SIGNAL
        if self.deadline is not None and self._monotonic() >= self.deadline:
            return StopReason.MAX_RUNTIME
        return None

    def stopping(self) -> bool:
        return self.reason() is not None

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - self._monotonic()

    def check(self) -> None:
        reason = self.reason()
        if reason is not None:
            raise Stopped(reason)

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` in short slices; raise :class:`Stopped` as soon as the run must stop.
        The slices are counted, not timed: an injected sleep that returns at once still ends."""
        left = seconds
        while left > 0:
            self.check()
            step = min(left, WAIT_SLICE_S)
            self._sleep(step)
            left -= step
        self.check()
