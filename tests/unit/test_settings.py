"""Durations, formats and the validation every SweepSettings goes through."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sweeper.encodings import Encoding
from sweeper.logs import EXIT_USAGE, UsageError
from sweeper.options import decide_ramp_up
from sweeper.settings import (
    MAX_SHARDS,
    Shard,
    SweepSettings,
    check_database,
    format_duration,
    parse_duration,
    parse_format,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("90s", 90),
        ("15m", 900),
        ("3h", 10_800),
        ("2d", 172_800),
        ("1h30m", 5_400),
        ("1d2h3m4s", 93_784),
        ("0s", 0),
        ("90m", 5_400),
        ("14d", 1_209_600),
        (" 3h ", 10_800),
    ],
)
def test_parse_duration_accepts(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


# Uppercase units were once lowered (3M read as 3 minutes by someone who meant 3 months), and
# \d with int() took any script's digits (Arabic-Indic 3, U+0663; fullwidth 15, U+FF11 U+FF15).
MISREAD = [
    "3M",
    "3H",
    "3D",
    "90S",
    "1h30M",
    "1H30m",
    "\u0663h",
    "\uff11\uff15m",
    "3 months",
    "3w",
    "3mo",
]


@pytest.mark.parametrize(
    "text",
    ["", "-5m", "1.5h", "5", "abc", "5x", " ", "m", "5m ago", "00", "+5m", "1h 30m", *MISREAD],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="invalid duration") as info:
        parse_duration(text)
    assert info.value.exit_code == EXIT_USAGE
    assert "s, m, h or d" in info.value.message
    assert "lowercase" in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize("text", ["99999999999d", "9" * 5000 + "s"])
def test_parse_duration_rejects_overflow_as_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match=r"invalid duration .*: too large"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "setting"),
    [
        ("sessions", "sessions"),
        ("abcd", "abcd"),
        ("eq-sessions-2", "eq-sessions-2"),
        ("a" * 63, "a" * 63),
        ("(default)", None),  # the default database's own id
        ("", None),
        (None, None),
    ],
)
def test_check_database_accepts(value: str | None, setting: str | None) -> None:
    assert check_database(value) == setting


@pytest.mark.parametrize(
    "value",
    [
        "Bad Name!",
        "Ab",
        "-abc",
        "abc",  # 3 characters
        "a" * 64,
        "abc-",
        "1abc",
        "Sessions",
        "ses_sions",
        "ses sions",
        "(DEFAULT)",
        "default)",
        "\uff53\uff45\uff53\uff53\uff49\uff4f\uff4e\uff53",
        "session\u00e9",
    ],
)
def test_check_database_rejects(value: str) -> None:
    with pytest.raises(UsageError, match="invalid database id") as info:
        check_database(value)
    assert info.value.exit_code == EXIT_USAGE
    assert "4 to 63 lowercase letters, digits or hyphens" in info.value.message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0"), (90, "1m30s"), (900, "15m"), (10_800, "3h"), (93_784, "1d2h3m4s")],
)
def test_format_duration_is_shortest_spelling(seconds: int, text: str) -> None:
    assert format_duration(dt.timedelta(seconds=seconds)) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_format_duration_round_trips(seconds: int) -> None:
    delta = dt.timedelta(seconds=seconds)
    assert parse_duration(format_duration(delta)) == delta


def test_parse_format() -> None:
    assert parse_format("auto") == "auto"
    assert parse_format("epoch-seconds") is Encoding.EPOCH_SECONDS
    assert parse_format("epoch-millis") is Encoding.EPOCH_MILLIS
    assert parse_format("timestamp") is Encoding.TIMESTAMP


@pytest.mark.parametrize("text", ["weird", "", "AUTO", "seconds"])
def test_parse_format_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="invalid format"):
        parse_format(text)


def test_ramp_up_is_on_against_production_and_off_against_an_emulator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATASTORE_EMULATOR_HOST", raising=False)
    assert decide_ramp_up(None) is True
    assert decide_ramp_up(False) is False
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", "127.0.0.1:8081")
    assert decide_ramp_up(None) is False
    assert decide_ramp_up(True) is True  # asked for: the emulator does not switch it off
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", "")
    assert decide_ramp_up(None) is True  # set but empty: no emulator


def make(**overrides: Any) -> SweepSettings:
    fields: dict[str, Any] = {
        "kind": "eq-session",
        "prop": "expires_at",
        "format": Encoding.EPOCH_SECONDS,
        "grace": dt.timedelta(minutes=15),
    }
    fields.update(overrides)
    return SweepSettings(**fields)


def test_valid_settings() -> None:
    settings = make(batch_size=1, max_deletes=1, max_runtime=dt.timedelta(seconds=1))
    assert settings.batch_size == 1
    assert str(settings.format) == "epoch-seconds"
    assert make(batch_size=500, grace=dt.timedelta(0), namespace="a.b_c-1").namespace == "a.b_c-1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": ""}, "kind must not be empty"),
        ({"kind": "  "}, "kind must not be empty"),
        ({"prop": ""}, "property must not be empty"),
        ({"kind": "__kind__"}, "reserved"),
        ({"prop": "__key__"}, "reserved"),
        ({"kind": "k" * 1501}, "1500-byte"),
        ({"batch_size": 0}, "batch size"),
        ({"batch_size": 501}, "batch size"),
        ({"grace": dt.timedelta(seconds=-1)}, "grace"),
        ({"grace": dt.timedelta(days=3_000_000)}, "grace"),
        ({"max_deletes": 0}, "max deletes"),
        ({"max_runtime": dt.timedelta(0)}, "max runtime"),
        ({"namespace": "has space"}, "invalid namespace"),
        ({"namespace": "n/s"}, "invalid namespace"),
        ({"namespace": "n" * 101}, "invalid namespace"),
        ({"namespace": "__reserved__"}, "invalid namespace"),
        ({"namespace": "n", "all_namespaces": True}, "cannot be combined with --namespace"),
        ({"max_rate": 0.0}, "max rate"),
        ({"max_rate": -1.0}, "max rate"),
        ({"max_rate": math.inf}, "max rate must be a finite number"),
        ({"max_rate": math.nan}, "max rate must be a finite number"),
        ({"max_fraction": math.nan}, "max fraction"),
        ({"max_fraction": math.inf}, "max fraction"),
    ],
)
def test_settings_reject(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make(**overrides)


def test_verify_is_on_unless_turned_off() -> None:
    assert make().verify is True
    assert make(verify=False).verify is False


def test_a_finite_max_rate_is_kept() -> None:
    assert make(max_rate=0.5).max_rate == 0.5


def test_a_shard_count_may_reach_the_limit_and_not_pass_it() -> None:
    assert Shard.parse(f"{MAX_SHARDS - 1}/{MAX_SHARDS}") == Shard(MAX_SHARDS - 1, MAX_SHARDS)
    with pytest.raises(UsageError, match=f"N must be at most {MAX_SHARDS}"):
        Shard.parse(f"0/{MAX_SHARDS + 1}")
    with pytest.raises(UsageError, match=f"N must be at most {MAX_SHARDS}"):
        Shard.parse("0/1000000000")


def test_a_shard_too_long_to_be_a_number_is_a_usage_error() -> None:
    """Python refuses to convert more than 4300 digits (ValueError): still a usage error."""
    with pytest.raises(UsageError, match="at most"):
        Shard.parse("0/" + "1" * 5000)
    with pytest.raises(UsageError, match="at most"):
        Shard.parse("1" * 5000 + "/4")
