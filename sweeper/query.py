"""Paged, keys-only range queries over one property.

Pages have an explicit size and continue from the server's cursor: the Firestore emulator in
Datastore mode answers an unbounded query in one response and fails past ~40k keys
(RESOURCE_EXHAUSTED), while the legacy emulator returns ~300 results per batch whatever the limit
(both seen on the emulators). Each page is one call, however short the server's batch; the range is
exhausted when the server returns no cursor (no more results) or an empty batch. A page that
fails is retried from its starting cursor, so a retry never skips or repeats keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

from google.api_core import exceptions as gexc
from google.cloud import datastore
from google.cloud.datastore.helpers import entity_to_protobuf
from google.cloud.datastore.query import PropertyFilter

from sweeper.encodings import Encoding, QueryValue, classify
from sweeper.retry import NO_CLIENT_RETRY, Retrier

# Keys per query page: small enough for any response limit (a key is ~100 bytes), large
# enough to fill a whole 500-key delete batch per round trip.
PAGE_SIZE = 500
# Full entities per page in scan mode: session data can be large, and a response over 4 MiB
# fails (gRPC's default limit; the Firestore emulator reports RESOURCE_EXHAUSTED). The
# first page is small; later pages hold as many entities as fit in 2 MiB at twice the
# largest size sampled from the page before, up to a delete batch's worth.
SCAN_FIRST_PAGE = 100
SCAN_PAGE_BYTES = 2 * 1024 * 1024
SCAN_MIN_PAGE = 10

Bound = tuple[str, QueryValue | None]


@dataclass(frozen=True)
class RangeQuery:
    """Keys of ``kind`` whose ``prop`` meets every bound, e.g. ``((">=", lo), ("<", hi))``.

    With no bounds it lists the kind's keys, whatever their properties; with ``keys_only``
    off it returns whole entities (one billed read each); ``projected`` returns each key with
    its indexed value of ``prop`` (a projection), for ranges whose values must be read.
    """

    kind: str
    prop: str
    bounds: tuple[Bound, ...] = ()
    keys_only: bool = True
    projected: bool = False

    def build(self, client: datastore.Client, descending: bool = False) -> datastore.Query:
        query: datastore.Query = client.query(kind=self.kind)
        if self.projected:
            query.projection = [self.prop]
        elif self.keys_only:
            query.keys_only()
        for op, value in self.bounds:
            query.add_filter(filter=PropertyFilter(self.prop, op, value))
        if descending:
            query.order = ["-" + self.prop]
        return query


def fetch(
    client: datastore.Client,
    retrier: Retrier,
    query: RangeQuery,
    limit: int,
    descending: bool = False,
) -> list[datastore.Entity]:
    """The first ``limit`` results of ``query`` (small probes): whole entities unless it is
    keys-only. A whole entity carries its values' true types, which no index shows."""
    found, _cursor = retrier.call(
        "query",
        lambda: _page(client, query, limit, None, timeout=retrier.timeout, descending=descending),
    )
    return found


def fetch_keys(
    client: datastore.Client,
    retrier: Retrier,
    query: RangeQuery,
    limit: int,
    descending: bool = False,
) -> list[datastore.Key]:
    """The first ``limit`` keys of ``query`` (used for small probes)."""
    return [entity.key for entity in fetch(client, retrier, query, limit, descending)]


def key_pages(
    client: datastore.Client,
    retrier: Retrier,
    query: RangeQuery,
    page_size: int = PAGE_SIZE,
    *,
    start: bytes | None = None,
) -> Iterator[list[datastore.Key]]:
    """Every key of ``query`` (from cursor ``start``), holding one page in memory at a time."""
    for page in entity_pages(client, retrier, query, page_size, start=start):
        yield [entity.key for entity in page]


def entity_pages(
    client: datastore.Client,
    retrier: Retrier,
    query: RangeQuery,
    page_size: int = PAGE_SIZE,
    *,
    start: bytes | None = None,
    resize: Callable[[list[datastore.Entity]], int] | None = None,
) -> Iterator[list[datastore.Entity]]:
    """Every result of ``query`` (keys only, or whole entities), one page at a time; with
    ``resize``, each next page's size is what it says of the page before."""
    cursor: bytes | None = start
    while True:
        found, cursor = retrier.call(
            "query", partial(_page, client, query, page_size, cursor, timeout=retrier.timeout)
        )
        if found:
            yield found
        if cursor is None or not found:
            return
        if resize is not None:
            page_size = resize(found)


