"""``sweep --config``: the runner's three purges in one run, against the real emulators."""

from __future__ import annotations

import datetime as dt
import shlex
import uuid
from pathlib import Path

from google.cloud import datastore

from sweeper.encodings import Encoding
from tests.integration.helpers import (
    ago,
    ahead,
    log_events,
    make_client,
    plain_lines,
    run_cli,
    run_on_a_terminal,
    seed,
    stored,
    survivors,
)
from tests.support.emulator import Emulator
from tests.support.seed import (
    MISSING,
    Session,
    names,
    put_entities,
    put_sessions,
    runner_eq_session,
    runner_questionnaire_state,
)

S, TS = Encoding.EPOCH_SECONDS, Encoding.TIMESTAMP
H = dt.timedelta(hours=1)


def test_three_targets_in_one_run(
    emulator: Emulator, client: datastore.Client, kind: str, tmp_path: Path
) -> None:
    sessions, state = f"{kind}-session", f"{kind}-state"
    session_groups = {
        "expired": stored(ago(hours=4), S, 30),  # past the 3 h grace
        "recent": stored(ago(hours=2), S, 5),  # expired, but within the grace
        "live": stored(ahead(hours=1), S, 5),
    }
    seed(client, sessions, session_groups)
    # questionnaire-state: expires_at for some, submitted_at for others, and in-flight ones.
    state_by_expiry = {"gone": stored(ago(hours=4), S, 20), "kept": stored(ahead(hours=4), S, 4)}
    seed(client, state, state_by_expiry)
    submitted: dict[str, list[object]] = {
        "submitted": stored(ago(hours=2), TS, 15),
        "fresh": stored(ago(minutes=10), TS, 3),
        "unsubmitted": [None] * 4,
        "nofield": [MISSING] * 2,
    }
    put_sessions(
        client,
        state,
        [Session(f"{g}-{i}", v) for g, vs in submitted.items() for i, v in enumerate(vs)],
        prop="submitted_at",
    )
    config = tmp_path / "sweeper.toml"
    config.write_text(f"""
[defaults]
max_runtime = "4m"
max_fraction = 1  # these kinds hold mostly expired sessions; test_guards.py has the guard

[[target]]
kind = "{sessions}"
format = "epoch-seconds"
grace = "3h"

[[target]]
kind = "{state}"
property = "expires_at"
format = "epoch-seconds"
grace = "3h"

[[target]]
kind = "{state}"
property = "submitted_at"
format = "timestamp"
grace = "1h"
""")

    proc = run_cli(emulator, "--config", str(config), SWEEPER_LOG_FORMAT="json")

    assert proc.returncode == 0, proc.stderr
    events = log_events(proc.stderr)
    finished = [e for e in events if e["event"] == "sweep_finished"]
    assert [(e["kind"], e["property"], e["deleted"]) for e in finished] == [
        (sessions, "expires_at", 30),
        (state, "expires_at", 20),
        (state, "submitted_at", 15),
    ]
    overall = events[-1]
    assert (overall["event"], overall["deleted"], overall["failed_targets"]) == (
        "run_finished",
        65,
        [],
    )
    assert survivors(client, sessions, session_groups) == {"recent", "live"}
    assert survivors(client, state, {**state_by_expiry, **submitted}) == {
        "kept",
        "fresh",
        "unsubmitted",
        "nofield",
    }


def test_a_failing_target_fails_the_run_but_not_the_others(
    emulator: Emulator, client: datastore.Client, kind: str, tmp_path: Path
) -> None:
    mixed, fine = f"{kind}-mixed", f"{kind}-fine"
    seed(client, mixed, {"s": stored(ago(days=1), S, 3), "ts": stored(ago(days=1), TS, 3)})
    seed(client, fine, {"old": stored(ago(days=1), S, 7)})
    config = tmp_path / "sweeper.toml"
    config.write_text(
        f'[defaults]\nmax_fraction = 1\n\n[[target]]\nkind = "{mixed}"\n\n'
        f'[[target]]\nkind = "{fine}"\n'
    )

    proc = run_cli(emulator, "--config", str(config), SWEEPER_LOG_FORMAT="json")

    assert proc.returncode == 1
    (line,) = plain_lines(proc.stderr)
    assert line.startswith("sweeper: error: 1 of 2 sweeps failed")
    overall = log_events(proc.stderr)[-1]
    assert overall["failed_targets"] == [f"{mixed}.expires_at"]
    assert overall["deleted"] == 7


# --- the runbook's first run, word for word ------------------------------------------------

RUNBOOK = Path(__file__).parents[2] / "docs" / "operations.md"


def runbook_commands() -> list[list[str]]:
    """The commands of the runbook's first-run step, as an operator would paste them."""
    text = RUNBOOK.read_text().split("1. **First run", 1)[1].split("\n2. **", 1)[0]
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_the_runbooks_first_run_works_word_for_word_with_the_shipped_config(
    emulator: Emulator,
) -> None:
    """A backlog in the eQ runner's three targets, written as the runner writes them, cleared by
    following docs/operations.md with deploy/sweeper.toml: the dry run says the guard would
    refuse, the backlog run asks per target and clears it, the scheduled run then succeeds."""
    project = f"runbook-{uuid.uuid4().hex[:8]}"
    client = make_client(Emulator(emulator.flavour, project=project, port=emulator.port))
    now = dt.datetime.now(dt.UTC)
    sessions = [runner_eq_session(client, "eq-session", f"old-{i}", now - H * 5) for i in range(40)]
    sessions += [runner_eq_session(client, "eq-session", f"live-{i}", now + H) for i in range(5)]
    states = [
        runner_questionnaire_state(
            client, "questionnaire-state", f"old-{i}", expires_at=now - H * 5
        )
        for i in range(30)
    ]
    states += [
        runner_questionnaire_state(
            client,
            "questionnaire-state",
            f"done-{i}",
            expires_at=now + H * 24,
            submitted_at=now - H * 2,
        )
        for i in range(20)
    ]
    states += [
        runner_questionnaire_state(client, "questionnaire-state", f"open-{i}", expires_at=now + H)
        for i in range(5)
    ]
    put_entities(client, [*sessions, *states])
    env = {"DATASTORE_PROJECT_ID": project}

    dry, rest, scheduled = runbook_commands()
    assert dry[:4] == ["sweeper", "sweep", "--config", "deploy/sweeper.toml"]
    code, shown = run_on_a_terminal(emulator, None, *dry[2:], env=env)
    assert code == 0, shown
    assert "a run without --dry-run would be refused" in shown
    assert len(names(client, "eq-session")) == 45

    code, shown = run_on_a_terminal(emulator, "y", *rest[2:], env=env)
    assert code == 0, shown
    assert shown.count("[y/N]") == 3  # a plan and a question per target
    assert names(client, "eq-session") == {f"live-{i}" for i in range(5)}
    assert names(client, "questionnaire-state") == {f"open-{i}" for i in range(5)}

    code, shown = run_on_a_terminal(emulator, "y", *scheduled[2:], env=env)
    assert code == 0, shown
