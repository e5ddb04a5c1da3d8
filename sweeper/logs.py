"""What an operator reads: the logs (JSON for Cloud Logging, docs/metrics.md, or console), and
:class:`SweeperError`: what goes wrong for an operator, with a one-line message and the exit
code a scheduler should see (``cli.main`` alone prints it). It imports nothing of sweeper.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Literal, TextIO

import structlog
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from structlog.typing import EventDict, Processor, WrappedLogger

LogFormat = Literal["json", "console"]
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_severity(_logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Cloud Logging's level field; ``warn`` is spelled out as Cloud Logging expects."""
    level = "warning" if method == "warn" else method
    event_dict["severity"] = "ERROR" if level == "exception" else level.upper()
    return event_dict


# The run's full records: on a person's terminal the command prints a short summary instead
# (``result.terminal_summary``), and these show at ``--log-level debug`` only.
SUMMARY_EVENTS = frozenset({"sweep_finished", "run_finished"})


def configure(
    log_format: LogFormat,
    level: str = "info",
    stream: TextIO | None = None,
    *,
    person: bool = False,
    before_each: Callable[[], None] | None = None,
) -> None:
    """``person``: a console log on an interactive terminal, where SUMMARY_EVENTS are hidden."""
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    out = stream if stream is not None else sys.stderr
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        processors += [
            add_severity,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str),
        ]
    else:
        if person and level != "debug":
            processors.append(_hide_summaries)
        if before_each is not None:  # e.g. take the live progress line off the terminal
            processors.append(lambda _logger, _method, event: (before_each(), event)[1])
        processors += [
            structlog.processors.add_log_level,
            # https://no-color.org: NO_COLOR set and not empty turns colours off.
            structlog.dev.ConsoleRenderer(colors=out.isatty() and not os.environ.get("NO_COLOR")),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            int(logging.getLevelName(level.upper()))
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def _hide_summaries(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    if event_dict.get("event") in SUMMARY_EVENTS:
        raise structlog.DropEvent
    return event_dict


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
# operator's problem. Anything else escaping a sweep is a bug, its traceback logged to be fixed.
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
