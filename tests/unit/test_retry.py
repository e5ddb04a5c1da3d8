"""The one retry policy: what it retries, how long it waits, what it counts and logs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
from google.api_core import exceptions as gexc
from structlog.testing import capture_logs

from sweeper.logs import DatastoreError
from sweeper.retry import (
    DRAIN_S,
    REFUSED_ATTEMPTS,
    Retrier,
    RetryCounter,
    RetryPolicy,
    Stopper,
    is_transient,
)

E = TypeVar("E", bound=Exception)


def api_error(cls: type[E], message: str) -> E:
    """google.api_core's exception classes are unannotated; build them in one typed place."""
    return cls(message)


ATTEMPTS = 4
POLICY = RetryPolicy(max_attempts=ATTEMPTS, max_delay_s=3600.0, initial_wait_s=0.5, max_wait_s=2.0)

TRANSIENT_ERRORS: list[Callable[[], Exception]] = [
    lambda: api_error(gexc.ServiceUnavailable, "unavailable"),
    lambda: api_error(gexc.Aborted, "contention"),
    lambda: api_error(gexc.DeadlineExceeded, "slow"),
    lambda: api_error(gexc.InternalServerError, "oops"),
    lambda: api_error(gexc.ResourceExhausted, "quota"),
    lambda: ConnectionError("reset"),
]
PERMANENT_ERRORS: list[Callable[[], Exception]] = [
    lambda: api_error(gexc.PermissionDenied, "no"),
    lambda: api_error(gexc.InvalidArgument, "bad"),
    lambda: api_error(gexc.NotFound, "gone"),
]


