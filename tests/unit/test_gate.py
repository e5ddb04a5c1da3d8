"""The gate on fakes: what goes in each commit, re-checks, retries, refusals and counts.

The fake client runs no range query inside a transaction (as the legacy emulator), so the
gate's lookup re-check and its blind mode are exercised here; the held pages, the concurrent
writer and sessions under sessions run against the real emulators (tests/integration).
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import cast

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sweeper.allowance import Allowance, Capped
from sweeper.deleter import BatchSizer
from sweeper.encodings import Encoding
from sweeper.errors import DatastoreError, RefusedError
from sweeper.gate import LEGACY_LIMIT, SPARE_MAX_AGE_S, Gate, Rule
from sweeper.result import SweepResult
from sweeper.retry import Retrier, RetryCounter, RetryPolicy
from sweeper.settings import MAX_BATCH_SIZE, SweepSettings
from sweeper.stopping import Stopped, StopReason
from sweeper.target import Target
from sweeper.throttle import Throttle, ThrottleSettings
from tests.support.clock import FakeClock
from tests.unit.fakes import (
    KIND,
    MISSING,
    PROP,
    FakeClient,
    FakeTransaction,
    api_error,
    entities,
)

CUTOFF = dt.datetime(2024, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
CUTOFF_S = int(CUTOFF.timestamp())
EXPIRED = CUTOFF_S - 3600
LIVE = CUTOFF_S + 3600


def make_keys(n: int, start: int = 1) -> list[datastore.Key]:
    return [datastore.Key(KIND, start + i, project="p") for i in range(n)]


def expired(keys: list[datastore.Key]) -> FakeClient:
    return FakeClient(entities(dict.fromkeys(keys, EXPIRED)))


def used(store: FakeClient) -> list[FakeTransaction]:
    """The transactions that read or deleted something: not those a worker began for a next
    commit that never came (``Gate._spare``)."""
    return [t for t in store.transactions if t.read or t.deletes]


class Run:
    """One gate over a fake, with the result it counts into."""

    def __init__(
        self,
        client: FakeClient,
        *,
        verify: bool = True,
        maximum: int = MAX_BATCH_SIZE,
        attempts: int = 3,
        allowance: Allowance | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.client = client
        self.counter = RetryCounter()
        retrier = Retrier(RetryPolicy(max_attempts=attempts), self.counter, sleep=lambda _s: None)
        self.result = SweepResult(
            SweepSettings(KIND, PROP, Encoding.EPOCH_SECONDS, dt.timedelta(0)), CUTOFF, "x"
        )
        self.clock = clock or FakeClock()  # a clock that never moves: the size stays
        sizer = BatchSizer(maximum, self.clock)
        self.gate = Gate(
            Target(cast(datastore.Client, client), retrier, KIND, PROP),
            Rule(KIND, PROP, Encoding.EPOCH_SECONDS, CUTOFF),
            verify=verify,
            dry_run=False,
            with_descendants=False,
            sizer=sizer,
            allowance=allowance or Allowance(None),
            throttle=Throttle(ThrottleSettings(), clock=FakeClock(), sleep=lambda _s: None),
            result=self.result,
            lock=threading.Lock(),
            should_stop=lambda: False,
            clock=self.clock,
        )

    @property
    def counts(self) -> tuple[int, int, int, int]:
        r = self.result
        return r.matched, r.deleted, r.skipped, r.failed


# --- the lookup re-check (rule 1) ----------------------------------------------------------


def test_only_entities_still_expired_are_deleted() -> None:
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
    run = Run(store)
    run.gate.delete(keys)
    assert set(store.values) == set(values) - {keys[0], keys[7]}
    (txn,) = used(store)
    assert txn.read == keys
    assert txn.deletes == [keys[0], keys[7]]
    assert run.counts == (8, 2, 6, 0)
    assert run.result.entities_read == 8


def test_a_value_exactly_at_the_cutoff_is_kept() -> None:
    keys = make_keys(1)
    store = FakeClient(entities({keys[0]: CUTOFF_S}))
    Run(store).gate.delete(keys)
    assert keys[0] in store.values


def test_an_aborted_commit_is_read_again() -> None:
    keys = make_keys(3)
    store = expired(keys)
    store.commit_errors = {1: api_error(gexc.Aborted, "contention")}
    store.on_commit_error = lambda: store.put(keys[1], LIVE)  # the write that aborted it
    run = Run(store)
    run.gate.delete(keys)
    assert set(store.values) == {keys[1]}
    assert used(store)[0].rolled_back
    assert run.counter.retries == 1
    assert run.counts == (3, 2, 1, 0)


def test_a_key_given_twice_is_sent_once() -> None:
    keys = make_keys(3)
    store = expired(keys)
    run = Run(store)
    run.gate.delete([*keys, keys[0]])
    (txn,) = used(store)
    assert txn.deletes == keys
    assert run.counts == (3, 3, 0, 0)


def test_transactions_shrink_to_25_entity_groups_once_the_database_refuses_more() -> None:
    first, second = make_keys(60), make_keys(60, start=1000)
    store = FakeClient(entities(dict.fromkeys(first + second, EXPIRED)), group_limit=LEGACY_LIMIT)
    run = Run(store)
    with capture_logs() as logs:
        run.gate.delete(first)
        run.gate.delete(second)
    assert store.values == {}
    assert [len(t.read) for t in used(store)] == [60, 25, 25, 10, 25, 25, 10]
    assert used(store)[0].rolled_back
    assert run.counter.retries == 0  # a refusal is not a transient error
    (event,) = [e for e in logs if e["event"] == "transaction_size_reduced"]
    assert event["keys"] == LEGACY_LIMIT


def test_even_25_entity_groups_refused_fails_the_batch() -> None:
    keys = make_keys(60)
    store = FakeClient(entities(dict.fromkeys(keys, EXPIRED)), group_limit=10)
    run = Run(store)
    with pytest.raises(DatastoreError, match="InvalidArgument"):
        run.gate.delete(keys)
    assert [len(t.read) for t in used(store)] == [60, 25]
    assert run.result.deleted == 0


def test_a_failure_counts_what_went_before_it() -> None:
    keys = make_keys(60)
    store = expired(keys)
    store.commit_errors = {2: api_error(gexc.PermissionDenied, "missing datastore.entities.delete")}
    run = Run(store, maximum=25)
    with pytest.raises(DatastoreError, match="PermissionDenied"):
        run.gate.delete(keys)
    assert run.counts == (60, 25, 0, 25)
    assert len(store.values) == 35


def test_a_stop_mid_batch_keeps_the_count_of_what_went() -> None:
    keys = make_keys(300)
    store = expired(keys)
    store.commit_errors = {3: cast(Exception, Stopped(StopReason.SIGNAL))}
    run = Run(store, maximum=100)
    with pytest.raises(Stopped):
        run.gate.delete(keys)
    assert run.result.deleted == 200


# --- counts that never drift (rule 5) -------------------------------------------------------


def test_a_commit_applied_whose_answer_was_lost_is_counted_as_deleted() -> None:
    keys = make_keys(10)
    store = expired(keys)
    store.lose_replies = {1}
    run = Run(store)
    run.gate.delete(keys)
    assert store.values == {}
    assert run.counter.retries == 1
    assert run.counts == (10, 10, 0, 0)
    # The retry looked them up, found them gone, and sent nothing more.
    assert [len(t.deletes) for t in used(store)] == [10, 0]


# --- too big (rule 4) -----------------------------------------------------------------------


def test_a_commit_refused_as_too_big_is_split_until_it_goes() -> None:
    keys = make_keys(300)
    store = expired(keys)
    store.too_big_over = 70
    run = Run(store)
    with capture_logs() as logs:
        run.gate.delete(keys)
    assert store.values == {}
    assert run.counts == (300, 300, 0, 0)
    sent = [len(t.deletes) for t in used(store)]
    assert sent[:3] == [300, 150, 75]
    assert max(sent[3:]) <= 70
    assert [e["event"] for e in logs].count("commit_split") == 3


def test_a_single_key_refused_as_too_big_is_left_and_named_and_the_rest_go() -> None:
    keys = make_keys(5)
    store = expired(keys)
    store.too_big_over = 0  # every commit refused, even of one key
    run = Run(store, verify=False)
    with capture_logs() as logs:
        run.gate.delete(keys)
    assert set(store.values) == set(keys)
    assert run.counts == (5, 0, 0, 5)
    assert run.gate.ledger.refused == keys
    refused = [e for e in logs if e["event"] == "delete_refused"]
    assert len(refused) == 5
    assert refused[0]["log_level"] == "error"


# --- blind (--no-verify) --------------------------------------------------------------------


def test_blind_deletes_are_one_commit_per_batch_without_reads() -> None:
    keys = make_keys(500)
    store = expired(keys)
    run = Run(store, verify=False)
    with capture_logs() as logs:
        run = Run(store, verify=False)
    run.gate.delete(keys)
    assert store.delete_calls == [keys]
    assert store.transactions == []
    assert run.result.entities_read == 0
    assert [e["log_level"] for e in logs if e["event"] == "verify_off"] == ["warning"]


def test_a_blind_commit_that_timed_out_is_retried_smaller() -> None:
    keys = make_keys(500)
    store = expired(keys)  # a timeout takes the call deadline: 20 s, and deletes nothing
    store.delete_errors = {1: api_error(gexc.DeadlineExceeded, "Deadline Exceeded")}
    run = Run(store, verify=False, clock=store.clock)
    run.gate.delete(keys)
    sizes = [len(c) for c in store.delete_calls]
    assert sizes[:2] == [500, 50]  # 2 s at the 0.04 s per key the timeout proved
    assert store.deleted == keys
    assert run.counts == (500, 500, 0, 0)


@given(
    n=st.integers(1, MAX_BATCH_SIZE),
    maximum=st.integers(1, MAX_BATCH_SIZE),
    timeouts=st.sets(st.integers(1, 12), max_size=6),
    too_big_over=st.sampled_from([None, 1, 7, 130]),
)
@settings(max_examples=60, deadline=None)
def test_no_commit_exceeds_500_keys_and_every_key_goes_once(
    n: int, maximum: int, timeouts: set[int], too_big_over: int | None
) -> None:
    keys = make_keys(n)
    store = expired(keys)
    store.too_big_over = too_big_over
    store.delete_errors = {call: api_error(gexc.DeadlineExceeded, "slow") for call in timeouts}
    run = Run(store, verify=False, attempts=20, maximum=maximum, clock=store.clock)
    run.gate.delete(keys)
    assert all(1 <= len(c) <= maximum for c in store.delete_calls)
    assert store.deleted == keys
    assert run.result.deleted == n


# --- the allowance (rule 3) -----------------------------------------------------------------


def test_max_deletes_stops_at_the_cap_in_entities() -> None:
    keys = make_keys(10)
    store = expired(keys)
    run = Run(store, maximum=4, allowance=Allowance(6))
    run.gate.delete(keys)
    assert len(store.deleted) == 6
    assert run.gate.allowance.capped
    with pytest.raises(Capped):  # the next page finds no room left
        run.gate.delete(make_keys(3, start=100))


def test_passing_the_guards_share_refuses_the_run() -> None:
    keys = make_keys(10)
    store = expired(keys)
    run = Run(store, maximum=4, allowance=Allowance(None, 5, " (test)"))
    with pytest.raises(RefusedError, match="max-fraction"):
        run.gate.delete(keys)
    assert len(store.deleted) == 4


def test_the_allowance_counts_groups_whole_and_gives_back_what_did_not_go() -> None:
    allowance = Allowance(10)
    assert allowance.reserve([3, 3, 3, 3]) == 3
    assert allowance.capped
    allowance.release(3)
    assert allowance.left() == 4


# --- transactions begun in advance -----------------------------------------------------------


def test_each_commit_uses_the_transaction_begun_during_the_last_lookup() -> None:
    keys = make_keys(30)
    store = expired(keys)
    run = Run(store, maximum=10)
    run.gate.delete(keys)
    assert store.values == {}
    # Three commits, four begins: the first commit's own, then one during each lookup (the
    # last is never used). Each commit's chain is lookup, commit after the first.
    assert len(store.transactions) == 4
    assert [len(t.deletes) for t in used(store)] == [10, 10, 10]
    assert used(store) == store.transactions[:3]


def test_a_transaction_begun_long_before_its_commit_is_left_unused() -> None:
    keys = make_keys(20)
    store = expired(keys)
    run = Run(store, maximum=10)
    run.gate.delete(keys[:10])
    run.clock.advance(SPARE_MAX_AGE_S + 1)  # a long throttle wait, say
    run.gate.delete(keys[10:])
    assert store.values == {}
    begun, spare, own, _next = store.transactions
    assert [len(t.deletes) for t in (begun, own)] == [10, 10]
    assert not spare.read  # too old: its commit began its own
    assert not spare.deletes
