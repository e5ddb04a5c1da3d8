"""Shards and slices of the expired range: ``Shard.parse``, ``split_even`` and the lazy,
probe-driven ``shard_slices`` walk (disjoint, complete, ordered, and paid for by the data, not
by the width of the range)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sweeper.encodings import Slice, shard_slices, split_even
from sweeper.logs import UsageError
from sweeper.settings import Shard


class Probe:
    """``next_value`` over sorted stored values, as a limit-1 range query; counts its calls."""

    def __init__(self, values: Sequence[int]) -> None:
        self.values = sorted(values)
        self.calls = 0

    def __call__(self, pos: int, hi: int) -> int | None:
        self.calls += 1
        i = bisect.bisect_left(self.values, pos)
        if i < len(self.values) and self.values[i] < hi:
            return self.values[i]
        return None


def walk(
    values: Sequence[int], lo: int, hi: int, shard: Shard, bucket: int
) -> tuple[list[Slice], int]:
    probe = Probe(values)
    slices = list(shard_slices(lo, hi, (shard.index, shard.count), bucket, probe))
    return slices, probe.calls


def contains(slices: Sequence[Slice], value: int) -> bool:
    return any(a <= value < b for a, b in slices)


# --- Shard.parse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0/1", Shard(0, 1)), ("0/4", Shard(0, 4)), ("3/4", Shard(3, 4)), (" 2/8 ", Shard(2, 8))],
)
def test_parse_accepts_index_below_count(text: str, expected: Shard) -> None:
    assert Shard.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["4/4", "5/4", "0/0", "1/0", "-1/4", "1", "a/b", "1/2/3", "", "1 / 2"]
)
def test_parse_rejects_malformed_or_out_of_range(text: str) -> None:
    with pytest.raises(UsageError) as info:
        Shard.parse(text)
    assert info.value.exit_code == 2
    assert repr(text) in info.value.message


def test_shard_prints_as_it_parses() -> None:
    assert str(Shard.parse("3/7")) == "3/7"
    assert str(Shard()) == "0/1"


# --- split_even ----------------------------------------------------------------------------


@given(lo=st.integers(-(10**12), 10**12), width=st.integers(1, 10**6), parts=st.integers(-2, 64))
@settings(max_examples=200)
def test_split_even_covers_range_with_contiguous_near_equal_slices(
    lo: int, width: int, parts: int
) -> None:
    hi = lo + width
    slices = split_even(lo, hi, parts)
    assert slices[0][0] == lo
    assert slices[-1][1] == hi
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
    assert all(a < b for a, b in slices)
    assert len(slices) == min(max(parts, 1), width)
    widths = [b - a for a, b in slices]
    assert max(widths) - min(widths) <= 1


@pytest.mark.parametrize(("lo", "hi"), [(5, 5), (5, 4), (0, -10)])
def test_split_even_of_empty_range_is_empty(lo: int, hi: int) -> None:
    assert split_even(lo, hi, 4) == []


def test_split_even_never_makes_more_slices_than_values() -> None:
    assert split_even(10, 13, 8) == [(10, 11), (11, 12), (12, 13)]


# --- shard_slices: examples ----------------------------------------------------------------


def test_shard_slices_probes_nothing_until_iterated() -> None:
    probe = Probe([1, 2, 3])
    slices = shard_slices(0, 10, (0, 2), 2, probe)
    assert probe.calls == 0
    assert next(slices) == (0, 2)
    assert probe.calls == 1


def test_shard_slices_yields_only_owned_non_empty_buckets() -> None:
    # Buckets of 10: values in buckets 0, 1, 3, 4 and 7; shard 1/2 owns the odd ones.
    values = [3, 15, 31, 44, 72]
    slices, _calls = walk(values, 0, 100, Shard(1, 2), 10)
    assert slices == [(10, 20), (30, 40), (70, 80)]


def test_shard_slices_clip_first_and_last_bucket_to_range() -> None:
    slices, _calls = walk([5, 12, 25], 4, 26, Shard(0, 1), 10)
    assert slices == [(4, 10), (10, 20), (20, 26)]


def test_bucket_owner_does_not_depend_on_lo() -> None:
    values = list(range(0, 1000, 7))
    for shard in (Shard(0, 3), Shard(1, 3), Shard(2, 3)):
        wide, _ = walk(values, 0, 1000, shard, 50)
        narrow, _ = walk(values, 333, 1000, shard, 50)
        assert [(max(a, 333), b) for a, b in wide if b > 333] == narrow


def test_one_stray_old_value_does_not_cost_a_probe_per_empty_bucket() -> None:
    # One value from 1970 and a burst near 1e9 s: ~280,000 one-hour buckets between them.
    values = [7, *range(10**9, 10**9 + 20 * 3600, 97)]
    buckets = {v // 3600 for v in values}
    for index in range(4):
        slices, calls = walk(values, 0, 10**9 + 10**6, Shard(index, 4), 3600)
        assert calls <= len(buckets) + 1
        assert all(b - a <= 3600 for a, b in slices)


def test_empty_range_makes_no_probe() -> None:
    slices, calls = walk([1, 2, 3], 10, 10, Shard(0, 1), 5)
    assert (slices, calls) == ([], 0)


# --- shard_slices: properties --------------------------------------------------------------

VALUES = st.lists(
    st.one_of(
        st.integers(0, 20_000),
        st.integers(10**9 - 50_000, 10**9 + 50_000),
        st.integers(0, 2 * 10**9),
    ),
    max_size=40,
    unique=True,
)
BUCKETS = st.one_of(st.sampled_from([1, 2, 3, 3600]), st.integers(1, 100_000))
BOUND = st.one_of(
    st.integers(0, 30_000),
    st.integers(10**9 - 60_000, 10**9 + 60_000),
    st.integers(0, 2 * 10**9 + 1),
)


@st.composite
def walks(draw: st.DrawFn) -> tuple[list[int], int, int, int, int]:
    values = draw(VALUES)
    a, b = draw(BOUND), draw(BOUND)
    if a == b:
        b += 1
    lo, hi = min(a, b), max(a, b)
    return values, lo, hi, draw(BUCKETS), draw(st.integers(1, 8))


@given(walks())
@settings(max_examples=300, deadline=None)
def test_shard_slices_partition_every_value_of_the_range(
    case: tuple[list[int], int, int, int, int],
) -> None:
    values, lo, hi, bucket, count = case
    per_shard = [walk(values, lo, hi, Shard(i, count), bucket)[0] for i in range(count)]

    # (a) no two slices overlap, across all shards; each lies in [lo, hi) and is non-empty.
    every = sorted(itertools.chain.from_iterable(per_shard))
    assert all(lo <= a < b <= hi for a, b in every)
    assert all(x[1] <= y[0] for x, y in itertools.pairwise(every))
    # (b) every stored value of [lo, hi) lies in exactly one shard's slices; no other does.
    for value in values:
        owners = sum(contains(slices, value) for slices in per_shard)
        assert owners == (1 if lo <= value < hi else 0)
    # (c) each shard's slices come oldest first.
    for slices in per_shard:
        assert all(x[1] <= y[0] for x, y in itertools.pairwise(slices))
    # Each slice lies inside one bucket that its shard owns.
    for index, slices in enumerate(per_shard):
        for a, b in slices:
            assert a // bucket == (b - 1) // bucket
            assert (a // bucket) % count == index


@given(walks())
@settings(max_examples=300, deadline=None)
def test_shard_probes_at_most_one_per_non_empty_bucket_plus_one(
    case: tuple[list[int], int, int, int, int],
) -> None:
    values, lo, hi, bucket, count = case
    non_empty = len({v // bucket for v in values if lo <= v < hi})
    for index in range(count):
        _slices, calls = walk(values, lo, hi, Shard(index, count), bucket)
        assert calls <= non_empty + 1
