"""``--with-descendants``: an expired session goes with the entities under it, nothing else does.

Some stores keep a session's data as child entities in its entity group (events, messages,
state pages under the session key). Deleting the session alone leaves them behind for ever.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.inspect.report import inspect_target
from sweeper.inspect.table import report_dict
from tests.integration.helpers import (
    ago,
    ahead,
    deleted_keys,
    emulator_env,
    hook_api,
    log_events,
    run_cli,
    seed,
    settings,
    stored,
    survivors,
    sweep,
    transactional,
)
from tests.support.emulator import Emulator
from tests.support.seed import encode

S = Encoding.EPOCH_SECONDS
CHILD_KINDS = ("event", "page")


def add_children(
    client: datastore.Client, kind: str, session: str, count: int, grandchildren: int = 0
) -> list[datastore.Key]:
    """``count`` children of two kinds under ``kind/session``, the first with grandchildren;
    the children carry an ``expires_at`` too (live), which must not matter."""
    parent = client.key(kind, session)
    entities = []
    for i in range(count):
        child = datastore.Entity(client.key(CHILD_KINDS[i % 2], f"c{i}", parent=parent))
        child.update({"n": i, "expires_at": encode(ahead(days=1), S)})
        entities.append(child)
        if i == 0:
            for j in range(grandchildren):
                entities.append(datastore.Entity(client.key("note", f"g{j}", parent=child.key)))
    for start in range(0, len(entities), 500):
        client.put_multi(entities[start : start + 500])
    return [e.key for e in entities]


def existing(client: datastore.Client, keys: Sequence[datastore.Key]) -> int:
    found = 0
    for start in range(0, len(keys), 1000):
        found += len(client.get_multi(list(keys[start : start + 1000])))
    return found


@pytest.mark.parametrize("verify", [False, True], ids=["blind", "verify"])
def test_expired_sessions_go_with_all_their_descendants(
    client: datastore.Client, kind: str, verify: bool
) -> None:
    groups: dict[str, list[object]] = {
        "expired": stored(ago(hours=2), S, 30),
        "live": stored(ahead(hours=2), S, 3),
    }
    seed(client, kind, groups)
    doomed = (
        add_children(client, kind, "expired-1", 1)
        + add_children(client, kind, "expired-2", 600, grandchildren=3)
        + add_children(client, kind, "expired-3", 40)
    )
    kept = add_children(client, kind, "live-0", 5, grandchildren=2) + add_children(
        client, kind, "live-1", 600
    )

    result = sweep(client, kind, with_descendants=True, verify=verify)

    assert survivors(client, kind, groups) == {"live"}
    assert existing(client, doomed) == 0, "descendants of a deleted session were left behind"
    assert existing(client, kept) == len(kept), "a live session's descendants were touched"
    assert (result.deleted, result.descendants_deleted) == (30, len(doomed))
    assert result.descendants_matched == len(doomed)
    fields = result.summary()
    assert (fields["with_descendants"], fields["descendants_deleted"]) == (True, len(doomed))


def test_without_the_option_descendants_stay(client: datastore.Client, kind: str) -> None:
    groups = {"expired": stored(ago(hours=2), S, 3)}
    seed(client, kind, groups)
    children = add_children(client, kind, "expired-0", 4)

    result = sweep(client, kind)

    assert survivors(client, kind, groups) == set()
    assert existing(client, children) == 4
    assert (result.descendants_matched, result.descendants_deleted) == (0, 0)


def test_a_dry_run_counts_descendants_and_deletes_nothing(
    client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(hours=2), S, 5)}
    seed(client, kind, groups)
    children = add_children(client, kind, "expired-0", 7, grandchildren=2)

    result = sweep(client, kind, with_descendants=True, dry_run=True)

    assert survivors(client, kind, groups) == {"expired"}
    assert existing(client, children) == len(children)
    assert (result.matched, result.descendants_matched, result.deleted) == (5, 9, 0)
    assert result.descendants_deleted == 0


def test_small_groups_share_a_commit_and_a_large_one_goes_session_last(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """Whole groups in one commit where they fit; the 600-child group over two, its session in
    the second. Counted from the commits the client sends."""
    groups = {"expired": stored(ago(hours=2), S, 4)}
    seed(client, kind, groups)
    for name, count in (("expired-0", 2), ("expired-1", 600), ("expired-2", 3)):
        add_children(client, kind, name, count)
    with emulator_env(emulator.env):
        recorder = CommitRecorder(client)

    result = sweep(recorder, kind, with_descendants=True, verify=False, workers=1)

    assert result.descendants_deleted == 605
    commits = recorder.commits
    for session in ("expired-0", "expired-2", "expired-3"):
        (holding,) = [c for c in commits if (kind, session) in c]
        under = [k for k in holding if k[:2] == (kind, session) and len(k) > 2]
        assert len(under) == {"expired-0": 2, "expired-2": 3, "expired-3": 0}[session]
    big = [c for c in commits if any(k[:2] == (kind, "expired-1") for k in c)]
    assert len(big) == 2
    assert (kind, "expired-1") in big[-1]
    assert (kind, "expired-1") not in big[0]
    assert all(len(c) <= 500 for c in commits)


class CommitRecorder(datastore.Client):
    """A real client (for the test's emulator) that records each blind commit's key paths."""

    def __init__(self, client: datastore.Client) -> None:
        super().__init__(project=client.project, namespace=client.namespace)  # type: ignore[no-untyped-call]
        self.commits: list[list[tuple[Any, ...]]] = []
        hook_api(self, commit=self._record)

    def _record(self, request: Any) -> None:
        if not transactional(request):
            self.commits.append([tuple(k.flat_path) for k in deleted_keys(request)])


class RefreshingClient(datastore.Client):
    """Refreshes one session (as the runner does) just before sweeper's first transaction."""

    def __init__(self, client: datastore.Client, kind: str, session: str) -> None:
        super().__init__(project=client.project, namespace=client.namespace)  # type: ignore[no-untyped-call]
        self._key = self.key(kind, session)  # type: ignore[no-untyped-call]
        self._pending = True
        hook_api(self, begin_transaction=self._refresh_once)

    def _refresh_once(self, _request: Any) -> None:
        if self._pending:
            self._pending = False
            entity = self.get(self._key)  # type: ignore[no-untyped-call]
            entity["expires_at"] = encode(ahead(hours=1), S)
            self.put(entity)  # type: ignore[no-untyped-call]


def test_with_verify_a_refreshed_session_keeps_its_descendants(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(hours=2), S, 3)}
    seed(client, kind, groups)
    refreshed = add_children(client, kind, "expired-0", 650)
    others = add_children(client, kind, "expired-1", 5)
    with emulator_env(emulator.env):
        racing = RefreshingClient(client, kind, "expired-0")

    result = sweep(racing, kind, with_descendants=True, verify=True, workers=1)

    assert existing(client, [client.key(kind, "expired-0")]) == 1
    assert existing(client, refreshed) == len(refreshed), (
        "a descendant of a session that was not deleted was deleted"
    )
    assert existing(client, others) == 0
    assert (result.deleted, result.descendants_deleted) == (2, 5)
    # The lookup in the deleting transaction finds it live.
    assert result.skipped == 1


