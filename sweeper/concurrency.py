"""The run's threads: the AIMD limit on Datastore calls in flight (docs/design.md, "A bad
network slows the run down": one gRPC channel, so one drop fails every call in flight), two
reads at once, and the pipeline of page streams and delete workers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc

# Failures that say the connection (not the request) is the problem.
CONNECTION_LEVEL = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    ConnectionError,
    TimeoutError,
    auth_exc.TransportError,
)

A = TypeVar("A")
B = TypeVar("B")


class Pool:
    """``size`` daemon workers, kept for the run, that ``map`` hands work to from any thread
    (the ancestor queries of ``--with-descendants``). Daemons, so that a call left hanging when
    the process must exit does not hold it up (a thread pool's workers would)."""

    def __init__(self, size: int, name: str) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        for i in range(size):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def _work(self) -> None:
        while True:
            self._tasks.get()()

    def map(self, fn: Callable[[A], B], items: Sequence[A]) -> list[B]:
        """``fn`` of each item, in their order, run by the workers; the first error raised."""
        out: list[B | None] = [None] * len(items)
        errors: list[BaseException] = []
        done = threading.Semaphore(0)

        def one(i: int, item: A) -> None:
            try:
                out[i] = fn(item)
            except BaseException as exc:  # handed to the caller below
                errors.append(exc)
            finally:
                done.release()

        for i, item in enumerate(items):
            self._tasks.put(partial(one, i, item))
        for _ in items:
            done.acquire()
        if errors:
            raise errors[0]
        return out  # type: ignore[return-value]


def together(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """Both reads at once (one round trip, not two): ``second`` in the background, ``first``
    here. Raises ``first``'s error once both are done, else ``second``'s; a stop (a
    ``BaseException``) goes at once, and ``second`` is left to end on its own."""
    got: list[B] = []
    failed: list[BaseException] = []

    def beside() -> None:
        try:
            got.append(second())
        except BaseException as exc:  # raised in the caller's thread, below
            failed.append(exc)

    thread = threading.Thread(target=beside, name="together", daemon=True)  # as Pool's workers
    thread.start()
    try:
        a = first()
    except Exception:
        thread.join()
        raise
    thread.join()
    if failed:
        raise failed[0]
    return a, got[0]


# How long a blocked caller waits before looking at the stop flag again.
_POLL_S = 0.1


@dataclass(frozen=True)
class Degradation:
    """What the limiter did over a run, for ``sweep_finished``."""

    maximum: int
    minimum: int
    reductions: int
    reduced_s: float


class DegradationLog:
    """The one record of a self-limiting value (calls in flight, keys per commit) against its
    maximum: the lowest it went, how often it was cut, how long it spent below the maximum.
    Not locked: each owner records under its own lock."""

    def __init__(self, maximum: int, clock: Callable[[], float]) -> None:
        self._maximum, self._clock = maximum, clock
        self._value = self._minimum = maximum
        self._reductions = 0
        self._since: float | None = None  # below the maximum since then
        self._reduced_s = 0.0

    def record(self, value: int) -> None:
        now = self._clock()
        if value < self._value:
            self._reductions += 1
            self._minimum = min(self._minimum, value)
        if value < self._maximum and self._since is None:
            self._since = now
        if value >= self._maximum and self._since is not None:
            self._reduced_s += now - self._since
            self._since = None
        self._value = value

    def degradation(self) -> Degradation:
        ongoing = 0.0 if self._since is None else self._clock() - self._since
        return Degradation(
            self._maximum, self._minimum, self._reductions, self._reduced_s + ongoing
        )


class CallLimiter:
    """An AIMD-sized semaphore over Datastore calls; safe to share between threads."""

    def __init__(
        self,
        maximum: int,
        clock: Callable[[], float],
        check_stop: Callable[[], None] = lambda: None,
    ) -> None:
        if maximum < 1:
            raise ValueError(f"maximum must be at least 1, got {maximum}")
        self.maximum = maximum
        self.limit = maximum
        self._check_stop = check_stop
        self._cond = threading.Condition()
        self._in_flight = 0
        # Bumped at every cut: one drop fails every call in flight together, so only the first
        # failure of calls started since the last cut halves the limit again.
        self._epoch = 0
        self._successes = 0
        self._log = DegradationLog(maximum, clock)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of ``limit`` places for the duration of one call, recording its outcome."""
        with self._cond:
            while self._in_flight >= self.limit:
                self._cond.wait(_POLL_S)
                self._check_stop()
            self._in_flight += 1
            epoch = self._epoch
        try:
            yield
        except BaseException as exc:
            self._release(epoch, exc)
            raise
        self._release(epoch, None)

    def _release(self, epoch: int, error: BaseException | None) -> None:
        with self._cond:
            self._in_flight -= 1
            if error is None and self.limit < self.maximum:
                self._successes += 1
                if self._successes >= self.limit:
                    self._successes = 0
                    self.limit += 1
                    self._log.record(self.limit)
            elif isinstance(error, CONNECTION_LEVEL) and epoch == self._epoch:
                self._epoch += 1
                self._successes = 0
                self.limit = max(1, self.limit // 2)
                self._log.record(self.limit)
            self._cond.notify_all()

    def degradation(self) -> Degradation:
        with self._cond:
            return self._log.degradation()


_DONE = object()


class Pipeline(Generic[A]):
    """Querying and deleting overlap: each stream's thread puts batches on a queue of at most
    ``2 x workers`` (memory stays bounded) for the workers to ``process``. A stop
    (``should_stop``, or any thread's first error, which :meth:`run` re-raises) is checked
    before a batch is queued and before one is taken: deletes in flight finish, none start."""

    def __init__(
        self,
        workers: int,
        process: Callable[[A], None],
        should_stop: Callable[[], bool],
    ) -> None:
        if workers < 1:
            raise ValueError("at least one worker")
        self._workers = workers
        self._process = process
        self._should_stop = should_stop
        self._queue: queue.Queue[object] = queue.Queue(maxsize=2 * workers)
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def run(self, streams: Sequence[Iterable[A]]) -> None:
        producers = [self._thread(self._produce, stream) for stream in streams]
        consumers = [self._thread(self._consume) for _ in range(self._workers)]
        for thread in producers:
            thread.join()
        for _ in consumers:
            self._put(_DONE, force=True)
        for thread in consumers:
            thread.join()
        if self._error is not None:
            raise self._error

    def stopping(self) -> bool:
        return self._error is not None or self._should_stop()

    def _thread(self, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        return thread

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc

    def _produce(self, stream: Iterable[A]) -> None:
        try:
            for item in stream:
                if self.stopping() or not self._put(item):
                    return
        except BaseException as exc:  # handed to run(), which re-raises it
            self._fail(exc)

    def _consume(self) -> None:
        """Process items until told to finish; after a failure, drain without work: a worker
        never exits early, so no producer nor the end markers' hand-over blocks on a full queue."""
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self.stopping():
                continue
            try:
                self._process(item)  # type: ignore[arg-type]
            except BaseException as exc:  # handed to run(), which re-raises it
                self._fail(exc)

    def _put(self, item: object, force: bool = False) -> bool:
        """Queue ``item``, waiting for room; give up (False) when the run is stopping."""
        while True:
            try:
                self._queue.put(item, timeout=_POLL_S)
            except queue.Full:
                if self.stopping() and not force:
                    return False
            else:
                return True
