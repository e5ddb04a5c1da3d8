"""The forecast's arithmetic on made-up backlogs: exact counts, the ramp-up across its steps,
shards. How close it comes to real runs is tested against both emulators (test_inspect.py)."""

from __future__ import annotations

import datetime as dt
import itertools
import math
from dataclasses import replace
from typing import Any

import pytest

from sweeper.encodings import Encoding, cutoff_bound, expired_range
from sweeper.inspect.forecast import (
    LIST_PRICES,
    Backlog,
    Bucket,
    Histogram,
    Run,
    forecast,
    guard_refuses,
    hour_cells,
    operations,
    plan_backlog,
    query_pages,
    ramp_time,
    retention_calls,
    scan_backlog,
    scan_pages,
)
from sweeper.inspect.report import MAX_DAY_BUCKETS, age_buckets, bucket_edges, stream_slices
from sweeper.settings import Shard, SweepSettings
from sweeper.throttle import BASE_RATE, RAMP_FACTOR, RAMP_INTERVAL_S

CUTOFF = dt.datetime(2024, 6, 1, 11, 45, tzinfo=dt.UTC)
H = dt.timedelta(hours=1)


def run_of(*, legacy: bool = False, shards: int = 1, **sweep: Any) -> Run:
    """The forecast of a sweep with these options (the ramp-up on unless told) on Firestore,
    or on the legacy emulator: no read time, 25 keys a transaction, 300 keys a call."""
    options = {"ramp_up": True, "shard": Shard(0, shards), **sweep}
    s = SweepSettings("k", "p", "auto", dt.timedelta(0), **options)
    return Run(s, reports_read_time=not legacy, aggregation=not legacy)


def with_(run: Run, **sweep: Any) -> Run:
    return replace(run, sweep=replace(run.sweep, **sweep))


# Runs without the guard's counts unless a test turns it on.
PLAIN = run_of(workers=1, max_fraction=1.0)
BLIND = with_(PLAIN, verify=False)
LEGACY = run_of(legacy=True, workers=1, max_fraction=1.0)


def approx(duration: float, rate: float) -> tuple[float | None, float | None]:
    """What ``ramp_time`` returns, compared with float tolerance."""
    return pytest.approx((duration, rate))  # type: ignore[return-value]


def at(hour: int) -> dt.datetime:
    return dt.datetime(2024, 6, 1, hour, tzinfo=dt.UTC)


def hourly(*counts: int) -> Histogram:
    """Hour buckets from 08:00 to the cutoff (11:45), oldest first."""
    starts = [at(8 + i) for i in range(len(counts))]
    return Histogram(
        "hour", tuple(Bucket(s, min(s + H, CUTOFF), n) for s, n in zip(starts, counts, strict=True))
    )


# --- the histogram's buckets --------------------------------------------------------------


def test_a_young_backlog_is_counted_by_the_hour_on_the_utc_grid() -> None:
    unit, edges = bucket_edges(dt.datetime(2024, 6, 1, 8, 20, tzinfo=dt.UTC), CUTOFF)

    assert unit == "hour"
    assert edges == [(at(8), at(9)), (at(9), at(10)), (at(10), at(11)), (at(11), CUTOFF)]


def test_two_days_is_still_hours_and_more_is_days() -> None:
    unit, edges = bucket_edges(CUTOFF - dt.timedelta(days=2), CUTOFF)
    assert unit == "hour"
    assert len(edges) == 49  # 48 whole hours and the partial ones at either end

    unit, edges = bucket_edges(CUTOFF - dt.timedelta(days=2, seconds=1), CUTOFF)
    assert unit == "day"
    assert edges[0][0] == dt.datetime(2024, 5, 30, tzinfo=dt.UTC)
    assert edges[-1] == (dt.datetime(2024, 6, 1, tzinfo=dt.UTC), CUTOFF)


def test_an_old_backlog_has_at_most_thirty_buckets_the_oldest_open_ended() -> None:
    unit, edges = bucket_edges(dt.datetime(2001, 9, 10, tzinfo=dt.UTC), CUTOFF)

    assert (unit, len(edges)) == ("day", MAX_DAY_BUCKETS)
    assert edges[0] == (None, dt.datetime(2024, 5, 4, tzinfo=dt.UTC))
    assert all(b[0] == a[1] for a, b in itertools.pairwise(edges))


