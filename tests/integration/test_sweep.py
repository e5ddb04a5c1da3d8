"""The spec of ``sweeper sweep``, against the real emulators: what is left after a run."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from google.cloud import datastore
from structlog.testing import capture_logs

from sweeper.encodings import Encoding
from sweeper.settings import FormatChoice
from tests.integration.helpers import (
    ago,
    ahead,
    group_names,
    hook_api,
    make_client,
    remaining,
    seed,
    stored,
    survivors,
    sweep,
)
from tests.support.emulator import Emulator
from tests.support.seed import MISSING, Session, encode, names, put_sessions

S, MS, TS = Encoding.EPOCH_SECONDS, Encoding.EPOCH_MILLIS, Encoding.TIMESTAMP


def test_runner_shaped_kind_loses_exactly_its_expired_sessions(
    client: datastore.Client, kind: str
) -> None:
    groups: dict[str, list[object]] = {
        "expired": stored(ago(hours=4), S, 300),
        "live": stored(ahead(minutes=30), S, 100),
        "in-flight": [None] * 20,
        "missing": [MISSING] * 20,
        "within-grace": stored(ago(minutes=5), S, 20),
    }
    seed(client, kind, groups)

    result = sweep(client, kind)

    assert survivors(client, kind, groups) == {"live", "in-flight", "missing", "within-grace"}
    assert (result.format, result.matched, result.deleted, result.failed) == (S, 300, 300, 0)
    assert result.stopped_reason == "complete"
    assert result.exit_code == 0


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_each_encoding_is_swept(
    client: datastore.Client, kind: str, encoding: Encoding, explicit: bool
) -> None:
    groups: dict[str, list[object]] = {
        "expired": stored(ago(hours=1), encoding, 30),
        "live": stored(ahead(hours=1), encoding, 30),
        "null": [None] * 5,
    }
    seed(client, kind, groups)

    result = sweep(client, kind, encoding if explicit else "auto")

    assert survivors(client, kind, groups) == {"live", "null"}
    assert (result.format, result.deleted) == (encoding.value, 30)


@pytest.mark.parametrize("encoding", list(Encoding))
def test_explicit_format_leaves_other_encodings_alone(
    client: datastore.Client, kind: str, encoding: Encoding
) -> None:
    # Every value below is expired; only the chosen encoding may go.
    groups = {e.value: stored(ago(days=2), e, 10) for e in Encoding}
    groups["small-int"] = [5, 0, -1]
    # Expired instants as text in other forms than the canonical one.
    groups["string"] = ["2020-01-01T00:00:00Z", "2020-01-01", "2020-01-01T00:00:00.000+00:00"]
    # Expired instants as doubles of no supported unit (microseconds, minutes), and booleans.
    two_days_ago = ago(days=2).timestamp()
    groups["float"] = [two_days_ago * 1e6, two_days_ago / 60, 0.5]
    groups["boolean"] = [True, False]
    seed(client, kind, groups)

    result = sweep(client, kind, encoding)

    others = [g for g in groups if g != encoding.value]
    assert survivors(client, kind, groups) == set(others)
    assert result.deleted == 10


@pytest.mark.parametrize("encoding", list(Encoding))
def test_explicit_format_names_the_other_encodings_it_leaves_alone(
    client: datastore.Client, kind: str, encoding: Encoding
) -> None:
    groups = {e.value: stored(ago(days=2), e, 10) for e in Encoding}
    seed(client, kind, groups)

    with capture_logs() as logs:
        result = sweep(client, kind, encoding)

    others = sorted(e.value for e in Encoding if e is not encoding)
    assert (result.exit_code, result.deleted) == (0, 10)
    assert list(result.other_encodings) == others
    (warning,) = [e for e in logs if e["event"] == "other_encodings_present"]
    assert warning["left_alone"] == others


@pytest.mark.parametrize(
    ("stored_as", "asked"),
    [(S, Encoding.TIMESTAMP), (Encoding.TIMESTAMP, S), (S, MS)],
    ids=["seconds-asked-timestamp", "timestamp-asked-seconds", "seconds-asked-millis"],
)
def test_an_explicit_format_that_can_match_nothing_is_refused(
    client: datastore.Client, kind: str, stored_as: Encoding, asked: Encoding
) -> None:
    """The shipped config once swept the runner's int submitted_at as timestamps: forever 0."""
    groups: dict[str, list[object]] = {
        "expired": stored(ago(days=2), stored_as, 20),
        "null": [None] * 3,
    }
    seed(client, kind, groups)

    result = sweep(client, kind, asked)

    assert (result.exit_code, result.stopped_reason, result.deleted) == (1, "error", 0)
    assert result.error is not None
    assert f"holds no {asked.value} value" in result.error
    assert f"--format {stored_as.value} would match them" in result.error
    assert survivors(client, kind, groups) == set(groups)


