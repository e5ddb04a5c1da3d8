"""An idle timeout: stores that keep no expiry, only when a session was last used.

``--property updated_at --grace 14d`` deletes the sessions last used more than 14 days ago:
a last-seen time plus the idle timeout is an expiry, and the grace is that timeout. The same
safety holds as for an expiry: a two-sided range inside the stored encoding, null and missing
values never matched, the fraction guard, the re-check. Run here through the real CLI, with the
guard at its default, as the README's worked example does.
"""

from __future__ import annotations

import datetime as dt

import pytest
from google.cloud import datastore

from sweeper.encodings import Encoding
from tests.integration.helpers import ago, log_events, run_cli, survivors
from tests.support.emulator import Emulator
from tests.support.seed import MISSING


def seed_last_seen(
    client: datastore.Client, kind: str, groups: dict[str, list[object]], prop: str
) -> None:
    """Sessions with an indexed ``prop`` (last seen) and no expiry property at all."""
    entities = []
    for group, values in groups.items():
        for i, value in enumerate(values):
            entity = datastore.Entity(
                client.key(kind, f"{group}-{i}"), exclude_from_indexes=("data",)
            )
            entity["data"] = "x" * 64
            if value is not MISSING:
                entity[prop] = value
            entities.append(entity)
    client.put_multi(entities)


@pytest.mark.parametrize(
    "encoding", [Encoding.TIMESTAMP, Encoding.ISO_8601, Encoding.DOUBLE_SECONDS], ids=str
)
def test_sessions_idle_for_longer_than_the_timeout_are_deleted(
    emulator: Emulator, client: datastore.Client, kind: str, encoding: Encoding
) -> None:
    groups: dict[str, list[object]] = {
        "idle-20d": [encoding.store(ago(days=20))] * 10,
        "idle-15d": [encoding.store(ago(days=15))] * 5,
        "idle-13d": [encoding.store(ago(days=13, hours=23))] * 5,
        "active": [encoding.store(ago(minutes=5))] * 30,
        "never-seen": [None] * 3,
        "no-property": [MISSING] * 3,
    }
    seed_last_seen(client, kind, groups, "updated_at")

    run = run_cli(
        emulator,
        "--kind",
        kind,
        "--property",
        "updated_at",
        "--grace",
        "14d",
        "--log-format",
        "json",
        SWEEPER_MAX_FRACTION="0.5",  # the default guard, as in production
    )

    assert run.returncode == 0, run.stderr
    assert survivors(client, kind, groups) == {"idle-13d", "active", "never-seen", "no-property"}
    finished = log_events(run.stderr)
    (summary,) = [e for e in finished if e["event"] == "sweep_finished"]
    assert (summary["format"], summary["deleted"]) == (encoding.value, 15)
    cutoff = dt.datetime.fromisoformat(summary["cutoff"])
    assert abs(cutoff - ago(days=14)) < dt.timedelta(minutes=1)


def test_an_idle_timeout_on_an_unindexed_last_seen_time_is_refused(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """The runner keeps ``updated_at`` out of its indexes: no range query can see it, and the
    run says so rather than report nothing to do."""
    entities = []
    for i in range(5):
        entity = datastore.Entity(client.key(kind, f"s-{i}"), exclude_from_indexes=("updated_at",))
        entity["updated_at"] = ago(days=30)
        entities.append(entity)
    client.put_multi(entities)

    run = run_cli(emulator, "--kind", kind, "--property", "updated_at", "--grace", "14d")

    assert run.returncode == 1
    assert "looks unindexed" in run.stderr
    assert "--scan" in run.stderr
    assert len(list(client.get_multi([e.key for e in entities]))) == 5
