"""How an expiry can be stored, and the query range that matches only expired values.

Datastore orders a property's values by type first, integers with timestamps (a timestamp
compares as its microseconds) and text with byte strings, so a one-sided ``expires_at < now``
would match nulls and other encodings: every range here is bounded on both sides, inside one
encoding's *band* (docs/design.md, "How sweeper decides what to delete"). A band is cut in
*ordinals*, whole units of ``unit_us`` microseconds; ``stored`` never decreases, so disjoint
ordinal slices are disjoint ranges of stored values.

What a range cannot tell apart, the value must: a Timestamp from an integer of epoch
microseconds, or canonical ISO-8601 text (in time order: every field has a fixed width) from
other text sorting among it. Text ranges are read with their values and only canonical text is
taken; reads of whole entities (and lookups) see true types.
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def to_micros(instant: dt.datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding)."""
    if instant.tzinfo is None:
        raise ValueError("naive datetime: expiry instants must be timezone-aware")
    return (instant - EPOCH) // dt.timedelta(microseconds=1)


def from_micros(micros: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=micros)


class Encoding(enum.StrEnum):
    """A supported way of storing an expiry instant."""

    TIMESTAMP = "timestamp"
    EPOCH_SECONDS = "epoch-seconds"
    EPOCH_MILLIS = "epoch-millis"
    DOUBLE_SECONDS = "double-seconds"
    DOUBLE_MILLIS = "double-millis"
    ISO_8601 = "iso-8601"

    @property
    def unit_us(self) -> int:
        """Microseconds per ordinal: the unit ranges, slices and buckets are cut in."""
        return _CODECS[self].unit_us

    @property
    def band(self) -> Band:
        """The ordinals this encoding can take for instants from 2001-09-09 to 2286-11-20."""
        return _CODECS[self].band

    @property
    def needs_values(self) -> bool:
        """Whether a range of this encoding can hold values of no encoding (strings can)."""
        return self is Encoding.ISO_8601

    def stored(self, ordinal: int) -> QueryValue:
        """The value a filter carries for ``ordinal``: never decreasing as ordinals grow."""
        return _CODECS[self].stored(ordinal)

    def ordinal(self, value: object) -> int | None:
        """The largest ordinal whose :meth:`stored` value is at or below ``value`` (as a lookup
        or a projection returns it: a projected timestamp is its integer microseconds). None
        for a value of another type."""
        return _CODECS[self].ordinal(value)

    def store(self, instant: dt.datetime) -> QueryValue:
        """``instant`` as this encoding stores it, cut to the encoding's precision."""
        return self.stored(to_micros(instant) // self.unit_us)


@dataclass(frozen=True)
class Band:
    """A half-open range [lo, hi) of ordinals."""

    lo: int
    hi: int

    def __contains__(self, ordinal: object) -> bool:
        return isinstance(ordinal, int) and self.lo <= ordinal < self.hi


QueryValue = int | float | str | dt.datetime


@dataclass(frozen=True)
class _Codec:
    unit_us: int
    band: Band
    stored: Callable[[int], QueryValue]
    ordinal: Callable[[object], int | None]
    # Whether a value is of this encoding by its true type and form (band aside).
    reads: Callable[[object], bool]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_ordinal(value: object) -> int | None:
    return value if _is_int(value) else None  # type: ignore[return-value]


def _timestamp_ordinal(value: object) -> int | None:
    if isinstance(value, dt.datetime):
        return to_micros(_aware(value))
    return _int_ordinal(value)  # a projected timestamp: its microseconds


def _double(unit_us: int) -> _Codec:
    """Doubles of whole ``unit_us``, cut in microseconds (a cutoff inside a unit is honoured
    exactly) over the other bands' instants: an ordinal maps to the largest double at or below
    it, so ``value < stored(hi)`` implies the value is before ``hi`` exactly."""

    def stored(ordinal: int) -> float:
        exact = Fraction(ordinal, unit_us)
        value = float(exact)  # nearest double
        return value if Fraction(value) <= exact else math.nextafter(value, -math.inf)

    def ordinal(value: object) -> int | None:
        if not isinstance(value, float) or not math.isfinite(value):
            return None
        above = math.nextafter(value, math.inf)
        if not math.isfinite(above):
            return None
        # stored(n) <= value iff n / unit_us < the next double above value.
        return math.ceil(Fraction(above) * unit_us) - 1

    return _Codec(1, Band(10**15, 10**16), stored, ordinal, lambda v: isinstance(v, float))


# The one text form sweeper reads: UTC, milliseconds, "Z" (JavaScript's toISOString()).
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


def iso_text(millis: int) -> str:
    instant = EPOCH + dt.timedelta(milliseconds=millis)
    return instant.strftime("%Y-%m-%dT%H:%M:%S.") + f"{instant.microsecond // 1000:03d}Z"


def _iso_millis(text: str) -> int | None:
    """Milliseconds of a canonical ISO-8601 text; None for any other text."""
    if not _ISO.fullmatch(text):
        return None
    try:
        instant = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:  # month 13, February 30th, ...
        return None
    millis = to_micros(instant) // 1000
    return millis if iso_text(millis) == text else None


def _text(value: object) -> str | None:
    """Text as the index compares it: a string, or a byte string (the two sort together)."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _iso_ordinal(stored: object) -> int | None:
    """Canonical text: its milliseconds. Other text: the last canonical form at or below it."""
    value = _text(stored)
    if value is None:
        return None
    exact = _iso_millis(value)
    if exact is not None:
        return exact
    lo, hi = Encoding.ISO_8601.band.lo, Encoding.ISO_8601.band.hi
    if value < iso_text(lo) or value >= iso_text(hi):  # outside the band
        return lo - 1 if value < iso_text(lo) else hi
    while hi - lo > 1:  # iso_text never decreases: bisect for the floor
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if iso_text(mid) <= value else (lo, mid)
    return lo


def _reads_iso(value: object) -> bool:
    text = _text(value)
    return text is not None and _iso_millis(text) is not None


_SECONDS, _MILLIS = 10**6, 10**3
_CODECS = {
    Encoding.EPOCH_SECONDS: _Codec(_SECONDS, Band(10**9, 10**10), int, _int_ordinal, _is_int),
    Encoding.EPOCH_MILLIS: _Codec(_MILLIS, Band(10**12, 10**13), int, _int_ordinal, _is_int),
    Encoding.TIMESTAMP: _Codec(
        1,
        Band(10**15, 10**16),
        from_micros,
        _timestamp_ordinal,
        lambda v: isinstance(v, dt.datetime),
    ),
    Encoding.DOUBLE_SECONDS: _double(_SECONDS),
    Encoding.DOUBLE_MILLIS: _double(_MILLIS),
    Encoding.ISO_8601: _Codec(_MILLIS, Band(10**12, 10**13), iso_text, _iso_ordinal, _reads_iso),
}


@dataclass(frozen=True)
class ExpiredRange:
    """Ordinals ``lo <= n < hi`` of one encoding; empty when ``hi <= lo``."""

    encoding: Encoding
    lo: int
    hi: int

    @property
    def empty(self) -> bool:
        return self.hi <= self.lo

    def values(self) -> tuple[QueryValue, QueryValue]:
        """The bounds as the values a query filter must carry for this encoding."""
        return self.encoding.stored(self.lo), self.encoding.stored(self.hi)


def band_range(encoding: Encoding) -> ExpiredRange:
    """Every ordinal of ``encoding``'s band, expired or not."""
    return ExpiredRange(encoding, encoding.band.lo, encoding.band.hi)


def cutoff_bound(encoding: Encoding, cutoff: dt.datetime) -> int:
    """Smallest ordinal that is *not* expired: ``n < bound`` iff ordinal ``n`` is before cutoff
    (whole units: ``n < ceil(cutoff)``; a value exactly at the cutoff is kept)."""
    return -(-to_micros(cutoff) // encoding.unit_us)


def expired_range(encoding: Encoding, cutoff: dt.datetime) -> ExpiredRange:
    """The two-sided range of values of ``encoding`` that lie before ``cutoff``."""
    band = encoding.band
    hi = min(max(cutoff_bound(encoding, cutoff), band.lo), band.hi)
    return ExpiredRange(encoding, band.lo, hi)


def classify(value: object) -> Encoding | None:
    """The encoding of a value as a lookup returns it (true type), or None if unsupported:
    booleans (ints in Python, not in Datastore), ints in the timestamp band (epoch microseconds)
    and text in any form but canonical ISO-8601 are no encoding."""
    for encoding, codec in _CODECS.items():
        if codec.reads(value) and codec.ordinal(value) in codec.band:
            return encoding
    return None


def is_expired(encoding: Encoding, value: object, cutoff: dt.datetime) -> bool:
    """True only for a value stored in ``encoding`` that lies before ``cutoff``: the range
    query's own comparison, the value against the filter's upper bound."""
    if classify(value) is not encoding:
        return False
    bound = encoding.stored(cutoff_bound(encoding, cutoff))
    if isinstance(value, dt.datetime):
        return _aware(value) < bound  # type: ignore[operator]
    if isinstance(value, bytes):
        return _text(value) < bound  # type: ignore[operator]
    return value < bound  # type: ignore[operator]


@dataclass(frozen=True)
class Rule:
    """What may be deleted: an entity of ``kind`` whose ``prop`` is expired in ``encoding``."""

    kind: str
    prop: str
    encoding: Encoding
    cutoff: dt.datetime

    def due(self, value: object) -> bool:
        return is_expired(self.encoding, value, self.cutoff)


def _aware(value: dt.datetime) -> dt.datetime:
    """Datastore timestamps are UTC; a naive one from an old writer means UTC too."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def describe_value(value: object) -> str:
    """How a stored value reads in a refusal message: its type and a short repr."""
    text = repr(value)
    if len(text) > 40:
        text = text[:39] + "…"
    return f"{text} ({type(value).__name__})"


# -- Slices: disjoint parts of an expired range -----------------------------------------------
# A slice ``[lo, hi)`` of ordinals is itself a two-sided range of one encoding. Slices never
# overlap, so no key is found by two streams or two pods.

Slice = tuple[int, int]


def split_even(lo: int, hi: int, parts: int) -> list[Slice]:
    """``[lo, hi)`` cut into at most ``parts`` contiguous, non-empty slices of near-equal width."""
    if hi <= lo:
        return []
    parts = max(1, min(parts, hi - lo))
    bounds = [lo + (hi - lo) * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if a < b]


def shard_slices(
    lo: int,
    hi: int,
    shard: tuple[int, int],
    bucket: int,
    next_value: Callable[[int, int], int | None],
) -> Iterator[Slice]:
    """The non-empty parts of ``[lo, hi)`` that belong to ``shard`` (its index and the count of
    shards), oldest first, found lazily.

    Bucket ``b`` of a fixed grid (multiples of ``bucket`` from 0) belongs to shard ``b % count``,
    so every pod computes the same assignment whatever its clock says the cutoff is and
    whatever ``lo`` it starts from: pods never overlap. Neighbouring buckets go to different
    shards, which spreads a burst of sessions that expired together. ``next_value(pos, hi)``
    (one limit-1 query) finds the smallest stored value at or after ``pos``: its bucket is
    yielded if ours, else the walk jumps to our next bucket after it. Each probe yields or steps
    over a non-empty bucket, so the work follows the data, not its span (walking the grid, one
    stray value from 2001 would cost ~220,000 one-hour queries).
    """
    index, count = shard
    pos = lo
    while pos < hi:
        value = next_value(pos, hi)
        if value is None:
            return
        # The probe answers an ordinal at or below the value it found, never below ``pos``
        # (each slice's range starts there); clamping keeps the walk moving whatever it says.
        b = max(value, pos) // bucket
        owner = b % count
        if owner == index:
            end = min(hi, (b + 1) * bucket)
            yield (max(pos, b * bucket), end)
            pos = end
        else:  # no value lies in [pos, value); buckets b.. up to our next one are not ours
            pos = (b + (index - owner) % count) * bucket
