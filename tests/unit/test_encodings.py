"""Boundaries of the expired range and classification of stored expiry values."""

from __future__ import annotations

import datetime as dt
from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sweeper.encodings import (
    Encoding,
    ExpiredRange,
    classify,
    cutoff_bound,
    expired_range,
    from_micros,
    is_expired,
    to_micros,
)

UTC = dt.UTC
# 2023-11-14T22:13:20Z: a whole second, 1_700_000_000 epoch seconds.
CUTOFF = dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
CUTOFF_S = 1_700_000_000


def test_cutoff_bound_per_unit() -> None:
    assert cutoff_bound(Encoding.EPOCH_SECONDS, CUTOFF) == CUTOFF_S
    assert cutoff_bound(Encoding.EPOCH_MILLIS, CUTOFF) == CUTOFF_S * 1_000
    assert cutoff_bound(Encoding.TIMESTAMP, CUTOFF) == CUTOFF_S * 1_000_000


def test_cutoff_bound_rounds_sub_unit_cutoff_up() -> None:
    cutoff = CUTOFF + dt.timedelta(microseconds=1)
    assert cutoff_bound(Encoding.EPOCH_SECONDS, cutoff) == CUTOFF_S + 1
    assert cutoff_bound(Encoding.EPOCH_MILLIS, cutoff) == CUTOFF_S * 1_000 + 1
    assert cutoff_bound(Encoding.TIMESTAMP, cutoff) == CUTOFF_S * 1_000_000 + 1


def test_value_at_sub_second_cutoff_floor_is_expired() -> None:
    cutoff = CUTOFF + dt.timedelta(microseconds=500_000)
    # 1_700_000_000 s is half a second before the cutoff; the next second is after it.
    assert is_expired(Encoding.EPOCH_SECONDS, CUTOFF_S, cutoff)
    assert not is_expired(Encoding.EPOCH_SECONDS, CUTOFF_S + 1, cutoff)


def test_value_exactly_at_cutoff_is_kept() -> None:
    assert not is_expired(Encoding.EPOCH_SECONDS, CUTOFF_S, CUTOFF)
    assert not is_expired(Encoding.EPOCH_MILLIS, CUTOFF_S * 1_000, CUTOFF)
    assert not is_expired(Encoding.TIMESTAMP, CUTOFF, CUTOFF)


def test_value_one_unit_before_cutoff_is_expired() -> None:
    assert is_expired(Encoding.EPOCH_SECONDS, CUTOFF_S - 1, CUTOFF)
    assert is_expired(Encoding.EPOCH_MILLIS, CUTOFF_S * 1_000 - 1, CUTOFF)
    assert is_expired(Encoding.TIMESTAMP, CUTOFF - dt.timedelta(microseconds=1), CUTOFF)


def test_expired_range_spans_band_start_to_cutoff() -> None:
    for encoding in Encoding:
        window = expired_range(encoding, CUTOFF)
        assert window.lo == encoding.band.lo
        assert window.hi == cutoff_bound(encoding, CUTOFF)
        assert not window.empty


def test_expired_range_clamps_far_future_cutoff_to_band() -> None:
    far = dt.datetime(2500, 1, 1, tzinfo=UTC)
    for encoding in Encoding:
        window = expired_range(encoding, far)
        assert window.hi == encoding.band.hi


def test_expired_range_is_empty_for_cutoff_before_2001() -> None:
    early = dt.datetime(2000, 1, 1, tzinfo=UTC)
    for encoding in Encoding:
        window = expired_range(encoding, early)
        assert window.empty
        assert window.hi == window.lo == encoding.band.lo


def test_range_values_are_datetimes_for_timestamp() -> None:
    lo, hi = expired_range(Encoding.TIMESTAMP, CUTOFF).values()
    assert lo == dt.datetime(2001, 9, 9, 1, 46, 40, tzinfo=UTC)
    assert hi == CUTOFF


