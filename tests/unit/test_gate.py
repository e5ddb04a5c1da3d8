"""The gate on fakes: what goes in each commit, versions, re-reads, refusals and counts.

The fake client keeps a version per entity and refuses a commit whose base versions no longer
match, as Datastore does; the concurrent writer, lost replies through a gRPC injector and
sessions under sessions run against the real emulators (tests/integration).
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from typing import cast

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sweeper.deleter import LEGACY_LIMIT, BatchSizer
from sweeper.encodings import Encoding, Rule
from sweeper.gate import Gate, Group, _take, decide
from sweeper.logs import DatastoreError, RefusedError
from sweeper.result import SweepResult
from sweeper.retry import Retrier, RetryCounter, RetryPolicy, Stopped, StopReason
from sweeper.rpc import Seen
from sweeper.settings import MAX_BATCH_SIZE, SweepSettings
from sweeper.target import Target
from sweeper.throttle import Allowance, Capped, Throttle, ThrottleSettings
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
    """The transactions that read or deleted something."""
    return [t for t in store.transactions if t.read or t.deletes]


def read(store: FakeClient, keys: list[datastore.Key]) -> list[Seen]:
    """What a page query reads of ``keys`` now: each one's version and value."""
    values = store.values
    return [
        Seen(k, store.version_of(k), None if values.get(k, MISSING) is MISSING else values[k])
        for k in keys
    ]


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
        with_descendants: bool = False,
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
            with_descendants=with_descendants,
            sizer=sizer,
            allowance=allowance or Allowance(None),
            throttle=Throttle(ThrottleSettings(), clock=FakeClock(), sleep=lambda _s: None),
            result=self.result,
            should_stop=lambda: False,
        )

    @property
    def counts(self) -> tuple[int, int, int, int]:
        r = self.result
        return r.matched, r.deleted, r.skipped, r.failed


# --- due at the version deleted (rule 1) ------------------------------------------------------


def test_only_entities_the_page_saw_due_are_deleted_without_a_lookup() -> None:
    keys = make_keys(7)
    values: dict[datastore.Key, object] = {
        keys[0]: EXPIRED,
        keys[1]: LIVE,
        keys[2]: None,
        keys[3]: MISSING,
        keys[4]: EXPIRED * 1000,  # expired, but epoch-millis: another encoding
        keys[5]: True,
        keys[6]: CUTOFF_S - 1,
    }
    store = FakeClient(entities(values))
    run = Run(store)
    run.gate.delete(read(store, keys))
    assert set(store.values) == set(values) - {keys[0], keys[6]}
    (txn,) = used(store)
    assert txn.read == []
    assert txn.deletes == [keys[0], keys[6]]
    assert txn.base_versions == dict.fromkeys((keys[0], keys[6]), 1)
    assert run.counts == (2, 2, 5, 0)
    assert run.result.entities_read == 0


def test_a_value_exactly_at_the_cutoff_is_kept() -> None:
    keys = make_keys(1)
    store = FakeClient(entities({keys[0]: CUTOFF_S}))
    Run(store).gate.delete(read(store, keys))
    assert keys[0] in store.values


def test_a_session_saved_again_after_the_page_was_read_is_kept_and_the_rest_go() -> None:
    keys = make_keys(3)
    store = expired(keys)
    page = read(store, keys)
    store.put(keys[1], LIVE)  # the user came back between the query and the commit
    run = Run(store)
    run.gate.delete(page)
    assert set(store.values) == {keys[1]}
    first, second = used(store)
    assert first.deletes == keys
    assert second.deletes == [keys[0], keys[2]]
    assert run.counts == (3, 2, 1, 0)
    assert run.result.entities_read == 3  # the refused commit's keys, looked up again


def test_a_key_saved_again_with_the_same_expired_value_goes_at_its_new_version() -> None:
    keys = make_keys(2)
    store = expired(keys)
    page = read(store, keys)
    store.put(keys[0], EXPIRED)  # a writer touched it, still expired
    run = Run(store)
    run.gate.delete(page)
    assert store.values == {}
    assert run.counts == (2, 2, 0, 0)


