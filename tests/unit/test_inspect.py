"""``sweeper inspect``'s output, on hand-built reports: the table an operator reads and the JSON
contract a script reads. What the numbers are is tested against the emulators."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from typing import Any, cast

import pytest
from google.cloud import datastore

from sweeper.encodings import Encoding, expired_range
from sweeper.inspect.forecast import Bucket, Histogram, Run, forecast, plan_backlog
from sweeper.inspect.report import (
    BUCKETS,
    InspectReport,
    Oldest,
    Sample,
    inspect_target,
)
from sweeper.inspect.table import render_table, report_dict
from sweeper.logs import UsageError
from sweeper.rpc import Count
from sweeper.settings import SweepSettings

NOW = dt.datetime(2024, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
CUTOFF = NOW - dt.timedelta(minutes=15)
OLDEST_S = 1_717_000_000  # 2024-05-29T16:26:40Z

AS_DICT_KEYS = {
    "kind",
    "namespace",
    "database",
    "property",
    "format_asked",
    "grace_s",
    "now",
    "cutoff",
    "sample_size",
    "sampled",
    "sample_counts",
    "unsupported_examples",
    "indexed",
    "action",
    "format",
    "refusal",
    "range_lower",
    "range_upper",
    "expired_count",
    "expired_count_is_lower_bound",
    "count_method",
    "count_limit",
    "oldest_value",
    "oldest_expiry",
    "sweep_would",
    "clock_source",
    "expired_left",
    "expired_left_is_lower_bound",
    "oldest_expired",
    "carrying",
    "carrying_is_lower_bound",
    "empty",
    "kind_size",
    "descendants_sampled",
    "descendants_mean",
    "descendants_max",
    "histogram",
    "forecast",
}


def counts(**found: int) -> dict[str, int]:
    """Every bucket, zero unless given (``epoch_seconds=3`` for ``epoch-seconds``)."""
    given = {name.replace("_", "-"): n for name, n in found.items()}
    return {bucket: given.get(bucket, 0) for bucket in BUCKETS}


def sweeping(
    encoding: Encoding = Encoding.EPOCH_SECONDS,
    expired: Count | None = None,
    **changes: Any,
) -> InspectReport:
    """A runner-shaped target whose sweep would delete 120 expired sessions."""
    report = InspectReport(
        kind="eq-session",
        prop="expires_at",
        namespace=None,
        database=None,
        format_asked="auto",
        grace=dt.timedelta(minutes=15),
        now=NOW,
        cutoff=CUTOFF,
        sample=Sample(200, counts(epoch_seconds=170, null=20, missing=10)),
        indexed="yes",
        action="sweep",
        encoding=encoding,
        bounds=expired_range(encoding, CUTOFF).values(),
        expired=expired or Count(120, "aggregation"),
        oldest=Oldest(OLDEST_S, dt.datetime(2024, 5, 29, 16, 26, 40, tzinfo=dt.UTC)),
        carrying=Count(190, "aggregation"),
        clock_source="server",
    )
    return replace(report, **changes)


def nothing(**changes: Any) -> InspectReport:
    """A target whose sweep would find nothing to do."""
    empty: dict[str, Any] = {"encoding": None, "bounds": None, "expired": None, "oldest": None}
    return replace(sweeping(), **{"action": "nothing", **empty, **changes})


def last_line(report: InspectReport) -> str:
    return render_table(report).splitlines()[-1]


def table_rows(report: InspectReport) -> dict[str, str]:
    """The table's rows by label (sample buckets without their indent), up to the last line."""
    lines = render_table(report).splitlines()[:-1]
    column = lines[0].index(f"{report.kind}.{report.prop}")
    return {line[:column].strip(): line[column:] for line in lines}


def test_table_is_aligned_and_ends_with_what_sweep_would_do() -> None:
    lines = render_table(sweeping()).splitlines()

    assert lines[-1] == (
        "sweep would: delete 120 eq-session entities whose expires_at (epoch-seconds) "
        "is before 2024-06-01T11:45:00Z"
    )
    rows = lines[:-1]
    column = rows[0].index("eq-session.expires_at")
    assert all(row[:column].endswith("  ") and row[:column].strip() for row in rows)
    assert all(row[column:].strip() for row in rows)
    assert all(row == row.rstrip() for row in lines)