def namespaces(client: datastore.Client, retrier: Retrier) -> Iterator[list[str | None]]:
    """The database's namespaces, a page at a time, None for the default one.

    A keys-only query on the ``__namespace__`` metadata kind, paged like any other: each
    namespace is a key whose name is the namespace (the default namespace's key has the id 1
    instead). Only namespaces that hold an entity are listed.
    """
    for page in key_pages(client, retrier, RangeQuery(NAMESPACE_KIND, "")):
        yield [key.name for key in page]


NAMESPACE_KIND = "__namespace__"


def lookup(
    client: datastore.Client, retrier: Retrier, keys: Sequence[datastore.Key]
) -> list[datastore.Entity]:
    """Full entities for ``keys`` (missing ones are dropped): the only way to see true types."""
    if not keys:
        return []
    return retrier.call(
        "lookup",
        lambda: list(client.get_multi(list(keys), retry=NO_CLIENT_RETRY, timeout=retrier.timeout)),
    )


def _page(
    client: datastore.Client,
    query: RangeQuery,
    limit: int,
    cursor: bytes | None,
    *,
    timeout: float,
    descending: bool = False,
) -> tuple[list[datastore.Entity], bytes | None]:
    """One RunQuery call: up to ``limit`` results and the cursor after them (None at the end).

    Only the first batch the server answers is taken, so a retried page repeats one call, not
    the several the client's iterator would chain to fill ``limit`` (the legacy emulator answers
    ~300 results per batch): on a network that drops connections every second, a page of
    several calls might never get through.
    """
    return _first_batch(query.build(client, descending), limit, cursor, timeout=timeout)


def _first_batch(
    query: datastore.Query, limit: int, cursor: bytes | None, *, timeout: float
) -> tuple[list[datastore.Entity], bytes | None]:
    iterator = query.fetch(limit=limit, start_cursor=cursor, retry=NO_CLIENT_RETRY, timeout=timeout)
    batch = next(iterator.pages, None)
    found = list(batch) if batch is not None else []
    token: bytes | None = iterator.next_page_token
    return found, token


def descendant_keys(
    client: datastore.Client, retrier: Retrier, key: datastore.Key
) -> list[datastore.Key]:
    """Every key under ``key`` in its entity group, of any kind and depth (not ``key`` itself).

    A kindless, keys-only ancestor query, paged like any other: one billed read per page.
    Ancestor queries are strongly consistent, on the legacy emulator too.
    """
    found: list[datastore.Key] = []
    cursor: bytes | None = None
    while True:
        query = client.query(ancestor=key)
        query.keys_only()
        page, cursor = retrier.call(
            "query", partial(_first_batch, query, PAGE_SIZE, cursor, timeout=retrier.timeout)
        )
        found += [entity.key for entity in page if entity.key != key]
        if cursor is None or not page:
            return found


def scan_pages(
    client: datastore.Client, retrier: Retrier, kind: str
) -> Iterator[list[datastore.Entity]]:
    """Every entity of ``kind``, whole, in pages sized to keep each response small.

    For properties no index holds: costs one billed entity read per entity of the kind.
    """
    query = RangeQuery(kind, "__key__", keys_only=False)
    return entity_pages(client, retrier, query, SCAN_FIRST_PAGE, resize=_scan_page_size)


def scan_expired(
    client: datastore.Client,
    retrier: Retrier,
    kind: str,
    prop: str,
    *,
    expired: Callable[[object], bool],
    on_read: Callable[[int], None],
) -> Iterator[list[datastore.Key]]:
    """Keys of every entity of ``kind`` whose ``prop`` value is ``expired``, by reading them all.

    Keys are handed on in pages of up to ``PAGE_SIZE`` (one full commit), whatever the read
    pages.
    """
    pending: list[datastore.Key] = []
    for found in scan_pages(client, retrier, kind):
        on_read(len(found))
        pending += [entity.key for entity in found if expired(entity.get(prop))]
        while len(pending) >= PAGE_SIZE:
            yield pending[:PAGE_SIZE]
            pending = pending[PAGE_SIZE:]
    if pending:
        yield pending