def test_a_key_given_twice_is_sent_once() -> None:
    keys = make_keys(3)
    store = expired(keys)
    run = Run(store)
    page = read(store, keys)
    run.gate.delete([*page, page[0]])
    (txn,) = used(store)
    assert txn.deletes == keys
    assert run.counts == (3, 3, 0, 0)


def test_commits_shrink_to_25_entity_groups_once_the_database_refuses_more() -> None:
    first, second = make_keys(60), make_keys(60, start=1000)
    store = FakeClient(entities(dict.fromkeys(first + second, EXPIRED)), group_limit=LEGACY_LIMIT)
    run = Run(store)
    with capture_logs() as logs:
        run.gate.delete(read(store, first))
        run.gate.delete(read(store, second))
    assert store.values == {}
    assert [len(t.deletes) for t in store.transactions] == [60, 25, 25, 10, 25, 25, 10]
    assert run.counter.retries == 0  # a refusal is not a transient error
    (event,) = [e for e in logs if e["event"] == "transaction_size_reduced"]
    assert event["keys"] == LEGACY_LIMIT


def test_even_25_entity_groups_refused_fails_the_batch() -> None:
    keys = make_keys(60)
    store = FakeClient(entities(dict.fromkeys(keys, EXPIRED)), group_limit=10)
    run = Run(store)
    with pytest.raises(DatastoreError, match="InvalidArgument"):
        run.gate.delete(read(store, keys))
    assert [len(t.deletes) for t in store.transactions] == [60, 25]
    assert run.result.deleted == 0


def test_a_failure_counts_what_went_before_it() -> None:
    keys = make_keys(60)
    store = expired(keys)
    store.commit_errors = {2: api_error(gexc.PermissionDenied, "missing datastore.entities.delete")}
    run = Run(store, maximum=25)
    with pytest.raises(DatastoreError, match="PermissionDenied"):
        run.gate.delete(read(store, keys))
    assert run.counts == (50, 25, 0, 25)
    assert len(store.values) == 35


def test_a_stop_mid_batch_keeps_the_count_of_what_went() -> None:
    keys = make_keys(300)
    store = expired(keys)
    store.commit_errors = {3: cast(Exception, Stopped(StopReason.SIGNAL))}
    run = Run(store, maximum=100)
    with pytest.raises(Stopped):
        run.gate.delete(read(store, keys))
    assert run.result.deleted == 200


# --- counted as confirmed (rule 5) ------------------------------------------------------------


def test_a_commit_applied_whose_answer_was_lost_is_counted_once_by_its_version() -> None:
    keys = make_keys(10)
    store = expired(keys)
    store.lose_replies = {1}
    run = Run(store)
    run.gate.delete(read(store, keys))
    assert store.values == {}
    assert run.counter.retries == 1
    assert run.counts == (10, 10, 0, 0)
    # The repeat was refused (the keys had gone), and a lookup showed them gone at one version.
    assert [len(t.deletes) for t in store.transactions] == [10, 10]
    assert run.result.unattributed == 0


def test_where_versions_cannot_show_whose_delete_it_was_the_keys_are_unattributed() -> None:
    keys = make_keys(10)
    store = expired(keys)
    store.lose_replies = {1}
    store.snapshot_versions = True
    run = Run(store)
    run.gate.delete(read(store, keys))
    assert store.values == {}
    assert (run.result.deleted, run.result.unattributed) == (0, 10)


def test_keys_another_writer_deleted_are_never_counted_as_ours() -> None:
    keys = make_keys(4)
    store = expired(keys)
    page = read(store, keys)
    store.drop(keys[0])
    store.drop(keys[1])
    run = Run(store)
    run.gate.delete(page)
    assert store.values == {}
    assert (run.result.deleted, run.result.skipped) == (2, 2)


