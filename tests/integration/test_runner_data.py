"""The shipped ``deploy/sweeper.toml`` against data shaped exactly as the eQ runner writes it.

The seed comes from ``tests.support.seed``'s ``runner_*`` functions: int epoch seconds for
every expiry and for ``submitted_at``, null where unset, ISO strings for ``created_at`` and
``updated_at``, and only the runner's index fields indexed. The shipped file names the
runner's real kinds, while each test needs kinds of its own; so the test sweeps a temporary
copy of the file in which only the ``kind = "..."`` values are substituted (textually, every
other byte kept), and checks by parsing both files that the targets differ in nothing but
their kinds. Every target of the shipped file thus runs unchanged, through the real CLI in a
subprocess, against both emulators.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from google.cloud import datastore

from sweeper.settings import DEFAULT_GRACE, DEFAULT_PROPERTY, load_targets, parse_duration
from tests.integration.helpers import ago, ahead, log_events, run_cli, survivors
from tests.support.emulator import Emulator
from tests.support.seed import (
    put_entities,
    runner_epoch_seconds,
    runner_eq_session,
    runner_questionnaire_state,
    runner_used_jti_claim,
)

SHIPPED = Path(__file__).parents[2] / "deploy" / "sweeper.toml"
RUNNER_KINDS = ("eq-session", "questionnaire-state", "used-jti-claim")
BASE: dict[str, Any] = {
    "prop": DEFAULT_PROPERTY,
    "format": "auto",
    "grace": parse_duration(DEFAULT_GRACE),
}

Instant = dt.datetime | None


def sessions() -> dict[str, Sequence[Instant]]:
    """eq-session ``expires_at`` values, relative to now; the shipped grace is 3 h.

    More live than due, as in a steady state: the shipped config keeps the default fraction
    guard, which refuses a run that would delete more than half of what carries the property.
    """
    return {
        "expired": [ago(hours=4)] * 12 + [ago(days=30)] * 3,
        "within-grace": [ago(hours=2)] * 5,
        "live": [ahead(minutes=45)] * 25,
        "null": [None] * 3,
    }


def states() -> dict[str, Sequence[tuple[Instant, Instant]]]:
    """questionnaire-state ``(submitted_at, expires_at)`` pairs; the shipped graces are 3 h on
    expires_at and 1 h on submitted_at."""
    return {
        "expired": [(None, ago(hours=4))] * 10,
        "submitted-and-expired": [(ago(hours=6), ago(hours=5))] * 3,
        "submitted-long-ago": [(ago(hours=2), ahead(days=30))] * 8,
        "submitted-no-expiry": [(ago(days=2), None)] * 2,
        "submitted-recently": [(ago(minutes=10), ahead(days=30))] * 20,
        "expired-within-grace": [(None, ago(hours=2))] * 3,
        "live": [(None, ahead(days=7))] * 5,
        "null-expiry": [(None, None)] * 3,
    }


def jtis() -> dict[str, Sequence[dt.datetime]]:
    """used-jti-claim ``expires_at`` values: nothing indexed, so no range query sees them."""
    return {"expired": [ago(days=1)] * 6, "live": [ahead(hours=1)] * 4}


def shipped_config_for(tmp_path: Path, kinds: Mapping[str, str]) -> Path:
    """A copy of deploy/sweeper.toml whose ``kind = "..."`` values name this test's kinds."""
    text = SHIPPED.read_text()
    found: set[str] = set()

    def substitute(match: re.Match[str]) -> str:
        found.add(match.group(1))
        return f'kind = "{kinds[match.group(1)]}"'

    pattern = r'kind = "(' + "|".join(map(re.escape, kinds)) + r')"'
    copy = tmp_path / "sweeper.toml"
    copy.write_text(re.sub(pattern, substitute, text))
    assert found >= {"eq-session", "questionnaire-state"}
    # Nothing but the kinds differs between the shipped targets and the copy's.
    shipped = load_targets(SHIPPED, dict(BASE))
    assert [dataclasses.replace(t, kind=kinds[t.kind]) for t in shipped] == load_targets(
        copy, dict(BASE)
    )
    return copy


def seed_runner_kinds(client: datastore.Client, session: str, state: str, jti: str) -> None:
    put_entities(
        client,
        [
            runner_eq_session(
                client,
                session,
                name,
                expiry,
                user_id=None if i % 2 else f"user-{name}",
                session_data="x" * 700,
            )
            for group, expiries in sessions().items()
            for i, expiry in enumerate(expiries)
            for name in [f"{group}-{i}"]
        ]
        + [
            runner_questionnaire_state(
                client,
                state,
                f"{group}-{i}",
                submitted_at=submitted,
                expires_at=expires,
                state_data="y" * 700,
                collection_exercise_sid="ce-1",
            )
            for group, rows in states().items()
            for i, (submitted, expires) in enumerate(rows)
        ]
        + [
            runner_used_jti_claim(client, jti, f"{group}-{i}", expiry)
            for group, expiries in jtis().items()
            for i, expiry in enumerate(expiries)
        ],
    )