def test_range_values_are_ints_for_epoch_encodings() -> None:
    assert expired_range(Encoding.EPOCH_SECONDS, CUTOFF).values() == (10**9, CUTOFF_S)
    lo, hi = ExpiredRange(Encoding.EPOCH_MILLIS, 10**12, 5 * 10**12).values()
    assert (lo, hi) == (10**12, 5 * 10**12)
    assert type(lo) is int
    assert type(hi) is int


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (CUTOFF_S, Encoding.EPOCH_SECONDS),
        (CUTOFF_S * 1_000, Encoding.EPOCH_MILLIS),
        (CUTOFF, Encoding.TIMESTAMP),
        (10**9, Encoding.EPOCH_SECONDS),
        (10**10 - 1, Encoding.EPOCH_SECONDS),
        (10**10, None),
        (10**12, Encoding.EPOCH_MILLIS),
        (999_999_999, None),
        (CUTOFF_S * 1_000_000, None),  # an int of epoch micros: unsupported
        (True, None),
        (False, None),
        (float(CUTOFF_S), Encoding.DOUBLE_SECONDS),
        (float(CUTOFF_S) * 1000, Encoding.DOUBLE_MILLIS),
        (float(CUTOFF_S) + 0.5, Encoding.DOUBLE_SECONDS),
        (1e11, None),
        (float("nan"), None),
        (float("inf"), None),
        ("2023-11-14T22:13:20.000Z", Encoding.ISO_8601),
        ("2023-11-14T22:13:20Z", None),
        (b"2023-11-14T22:13:20.000Z", Encoding.ISO_8601),  # bytes sort and project as text
        (b"\xff2023-11-14T22:13:20.000Z", None),
        (str(CUTOFF_S), None),
        (None, None),
        (dt.datetime(1999, 1, 1, tzinfo=UTC), None),
    ],
)
def test_classify(value: object, expected: Encoding | None) -> None:
    assert classify(value) is expected


def test_bool_is_never_expired() -> None:
    cutoff = dt.datetime(2100, 1, 1, tzinfo=UTC)
    assert not is_expired(Encoding.EPOCH_SECONDS, True, cutoff)


def test_int_micros_never_expired_as_timestamp() -> None:
    assert not is_expired(Encoding.TIMESTAMP, CUTOFF_S * 1_000_000 - 1, CUTOFF)


def test_naive_datetime_value_is_read_as_utc() -> None:
    naive = CUTOFF.replace(tzinfo=None)
    assert classify(naive) is Encoding.TIMESTAMP
    assert not is_expired(Encoding.TIMESTAMP, naive, CUTOFF)
    assert is_expired(Encoding.TIMESTAMP, naive - dt.timedelta(microseconds=1), CUTOFF)


def test_offset_datetime_value_compares_by_instant() -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    same_instant = CUTOFF.astimezone(plus_two)
    assert not is_expired(Encoding.TIMESTAMP, same_instant, CUTOFF)
    assert is_expired(Encoding.TIMESTAMP, same_instant - dt.timedelta(seconds=1), CUTOFF)


def test_naive_cutoff_is_rejected() -> None:
    with pytest.raises(ValueError, match="naive"):
        to_micros(CUTOFF.replace(tzinfo=None))


def test_micros_round_trip_exactly() -> None:
    instant = dt.datetime(2286, 11, 20, 17, 46, 39, 999_999, tzinfo=UTC)
    assert to_micros(instant) == 10**16 - 1
    assert from_micros(10**16 - 1) == instant


# --- properties -------------------------------------------------------------------------

cutoffs = st.datetimes(
    min_value=dt.datetime(1995, 1, 1),
    max_value=dt.datetime(2300, 1, 1),
    timezones=st.just(UTC),
)


# Exact encodings: whole units, so "expired" is exactly "before the cutoff".
EXACT = [e for e in Encoding if e not in (Encoding.DOUBLE_SECONDS, Encoding.DOUBLE_MILLIS)]
DOUBLE_SCALE = {Encoding.DOUBLE_SECONDS: 10**6, Encoding.DOUBLE_MILLIS: 10**3}


def stored_values(encoding: Encoding) -> st.SearchStrategy[tuple[object, Fraction]]:
    """A value stored in ``encoding`` and its exact instant in epoch microseconds."""
    band = encoding.band
    if encoding in DOUBLE_SCALE:
        scale = DOUBLE_SCALE[encoding]
        doubles = st.floats(
            min_value=band.lo / scale, max_value=band.hi / scale, exclude_max=True
        ).filter(lambda v: band.lo <= Fraction(v) * scale < band.hi)
        return doubles.map(lambda v: (v, Fraction(v) * scale))
    ordinals = st.integers(min_value=band.lo, max_value=band.hi - 1)
    return ordinals.map(lambda n: (encoding.stored(n), Fraction(n * encoding.unit_us)))