def test_a_scan_that_reads_no_value_of_its_format_is_refused(
    client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(days=2), Encoding.TIMESTAMP, 20)}
    seed(client, kind, groups)

    result = sweep(client, kind, S, scan=True)

    assert (result.exit_code, result.deleted, result.entities_read) == (1, 0, 20)
    assert result.error is not None
    assert "none is epoch-seconds (20 timestamp)" in result.error


def test_auto_refuses_mixed_encodings_and_deletes_nothing(
    client: datastore.Client, kind: str
) -> None:
    groups = {
        "seconds": stored(ago(days=1), S, 50),
        "millis": stored(ago(days=1), MS, 2),
    }
    seed(client, kind, groups)

    result = sweep(client, kind)

    assert survivors(client, kind, groups) == set(groups)
    assert result.exit_code == 1
    assert result.stopped_reason == "error"
    assert result.error is not None
    assert "epoch-seconds" in result.error
    assert "epoch-millis" in result.error
    assert result.deleted == 0


@pytest.mark.parametrize(
    "odd",
    [5, "tomorrow", 1.7e15, True, 1_672_531_200_000_000],
    ids=["small-int", "string", "float-micros", "boolean", "epoch-micros-int"],
)
def test_auto_refuses_values_it_cannot_read(
    client: datastore.Client, kind: str, odd: object
) -> None:
    groups = {"seconds": stored(ago(days=1), S, 20), "odd": [odd]}
    seed(client, kind, groups)

    result = sweep(client, kind)

    assert result.exit_code == 1
    assert result.error is not None
    assert "no supported encoding" in result.error
    assert survivors(client, kind, groups) == set(groups)


def index_order(client: datastore.Client, kind: str) -> list[str]:
    """The names of ``kind``'s entities in the index order of ``expires_at`` (nulls first)."""
    query = client.query(kind=kind)
    query.keys_only()
    query.order = ["expires_at"]
    return [entity.key.name for entity in query.fetch()]


# Datastore orders values by type first: null < integers and timestamps (together, by
# magnitude) < booleans < strings and byte strings < doubles < geo points < keys. A double or a
# boolean therefore never sits between two integers, whatever its numeric value: 1.75e9 sorts
# after 1.8e9 and True after every timestamp, and both emulators agree (checked below). Each
# supported encoding owns one contiguous part of that order, so no value sweeper cannot read
# hides strictly between two values of one encoding: any such value lies outside them, and an
# end of the property's values, which auto-detection reads, is then of another encoding or of
# none. Here the double and the boolean sit at neither end, as far inside as they can get:
# below them epoch seconds whose numbers surround theirs (expired and live), above them a value
# of no supported encoding (text in another form, a double of no unit, a key). Only epoch
# seconds lie below, so the refusal cannot come from a mix of encodings: auto must still
# refuse, for the values it cannot read, and delete nothing.
BETWEEN = {
    "double-below-a-key": (1_750_000_000.0, "key"),
    "double-below-a-bigger-double": (1_750_000_000.0, 1e300),
    "boolean-below-a-string": (True, "tomorrow"),
    "boolean-below-a-double": (False, 1e300),
}


@pytest.mark.parametrize("case", list(BETWEEN))
def test_auto_refuses_floats_and_booleans_between_other_values(
    client: datastore.Client, kind: str, case: str
) -> None:
    odd, top = BETWEEN[case]
    groups: dict[str, list[object]] = {
        "low": [1_700_000_000] * 10,  # expired epoch seconds below the float's number...
        "high": [1_800_000_000] * 10,  # ...and live ones above it
        "odd": [odd],
        "top": [client.key("elsewhere", "k") if top == "key" else top],
    }
    seed(client, kind, groups)
    order = index_order(client, kind)
    assert order.index("odd-0") == len(order) - 2, order  # after every integer

    result = sweep(client, kind)

    assert (result.exit_code, result.deleted) == (1, 0)
    assert result.error is not None
    assert "no supported encoding" in result.error
    assert survivors(client, kind, groups) == set(groups)


