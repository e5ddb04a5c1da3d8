"""Where the expired keys come from: range-query streams over slices, or a full scan.

Each stream is an iterator of key pages that one thread of the pipeline drains. Several streams
over disjoint slices of the expired range keep several queries in flight at once, and a shard
(one pod of several) only ever queries the slices that belong to it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from sweeper.encodings import Encoding, ExpiredRange, classify, expired_range, is_expired
from sweeper.rpc import Seen
from sweeper.settings import Shard, SweepSettings
from sweeper.target import PAGE_SIZE, Target

# Pages of candidates, each key with the version and value its read saw (the gate deletes
# that version); a blind run's keys-only pages carry neither (version 0, value None).
KeyPages = Iterator[list[Seen]]

# Shards own one-hour buckets of expiry time, round robin (see slices.shard_slices).
SHARD_BUCKET = dt.timedelta(hours=1)


def expired_streams(
    target: Target,
    settings: SweepSettings,
    encoding: Encoding,
    cutoff: dt.datetime,
    *,
    smallest: int | None = None,
    log: Any,
    on_read: Callable[[int], None],
    seen: Counter[str] | None = None,
    on_left_alone: Callable[[int], None] = lambda n: None,
) -> list[KeyPages]:
    """Up to ``settings.workers`` independent streams of expired ranges or key pages.

    A scan counts in ``seen`` the encodings of the non-null values it reads, so the engine can
    tell a scan that found nothing to do from one that could never have matched anything.
    Values in the range that are of no encoding (text in another form) are left alone and
    counted through ``on_left_alone``. ``smallest`` is the smallest stored value's ordinal
    where detection has read it already: the slices start there instead of at a value queried
    for (a value changed since, so that it lies past the range, is queried for all the same).
    A stream reads its next page while the workers delete the last one.
    """
    s = settings
    if s.scan:
        log.warning(
            "scan_started",
            property=s.prop,
            format=encoding.value,
            cost="one billed entity read per entity of the kind",
        )
        return [scan_expired(target, partial(_tallied, seen, encoding, cutoff), on_read)]
    verify = s.verify
    window = expired_range(encoding, cutoff)
    lo, hi = window.values()
    log.info("query_range", format=encoding.value, lower=str(lo), upper=str(hi), shard=str(s.shard))
    if window.empty:
        return []
    pages = partial(_pages, target, verify=verify, on_left_alone=on_left_alone)
    if s.shard.count > 1:
        return _shard_streams(target, s, window, pages)
    if s.workers == 1:
        return [pages(window)]
    # Start the slices at the oldest stored value, not at 2001: the old part is empty.
    start = smallest if smallest is not None and window.lo <= smallest < window.hi else None
    if start is None:
        start = target.first_value(target.within(window), encoding)
    if start is None:
        return []
    slices = split_even(start, window.hi, s.workers)
    return [pages(ExpiredRange(encoding, a, b)) for a, b in slices]


def _tallied(
    seen: Counter[str] | None, encoding: Encoding, cutoff: dt.datetime, value: object
) -> bool:
    if seen is not None and value is not None:
        found = classify(value)
        seen[found.value if found else "unsupported"] += 1
    return is_expired(encoding, value, cutoff)


def scan_expired(
    target: Target, expired: Callable[[object], bool], on_read: Callable[[int], None]
) -> KeyPages:
    """Every entity of the kind whose value is ``expired``, by reading them all; handed on in
    pages of up to ``PAGE_SIZE`` (one full commit), whatever the read pages."""
    pending: list[Seen] = []
    for found in target.scan_pages():
        on_read(len(found))
        pending += [s for s in found if expired(s.value)]
        while len(pending) >= PAGE_SIZE:
            yield pending[:PAGE_SIZE]
            pending = pending[PAGE_SIZE:]
    if pending:
        yield pending


def _shard_streams(
    target: Target,
    settings: SweepSettings,
    window: ExpiredRange,
    pages: Callable[[ExpiredRange], KeyPages],
) -> list[KeyPages]:
    """``workers`` streams that share this shard's buckets, found as they are needed."""
    encoding = window.encoding

    def next_value(pos: int, hi: int) -> int | None:
        return target.first_value(target.within(ExpiredRange(encoding, pos, hi)), encoding)

    bucket = max(1, SHARD_BUCKET // dt.timedelta(microseconds=encoding.unit_us))
    shared = _Shared(shard_slices(window.lo, window.hi, settings.shard, bucket, next_value))

    def stream() -> KeyPages:
        for a, b in shared:
            yield from pages(ExpiredRange(encoding, a, b))

    return [stream() for _ in range(settings.workers)]


class _Shared:
    """One iterator of slices drawn from by several streams (generators are not thread-safe)."""

    def __init__(self, slices: Iterator[Slice]) -> None:
        self._slices = slices
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[Slice]:
        return self

    def __next__(self) -> Slice:
        with self._lock:
            return next(self._slices)


def _pages(
    target: Target, window: ExpiredRange, *, verify: bool, on_left_alone: Callable[[int], None]
) -> KeyPages:
    """The entities of ``window``, a page at a time, each with its version and value; of a
    text range, only those whose value is of the range's encoding. A blind run of a range
    that needs no values reads keys only (one billed read per page, not per key).

    A text range also holds text in other forms and byte strings that sort between its ends
    (``2026-11-22``, ``2026-11-22T10:15:00+01:00``): they are left alone, and counted.
    """
    encoding = window.encoding
    if not verify and not encoding.needs_values:
        for keys in target.key_pages(target.within(window)):
            yield [Seen(k, 0, None) for k in keys]
        return
    for page in target.seen_pages(target.within(window, keys_only=False)):
        kept = [s for s in page if classify(s.value) is encoding]
        if len(kept) < len(page):
            on_left_alone(len(page) - len(kept))
        if kept:
            yield kept


# -- Slices: disjoint parts of an expired range -----------------------------------------------
# Values are ordinals of one encoding (whole seconds, milliseconds or microseconds: see
# ``encodings``), so a slice ``[lo, hi)`` is itself a two-sided range query that can match only
# that encoding. Slices never overlap, so no key is found by two streams or two pods.

Slice = tuple[int, int]


def split_even(lo: int, hi: int, parts: int) -> list[Slice]:
    """``[lo, hi)`` cut into at most ``parts`` contiguous, non-empty slices of near-equal width."""
    if hi <= lo:
        return []
    parts = max(1, min(parts, hi - lo))
    bounds = [lo + (hi - lo) * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if a < b]


def shard_slices(
    lo: int, hi: int, shard: Shard, bucket: int, next_value: Callable[[int, int], int | None]
) -> Iterator[Slice]:
    """The non-empty parts of ``[lo, hi)`` that belong to ``shard``, oldest first, found lazily.

    The grid of buckets (multiples of ``bucket`` from 0) is fixed, and bucket ``b`` belongs to
    shard ``b % count``, so every pod computes the same assignment whatever its own clock says
    the cutoff is and whatever ``lo`` it starts from: pods never overlap. Neighbouring buckets
    go to different shards, which spreads a burst of sessions that expired together.

    Walking the grid bucket by bucket would cost one query per bucket of the whole span: one
    stray value from 2001 makes that ~220,000 one-hour buckets, nearly all empty. Instead
    ``next_value(pos, hi)`` (one limit-1 query) finds the smallest stored value at or after
    ``pos``: if its bucket is ours, that bucket is yielded and the walk moves past it; if not,
    the walk jumps to our next bucket after it. Every probe either yields a non-empty bucket
    or steps over a non-empty bucket of another shard, so a shard makes at most one probe per
    non-empty bucket, plus one: the work follows the data, not its span.
    """
    pos = lo
    while pos < hi:
        value = next_value(pos, hi)
        if value is None:
            return
        # The probe answers an ordinal at or below the value it found, never below ``pos``
        # (each slice's range starts there); clamping keeps the walk moving whatever it says.
        b = max(value, pos) // bucket
        owner = b % shard.count
        if owner == shard.index:
            end = min(hi, (b + 1) * bucket)
            yield (max(pos, b * bucket), end)
            pos = end
        else:  # no value lies in [pos, value); buckets b.. up to our next one are not ours
            pos = (b + (shard.index - owner) % shard.count) * bucket