def test_table_shows_each_finding() -> None:
    assert table_rows(sweeping()) == {
        "target": "eq-session.expires_at",
        "namespace": "(default)",
        "database": "(default)",
        "format asked": "auto",
        "grace": "15m",
        "cutoff": "2024-06-01T11:45:00Z (now 2024-06-01T12:00:00Z - grace)",
        "sample": "first 200 entities in key order (at most 200)",
        "timestamp": "  0",
        "epoch-seconds": "170",
        "epoch-millis": "  0",
        "double-seconds": "  0",
        "double-millis": "  0",
        "iso-8601": "  0",
        "null": " 20",
        "missing": " 10",
        "unsupported": "  0",
        "indexed": "yes",
        "format": "epoch-seconds (detected)",
        "carrying": "190 (aggregation)",
        "range": "1000000000 <= expires_at < 1717242300",
        "past cutoff": "120 (aggregation)",
        "oldest expiry": "1717000000 = 2024-05-29T16:26:40Z",
        "oldest expired": "1717000000 = 2024-05-29T16:26:40Z",
    }


def test_sample_buckets_are_indented_under_the_sample() -> None:
    lines = render_table(sweeping()).splitlines()

    start = next(i for i, line in enumerate(lines) if line.startswith("sample "))
    rows = lines[start + 1 : start + 1 + len(BUCKETS)]
    assert [line.split()[0] for line in rows] == list(BUCKETS)
    assert all(line.startswith("  ") for line in rows)


def test_explicit_format_is_not_called_detected() -> None:
    assert table_rows(sweeping(format_asked="epoch-seconds"))["format"] == "epoch-seconds"


def test_bounded_key_count_is_a_lower_bound() -> None:
    report = sweeping(expired=Count(100_000, "keys_only_bounded", 100_000))

    assert table_rows(report)["past cutoff"] == "≥ 100000 (keys-only count, bounded at 100000)"
    assert last_line(report).startswith("sweep would: delete at least 100000 eq-session entities")
    fields = report_dict(report)
    assert fields["expired_count"] == 100_000
    assert fields["expired_count_is_lower_bound"] is True
    assert (fields["count_method"], fields["count_limit"]) == ("keys_only_bounded", 100_000)


def test_key_count_under_its_bound_is_exact() -> None:
    report = sweeping(expired=Count(42, "keys_only_bounded", 100_000))

    assert table_rows(report)["past cutoff"] == "42 (keys-only count, bounded at 100000)"
    assert last_line(report).startswith("sweep would: delete 42 eq-session entities")
    assert report_dict(report)["expired_count_is_lower_bound"] is False


def test_nothing_past_the_cutoff() -> None:
    report = sweeping(expired=Count(0, "aggregation"))

    assert last_line(report) == (
        "sweep would: delete nothing: no eq-session entity whose expires_at (epoch-seconds) "
        "is before 2024-06-01T11:45:00Z"
    )


def test_cutoff_before_the_band_is_an_empty_range() -> None:
    report = sweeping(expired=Count(0, "empty_range"))

    assert table_rows(report)["past cutoff"] == "0 (the cutoff lies before the encoding's band)"
    assert last_line(report).startswith("sweep would: delete nothing")


def test_refusal_is_the_last_line() -> None:
    message = "refusing --format auto on eq-session.expires_at: its values run from ..."
    report = nothing(
        action="refuse",
        refusal=message,
        sample=Sample(
            200, counts(epoch_seconds=100, epoch_millis=50, unsupported=4), ("'x' (str)",)
        ),
    )

    rows = table_rows(report)
    assert last_line(report) == f"sweep would: refuse: {message}"
    assert rows["format"].startswith("refused")
    assert rows["e.g."] == "'x' (str)"
    assert not {"range", "past cutoff", "oldest expiry"} & set(rows)
    fields = report_dict(report)
    assert (fields["action"], fields["format"], fields["refusal"]) == ("refuse", None, message)
    assert fields["unsupported_examples"] == ["'x' (str)"]
    assert fields["range_lower"] is fields["expired_count"] is fields["oldest_value"] is None


def test_unindexed_property_says_a_scan_is_needed() -> None:
    report = nothing(indexed="no", sample=Sample(200, counts(epoch_seconds=200)))

    assert table_rows(report)["indexed"].startswith(
        "no (the sample holds values, but a range query cannot see them"
    )
    assert last_line(report) == (
        "sweep would: nothing to sweep: expires_at holds no indexed value; "
        "expires_at looks unindexed: a scan would be needed"
    )


def test_unindexed_property_with_an_explicit_format() -> None:
    report = sweeping(
        format_asked="epoch-seconds",
        indexed="no",
        expired=Count(0, "aggregation"),
        oldest=None,
    )

    assert table_rows(report)["oldest expiry"] == "none stored"
    assert last_line(report).endswith("; expires_at looks unindexed: a scan would be needed")


def test_unindexed_refusal_keeps_the_explicit_format() -> None:
    message = "eq-session.expires_at looks unindexed: 30 of 30 sampled entities have a value"
    report = sweeping(
        format_asked="epoch-seconds",
        indexed="no",
        action="refuse",
        refusal=message,
        expired=Count(0, "aggregation"),
        oldest=None,
    )

    assert table_rows(report)["format"] == "epoch-seconds"
    assert last_line(report) == f"sweep would: refuse: {message}"
    assert (report_dict(report)["action"], report_dict(report)["format"]) == (
        "refuse",
        "epoch-seconds",
    )