def _scan_page_size(page: Sequence[datastore.Entity]) -> int:
    """Entities per page that keep a response within ``SCAN_PAGE_BYTES``, judged by a sample."""
    sample = page[:: max(1, len(page) // 8)]
    largest = max(_encoded_size(entity) for entity in sample)
    return max(SCAN_MIN_PAGE, min(PAGE_SIZE, SCAN_PAGE_BYTES // (2 * max(largest, 1))))


def _encoded_size(entity: datastore.Entity) -> int:
    message = entity_to_protobuf(entity)
    return int(type(message).pb(message).ByteSize())


def first_value(
    client: datastore.Client,
    retrier: Retrier,
    query: RangeQuery,
    encoding: Encoding,
    *,
    strict: bool = False,
) -> int | None:
    """The ordinal of the smallest value in ``query``'s range, or None if it holds none.

    One small projection read. Both emulators return a projected timestamp as its
    microseconds since the epoch, which is its ordinal. Where the range can hold values of no
    encoding (text), ``strict`` skips to the first value that is of ``encoding``, among the
    first ``FIRST_VALUE_PROBE``; otherwise the first value's place in the order is taken.
    """

    def fetch() -> list[datastore.Entity]:
        projected = query.build(client)
        projected.projection = [query.prop]
        limit = FIRST_VALUE_PROBE if strict and encoding.needs_values else 1
        return list(projected.fetch(limit=limit, retry=NO_CLIENT_RETRY, timeout=retrier.timeout))

    for entity in retrier.call("query", fetch):
        value = entity.get(query.prop)
        if not strict or not encoding.needs_values or classify(value) is encoding:
            return encoding.ordinal(value)
    return None


# Projected values a strict first_value looks through for one of its encoding.
FIRST_VALUE_PROBE = 20


# Where aggregation queries are missing (the legacy emulator), counting pages through keys:
# one billed read per page, but time in proportion, so it stops sooner.
KEYS_ONLY_COUNT_LIMIT = 100_000
CountMethod = Literal["aggregation", "keys_only_bounded", "scan", "empty_range"]
_ALIAS = "n"


@dataclass(frozen=True)
class Count:
    """How many entities a query matches, counted up to ``limit`` (None: all of them): by an
    aggregation COUNT, keys-only pages up to a bound, a scan, or nothing to count (a range
    that holds no value: ``empty_range``)."""

    n: int
    method: CountMethod
    limit: int | None = None

    @property
    def lower_bound(self) -> bool:
        """True when the count stopped at its limit: there may be more."""
        return self.limit is not None and self.n >= self.limit


def count(
    client: datastore.Client,
    retrier: Retrier,
    query: RangeQuery,
    limit: int | None,
    *,
    keys_limit: int = KEYS_ONLY_COUNT_LIMIT,
) -> Count:
    """One COUNT, up to ``limit``, where the database has aggregation queries; keys otherwise.

    An aggregation COUNT is billed one entity read per 1,000 index entries counted, so a limit
    of a million costs at most 1,000 reads. The legacy emulator answers it with 501
    ``MethodNotImplemented``, a permanent error, so the retrier raises it at once and a keys-only
    count (up to ``keys_limit`` as well) takes over.
    """
    try:
        n = retrier.call("query", lambda: _aggregate(client, query, limit, retrier.timeout))
        return Count(n if limit is None else min(n, limit), "aggregation", limit)
    except gexc.MethodNotImplemented:
        pass
    bound = keys_limit if limit is None else min(limit, keys_limit)
    counted = 0
    for page in key_pages(client, retrier, query, page_size=min(PAGE_SIZE, bound)):
        counted += len(page)
        if counted >= bound:
            break
    return Count(min(counted, bound), "keys_only_bounded", bound)


def _aggregate(
    client: datastore.Client, query: RangeQuery, limit: int | None, timeout: float
) -> int:
    aggregation = client.aggregation_query(query.build(client)).count(alias=_ALIAS)
    rows = aggregation.fetch(limit=limit, retry=NO_CLIENT_RETRY, timeout=timeout)
    # A count of zero arrives as 0.0: the client reads ``integer_value or double_value``.
    return next(int(r.value) for row in rows for r in row if r.alias == _ALIAS)
