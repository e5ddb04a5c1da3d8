"""``sweeper inspect``: what a sweep of one target would meet and do, deleting nothing.

Before a first run an operator needs more than ``--dry-run`` tells: which encodings the property
really holds (only a lookup shows a value's true type), whether it is indexed at all (a range
query cannot see an unindexed value), what ``--format auto`` would decide, and how large the
backlog is. It costs a few keys-only queries, one COUNT (a bounded key count where the database
has no aggregation queries) and ``sample_size + 1`` entity reads, all under the sweep's retries.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.detect import check_indexed, detect_encoding
from sweeper.encodings import (
    Encoding,
    ExpiredRange,
    QueryValue,
    classify,
    describe_value,
    expired_range,
    from_micros,
)
from sweeper.errors import DatastoreError, RefusedError, UsageError, describe_exception
from sweeper.query import PAGE_SIZE, Bound, RangeQuery, fetch_keys, key_pages, lookup
from sweeper.retry import (
    NO_CLIENT_RETRY,
    TRANSIENT,
    Retrier,
    RetryCounter,
    RetryPolicy,
)
from sweeper.settings import SweepSettings

Indexed = Literal["yes", "no", "unknown"]
Action = Literal["sweep", "scan", "refuse", "nothing"]
CountMethod = Literal["aggregation", "keys_only_bounded", "empty_range"]

# Sample buckets in the order shown; encodings keep their --format spelling here.
BUCKETS = (*(e.value for e in Encoding), "null", "missing", "unsupported")
MAX_EXAMPLES = 3
# Datastore refuses a lookup of more than 1000 keys.
LOOKUP_CHUNK = 500
_ALIAS = "n"


@dataclass(frozen=True)
class Sample:
    """How the first ``asked`` keys of the kind store the property (key order, not random)."""

    asked: int
    counts: Mapping[str, int]
    unsupported_examples: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return sum(self.counts.values())

    @property
    def non_null(self) -> int:
        return self.size - self.counts.get("null", 0) - self.counts.get("missing", 0)


@dataclass(frozen=True)
class ExpiredCount:
    """Entities past the cutoff; ``limit`` is the bound of a keys-only count, if one was used."""

    n: int
    method: CountMethod
    limit: int | None = None

    @property
    def lower_bound(self) -> bool:
        return self.limit is not None and self.n >= self.limit


@dataclass(frozen=True)
class Oldest:
    """The smallest stored value of the encoding, and the instant it denotes."""

    value: QueryValue
    instant: dt.datetime


@dataclass(frozen=True)
class InspectReport:
    """Everything ``inspect`` found for one target; :meth:`as_dict` is its JSON contract."""

    kind: str
    prop: str
    namespace: str | None
    database: str | None
    format_asked: str
    grace: dt.timedelta
    now: dt.datetime
    cutoff: dt.datetime
    sample: Sample
    indexed: Indexed
    action: Action
    encoding: Encoding | None = None
    refusal: str | None = None
    bounds: tuple[QueryValue, QueryValue] | None = None
    expired: ExpiredCount | None = None
    oldest: Oldest | None = None

    def as_dict(self) -> dict[str, Any]:
        lower, upper = self.bounds or (None, None)
        expired, oldest = self.expired, self.oldest
        return {
            "kind": self.kind,
            "namespace": self.namespace,
            "database": self.database,
            "property": self.prop,
            "format_asked": self.format_asked,
            "grace_s": self.grace.total_seconds(),
            "now": iso(self.now),
            "cutoff": iso(self.cutoff),
            "sample_size": self.sample.asked,
            "sampled": self.sample.size,
            "sample_counts": {k.replace("-", "_"): v for k, v in self.sample.counts.items()},
            "unsupported_examples": list(self.sample.unsupported_examples),
            "indexed": self.indexed,
            "action": self.action,
            "format": self.encoding.value if self.encoding else None,
            "refusal": self.refusal,
            "range_lower": json_value(lower),
            "range_upper": json_value(upper),
            "expired_count": expired.n if expired else None,
            "expired_count_is_lower_bound": bool(expired and expired.lower_bound),
            "count_method": expired.method if expired else None,
            "count_limit": expired.limit if expired else None,
            "oldest_value": json_value(oldest.value) if oldest else None,
            "oldest_expiry": iso(oldest.instant) if oldest else None,
            "sweep_would": sweep_would(self),
        }


def inspect_target(
    settings: SweepSettings,
    client: datastore.Client,
    now: dt.datetime,
    *,
    sample_size: int = 200,
    count_limit: int = 100_000,
    retrier: Retrier | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> InspectReport:
    """Inspect one target; a Datastore failure becomes one :class:`DatastoreError` line.

    ``now`` (timezone-aware) is the caller's, so the cutoff is reproducible, as in a sweep.
    """
    if sample_size < 1 or count_limit < 1:
        raise UsageError("sample size and count limit must be at least 1")
    retrier = retrier or Retrier(RetryPolicy(), RetryCounter(), sleep)
    reader = _Reader(client, retrier, settings.kind, settings.prop)
    try:
        return _inspect(settings, reader, now, sample_size, count_limit)
    except (gexc.GoogleAPIError, *TRANSIENT) as exc:
        raise DatastoreError(f"Datastore call failed: {describe_exception(exc)}") from exc


def _inspect(
    s: SweepSettings, reader: _Reader, now: dt.datetime, sample_size: int, count_limit: int
) -> InspectReport:
    cutoff = now - s.grace
    sample = reader.sample(sample_size)
    probe = reader.keys((">", None))  # detection's first probe: is any value indexed?
    indexed: Indexed = "yes" if probe else "no" if sample.non_null else "unknown"
    action, encoding, refusal = _decide(s, reader)
    window = expired_range(encoding, cutoff) if encoding else None
    expired = reader.count(window, count_limit) if window else None
    if action == "sweep" and s.format != "auto" and expired and expired.n == 0:
        refusal = _unindexed_refusal(s, reader)
        action = "refuse" if refusal else action
    return InspectReport(
        kind=s.kind,
        prop=s.prop,
        namespace=reader.client.namespace or None,  # the client's: what was queried
        database=reader.client.database or None,
        format_asked=s.format_label,
        grace=s.grace,
        now=now,
        cutoff=cutoff,
        sample=sample,
        indexed=indexed,
        action=action,
        encoding=encoding,
        refusal=refusal,
        bounds=window.values() if window else None,
        expired=expired,
        oldest=reader.oldest(encoding) if encoding else None,
    )


def _decide(s: SweepSettings, reader: _Reader) -> tuple[Action, Encoding | None, str | None]:
    """What ``sweep`` would decide, by the very code it runs (``detect_encoding``)."""
    if isinstance(s.format, Encoding):
        return ("scan" if s.scan else "sweep"), s.format, None
    try:
        encoding = detect_encoding(reader.client, reader.retrier, s.kind, s.prop)
    except RefusedError as exc:
        return "refuse", None, exc.message
    # detect_encoding has already refused values that no index holds.
    return ("sweep", encoding, None) if encoding else ("nothing", None, None)


def _unindexed_refusal(s: SweepSettings, reader: _Reader) -> str | None:
    """The sweep's own check when its range finds nothing: are the values merely unindexed?"""
    try:
        check_indexed(reader.client, reader.retrier, s.kind, s.prop)
    except RefusedError as exc:
        return exc.message
    return None