def test_the_shipped_config_sweeps_the_runners_expired_data(
    emulator: Emulator, client: datastore.Client, kind: str, tmp_path: Path
) -> None:
    session, state, jti = f"{kind}-session", f"{kind}-state", f"{kind}-jti"
    config = shipped_config_for(
        tmp_path, dict(zip(RUNNER_KINDS, (session, state, jti), strict=True))
    )
    seed_runner_kinds(client, session, state, jti)

    proc = run_cli(emulator, "--config", str(config), SWEEPER_LOG_FORMAT="json")

    assert proc.returncode == 0, proc.stderr
    logged = log_events(proc.stderr)
    finished = [e for e in logged if e["event"] == "sweep_finished"]
    assert [
        (e["kind"], e["property"], e["format"], e["matched"], e["deleted"], e["failed"])
        for e in finished
    ] == [
        (session, "expires_at", "epoch-seconds", 15, 15, 0),
        (state, "expires_at", "epoch-seconds", 13, 13, 0),
        (state, "submitted_at", "epoch-seconds", 10, 10, 0),
    ]
    assert {e["stopped_reason"] for e in finished} == {"complete"}
    assert (logged[-1]["event"], logged[-1]["deleted"], logged[-1]["failed_targets"]) == (
        "run_finished",
        38,
        [],
    )
    assert survivors(client, session, sessions()) == {"within-grace", "live", "null"}
    assert survivors(client, state, states()) == {
        "submitted-recently",
        "expired-within-grace",
        "live",
        "null-expiry",
    }
    # The shipped file has no target for used-jti-claim (its --scan target is commented out,
    # and the runner keeps those claims in Redis): the kind is untouched, expired ones included.
    assert survivors(client, jti, jtis()) == set(jtis())


SUBMITTED_LONG_AGO = ("submitted-long-ago", "submitted-no-expiry", "submitted-and-expired")


def sweep_submitted_at(emulator: Emulator, kind: str, fmt: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        emulator,
        *("--kind", kind, "--property", "submitted_at", "--format", fmt, "--grace", "1h"),
        SWEEPER_LOG_FORMAT="json",
    )


@pytest.mark.parametrize("fmt", ["epoch-seconds", "auto"])
def test_submitted_at_is_swept_as_epoch_seconds(
    emulator: Emulator, client: datastore.Client, kind: str, fmt: str
) -> None:
    """The runner's submitted_at is int epoch seconds, and ``auto`` finds exactly that."""
    seed_runner_kinds(client, f"{kind}-session", kind, f"{kind}-jti")

    proc = sweep_submitted_at(emulator, kind, fmt)

    assert proc.returncode == 0, proc.stderr
    (summary,) = [e for e in log_events(proc.stderr) if e["event"] == "sweep_finished"]
    assert (summary["format"], summary["deleted"]) == ("epoch-seconds", 13)
    kept = [g for g in states() if g not in SUBMITTED_LONG_AGO]
    assert survivors(client, kind, states()) == set(kept)


def test_a_timestamp_target_never_deletes_the_runners_submitted_at(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """What the shipped config used to say, ``format = "timestamp"``, can match nothing in the
    runner's data: the sweep ends deleting nothing, whether it reports that as a success
    (exit 0) or refuses the mismatch (exit 1)."""
    seed_runner_kinds(client, f"{kind}-session", kind, f"{kind}-jti")

    proc = sweep_submitted_at(emulator, kind, "timestamp")

    assert proc.returncode in (0, 1), proc.stderr
    assert [e["deleted"] for e in log_events(proc.stderr) if e["event"] == "sweep_finished"] in (
        [],
        [0],
    )
    assert survivors(client, kind, states()) == set(states())


def test_runner_entities_read_back_with_the_runners_types(
    client: datastore.Client, kind: str
) -> None:
    """The seed writes what the runner's storage layer writes: the stored types and the
    unindexed properties, as a lookup returns them."""
    submitted, expires = ago(hours=2), ahead(days=30)
    put_entities(
        client,
        [
            runner_eq_session(client, f"{kind}-session", "s", expires, user_id=None),
            runner_questionnaire_state(
                client, f"{kind}-state", "q", submitted_at=submitted, expires_at=expires
            ),
            runner_questionnaire_state(client, f"{kind}-state", "n", expires_at=expires),
            runner_used_jti_claim(client, f"{kind}-jti", "j", expires),
        ],
    )
    session = client.get(client.key(f"{kind}-session", "s"))
    state = client.get(client.key(f"{kind}-state", "q"))
    unsubmitted = client.get(client.key(f"{kind}-state", "n"))
    claim = client.get(client.key(f"{kind}-jti", "j"))

    assert session["expires_at"] == runner_epoch_seconds(expires) == int(expires.timestamp())
    assert type(session["expires_at"]) is int
    assert session["user_id"] is None
    assert dt.datetime.fromisoformat(session["created_at"]).tzinfo == dt.UTC
    assert set(session.exclude_from_indexes) == set(session) - {"expires_at"}

    assert (state["submitted_at"], state["expires_at"], state["version"]) == (
        int(submitted.timestamp()),
        int(expires.timestamp()),
        1,
    )
    assert isinstance(state["updated_at"], str)
    assert set(state.exclude_from_indexes) == set(state) - {
        "collection_exercise_sid",
        "submitted_at",
        "expires_at",
    }
    assert "submitted_at" in unsubmitted
    assert unsubmitted["submitted_at"] is None  # a stored null, not a missing property

    assert dict(claim) == {"jti_claim": "j", "expires_at": int(expires.timestamp())}
    assert set(claim.exclude_from_indexes) == {"jti_claim", "expires_at"}
