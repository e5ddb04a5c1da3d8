"""Seed sessions shaped like the eQ runner's: only ``expires_at`` indexed, big session data."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.cloud import datastore

from sweeper.encodings import EPOCH, Encoding

# Every property but the expiry is excluded from indexes, as the runner writes them.
UNINDEXED = ("eq_session_id", "user_id", "session_data", "created_at", "updated_at")

Expiry = object  # whatever goes in expires_at: int, datetime, None, or a missing marker
MISSING = object()


def encode(instant: dt.datetime, encoding: Encoding) -> int | dt.datetime:
    if encoding is Encoding.TIMESTAMP:
        return instant
    micros = (instant - EPOCH) // dt.timedelta(microseconds=1)
    return micros // encoding.unit_us


@dataclass(frozen=True)
class Session:
    name: str
    expiry: Expiry  # a stored value, None, or MISSING


def session_entity(
    client: datastore.Client,
    kind: str,
    session: Session,
    prop: str = "expires_at",
    data_bytes: int = 64,
) -> datastore.Entity:
    entity = datastore.Entity(client.key(kind, session.name), exclude_from_indexes=UNINDEXED)
    now = dt.datetime.now(dt.UTC)
    entity.update(
        {
            "eq_session_id": session.name,
            "user_id": "user-" + session.name,
            "session_data": "x" * data_bytes,
            "created_at": now,
            "updated_at": now,
        }
    )
    if session.expiry is not MISSING:
        entity[prop] = session.expiry
    return entity


def put_sessions(
    client: datastore.Client,
    kind: str,
    sessions: Iterable[Session],
    prop: str = "expires_at",
    data_bytes: int = 64,
) -> int:
    """Write sessions in commits of 500 (Datastore's limit); returns how many were written."""
    batch: list[datastore.Entity] = []
    written = 0
    for session in sessions:
        batch.append(session_entity(client, kind, session, prop, data_bytes))
        if len(batch) == 500:
            written += _put(client, batch)
    return written + _put(client, batch)


def _put(client: datastore.Client, batch: list[datastore.Entity]) -> int:
    count = len(batch)
    if batch:
        client.put_multi(batch)
        batch.clear()
    return count


def names(client: datastore.Client, kind: str) -> set[str]:
    """The names of every entity left in ``kind`` (keys-only, paged by the client)."""
    query = client.query(kind=kind)
    query.keys_only()
    return {entity.key.name for entity in query.fetch()}


def sessions(prefix: str, expiries: Sequence[Expiry]) -> list[Session]:
    return [Session(f"{prefix}-{i}", expiry) for i, expiry in enumerate(expiries)]
