"""The value types of the options: how click parses each, and what a ``--config`` key holds."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from sweeper.errors import SweeperError
from sweeper.metrics import check_url
from sweeper.settings import (
    DURATION_UNITS,
    FORMAT_CHOICES,
    Shard,
    check_database,
    parse_duration,
    parse_format,
)


class Duration(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, dt.timedelta):
            return value
        try:
            return parse_duration(str(value))
        except SweeperError as exc:
            self.fail(exc.message, param, ctx)


DURATION = Duration()


class DatabaseId(click.ParamType):  # type: ignore[type-arg]
    """A Firestore database id, checked when parsed: a bad one would otherwise fail only once
    Datastore is called (exit 1). Kept as given; ``check_database`` makes the setting."""

    name = "database"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            check_database(str(value))
        except SweeperError as exc:
            self.fail(exc.message, param, ctx)
        return str(value)


DATABASE = DatabaseId()


class ShardType(click.ParamType):  # type: ignore[type-arg]
    """``I/N``, parsed by click so that an error names the option (and its variable)."""

    name = "shard"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Shard):
            return value
        try:
            return Shard.parse(str(value))
        except SweeperError as exc:
            self.fail(exc.message, param, ctx)


SHARD = ShardType()


class FiniteFloatRange(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` and ``inf``.

    click's range lets ``nan`` past every bound (each comparison with it is false) and ``inf``
    past a range open at the top. The throttle's own check then refused either, once the run
    had started: an internal error (exit 1) instead of a usage error.
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(
                f"{value!r} is not a finite number in the range {describe_range(self)}.",
                param,
                ctx,
            )
        return number


class PushgatewayUrl(click.ParamType):  # type: ignore[type-arg]
    """Checked when parsed: a URL that cannot work would otherwise fail only after the deletes."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            check_url(str(value))
        except SweeperError as exc:
            self.fail(exc.message, param, ctx)
        return str(value)


@dataclass(frozen=True)
class TomlType:
    """What a ``--config`` key must hold, and how its value becomes the setting."""

    accepts: type | tuple[type, ...]  # the TOML values taken (a bool is never an int here)
    name: str  # in "<key> must be a <name>" errors
    convert: Callable[[Any], Any]
    doc: str  # in docs/options.md


TOML_STR = TomlType(str, "str", str, "string")
TOML_INT = TomlType(int, "int", int, "integer")
TOML_NUMBER = TomlType((int, float), "number", float, "number")
TOML_BOOL = TomlType(bool, "bool", bool, "boolean")
TOML_DURATION = TomlType(
    str,
    "string",
    parse_duration,
    f'string: a duration, `"0"` or a number followed by {DURATION_UNITS}, e.g. `"3h"`',
)
TOML_DATABASE = TomlType(
    str, "string", check_database, 'string: a database id, e.g. `"sessions"`, or `"(default)"`'
)
TOML_FORMAT = TomlType(
    str, "string", parse_format, "string: " + ", ".join(f"`{c}`" for c in FORMAT_CHOICES)
)


def describe_range(bounds: click.IntRange | click.FloatRange) -> str:
    """As ``--help`` shows it: ``1<=x<=500``, ``x>0``."""
    if bounds.max is None:
        return f"x{'>' if bounds.min_open else '>='}{bounds.min}"
    high = f"{'<' if bounds.max_open else '<='}{bounds.max}"
    if bounds.min is None:
        return f"x{high}"
    return f"{bounds.min}{'<' if bounds.min_open else '<='}x{high}"
