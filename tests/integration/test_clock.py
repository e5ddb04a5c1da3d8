"""A host whose clock is a day off deletes nothing live: the cutoff is the database's time.

The real CLI runs under ``faketime`` (Debian's libfaketime), so its clock, and nothing else's,
is a day ahead or behind, against sessions seeded the way the runner writes them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest
from google.cloud import datastore

from tests.integration.helpers import log_events
from tests.support.emulator import Emulator
from tests.support.seed import names, put_entities, runner_eq_session

NOW = dt.datetime.now(dt.UTC)
# Expired beyond the 15-minute default grace; live ones expire within the next day (what a
# clock a day ahead would delete) and after it.
EXPIRED = [NOW - dt.timedelta(hours=1, minutes=i) for i in range(100)]
LIVE = [NOW + dt.timedelta(minutes=10 + 14 * i) for i in range(100)]
LATER = [NOW + dt.timedelta(days=2, minutes=i) for i in range(20)]
DAY_S = 86_400


def seed(client: datastore.Client, kind: str) -> None:
    sessions = [
        runner_eq_session(client, kind, f"{group}-{i}", expires)
        for group, instants in (("expired", EXPIRED), ("live", LIVE), ("later", LATER))
        for i, expires in enumerate(instants)
    ]
    put_entities(client, sessions)


def with_clock(emulator: Emulator, shift: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI (``sweeper ARGS``) with its clock shifted by ``faketime -f SHIFT``."""
    faketime = shutil.which("faketime")
    if faketime is None:
        pytest.fail("faketime is missing: apt-get install faketime (.ci/run does)")
    return subprocess.run(
        [faketime, "-f", shift, sys.executable, "-m", "sweeper", *args],
        env={**os.environ, **emulator.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sweep_with_clock(emulator: Emulator, kind: str, shift: str) -> dict[str, Any]:
    done = with_clock(emulator, shift, "sweep", "--kind", kind, "--log-format", "json")
    assert done.returncode == 0, done.stderr
    events = log_events(done.stderr)
    (summary,) = [e for e in events if e["event"] == "sweep_finished"]
    assert isinstance(summary, dict)
    summary["warnings"] = [e["event"] for e in events if e["severity"] == "WARNING"]
    return summary


def live_names() -> set[str]:
    return {f"live-{i}" for i in range(len(LIVE))} | {f"later-{i}" for i in range(len(LATER))}


@pytest.mark.parametrize(("shift", "skew"), [("+1d", DAY_S), ("-1d", -DAY_S)])
def test_a_host_clock_a_day_off_deletes_exactly_the_expired_sessions(
    emulator: Emulator, client: datastore.Client, kind: str, shift: str, skew: int
) -> None:
    if emulator.flavour == "datastore":
        pytest.skip("the legacy emulator reports no time: see the clock_source test below")
    seed(client, kind)

    summary = sweep_with_clock(emulator, kind, shift)

    assert names(client, kind) == live_names()  # 0 live lost; every expired one gone
    assert summary["deleted"] == len(EXPIRED)
    assert summary["clock_source"] == "server"
    assert abs(summary["clock_skew_s"] - skew) < 60
    assert "clock_skew" in summary["warnings"]


def test_where_the_database_reports_no_time_the_summary_says_the_local_clock_was_used(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    seed(client, kind)

    summary = sweep_with_clock(emulator, kind, "+0")

    expected = "server" if emulator.flavour == "firestore" else "local"
    assert summary["clock_source"] == expected
    assert (summary["clock_skew_s"] is None) == (expected == "local")
    assert summary["verify"] is True  # every delete is checked, on every database
    assert names(client, kind) == live_names()


def test_inspect_takes_its_cutoff_from_the_database_clock_as_the_sweep_does(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """A report a day ahead would count a day of live sessions as expired."""
    if emulator.flavour == "datastore":
        pytest.skip("the legacy emulator reports no time: inspect uses the local clock there")
    seed(client, kind)
    done = with_clock(emulator, "+1d", "inspect", "--kind", kind)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["expired_count"] == len(EXPIRED)
    cutoff = dt.datetime.fromisoformat(report["cutoff"].replace("Z", "+00:00"))
    expected = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=15)
    assert abs((cutoff - expected).total_seconds()) < 60