class _Reader:
    """The target's queries and lookups, every one through the sweep's retry policy."""

    def __init__(self, client: datastore.Client, retrier: Retrier, kind: str, prop: str) -> None:
        self.client, self.retrier, self.kind, self.prop = client, retrier, kind, prop

    def keys(self, *bounds: Bound, limit: int = 1) -> list[datastore.Key]:
        query = RangeQuery(self.kind, self.prop, bounds)
        return fetch_keys(self.client, self.retrier, query, limit)

    def entities(self, keys: list[datastore.Key]) -> Iterator[datastore.Entity]:
        for start in range(0, len(keys), LOOKUP_CHUNK):
            yield from lookup(self.client, self.retrier, keys[start : start + LOOKUP_CHUNK])

    def sample(self, size: int) -> Sample:
        """The first ``size`` entities by the *true* type of their value: only a lookup shows it."""
        counts = dict.fromkeys(BUCKETS, 0)
        examples: list[str] = []
        for entity in self.entities(self.keys(limit=size)):
            bucket = _bucket(entity, self.prop)
            counts[bucket] += 1
            if bucket == "unsupported" and len(examples) < MAX_EXAMPLES:
                text = describe_value(entity[self.prop])
                examples += [] if text in examples else [text]
        return Sample(size, counts, tuple(examples))

    def count(self, window: ExpiredRange, limit: int) -> ExpiredCount:
        """One COUNT where the database has aggregation queries; a bounded key count otherwise.

        The legacy emulator answers RunAggregationQuery with 501 ``MethodNotImplemented``, a
        permanent error, so the retrier raises it at once and the key count takes over.
        """
        if window.empty:
            return ExpiredCount(0, "empty_range")
        lo, hi = window.values()
        query = RangeQuery(self.kind, self.prop, ((">=", lo), ("<", hi)))
        try:
            n = self.retrier.call("query", lambda: self._aggregate(query))
            return ExpiredCount(n, "aggregation")
        except gexc.MethodNotImplemented:
            pass
        counted = 0
        for page in key_pages(self.client, self.retrier, query, page_size=min(PAGE_SIZE, limit)):
            counted += len(page)
            if counted >= limit:
                break
        return ExpiredCount(min(counted, limit), "keys_only_bounded", limit)

    def _aggregate(self, query: RangeQuery) -> int:
        aggregation = self.client.aggregation_query(query.build(self.client)).count(alias=_ALIAS)
        rows = aggregation.fetch(retry=NO_CLIENT_RETRY, timeout=self.retrier.timeout)
        # A count of zero arrives as 0.0: the client reads ``integer_value or double_value``.
        return next(int(r.value) for row in rows for r in row if r.alias == _ALIAS)

    def oldest(self, encoding: Encoding) -> Oldest | None:
        """The smallest value in the encoding's whole band: how far behind sweeping is."""
        lo, hi = ExpiredRange(encoding, encoding.band.lo, encoding.band.hi).values()
        found = [e.get(self.prop) for e in self.entities(self.keys((">=", lo), ("<", hi)))]
        value = found[0] if found else None  # none stored, or gone before the lookup
        if isinstance(value, dt.datetime):
            return Oldest(value, value if value.tzinfo else value.replace(tzinfo=dt.UTC))
        if isinstance(value, int) and not isinstance(value, bool):
            return Oldest(value, from_micros(value * encoding.unit_us))
        return None


