"""Engine paths no emulator can reach: failing RPCs, signals, the clock.

The fake client (``tests/unit/fakes.py``) implements only what sweeper calls; everything else
about real query behaviour is covered by the integration tests against both emulators.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from google.api_core import exceptions as gexc
from google.cloud import datastore
from structlog.testing import capture_logs
from structlog.typing import EventDict

from sweeper.encodings import Encoding
from sweeper.engine import Sweep, sweep_targets
from sweeper.gate import DESCENDANT_QUERIES
from sweeper.logs import DatastoreError, configure
from sweeper.result import Runtime, SweepResult
from sweeper.retry import RetryPolicy, StopEvent
from sweeper.settings import SweepSettings
from sweeper.target import PAGE_SIZE
from tests.contract import SWEEP_FINISHED_FIELDS
from tests.support.clock import FakeClock
from tests.unit.fakes import FakeClient, api_error, entities

NOW = dt.datetime(2024, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
EXPIRED_SECONDS = int(NOW.timestamp()) - 86_400
# Queries a sweep with an explicit --format makes before its pages: the database's clock,
# the smallest and the largest value.
CHECK_FETCHES = 3
ATTEMPTS = 3
POLICY = RetryPolicy(max_attempts=ATTEMPTS, max_delay_s=3600.0, initial_wait_s=0.5, max_wait_s=1.0)


def expired_sessions(n: int) -> FakeClient:
    """``n`` sessions, all expired; every query returns them all, page by page."""
    return FakeClient(entities([EXPIRED_SECONDS] * n))


def settings(**overrides: Any) -> SweepSettings:
    fields: dict[str, Any] = {
        "kind": "eq-session",
        "prop": "expires_at",
        "format": Encoding.EPOCH_SECONDS,
        "grace": dt.timedelta(hours=3),
        "batch_size": 3,
        # The fake pages by position, not by value: one stream, as one query would.
        "workers": 1,
        # Its counts are by position too (everything is "due"): the guard has tests of its own.
        "max_fraction": 1.0,
    }
    fields.update(overrides)
    return SweepSettings(**fields)


def runtime(**overrides: Any) -> Runtime:
    fields: dict[str, Any] = {"now": lambda: NOW, "sleep": lambda _s: None, "retry_policy": POLICY}
    fields.update(overrides)
    return Runtime(**fields)


def run(
    client: FakeClient, s: SweepSettings | None = None, rt: Runtime | None = None
) -> tuple[SweepResult, list[EventDict]]:
    with capture_logs() as logs:
        result = Sweep(s or settings(), cast(datastore.Client, client), rt or runtime()).run()
    return result, logs


def finished(logs: list[EventDict]) -> EventDict:
    events = [e for e in logs if e["event"] == "sweep_finished"]
    assert len(events) == 1
    return events[0]


def test_delete_always_failing_stops_with_error() -> None:
    client = expired_sessions(5)
    client.delete_error_always = api_error(gexc.ServiceUnavailable, "backend down")
    result, _logs = run(client, settings(verify=False))
    assert result.stopped_reason == "error"
    assert result.failed == 3
    assert result.deleted == 0
    assert result.retries == ATTEMPTS - 1
    assert len(client.delete_calls) == ATTEMPTS
    assert result.exit_code == 1
    assert result.error is not None
    assert "ServiceUnavailable: backend down" in result.error


def test_sweep_finished_carries_every_contract_field_on_error() -> None:
    client = expired_sessions(5)
    client.delete_error_always = api_error(gexc.ServiceUnavailable, "backend down")
    _result, logs = run(client, settings(namespace="ns", database="db", verify=False))
    event = finished(logs)
    assert event.keys() >= SWEEP_FINISHED_FIELDS
    assert event["log_level"] == "error"
    assert event["kind"] == "eq-session"
    assert event["namespace"] == "ns"
    assert event["database"] == "db"
    assert event["property"] == "expires_at"
    assert event["format"] == "epoch-seconds"
    assert event["cutoff"] == "2024-06-01T09:00:00Z"
    assert event["dry_run"] is False
    # The page held 5; the first commit, of 3, failed for good: only those were taken.
    assert (event["matched"], event["deleted"], event["failed"]) == (3, 0, 3)
    assert event["retries"] == ATTEMPTS - 1
    assert event["batches"] == 0
    assert event["stopped_reason"] == "error"
    assert "ServiceUnavailable" in event["error"]


def test_transient_delete_failure_is_retried_and_counted() -> None:
    client = expired_sessions(4)
    client.delete_errors = {1: api_error(gexc.Aborted, "contention")}
    result, logs = run(client, settings(verify=False))
    assert result.stopped_reason == "complete"
    assert client.deleted == client.keys
    assert result.retries == 1
    assert finished(logs)["retries"] == 1
    assert sum(e["event"] == "call_retrying" for e in logs) == 1


def test_failed_page_is_retried_from_its_own_cursor() -> None:
    client = expired_sessions(PAGE_SIZE + 100)
    client.fetch_errors = {CHECK_FETCHES + 2: api_error(gexc.DeadlineExceeded, "slow")}
    result, _logs = run(client, settings(batch_size=500))
    assert result.stopped_reason == "complete"
    assert result.retries == 1
    # No key skipped, none deleted twice: the failed page was fetched again from its cursor.
    # (Two delete workers per stream: the pages may land in either order.)
    assert Counter(client.deleted) == Counter(client.keys)
    assert result.deleted == PAGE_SIZE + 100


def test_permission_denied_on_query_fails_without_retries() -> None:
    client = expired_sessions(5)
    client.fetch_error_always = api_error(gexc.PermissionDenied, "missing datastore.entities.list")
    result, logs = run(client)
    assert result.stopped_reason == "error"
    assert result.retries == 0
    assert client.fetches == CHECK_FETCHES  # the clock and the two ends at once; none again
    assert client.delete_calls == []
    assert result.exit_code == 1
    event = finished(logs)
    assert event["error"] == (
        "Datastore call failed: PermissionDenied: missing datastore.entities.list"
    )


def sessions_with_children(n: int, children: int) -> FakeClient:
    """``n`` expired sessions with ``children`` entities under each."""
    client = expired_sessions(n)
    for key in client.keys:
        client.children[key] = [
            datastore.Key(*key.flat_path, "Event", i + 1, project="p") for i in range(children)
        ]
    return client


def test_the_ancestor_queries_of_a_batch_are_in_flight_together() -> None:
    n = DESCENDANT_QUERIES
    client = sessions_with_children(n, children=2)
    # Each ancestor query waits until all of the batch's are in flight: made one after the
    # other, the first would wait in vain and the run would fail.
    together = threading.Barrier(n, timeout=10)

    def wait_for_the_others(_key: datastore.Key) -> None:
        together.wait()

    client.on_ancestor_query = wait_for_the_others
    result, _logs = run(client, settings(batch_size=n, with_descendants=True))
    assert result.stopped_reason == "complete", result.error
    assert (result.deleted, result.descendants_deleted) == (n, 2 * n)
    assert set(client.deleted) == set(client.keys) | {
        k for ks in client.children.values() for k in ks
    }


def test_the_calls_in_flight_are_limited_as_docs_reference_md_says() -> None:
    reference = (Path(__file__).parents[2] / "docs" / "reference.md").read_text()
    (row,) = [line for line in reference.splitlines() if line.startswith("| `concurrency_max`")]
    found = re.search(r"\((\d+) per worker.*; (\d+) more per worker with `--with-desc", row)
    assert found is not None
    per_worker, more = int(found[1]), int(found[2])
    for workers in (1, 3):
        for descendants, limit in ((False, per_worker), (True, per_worker + more)):
            s = settings(workers=workers, with_descendants=descendants)
            _result, logs = run(sessions_with_children(3, children=1), s)
            assert finished(logs)["concurrency_max"] == limit * workers


def test_a_failed_ancestor_query_deletes_nothing_of_its_batch() -> None:
    client = sessions_with_children(6, children=1)
    last = client.keys[-1]

    def refuse(key: datastore.Key) -> None:
        if key == last:
            raise api_error(gexc.PermissionDenied, "missing datastore.entities.list")

    client.on_ancestor_query = refuse
    result, _logs = run(client, settings(batch_size=6, with_descendants=True))
    assert result.stopped_reason == "error"
    assert "PermissionDenied" in (result.error or "")
    assert client.delete_calls == []
    assert (result.deleted, result.descendants_deleted) == (0, 0)


class SetWhen(StopEvent):
    """A stop flag that is set once ``condition`` holds: a signal at a chosen moment."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        super().__init__()
        self._condition = condition

    def is_set(self) -> bool:
        return self._condition() or super().is_set()


