"""The one error type the CLI maps to exit codes.

Everything that can go wrong for an operator (bad input, refused data, an unreachable
database) becomes a :class:`SweeperError` with a one-line message and the exit code a
scheduler should see; ``cli.main`` is the only place that turns it into output.
"""

from __future__ import annotations

from typing import Any

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class SweeperError(Exception):
    """A failure with a message fit for one line of operator output."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(SweeperError):
    """An option value that can never work; nothing was touched."""

    exit_code = EXIT_USAGE


class RefusedError(SweeperError):
    """The stored data is ambiguous, so sweeping it could delete live sessions."""


class DatastoreError(SweeperError):
    """Datastore failed (unreachable, permission denied, retries exhausted)."""


# What a Datastore call raises when the database, the network or the credentials fail: an
# operator's problem. Anything else escaping a sweep is a bug in sweeper, and its traceback is
# logged (``internal_error``) so that it can be fixed.
CALL_FAILURES = (gexc.GoogleAPIError, auth_exc.GoogleAuthError, ConnectionError, TimeoutError)


def is_bug(exc: BaseException) -> bool:
    return not isinstance(exc, (SweeperError, *CALL_FAILURES))


def report_bug(log: Any, exc: BaseException) -> str:
    """Log a bug's traceback at error level (``internal_error``); its one-line message."""
    log.error("internal_error", exc_info=exc)
    return f"internal error: {describe_exception(exc)}"


def one_line(text: str, limit: int = 500) -> str:
    """Collapse whitespace so a message never spans lines, and bound its length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe_exception(exc: BaseException) -> str:
    """A short, one-line description of a client exception, without a traceback."""
    detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return one_line(f"{type(exc).__name__}: {detail}")