class Flaky:
    """Fails with the given errors in turn, then returns ``"ok"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def make_retrier(policy: RetryPolicy = POLICY) -> tuple[Retrier, RetryCounter, list[float]]:
    waits: list[float] = []
    counter = RetryCounter()
    return Retrier(policy, counter, sleep=waits.append), counter, waits


@pytest.mark.parametrize("make_error", TRANSIENT_ERRORS)
def test_transient_error_is_retried_then_succeeds(make_error: Callable[[], Exception]) -> None:
    retrier, counter, waits = make_retrier()
    fn = Flaky(make_error(), make_error())
    assert retrier.call("delete", fn) == "ok"
    assert fn.calls == 3
    assert counter.retries == 2
    assert len(waits) == 2


@pytest.mark.parametrize("make_error", PERMANENT_ERRORS)
def test_permanent_error_fails_fast(make_error: Callable[[], Exception]) -> None:
    retrier, counter, waits = make_retrier()
    error = make_error()
    fn = Flaky(error)
    with pytest.raises(type(error)) as info:
        retrier.call("query", fn)
    assert info.value is error
    assert fn.calls == 1
    assert counter.retries == 0
    assert waits == []


def test_is_transient_classification() -> None:
    assert all(is_transient(make()) for make in TRANSIENT_ERRORS)
    assert not any(is_transient(make()) for make in PERMANENT_ERRORS)
    assert not is_transient(ValueError("bug"))


def test_gives_up_after_max_attempts_with_last_error() -> None:
    retrier, counter, waits = make_retrier()
    errors = [api_error(gexc.ServiceUnavailable, f"attempt {n}") for n in range(1, 10)]
    fn = Flaky(*errors)
    with pytest.raises(gexc.ServiceUnavailable) as info:
        retrier.call("delete", fn)
    assert info.value is errors[ATTEMPTS - 1]
    assert fn.calls == ATTEMPTS
    assert counter.retries == ATTEMPTS - 1
    assert len(waits) == ATTEMPTS - 1


def test_waits_are_bounded_by_max_wait() -> None:
    policy = RetryPolicy(max_attempts=30, max_delay_s=3600.0, initial_wait_s=0.5, max_wait_s=1.5)
    retrier, _counter, waits = make_retrier(policy)
    fn = Flaky(*(api_error(gexc.Aborted, "busy") for _ in range(29)))
    assert retrier.call("delete", fn) == "ok"
    assert len(waits) == 29
    assert all(0 <= wait <= policy.max_wait_s for wait in waits)


def test_counter_accumulates_across_calls() -> None:
    retrier, counter, _waits = make_retrier()
    retrier.call("query", Flaky(api_error(gexc.Aborted, "a")))
    retrier.call("delete", Flaky(api_error(gexc.Aborted, "b"), api_error(gexc.Aborted, "c")))
    assert counter.retries == 3


def test_each_retry_logs_call_retrying() -> None:
    retrier, _counter, waits = make_retrier()
    with capture_logs() as logs:
        retrier.call(
            "lookup", Flaky(api_error(gexc.ServiceUnavailable, "down"), ConnectionError("reset"))
        )
    events = [e for e in logs if e["event"] == "call_retrying"]
    assert len(events) == 2
    assert [e["attempt"] for e in events] == [1, 2]
    assert all(e["call"] == "lookup" for e in events)
    assert all(e["log_level"] == "warning" for e in events)
    assert events[0]["error"] == "ServiceUnavailable: down"
    assert events[1]["error"] == "ConnectionError: reset"
    assert [e["wait_s"] for e in events] == [round(w, 3) for w in waits]


def test_success_first_time_logs_nothing() -> None:
    retrier, counter, waits = make_retrier()
    with capture_logs() as logs:
        assert retrier.call("query", Flaky()) == "ok"
    assert logs == []
    assert counter.retries == 0
    assert waits == []


REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
    "Failed to connect to remote host: Connection refused"
)
NO_HOST = "errors resolving nosuch.invalid:8081: [hostname lookup error: Domain name not found]"


@pytest.mark.parametrize(
    ("message", "why"), [(REFUSED, "connection refused"), (NO_HOST, "no such host")]
)
def test_a_database_not_there_before_any_success_fails_at_once_naming_it(
    message: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It took 48 retries over 66 s to say so; kubectl says it in a second."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", "127.0.0.1:1")
    retrier, _counter, waits = make_retrier(RetryPolicy(stall_s=60.0))
    never = Flaky(*[api_error(gexc.ServiceUnavailable, message)] * 50)

    with pytest.raises(DatastoreError) as raised:
        retrier.call("query", never)

    assert never.calls == REFUSED_ATTEMPTS
    assert sum(waits) < 5
    assert raised.value.message == (
        f"cannot reach the Datastore emulator at 127.0.0.1:1 (DATASTORE_EMULATOR_HOST): {why}. "
        "Is it running, and are the host and port right?"
    )


def test_a_refused_connection_after_a_success_is_ridden_out() -> None:
    """Once the database has answered, a refused connection is an outage (a restart)."""
    retrier, _counter, _waits = make_retrier(RetryPolicy(stall_s=60.0))
    assert retrier.call("query", Flaky()) == "ok"
    outage = Flaky(*[api_error(gexc.ServiceUnavailable, REFUSED)] * 10)

    assert retrier.call("query", outage) == "ok"
    assert outage.calls == 11


def test_no_call_is_given_longer_than_the_drain_past_the_run_s_deadline() -> None:
    """A call that never answers must not hold a --max-runtime stop past its budget: a read
    ends at the deadline, a delete gets the drain after it to land."""
    now = [1000.0]
    stopper = Stopper(threading.Event(), lambda: now[0], lambda _s: None, deadline=1003.0)
    retrier = Retrier(RetryPolicy(), RetryCounter(), clock=lambda: now[0], stopper=stopper)
    assert (retrier.timeout, retrier.delete_timeout) == (3.0, 3.0 + DRAIN_S)
    now[0] = 1003.0 + DRAIN_S + 60  # long past it: still a positive deadline
    assert 0 < retrier.timeout <= 0.1
    assert 0 < retrier.delete_timeout <= 0.1
    no_deadline = Retrier(RetryPolicy(call_timeout_s=20.0), RetryCounter())
    assert no_deadline.timeout == 20.0
