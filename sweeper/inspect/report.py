"""The report of ``sweeper inspect``: what a sweep of one target would meet, do and cost (what
it reports: docs/operations.md; what it counts, and how: docs/forecast.md)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.checks import ClockSource, check_indexed, decide_encoding, read_clock, read_stored
from sweeper.encodings import (
    EPOCH,
    Encoding,
    ExpiredRange,
    QueryValue,
    Rule,
    band_range,
    classify,
    cutoff_bound,
    describe_value,
    expired_range,
    from_micros,
    split_even,
    to_micros,
)
from sweeper.guard import DESCENDANT_SAMPLE, going_with
from sweeper.inspect.forecast import (
    HOUR,
    TICK,
    Bucket,
    Forecast,
    Histogram,
    Run,
    Unit,
    forecast,
    plan_backlog,
    scan_backlog,
    scan_due,
)
from sweeper.logs import DatastoreError, RefusedError, UsageError, describe_exception
from sweeper.retry import TRANSIENT, Retrier, RetryCounter, RetryPolicy
from sweeper.rpc import Count, RangeQuery
from sweeper.settings import SweepSettings
from sweeper.target import Target

Indexed = Literal["yes", "no", "unknown"]
Action = Literal["sweep", "scan", "refuse", "nothing"]

# Sample buckets in the order shown; encodings keep their --format spelling here.
BUCKETS = (*(e.value for e in Encoding), "null", "missing", "unsupported")
MAX_EXAMPLES = 3


@dataclass(frozen=True)
class Sample:
    """How ``asked`` keys store the property: spread by ``__scatter__``, then in key order."""

    asked: int
    counts: Mapping[str, int]
    unsupported_examples: tuple[str, ...] = ()
    # The values read (None for null or missing): what a scan's deletes are estimated from.
    values: tuple[object, ...] = field(default=(), repr=False, compare=False)

    @property
    def size(self) -> int:
        return sum(self.counts.values())

    @property
    def non_null(self) -> int:
        return self.size - self.counts.get("null", 0) - self.counts.get("missing", 0)


@dataclass(frozen=True)
class DescendantSample:
    """Entities under each of the first ``sampled`` expired sessions (``--with-descendants``)."""

    sampled: int
    total: int
    most: int

    @property
    def mean(self) -> float:
        return self.total / self.sampled if self.sampled else 0.0


@dataclass(frozen=True)
class Oldest:
    """The smallest stored value of the encoding, and the instant it denotes."""

    value: QueryValue
    instant: dt.datetime


@dataclass(frozen=True)
class InspectReport:
    """Everything ``inspect`` found for one target (``sweeper.inspect.table`` shows it)."""

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
    expired: Count | None = None
    oldest: Oldest | None = None
    # Entities whose property holds an indexed non-null value (None: not counted).
    carrying: Count | None = None
    clock_source: ClockSource | None = None
    histogram: Histogram | None = None
    forecast: Forecast | None = None
    # With --scan: the entities of the kind, every one of which the scan reads.
    kind_size: Count | None = None
    descendants: DescendantSample | None = None

    @property
    def oldest_expired(self) -> Oldest | None:
        """The oldest value still past the cutoff: the band's smallest, if it is expired."""
        return self.oldest if self.oldest and self.oldest.instant < self.cutoff else None

    @property
    def empty(self) -> bool:
        """Nothing carries the property: neither an index entry nor a sampled entity."""
        return self.carrying is not None and self.carrying.n == 0 and self.sample.non_null == 0


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
    """Inspect one target; a Datastore failure becomes one :class:`DatastoreError` line. ``now``
    (timezone-aware) is used where the database reports no clock."""
    if sample_size < 1 or count_limit < 1:
        raise UsageError("sample size and count limit must be at least 1")
    retrier = retrier or Retrier(RetryPolicy(), RetryCounter(), sleep)
    target = Target(client, retrier, settings.kind, settings.prop)
    try:
        return _inspect(settings, target, count_limit, now, sample_size)
    except (gexc.GoogleAPIError, *TRANSIENT) as exc:
        raise DatastoreError(f"Datastore call failed: {describe_exception(exc)}") from exc


def _count(target: Target, limit: int, what: ExpiredRange | None = None) -> Count:
    """Entities with a value in ``what`` (None: every one carrying the property): an aggregation
    where the database has one, else keys up to ``limit``."""
    if what is not None and what.empty:
        return Count(0, "empty_range")
    query = target.carrying() if what is None else target.within(what)
    return target.count(query, None, keys_limit=limit)


