"""Logging setup: structlog processors configured once, JSON for machines, console for people.

In JSON mode every event is one object per line with ``severity`` (the field Cloud Logging reads
for the level) and an ISO-8601 UTC ``timestamp``, so a log-based metric can read
``sweep_finished`` directly.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LogFormat = Literal["json", "console"]
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_severity(_logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Cloud Logging's level field; ``warn`` is spelled out as Cloud Logging expects."""
    level = "warning" if method == "warn" else method
    event_dict["severity"] = "ERROR" if level == "exception" else level.upper()
    return event_dict


# The run's full records: on a person's terminal the command prints a short summary instead
# (``terminal.summary``), and these show at ``--log-level debug`` only.
SUMMARY_EVENTS = frozenset({"sweep_finished", "run_finished"})


def configure(
    log_format: LogFormat,
    level: str = "info",
    stream: TextIO | None = None,
    *,
    person: bool = False,
) -> None:
    """``person``: a console log on an interactive terminal, which gets a short summary at the
    end rather than the summary events' hundreds of ``key=value`` characters (unless debug)."""
    out = stream if stream is not None else sys.stdout
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Processor]
    if log_format == "json":
        renderer = [
            add_severity,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str),
        ]
    else:
        hide: list[Processor] = [] if not person or level == "debug" else [_hide_summaries]
        renderer = [
            *hide,
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=out.isatty()),
        ]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_level_number(level)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def _hide_summaries(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    if event_dict.get("event") in SUMMARY_EVENTS:
        raise structlog.DropEvent
    return event_dict


def _level_number(level: str) -> int:
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    return int(logging.getLevelName(level.upper()))
