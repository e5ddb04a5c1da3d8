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
from pathlib import Path
from typing import Any

import structlog

from sweeper.errors import UsageError
from sweeper.options import TomlType, file_options, run_wide_options
from sweeper.settings import SweepSettings

# TOML key -> (SweepSettings field, what the key holds), in the order messages list them. Which
# options a target may set, and how, is declared in sweeper/options/table.py.
_TARGET_KEYS: dict[str, tuple[str, TomlType]] = {
    o.key: (o.sets, o.toml) for o in file_options() if o.sets is not None and o.toml is not None
}
# Keys that only make sense for the whole run, not per target.
_RUN_WIDE = tuple(o.key for o in run_wide_options())
# Keys every target must name itself (key -> field): the command line's default does not count.
_REQUIRED = {o.key: o.sets for o in file_options() if o.required}
# Options where the safe value wins whoever sets it.
_SAFE_WINS = {o.sets: o.safe for o in file_options() if o.safe is not None}


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
    base = {name: value for name, value in base.items() if name not in _REQUIRED.values()}
    settings = []
    for number, table in enumerate(targets, start=1):
        where = f"target {number}"
        from_file = {**defaults, **_fields(path, where, table)}
        values = {**base, **from_file, **_merge(where, from_file, explicit or {})}
        settings.append(_settings(path, where, values))
    return settings


def _merge(where: str, from_file: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """The command line's explicit values, as they apply over one target's file values."""
    merged: dict[str, Any] = {}
    for name, value in explicit.items():
        if name not in from_file or from_file[name] == value:
            merged[name] = value
            continue
        safe = _SAFE_WINS.get(name)
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
        if key in _RUN_WIDE:
            raise UsageError(
                f"config {path}: {where}: {key} applies to the whole run; "
                "pass it on the command line"
            )
        if key not in _TARGET_KEYS:
            raise UsageError(
                f"config {path}: {where}: unknown key {key!r} (known: {', '.join(_TARGET_KEYS)})"
            )
        field, toml = _TARGET_KEYS[key]
        fields[field] = _convert(path, where, key, value, toml)
    return fields


def _convert(path: Path, where: str, key: str, value: object, toml: TomlType) -> Any:
    if not isinstance(value, toml.accepts) or (
        toml.accepts is not bool and isinstance(value, bool)
    ):
        raise UsageError(f"config {path}: {where}: {key} must be a {toml.name}, not {value!r}")
    try:
        return toml.convert(value)
    except UsageError as exc:
        raise UsageError(f"config {path}: {where}: {exc.message}") from None


def _settings(path: Path, where: str, values: dict[str, Any]) -> SweepSettings:
    for key, field in _REQUIRED.items():
        if field not in values:
            raise UsageError(f"config {path}: {where}: {key} is required")
    try:
        return SweepSettings(**values)
    except UsageError as exc:
        raise UsageError(f"config {path}: {where}: {exc.message}") from None
