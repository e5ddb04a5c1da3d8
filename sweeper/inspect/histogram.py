"""The expired backlog by age: buckets of expiry time on the UTC hour or day grid.

Pure: :func:`age_buckets` and :func:`stream_slices` say which ranges of stored values to count
(``inspect`` counts them), and :func:`hour_cells` turns the counts into what each shard will
meet. The grid is the shards'
own (a shard owns whole UTC hours of expiry time), so hour buckets say exactly which pod
deletes what. A young backlog (up to two days) is counted by the hour, at most 49 buckets; an
older one by the day, at most ``MAX_DAY_BUCKETS``, the oldest bucket open-ended.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from sweeper.encodings import EPOCH, ExpiredRange, cutoff_bound, to_micros
from sweeper.sources import split_even

Unit = Literal["hour", "day"]
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
HOURLY_SPAN = dt.timedelta(days=2)
MAX_DAY_BUCKETS = 30
_TICK = dt.timedelta(microseconds=1)


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

    @property
    def end_hour(self) -> int | None:
        """The UTC hour (counted from the epoch) after the youngest bucket's last."""
        return hour_of(self.buckets[-1].end - _TICK) + 1 if self.buckets else None


def bucket_edges(
    oldest: dt.datetime, cutoff: dt.datetime
) -> tuple[Unit, list[tuple[dt.datetime | None, dt.datetime]]]:
    """Buckets covering ``[oldest, cutoff)`` on the UTC grid, the youngest ending at ``cutoff``."""
    if oldest >= cutoff:
        return "hour", []
    unit: Unit = "hour" if cutoff - oldest <= HOURLY_SPAN else "day"
    width = HOUR if unit == "hour" else DAY
    first, last = _floor(oldest, width), _floor(cutoff - _TICK, width)
    cells = (last - first) // width + 1
    open_ended = unit == "day" and cells > MAX_DAY_BUCKETS
    if open_ended:
        first, cells = last - (MAX_DAY_BUCKETS - 1) * width, MAX_DAY_BUCKETS
    starts = [first + i * width for i in range(cells)]
    edges: list[tuple[dt.datetime | None, dt.datetime]] = [
        (start, min(start + width, cutoff)) for start in starts
    ]
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
    """The slices one pod's ``workers`` query streams page through (``sources.expired_streams``):
    from the oldest expired value to the cutoff, cut evenly."""
    start = to_micros(oldest) // window.encoding.unit_us
    slices = split_even(start, window.hi, workers)
    return [ExpiredRange(window.encoding, a, b) for a, b in slices]


def hour_cells(histogram: Histogram) -> tuple[dict[int, int], bool]:
    """Expired entities per UTC hour (the shards' buckets), and whether that is an estimate.

    Exact for hour buckets; a day bucket is spread evenly over its hours, and the open-ended
    oldest bucket is put in the hour before its end.
    """
    cells: dict[int, int] = {}
    for b in histogram.buckets:
        last = hour_of(b.end - _TICK)
        first = last if b.start is None else hour_of(b.start)
        q, r = divmod(b.count, last - first + 1)
        for i, hour in enumerate(range(first, last + 1)):
            if q + (i < r):
                cells[hour] = q + (i < r)
    return cells, histogram.unit != "hour"


def hour_of(instant: dt.datetime) -> int:
    """The UTC hour of ``instant``, counted from the epoch: a shard bucket's number."""
    return (instant - EPOCH) // HOUR


def _floor(instant: dt.datetime, width: dt.timedelta) -> dt.datetime:
    return EPOCH + ((instant - EPOCH) // width) * width
