"""The four calls the gate makes, sent through the client's API object with raw protobuf keys.

The client's ``get_multi`` and ``Transaction`` would make the same calls, but turn every key
into a protobuf message through proto-plus (about 80 µs a key) and every looked-up entity into
an ``Entity``: at 500 keys a commit, most of a sweep's CPU time (taken from the database's on a
2-core machine). Here a key is built straight into the protobuf (``_fill``), and reads ask for
only the property the rule compares (``mask_for``: Firestore in Datastore mode sends 47 KB
instead of 408 KB for 500 sessions of 700 bytes; the legacy emulator ignores the mask).
None of these calls retries by itself: the caller's ``Retrier`` decides (``NO_CLIENT_RETRY``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from google.cloud import datastore
from google.cloud.datastore.helpers import _get_value_from_value_pb, key_from_protobuf
from google.cloud.datastore.query import PropertyFilter, _pb_from_query
from google.cloud.datastore_v1.types import datastore as datastore_pb2
from google.cloud.datastore_v1.types import entity as entity_pb2
from google.cloud.datastore_v1.types import query as query_pb2

from sweeper.encodings import QueryValue
from sweeper.retry import NO_CLIENT_RETRY, TRANSIENT

# A rollback lost to a bad network is sent again this many times (it is idempotent).
ROLLBACK_ATTEMPTS = 3

Path = tuple[Any, ...]  # a key's flat_path: ("Kind", "name" or id, ...)

_RawKey = entity_pb2.Key.pb()
_TRANSACTIONAL = datastore_pb2.CommitRequest.Mode.TRANSACTIONAL
_NON_TRANSACTIONAL = datastore_pb2.CommitRequest.Mode.NON_TRANSACTIONAL
_FAIL = datastore_pb2.Mutation.ConflictResolutionStrategy.FAIL
_NO_MORE_RESULTS = query_pb2.QueryResultBatch.MoreResultsType.NO_MORE_RESULTS


class Seen(NamedTuple):
    """An entity as a read saw it: key, ``version`` (Datastore's, changed by every write to the
    entity, re-creation included) and the rule's property (None when absent). A delete at
    ``version`` goes only if nothing has written the entity since this read (``commit``)."""

    key: datastore.Key
    version: int
    value: object


class Page(NamedTuple):
    """One RunQuery answer: what it saw, the cursor after it (None: no more results), the
    encoded size of its largest entity (a scan sizes its next page by it), and the database's
    time of the read (None where it reports none: the legacy emulator)."""

    seen: list[Seen]
    cursor: bytes | None
    largest: int
    read_time: dt.datetime | None


# -- the queries: what a read asks for, and how many a count found ------------------------------

Bound = tuple[str, QueryValue | None]
CountMethod = Literal["aggregation", "keys_only_bounded", "scan", "empty_range"]


@dataclass(frozen=True)
class RangeQuery:
    """Keys of ``kind`` whose ``prop`` meets every bound, e.g. ``((">=", lo), ("<", hi))`` (no
    bounds: every key of the kind). ``keys_only`` off returns whole entities (a billed read
    each); ``projected``, each key with its indexed value of ``prop`` (a projection)."""

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


def _fill(pb: Any, key: datastore.Key) -> Any:
    """``pb``, a raw protobuf ``Key``, as ``key.to_protobuf()`` builds it, about 13x faster."""
    pb.partition_id.project_id = key.project or ""
    if key.database:
        pb.partition_id.database_id = key.database
    if key.namespace:
        pb.partition_id.namespace_id = key.namespace
    path = key.flat_path
    for i in range(0, len(path), 2):
        element = pb.path.add()
        element.kind = path[i]
        if i + 1 < len(path):
            if isinstance(path[i + 1], str):
                element.name = path[i + 1]
            else:
                element.id = path[i + 1]
    return pb


def path_of(pb: Any) -> Path:
    """The flat path of a raw protobuf key, as ``Key.flat_path`` spells it."""
    out: list[Any] = []
    for element in pb.path:
        out.append(element.kind)
        out.append(element.name if element.WhichOneof("id_type") == "name" else element.id)
    return tuple(out)


def begin(client: datastore.Client, timeout: float) -> bytes:
    """A new read-write transaction's id."""
    kind = datastore_pb2.BeginTransactionRequest
    response = _send(client, "begin_transaction", kind, _request(client, kind), timeout)
    return bytes(response.transaction)


def run_query(
    client: datastore.Client,
    query: datastore.Query,
    prop: str,
    limit: int,
    *,
    cursor: bytes | None,
    timeout: float,
) -> Page:
    """One RunQuery call of ``query``: each result's version and ``prop`` (the mask keeps a
    query of whole entities, which Datastore reports versions for, about as small as a
    projection; keys-only and projection queries take no mask). Only the first batch the
    server answers is taken: a retried page repeats one call."""
    raw = _request(client, datastore_pb2.RunQueryRequest)
    raw.partition_id.project_id = client.project
    if client.database:
        raw.partition_id.database_id = client.database
    if query.namespace:
        raw.partition_id.namespace_id = query.namespace
    raw.query.CopyFrom(query_pb2.Query.pb(_pb_from_query(query)))
    raw.query.limit.value = limit
    if cursor is not None:
        raw.query.start_cursor = cursor
    mask = None if query.projection else mask_for(prop)
    if mask is not None:
        raw.property_mask.paths.append(mask)
    response = _send(client, "run_query", datastore_pb2.RunQueryRequest, raw, timeout)
    batch = datastore_pb2.RunQueryResponse.pb(response).batch
    seen, largest = [], 0
    for result in batch.entity_results:
        seen.append(_seen(result.entity, result.version, prop))
        largest = max(largest, result.entity.ByteSize())
    more = batch.more_results != _NO_MORE_RESULTS and bool(batch.entity_results)
    read_time = batch.read_time.ToDatetime(dt.UTC) if batch.HasField("read_time") else None
    return Page(seen, bytes(batch.end_cursor) if more else None, largest, read_time)


