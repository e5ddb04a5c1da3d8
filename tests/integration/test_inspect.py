"""``sweeper inspect`` against the real emulators: what it counts, decides and leaves alone."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.encodings import EPOCH, Encoding, expired_range
from sweeper.engine import Sweep
from sweeper.inspect.forecast import plan_backlog, retention_calls
from sweeper.inspect.report import InspectReport, inspect_target
from sweeper.inspect.table import render_table, report_dict
from sweeper.logs import DatastoreError
from sweeper.result import SweepResult
from sweeper.settings import FormatChoice, Shard
from tests.integration.helpers import (
    ago,
    ahead,
    emulator_env,
    make_client,
    run_cli,
    seed,
    settings,
    stored,
    survivors,
)
from tests.support.emulator import Emulator
from tests.support.seed import MISSING, UNINDEXED, encode

S, MS, TS = Encoding.EPOCH_SECONDS, Encoding.EPOCH_MILLIS, Encoding.TIMESTAMP


def inspect(
    client: datastore.Client,
    kind: str,
    fmt: FormatChoice = "auto",
    sample_size: int = 200,
    count_limit: int = 100_000,
) -> InspectReport:
    now = dt.datetime.now(dt.UTC)
    return inspect_target(
        settings(kind, fmt), client, now, sample_size=sample_size, count_limit=count_limit
    )


def runner_shaped() -> dict[str, list[object]]:
    return {
        "oldest": stored(ago(days=3), S, 1),
        "expired": stored(ago(hours=4), S, 120),
        "live": stored(ahead(minutes=30), S, 40),
        "in-flight": [None] * 15,
        "missing": [MISSING] * 10,
        "within-grace": stored(ago(minutes=5), S, 10),
    }


def expected_method(emulator: Emulator) -> str:
    """The legacy emulator answers COUNT with 501 MethodNotImplemented; Firestore counts."""
    return "aggregation" if emulator.flavour == "firestore" else "keys_only_bounded"


def test_runner_shaped_kind(emulator: Emulator, client: datastore.Client, kind: str) -> None:
    groups = runner_shaped()
    seed(client, kind, groups)
    now = dt.datetime.now(dt.UTC)

    report = inspect_target(settings(kind), client, now)

    fields = report_dict(report)
    assert fields["sample_counts"] == {
        "timestamp": 0,
        "epoch_seconds": 171,
        "epoch_millis": 0,
        "double_seconds": 0,
        "double_millis": 0,
        "iso_8601": 0,
        "null": 15,
        "missing": 10,
        "unsupported": 0,
    }
    assert (fields["sample_size"], fields["sampled"]) == (200, 196)
    assert (fields["indexed"], fields["action"], fields["format"]) == (
        "yes",
        "sweep",
        "epoch-seconds",
    )
    # As a sweep's: the database's now where it reports one (Firestore), else the caller's.
    cutoff = report.cutoff
    assert abs((cutoff - (now - dt.timedelta(minutes=15))).total_seconds()) < 5
    if emulator.flavour == "datastore":
        assert cutoff == now - dt.timedelta(minutes=15)
    assert report.bounds == expired_range(S, cutoff).values()
    assert (fields["expired_count"], fields["expired_count_is_lower_bound"]) == (121, False)
    assert fields["count_method"] == expected_method(emulator)
    oldest = groups["oldest"][0]
    assert isinstance(oldest, int)
    assert fields["oldest_value"] == oldest
    assert report.oldest is not None
    assert report.oldest.instant == EPOCH + dt.timedelta(seconds=oldest)
    assert (
        render_table(report)
        .splitlines()[-1]
        .startswith(
            f"sweep would: delete 121 {kind} entities whose expires_at (epoch-seconds) is before"
        )
    )


@pytest.mark.parametrize("encoding", [MS, TS])
def test_explicit_format_counts_only_its_own_encoding(
    emulator: Emulator, client: datastore.Client, kind: str, encoding: Encoding
) -> None:
    seed(
        client,
        kind,
        {
            "mine-expired": stored(ago(hours=2), encoding, 25),
            "mine-live": stored(ahead(hours=2), encoding, 5),
            "seconds-expired": stored(ago(hours=2), S, 30),
        },
    )

    report = inspect(client, kind, encoding)

    assert (report.action, report.encoding) == ("sweep", encoding)
    assert report.expired is not None
    assert (report.expired.n, report.expired.method) == (25, expected_method(emulator))
    assert report.sample.counts[encoding.value] == 30
    assert report.sample.counts[S.value] == 30
    assert report.oldest is not None
    assert report.oldest.instant < dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)


def test_the_oldest_value_stored_as_bytes_of_iso_text_is_shown_as_that_text(
    client: datastore.Client, kind: str
) -> None:
    """Byte strings sort among text: the oldest value may be one; it is shown as its text."""
    iso = Encoding.ISO_8601
    oldest = str(iso.store(ago(days=2)))
    seed(client, kind, {"bytes": [oldest.encode()], "text": stored(ago(hours=2), iso, 5)})

    report = inspect(client, kind, iso)

    fields = report_dict(report)
    assert (fields["oldest_value"], fields["action"]) == (oldest, "sweep")
    assert json.loads(json.dumps(fields))["oldest_value"] == oldest
    assert "oldest expiry" in render_table(report)


def test_mixed_encodings_are_refused(client: datastore.Client, kind: str) -> None:
    seed(client, kind, {"s": stored(ago(hours=4), S, 20), "ms": stored(ago(hours=4), MS, 20)})

    report = inspect(client, kind)

    assert (report.action, report.encoding, report.expired) == ("refuse", None, None)
    assert report.refusal is not None
    assert "more than one encoding" in report.refusal
    assert (report.sample.counts[S.value], report.sample.counts[MS.value]) == (20, 20)
    assert render_table(report).splitlines()[-1].startswith("sweep would: refuse: refusing")


def test_unreadable_values_are_refused_with_examples(client: datastore.Client, kind: str) -> None:
    seed(
        client,
        kind,
        {"s": stored(ago(hours=4), S, 10), "odd": ["soon", 1.5e15, True, 0, "later", "never"]},
    )

    report = inspect(client, kind)

    assert report.action == "refuse"
    assert report.sample.counts["unsupported"] == 6
    assert len(report.sample.unsupported_examples) == 3
    assert all(example.endswith(")") for example in report.sample.unsupported_examples)


def test_an_explicit_format_no_value_holds_is_refused_by_inspect_as_by_sweep(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """One decision, two readers: ``--format epoch-millis`` over epoch seconds could never
    delete anything, so the sweep refuses it (exit 1) and ``inspect`` says so, by the same
    check, instead of "delete nothing"."""
    groups = {"s": stored(ago(hours=4), S, 20)}
    seed(client, kind, groups)

    swept = run_cli(emulator, "--kind", kind, "--format", MS.value)
    report = inspect(client, kind, MS)

    assert swept.returncode == 1
    assert f"refusing --format {MS.value}" in swept.stderr
    assert report.action == "refuse"
    assert report.refusal is not None
    assert report.refusal.startswith(f"refusing --format {MS.value}")
    assert render_table(report).splitlines()[-1].startswith("sweep would: refuse: refusing")
    assert survivors(client, kind, groups) == {"s"}


def put_unindexed(client: datastore.Client, kind: str, expiries: list[object]) -> None:
    """The runner's used-JWT-id kind: an int expires_at excluded from indexes."""
    entities = []
    for i, expiry in enumerate(expiries):
        key = client.key(kind, f"jti-{i}")
        entity = datastore.Entity(key, exclude_from_indexes=("expires_at", *UNINDEXED))
        entity["expires_at"] = expiry
        entities.append(entity)
    client.put_multi(entities)