def test_max_deletes_is_never_passed_when_a_lost_reply_may_have_been_applied() -> None:
    keys = make_keys(10)
    store = expired(keys)
    store.lose_replies = {1}
    store.snapshot_versions = True
    run = Run(store, maximum=5, allowance=Allowance(8))
    run.gate.delete(read(store, keys))
    # 5 went with the lost reply (unattributed, still counted against the cap): 3 more at most.
    assert len(store.deleted) == 8
    assert (run.result.deleted, run.result.unattributed) == (3, 5)


# --- too big (rule 4) -----------------------------------------------------------------------


def test_a_commit_refused_as_too_big_is_split_until_it_goes() -> None:
    keys = make_keys(300)
    store = expired(keys)
    store.too_big_over = 70
    run = Run(store)
    with capture_logs() as logs:
        run.gate.delete(read(store, keys))
    assert store.values == {}
    assert run.counts == (300, 300, 0, 0)
    sent = [len(t.deletes) for t in store.transactions]
    assert sent[:3] == [300, 150, 75]
    assert max(sent[3:]) <= 70
    assert [e["event"] for e in logs].count("commit_split") == 3


def test_a_single_key_refused_as_too_big_is_left_and_named_and_the_rest_go() -> None:
    keys = make_keys(5)
    store = expired(keys)
    store.too_big_over = 0  # every commit refused, even of one key
    run = Run(store, verify=False)
    with capture_logs() as logs:
        run.gate.delete(read(store, keys))
    assert set(store.values) == set(keys)
    assert run.result.failed == 5
    assert run.gate.committer.refused == keys
    refused = [e for e in logs if e["event"] == "delete_refused"]
    assert len(refused) == 5
    assert refused[0]["log_level"] == "error"


# --- blind (--no-verify) --------------------------------------------------------------------


def test_blind_deletes_are_one_plain_commit_per_batch_without_versions() -> None:
    keys = make_keys(500)
    store = expired(keys)
    with capture_logs() as logs:
        run = Run(store, verify=False)
    run.gate.delete([Seen(k, 0, None) for k in keys])
    assert store.delete_calls == [keys]
    assert store.transactions == []
    assert run.result.entities_read == 0
    assert [e["log_level"] for e in logs if e["event"] == "verify_off"] == ["warning"]


def test_a_blind_commit_that_timed_out_is_retried_smaller() -> None:
    keys = make_keys(500)
    store = expired(keys)  # a timeout takes the call deadline: 20 s, and deletes nothing
    store.delete_errors = {1: api_error(gexc.DeadlineExceeded, "Deadline Exceeded")}
    run = Run(store, verify=False, clock=store.clock)
    run.gate.delete([Seen(k, 0, None) for k in keys])
    sizes = [len(c) for c in store.delete_calls]
    assert sizes[:2] == [500, 50]  # 2 s at the 0.04 s per key the timeout proved
    assert store.deleted == keys


@given(
    n=st.integers(1, MAX_BATCH_SIZE),
    maximum=st.integers(1, MAX_BATCH_SIZE),
    too_big_over=st.sampled_from([None, 1, 7, 130]),
)
@settings(max_examples=60, deadline=None)
def test_no_commit_exceeds_its_size_and_every_key_goes_once(
    n: int, maximum: int, too_big_over: int | None
) -> None:
    keys = make_keys(n)
    store = expired(keys)
    store.too_big_over = too_big_over
    run = Run(store, attempts=20, maximum=maximum, clock=store.clock)
    run.gate.delete(read(store, keys))
    sent = [t for t in store.transactions if t.deletes]
    assert all(len(t.deletes) <= maximum for t in sent)
    assert sorted(store.deleted, key=lambda k: k.id) == keys
    assert run.result.deleted == n


# --- the allowance (rule 3) -----------------------------------------------------------------


def test_max_deletes_stops_at_the_cap_in_entities() -> None:
    keys = make_keys(10)
    store = expired(keys)
    run = Run(store, maximum=4, allowance=Allowance(6))
    run.gate.delete(read(store, keys))
    assert len(store.deleted) == 6
    assert run.gate.allowance.capped
    more = make_keys(3, start=100)
    with pytest.raises(Capped):  # the next page finds no room left
        run.gate.delete([Seen(k, 1, EXPIRED) for k in more])


