"""Seed sessions shaped like the eQ runner's: only ``expires_at`` indexed, big session data.

``Session``/``put_sessions`` write a generic expiry in any encoding (and datetimes for the
timestamps around it), for testing every encoding. The ``runner_*`` functions below write the
runner's three kinds property for property, as its storage layer does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from google.cloud import datastore

from sweeper.encodings import Encoding, QueryValue

# Every property but the expiry is excluded from indexes, as the runner writes them.
UNINDEXED = ("eq_session_id", "user_id", "session_data", "created_at", "updated_at")

Expiry = object  # whatever goes in expires_at: int, datetime, None, or a missing marker
MISSING = object()


def encode(instant: dt.datetime, encoding: Encoding) -> QueryValue:
    """``instant`` as ``encoding`` stores it (cut to its unit, as writers round down)."""
    return encoding.store(instant)


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
    """The names of every entity left in ``kind``: keys-only pages of 1,000 from the cursor.

    An explicit limit: the Firestore emulator answers an unbounded query in one response and
    fails past 4 MiB (~30,000 keys).
    """
    found: set[str] = set()
    cursor: bytes | None = None
    while True:
        query = client.query(kind=kind)
        query.keys_only()
        page = query.fetch(limit=1000, start_cursor=cursor)
        batch = [entity.key.name for entity in page]
        found.update(batch)
        cursor = page.next_page_token
        if not batch or cursor is None:
            return found


def sessions(prefix: str, expiries: Sequence[Expiry]) -> list[Session]:
    return [Session(f"{prefix}-{i}", expiry) for i, expiry in enumerate(expiries)]


# --- Entities exactly as the eQ questionnaire runner writes them ------------------------------
#
# Shape taken from the runner's public repository, ONSdigital/eq-questionnaire-runner
# (app/data_models/app_models.py, app/storage/storage.py, app/storage/datastore.py). Its
# Datastore handler serialises a model with marshmallow and puts one entity keyed by
# (table name, key field value), excluding from indexes every serialised property not in the
# model's index fields. The marshmallow fields decide the stored types:
#   - its ``Timestamp`` field (every expiry, and ``submitted_at``): ``int`` epoch seconds,
#     truncated, and ``None`` (a stored null) when the value is unset;
#   - ``fields.DateTime`` (``created_at``, ``updated_at``): ISO-8601 *strings*, not timestamps;
#   - ``fields.Str`` / ``fields.Integer``: ``str`` (or ``None``) / ``int``.
# The sweeper's own shipped config must match these types, so tests seed with these functions
# rather than with the generic ``Session`` above (which stores datetimes for created_at).

EQ_SESSION_INDEXED = ("expires_at",)
QUESTIONNAIRE_STATE_INDEXED = ("collection_exercise_sid", "submitted_at", "expires_at")
# The runner lists no index fields for this model, so even its expiry is unindexed.
USED_JTI_CLAIM_INDEXED: tuple[str, ...] = ()
# What the runner's QuestionnaireStore writes as ``version``.
QUESTIONNAIRE_STATE_VERSION = 1


def runner_epoch_seconds(instant: dt.datetime | None) -> int | None:
    """What the runner's ``Timestamp`` field stores: whole epoch seconds, or None when unset.

    The runner reads the datetime's wall clock as UTC (it relabels the zone rather than
    converting), so a naive datetime is taken as UTC here too; the runner only ever passes UTC.
    """
    if instant is None:
        return None
    return int(instant.replace(tzinfo=dt.UTC).timestamp())


def runner_iso(instant: dt.datetime) -> str:
    """What ``marshmallow.fields.DateTime`` stores by default: ``datetime.isoformat()``."""
    return instant.isoformat()


def runner_entity(
    client: datastore.Client,
    kind: str,
    name: str,
    properties: Mapping[str, object],
    indexed: Sequence[str],
) -> datastore.Entity:
    """One entity as the runner's Datastore handler puts it: key (kind, key field value), and
    every property the model serialises, null ones included, excluded from indexes unless it is
    one of the model's index fields."""
    entity = datastore.Entity(
        client.key(kind, name),
        exclude_from_indexes=tuple(p for p in properties if p not in indexed),
    )
    entity.update(properties)
    return entity


def runner_eq_session(
    client: datastore.Client,
    kind: str,
    eq_session_id: str,
    expires_at: dt.datetime | None,
    *,
    user_id: str | None = None,
    session_data: str = "",
    created_at: dt.datetime | None = None,
    updated_at: dt.datetime | None = None,
) -> datastore.Entity:
    """An ``eq-session`` entity: keyed by ``eq_session_id``, only ``expires_at`` indexed.

    The runner's own model always has an expiry; ``expires_at=None`` writes the null its
    ``Timestamp`` field would store for a missing one, to prove such rows are never swept.
    """
    now = dt.datetime.now(dt.UTC)
    return runner_entity(
        client,
        kind,
        eq_session_id,
        {
            "eq_session_id": eq_session_id,
            "user_id": user_id,
            "session_data": session_data,
            "created_at": runner_iso(created_at or now),
            "updated_at": runner_iso(updated_at or now),
            "expires_at": runner_epoch_seconds(expires_at),
        },
        EQ_SESSION_INDEXED,
    )


def runner_questionnaire_state(
    client: datastore.Client,
    kind: str,
    user_id: str,
    *,
    expires_at: dt.datetime | None,
    submitted_at: dt.datetime | None = None,
    state_data: str = "",
    collection_exercise_sid: str = "",
    version: int = QUESTIONNAIRE_STATE_VERSION,
    created_at: dt.datetime | None = None,
    updated_at: dt.datetime | None = None,
) -> datastore.Entity:
    """A ``questionnaire-state`` entity: keyed by ``user_id``; ``collection_exercise_sid``,
    ``submitted_at`` and ``expires_at`` indexed. ``submitted_at`` is null until submission,
    then int epoch seconds, exactly like ``expires_at``."""
    now = dt.datetime.now(dt.UTC)
    return runner_entity(
        client,
        kind,
        user_id,
        {
            "user_id": user_id,
            "state_data": state_data,
            "collection_exercise_sid": collection_exercise_sid,
            "version": version,
            "created_at": runner_iso(created_at or now),
            "updated_at": runner_iso(updated_at or now),
            "submitted_at": runner_epoch_seconds(submitted_at),
            "expires_at": runner_epoch_seconds(expires_at),
        },
        QUESTIONNAIRE_STATE_INDEXED,
    )


def runner_used_jti_claim(
    client: datastore.Client, kind: str, jti_claim: str, expires_at: dt.datetime
) -> datastore.Entity:
    """A ``used-jti-claim`` entity as the Datastore handler would write it: keyed by
    ``jti_claim``, with *nothing* indexed, so a range query never sees its ``expires_at``.

    (The runner keeps used JTI claims in Redis, with a TTL; the Datastore kind only exists
    where an older or customised deployment wrote it there.)"""
    return runner_entity(
        client,
        kind,
        jti_claim,
        {"jti_claim": jti_claim, "expires_at": runner_epoch_seconds(expires_at)},
        USED_JTI_CLAIM_INDEXED,
    )


def put_entities(client: datastore.Client, entities: Iterable[datastore.Entity]) -> int:
    """Write entities in commits of 500 (Datastore's limit); returns how many were written."""
    batch: list[datastore.Entity] = []
    written = 0
    for entity in entities:
        batch.append(entity)
        if len(batch) == 500:
            written += _put(client, batch)
    return written + _put(client, batch)
