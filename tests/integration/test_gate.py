"""The one gate before every delete, on both emulators: what it must never let through.

Each test is one way a naive sweeper loses live data or stops for good: a key written again
while the run holds it, a live session under an expired one, a scan of the wrong property, caps
that count sessions and not what goes with them, a commit refused as too big.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper import rpc
from sweeper.encodings import Encoding
from tests.integration.helpers import (
    ago,
    ahead,
    client_via,
    run_cli,
    sweep,
)
from tests.support.emulator import Emulator
from tests.support.faults import FaultInjector
from tests.support.seed import encode

S = Encoding.EPOCH_SECONDS


# Passed once, failed once in this session's last runs on the Firestore emulator: see below.
def put(
    client: datastore.Client, keys: list[datastore.Key], expiry: object, **extra: object
) -> None:
    """Whole entities, as the runner writes them: every save rewrites the entity."""
    entities = []
    for key in keys:
        entity = datastore.Entity(key, exclude_from_indexes=tuple(extra))
        entity["expires_at"] = expiry
        entity.update(extra)
        entities.append(entity)
    for start in range(0, len(entities), 500):
        client.put_multi(entities[start : start + 500])


def existing(client: datastore.Client, keys: list[datastore.Key]) -> dict[str, object]:
    """name -> expiry of those of ``keys`` that are stored."""
    found: dict[str, object] = {}
    for start in range(0, len(keys), 500):
        for entity in client.get_multi(keys[start : start + 500]):
            found[str(entity.key.flat_path)] = entity.get("expires_at")
    return found


# --- 1. a key used again while the sweep holds it -------------------------------------------


def test_a_key_written_again_during_a_throttled_run_is_never_lost(
    client: datastore.Client, kind: str
) -> None:
    """The runner keys questionnaire-state by user: a user launching again writes a live
    entity under the key of an expired one. 300 such keys are re-saved live by a concurrent
    writer while a sweep held back by --max-rate works through 2,000 expired ones."""
    keys = [client.key(kind, f"user-{i:05d}") for i in range(2000)]
    put(client, keys, encode(ago(hours=2), S))
    reused = keys[200::6][:300]  # spread over the range, most of them due after 1 s
    live = encode(ahead(hours=1), S)
    outcome: dict[str, object] = {}

    def run() -> None:
        outcome["result"] = sweep(client, kind, S, max_rate=600.0, workers=2)

    sweeper = threading.Thread(target=run)
    sweeper.start()
    time.sleep(1.0)
    put(client, reused, live)  # the writer: a real client, on its own connection
    sweeper.join(timeout=120)

    result = outcome["result"]
    assert result.exit_code == 0, result.error  # type: ignore[attr-defined]
    left = existing(client, keys)
    assert {str(k.flat_path) for k in reused} <= set(left), "a re-saved live entity was deleted"
    assert all(left[str(k.flat_path)] == live for k in reused)
    assert set(left) == {str(k.flat_path) for k in reused}  # everything else went


# --- 2. sessions under sessions (--with-descendants) ----------------------------------------


def test_a_live_session_under_an_expired_one_is_kept_with_everything_under_it(
    client: datastore.Client, kind: str
) -> None:
    """0, 1 and 2 levels of sessions under sessions, expired and live, with events below."""
    old, new = encode(ago(hours=2), S), encode(ahead(hours=2), S)
    entities: dict[tuple[object, ...], object | None] = {
        (kind, "p"): old,  # expired, with a live session under it
        (kind, "p", kind, "c"): new,
        (kind, "p", kind, "c", "event", 1): None,
        (kind, "p", kind, "c", "event", 2): None,
        (kind, "p", "event", 1): None,  # the expired session's own event
        (kind, "q"): old,  # expired, with an expired session under it
        (kind, "q", kind, "q2"): old,
        (kind, "q", kind, "q2", "event", 1): None,
        (kind, "r"): old,  # expired > expired > live > events
        (kind, "r", kind, "r2"): old,
        (kind, "r", kind, "r2", kind, "r3"): new,
        (kind, "r", kind, "r2", kind, "r3", "event", 1): None,
        (kind, "n"): old,  # expired, with a child of its kind whose expiry is null
        (kind, "n", kind, "n2"): "null",
        (kind, "live"): new,
    }
    for path, expiry in entities.items():
        entity = datastore.Entity(client.key(*path))
        if expiry == "null":
            entity["expires_at"] = None
        elif expiry is not None:
            entity["expires_at"] = expiry
        client.put(entity)

    result = sweep(client, kind, S, with_descendants=True)
    again = sweep(client, kind, S, with_descendants=True)

    assert result.exit_code == 0, result.error
    assert again.exit_code == 0, again.error
    keys = [client.key(*path) for path in entities]
    left = {tuple(k.flat_path) for k in keys if k.flat_path and _exists(client, k)}
    assert left == {
        (kind, "p", kind, "c"),
        (kind, "p", kind, "c", "event", 1),
        (kind, "p", kind, "c", "event", 2),
        (kind, "r", kind, "r2", kind, "r3"),
        (kind, "r", kind, "r2", kind, "r3", "event", 1),
        (kind, "n", kind, "n2"),
        (kind, "live"),
    }
    # Sessions deleted: p, q, q2, r, r2, n; the rest went with them.
    assert result.deleted + result.descendants_deleted == len(entities) - len(left)


def _exists(client: datastore.Client, key: datastore.Key) -> bool:
    return client.get(key) is not None


# --- 3. a scan of the wrong property ---------------------------------------------------------


def test_a_scan_of_the_wrong_property_is_refused_by_the_fraction_guard(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """Used JWT ids: an unindexed expires_at (all live) and an unindexed iat (all past)."""
    keys = [client.key(kind, f"jti-{i}") for i in range(600)]
    put(client, keys, encode(ahead(hours=1), S), iat=encode(ago(hours=1), S))

    done = run_cli(
        emulator,
        *("--kind", kind, "--scan", "--property", "iat", "--format", "epoch-seconds"),
        *("--grace", "0s", "--yes"),
        SWEEPER_MAX_FRACTION="0.5",
    )

    assert done.returncode == 1, done.stderr
    assert "max-fraction" in done.stderr
    assert len(existing(client, keys)) == 600


# --- 4. caps in entities ---------------------------------------------------------------------


def _sessions_with_children(
    client: datastore.Client, kind: str, sessions: int, children: int, expiry: object
) -> list[datastore.Key]:
    keys = []
    for i in range(sessions):
        session = client.key(kind, f"s-{i:04d}")
        keys.append(session)
        keys += [client.key(kind, f"s-{i:04d}", "event", j + 1) for j in range(children)]
    batch = []
    for key in keys:
        entity = datastore.Entity(key)
        if key.kind == kind:
            entity["expires_at"] = expiry
        batch.append(entity)
    for start in range(0, len(batch), 500):
        client.put_multi(batch[start : start + 500])
    return keys


def test_max_deletes_counts_every_entity_children_included(
    client: datastore.Client, kind: str
) -> None:
    keys = _sessions_with_children(client, kind, 60, 10, encode(ago(hours=2), S))

    result = sweep(client, kind, S, with_descendants=True, max_deletes=200)

    assert result.stopped_reason == "max_deletes"
    gone = len(keys) - len(existing_any(client, keys))
    assert gone <= 200
    assert result.deleted + result.descendants_deleted == gone
    assert gone >= 200 - 11  # whole groups: at most one group short of the cap


def test_the_fraction_guard_counts_children_too(client: datastore.Client, kind: str) -> None:
    """30 of 100 sessions are due (30%), but with their 10 events each, 330 of 400 entities."""
    due = _sessions_with_children(client, kind, 30, 10, encode(ago(hours=2), S))
    live = [client.key(kind, f"live-{i}") for i in range(70)]
    put(client, live, encode(ahead(hours=2), S))

    result = sweep(client, kind, S, with_descendants=True, max_fraction=0.5)

    assert result.exit_code == 1
    assert "max-fraction" in (result.error or "")
    assert len(existing_any(client, due + live)) == 400


def existing_any(client: datastore.Client, keys: list[datastore.Key]) -> list[datastore.Key]:
    found = []
    for start in range(0, len(keys), 500):
        found += [e.key for e in client.get_multi(keys[start : start + 500])]
    return found


# --- 6. commits the database refuses as too big ----------------------------------------------


@pytest.fixture
def injector(emulator: Emulator) -> Iterator[FaultInjector]:
    with FaultInjector(emulator.host, seed=15) as running:
        yield running


def test_a_commit_refused_as_too_big_is_split_and_the_run_goes_on(
    emulator: Emulator, injector: FaultInjector, client: datastore.Client, kind: str
) -> None:
    keys = [client.key(kind, f"s-{i}") for i in range(700)]
    put(client, keys, encode(ago(hours=2), S))
    injector.refuse_commits_over = 20  # below the legacy emulator's 25 groups a transaction too

    result = sweep(client_via(injector, emulator), kind, S)

    assert result.exit_code == 0, result.error
    assert existing(client, keys) == {}
    assert result.deleted == 700
    assert injector.counts["Commit:refused_too_big"] >= 1


def test_a_key_refused_even_alone_is_named_and_everything_else_goes(
    emulator: Emulator, injector: FaultInjector, client: datastore.Client, kind: str
) -> None:
    keys = [client.key(kind, f"s-{i}") for i in range(3)]
    put(client, keys, encode(ago(hours=2), S))
    injector.refuse_commits_over = 0  # every commit that deletes anything

    result = sweep(client_via(injector, emulator), kind, S)

    assert result.exit_code == 1
    assert result.failed == 3
    assert "too big" in (result.error or "")
    assert "'s-0'" in (result.error or "")
    assert len(existing(client, keys)) == 3


# --- the database's own errors, all at once ----------------------------------------------------


def test_a_default_sweep_rides_out_the_database_failing_in_every_way_it_does(
    emulator: Emulator,
    injector: FaultInjector,
    client: datastore.Client,
    kind: str,
) -> None:
    """10% of calls failing, 20% of commits losing their reply, a 10 s quota outage, commits
    over 200 mutations refused: every expired entity goes, nothing else, and ``deleted``
    never counts more than really went. (The backlog outlasts the outage's start; the run
    then recovers at the pace of its throttle and limiter, which is what takes the time.)"""
    expired = [client.key(kind, f"old-{i:05d}") for i in range(3000)]
    live = [client.key(kind, f"new-{i:04d}") for i in range(300)]
    put(client, expired, encode(ago(hours=2), S))
    put(client, live, encode(ahead(hours=2), S))
    injector.fail_share = 0.10
    injector.lose_commit_replies = 0.20  # of some 30 commits: at least one, but for 0.1%
    injector.refuse_commits_over = 200
    outage = threading.Timer(2.0, injector.exhaust_for, args=(10.0,))
    outage.start()
    try:
        result = sweep(client_via(injector, emulator), kind, S)
    finally:
        outage.cancel()

    assert result.exit_code == 0, result.error
    assert existing(client, expired) == {}
    assert len(existing(client, live)) == 300
    # A commit whose answer was lost is counted once its repeat is refused and a lookup shows
    # its keys gone at one version: exact where the database reports the deleting write's
    # version (Firestore), else those keys are unattributed and never counted as deleted.
    assert result.deleted + result.unattributed == 3000
    if emulator.flavour == "firestore":
        assert result.unattributed == 0
    assert injector.counts["exhausted"] > 0
    assert injector.counts["Commit:reply_lost"] > 0


def test_a_commit_at_the_versions_read_is_refused_whole_when_one_entity_changed(
    client: datastore.Client, kind: str
) -> None:
    """What every delete relies on (``rpc.commit``): a single-use transaction's commit of
    deletes at the versions read fails with FAILED_PRECONDITION if one entity was saved
    again since, and deletes none of them (a plain commit deletes those before the changed
    one on both emulators); sent at the versions read again, it goes."""
    keys = [client.key(kind, f"user-{i}") for i in range(5)]
    put(client, keys, encode(ago(hours=1), S))
    seen = rpc.run_query(client, client.query(kind=kind), "expires_at", 10, cursor=None, timeout=10)
    put(client, keys[3:4], encode(ahead(hours=1), S))  # the user launches again
    with pytest.raises(gexc.FailedPrecondition):
        rpc.commit(client, None, [(s.key, s.version) for s in seen.seen], 10)
    assert len(existing(client, keys)) == 5
    looked = rpc.lookup(client, None, keys, "expires_at", 10)
    due = [looked.found[k.flat_path] for k in keys if k != keys[3]]
    rpc.commit(client, None, [(s.key, s.version) for s in due], 10)
    assert len(existing(client, keys)) == 1
    assert existing(client, keys[3:4])
