"""Validated settings for one sweep, built once at the edge (the command line, or a
``--config`` file's targets) and then frozen."""

from __future__ import annotations

import datetime as dt
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from sweeper.encodings import Encoding
from sweeper.logs import UsageError

# The most pods a run may be cut into (``--shard I/N``). Each pod starts at 1/N of the ramp-up's
# 500 deletes/s, 0.05/s at this limit: an N past it is a typo, not a plan.
MAX_SHARDS = 10_000
_SHARD = re.compile(r"([0-9]+)/([0-9]+)")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based, as Kubernetes' JOB_COMPLETION_INDEX)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD.fullmatch(text.strip())
        if not match:
            raise UsageError(f"invalid shard {text!r}: use I/N, e.g. 0/4 (I from 0 to N-1)")
        if max(len(match[1]), len(match[2])) > len(str(MAX_SHARDS)):  # never 4,300 digits
            raise UsageError(f"invalid shard: I and N must be at most {MAX_SHARDS}")
        index, count = int(match[1]), int(match[2])
        if count > MAX_SHARDS:
            raise UsageError(f"invalid shard {text!r}: N must be at most {MAX_SHARDS}")
        if count < 1 or not 0 <= index < count:
            raise UsageError(f"invalid shard {text!r}: I must be between 0 and N-1, N >= 1")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


FormatChoice = Encoding | Literal["auto"]

# Default --max-fraction (guard.py): a run every 15 minutes deletes a small share of what is
# stored; more than half of everything at once is a mistake, or a first run over a backlog.
DEFAULT_MAX_FRACTION = 0.5
FORMAT_CHOICES = ("auto", *(e.value for e in Encoding))

MAX_BATCH_SIZE = 500  # Datastore refuses more mutations in one commit
DEFAULT_KIND = "eq-session"
# Enough streams and commits in flight to hide production's round trips on a small pod.
DEFAULT_WORKERS = 4
MAX_WORKERS = 32
DEFAULT_PROPERTY = "expires_at"
# It dwarfs the runner's read-modify-write of a session and any clock skew (docs/design.md).
DEFAULT_GRACE = "15m"
# Beyond this, now - grace falls before year 1; past ~25 years no encoding's band is reached.
MAX_GRACE = dt.timedelta(days=36_500)

# ``0``, or ASCII digits each followed by a lowercase unit (``1h30m``): ``\d`` would take any
# script's digits, and lowering the text would read ``3M`` (months?) as 3 minutes.
_DURATION = re.compile(r"0|(?:[0-9]+[smhd])+", re.ASCII)
_DURATION_PART = re.compile(r"([0-9]+)([smhd])", re.ASCII)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_UNITS = "s, m, h or d (seconds, minutes, hours, days; lowercase)"
# Firestore's database ids (https://cloud.google.com/firestore/docs/manage-databases).
DEFAULT_DATABASE = "(default)"
_DATABASE = re.compile(r"[a-z][a-z0-9-]{2,61}[a-z0-9]", re.ASCII)
# Datastore's limits on names (https://cloud.google.com/datastore/docs/concepts/limits).
_NAMESPACE = re.compile(r"[0-9A-Za-z._-]{0,100}")
_MAX_NAME_BYTES = 1500


def parse_duration(text: str) -> dt.timedelta:
    """Parse ``0``, ``90s``, ``15m``, ``3h``, ``2d`` or a sum such as ``1h30m`` (``_DURATION``)."""
    raw = text.strip()
    if not _DURATION.fullmatch(raw):
        raise UsageError(
            f"invalid duration {_shown(text)}: use 0 or a number (digits 0-9) followed by "
            f"{DURATION_UNITS}, e.g. 90s, 15m, 3h, 2d or 1h30m"
        )
    try:
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(raw))
        return dt.timedelta(seconds=seconds)
    except (OverflowError, ValueError):  # ValueError: more digits than int() reads
        raise UsageError(f"invalid duration {_shown(text)}: too large") from None


def format_duration(delta: dt.timedelta) -> str:
    """The shortest :func:`parse_duration` spelling of ``delta``."""
    seconds = int(delta.total_seconds())
    out = []
    for unit in ("d", "h", "m", "s"):
        count, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if count:
            out.append(f"{count}{unit}")
    return "".join(out) or "0"


def _shown(text: str, limit: int = 70) -> str:
    """``text`` quoted for a message, cut short so that the rest of the message still shows."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_name(what: str, value: str) -> None:
    """Kinds and property names: non-empty, not reserved, within Datastore's size limit."""
    if not value or not value.strip():
        raise UsageError(f"{what} must not be empty")
    if value.startswith("__") and value.endswith("__"):
        raise UsageError(f"{what} {value!r} is reserved by Datastore")
    if len(value.encode()) > _MAX_NAME_BYTES:
        raise UsageError(f"{what} is longer than Datastore's {_MAX_NAME_BYTES}-byte limit")


