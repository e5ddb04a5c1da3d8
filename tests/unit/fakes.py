"""The unit tests' fake Datastore client over one kind's entities (the fake clock is shared).

The client implements only what sweeper calls (queries, lookups, blind deletes, transactions,
the clock query, a refused aggregation) and lets a test inject failures and races; what real
queries do beyond that is covered by the integration tests against both emulators.
"""

from __future__ import annotations

import datetime as dt
import operator
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.cloud import datastore
from google.cloud.datastore import helpers
from google.cloud.datastore.query import PropertyFilter
from google.cloud.datastore_v1.types import datastore as datastore_pb2
from google.cloud.datastore_v1.types import query as query_pb2

from sweeper.encodings import to_micros
from tests.support.clock import FakeClock

E = TypeVar("E", bound=Exception)

KIND, PROP = "eq-session", "expires_at"
MISSING = object()  # an entity without the property
TOO_MANY_GROUPS = "operating on too many entity groups in a single transaction."
TOO_BIG = "transaction or write too big."


def api_error(cls: type[E], message: str) -> E:
    """google.api_core's exception classes are unannotated; build them in one typed place."""
    return cls(message)


def entities(
    values: Sequence[object] | Mapping[datastore.Key, object],
    *,
    unindexed: bool = False,
    data: str = "",
) -> list[datastore.Entity]:
    """Entities of ``KIND`` whose ``PROP`` holds each value (none where it is ``MISSING``): keyed
    1, 2, ... in order, or by the mapping's keys; ``data`` as their session data."""
    pairs = (
        list(values.items())
        if isinstance(values, Mapping)
        else [(datastore.Key(KIND, i + 1, project="p"), v) for i, v in enumerate(values)]
    )
    found = []
    for key, value in pairs:
        entity = datastore.Entity(key, exclude_from_indexes=(PROP,) if unindexed else ())
        if value is not MISSING:
            entity[PROP] = value
        if data:
            entity["session_data"] = data
        found.append(entity)
    return found


def index_order(value: object) -> tuple[int, Any]:
    """Datastore's order of one property's values: null; ints and timestamps together (a
    timestamp as its microseconds); booleans; strings; floats."""
    if value is None:
        return (0, 0)
    if isinstance(value, bool):
        return (2, value)
    if isinstance(value, int):
        return (1, value)
    if isinstance(value, dt.datetime):
        return (1, to_micros(value))
    if isinstance(value, str):
        return (3, value)
    if isinstance(value, float):
        return (4, value)
    raise TypeError(f"no index order for {value!r}")


OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
}


def project(entity: datastore.Entity, names: Sequence[str]) -> datastore.Entity:
    """What a projection query returns of ``entity``: its key and the projected properties."""
    projected = datastore.Entity(entity.key)
    projected.update({n: entity[n] for n in names if n in entity})
    return projected


class FakePage:
    def __init__(self, found: list[datastore.Entity], token: bytes | None) -> None:
        self._found = found
        self.next_page_token = token

    def __iter__(self) -> Iterator[Any]:
        return iter(self._found)


class FakeQuery:
    """Records what the caller set, and answers ``fetch`` from the client's entities."""

    def __init__(
        self, client: FakeClient, kind: str | None, ancestor: datastore.Key | None = None
    ) -> None:
        self.client = client
        self.kind = kind
        self.ancestor = ancestor
        self.filters: list[PropertyFilter] = []
        self.order: list[str] = []
        self.projection: list[str] = []
        self.fetched: list[tuple[int, bytes | None]] = []
        self.namespace: str | None = None
        self.distinct_on: list[str] = []

    def keys_only(self) -> None:
        self.projection = ["__key__"]  # what the client library does

    @property
    def is_keys_only(self) -> bool:
        return self.projection == ["__key__"]

    def add_filter(self, *, filter: PropertyFilter) -> FakeQuery:
        self.filters.append(filter)
        return self

    def fetch(
        self,
        *,
        limit: int,
        start_cursor: bytes | None = None,
        retry: object,
        timeout: float,
    ) -> FakePage:
        self.fetched.append((limit, start_cursor))
        return self.client.page(self, limit, start_cursor)


