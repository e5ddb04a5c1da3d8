"""The AIMD limit on Datastore calls in flight: what cuts it (once per connection drop), how it
grows back, its bounds, what it reports, and how a caller blocked on a full limit is stopped."""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager

import pytest
from google.api_core import exceptions as gexc

from sweeper.concurrency import CONNECTION_LEVEL, CallLimiter, Degradation, Pool, together
from sweeper.retry import Stopped, StopReason
from tests.support.clock import FakeClock
from tests.unit.fakes import api_error

# How long a thread is given to do what it must; the tests never wait this long when they pass.
JOIN_S = 5.0


def start(limiter: CallLimiter) -> AbstractContextManager[None]:
    """Begin a call and leave it in flight."""
    call = limiter.slot()
    call.__enter__()
    return call


def fail(call: AbstractContextManager[None], error: BaseException) -> None:
    """End a call in flight with ``error`` (which the slot lets through)."""
    assert not call.__exit__(type(error), error, None)


def succeed(limiter: CallLimiter, times: int = 1) -> None:
    for _ in range(times):
        with limiter.slot():
            pass


def fail_one(limiter: CallLimiter, error: BaseException) -> None:
    fail(start(limiter), error)


def test_starts_at_its_maximum() -> None:
    limiter = CallLimiter(4, FakeClock())
    assert limiter.limit == 4
    assert limiter.degradation() == Degradation(4, 4, 0, 0.0)


def test_maximum_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CallLimiter(0, FakeClock())


@pytest.mark.parametrize(
    "error",
    [
        api_error(gexc.ServiceUnavailable, "unavailable"),
        api_error(gexc.DeadlineExceeded, "slow"),
        ConnectionError("reset"),
    ],
    ids=["ServiceUnavailable", "DeadlineExceeded", "ConnectionError"],
)
def test_connection_level_failure_halves_the_limit(error: Exception) -> None:
    limiter = CallLimiter(8, FakeClock())
    fail_one(limiter, error)
    assert limiter.limit == 4


@pytest.mark.parametrize(
    "error",
    [
        api_error(gexc.Aborted, "contention"),
        api_error(gexc.PermissionDenied, "no"),
        api_error(gexc.InvalidArgument, "bad"),
        api_error(gexc.ResourceExhausted, "quota"),
        ValueError("bug"),
    ],
    ids=["Aborted", "PermissionDenied", "InvalidArgument", "ResourceExhausted", "ValueError"],
)
def test_other_failures_do_not_cut(error: Exception) -> None:
    limiter = CallLimiter(8, FakeClock())
    fail_one(limiter, error)
    assert limiter.limit == 8
    assert not isinstance(error, CONNECTION_LEVEL)


def test_the_slot_lets_the_error_through() -> None:
    limiter = CallLimiter(2, FakeClock())
    error = ConnectionError("reset")
    with pytest.raises(ConnectionError) as info, limiter.slot():
        raise error
    assert info.value is error


def test_failures_of_calls_started_before_one_cut_count_as_one_cut() -> None:
    limiter = CallLimiter(8, FakeClock())
    in_flight = [start(limiter) for _ in range(6)]
    for call in in_flight:  # one dropped connection fails all six
        fail(call, api_error(gexc.ServiceUnavailable, "connection reset"))
    assert limiter.limit == 4
    assert limiter.degradation().reductions == 1


def test_a_call_started_after_a_cut_cuts_again() -> None:
    limiter = CallLimiter(8, FakeClock())
    before = start(limiter)
    fail_one(limiter, ConnectionError("drop 1"))
    after = start(limiter)
    fail(before, ConnectionError("drop 1, same event"))
    assert limiter.limit == 4
    fail(after, ConnectionError("drop 2"))
    assert limiter.limit == 2
    assert limiter.degradation().reductions == 2


def test_grows_by_one_after_limit_successes_in_a_row() -> None:
    limiter = CallLimiter(8, FakeClock())
    fail_one(limiter, ConnectionError("drop"))
    assert limiter.limit == 4
    succeed(limiter, 3)
    assert limiter.limit == 4
    succeed(limiter)
    assert limiter.limit == 5
    succeed(limiter, 4)
    assert limiter.limit == 5
    succeed(limiter)
    assert limiter.limit == 6


def test_a_cut_restarts_the_run_of_successes() -> None:
    limiter = CallLimiter(8, FakeClock())
    fail_one(limiter, ConnectionError("drop 1"))
    succeed(limiter, 3)  # one short of growing to 5
    fail_one(limiter, ConnectionError("drop 2"))
    assert limiter.limit == 2
    succeed(limiter)
    assert limiter.limit == 2
    succeed(limiter)
    assert limiter.limit == 3


def test_never_grows_past_the_maximum() -> None:
    limiter = CallLimiter(3, FakeClock())
    succeed(limiter, 50)
    assert limiter.limit == 3
    fail_one(limiter, ConnectionError("drop"))
    succeed(limiter, 100)
    assert limiter.limit == 3


