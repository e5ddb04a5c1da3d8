"""The pipeline: every item processed once, bounded, and a failure never hangs the run."""

from __future__ import annotations

import threading
import time

import pytest

from sweeper.concurrency import Pipeline


def test_every_item_of_every_stream_is_processed_once() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def process(item: int) -> None:
        with lock:
            seen.append(item)

    streams = [range(0, 100), range(100, 250), range(250, 251)]
    Pipeline(4, process, lambda: False).run(streams)
    assert sorted(seen) == list(range(251))


def test_a_failing_worker_stops_the_run_without_hanging() -> None:
    # Every worker fails on its first item while producers still have thousands queued:
    # the run must end (not block on a full queue) and re-raise the first error.
    def process(item: int) -> None:
        raise RuntimeError(f"boom {item}")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"):
        Pipeline(2, process, lambda: False).run([range(10_000), range(10_000)])
    assert time.monotonic() - started < 5


def test_a_failing_stream_stops_the_run() -> None:
    def stream() -> object:
        yield 1
        raise ConnectionError("query failed")

    processed: list[int] = []
    with pytest.raises(ConnectionError):
        Pipeline(2, processed.append, lambda: False).run([stream()])  # type: ignore[list-item]


def test_stop_is_checked_before_each_item() -> None:
    processed: list[int] = []
    stop = threading.Event()

    def process(item: int) -> None:
        processed.append(item)
        stop.set()

    Pipeline(1, process, stop.is_set).run([range(1000)])
    assert processed == [0]


def test_at_least_one_worker() -> None:
    with pytest.raises(ValueError, match="worker"):
        Pipeline(0, print, lambda: False)