def check_database(value: str | None) -> str | None:
    """A Firestore database id, or None for the default database (also ``""`` and
    ``"(default)"``). Checked before any call: a bad id otherwise fails only at Datastore."""
    if value is None or value in ("", DEFAULT_DATABASE):
        return None
    if not _DATABASE.fullmatch(value):
        raise UsageError(
            f"invalid database id {_shown(value)}: use 4 to 63 lowercase letters, digits or "
            f"hyphens, starting with a letter and not ending with a hyphen, or {DEFAULT_DATABASE}"
        )
    return value


def parse_format(text: str) -> FormatChoice:
    if text not in FORMAT_CHOICES:
        raise UsageError(f"invalid format {text!r}: choose one of {', '.join(FORMAT_CHOICES)}")
    return "auto" if text == "auto" else Encoding(text)


@dataclass(frozen=True)
class SweepSettings:
    """What one sweep does; an impossible value raises :class:`UsageError` on construction."""

    kind: str
    prop: str
    format: FormatChoice
    grace: dt.timedelta
    batch_size: int = MAX_BATCH_SIZE
    dry_run: bool = False
    # At the version read, on by default: a session refreshed since its query is otherwise lost.
    verify: bool = True
    scan: bool = False
    # Delete workers, and as many query streams over slices of the expired range.
    workers: int = DEFAULT_WORKERS
    shard: Shard = field(default_factory=Shard)
    # Datastore's 500/50/5 ramp-up (the command line's default: on, off against an emulator).
    ramp_up: bool = False
    max_rate: float | None = None
    max_deletes: int | None = None
    max_runtime: dt.timedelta | None = None
    with_descendants: bool = False
    # Refuse a run that would delete more than this share of what carries the property.
    max_fraction: float = DEFAULT_MAX_FRACTION
    project: str | None = None
    database: str | None = None
    namespace: str | None = None
    all_namespaces: bool = False
    # Succeed when nothing at all carries the property; else that fails the run (a misspelt
    # kind, property or namespace looks like it, and would "succeed" on every schedule).
    allow_empty: bool = False

    def __post_init__(self) -> None:
        check_name("kind", self.kind)
        check_name("property", self.prop)
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise UsageError(f"batch size must be between 1 and {MAX_BATCH_SIZE}")
        if not dt.timedelta(0) <= self.grace <= MAX_GRACE:
            raise UsageError(f"grace must be between 0 and {MAX_GRACE.days}d")
        if self.max_deletes is not None and self.max_deletes < 1:
            raise UsageError("max deletes must be at least 1")
        if self.max_runtime is not None and self.max_runtime <= dt.timedelta(0):
            raise UsageError("max runtime must be greater than 0")
        ns = self.namespace
        if ns and (not _NAMESPACE.fullmatch(ns) or (ns.startswith("__") and ns.endswith("__"))):
            raise UsageError(
                f"invalid namespace {ns!r}: use up to 100 letters, digits, '.', '_' or '-'"
            )
        if self.all_namespaces and self.namespace is not None:
            raise UsageError(
                "--all-namespaces sweeps every namespace: it cannot be combined with --namespace"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise UsageError(f"workers must be between 1 and {MAX_WORKERS}")
        if self.max_rate is not None and not (math.isfinite(self.max_rate) and self.max_rate > 0):
            raise UsageError("max rate must be a finite number greater than 0")
        if not 0 < self.max_fraction <= 1:
            raise UsageError("max fraction must be greater than 0 and at most 1 (1: no limit)")
        if self.scan and self.format == "auto":
            raise UsageError("--scan needs an explicit --format: a scan reads values one by one")
        if self.scan and self.shard.count > 1:
            raise UsageError(
                "--scan cannot be combined with --shard: every shard would read the whole kind; "
                "run one scan (it deletes in parallel with --workers)"
            )

    @property
    def where(self) -> str:
        """The namespace and database, as messages name them."""
        namespace = f"namespace {self.namespace}" if self.namespace else "the default namespace"
        return namespace + (f" of database {self.database}" if self.database else "")

    @property
    def label(self) -> str:
        """How a run's messages name one sweep: ``kind.property``, and its namespace if any."""
        label = f"{self.kind}.{self.prop}"
        return label if self.namespace is None else f"{label} in namespace {self.namespace}"

    def starts_at_detected_end(self, encoding: Encoding) -> bool:
        """Whether the streams start at the smallest value ``--format auto`` read (an end of
        the index) instead of querying for one; not for text, whose forms are not ordinals."""
        return not isinstance(self.format, Encoding) and not encoding.needs_values


# -- --config FILE: several targets swept one after another, from a TOML file (reference.md) ---
# Every key is checked here, once, so a typo fails the run before anything is touched.


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
_NUMBER = Holds((int, float), "number", float, "number")
_TIME = f'string: a duration, `"0"` or a number followed by {DURATION_UNITS}, e.g. `"3h"`'
_DURATION_KEY = Holds(str, "string", parse_duration, _TIME)
_FORMAT = "string: " + ", ".join(f"`{c}`" for c in FORMAT_CHOICES)
_DATABASE_ID = 'string: a database id, e.g. `"sessions"`, or `"(default)"`'


@dataclass(frozen=True)
class Key:
    """A key a target may set: its :class:`SweepSettings` field (its option's keyword) and what
    it holds. Its option given explicitly too is a usage error, unless ``overrides``: then the
    option wins, but ``safe`` wins whichever side sets it. ``required``: no default counts."""

    field: str
    holds: Holds
    required: bool = False
    overrides: bool = False
    safe: object = None


# The keys, in the order messages and docs list them.
KEYS: dict[str, Key] = {
    "kind": Key("kind", _STR, required=True),
    "property": Key("prop", _STR),
    "format": Key("format", Holds(str, "string", parse_format, _FORMAT)),
    "grace": Key("grace", _DURATION_KEY),
    "namespace": Key("namespace", _STR),
    "database": Key("database", Holds(str, "string", check_database, _DATABASE_ID)),
    "max_deletes": Key("max_deletes", _INT, overrides=True),
    "max_runtime": Key("max_runtime", _DURATION_KEY, overrides=True),
    "batch_size": Key("batch_size", _INT, overrides=True),
    # The first run over a backlog, with the CronJob's own file: --max-fraction 1 for once.
    "max_fraction": Key("max_fraction", _NUMBER, overrides=True),
    # A refreshed session is never lost because one side said no.
    "verify": Key("verify", _BOOL, overrides=True, safe=True),
    "scan": Key("scan", _BOOL),
    "all_namespaces": Key("all_namespaces", _BOOL),
    "with_descendants": Key("with_descendants", _BOOL),
    "allow_empty": Key("allow_empty", _BOOL),
}
_BY_FIELD = {k.field: k for k in KEYS.values()}
_REQUIRED = {key.field: name for name, key in KEYS.items() if key.required}


def flag(key: str) -> str:
    """The option a ``KEYS`` key stands for, e.g. ``--max-deletes`` for ``max_deletes``."""
    return "--" + key.replace("_", "-")


# Options that only make sense for the whole run, not per target: a file setting one is told so.
RUN_WIDE = ("project", "dry_run")


def load_targets(
    path: Path, base: dict[str, Any], explicit: dict[str, Any] | None = None
) -> list[SweepSettings]:
    """One validated :class:`SweepSettings` per ``[[target]]``.

    Precedence, highest first: ``explicit`` (the command line's explicit values), the target's
    keys, ``[defaults]``, then ``base`` less the required keys. Each value ``explicit`` overrides
    is logged: nothing in the file is dropped silently.
    """
    try:
        with path.open("rb") as stream:
            document = tomllib.load(stream)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path}: invalid TOML: {exc}") from None
    unknown = set(document) - {"defaults", "target"}
    if unknown:
        raise UsageError(f"config {path}: unknown table(s) {', '.join(sorted(unknown))}")
    targets = document.get("target")
    if not isinstance(targets, list) or not targets:
        raise UsageError(f"config {path}: no [[target]] tables")
    base = {n: v for n, v in base.items() if n not in _REQUIRED}
    tables = [("[defaults]", document.get("defaults", {}))]
    tables += [(f"target {number}", table) for number, table in enumerate(targets, start=1)]
    defaults: dict[str, Any] = {}
    settings = []
    for where, table in tables:
        try:  # every refusal names the file and the table
            from_file = {**defaults, **_fields(table)}
            if where == "[defaults]":
                defaults = from_file
                continue
            settings.append(_target(where, from_file, base, explicit or {}))
        except UsageError as exc:
            raise UsageError(f"config {path}: {where}: {exc.message}") from None
    return settings