def test_never_goes_below_one() -> None:
    limiter = CallLimiter(4, FakeClock())
    for _ in range(5):
        fail_one(limiter, ConnectionError("drop"))
    assert limiter.limit == 1
    degradation = limiter.degradation()
    assert degradation.minimum == 1
    assert degradation.reductions == 2  # 4 -> 2 -> 1; failing at 1 is no further reduction


def test_degradation_reports_minimum_reductions_and_reduced_time() -> None:
    clock = FakeClock(100.0)
    limiter = CallLimiter(4, clock)
    fail_one(limiter, ConnectionError("drop"))  # 4 -> 2 at t = 100
    clock.now = 103.0
    fail_one(limiter, ConnectionError("drop"))  # 2 -> 1 at t = 103
    clock.now = 110.0
    assert limiter.degradation() == Degradation(4, 1, 2, 10.0)  # still reduced: counts so far
    succeed(limiter, 1 + 2)  # 1 -> 2 -> 3
    clock.now = 120.0
    succeed(limiter, 3)  # 3 -> 4 at t = 120: back at the maximum
    assert limiter.limit == 4
    clock.now = 500.0
    assert limiter.degradation() == Degradation(4, 1, 2, 20.0)


def test_blocked_caller_raises_what_check_stop_raises() -> None:
    stopping = threading.Event()
    checks: list[bool] = []

    def check_stop() -> None:
        checks.append(stopping.is_set())
        if stopping.is_set():
            raise Stopped(StopReason.SIGNAL)

    limiter = CallLimiter(1, FakeClock(), check_stop)
    held = start(limiter)
    outcome: list[BaseException] = []
    entered = threading.Event()

    def caller() -> None:
        try:
            with limiter.slot():
                entered.set()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    stopping.set()
    thread.join(JOIN_S)
    assert not thread.is_alive()
    assert not entered.is_set()
    assert len(outcome) == 1
    assert isinstance(outcome[0], Stopped)
    assert outcome[0].reason is StopReason.SIGNAL
    assert checks[-1] is True
    # The stopped caller took no place: once the held call ends, a new one gets in at once.
    held.__exit__(None, None, None)
    succeed(limiter)


def test_blocked_caller_goes_when_a_place_frees() -> None:
    limiter = CallLimiter(1, FakeClock())
    held = start(limiter)
    entered = threading.Event()

    def caller() -> None:
        with limiter.slot():
            entered.set()

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    assert not entered.wait(0.05)  # the only place is taken
    held.__exit__(None, None, None)
    assert entered.wait(JOIN_S)
    thread.join(JOIN_S)
    assert not thread.is_alive()


def test_check_stop_is_not_consulted_while_places_are_free() -> None:
    def check_stop() -> None:
        raise Stopped(StopReason.MAX_RUNTIME)

    limiter = CallLimiter(2, FakeClock(), check_stop)
    succeed(limiter, 5)
    held = start(limiter)
    succeed(limiter)
    held.__exit__(None, None, None)


# --- together --------------------------------------------------------------------------------


def test_together_runs_both_at_once_and_returns_both() -> None:
    second_started = threading.Event()

    def first() -> str:
        # Returns only once the second is under way: run one after the other, this times out.
        assert second_started.wait(5)
        return "a"

    def second() -> int:
        second_started.set()
        return 2

    assert together(first, second) == ("a", 2)


def test_together_raises_the_first_error_once_both_are_done() -> None:
    second_done = threading.Event()

    def first() -> None:
        raise KeyError("first")

    def second() -> None:
        time.sleep(0.05)
        second_done.set()
        raise ValueError("second")

    with pytest.raises(KeyError):
        together(first, second)
    assert second_done.is_set()


def test_together_lets_a_stop_go_at_once_without_waiting_for_the_second() -> None:
    release = threading.Event()

    def first() -> None:
        raise Stopped(StopReason.SIGNAL)  # as a signal raises it in the main thread

    def second() -> None:
        release.wait(10)

    started = time.monotonic()
    with pytest.raises(Stopped):
        together(first, second)
    assert time.monotonic() - started < 5
    release.set()


def test_together_raises_the_second_error_when_the_first_succeeds() -> None:
    def second() -> None:
        raise ValueError("second")

    with pytest.raises(ValueError, match="second"):
        together(lambda: 1, second)


def test_a_pool_answers_in_order_on_the_threads_it_started_once() -> None:
    before = threading.active_count()
    pool = Pool(3, "test-pool")
    assert threading.active_count() == before + 3
    barrier = threading.Barrier(3, timeout=JOIN_S)  # all three run at once, or this times out

    def square(n: int) -> int:
        barrier.wait()
        return n * n

    for _ in range(5):  # pages after the first start no thread
        assert pool.map(square, [3, 1, 2]) == [9, 1, 4]
    assert threading.active_count() == before + 3


def test_a_pool_raises_the_first_error_once_every_item_is_done() -> None:
    pool = Pool(2, "test-pool")
    done: list[int] = []

    def fail_on_two(n: int) -> int:
        if n == 2:
            raise Stopped(StopReason.SIGNAL)
        done.append(n)
        return n

    with pytest.raises(Stopped):
        pool.map(fail_on_two, [1, 2, 3])
    assert sorted(done) == [1, 3]
    assert pool.map(fail_on_two, [4]) == [4]  # the workers live on