def _bucket(entity: datastore.Entity, prop: str) -> str:
    if prop not in entity:
        return "missing"
    if entity[prop] is None:
        return "null"
    encoding = classify(entity[prop])
    return encoding.value if encoding else "unsupported"


def sweep_would(report: InspectReport) -> str:
    """One line an operator can act on: what ``sweep`` with these settings would do now."""
    r = report
    note = "" if r.indexed != "no" else f"; {r.prop} looks unindexed: a scan would be needed"
    if r.action == "refuse":
        return f"refuse: {r.refusal}"
    if r.encoding is None:
        return f"nothing to sweep: {r.prop} holds no indexed value{note}"
    which = f"whose {r.prop} ({r.encoding.value}) is before {iso(r.cutoff)}"
    if r.action == "scan":
        return f"scan every {r.kind} entity (one billed read each) and delete those {which}"
    which += note
    if r.expired is None or r.expired.n == 0:
        return f"delete nothing: no {r.kind} entity {which}"
    amount = f"at least {r.expired.n}" if r.expired.lower_bound else str(r.expired.n)
    return f"delete {amount} {r.kind} entities {which}"


def json_value(value: QueryValue | None) -> int | str | None:
    return iso(value) if isinstance(value, dt.datetime) else value


def iso(instant: dt.datetime) -> str:
    """ISO 8601 UTC with a ``Z``, as ``sweep_finished`` writes its cutoff."""
    aware = instant if instant.tzinfo else instant.replace(tzinfo=dt.UTC)
    return aware.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
