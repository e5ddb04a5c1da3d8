"""Boundaries of the expired range and classification of stored expiry values."""

from __future__ import annotations

import datetime as dt

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
        (float(CUTOFF_S), None),
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


def stored_values(encoding: Encoding) -> st.SearchStrategy[tuple[object, int]]:
    """A value stored in ``encoding`` and its instant in epoch microseconds."""
    band = encoding.band
    numbers = st.integers(min_value=band.lo, max_value=band.hi - 1)
    if encoding is Encoding.TIMESTAMP:
        return numbers.map(lambda us: (from_micros(us), us))
    return numbers.map(lambda n: (n, n * encoding.unit_us))


any_stored = st.sampled_from(list(Encoding)).flatmap(
    lambda e: stored_values(e).map(lambda pair: (e, pair[0], pair[1]))
)


@given(stored=any_stored, cutoff=cutoffs)
def test_is_expired_iff_instant_before_cutoff(
    stored: tuple[Encoding, object, int], cutoff: dt.datetime
) -> None:
    encoding, value, instant_us = stored
    assert is_expired(encoding, value, cutoff) == (instant_us < to_micros(cutoff))


@given(stored=any_stored, cutoff=cutoffs)
def test_expired_range_holds_exactly_the_expired_values(
    stored: tuple[Encoding, object, int], cutoff: dt.datetime
) -> None:
    encoding, _value, instant_us = stored
    window = expired_range(encoding, cutoff)
    index_value = instant_us // encoding.unit_us
    in_range = window.lo <= index_value < window.hi
    assert in_range == (instant_us < to_micros(cutoff))


@given(stored=any_stored, other=st.sampled_from(list(Encoding)), cutoff=cutoffs)
def test_value_of_another_encoding_is_never_expired(
    stored: tuple[Encoding, object, int], other: Encoding, cutoff: dt.datetime
) -> None:
    encoding, value, _instant = stored
    assume(other is not encoding)
    assert not is_expired(other, value, cutoff)


@given(stored=any_stored)
def test_classify_recovers_the_encoding(stored: tuple[Encoding, object, int]) -> None:
    encoding, value, _instant = stored
    assert classify(value) is encoding


nows = st.datetimes(
    min_value=dt.datetime(2001, 10, 1), max_value=dt.datetime(2280, 1, 1), timezones=st.just(UTC)
)
graces = st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(days=400))


@given(stored=any_stored, now=nows, grace=graces)
def test_grace_arithmetic_keeps_everything_expired_for_less_than_the_grace(
    stored: tuple[Encoding, object, int], now: dt.datetime, grace: dt.timedelta
) -> None:
    encoding, value, instant_us = stored
    expired_for = dt.timedelta(microseconds=to_micros(now) - instant_us)
    assert is_expired(encoding, value, now - grace) == (expired_for > grace)


@given(encoding=st.sampled_from(list(Encoding)), cutoff=nows, units=st.integers(-3, 3))
def test_a_value_exactly_at_the_cutoff_is_kept_and_one_unit_before_goes(
    encoding: Encoding, cutoff: dt.datetime, units: int
) -> None:
    whole = to_micros(cutoff) // encoding.unit_us * encoding.unit_us  # cutoff on a unit boundary
    at = dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=whole)
    number = whole // encoding.unit_us + units
    value: object = from_micros(number) if encoding is Encoding.TIMESTAMP else number
    assert is_expired(encoding, value, at) == (units < 0)


@given(
    encoding=st.sampled_from(list(Encoding)),
    cutoff=cutoffs,
    odd=st.one_of(
        st.integers(max_value=10**9 - 1),  # epoch 0, negatives, small numbers
        st.integers(min_value=10**16),  # far future, or microseconds as an int
        st.integers(min_value=10**10, max_value=10**12 - 1),  # between the bands
        st.booleans(),
        st.floats(allow_nan=False),
        st.text(max_size=5),
        st.none(),
    ),
)
def test_values_outside_every_band_are_never_expired(
    encoding: Encoding, cutoff: dt.datetime, odd: object
) -> None:
    assert not is_expired(encoding, odd, cutoff)


@given(seconds=stored_values(Encoding.EPOCH_SECONDS), cutoff=cutoffs)
def test_seconds_are_never_read_as_milliseconds_or_back(
    seconds: tuple[object, int], cutoff: dt.datetime
) -> None:
    value, _ = seconds
    assert not is_expired(Encoding.EPOCH_MILLIS, value, cutoff)
    assert isinstance(value, int)
    assert not is_expired(Encoding.EPOCH_SECONDS, value * 1000, cutoff)
