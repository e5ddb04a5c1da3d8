"""Commit sizes on fakes: the ``BatchSizer`` that follows the database's answer time (and cuts at
once on a timeout or a commit refused as too big), and ``Pending``, a batch's groups cut into
commits. What goes in each commit is the gate's (tests/unit/test_gate.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore
from hypothesis import given
from hypothesis import strategies as st

from sweeper.concurrency import Degradation
from sweeper.deleter import BatchSizer, Part, Pending
from sweeper.retry import Retrier, RetryCounter, RetryPolicy
from sweeper.settings import MAX_BATCH_SIZE
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

    with pytest.raises(gexc.DeadlineExceeded) as info:
        sizer.measure(500, commit)
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

    assert sizer.measure(256, commit) == "done"
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


def _key(*path: str) -> datastore.Key:
    return datastore.Key(*path, project="p")


def _groups(
    sizes: list[int],
) -> tuple[list[datastore.Key], dict[datastore.Key, list[datastore.Key]]]:
    sessions = [_key("s", f"s{i}") for i in range(len(sizes))]
    under = {
        s: [_key("s", f"s{i}", "c", f"c{j}") for j in range(n)]
        for i, (s, n) in enumerate(zip(sessions, sizes, strict=True))
    }
    return sessions, under


def count_parts(parts: list[Part]) -> tuple[int, int]:
    """(sessions, descendants) among the keys of ``parts``."""
    sessions = sum(1 for session, keys in parts if keys[-1] is session)
    return sessions, sum(len(keys) for _s, keys in parts) - sessions


def _drain(pending: Pending, size: int, max_groups: int = MAX_BATCH_SIZE) -> list[list[Part]]:
    commits = []
    while pending:
        parts = pending.take(size, max_groups)
        pending.done(parts)
        commits.append(parts)
    return commits


def test_whole_groups_share_a_commit_while_they_fit() -> None:
    sessions, under = _groups([2, 3, 0, 495])
    commits = _drain(Pending(sessions, under), 500)
    # 3 + 4 + 1 keys in the first commit; the 496-key group does not fit beside them.
    assert [[len(keys) for _s, keys in parts] for parts in commits] == [[3, 4, 1], [496]]
    for parts in commits:
        for session, keys in parts:
            assert keys[-1] is session  # whole groups: the session last


def test_a_group_larger_than_a_commit_goes_descendants_first_session_last() -> None:
    sessions, under = _groups([1200])
    commits = _drain(Pending(sessions, under), 500)
    assert [sum(len(k) for _s, k in parts) for parts in commits] == [500, 500, 201]
    (session,) = sessions
    assert all(session not in keys for parts in commits[:-1] for _s, keys in parts)
    assert commits[-1][0][1][-1] is session
    assert [count_parts(parts) for parts in commits] == [(0, 500), (0, 500), (1, 200)]


def test_a_kept_session_drops_the_rest_of_its_group() -> None:
    sessions, under = _groups([700, 2])
    pending = Pending(sessions, under)
    first = pending.take(500)
    assert [len(keys) for _s, keys in first] == [500]
    pending.done(first, kept=frozenset({sessions[0]}))  # refreshed: nothing more of it goes
    rest = pending.take(500)
    assert [s for s, _keys in rest] == [sessions[1]]


def test_transactions_hold_at_most_max_groups_sessions() -> None:
    sessions, under = _groups([0] * 60)
    commits = _drain(Pending(sessions, under), 500, max_groups=25)
    assert [len(parts) for parts in commits] == [25, 25, 10]


@given(sizes=st.lists(st.integers(0, 1200), min_size=1, max_size=12), size=st.integers(5, 500))
def test_every_key_goes_once_and_each_session_after_its_descendants(
    sizes: list[int], size: int
) -> None:
    sessions, under = _groups(sizes)
    commits = _drain(Pending(sessions, under), size)
    sent = [key for parts in commits for _s, keys in parts for key in keys]
    assert all(sum(len(k) for _s, k in parts) <= size for parts in commits)
    assert len(sent) == len(set(sent)) == len(sessions) + sum(sizes)
    position = {key: i for i, key in enumerate(sent)}
    for session in sessions:
        assert all(position[child] < position[session] for child in under[session])


def test_a_refused_commit_caps_the_size_until_fast_commits_grow_it_back() -> None:
    clock = FakeClock()
    sizer = BatchSizer(500, clock)
    sizer.refused(125)
    assert sizer.size == 125
    for _ in range(10):
        sizer.observe(0.05, sizer.size)
    assert sizer.size == 500
