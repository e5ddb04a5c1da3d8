"""Guards on the blast radius: each operator mistake tried against the emulator, 0 live lost.

Every run here is the real CLI in its own process, as an operator would start it: without a
terminal (a CronJob) or through a real pseudo-terminal (a person at a shell).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
from google.cloud import datastore

from tests.integration.helpers import log_events, make_client, plain_lines, run_on_a_terminal
from tests.support.emulator import Emulator
from tests.support.seed import names, put_entities, runner_eq_session, runner_questionnaire_state

NOW = dt.datetime.now(dt.UTC)


def sessions(client: datastore.Client, kind: str, expired: int, live: int) -> set[str]:
    """Runner-shaped sessions; returns the names of the live ones."""
    put_entities(
        client,
        [
            runner_eq_session(client, kind, f"expired-{i}", NOW - dt.timedelta(hours=1))
            for i in range(expired)
        ]
        + [
            runner_eq_session(client, kind, f"live-{i}", NOW + dt.timedelta(hours=1))
            for i in range(live)
        ],
    )
    return {f"live-{i}" for i in range(live)}


def cli(
    emulator: Emulator, *args: str, project: str | None = None
) -> tuple[int, dict[str, Any], str]:
    env = {**os.environ, **emulator.env}
    if project:
        env["DATASTORE_PROJECT_ID"] = project
    done = subprocess.run(
        [sys.executable, "-m", "sweeper", "sweep", "--log-format", "json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in done.stderr
    events = log_events(done.stderr)
    (summary,) = [e for e in events if e["event"] == "sweep_finished"]
    assert isinstance(summary, dict)
    summary["events"] = [e["event"] for e in events]
    return done.returncode, summary, done.stderr


def test_a_wrong_property_is_refused_before_the_first_batch(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """``--property created_at`` on a store that indexes it: every entity is in the past."""
    entities = []
    for i in range(100):
        entity = runner_eq_session(client, kind, f"live-{i}", NOW + dt.timedelta(hours=1))
        entity["created_at"] = NOW - dt.timedelta(minutes=30)  # a Timestamp, indexed here
        entity.exclude_from_indexes.discard("created_at")
        entities.append(entity)
    put_entities(client, entities)

    code, summary, err = cli(emulator, "--kind", kind, "--property", "created_at")

    assert code == 1
    assert "would delete 100 of the 100" in err
    assert "--max-fraction 1" in err
    assert (summary["deleted"], summary["due_fraction"]) == (0, 1.0)
    assert names(client, kind) == {f"live-{i}" for i in range(100)}


def test_grace_zero_on_a_property_that_is_not_an_expiry_is_refused(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """submitted_at is when a questionnaire was submitted; with no grace, all of them are due."""
    states = [
        runner_questionnaire_state(
            client,
            kind,
            f"user-{i}",
            expires_at=NOW + dt.timedelta(days=30),
            submitted_at=NOW - dt.timedelta(minutes=5),
        )
        for i in range(50)
    ]
    put_entities(client, states)

    code, summary, _err = cli(
        emulator, "--kind", kind, "--property", "submitted_at", "--grace", "0"
    )

    assert (code, summary["deleted"]) == (1, 0)
    assert len(names(client, kind)) == 50


SCAN = ["--scan", "--format", "epoch-seconds"]


@pytest.mark.parametrize(
    ("mistake", "path"),
    [
        ("kind", []),
        ("property", []),
        ("kind", SCAN),
        ("property", SCAN),
        ("kind", ["--with-descendants"]),
        ("kind", ["--shard", "1/2"]),
    ],
    ids=str,
)
def test_a_misspelt_kind_or_property_fails_and_names_the_target(
    emulator: Emulator, client: datastore.Client, kind: str, mistake: str, path: list[str]
) -> None:
    """`--kind eq-sesion` and `--property expiry` exited 0, "nothing was due": as a CronJob,
    a success on every schedule, and no alert. The same on every path to a delete."""
    sessions(client, kind, expired=20, live=20)
    wrong = ["--kind", kind.replace("-", "_")] if mistake == "kind" else ["--kind", kind]
    wrong += ["--property", "expiry"] if mistake == "property" else []

    code, summary, err = cli(emulator, *wrong, *path)

    assert code == 1
    assert (summary["stopped_reason"], summary["empty"], summary["carrying"]) == ("error", True, 0)
    (line,) = plain_lines(err)
    swept_kind = wrong[1]
    prop = "expiry" if mistake == "property" else "expires_at"
    assert line.startswith(
        f"sweeper: error: nothing to sweep: no {swept_kind} entity in the default namespace "
        f"carries {prop}."
    )
    assert "--allow-empty" in line
    assert len(names(client, kind)) == 40


def test_allow_empty_lets_a_target_that_may_be_empty_succeed(emulator: Emulator, kind: str) -> None:
    code, summary, _err = cli(emulator, "--kind", kind, "--allow-empty")

    assert (code, summary["stopped_reason"], summary["empty"]) == (0, "complete", True)
    assert "target_empty" in summary["events"]


def test_a_run_that_deletes_the_last_session_is_no_empty_target(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    sessions(client, kind, expired=20, live=0)

    code, summary, _err = cli(emulator, "--kind", kind, "--max-fraction", "1")

    assert (code, summary["deleted"], summary["empty"]) == (0, 20, True)


def test_the_first_run_over_a_large_backlog_needs_max_fraction_1(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    live = sessions(client, kind, expired=970, live=30)

    code, _summary, err = cli(emulator, "--kind", kind)
    assert code == 1
    assert "would delete 970 of the 1000" in err
    assert "(97%)" in err
    assert len(names(client, kind)) == 1000

    code, summary, _err = cli(emulator, "--kind", kind, "--max-fraction", "1")
    assert (code, summary["deleted"], summary["expired_left"]) == (0, 970, 0)
    assert summary["oldest_expired"] is None
    assert summary["empty"] is False
    assert names(client, kind) == live


def test_a_steady_state_run_passes_the_default_guard(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    live = sessions(client, kind, expired=10, live=90)

    code, summary, _err = cli(emulator, "--kind", kind)

    assert (code, summary["deleted"]) == (0, 10)
    # Counted only as far as needed: 20 carrying the property settle "10 of them is within 0.5".
    assert summary["due_fraction"] is None
    assert names(client, kind) == live


# --- a person at a terminal ---------------------------------------------------------------


@pytest.mark.parametrize(("answer", "deleted"), [("n", False), ("y", True)])
def test_on_a_terminal_the_plan_is_shown_and_nothing_goes_without_a_yes(
    emulator: Emulator, kind: str, answer: str, deleted: bool
) -> None:
    """The wrong project (a laptop's default credentials point at production) shows here."""
    prod = make_client(Emulator(emulator.flavour, project="prod-sessions", port=emulator.port))
    live = sessions(prod, kind, expired=10, live=90)

    code, shown = run_on_a_terminal(emulator, answer, "--project", "prod-sessions", "--kind", kind)

    for line in (
        "project    prod-sessions",
        f"kind       {kind}",
        "property   expires_at (epoch-seconds)",
        "matches    10 of 100",
    ):
        assert line in shown, shown
    assert "Delete these 10 entities? [y/N]" in shown
    left = names(prod, kind)
    if deleted:
        assert (code, left) == (0, live)
    else:
        assert code == 1
        assert "not confirmed" in shown
        assert len(left) == 100


@pytest.mark.parametrize(
    "path", [SCAN, ["--shard", "1/2"], ["--with-descendants"], ["--no-verify"]], ids=str
)
def test_every_path_to_a_delete_asks_and_no_deletes_nothing(
    emulator: Emulator, kind: str, path: list[str]
) -> None:
    """The question guards the scan, a shard, descendants and unverified deletes alike."""
    client = make_client(emulator)
    sessions(client, kind, expired=10, live=90)

    code, shown = run_on_a_terminal(emulator, "n", "--kind", kind, *path)

    assert re.search(r"Delete these \d+ entities\? \[y/N\]", shown), shown
    assert code == 1, shown
    assert "not confirmed" in shown
    assert len(names(client, kind)) == 100


def test_yes_skips_the_question_on_a_terminal(emulator: Emulator, kind: str) -> None:
    client = make_client(emulator)
    live = sessions(client, kind, expired=10, live=90)

    code, shown = run_on_a_terminal(emulator, "", "--kind", kind, "--yes")

    assert code == 0
    assert "[y/N]" not in shown
    assert names(client, kind) == live


def test_on_a_terminal_the_run_ends_with_a_summary_timed_from_its_deletes(
    emulator: Emulator, kind: str
) -> None:
    client = make_client(emulator)
    live = sessions(client, kind, expired=10, live=90)

    # The person takes 5 s to answer: the rate must not count them.
    code, shown = run_on_a_terminal(emulator, "y", "--kind", kind, think_s=5)

    assert code == 0, shown
    assert names(client, kind) == live
    match = re.search(rf"{kind}: deleted 10 in ([\d.]+) s, [\d,]+/s", shown)
    assert match is not None, shown
    assert float(match.group(1)) < 5
    # The full record is for machines: not on a person's screen unless --log-level debug.
    assert "sweep_finished" not in shown
    assert "stopped_reason=" not in shown


def after_the_question(shown: str) -> list[str]:
    """The lines the terminal showed after the question was answered (or interrupted)."""
    rest = shown.rsplit("[y/N]:", 1)[1]
    return [line.strip() for line in rest.replace("\r", "\n").splitlines() if line.strip()]


def test_ctrl_c_at_the_question_stops_with_130_and_one_line(emulator: Emulator, kind: str) -> None:
    """It crashed the interpreter (exit 134): the question blocked a thread in stdin's buffer."""
    client = make_client(emulator)
    sessions(client, kind, expired=10, live=90)

    code, shown = run_on_a_terminal(emulator, None, "--kind", kind, interrupt_at="[y/N]")

    assert code == 130, shown
    assert "Fatal Python error" not in shown
    assert after_the_question(shown) == ["^C", f"{kind}: stopped by SIGINT; nothing was deleted"]
    assert len(names(client, kind)) == 100


@pytest.mark.parametrize(("answer", "left"), [("n", 100), ("y", 90)])
def test_the_question_is_asked_when_stdin_is_a_terminal_whatever_stderr_is(
    emulator: Emulator, kind: str, answer: str, left: int, tmp_path: Any
) -> None:
    """`sweeper sweep ... 2>err.log` (or `2>&1 | tee`) typed at a shell deleted without asking."""
    client = make_client(emulator)
    sessions(client, kind, expired=10, live=90)

    with (tmp_path / "err.log").open("wb") as err:
        code, shown = run_on_a_terminal(emulator, answer, "--kind", kind, stderr=err)

    assert "Delete these 10 entities? [y/N]" in shown
    assert "matches    10 of 100" in shown
    assert len(names(client, kind)) == left
    # stderr is not a terminal: the logs there are JSON lines, for a machine.
    logged = (tmp_path / "err.log").read_text()
    assert log_events(logged)[-1]["event"] == "sweep_finished"
    if answer == "n":
        assert code == 1
        assert plain_lines(logged) == ["sweeper: not confirmed at the prompt; nothing was deleted"]
    else:
        assert code == 0, shown


def test_no_at_the_question_is_no_error_for_the_alert(emulator: Emulator, kind: str) -> None:
    """The docs alert on severity ERROR: a person who answered no did nothing wrong."""
    client = make_client(emulator)
    sessions(client, kind, expired=10, live=90)

    code, shown = run_on_a_terminal(emulator, "n", "--kind", kind, "--log-format", "json")

    assert code == 1
    events = [json.loads(line) for line in shown.splitlines() if line.startswith("{")]
    (finished,) = [e for e in events if e["event"] == "sweep_finished"]
    assert (finished["stopped_reason"], finished["severity"]) == ("declined", "INFO")
    assert not [e for e in events if e["severity"] == "ERROR"]
    assert len(names(client, kind)) == 100


def test_ctrl_c_during_the_deletes_stops_with_130_and_one_line(
    emulator: Emulator, kind: str
) -> None:
    client = make_client(emulator)
    live = sessions(client, kind, expired=300, live=50)
    slow = ("--max-rate", "50", "--batch-size", "10", "--max-fraction", "1")

    code, shown = run_on_a_terminal(emulator, "y", "--kind", kind, *slow, interrupt_at="elapsed")

    assert code == 130, shown
    last = after_the_question(shown)[-1]
    assert re.fullmatch(
        rf"{kind}: stopped by SIGINT after deleting \d+ in [\d.]+ s; run again to go on", last
    ), shown
    left = names(client, kind)
    assert live < left  # stopped before the end: expired sessions are left ...
    assert live <= left  # ... and no live one went


def test_ctrl_c_before_the_question_stops_with_130(emulator: Emulator, kind: str) -> None:
    """Ctrl-C while the run reads the clock and checks the encoding: no question, no delete."""
    client = make_client(emulator)
    sessions(client, kind, expired=10, live=90)

    code, shown = run_on_a_terminal(
        emulator, None, "--kind", kind, "--log-level", "info", interrupt_at="sweep_started"
    )

    assert code == 130, shown
    assert "Traceback" not in shown
    assert "Fatal Python error" not in shown
    assert shown.rstrip().splitlines()[-1].endswith("nothing was deleted")
    assert len(names(client, kind)) == 100


def test_a_person_reads_a_few_short_lines(emulator: Emulator, kind: str) -> None:
    """Console lines of ~700 characters (sweep_started, forecast), format_detected twice,
    clock_local on every run: a person at a terminal now gets the plan, the progress line and
    the summary, and warnings; --log-level brings the rest back."""
    client = make_client(emulator)
    sessions(client, kind, expired=10, live=90)

    code, shown = run_on_a_terminal(emulator, "y", "--kind", kind)

    assert code == 0, shown
    lines = [line for line in shown.replace("\r", "\n").splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 100, shown
    assert not [line for line in lines if "[info" in line], shown
    assert lines[-1].startswith(f"{kind}: deleted 10 in ")


@pytest.mark.parametrize("no_color", [None, "1"])
def test_no_color_turns_the_colours_off(
    emulator: Emulator, kind: str, no_color: str | None
) -> None:
    client = make_client(emulator)
    sessions(client, kind, expired=10, live=90)
    env = {"NO_COLOR": no_color} if no_color else {}

    code, shown = run_on_a_terminal(
        emulator, None, "--kind", kind, "--dry-run", "--log-level", "info", env=env
    )

    assert code == 0, shown
    assert ("\x1b[" in shown) is (no_color is None)


def test_quiet_says_nothing_but_the_question(emulator: Emulator, kind: str) -> None:
    client = make_client(emulator)
    live = sessions(client, kind, expired=10, live=90)

    code, shown = run_on_a_terminal(emulator, "y", "--kind", kind, "-q")

    assert code == 0, shown
    assert after_the_question(shown) == ["y"]  # the answer, echoed: nothing else
    assert names(client, kind) == live
