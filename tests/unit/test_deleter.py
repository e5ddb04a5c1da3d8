"""Commit sizes on fakes: the ``BatchSizer`` that follows the database's answer time (and cuts at
once on a timeout or a commit refused as too big). What goes in each commit is the gate's
(tests/unit/test_gate.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.concurrency import Degradation
from sweeper.deleter import BatchSizer
from sweeper.retry import Retrier, RetryCounter, RetryPolicy
from tests.support.clock import FakeClock
from tests.unit.fakes import api_error

CUTOFF = dt.datetime(2024, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
CUTOFF_S = int(CUTOFF.timestamp())
EXPIRED = CUTOFF_S - 3600
LIVE = CUTOFF_S + 3600


def make_keys(n: int, start: int = 1) -> list[datastore.Key]:
    return [datastore.Key("eq-session", start + i, project="p") for i in range(n)]


def retrier(attempts: int = 3) -> tuple[Retrier, RetryCounter]:
    counter = RetryCounter()
    return Retrier(RetryPolicy(max_attempts=attempts), counter, sleep=lambda _s: None), counter


# --- BatchSizer ----------------------------------------------------------------------------


def test_sizer_starts_at_its_maximum() -> None:
    sizer = BatchSizer(500, FakeClock())
    assert sizer.size == 500
    assert sizer.degradation() == Degradation(500, 500, 0, 0.0)


def test_sizer_shrinks_to_what_fits_the_target_time() -> None:
    sizer = BatchSizer(500, FakeClock(), target_s=2.0)
    sizer.observe(4.0, 256)  # 1/64 s per key: 128 keys take 2 s
    assert sizer.size == 128


def test_sizer_follows_the_observed_time_per_key_toward_the_target() -> None:
    sizer = BatchSizer(500, FakeClock(), target_s=2.0)
    sizer.observe(4.0, 256)  # 1/64 s per key
    sizer.observe(1.0, 128)  # now 1/128 s per key: the estimate moves halfway
    assert sizer.size == 170  # 2 s / (3/256 s per key)
    for _ in range(60):
        sizer.observe(sizer.size / 128, sizer.size)
    assert sizer.size == 256  # 256 keys at 1/128 s each take the target's 2 s


def test_sizer_grows_back_to_its_maximum_when_commits_are_fast() -> None:
    sizer = BatchSizer(500, FakeClock())
    sizer.observe(40.0, 500)
    assert sizer.size < 500
    for _ in range(20):
        sizer.observe(0.01, sizer.size)
    assert sizer.size == 500


def test_sizer_never_exceeds_its_maximum() -> None:
    sizer = BatchSizer(300, FakeClock())
    sizer.observe(0.0, 300)
    assert sizer.size == 300
    sizer.observe(0.000001, 300)
    assert sizer.size == 300


def test_sizer_never_goes_below_its_minimum() -> None:
    sizer = BatchSizer(500, FakeClock(), minimum=5)
    sizer.observe(1000.0, 5)
    assert sizer.size == 5
    sizer.timed_out(10_000.0, 5)
    assert sizer.size == 5


def test_sizer_minimum_is_capped_by_its_maximum() -> None:
    sizer = BatchSizer(3, FakeClock(), minimum=5)
    sizer.observe(1000.0, 3)
    assert sizer.size == 3


def test_timed_out_commit_cuts_the_size_at_once_to_what_the_timeout_proves() -> None:
    sizer = BatchSizer(500, FakeClock(), target_s=2.0)
    sizer.timed_out(20.0, 500)  # at least 0.04 s per key: 50 keys take 2 s
    assert sizer.size == 50


def test_timed_out_commit_never_lowers_the_time_per_key() -> None:
    sizer = BatchSizer(500, FakeClock(), target_s=2.0)
    sizer.observe(4.0, 256)  # 1/64 s per key: 128
    sizer.timed_out(1.0, 128)  # proves only 1/128 s per key: no news
    assert sizer.size == 128


def test_measure_learns_from_a_timeout_and_lets_it_through() -> None:
    clock = FakeClock()
    sizer = BatchSizer(500, clock, target_s=2.0)
    error = api_error(gexc.DeadlineExceeded, "slow")

    def commit() -> None:
        clock.now += 20.0
        raise error

    with pytest.raises(gexc.DeadlineExceeded) as info, sizer.timing(500):
        commit()
    assert info.value is error
    assert sizer.size == 50


def test_a_commit_within_the_target_never_shrinks_the_size() -> None:
    sizer = BatchSizer(500, FakeClock(), target_s=2.0)
    sizer.observe(1.5, 90)  # a first call that also set up the connection: 60 keys "fit"
    assert sizer.size == 500
    sizer.observe(2.5, 500)  # over the target: now it shrinks
    assert sizer.size < 500


def test_measure_returns_the_commit_value_and_times_it() -> None:
    clock = FakeClock()
    sizer = BatchSizer(500, clock, target_s=2.0)

    def commit() -> str:
        clock.now += 4.0
        return "done"

    with sizer.timing(256):
        assert commit() == "done"
    assert sizer.size == 128


def test_sizer_degradation_reports_smallest_reductions_and_reduced_time() -> None:
    clock = FakeClock(10.0)
    sizer = BatchSizer(500, clock, target_s=2.0)
    sizer.observe(3.0, 384)  # 1/128 s per key, over the 2 s target: 256 keys, from t = 10
    clock.now = 30.0
    assert sizer.degradation() == Degradation(500, 256, 1, 20.0)
    clock.now = 40.0
    sizer.observe(0.0, 256)  # the estimate halves: 512 keys fit, back at the maximum
    assert sizer.size == 500
    clock.now = 100.0
    assert sizer.degradation() == Degradation(500, 256, 1, 30.0)


# --- groups: a session and its descendants (--with-descendants) ----------------------------


def test_a_refused_commit_caps_the_size_until_fast_commits_grow_it_back() -> None:
    clock = FakeClock()
    sizer = BatchSizer(500, clock)
    sizer.refused(125)
    assert sizer.size == 125
    for _ in range(10):
        sizer.observe(0.05, sizer.size)
    assert sizer.size == 500