@pytest.mark.parametrize("fmt", ["auto", S], ids=["auto", "explicit"])
def test_the_streams_start_at_the_oldest_value_detection_read(
    client: datastore.Client, kind: str, fmt: FormatChoice
) -> None:
    # Four streams split the expired range from its oldest stored value on. --format auto has
    # read that value already (the smallest end) and asks no more; an explicit format queries
    # it (a projection of the expiry).
    groups: dict[str, list[object]] = {
        "expired": [encode(ago(hours=1 + i), S) for i in range(80)],
        "live": [encode(ahead(hours=1 + i), S) for i in range(10)],
    }
    seed(client, kind, groups)
    projections: list[Any] = []

    def record(raw: Any) -> None:
        projections.extend(raw.query.projection)

    hook_api(client, run_query=record)

    result = sweep(client, kind, fmt, workers=4)

    assert (result.deleted, survivors(client, kind, groups)) == (80, {"live"})
    slices_start = [p for p in projections if p.property.name == "expires_at"]
    assert len(slices_start) == (0 if fmt == "auto" else 1)


def test_dry_run_deletes_nothing_and_reports_what_it_matched(
    client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(hours=2), S, 120), "live": stored(ahead(hours=2), S, 10)}
    seed(client, kind, groups)

    result = sweep(client, kind, dry_run=True, batch_size=50)

    assert survivors(client, kind, groups) == set(groups)
    assert (result.matched, result.deleted, result.batches) == (120, 0, 3)
    assert result.summary()["dry_run"] is True


def test_many_pages_and_batches_are_all_deleted(client: datastore.Client, kind: str) -> None:
    # 1234 keys in commits of at most 100 (of 25 where a transaction takes 25 entity groups).
    groups = {"expired": stored(ago(hours=2), S, 1234), "live": stored(ahead(hours=2), S, 7)}
    seed(client, kind, groups)

    result = sweep(client, kind, S, batch_size=100)

    assert survivors(client, kind, groups) == {"live"}
    assert (result.matched, result.deleted) == (1234, 1234)
    assert result.batches >= 13


def test_max_deletes_stops_cleanly_and_the_next_run_resumes(
    client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(hours=2), MS, 700), "live": stored(ahead(hours=2), MS, 5)}
    seed(client, kind, groups)
    names = group_names(groups, *groups)

    first = sweep(client, kind, MS, max_deletes=250, batch_size=100)
    assert (first.deleted, first.stopped_reason, first.exit_code) == (250, "max_deletes", 0)
    assert len(remaining(client, kind, names)) == 705 - 250

    second = sweep(client, kind, MS)
    assert (second.deleted, second.stopped_reason) == (450, "complete")
    assert survivors(client, kind, groups) == {"live"}


@pytest.mark.parametrize(
    ("cap", "reason"),
    [(700, "max_deletes"), (1000, "complete")],
    ids=["cap-inside-the-last-batch", "cap-equals-the-expired-count"],
)
def test_max_deletes_reached_in_the_last_batch(
    client: datastore.Client, kind: str, cap: int, reason: str
) -> None:
    # 1000 expired in batches of 500: the cap is reached inside (700) or at the end of (1000)
    # the second batch, the last one there is, so no further batch shows that keys are left.
    groups = {"expired": stored(ago(hours=2), MS, 1000), "live": stored(ahead(hours=2), MS, 5)}
    seed(client, kind, groups)

    first = sweep(client, kind, MS, max_deletes=cap, batch_size=500)

    # 700: keys are left, so the run must not claim it finished. 1000: the cap is spent exactly
    # as the last key goes; the run stops for want of keys, not of budget, and says complete.
    assert (first.matched, first.deleted, first.stopped_reason, first.exit_code) == (
        cap,
        cap,
        reason,
        0,
    )
    assert len(remaining(client, kind, group_names(groups, "expired"))) == 1000 - cap

    second = sweep(client, kind, MS)
    assert (second.deleted, second.stopped_reason) == (1000 - cap, "complete")
    assert survivors(client, kind, groups) == {"live"}


