"""Batched deletes on fakes: ``chunks``; the ``BatchSizer`` that follows the database's answer
time (and cuts at once on a timeout); ``BatchDeleter`` commits, retries and failures; and the
``VerifyingDeleter`` that re-reads in a transaction and shrinks transactions to 25 keys when the
database refuses too many entity groups."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sweeper.concurrency import Degradation
from sweeper.deleter import (
    LEGACY_LIMIT,
    BatchDeleter,
    BatchFailed,
    BatchSizer,
    Part,
    Pending,
    VerifyingDeleter,
    chunks,
    count_parts,
)
from sweeper.encodings import Encoding
from sweeper.retry import Retrier, RetryCounter, RetryPolicy
from sweeper.settings import MAX_BATCH_SIZE
from sweeper.stopping import Stopped, StopReason
from tests.support.clock import FakeClock
from tests.unit.fakes import MISSING, FakeClient, api_error, entities

CUTOFF = dt.datetime(2024, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
CUTOFF_S = int(CUTOFF.timestamp())
EXPIRED = CUTOFF_S - 3600
LIVE = CUTOFF_S + 3600


def make_keys(n: int, start: int = 1) -> list[datastore.Key]:
    return [datastore.Key("eq-session", start + i, project="p") for i in range(n)]


def retrier(attempts: int = 3) -> tuple[Retrier, RetryCounter]:
    counter = RetryCounter()
    return Retrier(RetryPolicy(max_attempts=attempts), counter, sleep=lambda _s: None), counter


# --- chunks --------------------------------------------------------------------------------


def test_chunks_of_nothing_is_nothing() -> None:
    assert list(chunks([], 3)) == []


def test_chunks_cut_in_order_with_a_short_last_one() -> None:
    assert [list(c) for c in chunks(range(7), 3)] == [[0, 1, 2], [3, 4, 5], [6]]


@given(items=st.lists(st.integers(), max_size=60), size=st.integers(1, 20))
@settings(max_examples=100)
def test_chunks_reassemble_to_the_input(items: list[int], size: int) -> None:
    parts = [list(c) for c in chunks(items, size)]
    assert [x for part in parts for x in part] == items
    assert all(len(part) == size for part in parts[:-1])
    assert all(1 <= len(part) <= size for part in parts)


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


# --- BatchDeleter --------------------------------------------------------------------------


def batch_deleter(
    client: FakeClient, attempts: int = 3, maximum: int = MAX_BATCH_SIZE
) -> tuple[BatchDeleter, RetryCounter]:
    retry, counter = retrier(attempts)
    sizer = BatchSizer(maximum, client.clock)
    return BatchDeleter(cast(datastore.Client, client), retry, sizer), counter


def test_one_commit_per_batch_normally() -> None:
    client = FakeClient()
    deleter, counter = batch_deleter(client)
    keys = make_keys(500)
    assert deleter.delete(keys) == 500
    assert client.delete_calls == [keys]
    assert counter.retries == 0


def test_more_keys_than_one_commit_takes_are_refused() -> None:
    client = FakeClient()
    deleter, _counter = batch_deleter(client)
    with pytest.raises(ValueError, match="500"):
        deleter.delete(make_keys(501))
    assert client.delete_calls == []


def test_timed_out_commit_is_retried_smaller_and_the_batch_ends_fully_deleted() -> None:
    client = FakeClient()  # a timeout takes the call deadline: 20 s, and deletes nothing
    client.delete_errors = {1: api_error(gexc.DeadlineExceeded, "Deadline Exceeded")}
    deleter, counter = batch_deleter(client)
    keys = make_keys(500)
    assert deleter.delete(keys) == 500
    sizes = [len(c) for c in client.delete_calls]
    assert sizes[0] == 500
    assert sizes[1] == 50  # 2 s at the 0.04 s per key the timeout proved
    assert client.deleted == keys  # each key once, in order
    assert counter.retries == 1


def test_permanent_failure_raises_batch_failed_with_keys_deleted_before_it() -> None:
    error = api_error(gexc.PermissionDenied, "missing datastore.entities.delete")
    client = FakeClient()
    client.delete_errors = {3: error}
    deleter, counter = batch_deleter(client, maximum=100)
    with pytest.raises(BatchFailed) as info:
        deleter.delete(make_keys(300))
    assert info.value.deleted == 200
    assert info.value.cause is error
    assert info.value.__cause__ is error
    assert len(client.delete_calls) == 3  # a permanent error is not retried
    assert counter.retries == 0


def test_transient_failure_that_outlasts_the_policy_raises_batch_failed() -> None:
    error = api_error(gexc.ServiceUnavailable, "down")
    client = FakeClient()
    client.delete_error_always = error
    deleter, counter = batch_deleter(client, attempts=3)
    with pytest.raises(BatchFailed) as info:
        deleter.delete(make_keys(10))
    assert info.value.deleted == 0
    assert info.value.cause is error
    assert len(client.delete_calls) == 3
    assert counter.retries == 2


@given(
    n=st.integers(1, MAX_BATCH_SIZE),
    maximum=st.integers(1, 2 * MAX_BATCH_SIZE),
    timeouts=st.sets(st.integers(1, 12), max_size=6),
    seconds_per_key=st.sampled_from([0.0, 0.001, 0.01, 0.2]),
)
@settings(max_examples=60, deadline=None)
def test_no_commit_ever_exceeds_500_keys_and_every_key_is_deleted_once(
    n: int, maximum: int, timeouts: set[int], seconds_per_key: float
) -> None:
    client = FakeClient(seconds_per_key=seconds_per_key)
    client.delete_errors = {call: api_error(gexc.DeadlineExceeded, "slow") for call in timeouts}
    deleter, _counter = batch_deleter(client, attempts=20, maximum=maximum)
    keys = make_keys(n)
    assert deleter.delete(keys) == n
    assert all(1 <= len(c) <= min(MAX_BATCH_SIZE, maximum) for c in client.delete_calls)
    assert client.deleted == keys


# --- VerifyingDeleter ----------------------------------------------------------------------


def verifying(
    store: FakeClient, maximum: int = MAX_BATCH_SIZE
) -> tuple[VerifyingDeleter, RetryCounter]:
    retry, counter = retrier()
    sizer = BatchSizer(maximum, FakeClock())  # a clock that never moves: the size stays put
    deleter = VerifyingDeleter(
        cast(datastore.Client, store),
        retry,
        Encoding.EPOCH_SECONDS,
        "expires_at",
        CUTOFF,
        sizer=sizer,
    )
    return deleter, counter


def size_events(logs: list[Any]) -> list[Any]:
    return [e for e in logs if e["event"] == "transaction_size_reduced"]


def test_verify_deletes_only_entities_still_expired() -> None:
    keys = make_keys(8)
    values: dict[datastore.Key, object] = {
        keys[0]: EXPIRED,
        keys[1]: LIVE,  # refreshed since the query
        keys[2]: None,
        keys[3]: MISSING,
        keys[4]: EXPIRED * 1000,  # expired, but epoch-millis: another encoding
        keys[5]: True,
        keys[7]: CUTOFF_S - 1,
    }  # keys[6] is already gone
    store = FakeClient(entities(values))
    deleter, _counter = verifying(store)
    assert deleter.delete(keys) == 2
    assert set(store.values) == set(values) - {keys[0], keys[7]}
    (txn,) = store.transactions
    assert txn.read == keys
    assert txn.deletes == [keys[0], keys[7]]


def test_verify_keeps_a_value_exactly_at_the_cutoff() -> None:
    keys = make_keys(1)
    store = FakeClient(entities({keys[0]: CUTOFF_S}))
    deleter, _counter = verifying(store)
    assert deleter.delete(keys) == 0
    assert keys[0] in store.values


def test_verify_retry_rereads_after_an_aborted_commit() -> None:
    keys = make_keys(3)
    store = FakeClient(entities(dict.fromkeys(keys, EXPIRED)))
    store.commit_errors = {1: api_error(gexc.Aborted, "contention")}

    def refresh() -> None:  # the concurrent write that aborted the commit
        store.put(keys[1], LIVE)

    store.on_commit_error = refresh
    deleter, counter = verifying(store)
    assert deleter.delete(keys) == 2
    assert set(store.values) == {keys[1]}
    assert store.transactions[0].rolled_back
    assert counter.retries == 1


def test_verify_shrinks_transactions_to_25_keys_once_on_too_many_entity_groups() -> None:
    first, second = make_keys(60), make_keys(60, start=1000)
    store = FakeClient(entities(dict.fromkeys(first + second, EXPIRED)), group_limit=LEGACY_LIMIT)
    deleter, counter = verifying(store)
    with capture_logs() as logs:
        assert deleter.delete(first) == 60
        assert deleter.delete(second) == 60
    assert store.values == {}
    assert deleter.transaction_size == LEGACY_LIMIT
    assert [len(t.read) for t in store.transactions] == [60, 25, 25, 10, 25, 25, 10]
    assert store.transactions[0].rolled_back
    assert counter.retries == 0  # a refusal is not a transient error
    (event,) = size_events(logs)
    assert event["keys"] == LEGACY_LIMIT
    assert event["log_level"] == "info"


def test_verify_fails_when_even_25_keys_are_too_many_entity_groups() -> None:
    keys = make_keys(60)
    store = FakeClient(entities(dict.fromkeys(keys, EXPIRED)), group_limit=10)
    deleter, _counter = verifying(store)
    with capture_logs() as logs, pytest.raises(BatchFailed) as info:
        deleter.delete(keys)
    assert info.value.deleted == 0
    assert isinstance(info.value.cause, gexc.InvalidArgument)
    assert [len(t.read) for t in store.transactions] == [60, 25]
    assert len(size_events(logs)) == 1


def test_verify_other_invalid_argument_fails_without_shrinking() -> None:
    keys = make_keys(60)
    store = FakeClient(entities(dict.fromkeys(keys, EXPIRED)))
    store.commit_errors = {1: api_error(gexc.InvalidArgument, "key path element must not be empty")}
    deleter, _counter = verifying(store)
    with capture_logs() as logs, pytest.raises(BatchFailed) as info:
        deleter.delete(keys)
    assert info.value.deleted == 0
    assert deleter.transaction_size == MAX_BATCH_SIZE
    assert size_events(logs) == []


def test_verify_failure_reports_entities_deleted_before_it() -> None:
    keys = make_keys(60)
    store = FakeClient(entities(dict.fromkeys(keys, EXPIRED)))
    error = api_error(gexc.PermissionDenied, "missing datastore.entities.delete")
    store.commit_errors = {2: error}
    deleter, _counter = verifying(store, maximum=25)
    with pytest.raises(BatchFailed) as info:
        deleter.delete(keys)
    assert info.value.deleted == 25
    assert info.value.cause is error
    assert len(store.values) == 35


def test_a_stop_mid_batch_says_how_many_keys_went_before_it() -> None:
    """The engine counts them as deleted, and the rest as neither deleted nor failed."""
    stop = Stopped(StopReason.SIGNAL)
    client = FakeClient()
    client.delete_errors = {3: stop}
    deleter, _counter = batch_deleter(client, maximum=100)
    with pytest.raises(BatchFailed) as info:
        deleter.delete(make_keys(300))
    assert (info.value.deleted, info.value.cause) == (200, stop)


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
