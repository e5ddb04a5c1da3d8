"""``--format auto`` detection and the check before an explicit ``--format``, on a fake client
that orders values as Datastore's index does and whose lookups return true types."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import cast

import pytest
import structlog
from google.cloud import datastore
from structlog.testing import capture_logs

from sweeper.checks import UNINDEXED_SAMPLE, check_explicit, decide_encoding, read_ends
from sweeper.encodings import Encoding
from sweeper.logs import RefusedError
from sweeper.retry import Retrier, RetryCounter, RetryPolicy
from sweeper.target import Target
from tests.unit.fakes import KIND, MISSING, PROP, FakeClient, entities, index_order

SECONDS = 1_700_000_000
MILLIS = SECONDS * 1000
MICROS = SECONDS * 1_000_000  # an int of epoch microseconds: sorts with timestamps
STAMP = dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)


def retrier() -> Retrier:
    return Retrier(RetryPolicy(max_attempts=2), RetryCounter(), sleep=lambda _s: None)


def stored(values: Sequence[object], unindexed: bool = False) -> FakeClient:
    """One kind's entities, in key order; queries use the index, lookups read true types."""
    return FakeClient(entities(values, unindexed=unindexed), index=True)


def detect(values: Sequence[object], unindexed: bool = False) -> Encoding | None:
    client = cast(datastore.Client, stored(values, unindexed))
    return detect_encoding(Target(client, retrier(), KIND, PROP))


def detect_encoding(target: Target) -> Encoding | None:
    """What ``sweep --format auto`` decides: the ends of the index read, then decided."""
    return decide_encoding(read_ends(target), KIND, PROP, structlog.get_logger("sweeper"))


def check(values: Sequence[object], encoding: Encoding) -> tuple[str, ...]:
    client = cast(datastore.Client, stored(values))
    return check_explicit(Target(client, retrier(), KIND, PROP), encoding)


# --- the fake orders values as Datastore does ----------------------------------------------


def test_fake_index_order_matches_datastore() -> None:
    values: list[object] = [2.5, "a", True, STAMP, SECONDS, None, MILLIS, False, MICROS + 1]
    ordered = sorted(values, key=index_order)
    assert ordered == [None, SECONDS, MILLIS, STAMP, MICROS + 1, False, True, "a", 2.5]


# --- detect_encoding -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([SECONDS, SECONDS - 86_400, SECONDS + 60], Encoding.EPOCH_SECONDS),
        ([MILLIS], Encoding.EPOCH_MILLIS),
        ([STAMP, STAMP + dt.timedelta(days=3)], Encoding.TIMESTAMP),
    ],
    ids=["epoch-seconds", "epoch-millis-single-value", "timestamp"],
)
def test_one_encoding_is_detected(values: list[object], expected: Encoding) -> None:
    assert detect(values) is expected


def test_nulls_and_missing_values_do_not_disturb_detection() -> None:
    with capture_logs() as logs:
        assert detect([None, SECONDS, MISSING, SECONDS + 1, None]) is Encoding.EPOCH_SECONDS
    (event,) = [e for e in logs if e["event"] == "format_detected"]
    assert event["encodings"] == ["epoch-seconds"]
    assert event["smallest"] == f"{SECONDS} (int)"
    assert event["largest"] == f"{SECONDS + 1} (int)"


def test_mixed_encodings_are_refused_naming_both() -> None:
    with pytest.raises(RefusedError) as info:
        detect([SECONDS, None, MILLIS])
    message = info.value.message
    assert f"{SECONDS} (int), epoch-seconds" in message
    assert f"{MILLIS} (int), epoch-millis" in message
    assert "more than one encoding" in message
    assert "Nothing was deleted" in message


def test_a_stray_value_beyond_the_ints_is_refused() -> None:
    with pytest.raises(RefusedError) as info:
        detect([SECONDS, SECONDS + 1, "1700000000"])
    assert "values of no supported encoding" in info.value.message
    assert "'1700000000' (str)" in info.value.message


