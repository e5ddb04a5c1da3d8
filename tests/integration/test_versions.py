"""Sessions under sessions, counts under faults, and the caps: what a run leaves and reports.

Each test seeds a small entity-group shape on both emulators, runs a sweep (the real CLI, or
``sweep`` where it needs the fault injector in process), and checks what is left in the
database and what ``sweep_finished`` (or the ``SweepResult``) says went:

* a live session nested under an expired one keeps itself and everything under it, also when
  the expired session's group is too big for one commit (``--batch-size 10``, or 700 events
  at the default 500), whichever way the keys were found (range, ``--scan``, shards);
* ``deleted + descendants_deleted`` never counts an entity twice, or one that did not go:
  with commits failing before they reach the database, and with a session nested under
  another one that is swept in its own right;
* ``--max-deletes`` holds when commits are applied but their replies are lost;
* a dry run's counts are what a real run would delete (never negative), and the default
  ``--max-fraction`` lets through a run that deletes a small share of a kind with children.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
import pytest
from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.settings import DEFAULT_MAX_FRACTION
from tests.integration.helpers import (
    ago,
    ahead,
    client_via,
    deleted_keys,
    emulator_env,
    hook_api,
    log_events,
    run_cli,
    sweep,
)
from tests.support.emulator import Emulator
from tests.support.faults import FaultInjector
from tests.support.seed import encode

S = Encoding.EPOCH_SECONDS
EVENT = "event"  # the kind of the entities under a session; they carry no expiry

Path = tuple[Any, ...]
# Named groups of entities: key path -> expiry (None: no expires_at, as an event).
Groups = dict[str, dict[Path, object]]


def expired(hours: float = 0) -> object:
    return encode(ago(days=2, hours=hours), S)


def live(hours: float = 0) -> object:
    return encode(ahead(days=2, hours=hours), S)


def events(parent: Path, count: int) -> dict[Path, object]:
    return {(*parent, EVENT, i): None for i in range(1, count + 1)}


def write(client: datastore.Client, groups: Groups) -> None:
    """Every entity of ``groups``, with ``expires_at`` where it has an expiry."""
    batch = []
    for entities in groups.values():
        for path, expiry in entities.items():
            entity = datastore.Entity(client.key(*path))
            if expiry is not None:
                entity["expires_at"] = expiry
            batch.append(entity)
    for start in range(0, len(batch), 500):
        client.put_multi(batch[start : start + 500])


def stored(client: datastore.Client, paths: Sequence[Path]) -> set[Path]:
    """Which of ``paths`` are stored, by key lookup (strongly consistent)."""
    found: set[Path] = set()
    for start in range(0, len(paths), 500):
        keys = [client.key(*path) for path in paths[start : start + 500]]
        found.update(tuple(entity.key.flat_path) for entity in client.get_multi(keys))
    return found


def left(client: datastore.Client, groups: Groups) -> dict[str, int]:
    """How many entities of each group are still stored."""
    return {name: len(stored(client, list(entities))) for name, entities in groups.items()}


def size(groups: Groups) -> dict[str, int]:
    return {name: len(entities) for name, entities in groups.items()}


def finished(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The ``sweep_finished`` summary of a CLI run (``--log-format json``) that exited 0."""
    assert run.returncode == 0, run.stderr[-3000:]
    lines: list[dict[str, Any]] = log_events(run.stderr)
    (summary,) = [line for line in lines if line["event"] == "sweep_finished"]
    return summary