def test_nothing_expired_has_no_buckets() -> None:
    assert bucket_edges(CUTOFF, CUTOFF) == ("hour", [])


def test_buckets_partition_the_expired_range() -> None:
    window = expired_range(Encoding.EPOCH_SECONDS, CUTOFF)
    oldest = dt.datetime(2024, 6, 1, 8, 20, tzinfo=dt.UTC)

    _unit, buckets = age_buckets(window, oldest, CUTOFF)

    ranges = [part for _start, _end, part in buckets]
    assert ranges[0].lo == int(at(8).timestamp())
    assert ranges[-1].hi == window.hi == cutoff_bound(Encoding.EPOCH_SECONDS, CUTOFF)
    assert all(a.hi == b.lo for a, b in itertools.pairwise(ranges))


def test_stream_slices_are_the_sweeps_own() -> None:
    window = expired_range(Encoding.EPOCH_SECONDS, CUTOFF)
    oldest = at(8)

    slices = stream_slices(window, oldest, 3)

    span = window.hi - int(oldest.timestamp())
    assert next((s.lo, s.hi) for s in slices) == (
        int(oldest.timestamp()),
        int(oldest.timestamp()) + span // 3,
    )
    assert slices[-1].hi == window.hi


# --- the calls of one pod -------------------------------------------------------------------


def test_pages_end_where_the_database_says_or_at_an_empty_call() -> None:
    # Firestore: up to 500 keys a call; the call that ends the range says so.
    assert [query_pages(n) for n in (0, 1, 499, 500, 501, 1000)] == [1, 1, 1, 1, 2, 2]
    # The legacy emulator: 300 a call whatever the limit, and an empty call ends the range.
    assert [query_pages(n, 300, False) for n in (0, 1, 300, 301, 6000)] == [1, 2, 2, 3, 21]
    # A scan reads 100 entities first, then pages of 500 (300 on the legacy emulator).
    firestore = [scan_pages(n, run_of()) for n in (0, 99, 100, 101, 600, 601, 2000)]
    assert firestore == [1, 1, 1, 2, 2, 3, 5]
    assert [scan_pages(n, LEGACY) for n in (0, 50, 100, 2000)] == [1, 2, 2, 9]


def test_one_stream_exactly() -> None:
    backlog = plan_backlog(hourly(700, 500), PLAIN, carrying=1500)

    ops = operations(backlog, PLAIN)

    # clock 1, format check 2, pages 1200 // 500 + 1 = 3, after the run: two COUNTs.
    assert ops.queries == 1 + 2 + 3 + 2
    # Each key is deleted at the version its page read: no lookup.
    assert (ops.commits, ops.entities_read, ops.deleted) == (3, 0, 1200)
    # Each query one read (the format check's two, one entity each), the COUNTs (300 entries:
    # one each), and each page's results (a page that returns versions bills per result).
    assert ops.billed_reads == 1 + 2 + 3 + 2 + 1200


def test_several_workers_page_their_counted_slices() -> None:
    settings = run_of(workers=4, max_fraction=1.0)

    backlog = plan_backlog(hourly(700, 500), settings, 1500, slices=[0, 499, 501, 200])

    # The projection that places the slices, then 1 + 1 + 2 + 1 pages.
    assert operations(backlog, settings).queries == 1 + 2 + 1 + 5 + 2
    assert operations(backlog, settings).commits == 0 + 1 + 2 + 1
    uncounted = plan_backlog(hourly(700, 500), settings, 1500)
    assert uncounted.streams == ((300, 300, 300, 300),)
    assert uncounted.estimated


def test_streams_placed_where_detection_read_the_oldest_value_need_no_projection() -> None:
    detected = replace(run_of(workers=4, max_fraction=1.0), encoding=Encoding.EPOCH_SECONDS)

    backlog = plan_backlog(hourly(700, 500), detected, 1500, slices=[0, 499, 501, 200])

    assert operations(backlog, detected).queries == 2 + 1 + 5 + 2
    # With nothing expired the oldest value lies past the range: the streams ask again.
    assert plan_backlog(hourly(0, 0), detected, 1500).probes == (1,)