any_stored = st.sampled_from(list(Encoding)).flatmap(
    lambda e: stored_values(e).map(lambda pair: (e, pair[0], pair[1]))
)


@given(stored=any_stored, cutoff=cutoffs)
def test_is_expired_only_before_the_cutoff(
    stored: tuple[Encoding, object, Fraction], cutoff: dt.datetime
) -> None:
    encoding, value, instant_us = stored
    expired = is_expired(encoding, value, cutoff)
    if encoding in EXACT:
        assert expired == (instant_us < to_micros(cutoff))
    else:  # a double at the cutoff's last microsecond may be kept, never one after it
        assert not expired or instant_us < to_micros(cutoff)
        assert expired or instant_us >= to_micros(cutoff) - 1


@given(stored=any_stored, cutoff=cutoffs)
def test_expired_range_holds_exactly_what_is_expired(
    stored: tuple[Encoding, object, Fraction], cutoff: dt.datetime
) -> None:
    """The query's bounds, compared with the value as the index does, agree with is_expired."""
    encoding, value, _instant = stored
    lo, hi = expired_range(encoding, cutoff).values()
    in_range = lo <= value < hi  # type: ignore[operator]
    assert in_range == is_expired(encoding, value, cutoff)


@given(stored=any_stored, other=st.sampled_from(list(Encoding)), cutoff=cutoffs)
def test_value_of_another_encoding_is_never_expired(
    stored: tuple[Encoding, object, Fraction], other: Encoding, cutoff: dt.datetime
) -> None:
    encoding, value, _instant = stored
    assume(other is not encoding)
    assert not is_expired(other, value, cutoff)


@given(stored=any_stored)
def test_classify_recovers_the_encoding(stored: tuple[Encoding, object, Fraction]) -> None:
    encoding, value, _instant = stored
    assert classify(value) is encoding


@given(stored=any_stored)
def test_ordinal_is_the_floor_of_the_stored_value(
    stored: tuple[Encoding, object, Fraction],
) -> None:
    """``stored(ordinal(v)) <= v < stored(ordinal(v) + 1)``: slices cut at ordinals hold v once."""
    encoding, value, _instant = stored
    n = encoding.ordinal(value)
    assert n is not None
    assert encoding.stored(n) <= value < encoding.stored(n + 1)  # type: ignore[operator]


@given(encoding=st.sampled_from(list(Encoding)), a=st.integers(), b=st.integers())
def test_stored_never_decreases(encoding: Encoding, a: int, b: int) -> None:
    band = encoding.band
    a, b = sorted((band.lo + a % (band.hi - band.lo), band.lo + b % (band.hi - band.lo)))
    assert encoding.stored(a) <= encoding.stored(b)  # type: ignore[operator]


nows = st.datetimes(
    min_value=dt.datetime(2001, 10, 1), max_value=dt.datetime(2280, 1, 1), timezones=st.just(UTC)
)
graces = st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(days=400))


@given(stored=any_stored, now=nows, grace=graces)
def test_grace_arithmetic_keeps_everything_expired_for_less_than_the_grace(
    stored: tuple[Encoding, object, Fraction], now: dt.datetime, grace: dt.timedelta
) -> None:
    encoding, value, instant_us = stored
    expired_for = to_micros(now) - instant_us
    grace_us = grace // dt.timedelta(microseconds=1)
    expired = is_expired(encoding, value, now - grace)
    if encoding in EXACT:
        assert expired == (expired_for > grace_us)
    else:  # a double within a microsecond of the cutoff may be kept
        assert not expired or expired_for > grace_us
        assert expired or expired_for <= grace_us + 1