def test_scan_says_it_reads_every_entity() -> None:
    report = sweeping(
        format_asked="epoch-seconds",
        indexed="no",
        action="scan",
        expired=Count(0, "aggregation"),
        oldest=None,
    )

    assert table_rows(report)["past cutoff (indexed)"] == "0 (aggregation)"
    assert last_line(report) == (
        "sweep would: scan every eq-session entity (one billed read each) and delete those "
        "whose expires_at (epoch-seconds) is before 2024-06-01T11:45:00Z"
    )


def test_no_values_anywhere_is_unknown() -> None:
    report = nothing(indexed="unknown", sample=Sample(200, counts(null=3, missing=2)))

    assert table_rows(report)["indexed"] == "unknown (no value in the sample or the index)"
    assert last_line(report) == "sweep would: nothing to sweep: expires_at holds no indexed value"


def test_json_is_ready_with_stable_snake_case_keys() -> None:
    fields = report_dict(sweeping(namespace="tenant-a", database="sessions"))

    assert set(fields) == AS_DICT_KEYS
    assert json.loads(json.dumps(fields)) == fields
    assert fields["sample_counts"] == {
        "timestamp": 0,
        "epoch_seconds": 170,
        "epoch_millis": 0,
        "double_seconds": 0,
        "double_millis": 0,
        "iso_8601": 0,
        "null": 20,
        "missing": 10,
        "unsupported": 0,
    }
    assert (fields["namespace"], fields["database"]) == ("tenant-a", "sessions")
    assert (fields["format_asked"], fields["format"], fields["action"]) == (
        "auto",
        "epoch-seconds",
        "sweep",
    )
    assert (fields["now"], fields["cutoff"]) == ("2024-06-01T12:00:00Z", "2024-06-01T11:45:00Z")
    assert fields["grace_s"] == 900.0
    assert (fields["sample_size"], fields["sampled"]) == (200, 200)
    assert (fields["range_lower"], fields["range_upper"]) == (1_000_000_000, 1_717_242_300)
    assert (fields["expired_count"], fields["count_method"]) == (120, "aggregation")
    assert (fields["oldest_value"], fields["oldest_expiry"]) == (
        OLDEST_S,
        "2024-05-29T16:26:40Z",
    )
    assert fields["sweep_would"] == last_line(sweeping()).removeprefix("sweep would: ")


def test_timestamps_become_iso_strings() -> None:
    oldest = dt.datetime(2024, 5, 29, 16, 26, 40, 123456, tzinfo=dt.UTC)
    report = sweeping(Encoding.TIMESTAMP, oldest=Oldest(oldest, oldest))

    fields = report_dict(report)
    assert (fields["range_lower"], fields["range_upper"]) == (
        "2001-09-09T01:46:40Z",
        "2024-06-01T11:45:00Z",
    )
    assert fields["oldest_value"] == fields["oldest_expiry"] == "2024-05-29T16:26:40.123456Z"
    rows = table_rows(report)
    assert rows["range"] == "2001-09-09T01:46:40Z <= expires_at < 2024-06-01T11:45:00Z"
    assert rows["oldest expiry"] == "2024-05-29T16:26:40.123456Z"


def test_times_in_another_zone_are_shown_in_utc() -> None:
    paris = dt.timezone(dt.timedelta(hours=2))
    report = sweeping(now=NOW.astimezone(paris), cutoff=CUTOFF.astimezone(paris))

    assert report_dict(report)["cutoff"] == "2024-06-01T11:45:00Z"
    assert table_rows(report)["cutoff"] == "2024-06-01T11:45:00Z (now 2024-06-01T12:00:00Z - grace)"


@pytest.mark.parametrize(("sample_size", "count_limit"), [(0, 10), (10, 0)])
def test_sizes_below_one_are_refused_before_any_call(sample_size: int, count_limit: int) -> None:
    settings = SweepSettings("eq-session", "expires_at", "auto", dt.timedelta(minutes=15))
    no_client = cast(datastore.Client, None)

    with pytest.raises(UsageError):
        inspect_target(settings, no_client, NOW, sample_size=sample_size, count_limit=count_limit)


# --- retention figures, the histogram and the forecast --------------------------------------


def test_oldest_expired_is_the_oldest_value_while_it_is_past_the_cutoff() -> None:
    live = Oldest(1_717_300_000, dt.datetime(2024, 6, 2, 3, 46, 40, tzinfo=dt.UTC))

    assert sweeping().oldest_expired == sweeping().oldest
    assert report_dict(sweeping())["oldest_expired"] == "2024-05-29T16:26:40Z"
    assert sweeping(oldest=live).oldest_expired is None
    assert report_dict(sweeping(oldest=live))["oldest_expired"] is None
    assert table_rows(sweeping(oldest=live))["oldest expired"] == "none stored"