def test_batch_size_cuts_every_page() -> None:
    settings = run_of(workers=1, batch_size=200, max_fraction=1.0, verify=False)

    ops = operations(plan_backlog(hourly(1200), settings, 1200), settings)

    assert ops.commits == 3 + 3 + 1  # 500 -> 200, 200, 100 twice; then 200


@pytest.mark.parametrize(("legacy", "commits"), [(False, 3), (True, 12 * 4)])
def test_verify_bills_each_key_once_in_commits_of_its_size(legacy: bool, commits: int) -> None:
    settings = run_of(legacy=legacy, workers=1, verify=True, max_fraction=1.0)
    blind = with_(settings, verify=False)

    ops = operations(plan_backlog(hourly(1200), settings, 1200), settings)

    assert (ops.commits, ops.entities_read) == (commits, 0)
    assert (
        ops.billed_reads
        == operations(plan_backlog(hourly(1200), blind, 1200), blind).billed_reads + 1200
    )


def test_the_guard_counts_first_and_says_when_it_refuses() -> None:
    guarded = run_of(workers=1, max_fraction=0.5)
    backlog = plan_backlog(hourly(1200), guarded, carrying=3000)

    assert not guard_refuses(backlog, guarded)
    # Two COUNTs before the first delete.
    assert operations(backlog, guarded).queries == operations(backlog, PLAIN).queries + 2

    refused = forecast(plan_backlog(hourly(1200), guarded, carrying=2000), guarded)
    assert refused.guard_refuses
    assert refused.run.sweep.max_fraction == 1.0  # the forecast of the run that will clear it


def test_the_legacy_emulator_pages_by_300_and_counts_through_keys() -> None:
    keys = with_(LEGACY, max_fraction=0.5)
    backlog = plan_backlog(hourly(1200), keys, carrying=3000)

    ops = operations(backlog, keys)

    # Stream: 4 calls and an empty one. Guard: 1200 due -> 5 calls; what carries the property
    # only as far as 1200 / 0.5 = 2400 -> 8. After the run: 1800 carrying -> 7, nothing due -> 1.
    assert ops.queries == 1 + 2 + 5 + (5 + 8) + (7 + 1)
    # A delete batch per call of 300 keys, re-checked in transactions of 25.
    assert ops.commits == 12 + 12 + 12 + 12
    # A bounded count stops at its bound: 10,000 after a run.
    assert retention_calls(50_000, 0, keys) == (34 + 1, 34 + 1)


def test_a_scan_reads_the_kind_and_checks_no_format() -> None:
    ops = operations(scan_backlog(2000, 1500, 0, estimated=True), PLAIN)

    # The clock and the read pages; no counts after it (what it read is what carries it).
    assert ops.queries == 1 + 5
    # Each of the 1500 due is deleted at the version the scan read: no second read.
    assert (ops.entities_read, ops.deleted, ops.commits) == (2000, 1500, 3)
    assert ops.billed_reads == 1 + 2000
    # The legacy emulator reads 300 a call, but the scan still hands on 500 keys a commit.
    legacy = operations(scan_backlog(2000, 1500, 0, estimated=True), with_(LEGACY, verify=False))
    assert (legacy.queries, legacy.commits) == (1 + 9, 3)


# --- shards ---------------------------------------------------------------------------------


def test_shards_own_hours_round_robin_and_probe_for_them() -> None:
    settings = run_of(shards=3, max_fraction=1.0)
    histogram = hourly(100, 200, 300, 400)  # hours 8, 9, 10, 11 (partial)

    backlog = plan_backlog(histogram, settings, carrying=1000)

    hour = int(at(8).timestamp()) // 3600
    owners = [(hour + i) % 3 for i in range(4)]
    expected = [
        tuple(n for n, o in zip((100, 200, 300, 400), owners, strict=True) if o == s)
        for s in range(3)
    ]
    assert list(backlog.streams) == expected
    assert backlog.due == 1000
    assert not backlog.estimated
    # Every probe lands on a non-empty hour or finds nothing: at most hours + 1 per shard.
    assert all(1 <= p <= 5 for p in backlog.probes)
    ops = operations(backlog, settings)
    assert ops.queries == 3 * (1 + 2 + 2) + sum(backlog.probes) + sum(
        query_pages(n) for s in backlog.streams for n in s
    )


