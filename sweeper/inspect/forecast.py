"""What a sweep of a known backlog will cost and how long it will take, before it runs.

Pure arithmetic, no Datastore call: from what ``inspect`` counted (the expired entities per age
bucket and per query stream, and what carries the property), the calls the run will make as
``sweep_finished`` counts them, their billed operations and price, and the time the deletes
need under the 500/50/5 ramp-up. It replays the engine's own rules (pages of ``PAGE_SIZE``
keys until a short one, ``shard_slices``' probes, the guard's and the retention check's counts,
``--verify``'s transactions) and the throttle's own ``RampSchedule``. docs/forecast.md has the
model, the prices and how close it came to real runs.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from sweeper.deleter import LEGACY_LIMIT
from sweeper.encodings import Encoding, is_expired
from sweeper.guard import COUNT_LIMIT
from sweeper.inspect.histogram import Histogram, hour_cells
from sweeper.result import RETENTION_COUNT_LIMIT
from sweeper.settings import (
    DEFAULT_MAX_FRACTION,
    DEFAULT_WORKERS,
    MAX_BATCH_SIZE,
    Shard,
    SweepSettings,
)
from sweeper.sources import shard_slices
from sweeper.target import KEYS_ONLY_COUNT_LIMIT, PAGE_SIZE, SCAN_FIRST_PAGE
from sweeper.throttle import BASE_RATE, RampSchedule

# Calls every pod makes whatever the backlog: the clock query; the format check's two probes,
# each the one whole entity at an end of the index (not made by a scan, which needs --format).
CLOCK_QUERIES = 1
CHECK_QUERIES = 2
# Results per call from the legacy Datastore emulator, whatever the limit.
LEGACY_BATCH_KEYS = 300


@dataclass(frozen=True)
class RunSettings:
    """How the forecast run is set up: the ``sweep`` options that change what it costs, and
    what the database offers (aggregation COUNTs; 25 entity groups per transaction)."""

    workers: int = DEFAULT_WORKERS
    batch_size: int = MAX_BATCH_SIZE
    # Each key deleted at the version its page read (``sweeper.gate``).
    verify: bool = True
    scan: bool = False
    shards: int = 1
    ramp_up: bool = True
    max_rate: float | None = None
    # Below 1 the guard counts the due range and what carries the property before deleting.
    max_fraction: float = DEFAULT_MAX_FRACTION
    # Keys per all-or-nothing commit: 25 where the database takes at most 25 entity groups in
    # one transaction (the legacy emulator, which also reports no read time), a whole batch
    # elsewhere.
    transaction_keys: int = MAX_BATCH_SIZE
    # Whether COUNT is one aggregation query; else counting pages through the keys.
    aggregation: bool = True
    # The most results the database answers a call with (the legacy emulator: 300), and whether
    # the call that ends a range says so (Firestore) or an empty one follows (legacy).
    batch_keys: int = PAGE_SIZE
    says_last_page: bool = True
    # Text ranges are read with their values (a projection): priced as one read per entity,
    # the higher of the two ways a projection may be billed.
    projected: bool = False
    # --with-descendants: the entities under each session, as inspect sampled them.
    descendants_per_session: float | None = None
    # --format auto has read the oldest value (an end of the index), where the streams of one
    # pod start: no query places them (``sources.expired_streams``). Not for text.
    start_detected: bool = False


def run_settings(
    s: SweepSettings,
    *,
    reports_read_time: bool,
    aggregation: bool,
    encoding: Encoding | None = None,
    descendants_per_session: float = 0.0,
) -> RunSettings:
    """What a sweep with ``s`` will do on a database that does (not) report its read time."""
    return RunSettings(
        projected=encoding is not None and encoding.needs_values and not s.scan,
        start_detected=encoding is not None and s.starts_at_detected_end(encoding),
        descendants_per_session=descendants_per_session if s.with_descendants else None,
        workers=s.workers,
        batch_size=s.batch_size,
        verify=s.verify,
        scan=s.scan,
        shards=s.shard.count,
        ramp_up=s.ramp_up,
        max_rate=s.max_rate,
        max_fraction=s.max_fraction,
        transaction_keys=MAX_BATCH_SIZE if reports_read_time else LEGACY_LIMIT,
        aggregation=aggregation,
        batch_keys=PAGE_SIZE if reports_read_time else LEGACY_BATCH_KEYS,
        says_last_page=reports_read_time,
    )


@dataclass(frozen=True)
class Backlog:
    """What each pod's queries will page through: keys per query stream, per shard.

    ``probes``: the limit-1 queries each pod makes to place its streams. ``carrying``: entities
    whose property holds a value (the guard's and the retention check's count). ``scan_reads``:
    with ``--scan``, the entities of the kind (the pod's one stream then holds the keys it will
    delete, read from those entities). ``estimated``: some count was spread or bounded.
    """

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
    histogram: Histogram, settings: RunSettings, carrying: int, slices: Sequence[int] | None = None
) -> Backlog:
    """The streams a range sweep will page through, from the histogram (and, for several
    workers on one pod, the counted ``slices`` of the range, else an even split)."""
    n, bounded = histogram.total, histogram.lower_bound
    if settings.shards > 1:
        cells, spread = hour_cells(histogram)
        walks = [_walk(cells, histogram, Shard(i, settings.shards)) for i in range(settings.shards)]
        streams = tuple(tuple(keys) for keys, _probes in walks)
        return Backlog(streams, tuple(p for _k, p in walks), carrying, spread or bounded)
    if settings.workers == 1:
        return Backlog(((n,),), (0,), carrying, bounded)
    if n == 0:
        return Backlog(((),), (1,), carrying, bounded)  # the projection finds nothing
    place = (0,) if settings.start_detected else (1,)
    if slices is None:
        q, r = divmod(n, settings.workers)
        even = tuple(q + (i < r) for i in range(settings.workers))
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
    hi = histogram.end_hour or lo + 1
    owned = [cells[a] for a, _b in shard_slices(lo, hi, shard, 1, next_value)]
    return owned, probes


@dataclass(frozen=True)
class Operations:
    """The calls a run makes, as ``sweep_finished`` counts them, and the entity reads billed:
    one per keys-only query page, per 1,000 index entries an aggregation COUNT reads, per
    entity a page returns with its version (every range but ``--no-verify``'s), per entity
    read by ``--scan``."""

    queries: int
    commits: int
    entities_read: int
    deleted: int
    billed_reads: int


def guard_refuses(backlog: Backlog, settings: RunSettings) -> bool:
    """Whether ``--max-fraction`` refuses the run: it would delete too much of what is stored."""
    if settings.scan or settings.max_fraction >= 1 or backlog.carrying == 0:
        return False
    return backlog.due / backlog.carrying > settings.max_fraction


def operations(backlog: Backlog, settings: RunSettings) -> Operations:
    """Every pod's calls: its clock and checks, the guard's counts, its streams' pages and
    commits, and the retention counts after it (when pods finish together: nothing left)."""
    queries = commits = billed = 0
    left = max(backlog.carrying - backlog.due, 0)
    for keys, probes in zip(backlog.streams, backlog.probes, strict=True):
        # A scan's retention is what it read: no counts after it (``checks.retention``).
        after = [] if backlog.scan_reads is not None else [retention_calls(left, 0, settings)]
        calls = [*after, *_guard_calls(backlog, settings)] or [(0, 0)]
        counted, counted_reads = map(sum, zip(*calls, strict=True))
        fixed = CLOCK_QUERIES + probes + counted
        if backlog.scan_reads is not None:
            queries += fixed + scan_pages(backlog.scan_reads, settings)
            billed += fixed - counted + counted_reads
        else:
            per, last = _per_call(settings), settings.says_last_page
            pages = CHECK_QUERIES + sum(query_pages(n, per, last) for n in keys)
            queries += fixed + pages
            billed += fixed - counted + counted_reads + pages
        # A scan hands its keys on a full commit at a time, whatever its read pages.
        per = PAGE_SIZE if backlog.scan_reads is not None else _per_call(settings)
        commits += sum(_commits(batch, settings) for batch in _batches(keys, per, settings))
    read = backlog.scan_reads or 0
    if backlog.scan_reads is not None and settings.max_fraction < 1:
        # The guard of a scan reads the whole kind once before the scan that deletes.
        queries += scan_pages(backlog.scan_reads, settings)
        read += backlog.scan_reads
    deleted = backlog.due
    # Pages that read each entity's version (every range unless --no-verify) or its value
    # (text ranges) bill one read per result; keys-only pages one per page.
    by_result = (settings.projected or settings.verify) and backlog.scan_reads is None
    billed += backlog.due if by_result else 0
    if settings.descendants_per_session is not None:
        # One ancestor query per session (a page per 500 under it), and its descendants
        # deleted in the same commits as far as they fit.
        under = round(backlog.due * settings.descendants_per_session)
        pages = max(1, math.ceil((settings.descendants_per_session + 1) / PAGE_SIZE))
        queries += backlog.due * pages
        billed += backlog.due * pages
        commits += math.ceil(under / min(settings.batch_size, settings.transaction_keys))
        deleted += under
    return Operations(queries, commits, read, deleted, billed + read)


def _guard_calls(backlog: Backlog, settings: RunSettings) -> list[tuple[int, int]]:
    """``guard.measure`` (not for a scan, nor at ``--max-fraction 1``): the due range, then
    what carries the property only as far as ``due / max_fraction``."""
    if settings.scan or settings.max_fraction >= 1:
        return []
    due = backlog.due
    enough = COUNT_LIMIT if due >= COUNT_LIMIT else max(1, math.ceil(due / settings.max_fraction))
    return [_count(due, COUNT_LIMIT, settings), _count(backlog.carrying, enough, settings)]


def retention_calls(carrying: int, expired_left: int, settings: RunSettings) -> tuple[int, int]:
    """Queries and billed reads of the counts after a run (``retention.measure_retention``):
    what carries the property, what is left past the cutoff, and the oldest of that."""
    calls = [_count(n, RETENTION_COUNT_LIMIT, settings) for n in (carrying, expired_left)]
    calls += [(1, 1)] if expired_left else []
    queries, billed = map(sum, zip(*calls, strict=True))
    return queries, billed


def _count(n: int, limit: int, settings: RunSettings) -> tuple[int, int]:
    """Queries and billed reads of a count of ``n`` stopping at ``limit`` (``Target.count``)."""
    if settings.aggregation:
        return 1, max(1, math.ceil(min(n, limit) / 1000))
    bound = min(limit, KEYS_ONLY_COUNT_LIMIT)
    per = min(PAGE_SIZE, bound, settings.batch_keys)
    pages = math.ceil(bound / per) if n >= bound else query_pages(n, per, settings.says_last_page)
    return pages, pages


def query_pages(keys: int, per: int = PAGE_SIZE, says_last_page: bool = True) -> int:
    """Calls to page through ``keys`` results, ``per`` a call: the range ends at a call that
    says it was the last (the Firestore emulator), else at an empty one (the legacy emulator)."""
    return max(1, math.ceil(keys / per)) if says_last_page else math.ceil(keys / per) + 1


def scan_pages(entities: int, settings: RunSettings) -> int:
    """Calls of a scan: ``SCAN_FIRST_PAGE`` entities, then pages of up to ``PAGE_SIZE`` (for
    entities of up to ~2 KiB; larger ones make smaller pages)."""
    last = settings.says_last_page
    if entities == 0 or (last and entities <= SCAN_FIRST_PAGE):
        return 1
    rest = max(entities - SCAN_FIRST_PAGE, 0)
    return 1 + query_pages(rest, _per_call(settings), last)


def _per_call(settings: RunSettings) -> int:
    """Keys a query call returns."""
    return min(PAGE_SIZE, settings.batch_keys)


def _batches(streams: Sequence[int], per: int, settings: RunSettings) -> Iterator[int]:
    """The delete batches of each stream: every page of ``per`` cut into ``batch_size`` pieces."""
    size = settings.batch_size
    for keys in streams:
        for page in [per] * (keys // per) + [keys % per]:
            yield from [size] * (page // size) + ([page % size] if page % size else [])


def _commits(batch: int, settings: RunSettings) -> int:
    if not settings.verify:
        return 1
    return math.ceil(batch / min(settings.transaction_keys, settings.batch_size))


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
    """A run's calls, their price, and the time its deletes need under the throttle.

    When ``--max-fraction`` would refuse the run as set up (``guard_refuses``), this is the
    forecast of the run that clears the backlog all the same: with ``--max-fraction 1``.
    """

    settings: RunSettings
    operations: Operations
    prices: Prices
    # Seconds until the last batch may go; None when nothing limits the rate.
    duration_s: float | None
    # Deletes per second all pods together are allowed when it goes.
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


def forecast(backlog: Backlog, settings: RunSettings, prices: Prices = LIST_PRICES) -> Forecast:
    refused = guard_refuses(backlog, settings)
    if refused:
        settings = replace(settings, max_fraction=1.0)
    duration, rate = ramp_time(backlog.per_shard, settings)
    ops = operations(backlog, settings)
    # Descendants are estimated from a sample of sessions.
    estimated = backlog.estimated or bool(settings.descendants_per_session)
    return Forecast(settings, ops, prices, duration, rate, estimated, refused)


def ramp_time(per_shard: Sequence[int], settings: RunSettings) -> tuple[float | None, float | None]:
    """When the last batch of the slowest pod may go, and the rate all pods are then allowed.

    Each pod's budget is the throttle's own schedule: ``BASE_RATE / shards`` growing by half
    every five minutes (with ``--ramp-up``), capped at ``--max-rate``. A batch goes as soon as
    the budget is out of debt, so a pod's last batch goes once the budget covers the others.
    """
    base = BASE_RATE / settings.shards if settings.ramp_up else None
    schedule = RampSchedule(base=base, cap=settings.max_rate)
    if schedule.unlimited or not per_shard:
        return None, None
    ends = [
        schedule.time_to_accrue(0.0, keys - min(keys, settings.batch_size)) for keys in per_shard
    ]
    end = max(ends)
    return end, schedule.rate_at(end) * settings.shards
