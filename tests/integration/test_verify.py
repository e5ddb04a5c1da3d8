"""``--verify``: re-check in a transaction, delete only what is still expired."""

from __future__ import annotations

from typing import Any

import pytest
from google.cloud import datastore
from structlog.testing import capture_logs

from sweeper.encodings import Encoding
from tests.integration.helpers import (
    ago,
    ahead,
    emulator_env,
    group_names,
    hook_api,
    make_client,
    remaining,
    seed,
    stored,
    survivors,
    sweep,
    transactional,
)
from tests.support.emulator import Emulator
from tests.support.seed import Session, encode, put_sessions

MS = Encoding.EPOCH_MILLIS


def test_verify_deletes_exactly_the_expired_sessions(client: datastore.Client, kind: str) -> None:
    groups: dict[str, list[object]] = {
        "expired": stored(ago(hours=2), MS, 700),
        "live": stored(ahead(hours=2), MS, 20),
        "null": [None] * 5,
    }
    seed(client, kind, groups)

    result = sweep(client, kind, verify=True)

    assert (result.matched, result.deleted, result.skipped, result.failed) == (700, 700, 0, 0)
    assert result.summary()["verify"] is True
    assert survivors(client, kind, groups) == {"live", "null"}


@pytest.mark.parametrize("prop", ["session.expires_at", "exp`at", "ex\\p"])
def test_the_check_reads_an_expiry_whose_name_is_no_identifier(
    client: datastore.Client, kind: str, prop: str
) -> None:
    # The check asks the database for the one property it compares (a property mask). In a
    # mask a dot names a field inside an entity value: masked as it is spelled, every session
    # would read as carrying no expiry (all kept, all reported skipped).
    sessions = [Session(f"expired-{i}", encode(ago(hours=2), MS)) for i in range(30)]
    sessions += [Session(f"live-{i}", encode(ahead(hours=2), MS)) for i in range(5)]
    put_sessions(client, kind, sessions, prop=prop)

    result = sweep(client, kind, prop=prop)

    assert (result.deleted, result.skipped) == (30, 0)
    assert remaining(client, kind, [s.name for s in sessions]) == {f"live-{i}" for i in range(5)}


class RefreshingClient(datastore.Client):
    """A real client that lets a "web app" refresh some sessions just before sweeper's first
    delete or verify transaction: exactly the write that lands between query and delete."""

    def __init__(self, *args: Any, refresh: list[str], kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.refresh, self.kind = refresh, kind
        hook_api(self, begin_transaction=self._refresh_once, commit=self._before_commit)

    def _before_commit(self, request: Any) -> None:
        if not transactional(request):  # a blind delete
            self._refresh_once(request)

    def _refresh_once(self, _request: Any) -> None:
        if not self.refresh:
            return
        keys = [self.key(self.kind, name) for name in self.refresh]  # type: ignore[no-untyped-call]
        self.refresh = []
        entities = self.get_multi(keys)  # type: ignore[no-untyped-call]
        for entity in entities:
            entity["expires_at"] = encode(ahead(hours=1), MS)
        self.put_multi(entities)  # type: ignore[no-untyped-call]


REFRESHED = ["expired-3", "expired-41"]


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "blind"])
def test_a_session_refreshed_after_the_query_survives_only_with_verify(
    emulator: Emulator, client: datastore.Client, kind: str, verify: bool
) -> None:
    groups = {"expired": stored(ago(hours=1), MS, 60)}
    seed(client, kind, groups)
    with emulator_env(emulator.env):
        racing = RefreshingClient(project=emulator.project, refresh=list(REFRESHED), kind=kind)

    # One worker: the injected refresh must land before every delete, not race another worker.
    result = sweep(racing, kind, MS, verify=verify, batch_size=20, workers=1)

    left = remaining(client, kind, group_names(groups, "expired"))
    if verify:
        assert left == set(REFRESHED)
        assert result.deleted == 58
        # The lookup in the deleting transaction finds them live and skips them.
        assert (result.matched, result.skipped) == (60, 2)
    else:  # the blind delete loses them: why --verify exists
        assert left == set()
        assert result.deleted == 60


def test_verify_sizes_transactions_for_the_database(emulator: Emulator, kind: str) -> None:
    client = make_client(emulator)
    groups = {"expired": stored(ago(hours=1), MS, 120)}
    seed(client, kind, groups)

    with capture_logs() as logs:
        result = sweep(client, kind, MS, verify=True)

    assert (result.deleted, result.failed, result.exit_code) == (120, 0, 0)
    assert survivors(client, kind, groups) == set()
    # The legacy emulator refuses more than 25 entity groups per transaction, Firestore does
    # not: told apart by the clock the database reports, so no commit is refused to learn it.
    assert [e for e in logs if e["event"] == "transaction_size_reduced"] == []
    if emulator.flavour == "datastore":
        assert result.commits >= 120 // 25
