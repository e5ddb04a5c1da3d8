"""The target: one kind and its expiry property in one database and namespace, its client, and
every read.

A :class:`Target` owns the client and the run's retry policy, and makes every read a sweep or
``inspect`` makes of the database: small probes (:meth:`Target.fetch`), pages of keys or
entities, counts, the first value of a range, lookups, the descendants of a key, a full scan,
and the database's clock. Every call goes through the retrier, so each read has the same
retries, counts and give-up rule. The gate's transactional calls (``sweeper.rpc``) use the same
client and retrier.

Pages have an explicit size and continue from the server's cursor: the Firestore emulator in
Datastore mode answers an unbounded query in one response and fails past ~40k keys
(RESOURCE_EXHAUSTED), while the legacy emulator returns ~300 results per batch whatever the limit
(both seen on the emulators). Each page is one call, however short the server's batch; the range is
exhausted when the server returns no cursor (no more results) or an empty batch. A page that
fails is retried from its starting cursor, so a retry never skips or repeats keys.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import datastore
from google.cloud.datastore_v1.types import entity as entity_pb2

from sweeper import rpc
from sweeper.encodings import (
    Encoding,
    ExpiredRange,
    classify,
    expired_range,
    is_expired,
    shard_slices,
    split_even,
)
from sweeper.retry import NO_CLIENT_RETRY, Retrier, too_large
from sweeper.rpc import Bound, Count, RangeQuery, Seen
from sweeper.settings import SweepSettings

# Keys per query page: small enough for any response limit (a key is ~100 bytes), large
# enough to fill a whole 500-key delete batch per round trip.
PAGE_SIZE = 500
# Whole entities per page (a scan; a mask ignored): a response over 4 MiB fails (gRPC's limit,
# RESOURCE_EXHAUSTED). A scan's first page is small; later pages hold what fits in 2 MiB at
# twice the largest entity of the page before, up to a delete batch's worth.
SCAN_FIRST_PAGE = 100
SCAN_PAGE_BYTES = 2 * 1024 * 1024
# Projected values a strict first_value looks through for one of its encoding.
FIRST_VALUE_PROBE = 20
# Datastore refuses a lookup of more than 1000 keys.
LOOKUP_CHUNK = 500
# Where aggregation queries are missing (the legacy emulator), counting pages through keys:
# one billed read per page, but time in proportion, so it stops sooner.
KEYS_ONLY_COUNT_LIMIT = 100_000
NAMESPACE_KIND = "__namespace__"
_ALIAS = "n"


@dataclass(frozen=True)
class Target:
    """``kind.prop`` through ``client`` (its database and namespace), every call retried."""

    client: datastore.Client
    retrier: Retrier
    kind: str
    prop: str

    # -- the queries ----------------------------------------------------------------------

    def query(self, *bounds: Bound, keys_only: bool = True, projected: bool = False) -> RangeQuery:
        return RangeQuery(self.kind, self.prop, bounds, keys_only, projected)

    def within(
        self, window: ExpiredRange, *, keys_only: bool = True, projected: bool = False
    ) -> RangeQuery:
        """The entities whose value lies in ``window``: bounded on both sides, inside one
        encoding's band, so nulls and other encodings never match."""
        lo, hi = window.values()
        return self.query((">=", lo), ("<", hi), keys_only=keys_only, projected=projected)

    def carrying(self, *, keys_only: bool = True) -> RangeQuery:
        """Every entity with a non-null indexed value of the property."""
        return self.query((">", None), keys_only=keys_only)

    # -- the reads ------------------------------------------------------------------------

    def fetch(
        self, query: RangeQuery, limit: int, descending: bool = False
    ) -> list[datastore.Entity]:
        """The first ``limit`` results of ``query`` (small probes): whole entities unless it
        is keys-only. A whole entity carries its values' true types, which no index shows."""
        found, _cursor = self.retrier.call(
            "query", lambda: self._page(query.build(self.client, descending), limit, None)
        )
        return found

    def keys(self, query: RangeQuery, limit: int, descending: bool = False) -> list[datastore.Key]:
        """The first ``limit`` keys of ``query`` (used for small probes)."""
        return [entity.key for entity in self.fetch(query, limit, descending)]

    def key_pages(
        self, query: RangeQuery, page_size: int = PAGE_SIZE
    ) -> Iterator[list[datastore.Key]]:
        """Every key of ``query``, one page in memory at a time."""
        cursor: bytes | None = None
        while True:
            built = query.build(self.client)
            found, cursor = self.retrier.call(
                "query", partial(self._page, built, page_size, cursor)
            )
            if found:
                yield [entity.key for entity in found]
            if cursor is None or not found:
                return

    def seen_pages(
        self, query: RangeQuery, page_size: int = PAGE_SIZE, *, scan: bool = False
    ) -> Iterator[list[Seen]]:
        """Every result of ``query`` as the gate deletes it: each key with its version and
        its value of the property (``rpc.run_query``), one page at a time.

        Where the mask is ignored (the legacy emulator; names no mask path is sure to name)
        whole entities come back: each next page holds what fits ``SCAN_PAGE_BYTES`` at twice
        the largest entity of the page before, and a page refused as too large is asked
        again smaller (``_seen_page``). A ``scan`` starts small.
        """
        cursor: bytes | None = None
        size = SCAN_FIRST_PAGE if scan else page_size
        while True:
            page = self._seen_page(query.build(self.client), size, cursor)
            if page.seen:
                yield page.seen
            if page.cursor is None:
                return
            cursor = page.cursor
            size = min(page_size, _fitting(page))

    def scan_pages(self) -> Iterator[list[Seen]]:
        """Every entity of the kind with its version and value, for properties no index
        holds: one billed entity read per entity of the kind."""
        return self.seen_pages(RangeQuery(self.kind, "__key__", keys_only=False), scan=True)

    def group(self, key: datastore.Key) -> list[Seen]:
        """``key`` (if it exists) and everything under it in its entity group, any kind and
        depth, each with its version and value of the property: one kindless ancestor query,
        paged. Ancestor queries are strongly consistent, on the legacy emulator too."""
        found: list[Seen] = []
        cursor: bytes | None = None
        size = PAGE_SIZE
        while True:
            page = self._seen_page(self.client.query(ancestor=key), size, cursor)
            found += page.seen
            if page.cursor is None:
                return found
            cursor, size = page.cursor, _fitting(page)

    def lookup(self, keys: Sequence[datastore.Key]) -> list[datastore.Entity]:
        """Full entities for ``keys`` (missing ones dropped), ``LOOKUP_CHUNK`` keys a call."""
        found: list[datastore.Entity] = []
        for at in range(0, len(keys), LOOKUP_CHUNK):
            found += self.retrier.call("lookup", partial(self._get, keys[at : at + LOOKUP_CHUNK]))
        return found

    def descendants(self, key: datastore.Key) -> list[datastore.Key]:
        """Every key under ``key`` in its entity group, of any kind and depth (not ``key``).

        A kindless, keys-only ancestor query, paged like any other: one billed read per page.
        Ancestor queries are strongly consistent, on the legacy emulator too.
        """
        found: list[datastore.Key] = []
        cursor: bytes | None = None
        while True:
            query = self.client.query(ancestor=key)
            query.keys_only()
            page, cursor = self.retrier.call("query", partial(self._page, query, PAGE_SIZE, cursor))
            found += [entity.key for entity in page if entity.key != key]
            if cursor is None or not page:
                return found

    def first_value(
        self, query: RangeQuery, encoding: Encoding, *, strict: bool = False
    ) -> int | None:
        """The ordinal of the smallest value in ``query``'s range, or None if it holds none.

        One small projection read. Both emulators return a projected timestamp as its
        microseconds since the epoch, which is its ordinal. Where the range can hold values of
        no encoding (text), ``strict`` skips to the first value that is of ``encoding``, among
        the first ``FIRST_VALUE_PROBE``; otherwise the first value's place in the order is taken.
        """
        projected = replace(query, projected=True)
        limit = FIRST_VALUE_PROBE if strict and encoding.needs_values else 1
        for entity in self.fetch(projected, limit):
            value = entity.get(query.prop)
            if not strict or not encoding.needs_values or classify(value) is encoding:
                return encoding.ordinal(value)
        return None

    def count(
        self, query: RangeQuery, limit: int | None, *, keys_limit: int = KEYS_ONLY_COUNT_LIMIT
    ) -> Count:
        """One COUNT, up to ``limit``, where the database has aggregation queries; keys else.

        An aggregation COUNT is billed one entity read per 1,000 index entries counted, so a
        limit of a million costs at most 1,000 reads. The legacy emulator answers it with 501
        ``MethodNotImplemented``, a permanent error, so the retrier raises it at once and a
        keys-only count (up to ``keys_limit`` as well) takes over.
        """
        try:
            n = self.retrier.call("query", partial(self._aggregate, query, limit))
            return Count(n if limit is None else min(n, limit), "aggregation", limit)
        except gexc.MethodNotImplemented:
            pass
        bound = keys_limit if limit is None else min(limit, keys_limit)
        counted = 0
        for page in self.key_pages(query, page_size=min(PAGE_SIZE, bound)):
            counted += len(page)
            if counted >= bound:
                break
        return Count(min(counted, bound), "keys_only_bounded", bound)

    def read_time(
        self, local_now: Callable[[], dt.datetime]
    ) -> tuple[dt.datetime, dt.datetime | None, dt.datetime]:
        """The database's time (None where it reports none, as the legacy emulator), with the
        local clock read just before and just after the attempt that answered (not around its
        retries: a probe retried through an outage would report the outage as skew).

        The client's query iterator drops ``read_time``, so this is one keys-only, limit-1
        query on the kind through the client's API object, which returns the whole response.
        """

        def attempt() -> tuple[dt.datetime, dt.datetime | None, dt.datetime]:
            before = local_now()
            return before, self._read_time(), local_now()

        return self.retrier.call("query", attempt)

    # -- one call each --------------------------------------------------------------------

    def _seen_page(self, query: datastore.Query, limit: int, cursor: bytes | None) -> rpc.Page:
        """One page from ``cursor``; refused as larger than gRPC takes, a quarter as many."""
        timeout = self.retrier.timeout
        while True:
            try:
                call = partial(rpc.run_query, self.client, query, self.prop, limit)
                return self.retrier.call("query", partial(call, cursor=cursor, timeout=timeout))
            except gexc.ResourceExhausted as exc:
                if not too_large(exc) or limit == 1:
                    raise
                limit = max(1, limit // 4)

    def _page(
        self, query: datastore.Query, limit: int, cursor: bytes | None
    ) -> tuple[list[datastore.Entity], bytes | None]:
        """One RunQuery call: up to ``limit`` results and the cursor after them (None at the
        end). Only the first batch the server answers is taken, so a retried page repeats one
        call, not the several the client's iterator would chain to fill ``limit`` (the legacy
        emulator answers ~300 results per batch): on a network that drops connections every
        second, a page of several calls might never get through."""
        iterator = query.fetch(
            limit=limit, start_cursor=cursor, retry=NO_CLIENT_RETRY, timeout=self.retrier.timeout
        )
        batch = next(iterator.pages, None)
        found = list(batch) if batch is not None else []
        token: bytes | None = iterator.next_page_token
        return found, token

    def _get(self, keys: Sequence[datastore.Key]) -> list[datastore.Entity]:
        timeout = self.retrier.timeout
        return list(self.client.get_multi(list(keys), retry=NO_CLIENT_RETRY, timeout=timeout))

    def _aggregate(self, query: RangeQuery, limit: int | None) -> int:
        aggregation = self.client.aggregation_query(query.build(self.client)).count(alias=_ALIAS)
        rows = aggregation.fetch(limit=limit, retry=NO_CLIENT_RETRY, timeout=self.retrier.timeout)
        # A count of zero arrives as 0.0: the client reads ``integer_value or double_value``.
        return next(int(r.value) for row in rows for r in row if r.alias == _ALIAS)

    def _read_time(self) -> dt.datetime | None:
        client = self.client
        partition = entity_pb2.PartitionId(
            project_id=client.project,
            database_id=client.database or "",
            namespace_id=client.namespace or "",
        )
        request = {
            "project_id": client.project,
            "database_id": client.database or "",
            "partition_id": partition,
            "query": {
                "kind": [{"name": self.kind}],
                "limit": 1,
                "projection": [{"property": {"name": "__key__"}}],
            },
        }
        response = client._datastore_api.run_query(
            request=request, retry=NO_CLIENT_RETRY, timeout=self.retrier.timeout
        )
        if "read_time" not in response.batch:
            return None
        read_time: dt.datetime = response.batch.read_time
        return read_time if read_time.tzinfo else read_time.replace(tzinfo=dt.UTC)


def namespaces(client: datastore.Client, retrier: Retrier) -> Iterator[list[str | None]]:
    """The database's namespaces, a page at a time, None for the default one.

    A keys-only query on the ``__namespace__`` metadata kind, paged like any other: each
    namespace is a key whose name is the namespace (the default namespace's key has the id 1
    instead). Only namespaces that hold an entity are listed.
    """
    listing = Target(client, retrier, NAMESPACE_KIND, "")
    for page in listing.key_pages(listing.query()):
        yield [key.name for key in page]


def _fitting(page: rpc.Page) -> int:
    """Results per page that keep an answer within ``SCAN_PAGE_BYTES``, judged by the largest
    entity of ``page``: a full page where the mask keeps entities small."""
    return max(1, min(PAGE_SIZE, SCAN_PAGE_BYTES // (2 * max(page.largest, 1))))


# -- The streams: where the expired keys come from ------------------------------------------
# Each stream is an iterator of pages that one thread of the pipeline drains. Several streams
# over disjoint slices of the expired range keep several queries in flight at once, and a shard
# (one pod of several) only ever queries the slices that belong to it.

# Pages of candidates, each key with the version and value its read saw (the gate deletes
# that version); a blind run's keys-only pages carry neither (version 0, value None).
KeyPages = Iterator[list[Seen]]

# Shards own one-hour buckets of expiry time, round robin (``encodings.shard_slices``).
SHARD_BUCKET = dt.timedelta(hours=1)


def expired_streams(
    target: Target,
    settings: SweepSettings,
    encoding: Encoding,
    cutoff: dt.datetime,
    *,
    smallest: int | None = None,
    log: Any,
    on_read: Callable[[int], None],
    seen: Counter[str] | None = None,
    on_left_alone: Callable[[int], None] = lambda n: None,
) -> list[KeyPages]:
    """Up to ``settings.workers`` independent streams of expired ranges or key pages.

    A scan counts in ``seen`` the encodings of the non-null values it reads, so the engine can
    tell a scan that found nothing to do from one that could never have matched anything.
    Values in the range that are of no encoding (text in another form) are left alone and
    counted through ``on_left_alone``. ``smallest`` is the smallest stored value's ordinal
    where detection has read it already: the slices start there instead of at a value queried
    for (a value changed since, so that it lies past the range, is queried for all the same).
    A stream reads its next page while the workers delete the last one.
    """
    s = settings
    if s.scan:
        log.warning(
            "scan_started",
            property=s.prop,
            format=encoding.value,
            cost="one billed entity read per entity of the kind",
        )
        return [
            scan_expired(target, partial(_tallied, seen or Counter(), encoding, cutoff), on_read)
        ]
    verify = s.verify
    window = expired_range(encoding, cutoff)
    lo, hi = window.values()
    log.info("query_range", format=encoding.value, lower=str(lo), upper=str(hi), shard=str(s.shard))
    if window.empty:
        return []
    pages = partial(_pages, target, verify=verify, on_left_alone=on_left_alone)
    if s.shard.count > 1:
        return _shard_streams(target, s, window, pages)
    if s.workers == 1:
        return [pages(window)]
    # Start the slices at the oldest stored value, not at 2001: the old part is empty.
    start = smallest if smallest is not None and window.lo <= smallest < window.hi else None
    if start is None:
        start = target.first_value(target.within(window), encoding)
    if start is None:
        return []
    slices = split_even(start, window.hi, s.workers)
    return [pages(ExpiredRange(encoding, a, b)) for a, b in slices]


def _tallied(seen: Counter[str], encoding: Encoding, cutoff: dt.datetime, value: object) -> bool:
    if value is not None:
        found = classify(value)
        seen[found.value if found else "unsupported"] += 1
    return is_expired(encoding, value, cutoff)


def scan_expired(
    target: Target, expired: Callable[[object], bool], on_read: Callable[[int], None]
) -> KeyPages:
    """Every entity of the kind whose value is ``expired``, by reading them all; handed on in
    pages of up to ``PAGE_SIZE`` (one full commit), whatever the read pages."""
    pending: list[Seen] = []
    for found in target.scan_pages():
        on_read(len(found))
        pending += [s for s in found if expired(s.value)]
        while len(pending) >= PAGE_SIZE:
            yield pending[:PAGE_SIZE]
            pending = pending[PAGE_SIZE:]
    if pending:
        yield pending


def _shard_streams(
    target: Target,
    settings: SweepSettings,
    window: ExpiredRange,
    pages: Callable[[ExpiredRange], KeyPages],
) -> list[KeyPages]:
    """``workers`` streams that share this shard's buckets, found as they are needed."""
    encoding = window.encoding

    def next_value(pos: int, hi: int) -> int | None:
        return target.first_value(target.within(ExpiredRange(encoding, pos, hi)), encoding)

    bucket = max(1, SHARD_BUCKET // dt.timedelta(microseconds=encoding.unit_us))
    slices = shard_slices(window.lo, window.hi, settings.shard, bucket, next_value)
    lock = threading.Lock()  # one walk, drawn from by every stream's thread

    def stream() -> KeyPages:
        while True:
            with lock:
                part = next(slices, None)
            if part is None:
                return
            yield from pages(ExpiredRange(encoding, *part))

    return [stream() for _ in range(settings.workers)]


def _pages(
    target: Target, window: ExpiredRange, *, verify: bool, on_left_alone: Callable[[int], None]
) -> KeyPages:
    """The entities of ``window``, a page at a time, each with its version and value; of a
    text range, only those whose value is of the range's encoding. A blind run of a range
    that needs no values reads keys only (one billed read per page, not per key).

    A text range also holds text in other forms and byte strings that sort between its ends
    (``2026-11-22``, ``2026-11-22T10:15:00+01:00``): they are left alone, and counted.
    """
    encoding = window.encoding
    if not verify and not encoding.needs_values:
        for keys in target.key_pages(target.within(window)):
            yield [Seen(k, 0, None) for k in keys]
        return
    for page in target.seen_pages(target.within(window, keys_only=False)):
        kept = [s for s in page if classify(s.value) is encoding]
        if len(kept) < len(page):
            on_left_alone(len(page) - len(kept))
        if kept:
            yield kept