def test_the_cli_and_a_config_file_turn_it_on(
    emulator: Emulator, client: datastore.Client, kind: str, tmp_path: Path
) -> None:
    groups = {"expired": stored(ago(hours=2), S, 2), "live": stored(ahead(hours=2), S, 2)}
    seed(client, kind, groups)
    first = add_children(client, kind, "expired-0", 3)
    kept = add_children(client, kind, "live-0", 3)

    run = run_cli(emulator, "--kind", kind, "--with-descendants", "--log-format", "json")

    assert run.returncode == 0, run.stderr
    assert existing(client, first) == 0
    assert existing(client, kept) == 3
    events = log_events(run.stderr)
    (summary,) = [e for e in events if e["event"] == "sweep_finished"]
    assert summary["descendants_deleted"] == 3

    seed(client, kind, groups)
    second = add_children(client, kind, "expired-1", 4)
    config = tmp_path / "sweeper.toml"
    config.write_text(f'[[target]]\nkind = "{kind}"\nwith_descendants = true\nmax_fraction = 1.0\n')
    run = run_cli(emulator, "--config", str(config))
    assert run.returncode == 0, run.stderr
    assert existing(client, second) == 0
    assert existing(client, kept) == 3


def test_inspect_samples_the_descendants_of_expired_sessions(
    client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(hours=2), S, 4), "live": stored(ahead(hours=2), S, 2)}
    seed(client, kind, groups)
    add_children(client, kind, "expired-0", 6, grandchildren=2)
    add_children(client, kind, "live-0", 50)  # not expired: not sampled

    report = inspect_target(settings(kind, with_descendants=True), client, dt.datetime.now(dt.UTC))

    assert report.descendants is not None
    assert (report.descendants.sampled, report.descendants.total) == (4, 8)
    assert report.descendants.most == 8
    assert report.forecast is not None
    assert report.forecast.operations.deleted == 4 + 8
    assert report_dict(report)["descendants_mean"] == 2.0