def test_passing_the_guards_share_refuses_the_run() -> None:
    keys = make_keys(10)
    store = expired(keys)
    run = Run(store, maximum=4, allowance=Allowance(None, 5, " (test)"))
    with pytest.raises(RefusedError, match="max-fraction"):
        run.gate.delete(read(store, keys))
    assert len(store.deleted) == 4


def test_the_allowance_counts_groups_whole_and_gives_back_what_did_not_go() -> None:
    allowance = Allowance(10)
    assert allowance.reserve([3, 3, 3, 3]) == 3
    assert allowance.capped
    allowance.release(3)
    assert allowance.left() == 4


# --- a group decided whole (rule 2) ------------------------------------------------------------


def test_a_live_session_under_an_expired_one_keeps_itself_and_everything_under_it() -> None:
    rule = Rule(KIND, PROP, Encoding.EPOCH_SECONDS, CUTOFF)
    root = datastore.Key(KIND, "s", project="p")
    live = datastore.Key(KIND, "s", KIND, "c", project="p")
    under_live = [datastore.Key(KIND, "s", KIND, "c", "event", i, project="p") for i in (1, 2)]
    under_root = datastore.Key(KIND, "s", "event", 9, project="p")
    seen = [
        Seen(root, 1, EXPIRED),
        Seen(live, 1, LIVE),
        *(Seen(k, 1, None) for k in under_live),
        Seen(under_root, 1, None),
    ]
    group = decide(rule, root, seen)
    assert group is not None
    assert [s.key for s in group.members] == [under_root, root]  # the root last
    assert group.guards(KIND, group.members[:1]) == [seen[0]]


def test_a_group_whose_root_is_gone_or_live_is_not_deleted() -> None:
    rule = Rule(KIND, PROP, Encoding.EPOCH_SECONDS, CUTOFF)
    root = datastore.Key(KIND, "s", project="p")
    child = datastore.Key(KIND, "s", "event", 1, project="p")
    assert decide(rule, root, [Seen(child, 1, None)]) is None
    assert decide(rule, root, [Seen(root, 1, LIVE), Seen(child, 1, None)]) is None


# --- commits of whole groups -------------------------------------------------------------------


def _group(i: int, children: int) -> Group:
    root = datastore.Key(KIND, f"s{i}", project="p")
    under = [
        Seen(datastore.Key(KIND, f"s{i}", "c", j, project="p"), 1, None) for j in range(children)
    ]
    return Group(root, [*under, Seen(root, 1, EXPIRED)])


def test_whole_groups_share_a_commit_while_they_fit_and_a_large_one_goes_alone() -> None:
    queue = deque(_group(i, n) for i, n in enumerate([2, 3, 0, 495, 1200]))
    commits = []
    while queue:
        commits.append([len(g.members) for g in _take(queue, 500, MAX_BATCH_SIZE)])
    assert commits == [[3, 4, 1], [496], [1201]]


def test_commits_hold_at_most_max_groups_sessions() -> None:
    queue = deque(_group(i, 0) for i in range(60))
    commits = []
    while queue:
        commits.append(len(_take(queue, 500, LEGACY_LIMIT)))
    assert commits == [25, 25, 10]


def test_a_group_larger_than_a_commit_goes_descendants_first_in_guarded_commits() -> None:
    root = datastore.Key(KIND, 1, project="p")
    store = FakeClient(entities({root: EXPIRED}))
    store.children[root] = [datastore.Key(KIND, 1, "c", j, project="p") for j in range(1200)]
    run = Run(store, with_descendants=True)
    run.gate.delete(read(store, [root]))
    sent = [t.deletes for t in store.transactions if t.deletes]
    assert [len(d) for d in sent] == [500, 500, 201]
    assert root not in sent[0] + sent[1]
    assert sent[2][-1] == root
    # The first two looked the session up in their transaction first; the last deletes it.
    assert [t.read for t in store.transactions if t.deletes] == [[root], [root], []]
    assert (run.result.deleted, run.result.descendants_deleted) == (1, 1200)