class FakeTransaction:
    def __init__(self, client: FakeClient, begin_later: bool = False) -> None:
        self.client = client
        self.begin_later = begin_later
        self.id = b"fake-transaction"
        self.began = False
        self.read: list[datastore.Key] = []
        self.deletes: list[datastore.Key] = []
        self.base_versions: dict[datastore.Key, int] = {}
        self.rolled_back = False

    def begin(self, *, retry: object, timeout: float) -> None:
        self.began = True

    def delete(self, key: datastore.Key) -> None:
        self.deletes.append(key)

    def commit(self, *, retry: object, timeout: float) -> None:
        self.client.commit(self)

    def rollback(self, *, retry: object, timeout: float) -> None:
        self.rolled_back = True


class FakeApi:
    """``client._datastore_api``: the clock query, and the gate's raw calls (``sweeper.rpc``),
    turned back into keys and played on the client's transactions and blind deletes."""

    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.read_time: dt.datetime | None = None  # like the legacy emulator: no server time
        self._open: dict[bytes, FakeTransaction] = {}

    def begin_transaction(self, *, request: Any, retry: object, timeout: float) -> Any:
        txn = self.client.transaction()
        txn.began = True
        txn.id = b"fake-transaction-%d" % len(self.client.transactions)
        self._open[txn.id] = txn
        return datastore_pb2.BeginTransactionResponse(transaction=txn.id)

    def lookup(self, *, request: Any, retry: object, timeout: float) -> Any:
        raw = datastore_pb2.LookupRequest.pb(request)
        keys = [helpers.key_from_protobuf(pb) for pb in raw.keys]
        txn = self._open[raw.read_options.transaction] if raw.read_options.transaction else None
        found = self.client.get_multi(keys, transaction=txn, retry=retry, timeout=timeout)
        response = datastore_pb2.LookupResponse.pb()()
        present = set()
        for entity in found:
            result = response.found.add()
            result.entity.CopyFrom(helpers.entity_to_protobuf(entity)._pb)
            result.version = self.client.version_of(entity.key)
            present.add(entity.key)
        for key in keys:
            if key not in present:
                result = response.missing.add()
                result.entity.key.CopyFrom(key.to_protobuf()._pb)
                result.version = self.client.missing_version(key)
        return datastore_pb2.LookupResponse.wrap(response)

    def commit(self, *, request: Any, retry: object, timeout: float) -> Any:
        raw = datastore_pb2.CommitRequest.pb(request)
        keys = [helpers.key_from_protobuf(m.delete) for m in raw.mutations]
        if raw.mode == datastore_pb2.CommitRequest.Mode.NON_TRANSACTIONAL:
            self.client.delete_multi(keys, retry=retry, timeout=timeout)
            return datastore_pb2.CommitResponse()
        txn = self._open[raw.transaction] if raw.transaction else self.client.transaction()
        txn.deletes.extend(keys)
        txn.base_versions = {
            key: m.base_version
            for key, m in zip(keys, raw.mutations, strict=True)
            if m.HasField("base_version")
        }
        version = self.client.commit(txn)
        response = datastore_pb2.CommitResponse.pb()()
        for _key in keys:
            response.mutation_results.add().version = version
        return datastore_pb2.CommitResponse.wrap(response)

    def rollback(self, *, request: Any, retry: object, timeout: float) -> Any:
        self._open[datastore_pb2.RollbackRequest.pb(request).transaction].rolled_back = True
        return datastore_pb2.RollbackResponse()

    def run_query(self, *, request: Any, retry: object, timeout: float) -> Any:
        raw = datastore_pb2.RunQueryRequest.pb(request)
        query = self._query_of(raw.query)
        cursor = raw.query.start_cursor or None
        page = query.fetch(
            limit=raw.query.limit.value, start_cursor=cursor, retry=retry, timeout=timeout
        )
        response = datastore_pb2.RunQueryResponse.pb()()
        batch = response.batch
        if self.read_time is not None:
            batch.read_time.FromDatetime(self.read_time)
        for entity in page:
            result = batch.entity_results.add()
            result.entity.CopyFrom(helpers.entity_to_protobuf(entity)._pb)
            result.version = self.client.version_of(entity.key)
        if page.next_page_token is None:
            batch.more_results = query_pb2.QueryResultBatch.MoreResultsType.NO_MORE_RESULTS
        else:
            batch.more_results = query_pb2.QueryResultBatch.MoreResultsType.MORE_RESULTS_AFTER_LIMIT
            batch.end_cursor = page.next_page_token
        return datastore_pb2.RunQueryResponse.wrap(response)

    def _query_of(self, raw: Any) -> FakeQuery:
        """A raw query as the fake client's own: kind or ancestor, property filters."""
        filters = list(raw.filter.composite_filter.filters)
        if raw.filter.HasField("property_filter"):
            filters.append(raw.filter)
        ancestor = None
        bounds = []
        for f in filters:
            pf = f.property_filter
            if pf.op == query_pb2.PropertyFilter.Operator.HAS_ANCESTOR:
                ancestor = helpers.key_from_protobuf(pf.value.key_value)
                continue
            op = {3: ">", 4: ">=", 1: "<", 2: "<="}[pf.op]
            bounds.append(
                PropertyFilter(pf.property.name, op, helpers._get_value_from_value_pb(pf.value))
            )
        kind = raw.kind[0].name if raw.kind else None
        query = self.client.query(kind=kind, ancestor=ancestor)
        with self.client._lock:
            self.client.queries.append(query)
        for bound in bounds:
            query.add_filter(filter=bound)
        query.projection = [p.property.name for p in raw.projection]
        query.order = [
            ("-" if o.direction == o.Direction.DESCENDING else "") + o.property.name
            for o in raw.order
        ]
        return query