def run_at_default_guard(emulator: Emulator, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with no SWEEPER_* variable at all: --max-fraction at its default
    (``run_cli`` turns the guard off)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPER_")}
    return subprocess.run(
        [sys.executable, "-m", "sweeper", "sweep", *args],
        env={**env, **emulator.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- 1. a live session under an expired one, its group over several commits ----------------


def live_under_expired(kind: str, child_events: int) -> Groups:
    """Expired S; under it live C (same kind) with ``child_events`` events; beside them five
    expired and five live sessions with three events each, an hour apart (shards own hours)."""
    s = (kind, "S")
    c = (*s, kind, "C")
    others_expired = {(kind, f"expired-{i}"): expired(hours=i + 1) for i in range(5)}
    others_live = {(kind, f"live-{i}"): live(hours=i) for i in range(5)}
    return {
        "S": {s: expired()},
        "C": {c: live()},
        "events of C": events(c, child_events),
        "other expired sessions": others_expired,
        "their events": {p: e for o in others_expired for p, e in events(o, 3).items()},
        "live sessions": others_live,
        "events of live sessions": {p: e for o in others_live for p, e in events(o, 3).items()},
    }


BASE = ("--format", "epoch-seconds", "--with-descendants", "--max-fraction", "1")
SMALL = ("--batch-size", "10")


@pytest.mark.parametrize(
    ("child_events", "runs"),
    [
        pytest.param(30, [SMALL], id="range"),
        pytest.param(30, [(*SMALL, "--scan")], id="scan"),
        pytest.param(30, [(*SMALL, "--shard", "0/2"), (*SMALL, "--shard", "1/2")], id="shards"),
        pytest.param(700, [()], id="700-events-default-batch"),
    ],
)
def test_a_live_session_under_an_expired_one_keeps_its_whole_subtree_when_the_group_spans_commits(
    emulator: Emulator,
    client: datastore.Client,
    kind: str,
    child_events: int,
    runs: list[tuple[str, ...]],
) -> None:
    groups = live_under_expired(kind, child_events)
    write(client, groups)

    summaries = [
        finished(run_cli(emulator, "--kind", kind, *BASE, *args, "--log-format", "json"))
        for args in runs
    ]

    got = left(client, groups)
    assert got == {**size(groups), "S": 0, "other expired sessions": 0, "their events": 0}, (
        f"C kept {got['C']} of 1 and {got['events of C']} of {child_events} events; "
        f"S {got['S']} of 1 left, other expired {got['other expired sessions']} of 5 and "
        f"their events {got['their events']} of 15 left, live {got['live sessions']} of 5 "
        f"and their events {got['events of live sessions']} of 15 left"
    )
    reported = sum(s["deleted"] + s["descendants_deleted"] for s in summaries)
    assert reported == 1 + 5 + 15, "deleted + descendants_deleted is what went"
    assert sum(s["failed"] for s in summaries) == 0


# --- 2. counts never overstate -------------------------------------------------------------


def test_counts_never_overstate_what_went_when_commits_fail_before_reaching_the_database(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """40 expired sessions, each with an expired one of its kind nested under it holding 3
    events: 200 entities. The nested ones expired 2 days after their parents, so the range
    finds them in a slice of their own as well, and both are in flight at once. 30% of the
    commits fail UNAVAILABLE without reaching the database. (Seed and commit size chosen so
    that the code this was written against overstates on every run: 20 of 20.)"""
    groups: Groups = {"parents": {}, "nested": {}, "events": {}}
    for i in range(40):
        parent = (kind, f"p-{i:02d}")
        nested = (*parent, kind, f"n-{i:02d}")
        groups["parents"][parent] = encode(ago(days=4, minutes=i), S)
        groups["nested"][nested] = encode(ago(days=2, minutes=i), S)
        groups["events"].update(events(nested, 3))
    write(client, groups)

    with FaultInjector(emulator.host, seed=1) as injector:
        injector.only_methods = {"Commit"}
        injector.fail_codes = (grpc.StatusCode.UNAVAILABLE,)
        injector.fail_share = 0.3
        result = sweep(
            client_via(injector, emulator), kind, S, with_descendants=True, batch_size=10
        )

    assert result.exit_code == 0, result.error
    assert injector.counts["Commit:UNAVAILABLE"] > 0, "no commit failed: nothing tested"
    assert left(client, groups) == {"parents": 0, "nested": 0, "events": 0}
    went = 200
    reported = result.deleted + result.descendants_deleted
    assert reported <= went, (
        f"reported {result.deleted} deleted + {result.descendants_deleted} descendants = "
        f"{reported}, but only {went} entities existed"
    )
    assert reported + result.unconfirmed == went


HOLD_S = 2.0


class HoldingClient(datastore.Client):
    """A real client whose commit that deletes ``held`` together with keys under it waits,
    at most ``HOLD_S``, until another commit has deleted one of those keys: two streams that
    reach one nested session then overlap every time, not on some runs only."""

    def __init__(self, client: datastore.Client, held: Path) -> None:
        super().__init__(project=client.project, namespace=client.namespace)  # type: ignore[no-untyped-call]
        self._watch, self._held = client, held
        hook_api(self, commit=self._hold)

    def _hold(self, request: Any) -> None:
        paths = [tuple(key.flat_path) for key in deleted_keys(request)]
        under = [p for p in paths if p[: len(self._held)] == self._held and p != self._held]
        if self._held not in paths or not under:
            return
        deadline = time.monotonic() + HOLD_S
        while len(stored(self._watch, under)) == len(under) and time.monotonic() < deadline:
            time.sleep(0.02)


def test_a_session_nested_under_another_is_counted_once_with_its_600_events(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """No faults: an expired session, an expired one of its kind under it that the range
    finds too (in another slice), and 600 events under that: 602 entities, 602 reported.
    Whichever stream deletes the nested session waits for the other to have deleted some of
    its events first (``HoldingClient``)."""
    parent = (kind, "p")
    nested = (*parent, kind, "n")
    groups: Groups = {
        "parent": {parent: encode(ago(days=4), S)},
        "nested": {nested: expired()},
        "events": events(nested, 600),
    }
    write(client, groups)
    with emulator_env(emulator.env):
        holding = HoldingClient(client, nested)

    result = sweep(holding, kind, S, with_descendants=True)

    assert result.exit_code == 0, result.error
    assert left(client, groups) == {"parent": 0, "nested": 0, "events": 0}
    reported = result.deleted + result.descendants_deleted
    assert (reported, result.unconfirmed) == (602, 0), (
        f"reported {result.deleted} deleted + {result.descendants_deleted} descendants = "
        f"{reported} for 602 entities"
    )


# --- 3. --max-deletes with lost replies ------------------------------------------------------


def test_max_deletes_is_never_passed_when_commit_replies_are_lost(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """600 expired sessions, --max-deletes 300 in commits of 50 from 8 streams; 30% of the
    commits are applied by the database and then answered DEADLINE_EXCEEDED or UNAVAILABLE.
    (Seed and streams chosen so that the code this was written against passed the cap on
    every run: 10 of 10.)"""
    groups: Groups = {"expired": {(kind, f"s-{i:03d}"): expired(hours=i / 10) for i in range(600)}}
    write(client, groups)

    with FaultInjector(emulator.host, seed=7) as injector:
        injector.only_methods = {"Commit"}
        injector.lose_commit_replies = 0.3
        injector.lost_reply_codes = (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNAVAILABLE,
        )
        run = run_cli(
            emulator,
            *("--kind", kind, "--format", "epoch-seconds", "--max-fraction", "1"),
            *("--max-deletes", "300", "--batch-size", "50", "--workers", "8"),
            *("--log-format", "json"),
            DATASTORE_EMULATOR_HOST=injector.host,
        )
    summary = finished(run)

    assert injector.counts["Commit:reply_lost"] > 0, "no reply was lost: nothing tested"
    went = 600 - left(client, groups)["expired"]
    assert went <= 300, f"--max-deletes 300, but {went} sessions were deleted"
    assert summary["deleted"] <= went, f"reported {summary['deleted']}, but {went} went"


# --- 4. a dry run's counts, and the fraction guard with descendants ------------------------


def test_a_dry_run_counts_what_would_go_never_the_subtree_of_a_live_nested_session(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """Expired S with live C (its kind) under it holding 30 events, and expired E with 4
    events: a dry run matches S and E, and E's 4 events; the real run then deletes those."""
    s = (kind, "S")
    c = (*s, kind, "C")
    e = (kind, "E")
    groups: Groups = {
        "S": {s: expired()},
        "C": {c: live()},
        "events of C": events(c, 30),
        "E": {e: expired(hours=1)},
        "events of E": events(e, 4),
    }
    write(client, groups)

    dry = finished(run_cli(emulator, "--kind", kind, *BASE, "--dry-run", "--log-format", "json"))

    assert left(client, groups) == size(groups), "a dry run deleted something"
    assert dry["matched"] >= 0
    assert dry["descendants_matched"] >= 0
    assert (dry["matched"], dry["descendants_matched"]) == (2, 4), (
        "a dry run counts the sessions and descendants a real run would delete"
    )

    real = finished(run_cli(emulator, "--kind", kind, *BASE, "--log-format", "json"))

    assert left(client, groups) == {**size(groups), "S": 0, "E": 0, "events of E": 0}
    assert (real["deleted"], real["descendants_deleted"]) == (2, 4)


def test_the_default_fraction_guard_lets_a_small_share_with_descendants_through(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """10 expired sessions with 5 events each (60 entities) among 600 live ones with 2 each
    (1,800): 3% of the entities, 1.6% of the sessions, far under the default share."""
    assert DEFAULT_MAX_FRACTION == 0.5
    due = {(kind, f"expired-{i}"): expired(hours=i) for i in range(10)}
    kept = {(kind, f"live-{i:03d}"): live(hours=i / 100) for i in range(600)}
    groups: Groups = {
        "expired sessions": due,
        "their events": {p: x for d in due for p, x in events(d, 5).items()},
        "live sessions": kept,
        "events of live sessions": {p: x for k in kept for p, x in events(k, 2).items()},
    }
    write(client, groups)

    run = run_at_default_guard(
        emulator, "--kind", kind, "--with-descendants", "--log-format", "json"
    )

    assert run.returncode == 0, f"refused at the default --max-fraction: {run.stderr[-2000:]}"
    summary = finished(run)
    assert left(client, groups) == {**size(groups), "expired sessions": 0, "their events": 0}
    assert (summary["deleted"], summary["descendants_deleted"]) == (10, 50)


# --- 1b. the same, when the database refuses commits as too big or C is saved mid-group -------


def test_a_live_nested_session_keeps_its_subtree_when_commits_are_split_as_too_big(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """Commits over 8 mutations refused as "transaction or write too big": the page's commits
    are split until they go, and C (live) keeps all 30 of its events (S's group was decided
    whole before any commit: C's subtree was never in it)."""
    groups = live_under_expired(kind, 30)
    write(client, groups)

    with FaultInjector(emulator.host) as injector:
        injector.refuse_commits_over = 8
        result = sweep(client_via(injector, emulator), kind, S, with_descendants=True)

    assert result.exit_code == 0, result.error
    assert injector.counts["Commit:refused_too_big"] > 0, "no commit was refused: nothing tested"
    got = left(client, groups)
    assert got == {**size(groups), "S": 0, "other expired sessions": 0, "their events": 0}
    assert result.deleted + result.descendants_deleted == 1 + 5 + 15


def test_a_nested_session_saved_live_between_the_commits_of_its_group_keeps_what_is_left(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """Expired S holds expired C with 700 events: one group over two commits, the first of
    which looks up S and C (the sessions above its keys) in its transaction first. C is saved
    live (the runner's whole-entity write) between the two: the second commit, which deletes
    C at the version read, is refused, the group is read again, and C keeps itself and the
    events the first commit had not reached; S goes."""
    s, c = (kind, "S"), (kind, "S", kind, "C")
    groups: Groups = {"S": {s: expired()}, "C": {c: expired(hours=-1)}, "events": events(c, 700)}
    write(client, groups)
    commits: list[int] = []

    def save_c_live_before_the_second(request: Any) -> None:
        commits.append(len(request.mutations))
        if len(commits) == 2:
            write(client, {"C": {c: live()}})

    with emulator_env(emulator.env):
        watched = datastore.Client(project=client.project, namespace=client.namespace)
    hook_api(watched, commit=save_c_live_before_the_second)
    result = sweep(watched, kind, S, with_descendants=True, workers=1)

    assert result.exit_code == 0, result.error
    assert commits[:2] == [500, 202], "the group did not span two commits as planned"
    got = left(client, groups)
    assert got["S"] == 0
    assert got["C"] == 1, "C, saved live mid-group, was deleted"
    assert got["events"] == 700 - 500, "C's events beyond the first commit must stay"
    assert (result.deleted, result.descendants_deleted) == (1, 500)
