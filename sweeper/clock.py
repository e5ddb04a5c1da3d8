"""Whose clock the cutoff comes from: the database's where it reports one, else the pod's.

The cutoff is "now minus grace", and every live session expiring between the true now and a
wrong one is deleted by a sweeper whose clock runs ahead: a pod a day ahead deletes every
session of the next day. A pod's clock can be wrong; the database's is what the runner's
writes were checked against. Firestore in Datastore mode (production, and the Firestore
emulator) reports its own time on every query result (``read_time`` on the result batch); the
legacy emulator reports none, and there the local clock is the only one.

The client library's query iterator drops ``read_time``, so sweeper sends one keys-only,
limit-1 query on the target's kind through the client's own API object, which returns the
whole response (one billed read).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from google.cloud import datastore
from google.cloud.datastore_v1.types import entity as entity_pb2

from sweeper.retry import NO_CLIENT_RETRY, Retrier

ClockSource = Literal["server", "local"]

# A skew beyond this is logged as a warning: NTP keeps healthy hosts within milliseconds.
SKEW_WARNING_S = 5.0


@dataclass(frozen=True)
class ClockReading:
    """The instant the cutoff is computed from, where it came from, and the local clock's error.

    ``skew_s`` is local minus server (positive: the pod's clock runs ahead); None when the
    database reports no time.
    """

    now: dt.datetime
    source: ClockSource
    skew_s: float | None


def read_clock(
    client: datastore.Client,
    retrier: Retrier,
    kind: str,
    local_now: Callable[[], dt.datetime],
) -> ClockReading:
    """The database's time where it reports one, else the local clock (and say so)."""

    def attempt() -> tuple[dt.datetime, dt.datetime | None, dt.datetime]:
        # Timed around the call that answered, not around its retries: a probe retried
        # through an outage would otherwise report the outage as skew.
        before = local_now()
        server = _read_time(client, kind, retrier.timeout)
        return before, server, local_now()

    before, server, after = retrier.call("query", attempt)
    if server is None:
        return ClockReading(after, "local", None)
    # The server's instant lies between the two local readings: compare with their midpoint.
    local = before + (after - before) / 2
    return ClockReading(server, "server", (local - server).total_seconds())


def _read_time(client: datastore.Client, kind: str, timeout: float) -> dt.datetime | None:
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
            "kind": [{"name": kind}],
            "limit": 1,
            "projection": [{"property": {"name": "__key__"}}],
        },
    }
    response = client._datastore_api.run_query(
        request=request, retry=NO_CLIENT_RETRY, timeout=timeout
    )
    if "read_time" not in response.batch:
        return None
    read_time: dt.datetime = response.batch.read_time
    return read_time if read_time.tzinfo else read_time.replace(tzinfo=dt.UTC)