def test_day_buckets_are_spread_over_their_hours_as_an_estimate() -> None:
    day = dt.datetime(2024, 5, 30, tzinfo=dt.UTC)
    histogram = Histogram("day", (Bucket(day, day + dt.timedelta(days=1), 50),))

    cells, estimated = hour_cells(histogram)

    assert estimated
    assert sum(cells.values()) == 50
    assert len(cells) == 24
    assert sorted(set(cells.values())) == [2, 3]


# --- time under the ramp-up -----------------------------------------------------------------


def test_every_batch_waits_for_its_budget_at_500_per_second() -> None:
    """The throttle is paid before: the last of 1,000 keys goes at 2 s, never faster."""
    assert ramp_time([1000], run_of()) == approx(2.0, BASE_RATE)


def test_time_across_ramp_steps() -> None:
    first_step = BASE_RATE * RAMP_INTERVAL_S  # 150,000 in the first five minutes
    keys = int(first_step) + 750  # then 750 more at 750/s

    duration, rate = ramp_time([keys], run_of())

    assert duration == pytest.approx(RAMP_INTERVAL_S + 1.0)
    assert rate == pytest.approx(BASE_RATE * RAMP_FACTOR)


def test_a_million_takes_the_time_docs_scaling_states() -> None:
    duration, rate = ramp_time([1_000_000], run_of())

    # 300,000 x (1.5^3 - 1) in 15 min, the rest at 500 x 1.5^3 = 1687.5/s.
    assert duration is not None
    assert rate is not None
    assert duration / 60 == pytest.approx(17.8, abs=0.05)
    assert rate == pytest.approx(1687.5)


def test_shards_share_the_budget_and_the_slowest_pod_decides() -> None:
    even = ramp_time([75_000, 75_000], run_of(shards=2))
    assert even == approx(RAMP_INTERVAL_S, BASE_RATE * RAMP_FACTOR)

    uneven, _rate = ramp_time([10_000, 5_000], run_of(shards=2))
    assert uneven == pytest.approx(10_000 / (BASE_RATE / 2))


def test_max_rate_caps_and_no_limit_is_no_time() -> None:
    capped = run_of(ramp_up=False, max_rate=100.0)
    assert ramp_time([1500], capped) == approx(15.0, 100.0)
    assert ramp_time([1500], run_of(ramp_up=False)) == (None, None)


# --- price, and settings as the sweep decides them ------------------------------------------


def test_price_at_the_stated_list_prices() -> None:
    backlog = Backlog(((100_000,),), (0,), carrying=100_000)

    result = forecast(backlog, PLAIN)

    reads = result.operations.billed_reads
    assert result.reads_usd == pytest.approx(reads * LIST_PRICES.reads_per_100k / 100_000)
    assert result.deletes_usd == pytest.approx(LIST_PRICES.deletes_per_100k)
    assert result.cost_usd == pytest.approx(result.reads_usd + result.deletes_usd)
    assert LIST_PRICES.as_of
    assert LIST_PRICES.source.startswith("https://")


@pytest.mark.parametrize(("server", "tx", "per_call"), [(True, 500, 500), (False, 25, 300)])
def test_the_run_checks_as_the_sweep_does(server: bool, tx: int, per_call: int) -> None:
    s = SweepSettings("k", "p", "auto", dt.timedelta(0), shard=Shard(0, 4))

    run = Run(s, reports_read_time=server, aggregation=server)

    assert (run.sweep.verify, run.transaction_keys, run.batch_keys) == (True, tx, per_call)
    assert math.isclose(run.sweep.max_fraction, 0.5)
    assert not run.projected
    assert not run.start_detected
    assert run.descendants_per_session is None
    text = replace(run, encoding=Encoding.ISO_8601)
    assert text.projected
    assert not text.start_detected
    assert replace(run, encoding=Encoding.EPOCH_SECONDS).start_detected
