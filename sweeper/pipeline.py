"""Overlap querying and deleting: query streams feed a bounded queue, workers delete from it.

Against production each query page and each commit takes tens of milliseconds; done one after
the other, a sweeper mostly waits. Here each query stream (a slice of the expired range) runs in
its own thread and puts batches on a queue that holds at most ``2 x workers`` batches, so memory
stays bounded however large the backlog; worker threads take batches off it and delete them.

Stopping: the ``should_stop`` check (signal, max runtime, an earlier failure) is made before a
stream queues a batch and before a worker takes one, so in-flight deletes finish and nothing new
starts. The first exception from any thread stops the rest and is re-raised by :meth:`run`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked thread looks at the stop flag
_DONE = object()


class Pipeline(Generic[T]):
    def __init__(
        self,
        workers: int,
        process: Callable[[T], None],
        should_stop: Callable[[], bool],
    ) -> None:
        if workers < 1:
            raise ValueError("at least one worker")
        self._workers = workers
        self._process = process
        self._should_stop = should_stop
        self._queue: queue.Queue[object] = queue.Queue(maxsize=2 * workers)
        self._failed = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def run(self, streams: Sequence[Iterable[T]]) -> None:
        """Drain every stream through the workers; raise the first error any thread hit."""
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
        return self._failed.is_set() or self._should_stop()

    def _thread(self, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=self._guard, args=(target, *args), daemon=True)
        thread.start()
        return thread

    def _guard(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except BaseException as exc:  # handed to run(), which re-raises it
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
        self._failed.set()

    def _produce(self, stream: Iterable[T]) -> None:
        for item in stream:
            if self.stopping() or not self._put(item):
                return

    def _consume(self) -> None:
        """Process items until told to finish; after a failure, keep draining without work.

        A worker never exits early, so the queue always empties and no producer or the final
        hand-over of the end markers can block on a full queue.
        """
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self.stopping():
                continue
            try:
                self._process(item)  # type: ignore[arg-type]
            except BaseException as exc:
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