def test_max_runtime_stops_cleanly_and_the_next_run_resumes(
    client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(hours=2), TS, 2000)}
    seed(client, kind, groups)

    # One key per commit at 250 deletes/s: 2000 keys take 8 s however fast the machine (one
    # emulator deleted all 2000 within 2 s unthrottled), so the limit must cut the run short,
    # yet 2 s leave room for the checks before the first delete on a loaded machine.
    first = sweep(
        client,
        kind,
        TS,
        max_runtime=dt.timedelta(seconds=2),
        batch_size=1,
        workers=1,
        max_rate=250.0,
    )
    assert first.stopped_reason == "max_runtime"
    assert 0 < first.deleted < 2000

    second = sweep(client, kind, TS)
    assert first.deleted + second.deleted == 2000
    assert survivors(client, kind, groups) == set()


def seed_unindexed(client: datastore.Client, kind: str, expired: int, live: int) -> list[str]:
    """The runner's used-JWT kind: an int expiry excluded from indexes."""
    entities = []
    for name, when in [(f"old-{i}", ago(days=1)) for i in range(expired)] + [
        (f"new-{i}", ahead(days=1)) for i in range(live)
    ]:
        entity = datastore.Entity(client.key(kind, name), exclude_from_indexes=("expires_at",))
        entity["expires_at"] = int(when.timestamp())
        entities.append(entity)
    client.put_multi(entities)
    return [e.key.name for e in entities]


@pytest.mark.parametrize("fmt", ["auto", S], ids=["auto", "explicit"])
def test_an_unindexed_property_is_refused_with_a_hint(
    client: datastore.Client, kind: str, fmt: FormatChoice
) -> None:
    names = seed_unindexed(client, kind, expired=10, live=3)

    result = sweep(client, kind, fmt)

    assert (result.exit_code, result.deleted) == (1, 0)
    assert result.error is not None
    assert "looks unindexed" in result.error
    assert "--scan" in result.error
    assert remaining(client, kind, names) == set(names)


def test_scan_mode_deletes_expired_unindexed_values(client: datastore.Client, kind: str) -> None:
    names = seed_unindexed(client, kind, expired=250, live=30)

    result = sweep(client, kind, S, scan=True, batch_size=100)

    assert remaining(client, kind, names) == {n for n in names if n.startswith("new")}
    # The scan reads all 280, and deletes each expired one at the version it read: no lookup.
    assert (result.matched, result.deleted, result.entities_read) == (250, 250, 280)
    summary = result.summary()
    assert summary["scan"] is True
    # No index holds the values: what carries the property is what the scan read, not "empty".
    assert (summary["carrying"], summary["empty"], summary["expired_left"]) == (280, False, None)


def test_a_kind_with_nothing_stored_fails_unless_allowed(
    client: datastore.Client, kind: str
) -> None:
    """A scheduler must not read "success" for a target that holds nothing at all."""
    for fmt in ("auto", S):
        empty = sweep(client, kind, fmt)
        assert (empty.exit_code, empty.stopped_reason) == (1, "error")
        assert empty.error is not None
        assert empty.error.startswith(f"nothing to sweep: no {kind} entity")
        assert sweep(client, kind, fmt, allow_empty=True).exit_code == 0


def test_a_namespace_is_swept_alone(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    tenant = make_client(emulator, namespace="tenant-a")
    groups = {"expired": stored(ago(hours=2), S, 10)}
    seed(client, kind, groups)
    seed(tenant, kind, groups)

    result = sweep(tenant, kind, namespace="tenant-a")

    assert result.deleted == 10
    assert survivors(tenant, kind, groups) == set()
    assert survivors(client, kind, groups) == {"expired"}


def test_sessions_too_large_for_one_answer_are_swept_in_smaller_pages(
    client: datastore.Client, kind: str
) -> None:
    """The legacy emulator ignores the property mask and answers whole entities: a batch of
    300 sessions of 16 KB passes gRPC's 4 MiB, is refused as too large (RESOURCE_EXHAUSTED,
    no quota), and is asked again smaller; every expired session goes, every live one stays."""
    expired = [Session(f"old-{i}", encode(ago(hours=2), S)) for i in range(600)]
    live = [Session(f"new-{i}", encode(ahead(hours=2), S)) for i in range(20)]
    sessions = expired + live
    for at in range(0, len(sessions), 100):  # a commit of 500 such is too large to send
        put_sessions(client, kind, sessions[at : at + 100], data_bytes=16_000)

    result = sweep(client, kind, S)

    assert result.exit_code == 0, result.error
    assert (result.deleted, result.failed) == (600, 0)
    assert names(client, kind) == {f"new-{i}" for i in range(20)}
