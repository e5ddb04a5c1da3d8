"""Where the expired keys come from: range-query streams over slices, or a full scan.

Each stream is an iterator of key pages that one thread of the pipeline drains. Several streams
over disjoint slices of the expired range keep several queries in flight at once, and a shard
(one pod of several) only ever queries the slices that belong to it.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from google.cloud import datastore

from sweeper.encodings import Encoding, ExpiredRange, expired_range, is_expired
from sweeper.query import RangeQuery, first_value, key_pages, scan_expired
from sweeper.retry import Retrier
from sweeper.settings import SweepSettings
from sweeper.slices import Slice, shard_slices, split_even

KeyPages = Iterator[list[datastore.Key]]

# Shards own one-hour buckets of expiry time, round robin (see slices.shard_slices).
SHARD_BUCKET = dt.timedelta(hours=1)


def expired_streams(
    client: datastore.Client,
    retrier: Retrier,
    settings: SweepSettings,
    encoding: Encoding,
    cutoff: dt.datetime,
    *,
    log: Any,
    on_read: Callable[[int], None],
) -> list[KeyPages]:
    """Up to ``settings.workers`` independent streams of expired-key pages."""
    s = settings
    if s.scan:
        log.warning(
            "scan_started",
            property=s.prop,
            format=encoding.value,
            cost="one billed entity read per entity of the kind",
        )
        expired = partial(is_expired, encoding, cutoff=cutoff)
        return [scan_expired(client, retrier, s.kind, s.prop, expired=expired, on_read=on_read)]
    window = expired_range(encoding, cutoff)
    lo, hi = window.values()
    log.info("query_range", format=encoding.value, lower=str(lo), upper=str(hi), shard=str(s.shard))
    if window.empty:
        return []
    if s.workers == 1 and s.shard.count == 1:
        return [_pages(client, retrier, s, window)]
    # Start the slices at the oldest stored value, not at 2001: the old part is empty.
    start = first_value(client, retrier, _query(s, window))
    if start is None:
        return []
    if s.shard.count > 1:
        bucket = max(1, SHARD_BUCKET // dt.timedelta(microseconds=encoding.unit_us))
        slices = shard_slices(start, window.hi, s.shard, bucket)
    else:
        slices = split_even(start, window.hi, s.workers)
    groups = [slices[i :: s.workers] for i in range(s.workers)]
    return [_chained(client, retrier, s, encoding, group) for group in groups if group]


def _chained(
    client: datastore.Client,
    retrier: Retrier,
    settings: SweepSettings,
    encoding: Encoding,
    slices: list[Slice],
) -> KeyPages:
    return itertools.chain.from_iterable(
        _pages(client, retrier, settings, ExpiredRange(encoding, lo, hi)) for lo, hi in slices
    )


def _pages(
    client: datastore.Client, retrier: Retrier, settings: SweepSettings, window: ExpiredRange
) -> KeyPages:
    return key_pages(client, retrier, _query(settings, window))


def _query(settings: SweepSettings, window: ExpiredRange) -> RangeQuery:
    lo, hi = window.values()
    return RangeQuery(settings.kind, settings.prop, ((">=", lo), ("<", hi)))
