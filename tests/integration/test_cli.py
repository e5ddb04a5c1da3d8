"""``sweeper sweep`` as an operator runs it: a real process, JSON logs, exit codes."""

from __future__ import annotations

from google.cloud import datastore

from sweeper.encodings import Encoding
from tests.contract import SWEEP_FINISHED_FIELDS
from tests.integration.helpers import (
    ago,
    ahead,
    log_events,
    plain_lines,
    run_cli,
    seed,
    stored,
    survivors,
)
from tests.support.emulator import Emulator


def test_a_cron_run_logs_one_json_summary_and_exits_zero(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    groups = {
        "expired": stored(ago(hours=4), Encoding.EPOCH_SECONDS, 40),
        "live": stored(ahead(hours=1), Encoding.EPOCH_SECONDS, 5),
    }
    seed(client, kind, groups)

    proc = run_cli(emulator, "--grace", "3h", SWEEPER_KIND=kind)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # sweep's output is its logs, on stderr as inspect's are
    assert plain_lines(proc.stderr) == []
    logged = log_events(proc.stderr)
    assert all({"event", "severity", "timestamp"} <= set(e) for e in logged)
    finished = [e for e in logged if e["event"] == "sweep_finished"]
    assert len(finished) == 1
    summary = finished[0]
    assert set(summary) >= SWEEP_FINISHED_FIELDS
    assert (summary["kind"], summary["deleted"], summary["stopped_reason"]) == (
        kind,
        40,
        "complete",
    )
    assert summary["format"] == "epoch-seconds"
    assert summary["cutoff"].endswith("Z")
    assert survivors(client, kind, groups) == {"live"}


def test_a_refusal_is_one_line_exit_one_and_a_summary(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    groups = {
        "s": stored(ago(days=1), Encoding.EPOCH_SECONDS, 3),
        "ts": stored(ago(days=1), Encoding.TIMESTAMP, 3),
    }
    seed(client, kind, groups)

    proc = run_cli(emulator, "--kind", kind)

    assert proc.returncode == 1
    (line,) = plain_lines(proc.stderr)
    assert line.startswith("sweeper: error: refusing --format auto")
    assert "Traceback" not in proc.stderr + proc.stdout
    summary = log_events(proc.stderr)[-1]
    assert (summary["event"], summary["stopped_reason"], summary["deleted"]) == (
        "sweep_finished",
        "error",
        0,
    )
    assert survivors(client, kind, groups) == set(groups)


def test_dry_run_from_the_environment(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(hours=1), Encoding.EPOCH_MILLIS, 12)}
    seed(client, kind, groups)

    proc = run_cli(
        emulator,
        SWEEPER_KIND=kind,
        SWEEPER_DRY_RUN="1",
        SWEEPER_FORMAT="epoch-millis",
        SWEEPER_LOG_FORMAT="json",
    )

    assert proc.returncode == 0, proc.stderr
    (summary,) = [e for e in log_events(proc.stderr) if e["event"] == "sweep_finished"]
    assert (summary["dry_run"], summary["matched"], summary["deleted"]) == (True, 12, 0)
    assert survivors(client, kind, groups) == {"expired"}


def test_a_dry_run_ends_with_a_forecast_of_the_real_run(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    groups = {
        "expired": stored(ago(hours=4), Encoding.EPOCH_SECONDS, 40),
        "live": stored(ahead(hours=1), Encoding.EPOCH_SECONDS, 60),
    }
    seed(client, kind, groups)

    proc = run_cli(emulator, "--dry-run", "--grace", "3h", SWEEPER_KIND=kind)

    assert proc.returncode == 0, proc.stderr
    (forecast,) = [e for e in log_events(proc.stderr) if e["event"] == "forecast"]
    assert forecast["operations"]["deleted"] == 40
    # The forecast reads what the sweep read; what it decides is logged once, by the sweep.
    assert [e["event"] for e in log_events(proc.stderr)].count("format_detected") == 1
    assert forecast["cost_usd"] > 0
    assert survivors(client, kind, groups) == set(groups)
