"""What a sweep of the expired backlog will cost and take, before it runs.

Pure arithmetic over what ``inspect`` counted, no Datastore call: the calls the run will make as
``sweep_finished`` counts them, their price, and the time its deletes need under the throttle's
own ``RampSchedule``. The model, and what it leaves out: docs/forecast.md.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from sweeper.deleter import LEGACY_LIMIT
from sweeper.encodings import EPOCH, Encoding, is_expired, shard_slices
from sweeper.guard import COUNT_LIMIT
from sweeper.result import RETENTION_COUNT_LIMIT
from sweeper.settings import MAX_BATCH_SIZE, Shard, SweepSettings
from sweeper.target import KEYS_ONLY_COUNT_LIMIT, PAGE_SIZE, SCAN_FIRST_PAGE
from sweeper.throttle import BASE_RATE, RampSchedule

Unit = Literal["hour", "day"]
HOUR = dt.timedelta(hours=1)
TICK = dt.timedelta(microseconds=1)


@dataclass(frozen=True)
class Bucket:
    """Expired entities whose expiry lies in ``[start, end)``; ``start`` None: all before."""

    start: dt.datetime | None
    end: dt.datetime
    count: int = 0
    lower_bound: bool = False


@dataclass(frozen=True)
class Histogram:
    """The expired backlog by age, oldest bucket first."""

    unit: Unit
    buckets: tuple[Bucket, ...]

    @property
    def total(self) -> int:
        return sum(b.count for b in self.buckets)

    @property
    def lower_bound(self) -> bool:
        return any(b.lower_bound for b in self.buckets)


def hour_cells(histogram: Histogram) -> tuple[dict[int, int], bool]:
    """Expired entities per UTC hour (the shards' buckets), and whether that is an estimate:
    a day bucket is spread evenly over its hours, the open-ended oldest one put in its last."""
    cells: dict[int, int] = {}
    for b in histogram.buckets:
        last = hour_of(b.end - TICK)
        first = last if b.start is None else hour_of(b.start)
        q, r = divmod(b.count, last - first + 1)
        for i, hour in enumerate(range(first, last + 1)):
            if q + (i < r):
                cells[hour] = q + (i < r)
    return cells, histogram.unit != "hour"


def hour_of(instant: dt.datetime) -> int:
    """The UTC hour of ``instant``, counted from the epoch: a shard bucket's number."""
    return (instant - EPOCH) // HOUR


# Calls every pod makes whatever the backlog: the clock query; the format check's two probes,
# each the one whole entity at an end of the index (not made by a scan, which needs --format).
CLOCK_QUERIES = 1
CHECK_QUERIES = 2
# Results per call from the legacy Datastore emulator, whatever the limit.
LEGACY_BATCH_KEYS = 300


@dataclass(frozen=True)
class Run:
    """The sweep forecast: the settings it runs with, what the database and the target offer."""

    sweep: SweepSettings
    # Firestore in Datastore mode reports its read time; the legacy emulator does not, takes 25
    # entity groups a transaction and 300 results a call, and ends a range with an empty page.
    reports_read_time: bool = True
    # Whether COUNT is one aggregation query; else counting pages through the keys.
    aggregation: bool = True
    # The encoding the sweep would delete in, where known.
    encoding: Encoding | None = None
    # The entities under each session, as inspect sampled them (--with-descendants).
    per_session: float = 0.0

    @property
    def transaction_keys(self) -> int:
        return MAX_BATCH_SIZE if self.reports_read_time else LEGACY_LIMIT

    @property
    def batch_keys(self) -> int:
        return PAGE_SIZE if self.reports_read_time else LEGACY_BATCH_KEYS

    @property
    def projected(self) -> bool:
        """Text ranges are read with their values: one read per entity (the higher price)."""
        return self.encoding is not None and self.encoding.needs_values and not self.sweep.scan

    @property
    def start_detected(self) -> bool:
        """Streams start at the oldest value ``--format auto`` read: no query places them."""
        return self.encoding is not None and self.sweep.starts_at_detected_end(self.encoding)

    @property
    def descendants_per_session(self) -> float | None:
        return self.per_session if self.sweep.with_descendants else None


@dataclass(frozen=True)
class Backlog:
    """What each pod's queries will page through: keys per query stream, per shard; ``probes``,
    the limit-1 queries placing each pod's streams; ``carrying``, the guard's and the retention
    check's count; with ``--scan``, ``scan_reads``, the entities of the kind (one stream per pod,
    of the keys it deletes); ``estimated``: a count was spread or bounded."""

    streams: tuple[tuple[int, ...], ...]
    probes: tuple[int, ...]
    carrying: int = 0
    estimated: bool = False
    scan_reads: int | None = None

    @property
    def per_shard(self) -> tuple[int, ...]:
        return tuple(sum(keys) for keys in self.streams)

    @property
    def due(self) -> int:
        return sum(self.per_shard)


def plan_backlog(
    histogram: Histogram, run: Run, carrying: int, slices: Sequence[int] | None = None
) -> Backlog:
    """The streams a range sweep will page through, from the histogram (and, for several
    workers on one pod, the counted ``slices`` of the range, else an even split)."""
    n, bounded = histogram.total, histogram.lower_bound
    pods = run.sweep.shard.count
    if pods > 1:
        cells, spread = hour_cells(histogram)
        walks = [_walk(cells, histogram, Shard(i, pods)) for i in range(pods)]
        streams = tuple(tuple(keys) for keys, _probes in walks)
        return Backlog(streams, tuple(p for _k, p in walks), carrying, spread or bounded)
    if run.sweep.workers == 1:
        return Backlog(((n,),), (0,), carrying, bounded)
    if n == 0:
        return Backlog(((),), (1,), carrying, bounded)  # the projection finds nothing
    place = (0,) if run.start_detected else (1,)
    if slices is None:
        q, r = divmod(n, run.sweep.workers)
        even = tuple(q + (i < r) for i in range(run.sweep.workers))
        return Backlog((even,), place, carrying, True)
    return Backlog((tuple(slices),), place, carrying, bounded)


def scan_backlog(kind_size: int, due: int, carrying: int, estimated: bool) -> Backlog:
    """``--scan``: one pod reads the whole kind and deletes the ``due`` it finds there."""
    return Backlog(((due,),), (0,), carrying, estimated, scan_reads=kind_size)


def scan_due(
    kind_size: int, values: Sequence[object], encoding: Encoding, cutoff: dt.datetime
) -> int:
    """What a scan of an unindexed property would delete: the sample's expired share."""
    due = sum(is_expired(encoding, value, cutoff) for value in values)
    return round(kind_size * due / len(values)) if values else 0


def _walk(cells: Mapping[int, int], histogram: Histogram, shard: Shard) -> tuple[list[int], int]:
    """Replay ``shard_slices`` over the counted hours: the hours this shard sweeps, and the
    probes it makes to find them."""
    order = sorted(cells)
    probes = 0

    def next_value(pos: int, hi: int) -> int | None:
        nonlocal probes
        probes += 1
        i = bisect.bisect_left(order, pos)
        return order[i] if i < len(order) and order[i] < hi else None

    lo = order[0] if order else 0
    # The UTC hour after the youngest bucket's last.
    hi = hour_of(histogram.buckets[-1].end - TICK) + 1 if histogram.buckets else 1
    owned = [cells[a] for a, _b in shard_slices(lo, hi, (shard.index, shard.count), 1, next_value)]
    return owned, probes


@dataclass(frozen=True)
class Operations:
    """The calls a run makes, as ``sweep_finished`` counts them, and the entity reads billed."""

    queries: int
    commits: int
    entities_read: int
    deleted: int
    billed_reads: int


def guard_refuses(backlog: Backlog, run: Run) -> bool:
    """Whether ``--max-fraction`` refuses the run: it would delete too much of what is stored."""
    if run.sweep.scan or run.sweep.max_fraction >= 1 or backlog.carrying == 0:
        return False
    return backlog.due / backlog.carrying > run.sweep.max_fraction


def operations(backlog: Backlog, run: Run) -> Operations:
    """Every pod's calls: its clock and checks, the guard's counts, its streams' pages and
    commits, and the retention counts after it (when pods finish together: nothing left)."""
    scan = backlog.scan_reads
    left = max(backlog.carrying - backlog.due, 0)
    # A scan's retention is what it read: no counts after it (``checks.retention``).
    after = [] if scan is not None else [retention_calls(left, 0, run)]
    calls = [*after, *_guard_calls(backlog, run)] or [(0, 0)]
    counted, counted_reads = map(sum, zip(*calls, strict=True))
    # A scan hands its keys on a full commit at a time, whatever its read pages.
    per = PAGE_SIZE if scan is not None else run.batch_keys
    # A checked batch commits in transactions of at most ``tx`` keys, a blind one in one call.
    tx, verify = min(run.transaction_keys, run.sweep.batch_size), run.sweep.verify
    queries = commits = billed = 0
    for keys, probes in zip(backlog.streams, backlog.probes, strict=True):
        queries += CLOCK_QUERIES + probes + counted
        billed += CLOCK_QUERIES + probes + counted_reads
        if scan is not None:
            queries += scan_pages(scan, run)
        else:
            pages = CHECK_QUERIES + sum(query_pages(n, per, run.reports_read_time) for n in keys)
            queries += pages
            billed += pages
        commits += sum(math.ceil(b / tx) if verify else 1 for b in _batches(keys, per, run))
    read = scan or 0
    if scan is not None and run.sweep.max_fraction < 1:
        # The guard of a scan reads the whole kind once before the scan that deletes.
        queries += scan_pages(scan, run)
        read += scan
    deleted = backlog.due
    # Pages that read each entity's version (every range unless --no-verify) or its value
    # (text ranges) bill one read per result; keys-only pages one per page.
    by_result = (run.projected or verify) and scan is None
    billed += backlog.due if by_result else 0
    if run.descendants_per_session is not None:
        # One ancestor query per session (a page per 500 under it), and its descendants
        # deleted in the same commits as far as they fit.
        under = round(backlog.due * run.descendants_per_session)
        pages = max(1, math.ceil((run.descendants_per_session + 1) / PAGE_SIZE))
        queries += backlog.due * pages
        billed += backlog.due * pages
        commits += math.ceil(under / tx)
        deleted += under
    return Operations(queries, commits, read, deleted, billed + read)


def _guard_calls(backlog: Backlog, run: Run) -> list[tuple[int, int]]:
    """``guard.measure`` (not for a scan, nor at ``--max-fraction 1``): the due range, then
    what carries the property only as far as ``due / max_fraction``."""
    if run.sweep.scan or run.sweep.max_fraction >= 1:
        return []
    due = backlog.due
    enough = COUNT_LIMIT if due >= COUNT_LIMIT else max(1, math.ceil(due / run.sweep.max_fraction))
    return [_count(due, COUNT_LIMIT, run), _count(backlog.carrying, enough, run)]


def retention_calls(carrying: int, expired_left: int, run: Run) -> tuple[int, int]:
    """Queries and billed reads of the counts after a run (``checks.measure_retention``):
    what carries the property, what is left past the cutoff, and the oldest of that."""
    calls = [_count(n, RETENTION_COUNT_LIMIT, run) for n in (carrying, expired_left)]
    calls += [(1, 1)] if expired_left else []
    return sum(q for q, _b in calls), sum(b for _q, b in calls)


def _count(n: int, limit: int, run: Run) -> tuple[int, int]:
    """Queries and billed reads of a count of ``n`` stopping at ``limit`` (``Target.count``)."""
    if run.aggregation:
        return 1, max(1, math.ceil(min(n, limit) / 1000))
    bound = min(limit, KEYS_ONLY_COUNT_LIMIT)
    per = min(PAGE_SIZE, bound, run.batch_keys)
    pages = math.ceil(bound / per) if n >= bound else query_pages(n, per, run.reports_read_time)
    return pages, pages


def query_pages(keys: int, per: int = PAGE_SIZE, says_last_page: bool = True) -> int:
    """Calls to page through ``keys`` results, ``per`` a call: the range ends at a call that
    says it was the last (the Firestore emulator), else at an empty one (the legacy emulator)."""
    return max(1, math.ceil(keys / per)) if says_last_page else math.ceil(keys / per) + 1


def scan_pages(entities: int, run: Run) -> int:
    """Calls of a scan: ``SCAN_FIRST_PAGE`` entities, then pages of up to ``PAGE_SIZE`` (for
    entities of up to ~2 KiB; larger ones make smaller pages)."""
    last = run.reports_read_time
    if entities == 0 or (last and entities <= SCAN_FIRST_PAGE):
        return 1
    return 1 + query_pages(max(entities - SCAN_FIRST_PAGE, 0), run.batch_keys, last)


def _batches(streams: Sequence[int], per: int, run: Run) -> Iterator[int]:
    """The delete batches of each stream: every page of ``per`` cut into ``batch_size`` pieces."""
    size = run.sweep.batch_size
    for keys in streams:
        for page in [per] * (keys // per) + [keys % per]:
            yield from [size] * (page // size) + ([page % size] if page % size else [])


@dataclass(frozen=True)
class Prices:
    """List prices in USD per 100,000 operations: an assumption to check against ``source``."""

    reads_per_100k: float = 0.06
    deletes_per_100k: float = 0.02
    location: str = "nam5 (United States multi-region)"
    as_of: str = "2026-11-23"
    source: str = "https://cloud.google.com/datastore/pricing"


LIST_PRICES = Prices()


@dataclass(frozen=True)
class Forecast:
    """A run's calls, their price, and the time its deletes need under the throttle
    (``duration_s`` and ``final_rate``: :func:`ramp_time`'s). Where ``--max-fraction`` would
    refuse the run (``guard_refuses``): the run with 1, which clears it."""

    run: Run
    operations: Operations
    prices: Prices
    duration_s: float | None
    final_rate: float | None
    estimated: bool
    guard_refuses: bool = False

    @property
    def reads_usd(self) -> float:
        return self.operations.billed_reads * self.prices.reads_per_100k / 100_000

    @property
    def deletes_usd(self) -> float:
        return self.operations.deleted * self.prices.deletes_per_100k / 100_000

    @property
    def cost_usd(self) -> float:
        return self.reads_usd + self.deletes_usd


def forecast(backlog: Backlog, run: Run) -> Forecast:
    refused = guard_refuses(backlog, run)
    if refused:
        run = replace(run, sweep=replace(run.sweep, max_fraction=1.0))
    duration, rate = ramp_time(backlog.per_shard, run)
    ops = operations(backlog, run)
    # Descendants are estimated from a sample of sessions.
    estimated = backlog.estimated or bool(run.descendants_per_session)
    return Forecast(run, ops, LIST_PRICES, duration, rate, estimated, refused)


def ramp_time(per_shard: Sequence[int], run: Run) -> tuple[float | None, float | None]:
    """When the slowest pod's last batch may go (once the throttle's schedule covers all of its
    keys), and the rate all pods are then allowed; None, None when nothing limits the rate."""
    base = BASE_RATE / run.sweep.shard.count if run.sweep.ramp_up else None
    schedule = RampSchedule(base=base, cap=run.sweep.max_rate)
    if schedule.unlimited or not per_shard:
        return None, None
    end = max(schedule.time_to_accrue(0.0, keys) for keys in per_shard)
    return end, schedule.rate_at(end) * run.sweep.shard.count
