"""The gRPC fault injector, on both emulators: each rule fails the calls it should, and only
those, and what it forwards reaches the real emulator.

Every check of what is stored goes straight to the emulator (the ``client`` fixture), never
through the injector, so an injected failure cannot hide or fake a result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc  # type: ignore[import-untyped,unused-ignore]
import pytest
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import datastore

from tests.integration.helpers import client_via, remaining
from tests.support.emulator import Emulator
from tests.support.faults import TOO_BIG, FaultInjector

# The client retries failed lookups for up to 60 s by default; these tests look at one call.
NO_RETRY = Retry(predicate=lambda _exc: False)


@pytest.fixture
def injector(emulator: Emulator) -> Iterator[FaultInjector]:
    with FaultInjector(emulator.host) as running:
        yield running


@pytest.fixture
def through(injector: FaultInjector, emulator: Emulator) -> datastore.Client:
    return client_via(injector, emulator)


def put_named(client: datastore.Client, kind: str, count: int) -> list[datastore.Key]:
    """``count`` small entities named ``s-<i>``, written straight to the emulator."""
    keys = [client.key(kind, f"s-{i}") for i in range(count)]
    entities = []
    for key in keys:
        entity = datastore.Entity(key)
        entity["n"] = key.name
        entities.append(entity)
    client.put_multi(entities)
    return keys


def names(keys: list[datastore.Key]) -> list[str]:
    return [str(key.name) for key in keys]


def test_without_rules_calls_pass_through(
    injector: FaultInjector, through: datastore.Client, client: datastore.Client, kind: str
) -> None:
    entity = datastore.Entity(through.key(kind, "one"))
    entity.update({"n": 1, "text": "hello"})
    through.put(entity)
    assert client.get(client.key(kind, "one")) == entity  # it reached the emulator

    got = through.get(through.key(kind, "one"))
    assert got is not None
    assert dict(got) == {"n": 1, "text": "hello"}

    through.delete(through.key(kind, "one"))
    assert through.get(through.key(kind, "one")) is None
    assert client.get(client.key(kind, "one")) is None

    counts = injector.counts
    assert counts["Commit"] == 2
    assert counts["Lookup"] == 2
    assert set(counts) == {"Commit", "Lookup"}  # no fault of any kind
    assert injector.applied_mutations == 2


def test_a_commit_over_the_limit_is_refused_and_not_applied(
    injector: FaultInjector, through: datastore.Client, client: datastore.Client, kind: str
) -> None:
    keys = put_named(client, kind, 4)
    injector.refuse_commits_over = 3

    with pytest.raises(gexc.InvalidArgument, match="too big") as refused:
        through.delete_multi([through.key(kind, name) for name in names(keys)])
    assert TOO_BIG in str(refused.value)
    assert remaining(client, kind, names(keys)) == set(names(keys))  # nothing was deleted

    through.delete_multi([through.key(kind, name) for name in names(keys[:3])])
    assert remaining(client, kind, names(keys)) == {"s-3"}
    assert injector.counts["Commit:refused_too_big"] == 1
    assert injector.counts["Commit"] == 2
    assert injector.applied_mutations == 3  # the refused commit's 4 are not counted


def test_a_lost_reply_hides_a_commit_that_was_applied(
    injector: FaultInjector, through: datastore.Client, client: datastore.Client, kind: str
) -> None:
    keys = put_named(client, kind, 5)
    injector.lose_commit_replies = 1.0

    with pytest.raises(gexc.DeadlineExceeded):
        through.delete_multi(
            [through.key(kind, name) for name in names(keys)], retry=NO_RETRY, timeout=5
        )
    assert remaining(client, kind, names(keys)) == set()  # yet every delete was applied
    assert injector.counts["Commit:reply_lost"] == 1
    assert injector.applied_mutations == 5


def test_exhaustion_fails_every_call_for_a_while(
    injector: FaultInjector, through: datastore.Client, client: datastore.Client, kind: str
) -> None:
    keys = put_named(client, kind, 1)
    started = time.monotonic()
    injector.exhaust_for(1.0)

    with pytest.raises(gexc.ResourceExhausted):
        through.get(keys[0], retry=NO_RETRY, timeout=5)
    with pytest.raises(gexc.ResourceExhausted):
        through.delete(keys[0], retry=NO_RETRY, timeout=5)
    assert remaining(client, kind, names(keys)) == {"s-0"}

    while True:  # poll until the calls succeed again
        try:
            found = through.get(keys[0], retry=NO_RETRY, timeout=5)
        except gexc.ResourceExhausted:
            assert time.monotonic() - started < 5, "still exhausted after 5 s"
            time.sleep(0.05)
            continue
        break
    elapsed = time.monotonic() - started
    assert found is not None
    assert 1.0 <= elapsed < 3.0
    counts = injector.counts
    assert counts["exhausted"] >= 2
    assert counts["exhausted"] == counts["Lookup:exhausted"] + counts["Commit:exhausted"]
    assert counts["Commit:exhausted"] == 1
    assert injector.applied_mutations == 0


def test_random_failures_answer_before_forwarding(
    injector: FaultInjector, through: datastore.Client, client: datastore.Client, kind: str
) -> None:
    keys = put_named(client, kind, 1)
    injector.fail_share = 1.0
    injector.fail_codes = (grpc.StatusCode.UNAVAILABLE,)

    with pytest.raises(gexc.ServiceUnavailable, match="injected"):
        through.get(keys[0], retry=NO_RETRY, timeout=5)
    with pytest.raises(gexc.ServiceUnavailable):
        through.delete(keys[0], retry=NO_RETRY, timeout=5)
    assert remaining(client, kind, names(keys)) == {"s-0"}  # the delete never got there
    counts = injector.counts
    assert counts["Lookup"] == 1
    assert counts["Lookup:UNAVAILABLE"] == 1
    assert counts["Commit:UNAVAILABLE"] == 1
    assert injector.applied_mutations == 0


def test_only_methods_limits_the_random_faults(
    injector: FaultInjector, through: datastore.Client, client: datastore.Client, kind: str
) -> None:
    keys = put_named(client, kind, 1)
    injector.only_methods = {"Commit"}
    injector.fail_share = 1.0
    injector.fail_codes = (grpc.StatusCode.INTERNAL,)

    assert through.get(keys[0], retry=NO_RETRY, timeout=5) is not None
    with pytest.raises(gexc.InternalServerError):
        through.delete(keys[0], retry=NO_RETRY, timeout=5)
    assert injector.counts["Commit:INTERNAL"] == 1
    assert "Lookup:INTERNAL" not in injector.counts


def test_the_same_seed_fails_the_same_calls(emulator: Emulator, kind: str) -> None:
    def outcomes(seed: int) -> list[str]:
        with FaultInjector(emulator.host, seed=seed) as injector:
            injector.fail_share = 0.5
            through = client_via(injector, emulator)
            key = through.key(kind, "absent")
            seen = []
            for _ in range(24):
                try:
                    through.get(key, retry=NO_RETRY, timeout=5)
                    seen.append("ok")
                except gexc.GoogleAPICallError as exc:
                    seen.append(type(exc).__name__)
            return seen

    first = outcomes(1)
    assert first == outcomes(1)
    assert first != outcomes(2)
    assert 6 <= first.count("ok") <= 18  # about half fail
    assert {"ServiceUnavailable", "InternalServerError", "Aborted"} <= set(first)
