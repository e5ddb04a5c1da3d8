"""The reads: one kind and its expiry property through a client (:class:`Target`), and the
streams of expired keys a sweep deletes from.

Every read goes through the run's retrier. Pages have an explicit size and go on from the
server's cursor (the Firestore emulator fails an unbounded query past ~40k keys; the legacy
emulator answers ~300 results a batch whatever the limit). Each page is one call, and a failed
page is retried from its own cursor, so a retry never skips or repeats keys.
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

PAGE_SIZE = 500  # keys a page: a whole delete batch per round trip, far below any size limit
# Whole entities a page (a scan; a mask ignored): an answer over 4 MiB fails (gRPC's limit). A
# scan starts small, then asks what fits in 2 MiB at twice the previous page's largest entity.
SCAN_FIRST_PAGE = 100
SCAN_PAGE_BYTES = 2 * 1024 * 1024
# Projected values a strict first_value looks through for one of its encoding.
FIRST_VALUE_PROBE = 20
# Datastore refuses a lookup of more than 1000 keys.
LOOKUP_CHUNK = 500
# Without aggregation queries (the legacy emulator) a count pages through keys: it stops here.
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

    def fetch(self, query: RangeQuery, limit: int, descending: bool = False) -> list[Seen]:
        """The first ``limit`` results: of a whole-entity query each value with its true type,
        of a projection the indexed value (a timestamp as its microseconds)."""
        return self._seen_page(query.build(self.client, descending), limit, None).seen

    def keys(self, query: RangeQuery, limit: int) -> list[datastore.Key]:
        return [s.key for s in self.fetch(query, limit)]

    def key_pages(
        self, query: RangeQuery, page_size: int = PAGE_SIZE
    ) -> Iterator[list[datastore.Key]]:
        """Every key of ``query``, one page in memory at a time."""
        for page in self.seen_pages(query, page_size):
            yield [s.key for s in page]

    def seen_pages(
        self, query: RangeQuery | datastore.Query, page_size: int = PAGE_SIZE, *, scan: bool = False
    ) -> Iterator[list[Seen]]:
        """Every result of ``query`` as the gate deletes it, each key with its version and
        value (``rpc.run_query``), a page at a time. Where whole entities come back (a mask
        ignored) each page holds what fits ``SCAN_PAGE_BYTES``; a ``scan`` starts small."""
        built = query.build(self.client) if isinstance(query, RangeQuery) else query
        cursor: bytes | None = None
        size = SCAN_FIRST_PAGE if scan else page_size
        while True:
            page = self._seen_page(built, size, cursor)
            if page.seen:
                yield page.seen
            if page.cursor is None:
                return
            cursor = page.cursor
            size = max(1, min(page_size, SCAN_PAGE_BYTES // (2 * max(page.largest, 1))))

    def scan_pages(self) -> Iterator[list[Seen]]:
        """Every entity of the kind with its version and value, for properties no index
        holds: one billed entity read per entity of the kind."""
        return self.seen_pages(RangeQuery(self.kind, "__key__", keys_only=False), scan=True)

    def group(self, key: datastore.Key) -> list[Seen]:
        """``key`` (if it exists) and everything under it in its entity group, any kind and
        depth: a kindless ancestor query (strongly consistent, on the legacy emulator too)."""
        return [s for page in self.seen_pages(self.client.query(ancestor=key)) for s in page]

    def lookup(self, keys: Sequence[datastore.Key]) -> list[datastore.Entity]:
        """Full entities for ``keys`` (missing ones dropped), ``LOOKUP_CHUNK`` keys a call."""
        found: list[datastore.Entity] = []
        for at in range(0, len(keys), LOOKUP_CHUNK):
            found += self.retrier.call("lookup", partial(self._get, keys[at : at + LOOKUP_CHUNK]))
        return found

    def descendants(self, key: datastore.Key) -> list[datastore.Key]:
        return [s.key for s in self.group(key) if s.key != key]

    def first_value(
        self, query: RangeQuery, encoding: Encoding, *, strict: bool = False
    ) -> int | None:
        """The ordinal of the smallest value in ``query``'s range (None: it holds none), by a
        small projection (a projected timestamp is its microseconds: its ordinal). ``strict``
        skips text of other forms, among the first ``FIRST_VALUE_PROBE``."""
        limit = FIRST_VALUE_PROBE if strict and encoding.needs_values else 1
        for seen in self.fetch(replace(query, projected=True), limit):
            value = seen.value
            if not strict or not encoding.needs_values or classify(value) is encoding:
                return encoding.ordinal(value)
        return None

    def count(
        self, query: RangeQuery, limit: int | None, *, keys_limit: int = KEYS_ONLY_COUNT_LIMIT
    ) -> Count:
        """One COUNT up to ``limit`` (billed a read per 1,000 index entries); where the
        database has no aggregation (the legacy emulator's 501), keys up to ``keys_limit``."""
        try:
            n = self.retrier.call("query", partial(self._aggregate, query, limit))
            return Count(n if limit is None else min(n, limit), "aggregation", limit)
        except gexc.MethodNotImplemented:
            pass
        bound = keys_limit if limit is None else min(limit, keys_limit)
        counted = 0
        for page in self.key_pages(query, page_size=min(PAGE_SIZE, bound)):  # no key past it
            counted += len(page)
            if counted >= bound:
                break
        return Count(min(counted, bound), "keys_only_bounded", bound)

    def read_time(
        self, local_now: Callable[[], dt.datetime]
    ) -> tuple[dt.datetime, dt.datetime | None, dt.datetime]:
        """The database's time (None where it reports none), with the local clock read just
        before and after the attempt that answered (around its retries, an outage would read
        as skew): one keys-only, limit-1 query."""
        query = self.query().build(self.client)

        def attempt() -> tuple[dt.datetime, dt.datetime | None, dt.datetime]:
            before = local_now()
            timeout = self.retrier.timeout
            page = rpc.run_query(self.client, query, self.prop, 1, cursor=None, timeout=timeout)
            return before, page.read_time, local_now()

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

    def _get(self, keys: Sequence[datastore.Key]) -> list[datastore.Entity]:
        timeout = self.retrier.timeout
        return list(self.client.get_multi(list(keys), retry=NO_CLIENT_RETRY, timeout=timeout))

    def _aggregate(self, query: RangeQuery, limit: int | None) -> int:
        aggregation = self.client.aggregation_query(query.build(self.client)).count(alias=_ALIAS)
        rows = aggregation.fetch(limit=limit, retry=NO_CLIENT_RETRY, timeout=self.retrier.timeout)
        # A count of zero arrives as 0.0: the client reads ``integer_value or double_value``.
        return next(int(r.value) for row in rows for r in row if r.alias == _ALIAS)


def namespaces(client: datastore.Client, retrier: Retrier) -> Iterator[list[str | None]]:
    """The database's namespaces that hold an entity, a page at a time (None: the default one):
    the keys of the ``__namespace__`` kind, named after them (the default one's has an id)."""
    listing = Target(client, retrier, NAMESPACE_KIND, "")
    for page in listing.key_pages(listing.query()):
        yield [key.name for key in page]


# -- The streams: where the expired keys come from ------------------------------------------
# One thread of the pipeline drains each; streams over disjoint slices keep several queries in
# flight, and a shard (one pod of several) only ever queries the slices that are its own.

# Pages of candidates as read (a blind run's keys-only pages: version 0, value None).
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
    """Up to ``settings.workers`` streams of pages, each over its own slice of the range. A scan
    tallies in ``seen`` the encodings it reads (``checks.scan_census``); values of no encoding
    in the range are left alone, counted by ``on_left_alone``. The slices start at ``smallest``
    where detection read it (inside the range), else at a value queried for."""
    s = settings
    if s.scan:
        log.warning(
            "scan_started",
            property=s.prop,
            format=encoding.value,
            cost="one billed entity read per entity of the kind",
        )
        tally = Counter() if seen is None else seen  # an empty Counter is falsy: not ``or``
        return [scan_expired(target, partial(_tallied, tally, encoding, cutoff), on_read)]
    window = expired_range(encoding, cutoff)
    lo, hi = window.values()
    log.info("query_range", format=encoding.value, lower=str(lo), upper=str(hi), shard=str(s.shard))
    if window.empty:
        return []
    pages = partial(_pages, target, verify=s.verify, on_left_alone=on_left_alone)
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
    shard = settings.shard
    slices = shard_slices(window.lo, window.hi, (shard.index, shard.count), bucket, next_value)
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
    """The entities of ``window`` with their versions and values, a page at a time; of a
    text range only canonical text (other forms that sort among it are left alone, counted).
    A blind run of a range that needs no values reads keys only (a billed read a page)."""
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
