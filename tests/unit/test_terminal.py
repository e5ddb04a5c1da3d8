"""The summary a person reads at the end of ``sweep`` on a terminal
(``result.terminal_summary``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sweeper.result import Retention, SweepResult, terminal_summary
from sweeper.retry import StopReason
from sweeper.rpc import Count
from sweeper.settings import SweepSettings

CUTOFF = dt.datetime(2024, 6, 1, 9, tzinfo=dt.UTC)


def result(dry_run: bool = False, namespace: str | None = None, **counts: Any) -> SweepResult:
    settings = SweepSettings(
        kind="eq-session",
        prop="expires_at",
        format="auto",
        grace=dt.timedelta(hours=3),
        dry_run=dry_run,
        namespace=namespace,
    )
    r = SweepResult(settings, CUTOFF, "epoch-seconds")
    for name, value in counts.items():
        setattr(r, name, value)
    return r


def test_what_went_how_fast_over_the_deletes_alone() -> None:
    # 60 s in all (a person at the prompt), 2 s of deletes: the rate is over the 2 s.
    r = result(matched=3000, deleted=3000, duration_s=60.0, deleting_s=2.0)
    assert terminal_summary([r]) == "eq-session: deleted 3,000 in 2.0 s, 1,500/s"


def test_what_was_kept_refused_and_left_and_what_to_do_next() -> None:
    r = result(
        matched=1000,
        deleted=990,
        skipped=7,
        failed=3,
        deleting_s=1.0,
        stopped_reason=StopReason.MAX_RUNTIME,
        retention=Retention(Count(20_000, "aggregation"), Count(10_000, "aggregation", 10_000)),
    )
    assert terminal_summary([r]).splitlines() == [
        "eq-session: deleted 990 in 1.0 s, 990/s",
        "  7 kept (live again when checked); 3 could not be deleted"
        " (see delete_refused in the log)",
        "  left past the cutoff: at least 10,000",
        "  stopped at --max-runtime: run again to go on",
    ]


def test_a_dry_run_says_nothing_went() -> None:
    assert terminal_summary([result(dry_run=True, matched=12)]).splitlines() == [
        "eq-session: dry run, would delete 12; nothing was deleted",
        "  run again without --dry-run to delete them",
    ]


def test_a_lone_failure_leaves_its_wording_to_the_error_line() -> None:
    failed = result(stopped_reason=StopReason.ERROR, error="refusing: too much")
    assert terminal_summary([failed]) == "eq-session: error; nothing deleted"


def test_several_sweeps_each_and_in_all() -> None:
    ok = result(namespace="a", matched=5, deleted=5, deleting_s=0.5)
    failed = result(namespace="b", stopped_reason=StopReason.ERROR, error="Datastore call failed")
    nothing = result(namespace="c")
    assert terminal_summary([ok, failed, nothing]).splitlines() == [
        "eq-session (namespace a): deleted 5 in 0.5 s, 10/s",
        "eq-session (namespace b): error; nothing deleted",
        "  Datastore call failed",
        "eq-session (namespace c): nothing was due",
        "in all: 5 deleted in 3 sweeps, 1 failed",
    ]


def test_a_stop_by_a_person_is_one_line() -> None:
    """Ctrl-C at the question, during the deletes, or "no": one line each, what went and why."""
    at_question = result(stopped_reason=StopReason.SIGNAL, duration_s=3.0)
    during = result(matched=900, deleted=400, deleting_s=4.0, stopped_reason=StopReason.SIGNAL)
    declined = result(stopped_reason=StopReason.DECLINED)
    assert (
        terminal_summary([at_question], "SIGINT")
        == "eq-session: stopped by SIGINT; nothing was deleted"
    )
    assert terminal_summary([during], "SIGINT") == (
        "eq-session: stopped by SIGINT after deleting 400 in 4.0 s; run again to go on"
    )
    assert terminal_summary([declined]) == "eq-session: not confirmed; nothing was deleted"
    assert declined.exit_code == 1
    assert declined.error is None  # not an error: sweep_finished is logged at info


def test_a_dry_run_never_advises_what_the_guard_would_refuse() -> None:
    carrying = Retention(Count(100, "aggregation"), Count(0, "aggregation"))
    backlog = result(dry_run=True, matched=94, retention=carrying)
    assert terminal_summary([backlog]).splitlines()[1] == (
        "  a run without --dry-run would be refused: 94 of the 100 carrying expires_at (94%) is "
        "more than --max-fraction 0.5. If this is a backlog, not a mistake, run it once with "
        "--max-fraction 1"
    )
    steady = result(dry_run=True, matched=10, retention=carrying)
    assert (
        terminal_summary([steady]).splitlines()[1] == "  run again without --dry-run to delete them"
    )