def test_retention_figures_have_sweep_finisheds_names() -> None:
    bounded = Count(100_000, "keys_only_bounded", 100_000)
    fields = report_dict(sweeping(expired=bounded, carrying=bounded))

    assert (fields["expired_left"], fields["expired_left_is_lower_bound"]) == (100_000, True)
    assert (fields["carrying"], fields["carrying_is_lower_bound"]) == (100_000, True)
    assert fields["empty"] is False
    assert fields["clock_source"] == "server"


def test_an_empty_target_says_so_at_the_top() -> None:
    report = nothing(sample=Sample(200, counts()), carrying=Count(0, "aggregation"))

    lines = render_table(report).splitlines()
    assert lines[1].startswith("EMPTY")
    assert "no eq-session entity carries expires_at" in lines[1]
    assert report_dict(report)["empty"] is True
    assert report_dict(report)["carrying"] == 0


def test_values_no_index_holds_are_not_empty() -> None:
    report = nothing(
        indexed="no",
        sample=Sample(200, counts(epoch_seconds=200)),
        carrying=Count(0, "aggregation"),
    )

    assert report.empty is False
    assert "EMPTY" not in table_rows(report)


def forecasting(**run: Any) -> InspectReport:
    """``sweeping()`` with its 120 expired sessions counted by hour, and a forecast."""
    hours = [dt.datetime(2024, 6, 1, h, tzinfo=dt.UTC) for h in (9, 10, 11)]
    edges = [(hours[0], hours[1]), (hours[1], hours[2]), (hours[2], CUTOFF)]
    histogram = Histogram(
        "hour", tuple(Bucket(a, b, n) for (a, b), n in zip(edges, (20, 0, 100), strict=True))
    )
    options = {"workers": 1, "max_fraction": 1.0, "ramp_up": True, **run}
    settings = Run(SweepSettings("eq-session", "expires_at", "auto", dt.timedelta(0), **options))
    backlog = plan_backlog(histogram, settings, carrying=190)
    return sweeping(histogram=histogram, forecast=forecast(backlog, settings))


def test_the_histogram_is_a_bar_per_hour() -> None:
    rows = table_rows(forecasting())

    assert rows["expired by hour"] == "3 buckets of expiry time, UTC"
    assert rows["2024-06-01T09:00Z"] == " 20 ######"
    assert rows["2024-06-01T10:00Z"] == "  0"
    assert rows["2024-06-01T11:00Z"] == "100 ##############################"


def test_the_forecast_rows() -> None:
    rows = table_rows(forecasting(ramp_up=True))

    assert rows["forecast"] == (
        "a sweep with 1 worker on 1 pod, batches of 500, verify on, ramp-up on"
    )
    assert (rows["queries"], rows["commits"]) == ("6", "1")
    assert rows["deletes"] == "120"
    assert rows["entities read"] == "0 (billed reads in all: 126)"
    assert rows["cost"] == "$0.0001 (reads $0.0001, deletes $0.0000)"
    assert rows["prices"].startswith("$0.06 per 100,000 reads, $0.02 per 100,000 deletes (nam5")
    # The one batch of 120 waits for its budget at 500/s.
    assert rows["time"] == "0.2 s of deletes under the ramp-up rule, ending at 500 deletes/s in all"
    assert table_rows(forecasting(ramp_up=False))["time"].startswith("not limited by sweeper")


def test_the_forecast_in_json() -> None:
    # Each key deleted at the version its page read: billed with the page, no lookup.
    fields = report_dict(forecasting(verify=True, max_fraction=0.5))

    assert json.loads(json.dumps(fields)) == fields
    histogram, forecast_ = fields["histogram"], fields["forecast"]
    assert (histogram["unit"], histogram["total"]) == ("hour", 120)
    assert histogram["buckets"][0] == {
        "start": "2024-06-01T09:00:00Z",
        "end": "2024-06-01T10:00:00Z",
        "count": 20,
        "count_is_lower_bound": False,
    }
    # 120 of 190 is over half: the guard would refuse, and the forecast is of the run with
    # --max-fraction 1, which makes no counts before it deletes.
    assert forecast_["guard_refuses"] is True
    assert forecast_["settings"]["max_fraction"] == 1.0
    assert forecast_["operations"] == {
        "queries": 6,
        "commits": 1,
        "entities_read": 0,
        "deleted": 120,
        "billed_reads": 126,
    }
    assert forecast_["settings"]["verify"] is True
    assert forecast_["prices"]["as_of"] == "2026-11-23"
    assert set(forecast_) >= {"cost_usd", "reads_usd", "deletes_usd", "duration_s", "final_rate"}