def _target(
    where: str, from_file: dict[str, Any], base: dict[str, Any], explicit: dict[str, Any]
) -> SweepSettings:
    """One target's settings, the command line's explicit values applied over its file's."""
    for field_name, name in _REQUIRED.items():
        if field_name not in from_file:
            raise UsageError(f"{name} is required")
    merged = {**base, **from_file, **explicit}
    for name, value in explicit.items():
        if name not in from_file or from_file[name] == value:
            continue
        safe = _BY_FIELD[name].safe  # a name in from_file is a key's field
        merged[name] = safe if safe is not None and safe in (value, from_file[name]) else value
        structlog.get_logger("sweeper.config").warning(
            "option_overridden",
            target=where,
            option=name,
            file=from_file[name],
            command_line=value,
            used=merged[name],
        )
    return SweepSettings(**merged)


def _fields(table: object) -> dict[str, Any]:
    """A table's keys as settings fields, each value checked and converted."""
    if not isinstance(table, dict):
        raise UsageError("must be a table")
    fields: dict[str, Any] = {}
    for name, value in table.items():
        if name in RUN_WIDE:
            raise UsageError(f"{name} applies to the whole run; pass it on the command line")
        if name not in KEYS:
            raise UsageError(f"unknown key {name!r} (known: {', '.join(KEYS)})")
        holds = KEYS[name].holds
        if not isinstance(value, holds.accepts) or (
            holds.accepts is not bool and isinstance(value, bool)
        ):
            raise UsageError(f"{name} must be a {holds.name}, not {value!r}")
        fields[KEYS[name].field] = holds.convert(value)
    return fields
