"""Proof that retention works: what a target holds past its cutoff once a run is done.

"Did it run, and is it keeping up?" is what an operator needs, and what native TTL hides
(its lag is "typically within 24 hours"). After each run sweeper measures what is left: how
many entities are still past the cutoff (a bounded count), the expiry of the oldest of them,
and how many entities carry the property at all. The last one tells a healthy target with
nothing due from a target that holds nothing: a typo in ``--kind`` or ``--namespace`` finds
nothing to delete forever, and "0 expired left" would read as "keeping up".
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import partial
from typing import Any

from sweeper.concurrency import together
from sweeper.encodings import Encoding, expired_range, from_micros
from sweeper.target import Count, Target

# Counts after a run stop here and say so: enough to tell "keeping up" from "falling behind",
# cheap on any database (at most 10 reads as an aggregation).
RETENTION_COUNT_LIMIT = 10_000


@dataclass(frozen=True)
class Retention:
    """What is left: past the cutoff (``expired_left``, its oldest expiry) and in all."""

    carrying: Count
    expired_left: Count | None = None  # None: no encoding, nothing could be past the cutoff
    oldest_expired: dt.datetime | None = None
    # A scan's values are in no index: what it read is all that is known, and what is left
    # past the cutoff would take another full read to count.
    scanned: bool = False

    @property
    def empty(self) -> bool:
        """No entity carries the property: the target is probably misnamed."""
        return self.carrying.n == 0

    def fields(self) -> dict[str, Any]:
        left, oldest = self.expired_left, self.oldest_expired
        return {
            "carrying": self.carrying.n,
            "carrying_is_lower_bound": self.carrying.lower_bound,
            "empty": self.empty,
            "expired_left": None if self.scanned else (left.n if left else 0),
            "expired_left_is_lower_bound": bool(left and left.lower_bound),
            "oldest_expired": oldest.isoformat().replace("+00:00", "Z") if oldest else None,
        }


def measure_retention(
    target: Target, *, encoding: Encoding | None, cutoff: dt.datetime
) -> Retention:
    """Two bounded COUNTs (at once) and one limit-1 projection query."""
    carried = partial(target.count, target.carrying(), RETENTION_COUNT_LIMIT)
    if encoding is None:
        return Retention(carried())
    query = target.within(expired_range(encoding, cutoff))
    left, carrying = together(partial(target.count, query, RETENTION_COUNT_LIMIT), carried)
    first = target.first_value(query, encoding, strict=True) if left.n else None
    oldest = None if first is None else from_micros(first * encoding.unit_us)
    return Retention(carrying, left, oldest)
