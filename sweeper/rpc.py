"""The four calls the gate makes, sent through the client's API object with raw protobuf keys.

``sweeper.gate`` checks and deletes each batch with ``begin``, ``lookup`` and ``commit`` (and
``rollback`` when it gives up on a transaction). The client's own ``get_multi`` and
``Transaction`` would do the same calls, but turn every key into a protobuf message through
proto-plus (about 80 µs a key) and every looked-up entity into an ``Entity``; at 500 keys a
commit that is most of a sweep's CPU time, and on a 2-core machine the database's CPU time is
what it takes from. Here a key is built straight into the protobuf (``key_pb``), and a lookup
asks for only the one property the rule compares (a property mask, ``mask_for``: Firestore in
Datastore mode sends 47 KB instead of 408 KB for 500 sessions of 700 bytes; the legacy
emulator ignores the mask and sends whole entities, of which only that property is read).

None of these calls retries by itself: the caller's ``Retrier`` decides (``NO_CLIENT_RETRY``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from google.cloud import datastore
from google.cloud.datastore.helpers import _get_value_from_value_pb
from google.cloud.datastore_v1.types import datastore as datastore_pb2
from google.cloud.datastore_v1.types import entity as entity_pb2

from sweeper.retry import NO_CLIENT_RETRY, TRANSIENT

# A rollback lost to a bad network is sent again this many times (it is idempotent).
ROLLBACK_ATTEMPTS = 3

Path = tuple[Any, ...]  # a key's flat_path: ("Kind", "name" or id, ...)

_RawKey = entity_pb2.Key.pb()
_TRANSACTIONAL = datastore_pb2.CommitRequest.Mode.TRANSACTIONAL
_NON_TRANSACTIONAL = datastore_pb2.CommitRequest.Mode.NON_TRANSACTIONAL


def key_pb(key: datastore.Key) -> Any:
    """``key`` as a raw protobuf ``Key``: what ``key.to_protobuf()`` builds, about 13x faster."""
    return _fill(_RawKey(), key)


def _fill(pb: Any, key: datastore.Key) -> Any:
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


def lookup(
    client: datastore.Client,
    transaction: bytes | None,
    keys: Sequence[datastore.Key],
    prop: str,
    timeout: float,
) -> dict[Path, object]:
    """The value of ``prop`` (None when the entity lacks it) of every key that has an entity,
    read in ``transaction``; keys without one are left out. Deferred keys are asked again."""
    found: dict[Path, object] = {}
    todo = [key_pb(key) for key in keys]
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
            properties = result.entity.properties
            value = _get_value_from_value_pb(properties[prop]) if prop in properties else None
            found[path_of(result.entity.key)] = value
        todo = list(pb.deferred)
    return found


def mask_for(prop: str) -> str | None:
    """The property mask path naming ``prop`` alone, or None where no path is sure to.

    A plain identifier is the same path everywhere. In a path a dot names a property inside
    an entity value, so ``exp.at`` unmasked would return no property at all and every session
    would read as carrying no expiry; the API says such names "must be escaped" but not how,
    and the two emulators read backtick quoting differently. Those few names are read from the
    whole entity instead.
    """
    return prop if _IDENTIFIER.fullmatch(prop) else None


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def commit(
    client: datastore.Client,
    transaction: bytes | None,
    keys: Sequence[datastore.Key],
    timeout: float,
) -> None:
    """Delete ``keys``: in ``transaction``, or (None) as one plain, non-transactional commit."""
    raw = _request(client, datastore_pb2.CommitRequest)
    if transaction is None:
        raw.mode = _NON_TRANSACTIONAL
    else:
        raw.mode = _TRANSACTIONAL
        raw.transaction = transaction
    for key in keys:
        _fill(raw.mutations.add().delete, key)
    _send(client, "commit", datastore_pb2.CommitRequest, raw, timeout)


def rollback(client: datastore.Client, transaction: bytes, timeout: float) -> None:
    raw = _request(client, datastore_pb2.RollbackRequest)
    raw.transaction = transaction
    _send(client, "rollback", datastore_pb2.RollbackRequest, raw, timeout)


def end_transaction(client: datastore.Client, transaction: bytes, timeout: float) -> None:
    """Best effort (never mask the real error), and a few times.

    On Firestore in Datastore mode the keys a transaction read stay locked until it ends or
    about a minute passes: the runner's writes to them would wait, and so would our own retry.
    A rollback that fails on a bad network is sent again.
    """
    for _attempt in range(ROLLBACK_ATTEMPTS):
        try:
            rollback(client, transaction, timeout)
        except Exception as exc:
            if not isinstance(exc, TRANSIENT):
                return
            continue
        return


def _request(client: datastore.Client, kind: Any) -> Any:
    """A raw ``kind`` request for the client's project and database."""
    raw = kind.pb()(project_id=client.project)
    if client.database:
        raw.database_id = client.database
    return raw


def _send(client: datastore.Client, name: str, kind: Any, raw: Any, timeout: float) -> Any:
    """The API object's ``name`` call with ``raw`` wrapped (not copied) as its ``kind``."""
    call = getattr(client._datastore_api, name)
    return call(request=kind.wrap(raw), retry=NO_CLIENT_RETRY, timeout=timeout)
