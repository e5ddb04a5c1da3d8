"""The throttle: 500/50/5 ramp-up, hard cap, adaptive push-back, thread safety — on a fake clock."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sweeper.throttle import Throttle, ThrottleSettings
from tests.support.clock import FakeClock


class ScriptedRandom(random.Random):
    """Hands out the draws a test scripts, then 1.0 (never held back), and counts every draw.

    The throttle draws only while its rejection probability is above 0, and holds a request
    back when the draw falls below that probability: what the draws do shows the probability.
    """

    def __init__(self) -> None:
        super().__init__(0)
        self.script: list[float] = []
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return self.script.pop(0) if self.script else 1.0


def make(
    settings: ThrottleSettings | None = None, seed: int = 0, rng: random.Random | None = None
) -> tuple[Throttle, FakeClock]:
    clock = FakeClock()
    throttle = Throttle(
        settings or ThrottleSettings(),
        clock=clock,
        sleep=clock.sleep,
        rng=rng or random.Random(seed),
    )
    return throttle, clock


def allowed_rate(throttle: Throttle, batch: int = 10) -> float:
    """The operations per second the throttle lets through now, measured with acquire alone.

    Spends what the bucket holds (calls that go at once) until a call waits: the bucket is then
    exactly empty, so the next call waits ``batch / rate``. Moves the fake clock on by about two
    batches' time. ``inf`` when nothing ever waits.
    """
    for _ in range(10_000):
        if throttle.acquire(batch) > 0.0:
            return batch / throttle.acquire(batch)
    return math.inf


def draws_for_one_request(throttle: Throttle, rng: ScriptedRandom, draw: float) -> int:
    """Send one request with ``draw`` scripted: 0 draws while nothing is held back (probability
    0), 1 when ``draw`` is at or above the probability (sent), 2 when below it (held back once,
    then sent on the next draw, 1.0)."""
    rng.script = [draw]
    before = rng.draws
    throttle.acquire(1)
    return rng.draws - before


def assert_rejection_probability(throttle: Throttle, rng: ScriptedRandom, expected: float) -> None:
    assert draws_for_one_request(throttle, rng, expected + 1e-9) == 1  # sent just above it
    assert draws_for_one_request(throttle, rng, expected - 1e-9) == 2  # held back just below


def budget_integral(seconds: float, divisor: int = 1, max_rate: float | None = None) -> float:
    """The 500/50/5 budget integrated over the first ``seconds``, computed independently."""
    total, step = 0.0, 0
    while step * 300.0 < seconds:
        rate = 500.0 / divisor * 1.5**step
        if max_rate is not None:
            rate = min(rate, max_rate)
        total += rate * (min(seconds, (step + 1) * 300.0) - step * 300.0)
        step += 1
    return total


# --- ramp-up -------------------------------------------------------------------------------


def test_rate_follows_500_50_5_from_the_first_acquire() -> None:
    throttle, clock = make()
    clock.advance(3600.0)  # idle time before the first write does not count
    start = clock.now
    assert allowed_rate(throttle) == pytest.approx(500.0)  # from the first write on
    for elapsed, expected in [(299.9, 500.0), (300.0, 750.0), (600.0, 1125.0)]:
        clock.now = start + elapsed
        assert allowed_rate(throttle) == pytest.approx(expected)


@pytest.mark.parametrize(("divisor", "expected"), [(1, 500.0), (2, 250.0), (4, 125.0)])
def test_divisor_splits_the_budget_between_shards(divisor: int, expected: float) -> None:
    throttle, clock = make(ThrottleSettings(divisor=divisor))
    throttle.acquire(1)
    assert allowed_rate(throttle) == pytest.approx(expected)
    clock.advance(300.0)
    assert allowed_rate(throttle) == pytest.approx(expected * 1.5)


def test_5000_operations_in_batches_of_500_take_ten_seconds_at_500_per_second() -> None:
    throttle, clock = make()
    start = clock.now
    waits = [throttle.acquire(500) for _ in range(10)]
    # Paid before: the run starts with an empty bucket, so even the first batch waits for its
    # second of budget. Never faster than the rate, from the first delete on.
    assert waits == pytest.approx([1.0] * 10)
    assert clock.now - start == pytest.approx(10.0)
    assert throttle.acquire(1) == pytest.approx(1 / 500)  # nothing left over


def test_batch_larger_than_a_shards_rate_waits_for_all_of_it() -> None:
    throttle, _ = make(ThrottleSettings(divisor=4))  # 125/s
    assert throttle.acquire(500) == pytest.approx(4.0)
    assert throttle.acquire(500) == pytest.approx(4.0)


def test_a_batch_across_a_ramp_step_is_paid_partly_at_the_faster_rate() -> None:
    throttle, clock = make()
    start = clock.now
    throttle.acquire(1)
    clock.now = start + 299.5
    throttle.acquire(500)  # spends the second's budget saved up while idle
    # 250 operations accrue by t = 300 s at 500/s, the other 250 at 750/s.
    assert throttle.acquire(500) == pytest.approx(0.5 + 250 / 750)


def test_idle_time_builds_a_burst_of_at_most_one_second() -> None:
    throttle, clock = make()
    throttle.acquire(1)
    clock.advance(60.0)
    assert throttle.acquire(500) == 0.0  # one second's budget, saved up
    assert throttle.acquire(500) == pytest.approx(1.0)  # then back to the rate


# --- hard cap ------------------------------------------------------------------------------


def test_max_rate_caps_below_the_ramp_up() -> None:
    throttle, clock = make(ThrottleSettings(max_rate=200.0))
    waits = [throttle.acquire(100) for _ in range(5)]  # 200/s from the first write
    assert waits == pytest.approx([0.5] * 5)
    clock.advance(600.0)
    assert allowed_rate(throttle) == pytest.approx(200.0)  # the ramp (1125/s) does not lift it


def test_max_rate_above_the_ramp_does_not_raise_it() -> None:
    throttle, clock = make(ThrottleSettings(max_rate=800.0))
    throttle.acquire(1)
    assert allowed_rate(throttle) == pytest.approx(500.0)
    clock.advance(300.0)
    assert allowed_rate(throttle) == pytest.approx(750.0)
    clock.advance(300.0)
    assert allowed_rate(throttle) == pytest.approx(800.0)


def test_max_rate_without_ramp_up_is_a_plain_rate_limit() -> None:
    throttle, clock = make(ThrottleSettings(ramp_up=False, max_rate=50.0))
    throttle.acquire(1)
    clock.advance(3600.0)
    assert throttle.acquire(500) == pytest.approx(9.0)  # 50 saved up while idle, 450 at 50/s
    assert throttle.acquire(1) == pytest.approx(1 / 50)
    assert allowed_rate(throttle) == pytest.approx(50.0)


# --- disabled ------------------------------------------------------------------------------


def test_disabled_never_waits_or_sleeps() -> None:
    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"slept {seconds}")

    throttle = Throttle(ThrottleSettings(ramp_up=False), clock=lambda: 0.0, sleep=no_sleep)
    assert all(throttle.acquire(500) == 0.0 for _ in range(1000))
    assert allowed_rate(throttle) == math.inf


def test_disabled_costs_nothing_measurable() -> None:
    throttle = Throttle(ThrottleSettings(ramp_up=False))
    started = time.perf_counter()
    for _ in range(10_000):
        throttle.acquire(500)
    # A few microseconds each; a delete RPC takes tens of milliseconds.
    assert time.perf_counter() - started < 1.0


# --- adaptive ------------------------------------------------------------------------------


def record(throttle: Throttle, accepted: int, rejected: int) -> None:
    for _ in range(accepted):
        throttle.record(accepted=True)
    for _ in range(rejected):
        throttle.record(accepted=False)


def test_rejection_probability_follows_the_sre_formula() -> None:
    rng = ScriptedRandom()
    throttle, _ = make(rng=rng)
    assert draws_for_one_request(throttle, rng, 0.0) == 0  # nothing refused: never held back
    record(throttle, accepted=20, rejected=80)
    assert_rejection_probability(throttle, rng, (100 - 1.25 * 20) / 101)


def test_up_to_one_rejection_in_five_is_tolerated() -> None:
    rng = ScriptedRandom()
    throttle, _ = make(rng=rng)
    record(throttle, accepted=80, rejected=20)
    assert throttle.acquire(1) == pytest.approx(1 / 500)  # the rate's wait, no backoff
    assert rng.draws == 0  # a probability of 0: nothing drawn, nothing held back


def test_throttles_more_as_rejections_grow() -> None:
    throttled = []
    for rejected in (10, 50, 90):
        throttle, clock = make(ThrottleSettings(ramp_up=False, window_s=3600.0), seed=7)
        record(throttle, accepted=100 - rejected, rejected=rejected)
        for _ in range(50):
            throttle.acquire(1)
        throttled.append(len(clock.sleeps))  # no rate limit: each sleep is one hold-back
    assert throttled[0] == 0
    assert throttled[0] < throttled[1] < throttled[2]


def test_held_back_request_sleeps_the_backoff_then_goes() -> None:
    throttle, clock = make(ThrottleSettings(ramp_up=False, backoff_s=2.0))
    record(throttle, accepted=0, rejected=100)
    waited = throttle.acquire(1)
    assert waited > 0
    assert waited % 2.0 == 0.0
    # The refusals leave the 60 s window, so the request cannot be held back for ever.
    assert waited <= 60.0 + 2.0
    assert len(clock.sleeps) == waited / 2.0
    assert all(s == 2.0 for s in clock.sleeps)


def test_recovers_as_accepts_return() -> None:
    rng = ScriptedRandom()
    throttle, _ = make(rng=rng)
    record(throttle, accepted=0, rejected=50)
    assert_rejection_probability(throttle, rng, 50 / 51)
    record(throttle, accepted=20, rejected=0)
    assert_rejection_probability(throttle, rng, (70 - 1.25 * 20) / 71)  # lower, still above 0
    record(throttle, accepted=200, rejected=0)
    assert draws_for_one_request(throttle, rng, 0.0) == 0  # 0: nothing held back


def test_recovers_when_the_refusals_age_out_of_the_window() -> None:
    rng = ScriptedRandom()
    throttle, clock = make(ThrottleSettings(window_s=60.0), rng=rng)
    start = clock.now
    record(throttle, accepted=0, rejected=50)
    clock.advance(30.0)
    assert draws_for_one_request(throttle, rng, 0.9) == 2  # above 0.9: held back
    clock.now = start + 61.0
    assert draws_for_one_request(throttle, rng, 0.0) == 0  # 0: nothing held back


def test_adaptive_off_ignores_refusals() -> None:
    rng = ScriptedRandom()
    throttle, _ = make(ThrottleSettings(ramp_up=False, adaptive=False), rng=rng)
    record(throttle, accepted=0, rejected=100)
    assert throttle.acquire(500) == 0.0
    assert rng.draws == 0  # a probability of 0: nothing drawn, nothing held back


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("operations", [0, -1, -500])
def test_non_positive_operations_are_refused(operations: int) -> None:
    throttle, _ = make()
    with pytest.raises(ValueError, match="operations"):
        throttle.acquire(operations)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ThrottleSettings(divisor=0), "divisor"),
        (lambda: ThrottleSettings(max_rate=0.0), "max_rate"),
        (lambda: ThrottleSettings(max_rate=-1.0), "max_rate"),
        (lambda: ThrottleSettings(max_rate=math.inf), "max_rate"),
        (lambda: ThrottleSettings(max_rate=math.nan), "max_rate"),
        (lambda: ThrottleSettings(overload_ratio=0.9), "overload_ratio"),
        (lambda: ThrottleSettings(overload_ratio=math.nan), "overload_ratio"),
        (lambda: ThrottleSettings(window_s=0.0), "window_s"),
        (lambda: ThrottleSettings(backoff_s=0.0), "backoff_s"),
    ],
)
def test_settings_are_validated(build: Callable[[], ThrottleSettings], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build()


def test_very_long_run_stays_finite() -> None:
    throttle, clock = make()
    throttle.acquire(1)
    clock.advance(30 * 24 * 3600.0)
    assert throttle.acquire(500) == 0.0
    # The ramp stopped growing after 60 steps: a finite rate, however long the run.
    assert allowed_rate(throttle, batch=10**14) == pytest.approx(500.0 * 1.5**60)


# --- threads -------------------------------------------------------------------------------


def test_concurrent_workers_share_one_budget() -> None:
    throttle, clock = make(ThrottleSettings(divisor=2))
    start = clock.now
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for call in range(50):
                throttle.acquire(100)
                throttle.record(accepted=(index + call) % 3 != 0)  # enough to hold some back
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert not any(thread.is_alive() for thread in threads)
    granted = 8 * 50 * 100  # every call returned: all were let through
    assert granted <= budget_integral(clock.now - start, divisor=2) + 100 + 1e-6


# --- properties ----------------------------------------------------------------------------

calls = st.lists(
    st.tuples(st.integers(1, 500), st.floats(0.0, 400.0)),  # (operations, idle seconds before)
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    calls=calls,
    divisor=st.integers(1, 8),
    max_rate=st.none() | st.floats(1.0, 5000.0),
)
def test_grants_never_exceed_the_budget(
    calls: list[tuple[int, float]], divisor: int, max_rate: float | None
) -> None:
    """Never faster than the rate: by any time, what was let through is within the budget's
    integral since the first call (``--max-rate`` held over the run, not merely on average)."""
    throttle, clock = make(ThrottleSettings(divisor=divisor, max_rate=max_rate))
    start: float | None = None
    granted = 0
    for operations, idle in calls:
        clock.advance(idle)
        start = clock.now if start is None else start
        throttle.acquire(operations)
        granted += operations
        allowed = budget_integral(clock.now - start, divisor, max_rate)
        assert granted <= allowed + 1e-6 * max(1.0, allowed)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 500), min_size=2, max_size=60),
    divisor=st.integers(1, 8),
    max_rate=st.none() | st.floats(1.0, 5000.0),
)
def test_back_to_back_calls_use_the_whole_budget(
    sizes: list[int], divisor: int, max_rate: float | None
) -> None:
    """The throttle never waits longer than the budget needs: no idle budget is wasted."""
    throttle, clock = make(ThrottleSettings(divisor=divisor, max_rate=max_rate))
    start = clock.now
    granted = 0
    for operations in sizes:
        throttle.acquire(operations)
        granted += operations
        # Everything granted, this call too, was paid for exactly by now.
        assert budget_integral(clock.now - start, divisor, max_rate) == pytest.approx(
            granted, rel=1e-9, abs=1e-6
        )
