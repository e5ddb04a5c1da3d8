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
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud import datastore
from google.cloud.datastore.query import PropertyFilter
from google.cloud.datastore_v1.types import entity as entity_pb2

from sweeper import rpc
from sweeper.encodings import Encoding, ExpiredRange, QueryValue, classify
from sweeper.logs import DatastoreError
from sweeper.retry import NO_CLIENT_RETRY, Retrier, too_large
from sweeper.rpc import Seen
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

Bound = tuple[str, QueryValue | None]
CountMethod = Literal["aggregation", "keys_only_bounded", "scan", "empty_range"]
_ALIAS = "n"


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
    # In Datastore's __scatter__ order: keys spread across the key space (what query
    # splitters sample with), where the database keeps the property (not the Firestore emulator).
    scattered: bool = False

    def build(self, client: datastore.Client, descending: bool = False) -> datastore.Query:
        query: datastore.Query = client.query(kind=self.kind)
        if self.projected:
            query.projection = [self.prop]
        elif self.keys_only:
            query.keys_only()
        for op, value in self.bounds:
            query.add_filter(filter=PropertyFilter(self.prop, op, value))
        if descending or self.scattered:
            query.order = ["__scatter__" if self.scattered else "-" + self.prop]
        return query


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


# -- The client ----------------------------------------------------------------------------------


def client_for(settings: SweepSettings) -> datastore.Client:
    """The client of one target (its project, database and namespace); a setup failure is one
    line. ``DATASTORE_EMULATOR_HOST`` (read by the client itself) points it at an emulator with
    anonymous credentials; otherwise it uses Application Default Credentials (Workload Identity
    on GKE)."""
    s = settings
    try:
        return datastore.Client(project=s.project, database=s.database, namespace=s.namespace)
    except auth_exc.DefaultCredentialsError:
        if os.environ.get("DATASTORE_EMULATOR_HOST"):  # the client then looks for a project
            raise DatastoreError(
                "no project: DATASTORE_EMULATOR_HOST is set, and an emulator needs a project id "
                "too: pass --project or set DATASTORE_PROJECT_ID (any id, e.g. demo)"
            ) from None
        raise DatastoreError(
            "no Google Cloud credentials found: run under Workload Identity or a service "
            "account, use 'gcloud auth application-default login', or set "
            "DATASTORE_EMULATOR_HOST for an emulator"
        ) from None
    except OSError as exc:
        if "project" in str(exc).lower():
            raise DatastoreError(
                "no project: pass --project or set SWEEPER_PROJECT / DATASTORE_PROJECT_ID"
            ) from None
        raise DatastoreError(f"cannot create a Datastore client: {exc}") from None


def _fitting(page: rpc.Page) -> int:
    """Results per page that keep an answer within ``SCAN_PAGE_BYTES``, judged by the largest
    entity of ``page``: a full page where the mask keeps entities small."""
    return max(1, min(PAGE_SIZE, SCAN_PAGE_BYTES // (2 * max(page.largest, 1))))