def _inspect(
    s: SweepSettings, target: Target, limit: int, now: dt.datetime, sample_size: int
) -> InspectReport:
    # The cutoff a sweep would use: from the database's clock where it reports one.
    clock = read_clock(target, lambda: now)
    cutoff = clock.now - s.grace
    sample = _sample(target, sample_size)
    probe = target.keys(target.carrying(), 1)  # detection's first probe: is any value indexed?
    indexed: Indexed = "yes" if probe else "no" if sample.non_null else "unknown"
    action, encoding, refusal = _decide(s, target)
    window = expired_range(encoding, cutoff) if encoding else None
    expired = _count(target, limit, window) if window else None
    if action == "sweep" and s.format != "auto" and expired and expired.n == 0:
        # The sweep's own check when its range finds nothing: are the values merely unindexed?
        try:
            check_indexed(target)
        except RefusedError as exc:
            action, refusal = "refuse", exc.message
    report = InspectReport(
        kind=s.kind,
        prop=s.prop,
        namespace=target.client.namespace or None,  # the client's: what was queried
        database=target.client.database or None,
        format_asked=str(s.format),
        grace=s.grace,
        now=clock.now,
        cutoff=cutoff,
        sample=sample,
        indexed=indexed,
        action=action,
        encoding=encoding,
        refusal=refusal,
        bounds=window.values() if window else None,
        expired=expired,
        oldest=_oldest(target, encoding) if encoding else None,
        carrying=_count(target, limit),
        clock_source=clock.source,
        descendants=_descendants(target, window, cutoff) if window and not s.scan else None,
    )
    if window is None or action not in ("sweep", "scan"):
        return report
    return _forecast(report, s, target, limit, window)


def _forecast(
    report: InspectReport, s: SweepSettings, target: Target, limit: int, window: ExpiredRange
) -> InspectReport:
    """The age histogram and the forecast of a sweep with ``s``'s settings."""
    count = partial(_count, target, limit)
    carrying = report.carrying or Count(0, "aggregation")
    server, aggregation = report.clock_source == "server", carrying.method == "aggregation"
    per_session = report.descendants.mean if report.descendants else 0.0
    run = Run(s, server, aggregation, window.encoding, per_session)
    if s.scan:
        kind = target.count(target.query(), None, keys_limit=limit)  # every entity of the kind
        expired = report.expired if report.indexed == "yes" else None
        values = report.sample.values
        due = expired.n if expired else scan_due(kind.n, values, window.encoding, report.cutoff)
        bounded = kind.lower_bound or expired is None or expired.lower_bound
        backlog = scan_backlog(kind.n, due, carrying.n, bounded)
        return replace(report, kind_size=kind, forecast=forecast(backlog, run))
    oldest = report.oldest_expired
    histogram, slices = Histogram("hour", ()), None
    if oldest:  # one COUNT per age bucket
        unit, buckets = age_buckets(window, oldest.instant, report.cutoff)
        counted = [(start, end, count(part)) for start, end, part in buckets]
        histogram = Histogram(unit, tuple(Bucket(a, b, c.n, c.lower_bound) for a, b, c in counted))
    if oldest and s.shard.count == 1 and s.workers > 1:  # the streams' slices, counted
        slices = [count(part).n for part in stream_slices(window, oldest.instant, s.workers)]
    backlog = plan_backlog(histogram, run, carrying.n, slices)
    return replace(report, histogram=histogram, forecast=forecast(backlog, run))


def _decide(s: SweepSettings, target: Target) -> tuple[Action, Encoding | None, str | None]:
    """What ``sweep`` would decide, by the code it runs: ``read_stored``, ``decide_encoding``."""
    try:
        ends = read_stored(target, s).ends
        if isinstance(s.format, Encoding):
            return ("scan" if s.scan else "sweep"), s.format, None
        auto = decide_encoding(ends, s.kind, s.prop)
    except RefusedError as exc:
        return "refuse", None, exc.message
    # The format check has already refused values that no index holds.
    return ("sweep", auto, None) if auto else ("nothing", None, None)


