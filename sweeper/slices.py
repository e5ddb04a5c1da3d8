"""Disjoint slices of an expired range: parallel query streams, and shards across pods.

Values are ordinals of one encoding (whole seconds, milliseconds or microseconds: see
``encodings``), so a slice ``[lo, hi)`` is itself a two-sided range query that can match only that
encoding. Slices never overlap, so no key is found by two streams or two pods.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sweeper.errors import UsageError

Slice = tuple[int, int]

_SHARD = re.compile(r"(\d+)/(\d+)")

# The most pods a run may be cut into: ``sweep --shard I/N`` and ``inspect --shards N``. Each
# pod starts at 1/N of the ramp-up's 500 deletes/s, 0.05/s at this limit: an N past it is a
# typo, not a plan.
MAX_SHARDS = 10_000


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based, as Kubernetes' JOB_COMPLETION_INDEX)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD.fullmatch(text.strip())
        if not match:
            raise UsageError(f"invalid shard {text!r}: use I/N, e.g. 0/4 (I from 0 to N-1)")
        try:
            index, count = int(match[1]), int(match[2])
        except ValueError:  # more digits than Python converts (4300), too many to echo back
            raise UsageError(
                f"invalid shard: I and N must be at most {MAX_SHARDS} (given thousands of digits)"
            ) from None
        if count > MAX_SHARDS:
            raise UsageError(f"invalid shard {text!r}: N must be at most {MAX_SHARDS}")
        if count < 1 or not 0 <= index < count:
            raise UsageError(f"invalid shard {text!r}: I must be between 0 and N-1, N >= 1")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


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