@pytest.mark.parametrize("fmt", ["auto", S])
def test_unindexed_property_is_refused_as_sweep_would(
    client: datastore.Client, kind: str, fmt: FormatChoice
) -> None:
    put_unindexed(client, kind, stored(ago(hours=4), S, 30))

    report = inspect(client, kind, fmt)

    assert report.indexed == "no"
    assert report.sample.counts[S.value] == 30
    assert report.action == "refuse"
    assert report.refusal is not None
    assert f"{kind}.expires_at looks unindexed" in report.refusal
    assert report.expired is None or report.expired.n == 0
    assert report.oldest is None
    assert (
        render_table(report)
        .splitlines()[-1]
        .startswith(f"sweep would: refuse: {kind}.expires_at looks unindexed")
    )


def test_scan_reads_every_entity(client: datastore.Client, kind: str) -> None:
    put_unindexed(client, kind, stored(ago(hours=4), S, 30))

    report = inspect_target(settings(kind, S, scan=True), client, dt.datetime.now(dt.UTC))

    assert (report.indexed, report.action, report.encoding) == ("no", "scan", S)
    assert (
        render_table(report)
        .splitlines()[-1]
        .startswith(
            f"sweep would: scan every {kind} entity (one billed read each) and delete those whose"
        )
    )


