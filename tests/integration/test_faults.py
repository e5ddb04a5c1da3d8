"""Retries, eventual consistency, and a backlog of tens of thousands, on the real emulators."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.engine import Runtime
from sweeper.testing.emulator import Emulator
from tests.integration.helpers import (
    ago,
    ahead,
    emulator_env,
    group_names,
    make_client,
    remaining,
    seed,
    stored,
    sweep,
)

S = Encoding.EPOCH_SECONDS


class FlakyClient(datastore.Client):
    """A real client whose first calls fail the way a dropped connection does.

    The emulator never fails on its own; this reaches the retry path while every successful call
    still goes to the real emulator.
    """

    def __init__(self, *args: Any, fail_deletes: int, fail_lookups: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.fail_deletes = fail_deletes
        self.fail_lookups = fail_lookups

    def delete_multi(self, keys: Any, retry: Any = None, timeout: Any = None) -> Any:
        if self.fail_deletes:
            self.fail_deletes -= 1
            raise gexc.ServiceUnavailable("injected: connection reset by peer")
        return super().delete_multi(keys, retry=retry, timeout=timeout)  # type: ignore[no-untyped-call]

    def get_multi(self, keys: Any, *args: Any, **kwargs: Any) -> Any:
        if self.fail_lookups:
            self.fail_lookups -= 1
            raise gexc.DeadlineExceeded("injected: deadline exceeded")
        return super().get_multi(keys, *args, **kwargs)  # type: ignore[no-untyped-call]


def test_transient_failures_are_retried_and_counted(emulator: Emulator, kind: str) -> None:
    client = make_client(emulator)
    groups = {"expired": stored(ago(hours=3), S, 250), "live": stored(ahead(hours=3), S, 10)}
    seed(client, kind, groups)
    with emulator_env(emulator.env):
        flaky = FlakyClient(project=emulator.project, fail_deletes=2, fail_lookups=1)
    waits: list[float] = []

    result = sweep(flaky, kind, runtime=Runtime(sleep=waits.append), batch_size=100)

    assert (result.deleted, result.failed, result.retries) == (250, 0, 3)
    assert len(waits) == 3
    assert remaining(client, kind, group_names(groups, *groups)) == set(group_names(groups, "live"))


def test_a_batch_that_keeps_failing_ends_the_run_non_zero(emulator: Emulator, kind: str) -> None:
    client = make_client(emulator)
    groups = {"expired": stored(ago(hours=3), S, 20)}
    seed(client, kind, groups)
    with emulator_env(emulator.env):
        flaky = FlakyClient(project=emulator.project, fail_deletes=100, fail_lookups=0)

    result = sweep(flaky, kind, S, runtime=Runtime(sleep=lambda _s: None))

    assert (result.exit_code, result.stopped_reason, result.failed, result.deleted) == (
        1,
        "error",
        20,
        0,
    )
    assert result.retries == 5  # six attempts in all
    assert len(remaining(client, kind, group_names(groups, "expired"))) == 20


def test_a_backlog_of_tens_of_thousands_is_emptied_in_one_run(
    client: datastore.Client, kind: str
) -> None:
    groups: dict[str, list[object]] = {
        "expired": stored(ago(hours=5), S, 20_000),
        "live": stored(ahead(hours=1), S, 1_000),
        "in-flight": [None] * 500,
    }
    seed(client, kind, groups)

    result = sweep(client, kind)

    assert (result.matched, result.deleted, result.batches, result.failed) == (
        20_000,
        20_000,
        40,
        0,
    )
    assert remaining(client, kind, group_names(groups, *groups)) == set(
        group_names(groups, "live", "in-flight")
    )


@pytest.fixture(scope="module")
def eventual_emulator() -> Iterator[Emulator]:
    """The legacy emulator at its default 0.9 consistency: queries may return stale results."""
    emu = Emulator("datastore", consistency=0.9).start()
    try:
        yield emu
    finally:
        emu.stop()


def test_eventual_consistency_never_costs_a_live_session(
    eventual_emulator: Emulator, kind: str
) -> None:
    client = make_client(eventual_emulator)
    groups = {"expired": stored(ago(hours=2), S, 1500), "live": stored(ahead(hours=2), S, 300)}
    seed(client, kind, groups)
    live = set(group_names(groups, "live"))
    names = group_names(groups, *groups)

    # Back to back, with no lookup in between (a lookup would settle the entity groups):
    # the first run may miss fresh writes, the next may see keys already deleted.
    runs = [sweep(client, kind, S, batch_size=100) for _ in range(3)]
    while len(runs) < 10 and remaining(client, kind, names) != live:
        runs.append(sweep(client, kind, S, batch_size=100))

    assert remaining(client, kind, names) == live
    assert all(run.exit_code == 0 and run.failed == 0 for run in runs)
    assert all(run.deleted == run.matched for run in runs)
    assert sum(run.deleted for run in runs) >= 1500
