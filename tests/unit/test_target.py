"""The target's reads on a fake client: pages followed by cursor until a short one, one page
held at a time, a failed page retried from its own cursor; probes (``Target.keys``,
``Target.first_value``), the filters ``RangeQuery.build`` sets, and the scan's key pages."""

from __future__ import annotations

import datetime as dt
from typing import cast

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.retry import Retrier, RetryCounter, RetryPolicy
from sweeper.rpc import RangeQuery
from sweeper.target import (
    FIRST_VALUE_PROBE,
    PAGE_SIZE,
    SCAN_FIRST_PAGE,
    Target,
    scan_expired,
)
from tests.unit.fakes import FakeClient, FakeQuery, api_error, entities

QUERY = RangeQuery("eq-session", "expires_at", ((">=", 10**9), ("<", 1_700_000_000)))


def retrier() -> tuple[Retrier, RetryCounter]:
    counter = RetryCounter()
    return Retrier(RetryPolicy(max_attempts=3), counter, sleep=lambda _s: None), counter


def keys_of(found: list[datastore.Entity]) -> list[datastore.Key]:
    return [e.key for e in found]


def as_client(client: FakeClient) -> datastore.Client:
    return cast(datastore.Client, client)


def at(client: FakeClient, retry: Retrier) -> Target:
    return Target(as_client(client), retry, "eq-session", "expires_at")


# --- Target.key_pages --------------------------------------------------------------------------


def test_key_pages_follow_cursors_until_the_server_has_no_more() -> None:
    client = FakeClient(entities([1] * 1200))
    client.final_cursor = False  # the last batch says "no more results"
    retry, _counter = retrier()
    pages = list(at(client, retry).key_pages(QUERY))
    assert [len(p) for p in pages] == [500, 500, 200]
    assert [k for p in pages for k in p] == keys_of(client.entities)
    assert client.cursors == [None, b"500", b"1000"]


def test_key_pages_end_with_an_empty_page_when_the_last_one_is_full() -> None:
    client = FakeClient(entities([1] * 1000))
    retry, _counter = retrier()
    pages = list(at(client, retry).key_pages(QUERY))
    assert [len(p) for p in pages] == [500, 500]  # the empty third page is not yielded
    assert client.fetches == 3


def test_key_pages_stop_when_the_server_gives_no_cursor() -> None:
    client = FakeClient(entities([1] * 500))
    client.final_cursor = False
    retry, _counter = retrier()
    pages = list(at(client, retry).key_pages(QUERY))
    assert [len(p) for p in pages] == [500]
    assert client.fetches == 1


def test_key_pages_hold_one_page_at_a_time() -> None:
    client = FakeClient(entities([1] * 1200))
    retry, _counter = retrier()
    pages = at(client, retry).key_pages(QUERY)
    assert client.fetches == 0
    next(pages)
    assert client.fetches == 1
    next(pages)
    assert client.fetches == 2


def test_a_short_batch_with_a_cursor_is_followed_one_call_at_a_time() -> None:
    """The legacy emulator answers ~300 results per batch whatever the limit: each page is
    one call (a retry repeats one call), and a short batch does not end the range."""
    client = FakeClient(entities([1] * 1000))
    client.batch = 300
    client.final_cursor = False
    retry, _counter = retrier()
    pages = list(at(client, retry).key_pages(QUERY))
    assert [len(p) for p in pages] == [300, 300, 300, 100]
    assert [k for p in pages for k in p] == keys_of(client.entities)


def test_key_pages_ask_for_keys_only_with_an_explicit_limit() -> None:
    client = FakeClient(entities([1] * 600))
    client.final_cursor = False
    retry, _counter = retrier()
    list(at(client, retry).key_pages(QUERY))
    assert all(q.is_keys_only for q in client.queries)
    assert [q.fetched[0][0] for q in client.queries] == [PAGE_SIZE, PAGE_SIZE]


def test_a_bounded_count_without_aggregation_reads_no_key_past_its_bound() -> None:
    client = FakeClient(entities([1] * 1200))
    retry, _counter = retrier()
    count = at(client, retry).count(QUERY, 7)
    assert (count.n, count.method, count.limit) == (7, "keys_only_bounded", 7)
    assert [q.fetched for q in client.queries] == [[(7, None)]]


def test_failed_page_is_retried_from_its_own_cursor() -> None:
    client = FakeClient(entities([1] * 1200))
    client.final_cursor = False
    client.fetch_errors = {2: api_error(gexc.DeadlineExceeded, "slow")}
    retry, counter = retrier()
    pages = list(at(client, retry).key_pages(QUERY))
    assert client.cursors == [None, b"500", b"500", b"1000"]
    assert [k for p in pages for k in p] == keys_of(client.entities)  # none skipped or repeated
    assert counter.retries == 1


def test_permanent_page_failure_is_raised() -> None:
    client = FakeClient(entities([1] * 1200))
    error = api_error(gexc.PermissionDenied, "no")
    client.fetch_errors = {2: error}
    retry, _counter = retrier()
    pages = at(client, retry).key_pages(QUERY)
    assert len(next(pages)) == 500
    with pytest.raises(gexc.PermissionDenied) as info:
        next(pages)
    assert info.value is error


# --- probes --------------------------------------------------------------------------------


def test_fetch_descending_orders_by_the_property_descending() -> None:
    client = FakeClient(entities([1, 2, 3]))
    retry, _counter = retrier()
    at(client, retry).fetch(QUERY, 1, descending=True)
    (query,) = client.queries
    assert query.order == ["-expires_at"]
    assert query.fetched == [(1, None)]