def test_no_values_at_all_is_unknown(client: datastore.Client, kind: str) -> None:
    seed(client, kind, {"null": [None] * 5, "missing": [MISSING] * 5})

    report = inspect(client, kind)

    assert (report.indexed, report.action) == ("unknown", "nothing")
    assert report.sample.size == 10
    assert render_table(report).splitlines()[-1] == (
        "sweep would: nothing to sweep: expires_at holds no indexed value; a sweep fails "
        "(exit 1) unless --allow-empty"
    )


def test_count_bound_gives_a_lower_bound(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    seed(client, kind, {"expired": stored(ago(hours=4), S, 120)})

    report = inspect(client, kind, count_limit=50)

    assert report.expired is not None
    if emulator.flavour == "firestore":  # one COUNT is exact at any size: no bound needed
        assert (report.expired.n, report.expired.lower_bound) == (120, False)
    else:
        assert (report.expired.n, report.expired.lower_bound) == (50, True)
        assert "≥ 50 (keys-only count, bounded at 50)" in render_table(report)
        assert "sweep would: delete at least 50 " in render_table(report)


def test_small_sample_reads_only_its_size(client: datastore.Client, kind: str) -> None:
    seed(client, kind, runner_shaped())

    report = inspect(client, kind, sample_size=7)

    assert (report.sample.asked, report.sample.size) == (7, 7)


def test_the_sample_spreads_across_the_key_space(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """The first 200 in key order showed 0 nulls and 0 missing where 150 and 50 existed (the
    names sort them last). ``__scatter__`` spreads the sample where the database keeps it:
    production and the legacy emulator; the Firestore emulator does not (key order there)."""
    if emulator.flavour == "firestore":
        pytest.skip("the Firestore emulator keeps no __scatter__: the sample is in key order")
    groups: dict[str, list[object]] = {
        "a": stored(ago(hours=4), S, 2300),
        "y": [None] * 150,
        "z": [MISSING] * 50,
    }
    seed(client, kind, groups)

    report = inspect(client, kind)

    counts = report.sample.counts
    assert report.sample.size == 200
    assert counts["null"] > 0, counts
    assert counts["missing"] > 0, counts


def test_namespace_comes_from_the_client(emulator: Emulator, kind: str) -> None:
    tenant = make_client(emulator, namespace="inspect-tenant")
    seed(tenant, kind, {"expired": stored(ago(hours=4), S, 12)})

    report = inspect(tenant, kind)
    elsewhere = inspect(make_client(emulator), kind)

    assert (report.namespace, report.action, report.sample.size) == ("inspect-tenant", "sweep", 12)
    assert report.expired is not None
    assert report.expired.n == 12
    assert (elsewhere.namespace, elsewhere.sample.size, elsewhere.action) == (None, 0, "nothing")


@pytest.mark.parametrize("fmt", ["auto", S])
def test_inspect_deletes_nothing(client: datastore.Client, kind: str, fmt: FormatChoice) -> None:
    groups = runner_shaped()
    seed(client, kind, groups)

    inspect(client, kind, fmt, count_limit=50)

    assert survivors(client, kind, groups) == set(groups)


class FailingClient(datastore.Client):
    """A real client whose first lookups and COUNTs fail with ``error``, then work."""

    def __init__(self, *args: Any, failures: int, error: Exception, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.lookups_left = self.counts_left = failures
        self.error = error

    def get_multi(self, keys: Any, *args: Any, **kwargs: Any) -> Any:
        if self.lookups_left:
            self.lookups_left -= 1
            raise self.error
        return super().get_multi(keys, *args, **kwargs)  # type: ignore[no-untyped-call]

    def aggregation_query(self, query: Any, **kwargs: Any) -> Any:
        if self.counts_left:
            self.counts_left -= 1
            raise self.error
        return super().aggregation_query(query, **kwargs)  # type: ignore[no-untyped-call]


def failing(emulator: Emulator, failures: int, error: Exception) -> FailingClient:
    with emulator_env(emulator.env):
        return FailingClient(project=emulator.project, failures=failures, error=error)


def test_transient_failures_are_retried(emulator: Emulator, kind: str) -> None:
    seed(make_client(emulator), kind, {"expired": stored(ago(hours=4), S, 30)})
    client = failing(emulator, 2, gexc.ServiceUnavailable("injected: connection reset"))
    waits: list[float] = []

    report = inspect_target(settings(kind), client, dt.datetime.now(dt.UTC), sleep=waits.append)

    assert (report.action, report.sample.size) == ("sweep", 30)
    assert report.expired is not None
    assert report.expired.n == 30
    assert len(waits) == 4  # two lookups, two COUNTs (also where COUNT then answers 501)


def test_a_permanent_failure_is_one_line(emulator: Emulator, kind: str) -> None:
    seed(make_client(emulator), kind, {"expired": stored(ago(hours=4), S, 3)})
    client = failing(emulator, 1, gexc.PermissionDenied("injected: missing datastore.entities.get"))

    with pytest.raises(DatastoreError) as raised:
        inspect_target(settings(kind), client, dt.datetime.now(dt.UTC), sleep=lambda _s: None)

    assert raised.value.message == (
        "Datastore call failed: PermissionDenied: injected: missing datastore.entities.get"
    )


# --- the forecast against a real run ----------------------------------------------------------


def backlog_groups(expired_hours: int = 8, per_hour: int = 750) -> dict[str, list[object]]:
    """An expired backlog spread over ``expired_hours`` hours (one value every few seconds),
    with live, just-expired (within the grace), null and missing sessions beside it."""
    spacing = 3600 / per_hour
    expired: list[object] = [
        encode(ago(hours=1 + h, seconds=i * spacing), S)
        for h in range(expired_hours)
        for i in range(per_hour)
    ]
    return {
        "expired": expired,
        "live": [encode(ahead(minutes=30, seconds=i), S) for i in range(1000)],
        "within-grace": [encode(ago(minutes=5, seconds=i), S) for i in range(100)],
        "in-flight": [None] * 200,
        "missing": [MISSING] * 50,
    }


def within(forecast: int, actual: int, share: float = 0.05) -> bool:
    return abs(forecast - actual) <= share * actual


CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "no-verify": {"verify": False},  # the default is the re-check, on every database
    "guard-on": {"max_fraction": 0.9},
    "one-worker": {"workers": 1},
    "batches-of-200": {"batch_size": 200, "workers": 2},
}


@pytest.mark.parametrize("case", CASES)
def test_forecast_matches_the_run_it_forecasts(
    emulator: Emulator,
    client: datastore.Client,
    kind: str,
    case: str,
) -> None:
    groups = backlog_groups()
    seed(client, kind, groups)
    run = settings(kind, S, **CASES[case])

    report = inspect_target(run, client, dt.datetime.now(dt.UTC))
    result = Sweep(run, client).run()

    assert report.forecast is not None
    assert report.histogram is not None
    assert report.expired is not None
    assert report.carrying is not None
    ops, expired = report.forecast.operations, len(groups["expired"])
    assert report.histogram.unit == "hour"
    assert report.histogram.total == report.expired.n == expired
    assert report.carrying.n == expired + 1100
    assert result.stopped_reason == "complete"
    assert result.verify == report.forecast.run.sweep.verify
    measured = {
        "queries": (ops.queries, result.queries),
        "commits": (ops.commits, result.commits),
        "entities_read": (ops.entities_read, result.entities_read),
        "deleted": (ops.deleted, result.deleted),
    }
    print(emulator.flavour, case, measured)  # shown with -s: the figures docs/forecast.md quotes
    assert ops.deleted == result.deleted == expired
    assert ops.entities_read == result.entities_read
    assert result.commit_size is not None
    if result.commit_size.reductions:
        # A commit slower than its 2 s target (a loaded machine) made the run send smaller
        # ones; the forecast assumes full commits, so it is then a lower bound.
        assert ops.commits <= result.commits, measured
        del measured["commits"]
    assert all(within(f, a) for f, a in measured.values()), measured


def test_forecast_of_three_shards_matches_their_runs(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """Three pods (``--shard I/3``) starting together over an eight-hour backlog. Each pod runs
    here on a copy of its own, so that it meets the others' buckets as a pod does when all
    start at once. What each counts after its run depends on what the others have left by then
    (the forecast assumes they finish together: nothing left), so those counts are compared as
    each pod made them."""
    groups = backlog_groups()
    copies = [f"{kind}-{i}" for i in range(3)]
    for copy in copies:
        seed(client, copy, groups)
    pods = [settings(copy, S, shard=Shard(i, 3)) for i, copy in enumerate(copies)]

    report = inspect_target(pods[0], client, dt.datetime.now(dt.UTC))
    results = [Sweep(pod, client).run() for pod in pods]

    assert report.forecast is not None
    assert report.carrying is not None
    run, ops = report.forecast.run, report.forecast.operations
    after_run = [retention_calls(*left(result), run)[0] for result in results]
    assumed = 3 * retention_calls(report.carrying.n - ops.deleted, 0, run)[0]
    measured = {
        "queries": (ops.queries - assumed, sum(r.queries for r in results) - sum(after_run)),
        "commits": (ops.commits, sum(r.commits for r in results)),
        "deleted": (ops.deleted, sum(r.deleted for r in results)),
    }
    print(emulator.flavour, "3 shards", measured, "retention", assumed, sum(after_run))
    assert ops.deleted == len(groups["expired"])
    if any(r.commit_size is not None and r.commit_size.reductions for r in results):
        # Commits slower than their target made smaller ones (see the test above).
        assert ops.commits <= sum(r.commits for r in results), measured
        del measured["commits"]
    assert all(within(f, a) for f, a in measured.values()), measured
    assert [r.deleted for r in results] == [sum(s) for s in plan_streams(report)]


def left(result: SweepResult) -> tuple[int, int]:
    """What a run counted after it: carrying the property, and still past the cutoff."""
    retention = result.retention
    assert retention is not None
    assert retention.expired_left is not None
    return retention.carrying.n, retention.expired_left.n


def plan_streams(report: InspectReport) -> list[tuple[int, ...]]:
    assert report.forecast is not None
    assert report.histogram is not None
    assert report.carrying is not None
    return list(plan_backlog(report.histogram, report.forecast.run, report.carrying.n).streams)


def test_forecast_of_a_scan_matches_its_run(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """An unindexed expiry: the scan reads the whole kind; what it deletes is estimated from the
    sample's expired share (every fourth session here is live)."""
    put_unindexed(
        client,
        kind,
        [encode(ahead(hours=1) if i % 4 == 0 else ago(hours=2), S) for i in range(2000)],
    )
    scan = settings(kind, S, scan=True)

    report = inspect_target(scan, client, dt.datetime.now(dt.UTC))
    result = Sweep(scan, client).run()

    assert report.action == "scan"
    assert report.forecast is not None
    assert report.kind_size is not None
    assert report.kind_size.n == 2000
    ops = report.forecast.operations
    assert report.forecast.estimated
    measured = {
        "queries": (ops.queries, result.queries),
        "commits": (ops.commits, result.commits),
        "entities_read": (ops.entities_read, result.entities_read),
        "deleted": (ops.deleted, result.deleted),
    }
    print(emulator.flavour, "scan", measured)
    assert result.deleted == 1500
    # The scan reads all 2000, and the gate deletes each due one at the version the scan read:
    # no second read.
    assert result.entities_read == 2000
    assert ops.entities_read == 2000
    assert all(within(f, a) for f, a in measured.values()), measured


def test_forecast_time_under_the_ramp_up(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """The ramp-up's 500 deletes/s hold a 3,000-key backlog for 3000 / 500 = 6 s: every batch
    waits for its budget, the first too (never faster than the rate).

    Blind deletes, so that the database keeps ahead of 500 deletes/s and the throttle alone
    sets the time: the legacy emulator, re-checking 3,000 keys in transactions of 25 on a busy
    machine, has taken over 7 s, slower than the ramp-up it was meant to measure."""
    seed(client, kind, backlog_groups(expired_hours=4, per_hour=750))
    run = settings(kind, S, ramp_up=True, verify=False)

    report = inspect_target(run, client, dt.datetime.now(dt.UTC))
    result = Sweep(run, client).run()

    assert report.forecast is not None
    assert report.forecast.duration_s is not None
    assert report.forecast.duration_s == pytest.approx(6.0)
    assert report.forecast.final_rate == pytest.approx(500.0)
    print(emulator.flavour, "ramp-up", report.forecast.duration_s, result.duration_s)
    assert result.deleted == 3000
    # The run also reads the clock, checks the format and counts what is left afterwards.
    assert 6.0 <= result.duration_s <= 6.0 * 1.05 + 1.0
    assert result.deleted / result.duration_s <= 500.0


def test_the_cli_forecasts_with_the_sweeps_options(emulator: Emulator, kind: str) -> None:
    seed(make_client(emulator), kind, backlog_groups(expired_hours=2, per_hour=300))
    args = ["--kind", kind, "--workers", "2", "--batch-size", "250", "--shard", "0/2"]
    args += ["--no-verify", "--ramp-up", "--max-rate", "100", "--max-fraction", "0.9"]

    done = run_cli(emulator, *args, "--log-format", "json", command="inspect")

    assert done.returncode == 0, done.stderr
    fields = json.loads(done.stdout)
    run = fields["forecast"]["settings"]
    assert (run["workers"], run["batch_size"], run["shards"]) == (2, 250, 2)
    assert (run["verify"], run["ramp_up"], run["max_rate"]) == (False, True, 100.0)
    assert (run["max_fraction"], fields["forecast"]["guard_refuses"]) == (0.9, False)
    assert fields["histogram"]["total"] == fields["expired_left"] == 600
    assert (fields["carrying"], fields["empty"]) == (1700, False)
    # Each pod deletes its share (at most 600) at 100/s.
    assert 0 < fields["forecast"]["duration_s"] <= 600 / 100