class FakeClient:
    """One kind's entities, in the order given, and the calls sweeper makes on them.

    Queries: by default every query pages through every stored entity in that order, its
    filters and order recorded and not applied (the tests of paging and of the engine page by
    position, not by value). With ``index`` a query with filters or an order reads the index as
    Datastore does: only entities whose property is set and indexed, in Datastore's order of
    values (ties by key). A cursor is the position after the last entity read; a page holds at
    most ``limit`` entities and at most ``batch`` when set, and one that reaches the end still
    carries a cursor, as the service's does, unless ``final_cursor`` is off. Deleted entities
    keep their place, so deletes never move a cursor, and are left out of every answer.

    Failures by the 1-based number of the call (``fetch_errors``, ``delete_errors``,
    ``commit_errors``) or on every call (``fetch_error_always``, ``delete_error_always``). A blind
    delete takes ``seconds_per_key`` for each key on ``clock``; one failed with DeadlineExceeded
    takes ``deadline_s`` and deletes nothing. A transaction reading more than ``group_limit``
    keys is refused at commit, as the legacy emulator refuses over 25 entity groups.
    """

    project, database, namespace = "p", None, None

    def __init__(
        self,
        stored: Sequence[datastore.Entity] = (),
        *,
        index: bool = False,
        clock: FakeClock | None = None,
        seconds_per_key: float = 0.001,
        deadline_s: float = 20.0,
        group_limit: int = 10_000,
    ) -> None:
        self.entities = list(stored)
        self.index = index
        self.clock = clock or FakeClock(now=0.0)  # the time its calls took, from 0
        self.seconds_per_key = seconds_per_key
        self.deadline_s = deadline_s
        self.group_limit = group_limit
        self._gone: set[datastore.Key] = set()
        # Datastore's version of each entity: 1 as stored, then that of the write that last
        # changed (or deleted) it; ``put`` and ``drop`` are someone else's writes.
        self._versions: dict[datastore.Key, int] = {}
        self._version = 1
        self.snapshot_versions = False
        self._lock = threading.Lock()  # ancestor queries come from several threads at once
        self._datastore_api = FakeApi(self)
        # queries
        self.batch: int | None = None  # the most results one call returns (None: the limit)
        self.final_cursor = True
        self.fetch_errors: dict[int, Exception] = {}
        self.fetch_error_always: Exception | None = None
        self.queries: list[FakeQuery] = []  # as sent: one a RunQuery call
        self.fetches = 0
        self.cursors: list[bytes | None] = []
        # entity groups
        self.children: dict[datastore.Key, list[datastore.Key]] = {}
        self.on_ancestor_query: Callable[[datastore.Key], None] = lambda _key: None
        # lookups
        self.on_lookup: Callable[[], None] = lambda: None  # e.g. someone else deletes
        # blind deletes
        self.delete_errors: dict[int, BaseException] = {}
        self.delete_error_always: BaseException | None = None
        self.delete_calls: list[list[datastore.Key]] = []
        self.deleted: list[datastore.Key] = []
        # transactions
        self.commit_errors: dict[int, Exception] = {}
        self.on_commit_error: Callable[[], None] = lambda: None  # e.g. the write that aborted it
        self.transactions: list[FakeTransaction] = []
        self._commits = 0
        # Datastore's "transaction or write too big": commits (and blind deletes) of more keys
        # than this are refused, whatever they are; and commits applied whose answer is lost.
        self.too_big_over: int | None = None
        self.lose_replies: set[int] = set()

    @property
    def keys(self) -> list[datastore.Key]:
        """Every stored key, deleted ones included, in order."""
        return [e.key for e in self.entities]

    @property
    def values(self) -> dict[datastore.Key, object]:
        """What is left: each key's ``PROP`` (``MISSING`` where it has none)."""
        return {e.key: e.get(PROP, MISSING) for e in self.entities if e.key not in self._gone}

    def put(self, key: datastore.Key, value: object) -> None:
        """Someone else writes ``PROP`` of a stored entity."""
        (entity,) = [e for e in self.entities if e.key == key]
        entity[PROP] = value
        self._written([key])

    def drop(self, key: datastore.Key) -> None:
        """Someone else deletes an entity."""
        self._gone.add(key)
        self._written([key])

    def version_of(self, key: datastore.Key) -> int:
        return self._versions.get(key, 1)

    def missing_version(self, key: datastore.Key) -> int:
        """What a lookup reports for a missing key: the version of the snapshot read (as the
        API documents, and the legacy emulator does) with ``snapshot_versions``, else that of
        the write that deleted it (as the Firestore emulator does; 0 if never written)."""
        if self.snapshot_versions:
            return self._version
        return self._versions.get(key, 0)

    def _written(self, keys: Sequence[datastore.Key]) -> int:
        with self._lock:
            self._version += 1
            for key in keys:
                self._versions[key] = self._version
            return self._version

    # --- queries -------------------------------------------------------------------------

    def query(self, *, kind: str | None = None, ancestor: datastore.Key | None = None) -> FakeQuery:
        assert (kind, ancestor is None) in ((KIND, True), (None, False))
        return FakeQuery(self, kind, ancestor)

    def aggregation_query(self, query: object) -> Any:
        """Like the legacy emulator: no aggregation queries, so counts page through keys."""
        raise api_error(gexc.MethodNotImplemented, "RunAggregationQuery")

    def _answer(self, query: FakeQuery) -> list[datastore.Entity]:
        if query.ancestor is not None:
            self.on_ancestor_query(query.ancestor)
            group = [query.ancestor, *self.children.get(query.ancestor, [])]
            stored = {e.key: e for e in self.entities}
            return [stored.get(key, datastore.Entity(key)) for key in group]
        if not (self.index and (query.filters or query.order)):
            return self.entities
        props = {f.property_name for f in query.filters} | {o.lstrip("-") for o in query.order}
        assert len(props) == 1, props
        (prop,) = props
        # Only entities with an indexed value are in the index.
        rows = [e for e in self.entities if prop in e and prop not in e.exclude_from_indexes]
        for f in query.filters:
            test = OPERATORS[f.operator]
            rows = [e for e in rows if test(index_order(e[prop]), index_order(f.value))]
        rows = sorted(rows, key=lambda e: index_order(e[prop]))  # stable: then by key
        if query.order == ["-" + prop]:
            rows.reverse()
        else:
            assert query.order in ([], [prop])
        return rows

    def page(self, query: FakeQuery, limit: int, cursor: bytes | None) -> FakePage:
        with self._lock:
            self.fetches += 1
            self.cursors.append(cursor)
            error = self.fetch_errors.pop(self.fetches, self.fetch_error_always)
        if error is not None:
            raise error
        rows = self._answer(query)
        end = 0 if cursor is None else int(cursor.decode())
        found: list[datastore.Entity] = []
        while end < len(rows) and len(found) < min(limit, self.batch or limit):
            if rows[end].key not in self._gone:
                found.append(rows[end])
            end += 1
        if query.projection:  # only the projected properties come back
            found = [project(e, query.projection) for e in found]
        done = end >= len(rows) and not self.final_cursor
        return FakePage(found, None if done else str(end).encode())

    # --- lookups -------------------------------------------------------------------------

    def get_multi(
        self,
        keys: Sequence[datastore.Key],
        *,
        transaction: FakeTransaction | None = None,
        retry: object,
        timeout: float,
    ) -> list[Any]:
        """Whole entities, with their values' true types."""
        self.on_lookup()
        if transaction is not None:
            assert transaction.began or transaction.begin_later
            transaction.began = True
            transaction.read.extend(keys)
        by_key = {e.key: e for e in self.entities if e.key not in self._gone}
        found = []
        for key in keys:
            if key in by_key:
                entity = datastore.Entity(key)
                entity.update(by_key[key])
                found.append(entity)
        return found

    # --- deletes -------------------------------------------------------------------------

    def delete_multi(self, keys: Sequence[datastore.Key], *, retry: object, timeout: float) -> None:
        self.delete_calls.append(list(keys))
        if self.too_big_over is not None and len(keys) > self.too_big_over:
            raise api_error(gexc.InvalidArgument, TOO_BIG)
        error = self.delete_errors.pop(len(self.delete_calls), self.delete_error_always)
        if isinstance(error, gexc.DeadlineExceeded):
            self.clock.now += self.deadline_s  # the call deadline: the keys were not deleted
        if error is not None:
            raise error
        self.clock.now += self.seconds_per_key * len(keys)
        self.deleted.extend(keys)
        self._gone.update(keys)

    def transaction(self, begin_later: bool = False) -> FakeTransaction:
        txn = FakeTransaction(self, begin_later)
        self.transactions.append(txn)
        return txn

    def commit(self, txn: FakeTransaction) -> int:
        self._commits += 1
        error = self.commit_errors.pop(self._commits, None)
        if error is not None:
            self.on_commit_error()
            raise error
        if len(set(txn.read) | set(txn.deletes)) > self.group_limit:
            raise api_error(gexc.InvalidArgument, TOO_MANY_GROUPS)
        if self.too_big_over is not None and len(txn.deletes) > self.too_big_over:
            raise api_error(gexc.InvalidArgument, TOO_BIG)
        changed = [
            k for k, v in txn.base_versions.items() if k in self._gone or self.version_of(k) != v
        ]
        if changed:
            raise api_error(
                gexc.FailedPrecondition,
                "the stored version does not match the required base version",
            )
        self.deleted.extend(txn.deletes)
        self._gone.update(txn.deletes)
        version = self._written(txn.deletes)
        if self._commits in self.lose_replies:  # applied, and the answer never came
            raise api_error(gexc.DeadlineExceeded, "Deadline Exceeded")
        return version