def test_stop_requested_stops_before_any_delete() -> None:
    client = expired_sessions(5)
    result, logs = run(client, rt=runtime(stop=SetWhen(lambda: True)))
    assert result.stopped_reason == "signal"
    assert (result.matched, result.deleted, result.batches) == (0, 0, 0)
    assert client.delete_calls == []
    assert result.exit_code == 0
    assert finished(logs)["stopped_reason"] == "signal"


def test_stop_requested_mid_run_finishes_current_batch_only() -> None:
    client = expired_sessions(9)
    # The signal arrives while the first batch is being deleted.
    result, _logs = run(client, rt=runtime(stop=SetWhen(lambda: len(client.deleted) >= 3)))
    assert result.stopped_reason == "signal"
    assert result.deleted == 3
    assert client.deleted == client.keys[:3]


def test_max_runtime_stops_cleanly() -> None:
    client = expired_sessions(20)
    s = settings(batch_size=1, max_runtime=dt.timedelta(seconds=5))
    # Each delete takes one second; the run stops at the first check past five.
    result, logs = run(client, s, runtime(monotonic=lambda: 1000.0 + len(client.deleted)))
    assert result.stopped_reason == "max_runtime"
    assert result.deleted == 5
    assert len(client.deleted) == result.deleted
    assert result.exit_code == 0
    assert finished(logs)["stopped_reason"] == "max_runtime"


