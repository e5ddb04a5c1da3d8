"""The one retry policy for every Datastore call sweeper makes.

``google-cloud-datastore`` retries queries on its own but never retries commits (CONTEXT
trap 3), so sweeper turns the client's retries off and retries every call itself: one policy,
one place that counts retries and logs them. A retried delete re-sends the whole batch, which is
safe because deleting a key that is already gone is a silent no-op.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from sweeper.errors import describe_exception

T = TypeVar("T")

# Transient by Datastore's own guidance: contention, overload, timeouts, lost connections.
TRANSIENT = (
    gexc.Aborted,
    gexc.DeadlineExceeded,
    gexc.ServiceUnavailable,
    gexc.InternalServerError,
    gexc.ResourceExhausted,
    gexc.GatewayTimeout,
    ConnectionError,
    TimeoutError,
    auth_exc.TransportError,
)

# The server telling us to slow down: these feed the adaptive throttle.
PUSHBACK = (gexc.ResourceExhausted, gexc.Aborted)

# Handed to the client so it does not retry behind our back (and outside our counts).
NO_CLIENT_RETRY = Retry(predicate=lambda _exc: False)

# Per-call deadline. A black-holed host costs at most this per attempt.
CALL_TIMEOUT_S = 20.0


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff, bounded by attempts *and* elapsed time.

    The defaults give up on an unreachable database within about a minute of backoff (two at
    worst, when every attempt hangs until ``CALL_TIMEOUT_S``), so a CronJob fails visibly
    instead of hanging.
    """

    max_attempts: int = 6
    max_delay_s: float = 60.0
    initial_wait_s: float = 0.5
    max_wait_s: float = 10.0


@dataclass
class RetryCounter:
    """How many calls were re-sent, over the whole run (queries and deletes alike)."""

    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self) -> None:
        with self._lock:  # delete workers retry concurrently
            self.retries += 1


class Retrier:
    """Runs a call under the policy, counting and logging each retry."""

    def __init__(
        self,
        policy: RetryPolicy,
        counter: RetryCounter,
        sleep: Callable[[float], None] = time.sleep,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._policy = policy
        self._counter = counter
        self._sleep = sleep
        self._on_failure = on_failure  # told of every failed attempt (adaptive throttling)
        self._log = structlog.get_logger("sweeper.retry")

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry transient errors; re-raise the last error once the policy gives up."""
        policy = self._policy
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(policy.max_attempts) | stop_after_delay(policy.max_delay_s),
            wait=wait_random_exponential(multiplier=policy.initial_wait_s, max=policy.max_wait_s),
            sleep=self._sleep,
            before_sleep=lambda state: self._before_sleep(what, state),
            reraise=True,
        )
        return retrying(fn)

    def _before_sleep(self, what: str, state: RetryCallState) -> None:
        self._counter.add()
        error = state.outcome.exception() if state.outcome is not None else None
        if error is not None and self._on_failure is not None:
            self._on_failure(error)
        self._log.warning(
            "call_retrying",
            call=what,
            attempt=state.attempt_number,
            wait_s=round(state.upcoming_sleep, 3),
            error=describe_exception(error) if error is not None else None,
        )