@given(encoding=st.sampled_from(EXACT), cutoff=nows, units=st.integers(-3, 3))
def test_a_value_exactly_at_the_cutoff_is_kept_and_one_unit_before_goes(
    encoding: Encoding, cutoff: dt.datetime, units: int
) -> None:
    whole = to_micros(cutoff) // encoding.unit_us * encoding.unit_us  # cutoff on a unit boundary
    at = dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=whole)
    value = encoding.stored(whole // encoding.unit_us + units)
    assert is_expired(encoding, value, at) == (units < 0)


@given(
    encoding=st.sampled_from(list(Encoding)),
    cutoff=cutoffs,
    odd=st.one_of(
        st.integers(max_value=10**9 - 1),  # epoch 0, negatives, small numbers
        st.integers(min_value=10**16),  # far future, or microseconds as an int
        st.integers(min_value=10**10, max_value=10**12 - 1),  # between the bands
        st.booleans(),
        st.floats(max_value=10**9, exclude_max=True),  # durations, NaN, -inf
        st.floats(min_value=10**10, max_value=10**12, exclude_max=True),
        st.floats(min_value=10**13),  # beyond milliseconds, inf
        st.text(max_size=5),
        st.binary(max_size=30),
        # text that sorts among canonical ISO-8601 but is not in that form
        st.builds(
            lambda d, tail: d.isoformat() + tail,
            st.datetimes(min_value=dt.datetime(2002, 1, 1), max_value=dt.datetime(2200, 1, 1)),
            st.sampled_from(["", "Z", "+00:00", "+01:00", ".5Z", "z"]),
        ),
        st.dates(min_value=dt.date(2002, 1, 1)).map(str),
        st.none(),
    ),
)
def test_values_outside_every_band_are_never_expired(
    encoding: Encoding, cutoff: dt.datetime, odd: object
) -> None:
    assert not is_expired(encoding, odd, cutoff)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-22T10:15:00.000Z",
        "2001-09-09T01:46:40.000Z",
        "2286-11-20T17:46:39.999Z",
    ],
)
def test_canonical_iso_text_is_read(text: str) -> None:
    assert classify(text) is Encoding.ISO_8601


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-22T10:15:00Z",  # no milliseconds
        "2026-11-22T10:15:00.000000Z",  # microseconds
        "2026-11-22T10:15:00.000+00:00",  # an offset, even zero
        "2026-11-22T11:15:00.000+01:00",
        "2026-11-22",  # a date only
        "2026-11-22 10:15:00.000Z",  # a space
        "2026-11-22t10:15:00.000z",  # lower case
        "2026-02-30T10:15:00.000Z",  # no such day
        "2026-11-22T24:00:00.000Z",
        "1999-11-22T10:15:00.000Z",  # before the band
        " 2026-11-22T10:15:00.000Z",
    ],
)
def test_iso_text_in_any_other_form_is_no_encoding(text: str) -> None:
    assert classify(text) is None
    assert not is_expired(Encoding.ISO_8601, text, dt.datetime(2100, 1, 1, tzinfo=UTC))


def test_doubles_are_not_integers_and_back() -> None:
    assert classify(float(CUTOFF_S)) is Encoding.DOUBLE_SECONDS
    assert classify(float(CUTOFF_S) * 1000) is Encoding.DOUBLE_MILLIS
    assert not is_expired(Encoding.EPOCH_SECONDS, float(CUTOFF_S - 10), CUTOFF)
    assert not is_expired(Encoding.DOUBLE_SECONDS, CUTOFF_S - 10, CUTOFF)


def test_a_double_cutoff_honours_microseconds() -> None:
    cutoff = CUTOFF + dt.timedelta(microseconds=250_000)
    assert is_expired(Encoding.DOUBLE_SECONDS, CUTOFF_S + 0.2, cutoff)
    assert not is_expired(Encoding.DOUBLE_SECONDS, CUTOFF_S + 0.3, cutoff)
    assert is_expired(Encoding.DOUBLE_MILLIS, CUTOFF_S * 1000 + 249.0, cutoff)
    assert not is_expired(Encoding.DOUBLE_MILLIS, CUTOFF_S * 1000 + 250.0, cutoff)


@given(seconds=stored_values(Encoding.EPOCH_SECONDS), cutoff=cutoffs)
def test_seconds_are_never_read_as_milliseconds_or_back(
    seconds: tuple[object, Fraction], cutoff: dt.datetime
) -> None:
    value, _ = seconds
    assert not is_expired(Encoding.EPOCH_MILLIS, value, cutoff)
    assert isinstance(value, int)
    assert not is_expired(Encoding.EPOCH_SECONDS, value * 1000, cutoff)