def test_duration_comes_from_monotonic_clock() -> None:
    client = expired_sessions(0)
    # Each query takes 2.5 s on this clock, and nothing else takes any time.
    result, logs = run(client, rt=runtime(monotonic=lambda: 1000.0 + 2.5 * client.fetches))
    assert client.fetches > 0
    assert result.duration_s == 2.5 * client.fetches
    assert finished(logs)["duration_s"] == result.duration_s


def test_progress_events_are_rate_limited() -> None:
    client = expired_sessions(30)
    s = settings(batch_size=1)
    result, logs = run(client, s, runtime(monotonic=FakeClock(step=1.0), progress_every_s=5.0))
    assert result.deleted == 30
    progress = [e for e in logs if e["event"] == "sweep_progress"]
    assert len(progress) >= 3
    elapsed = [e["elapsed_s"] for e in progress]
    assert elapsed[0] >= 5.0
    assert all(b - a >= 5.0 for a, b in itertools.pairwise(elapsed))
    assert all(e["deleted"] <= 30 for e in progress)
    assert progress[-1]["per_s"] > 0


def test_no_progress_events_on_short_run() -> None:
    client = expired_sessions(6)
    _result, logs = run(client, rt=runtime(monotonic=FakeClock(step=0.001)))
    assert not any(e["event"] == "sweep_progress" for e in logs)


def test_a_client_that_cannot_be_built_still_owes_a_summary_and_run_finished() -> None:
    def no_credentials(_settings: SweepSettings) -> datastore.Client:
        raise DatastoreError("no Google Cloud credentials found")

    with capture_logs() as logs:
        (result,) = sweep_targets([settings()], no_credentials, runtime(), overall=True)

    assert (result.stopped_reason, result.error) == ("error", "no Google Cloud credentials found")
    assert finished(logs)["error"] == "no Google Cloud credentials found"
    (run,) = [e for e in logs if e["event"] == "run_finished"]
    assert (run["failed_targets"], run["stopped_reason"]) == (["eq-session.expires_at"], "error")


def test_a_bug_ends_the_run_in_one_line_and_logs_its_traceback() -> None:
    """A programming error is no Datastore failure: not retried, not called one, and its
    traceback goes to the log (JSON ``exception``) so that it can be fixed."""
    client = expired_sessions(5)

    def bug() -> None:
        raise KeyError("expires_at")

    client.on_ancestor_query = lambda _key: bug()  # inside the gate, as a bug of ours would be
    out = io.StringIO()
    configure("json", "info", out)
    try:
        result = Sweep(
            settings(with_descendants=True), cast(datastore.Client, client), runtime()
        ).run()
    finally:
        configure("console", "info")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert result.stopped_reason == "error"
    assert result.error == "internal error: KeyError: 'expires_at'"
    assert result.retries == 0
    (logged,) = [e for e in events if e["event"] == "internal_error"]
    assert logged["severity"] == "ERROR"
    assert logged["exception"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'expires_at'" in logged["exception"]
    assert client.deleted == []