class Looked(NamedTuple):
    """A lookup's answer: what it saw of each key that has an entity, and the version the
    database reports for each key that has none. Firestore in Datastore mode reports the
    version of the write that deleted it (every key one commit deleted has that commit's
    version); the legacy emulator reports its current version, the same for every key."""

    found: dict[Path, Seen]
    missing: dict[Path, int]


def lookup(
    client: datastore.Client,
    transaction: bytes | None,
    keys: Sequence[datastore.Key],
    prop: str,
    timeout: float,
) -> Looked:
    """What a lookup in ``transaction`` (None: none) sees of ``keys``. Deferred keys are
    asked again."""
    found: dict[Path, Seen] = {}
    missing: dict[Path, int] = {}
    todo = [_fill(_RawKey(), key) for key in keys]
    mask = mask_for(prop)
    while todo:
        raw = _request(client, datastore_pb2.LookupRequest)
        raw.keys.extend(todo)
        if mask is not None:
            raw.property_mask.paths.append(mask)
        if transaction is not None:
            raw.read_options.transaction = transaction
        response = _send(client, "lookup", datastore_pb2.LookupRequest, raw, timeout)
        pb = datastore_pb2.LookupResponse.pb(response)
        for result in pb.found:
            seen = _seen(result.entity, result.version, prop)
            found[seen.key.flat_path] = seen
        for result in pb.missing:
            missing[path_of(result.entity.key)] = result.version
        todo = list(pb.deferred)
    return Looked(found, missing)


def _seen(entity: Any, version: int, prop: str) -> Seen:
    properties = entity.properties
    value = _get_value_from_value_pb(properties[prop]) if prop in properties else None
    return Seen(key_from_protobuf(entity.key), version, value)


def mask_for(prop: str) -> str | None:
    """The property mask path naming ``prop`` alone, or None where no path is sure to (those
    names are read from the whole entity). In a path a dot names a property inside an entity
    value, so ``exp.at`` as a path would return no property and every session would read as
    carrying no expiry; the API says such names "must be escaped" but not how, and the two
    emulators read backtick quoting differently."""
    return prop if _IDENTIFIER.fullmatch(prop) else None


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def commit(
    client: datastore.Client,
    transaction: bytes | None,
    deletes: Sequence[tuple[datastore.Key, int | None]],
    timeout: float,
    *,
    atomic: bool = True,
) -> int | None:
    """Delete each key at its version, all or nothing; the version the commit wrote (None
    where the database reports none that tells commits apart).

    A versioned delete carries ``base_version`` with the FAIL strategy: if the entity was
    written since (re-saved, re-created, deleted), Datastore refuses the commit with
    FAILED_PRECONDITION. FAIL is the one strategy both emulators honour alike (with the
    default, the Firestore emulator deleted changed entities anyway), and only a transactional
    commit is all or nothing (both apply a refused plain commit's deletes up to the changed
    one): so the commit runs in ``transaction`` or a single-use one (one round trip, no lock
    held before it). ``atomic`` off (``--no-verify``, versions None) sends one plain commit.
    """
    raw = _request(client, datastore_pb2.CommitRequest)
    raw.mode = _TRANSACTIONAL if transaction is not None or atomic else _NON_TRANSACTIONAL
    if transaction is not None:
        raw.transaction = transaction
    elif atomic:
        raw.single_use_transaction.read_write.SetInParent()
    for key, version in deletes:
        mutation = raw.mutations.add()
        _fill(mutation.delete, key)
        if version is not None:
            mutation.base_version = version
            mutation.conflict_resolution_strategy = _FAIL
    response = _send(client, "commit", datastore_pb2.CommitRequest, raw, timeout)
    results = datastore_pb2.CommitResponse.pb(response).mutation_results
    return int(results[0].version) if results and results[0].version else None


def end_transaction(client: datastore.Client, transaction: bytes, timeout: float) -> None:
    """Roll ``transaction`` back, best effort (never mask the real error). On Firestore in
    Datastore mode the keys a transaction read stay locked until it ends or about a minute
    passes: the runner's writes to them would wait, and so would our own retry."""
    raw = _request(client, datastore_pb2.RollbackRequest)
    raw.transaction = transaction
    for _attempt in range(ROLLBACK_ATTEMPTS):
        try:
            _send(client, "rollback", datastore_pb2.RollbackRequest, raw, timeout)
        except TRANSIENT:
            continue
        except Exception:
            return
        return


def _request(client: datastore.Client, kind: Any) -> Any:
    raw = kind.pb()(project_id=client.project)
    if client.database:
        raw.database_id = client.database
    return raw


def _send(client: datastore.Client, name: str, kind: Any, raw: Any, timeout: float) -> Any:
    """The API object's ``name`` call with ``raw`` wrapped (not copied) as its ``kind``."""
    call = getattr(client._datastore_api, name)
    return call(request=kind.wrap(raw), retry=NO_CLIENT_RETRY, timeout=timeout)