def test_ints_of_microseconds_beside_timestamps_are_refused() -> None:
    # The index sorts both as the same numbers; only the lookup's true types tell them apart.
    with pytest.raises(RefusedError) as info:
        detect([STAMP, MICROS + 10])
    assert "no supported encoding" in info.value.message


def test_no_values_at_all_is_none() -> None:
    assert detect([None, MISSING, None]) is None
    assert detect([]) is None


def test_unindexed_values_are_refused() -> None:
    with pytest.raises(RefusedError) as info:
        detect([SECONDS] * 30 + [MISSING], unindexed=True)
    message = info.value.message
    assert "looks unindexed" in message
    assert f"{UNINDEXED_SAMPLE} of {UNINDEXED_SAMPLE} sampled entities" in message
    assert "--scan" in message


def test_an_end_deleted_before_the_lookup_is_looked_for_again() -> None:
    fake = stored([SECONDS, SECONDS + 1, SECONDS + 2])
    oldest = fake.keys[0]
    fake.on_lookup = lambda: fake.drop(oldest)  # deleted by another pod meanwhile
    found = detect_encoding(Target(cast(datastore.Client, fake), retrier(), KIND, PROP))
    assert found is Encoding.EPOCH_SECONDS  # not refused as "more than one encoding"


# --- check_explicit ------------------------------------------------------------------------


def test_explicit_band_holding_all_values_has_no_others() -> None:
    assert check([None, SECONDS, SECONDS + 5, MISSING], Encoding.EPOCH_SECONDS) == ()


def test_explicit_band_with_other_encodings_beside_it_names_them() -> None:
    assert check([SECONDS, MILLIS], Encoding.EPOCH_SECONDS) == ("epoch-millis",)
    assert check([SECONDS, MILLIS], Encoding.EPOCH_MILLIS) == ("epoch-seconds",)


def test_explicit_band_between_other_values_names_them_all() -> None:
    # 5 (no encoding) is the smallest, a string the largest; the seconds lie between.
    values: list[object] = [5, SECONDS, "x", SECONDS + 1]
    assert check(values, Encoding.EPOCH_SECONDS) == ("unsupported",)
    assert check([5, SECONDS, MILLIS], Encoding.EPOCH_SECONDS) == ("epoch-millis", "unsupported")


def test_explicit_empty_band_is_refused_naming_what_is_stored_and_the_format_to_use() -> None:
    with pytest.raises(RefusedError) as info:
        check([MILLIS, MILLIS + 1], Encoding.EPOCH_SECONDS)
    message = info.value.message
    assert "refusing --format epoch-seconds" in message
    assert "holds no epoch-seconds value at all" in message
    assert f"{MILLIS} (int), epoch-millis" in message
    assert "--format epoch-millis would match them" in message


def test_explicit_empty_band_with_timestamps_suggests_timestamp() -> None:
    with pytest.raises(RefusedError) as info:
        check([STAMP], Encoding.EPOCH_MILLIS)
    assert "--format timestamp would match them" in info.value.message


def test_explicit_empty_band_with_several_encodings_suggests_none() -> None:
    with pytest.raises(RefusedError) as info:
        check([SECONDS, "x"], Encoding.EPOCH_MILLIS)
    assert "no single --format matches them all" in info.value.message


def test_ints_of_microseconds_do_not_fill_the_timestamp_band() -> None:
    with pytest.raises(RefusedError) as info:
        check([MICROS, MICROS + 1], Encoding.TIMESTAMP)
    assert "holds no timestamp value at all" in info.value.message


def test_explicit_with_no_value_at_all_is_nothing_to_check() -> None:
    assert check([None, MISSING], Encoding.TIMESTAMP) == ()
    assert check([], Encoding.EPOCH_SECONDS) == ()


def test_explicit_with_unindexed_values_is_refused() -> None:
    client = cast(datastore.Client, stored([MILLIS, MILLIS], unindexed=True))
    with pytest.raises(RefusedError, match="looks unindexed"):
        check_explicit(Target(client, retrier(), KIND, PROP), Encoding.EPOCH_MILLIS)
