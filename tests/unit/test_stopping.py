"""When a run must stop (signal before deadline, the deadline on the injected monotonic clock),
interruptible pauses in slices of at most ``WAIT_SLICE_S``, and ``Stopped`` slipping past
``except Exception``."""

from __future__ import annotations

import threading

import pytest

from sweeper.retry import WAIT_SLICE_S, StopEvent, Stopped, Stopper, StopReason
from tests.support.clock import FakeClock


class World(FakeClock):
    """The stop flag, and the monotonic clock moved only by the sleeps, which it records."""

    def __init__(self, stop_after_sleeps: int | None = None) -> None:
        super().__init__(now=1000.0)
        self.event = threading.Event()  # the run's stop flag
        self._stop_after_sleeps = stop_after_sleeps

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        if self._stop_after_sleeps is not None and len(self.sleeps) >= self._stop_after_sleeps:
            self.event.set()

    def stopper(self, deadline: float | None = None) -> Stopper:
        return Stopper(self.event, self, self.sleep, deadline)


def test_no_reason_without_signal_or_deadline() -> None:
    world = World()
    world.now = 10.0**9
    stopper = world.stopper()
    assert stopper.reason() is None
    stopper.check()


def test_signal_is_a_reason() -> None:
    world = World()
    world.event.set()
    assert world.stopper().reason() is StopReason.SIGNAL


def test_signal_beats_a_passed_deadline() -> None:
    world = World()
    world.event.set()
    stopper = world.stopper(deadline=world.now - 1.0)
    assert stopper.reason() is StopReason.SIGNAL


def test_deadline_is_reached_on_the_monotonic_clock() -> None:
    world = World()
    stopper = world.stopper(deadline=1005.0)
    world.now = 1004.999
    assert stopper.reason() is None
    world.now = 1005.0
    assert stopper.reason() is StopReason.MAX_RUNTIME


def test_check_raises_stopped_with_the_reason() -> None:
    world = World()
    stopper = world.stopper(deadline=999.0)
    with pytest.raises(Stopped) as info:
        stopper.check()
    assert info.value.reason is StopReason.MAX_RUNTIME
    assert str(info.value) == "max_runtime"


def test_pause_sleeps_in_slices_of_at_most_wait_slice() -> None:
    world = World()
    world.stopper().pause(0.5)
    assert world.sleeps == pytest.approx([WAIT_SLICE_S, WAIT_SLICE_S, 0.5 - 2 * WAIT_SLICE_S])
    assert all(0 < s <= WAIT_SLICE_S for s in world.sleeps)


def test_pause_sleeps_the_whole_time_when_nothing_stops_it() -> None:
    world = World()
    world.stopper(deadline=2000.0).pause(30.0)
    assert sum(world.sleeps) == pytest.approx(30.0)
    assert max(world.sleeps) <= WAIT_SLICE_S
    assert world.now == pytest.approx(1030.0)


def test_pause_raises_as_soon_as_the_flag_is_set_mid_wait() -> None:
    world = World(stop_after_sleeps=3)
    with pytest.raises(Stopped) as info:
        world.stopper().pause(300.0)
    assert info.value.reason is StopReason.SIGNAL
    assert len(world.sleeps) == 3


def test_pause_raises_as_soon_as_the_deadline_passes_mid_wait() -> None:
    world = World()
    with pytest.raises(Stopped) as info:
        world.stopper(deadline=1000.5).pause(300.0)
    assert info.value.reason is StopReason.MAX_RUNTIME
    assert len(world.sleeps) == 3  # 0.2, 0.4, then 0.6 >= 0.5
    assert world.now - 1000.5 <= WAIT_SLICE_S


def test_pause_checks_before_sleeping() -> None:
    world = World()
    world.event.set()
    with pytest.raises(Stopped):
        world.stopper().pause(5.0)
    assert world.sleeps == []


def test_pause_of_zero_still_checks() -> None:
    world = World()
    world.event.set()
    with pytest.raises(Stopped) as info:
        world.stopper().pause(0)
    assert info.value.reason is StopReason.SIGNAL
    assert world.sleeps == []


def test_pause_of_zero_returns_at_once_when_not_stopping() -> None:
    world = World()
    world.stopper().pause(0)
    assert world.sleeps == []


def test_stopped_is_not_caught_by_except_exception() -> None:
    world = World()
    world.event.set()
    stopper = world.stopper()
    caught: list[Exception] = []

    def guarded() -> None:
        try:
            stopper.check()
        except Exception as exc:  # what code counting failed batches does
            caught.append(exc)

    with pytest.raises(Stopped):
        guarded()
    assert caught == []
    assert not issubclass(Stopped, Exception)


def test_a_signal_while_interrupting_raises_once_where_the_main_thread_waits() -> None:
    event = StopEvent()
    with pytest.raises(Stopped) as stopped, event.interrupting():
        event.signalled()  # as the handler does, wherever the main thread was
    assert stopped.value.reason is StopReason.SIGNAL
    assert event.is_set()
    event.signalled()  # a second signal, as the run unwinds: only the flag, no raise


def test_a_signal_outside_interrupting_only_sets_the_flag() -> None:
    event = StopEvent()
    event.signalled()
    assert event.is_set()
    with pytest.raises(Stopped), event.interrupting():  # already stopped: at once
        pytest.fail("the body ran after the stop")


def test_only_the_main_thread_is_interrupted() -> None:
    event = StopEvent()
    raised: list[BaseException] = []

    def elsewhere() -> None:
        with event.interrupting():
            try:
                event.signalled()
            except Stopped as exc:  # pragma: no cover - the failure this test looks for
                raised.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert raised == []
    assert event.is_set()
