"""How an expiry can be stored, and the query range that matches only expired values.

Datastore orders integers and timestamps together, numerically (a timestamp compares as its
microseconds since the epoch), with nulls before both. A one-sided filter such
as ``expires_at < now`` therefore also matches nulls and values of other encodings. What does
separate the encodings is magnitude: for dates after 2001-09-09, epoch seconds lie in
[1e9, 1e10), epoch milliseconds in [1e12, 1e13) and timestamps in [1e15, 1e16) microseconds. A
range bounded on both sides inside one band can match only values of that encoding, never null.

The index cannot tell a Timestamp from an *integer* of epoch microseconds (both sort as the same
number); ``detect`` looks sampled entities up to catch that case.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ONE_MICROSECOND = dt.timedelta(microseconds=1)


class Encoding(enum.StrEnum):
    """A supported way of storing an expiry instant."""

    TIMESTAMP = "timestamp"
    EPOCH_SECONDS = "epoch-seconds"
    EPOCH_MILLIS = "epoch-millis"

    @property
    def unit_us(self) -> int:
        """Microseconds per stored unit: how the index compares this encoding."""
        return _UNIT_US[self]

    @property
    def band(self) -> Band:
        """The stored values this encoding can take for dates from 2001-09-09 to 2286-11-20."""
        return _BANDS[self]


@dataclass(frozen=True)
class Band:
    """A half-open range [lo, hi) of index order, in the encoding's own unit."""

    lo: int
    hi: int

    def __contains__(self, number: object) -> bool:
        return isinstance(number, int) and self.lo <= number < self.hi


_UNIT_US = {
    Encoding.TIMESTAMP: 1,
    Encoding.EPOCH_MILLIS: 1_000,
    Encoding.EPOCH_SECONDS: 1_000_000,
}
_BANDS = {
    Encoding.EPOCH_SECONDS: Band(10**9, 10**10),
    Encoding.EPOCH_MILLIS: Band(10**12, 10**13),
    Encoding.TIMESTAMP: Band(10**15, 10**16),
}

QueryValue = int | dt.datetime


@dataclass(frozen=True)
class ExpiredRange:
    """Filter values for ``lo <= property < hi``; empty when ``hi <= lo``."""

    encoding: Encoding
    lo: int
    hi: int

    @property
    def empty(self) -> bool:
        return self.hi <= self.lo

    def values(self) -> tuple[QueryValue, QueryValue]:
        """The bounds as the values a query filter must carry for this encoding."""
        if self.encoding is Encoding.TIMESTAMP:
            return from_micros(self.lo), from_micros(self.hi)
        return self.lo, self.hi


def to_micros(instant: dt.datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding)."""
    if instant.tzinfo is None:
        raise ValueError("naive datetime: expiry instants must be timezone-aware")
    return (instant - EPOCH) // ONE_MICROSECOND


def from_micros(micros: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=micros)


def cutoff_bound(encoding: Encoding, cutoff: dt.datetime) -> int:
    """Smallest stored value that is *not* expired: ``v < bound`` iff ``v`` is before cutoff.

    Stored values are whole units, so ``v < cutoff`` equals ``v < ceil(cutoff)``; a value exactly
    at the cutoff is kept.
    """
    return -(-to_micros(cutoff) // encoding.unit_us)


def expired_range(encoding: Encoding, cutoff: dt.datetime) -> ExpiredRange:
    """The two-sided range of values of ``encoding`` that lie before ``cutoff``."""
    band = encoding.band
    hi = min(max(cutoff_bound(encoding, cutoff), band.lo), band.hi)
    return ExpiredRange(encoding, band.lo, hi)


def classify(value: object) -> Encoding | None:
    """The encoding of a value as a lookup returns it (true type), or None if unsupported.

    Booleans are ints in Python but a different type in Datastore; an int in the timestamp band
    is epoch microseconds, which sweeper does not sweep.
    """
    if isinstance(value, dt.datetime):
        return Encoding.TIMESTAMP if to_micros(_aware(value)) in Encoding.TIMESTAMP.band else None
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    for encoding in (Encoding.EPOCH_SECONDS, Encoding.EPOCH_MILLIS):
        if value in encoding.band:
            return encoding
    return None


def is_expired(encoding: Encoding, value: object, cutoff: dt.datetime) -> bool:
    """True only for a value stored in ``encoding`` that lies before ``cutoff``."""
    if classify(value) is not encoding:
        return False
    if isinstance(value, dt.datetime):
        return to_micros(_aware(value)) < cutoff_bound(encoding, cutoff)
    return isinstance(value, int) and value < cutoff_bound(encoding, cutoff)


def _aware(value: dt.datetime) -> dt.datetime:
    """Datastore timestamps are UTC; a naive one from an old writer means UTC too."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def describe_value(value: object) -> str:
    """How a stored value reads in a refusal message: its type and a short repr."""
    text = repr(value)
    if len(text) > 40:
        text = text[:39] + "…"
    return f"{text} ({type(value).__name__})"