def test_keys_ascending_sets_no_order() -> None:
    client = FakeClient(entities([1, 2, 3]))
    retry, _counter = retrier()
    found = at(client, retry).keys(QUERY, 2)
    assert found == keys_of(client.entities[:2])
    assert client.queries[0].order == []


S, TS, DS, ISO = (
    Encoding.EPOCH_SECONDS,
    Encoding.TIMESTAMP,
    Encoding.DOUBLE_SECONDS,
    Encoding.ISO_8601,
)


@pytest.mark.parametrize(
    ("encoding", "stored", "expected"),
    [
        (S, 1_700_000_000, 1_700_000_000),
        (TS, 1_700_000_000_000_000, 1_700_000_000_000_000),  # as a projection gives it
        (TS, dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC), 1_700_000_000_000_000),
        (S, 0, 0),
        (S, True, None),
        (S, False, None),
        (S, None, None),
        (S, 1.7e9, None),
        (S, "1700000000", None),
        (S, dt.datetime(2024, 1, 1, tzinfo=dt.UTC), None),
        (DS, 1_700_000_000.5, 1_700_000_000_500_000),
        (DS, 1_700_000_000, None),
        (ISO, "2023-11-14T22:13:20.000Z", 1_700_000_000_000),
        # Text in another form: the last canonical instant at or below it, for slicing.
        (ISO, "2023-11-14T22:13:20Z", 1_700_000_000_999),  # "Z" sorts after ".999Z"
        (ISO, "2023-11-14", 1_699_919_999_999),
    ],
)
def test_first_value_is_the_ordinal_of_the_smallest_value(
    encoding: Encoding, stored: object, expected: int | None
) -> None:
    client = FakeClient(entities([stored]))
    retry, _counter = retrier()
    value = at(client, retry).first_value(QUERY, encoding)
    assert value == expected
    assert value is None or type(value) is int


def test_a_strict_first_value_skips_text_in_other_forms() -> None:
    client = FakeClient(entities(["2023-11-14", "2023-11-14T22:13:20.000Z"]))
    retry, _counter = retrier()
    assert at(client, retry).first_value(QUERY, ISO, strict=True) == 1_700_000_000_000
    assert client.queries[0].fetched == [(FIRST_VALUE_PROBE, None)]


def test_first_value_of_an_empty_range_is_none() -> None:
    client = FakeClient([])
    retry, _counter = retrier()
    assert at(client, retry).first_value(QUERY, S) is None


def test_first_value_projects_the_property_with_limit_one() -> None:
    client = FakeClient(entities([5, 6]))
    retry, _counter = retrier()
    at(client, retry).first_value(QUERY, S)
    (query,) = client.queries
    assert query.projection == ["expires_at"]
    assert query.fetched == [(1, None)]


# --- RangeQuery.build ----------------------------------------------------------------------


def filters(query: FakeQuery) -> list[tuple[str, str, object]]:
    return [(f.property_name, f.operator, f.value) for f in query.filters]


def test_build_adds_both_bounds() -> None:
    client = FakeClient([])
    built = cast(FakeQuery, QUERY.build(as_client(client)))
    assert built.kind == "eq-session"
    assert filters(built) == [
        ("expires_at", ">=", 10**9),
        ("expires_at", "<", 1_700_000_000),
    ]
    assert built.is_keys_only
    assert built.order == []


def test_build_without_bounds_lists_the_kind() -> None:
    client = FakeClient([])
    built = cast(FakeQuery, RangeQuery("eq-session", "expires_at").build(as_client(client)))
    assert built.filters == []


def test_build_of_whole_entities_is_not_keys_only() -> None:
    client = FakeClient([])
    query = RangeQuery("eq-session", "expires_at", keys_only=False)
    built = cast(FakeQuery, query.build(as_client(client)))
    assert not built.is_keys_only


# --- scan_expired --------------------------------------------------------------------------


def test_scan_expired_yields_only_expired_keys_and_reports_reads() -> None:
    # Three pages: some expired in the first and the last, none in the middle one.
    values: list[object] = ["live"] * 250
    for i in (0, 3, 7, 99, 200, 249):
        values[i] = "expired"
    values[5] = None
    client = FakeClient(entities(values))
    retry, _counter = retrier()
    reads: list[int] = []
    pages = list(scan_expired(at(client, retry), lambda value: value == "expired", reads.append))
    # A small first page; then, the entities being small, pages of a full delete batch.
    assert reads == [SCAN_FIRST_PAGE, 150]
    keys = keys_of(client.entities)
    # Expired keys are handed on together, a commit's worth at a time, not page by page.
    assert [[s.key for s in page] for page in pages] == [
        [keys[0], keys[3], keys[7], keys[99], keys[200], keys[249]]
    ]
    assert not any(q.is_keys_only for q in client.queries)  # whole entities, to read values
    assert all(q.filters == [] for q in client.queries)  # every entity of the kind


def test_scan_pages_shrink_for_large_entities_and_keys_come_in_full_batches() -> None:
    big = "x" * 100_000  # 100 kB of session data: 10 of them per page keep a response small
    values: list[object] = ["expired"] * (SCAN_FIRST_PAGE + 2 * PAGE_SIZE)
    client = FakeClient(entities(values, data=big))
    retry, _counter = retrier()
    reads: list[int] = []
    pages = list(scan_expired(at(client, retry), lambda value: value == "expired", reads.append))
    assert reads[0] == SCAN_FIRST_PAGE
    assert set(reads[1:-1]) == {10}
    assert [len(page) for page in pages] == [PAGE_SIZE, PAGE_SIZE, SCAN_FIRST_PAGE]
