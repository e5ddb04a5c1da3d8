"""Log output: JSON lines Cloud Logging can read, level filtering, console rendering."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import pytest
import structlog

from sweeper.logs import configure


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_is_one_object_per_line_with_severity() -> None:
    out = io.StringIO()
    configure("json", stream=out)
    log = structlog.get_logger("sweeper")
    log.info("sweep_started", kind="eq-session")
    log.warning("call_retrying", attempt=1)
    log.error("sweep_finished", stopped_reason="error")
    events = json_lines(out)
    assert [(e["event"], e["severity"]) for e in events] == [
        ("sweep_started", "INFO"),
        ("call_retrying", "WARNING"),
        ("sweep_finished", "ERROR"),
    ]
    assert events[0]["kind"] == "eq-session"
    assert events[2]["stopped_reason"] == "error"


def test_json_timestamp_is_iso8601_utc() -> None:
    out = io.StringIO()
    configure("json", stream=out)
    before = dt.datetime.now(dt.UTC)
    structlog.get_logger().info("tick")
    after = dt.datetime.now(dt.UTC)
    (event,) = json_lines(out)
    stamp = dt.datetime.fromisoformat(event["timestamp"])
    assert stamp.utcoffset() == dt.timedelta(0)
    assert before <= stamp <= after


def explode() -> None:
    raise RuntimeError("boom")


def test_json_exception_is_error_with_traceback_inside_the_object() -> None:
    out = io.StringIO()
    configure("json", stream=out)
    try:
        explode()
    except RuntimeError:
        structlog.get_logger().exception("crashed")
    (event,) = json_lines(out)
    assert event["severity"] == "ERROR"
    assert "RuntimeError: boom" in event["exception"]


def test_json_renders_non_json_values_as_strings() -> None:
    out = io.StringIO()
    configure("json", stream=out)
    when = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    structlog.get_logger().info("query_range", lower=when)
    (event,) = json_lines(out)
    assert event["lower"] == str(when)


def test_level_filtering_drops_less_severe_events() -> None:
    out = io.StringIO()
    configure("json", level="warning", stream=out)
    log = structlog.get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [e["event"] for e in json_lines(out)] == ["w", "e"]


def test_debug_level_keeps_debug_events() -> None:
    out = io.StringIO()
    configure("json", level="debug", stream=out)
    structlog.get_logger().debug("batch_deleted", keys=3)
    (event,) = json_lines(out)
    assert (event["event"], event["severity"]) == ("batch_deleted", "DEBUG")


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="loud"):
        configure("json", level="loud", stream=io.StringIO())


def test_console_renders_event_name_and_fields() -> None:
    out = io.StringIO()
    configure("console", stream=out)
    structlog.get_logger().info("sweep_finished", deleted=42)
    text = out.getvalue()
    assert "sweep_finished" in text
    assert "deleted=42" in text
    assert "info" in text
    assert "\x1b[" not in text  # no colour codes when not writing to a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