def _sample(target: Target, size: int) -> Sample:
    """``size`` entities by the *true* type of their value (only a lookup shows it), most from
    across the key space by ``__scatter__`` where kept: key order alone can miss every null."""
    spread = target.keys(RangeQuery(target.kind, target.prop, scattered=True), size)
    first = [] if len(spread) == size else target.keys(target.query(), size)
    first = [k for k in first if k not in spread]
    counts = dict.fromkeys(BUCKETS, 0)
    examples: list[str] = []
    values: list[object] = []
    prop = target.prop
    for entity in target.lookup([*spread, *first][:size]):
        value = entity.get(prop)
        if value is None:
            bucket = "null" if prop in entity else "missing"
        else:
            encoding = classify(value)
            bucket = encoding.value if encoding else "unsupported"
        counts[bucket] += 1
        values.append(value)
        if bucket == "unsupported" and len(examples) < MAX_EXAMPLES:
            text = describe_value(value)
            examples += [] if text in examples else [text]
    return Sample(size, counts, tuple(examples), tuple(values))


def _oldest(target: Target, encoding: Encoding) -> Oldest | None:
    """The smallest value in the encoding's whole band: how far behind sweeping is."""
    found = target.fetch(target.within(band_range(encoding), keys_only=False), 1)
    value = found[0].value if found else None
    ordinal = encoding.ordinal(value) if classify(value) is encoding else None
    if isinstance(value, bytes):  # text stored as a byte string (it sorts with strings)
        value = value.decode("ascii", "replace")
    if not isinstance(value, QueryValue) or ordinal is None:  # or another form at the start
        return None
    return Oldest(value, from_micros(ordinal * encoding.unit_us))


def _descendants(
    target: Target, window: ExpiredRange, cutoff: dt.datetime
) -> DescendantSample | None:
    """Entities under the first expired sessions that would go with them: what
    ``--with-descendants`` adds (a live session under one keeps its own, ``gate.decide``)."""
    if window.empty:
        return None
    rule = Rule(target.kind, target.prop, window.encoding, cutoff)
    counts = going_with(target, rule, target.keys(target.within(window), DESCENDANT_SAMPLE))
    return DescendantSample(len(counts), sum(counts), max(counts, default=0))


# -- the ranges counted: the backlog by age, the streams' slices ---------------------------------

# Up to two days by the hour (the shards' own grid, so an hour bucket says which pod deletes
# what), older by the day, at most MAX_DAY_BUCKETS of them, the oldest open-ended.
HOURLY_SPAN = dt.timedelta(days=2)
DAY = dt.timedelta(days=1)
MAX_DAY_BUCKETS = 30


def bucket_edges(
    oldest: dt.datetime, cutoff: dt.datetime
) -> tuple[Unit, list[tuple[dt.datetime | None, dt.datetime]]]:
    """Buckets covering ``[oldest, cutoff)`` on the UTC grid, the youngest ending at ``cutoff``."""
    if oldest >= cutoff:
        return "hour", []
    unit: Unit = "hour" if cutoff - oldest <= HOURLY_SPAN else "day"
    width = HOUR if unit == "hour" else DAY
    first, last = _floor(oldest, width), _floor(cutoff - TICK, width)
    cells = (last - first) // width + 1
    open_ended = unit == "day" and cells > MAX_DAY_BUCKETS
    if open_ended:
        first, cells = last - (MAX_DAY_BUCKETS - 1) * width, MAX_DAY_BUCKETS
    edges: list[tuple[dt.datetime | None, dt.datetime]] = []
    edges += [(a, min(a + width, cutoff)) for a in (first + i * width for i in range(cells))]
    if open_ended:
        edges[0] = (None, edges[0][1])
    return unit, edges


def age_buckets(
    window: ExpiredRange, oldest: dt.datetime, cutoff: dt.datetime
) -> tuple[Unit, list[tuple[dt.datetime | None, dt.datetime, ExpiredRange]]]:
    """:func:`bucket_edges` as ranges of ``window``'s stored values, to count."""
    encoding = window.encoding
    unit, edges = bucket_edges(oldest, cutoff)
    ranges = []
    for start, end in edges:
        lo = window.lo if start is None else max(window.lo, cutoff_bound(encoding, start))
        hi = window.hi if end >= cutoff else cutoff_bound(encoding, end)
        ranges.append((start, end, ExpiredRange(encoding, lo, hi)))
    return unit, ranges


def stream_slices(window: ExpiredRange, oldest: dt.datetime, workers: int) -> list[ExpiredRange]:
    """The slices one pod's ``workers`` query streams page through (``target.expired_streams``):
    from the oldest expired value to the cutoff, cut evenly."""
    start = to_micros(oldest) // window.encoding.unit_us
    return [ExpiredRange(window.encoding, a, b) for a, b in split_even(start, window.hi, workers)]


def _floor(instant: dt.datetime, width: dt.timedelta) -> dt.datetime:
    return EPOCH + ((instant - EPOCH) // width) * width
