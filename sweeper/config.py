"""``--config FILE``: several targets swept one after another, from a TOML file.

One CronJob can then replace several purges, e.g. sessions by ``expires_at`` and questionnaire
state by ``expires_at`` and by ``submitted_at``. Every key is checked here, once, so a typo
fails the run before anything is touched::

    [defaults]            # optional: applies to every target unless it says otherwise
    grace = "3h"

    [[target]]
    kind = "eq-session"
    format = "epoch-seconds"
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sweeper.logs import UsageError
from sweeper.settings import (
    DURATION_UNITS,
    FORMAT_CHOICES,
    SweepSettings,
    check_database,
    parse_duration,
    parse_format,
)


@dataclass(frozen=True)
class Holds:
    """What a key must hold, and how its value becomes the setting."""

    accepts: type | tuple[type, ...]  # the TOML values taken (a bool is never an int here)
    name: str  # in "<key> must be a <name>" errors
    convert: Callable[[Any], Any]
    doc: str  # in docs/options.md


_STR = Holds(str, "str", str, "string")
_INT = Holds(int, "int", int, "integer")
_BOOL = Holds(bool, "bool", bool, "boolean")
_DURATION = Holds(
    str,
    "string",
    parse_duration,
    f'string: a duration, `"0"` or a number followed by {DURATION_UNITS}, e.g. `"3h"`',
)


@dataclass(frozen=True)
class Key:
    """A key a target may set: the :class:`SweepSettings` field (which is also the keyword of
    the option that sets it), and what it holds. Given explicitly on the command line (or by
    its variable) as well, the option is a usage error; unless ``overrides``: then the command
    line's value wins for every target (logged where it replaces the file's), but ``safe`` wins
    whichever side sets it. ``required``: every target names it, the default does not count."""

    field: str
    holds: Holds
    required: bool = False
    overrides: bool = False
    safe: object = None


# The keys, in the order messages and docs list them.
KEYS: dict[str, Key] = {
    "kind": Key("kind", _STR, required=True),
    "property": Key("prop", _STR),
    "format": Key(
        "format",
        Holds(
            str, "string", parse_format, "string: " + ", ".join(f"`{c}`" for c in FORMAT_CHOICES)
        ),
    ),
    "grace": Key("grace", _DURATION),
    "namespace": Key("namespace", _STR),
    "database": Key(
        "database",
        Holds(
            str,
            "string",
            check_database,
            'string: a database id, e.g. `"sessions"`, or `"(default)"`',
        ),
    ),
    "max_deletes": Key("max_deletes", _INT, overrides=True),
    "max_runtime": Key("max_runtime", _DURATION, overrides=True),
    "batch_size": Key("batch_size", _INT, overrides=True),
    # The first run over a backlog, with the CronJob's own file: --max-fraction 1 for once.
    "max_fraction": Key(
        "max_fraction", Holds((int, float), "number", float, "number"), overrides=True
    ),
    # A refreshed session is never lost because one side said no.
    "verify": Key("verify", _BOOL, overrides=True, safe=True),
    "scan": Key("scan", _BOOL),
    "all_namespaces": Key("all_namespaces", _BOOL),
    "with_descendants": Key("with_descendants", _BOOL),
    "allow_empty": Key("allow_empty", _BOOL),
}
_BY_FIELD = {k.field: k for k in KEYS.values()}


def flag(key: str) -> str:
    """The option a key of ``KEYS`` stands for: the key's own name, ``--property`` for
    ``property``."""
    return "--" + key.replace("_", "-")


# Options that only make sense for the whole run, not per target: a file setting one is told so.
RUN_WIDE = ("project", "dry_run")


def load_targets(
    path: Path, base: dict[str, Any], explicit: dict[str, Any] | None = None
) -> list[SweepSettings]:
    """One validated :class:`SweepSettings` per ``[[target]]``.

    Precedence, highest first: what the command line (or a ``SWEEPER_*`` variable) set
    explicitly (``explicit``), the target's own keys, ``[defaults]``, then ``base`` (the
    command line's built-in defaults and run-wide values; field names of
    :class:`SweepSettings`), less what every target must name itself (``kind``). A safety
    option is never switched off that way: ``verify`` is on when the command line *or* the
    file turns it on. Each value the command line overrides is logged
    (``option_overridden``), so nothing in the file is dropped silently.
    """
    document = _read(path)
    unknown = set(document) - {"defaults", "target"}
    if unknown:
        raise UsageError(f"config {path}: unknown table(s) {', '.join(sorted(unknown))}")
    targets = document.get("target")
    if not isinstance(targets, list) or not targets:
        raise UsageError(f"config {path}: no [[target]] tables")
    defaults = _fields(path, "[defaults]", document.get("defaults", {}))
    base = {name: value for name, value in base.items() if not _is_required(name)}
    settings = []
    for number, table in enumerate(targets, start=1):
        where = f"target {number}"
        from_file = {**defaults, **_fields(path, where, table)}
        values = {**base, **from_file, **_merge(where, from_file, explicit or {})}
        settings.append(_settings(path, where, values))
    return settings


def _is_required(field: str) -> bool:
    return field in _BY_FIELD and _BY_FIELD[field].required


def _merge(where: str, from_file: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """The command line's explicit values, as they apply over one target's file values."""
    merged: dict[str, Any] = {}
    for name, value in explicit.items():
        if name not in from_file or from_file[name] == value:
            merged[name] = value
            continue
        safe = _BY_FIELD[name].safe if name in _BY_FIELD else None
        chosen = safe if safe is not None and safe in (value, from_file[name]) else value
        merged[name] = chosen
        structlog.get_logger("sweeper.config").warning(
            "option_overridden",
            target=where,
            option=name,
            file=from_file[name],
            command_line=value,
            used=chosen,
        )
    return merged


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path}: invalid TOML: {exc}") from None


def _fields(path: Path, where: str, table: object) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise UsageError(f"config {path}: {where} must be a table")
    fields: dict[str, Any] = {}
    for key, value in table.items():
        if key in RUN_WIDE:
            raise UsageError(
                f"config {path}: {where}: {key} applies to the whole run; "
                "pass it on the command line"
            )
        if key not in KEYS:
            raise UsageError(
                f"config {path}: {where}: unknown key {key!r} (known: {', '.join(KEYS)})"
            )
        fields[KEYS[key].field] = _convert(path, where, key, value, KEYS[key].holds)
    return fields


def _convert(path: Path, where: str, key: str, value: object, toml: Holds) -> Any:
    if not isinstance(value, toml.accepts) or (
        toml.accepts is not bool and isinstance(value, bool)
    ):
        raise UsageError(f"config {path}: {where}: {key} must be a {toml.name}, not {value!r}")
    try:
        return toml.convert(value)
    except UsageError as exc:
        raise UsageError(f"config {path}: {where}: {exc.message}") from None


def _settings(path: Path, where: str, values: dict[str, Any]) -> SweepSettings:
    for key in (key for key, k in KEYS.items() if k.required):
        if KEYS[key].field not in values:
            raise UsageError(f"config {path}: {where}: {key} is required")
    try:
        return SweepSettings(**values)
    except UsageError as exc:
        raise UsageError(f"config {path}: {where}: {exc.message}") from None
