"""Every option of ``sweeper sweep`` and ``sweeper inspect``, each declared once in :data:`OPTIONS`.

One :class:`Option` says all there is about an option: its flag, the click type, default and
help of each command that takes it, the :class:`SweepSettings` field it sets, and whether (and
how) a ``--config`` file may set it. Built from the table: both commands' click options (each
also settable as ``SWEEPER_<NAME>``, shown in ``--help``), the settings a command's values make
(:func:`settings_fields`), the clash check with ``--config`` (cli.py), the keys a config file
knows (config.py), the refusal of a variable set but empty (:class:`OptionsCommand`), and the
reference in docs/options.md (:func:`reference`, run by ``make cog``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import click

from sweeper.errors import SweeperError
from sweeper.logs import LOG_LEVELS
from sweeper.metrics import check_url
from sweeper.settings import (
    DEFAULT_GRACE,
    DEFAULT_KIND,
    DEFAULT_MAX_FRACTION,
    DEFAULT_PROPERTY,
    DEFAULT_WORKERS,
    FORMAT_CHOICES,
    MAX_BATCH_SIZE,
    MAX_WORKERS,
    decide_ramp_up,
    parse_duration,
    parse_format,
)
from sweeper.slices import MAX_SHARDS, Shard

F = TypeVar("F", bound=Callable[..., Any])

SWEEP = "sweep"
INSPECT = "inspect"
COMMANDS = (SWEEP, INSPECT)


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
                f"{value!r} is not a finite number in the range {_describe_range(self)}.",
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
TOML_DURATION = TomlType(str, "string", parse_duration, 'string: a duration, e.g. `"3h"`')
TOML_FORMAT = TomlType(
    str, "string", parse_format, "string: " + ", ".join(f"`{c}`" for c in FORMAT_CHOICES)
)


class _Unset(Enum):
    UNSET = "unset"


_UNSET = _Unset.UNSET


def _same(value: Any) -> Any:
    return value


def _none_if_empty(value: str | None) -> str | None:
    return value or None


def _pods(count: int) -> Shard:
    """``inspect --shards N``: forecast the first of N pods sweeping together."""
    return Shard(0, count)


@dataclass(frozen=True, eq=False)
class Option:
    """One option: everything about it, for every command that takes it.

    The table's order is ``sweep --help``'s, and every other command's too except where
    ``follows`` says otherwise. Its variable is ``SWEEPER_<KEY>`` (then ``envvars``).
    """

    flag: str  # "--kind"; a switch: "--verify/--no-verify"
    help: Mapping[str, str]  # each command that takes the option -> its help there
    # How click parses it. ``name``: the keyword the command gets when not the flag's
    # (--property: prop). No ``default``: click's own (none; off for a flag).
    name: str | None = None
    type: click.ParamType[Any, Any] | None = None
    default: Any = _UNSET
    show_default: bool = False
    metavar: str | None = None
    is_flag: bool = False
    envvars: tuple[str, ...] = ()  # read after SWEEPER_<KEY>
    follows: Mapping[str, str] = field(default_factory=dict)  # command -> the flag it follows
    # The SweepSettings field the option sets (None: none), and how from click's value.
    sets: str | None = None
    to_setting: Callable[[Any], Any] = _same
    # --config. A target may set the option when ``toml`` says what its key (``key``) holds.
    # Given explicitly on the command line (or by its variable) as well, it is then a usage
    # error; unless ``overrides``: then the command line's value wins for every target (logged
    # where it replaces the file's), but ``safe`` wins whichever side sets it. ``required``:
    # every target must name it, the command line's default does not count. ``key_order``:
    # where messages and docs list the key (None: after the others, in table order).
    toml: TomlType | None = None
    overrides: bool = False
    safe: object = None
    required: bool = False
    key_order: int | None = None
    # Not in a file, which is told it applies to the whole run (rather than "unknown key").
    run_wide: bool = False

    @property
    def primary(self) -> str:
        """The flag that turns the option on: ``--verify`` for ``--verify/--no-verify``."""
        return self.flag.split("/")[0]

    @property
    def key(self) -> str:
        """Its name without dashes: the ``--config`` key, and ``SWEEPER_<KEY>`` upper-cased."""
        return self.primary[2:].replace("-", "_")

    @property
    def param(self) -> str:
        """The name click passes the value under (and ``ctx.get_parameter_source`` takes)."""
        return self.name or self.key

    @property
    def envvar(self) -> str:
        return "SWEEPER_" + self.key.upper()

    @property
    def per_target(self) -> bool:
        """With ``--config`` it belongs in the file: the command line setting it is an error."""
        return self.toml is not None and not self.overrides

    def click_option(self, command: str) -> Callable[[F], F]:
        attrs: dict[str, Any] = {
            "envvar": [self.envvar, *self.envvars] if self.envvars else self.envvar,
            "show_envvar": True,
            "help": self.help[command],
        }
        if self.type is not None:
            attrs["type"] = self.type
        if self.default is not _UNSET:
            attrs["default"] = self.default
        if self.show_default:
            attrs["show_default"] = True
        if self.metavar is not None:
            attrs["metavar"] = self.metavar
        if self.is_flag:
            attrs["is_flag"] = True
        decls = (self.flag, self.name) if self.name else (self.flag,)
        return click.option(*decls, **attrs)


def every(text: str) -> dict[str, str]:
    """The same help in every command."""
    return dict.fromkeys(COMMANDS, text)


# Every option of both commands, in `sweep --help` order. `inspect` lists those it takes in the
# same order, but where `follows` says. A new option: one entry here (and its SweepSettings field
# if it sets one), then `make cog` for docs/options.md.
OPTIONS: tuple[Option, ...] = (
    # Where to sweep. Shared by every command that reads or deletes.
    Option(
        "--project",
        every("Google Cloud project. Default: the client's (ADC) project."),
        envvars=("DATASTORE_PROJECT_ID", "GOOGLE_CLOUD_PROJECT"),
        sets="project",
        to_setting=_none_if_empty,
        run_wide=True,
    ),
    Option(
        "--database",
        every("Named database. Default: the (default) database."),
        sets="database",
        to_setting=_none_if_empty,
        toml=TOML_STR,
        key_order=6,
    ),
    Option(
        "--namespace",
        every("Namespace. Default: the default namespace."),
        sets="namespace",
        to_setting=_none_if_empty,
        toml=TOML_STR,
        key_order=5,
    ),
    Option(
        "--all-namespaces",
        {
            SWEEP: "Sweep the kind in every namespace of the database (the default one too), "
            "one after another: one sweep_finished each, then one run_finished with the "
            "totals. Guards and caps apply per namespace; --max-runtime to the whole run.",
            INSPECT: "Report on the kind in every namespace of the database, one report each.",
        },
        is_flag=True,
        sets="all_namespaces",
        toml=TOML_BOOL,
    ),
    Option(
        "--kind",
        every("Kind to sweep."),
        default=DEFAULT_KIND,
        show_default=True,
        sets="kind",
        toml=TOML_STR,
        required=True,
        key_order=1,
    ),
    Option(
        "--property",
        every("Indexed property that holds the expiry."),
        name="prop",
        default=DEFAULT_PROPERTY,
        show_default=True,
        sets="prop",
        toml=TOML_STR,
        key_order=2,
    ),
    Option(
        "--format",
        every(
            "How the expiry is stored. 'auto' reads the stored values and refuses if it "
            "finds more than one encoding or values it cannot read; an explicit format leaves "
            "values of every other encoding alone."
        ),
        name="fmt",
        type=click.Choice(FORMAT_CHOICES),
        default="auto",
        show_default=True,
        sets="format",
        to_setting=parse_format,
        toml=TOML_FORMAT,
        key_order=3,
    ),
    # What a command does with the target, and how a sweep runs (`inspect` forecasts one).
    Option(
        "--grace",
        {
            SWEEP: "Delete only entities expired longer ago than this (0, 90s, 15m, 3h, 2d).",
            INSPECT: "The same grace as the sweep you plan, so the count matches it.",
        },
        type=DURATION,
        default=DEFAULT_GRACE,
        show_default=True,
        sets="grace",
        toml=TOML_DURATION,
        key_order=4,
    ),
    Option(
        "--batch-size",
        {
            SWEEP: "Keys per delete commit (Datastore allows at most 500).",
            INSPECT: "Forecast a sweep with this --batch-size.",
        },
        type=click.IntRange(1, MAX_BATCH_SIZE),
        default=MAX_BATCH_SIZE,
        show_default=True,
        sets="batch_size",
        toml=TOML_INT,
        overrides=True,
        key_order=9,
    ),
    Option(
        "--dry-run",
        {SWEEP: "Run the same queries, delete nothing, report what would go."},
        is_flag=True,
        sets="dry_run",
        run_wide=True,
    ),
    Option(
        "--verify/--no-verify",
        {
            SWEEP: "Delete an entity only if a check made atomically with the delete (in the "
            "same transaction) finds it still expired, so a session refreshed or re-created "
            "under its key while the run holds it is never lost. On by default on every "
            "database. --no-verify deletes blindly what the query returned: a session "
            "refreshed, or re-created under an old key, between the query and the delete is "
            "lost; it logs a warning.",
            INSPECT: "Forecast a sweep with or without the check (on by default, as the sweep).",
        },
        # On everywhere: even a strongly consistent query is stale by the time its keys are
        # deleted, so only the transaction's own read can tell a refreshed session apart.
        default=True,
        sets="verify",
        toml=TOML_BOOL,
        overrides=True,
        safe=True,  # a refreshed session is never lost because one side said no
        key_order=11,
    ),
    Option(
        "--scan",
        {
            SWEEP: "For an expiry excluded from indexes, which no range query can see: read "
            "every entity of the kind and delete those expired. Costs one billed read per "
            "entity; needs an explicit --format.",
            INSPECT: "Report as for a sweep with --scan.",
        },
        is_flag=True,
        follows={INSPECT: "--grace"},
        sets="scan",
        toml=TOML_BOOL,
        key_order=12,
    ),
    Option(
        "--with-descendants",
        {
            SWEEP: "Delete each expired session together with the entities under its key (its "
            "entity group: events, messages, state pages), in the same commit where they fit; "
            "never those of a session that is not deleted. Costs one ancestor query per session.",
            INSPECT: "Forecast a sweep with --with-descendants (the descendants of expired "
            "sessions are sampled either way).",
        },
        is_flag=True,
        follows={INSPECT: "--max-fraction"},
        sets="with_descendants",
        toml=TOML_BOOL,
    ),
    Option(
        "--config",
        {
            SWEEP: "TOML file listing several targets to sweep one after another ([[target]] "
            "tables; see docs/reference.md). Per-target options then go in the file."
        },
        type=click.Path(dir_okay=False),
    ),
    Option(
        "--workers",
        {
            SWEEP: "Query streams over disjoint slices of the expired range, each feeding "
            "two delete workers: overlaps round trips to Datastore.",
            INSPECT: "Forecast a sweep with this many --workers.",
        },
        type=click.IntRange(1, MAX_WORKERS),
        default=DEFAULT_WORKERS,
        show_default=True,
        follows={INSPECT: "--scan"},
        sets="workers",
    ),
    Option(
        "--shard",
        {
            SWEEP: "Sweep only shard I of N (0-based) of the expired range, for N pods clearing "
            "a backlog together (e.g. an Indexed Job's $(JOB_COMPLETION_INDEX)/N). Shards never "
            "overlap; the ramp-up budget is split N ways."
        },
        type=SHARD,
        metavar="I/N",
        default="0/1",
        show_default=True,
        sets="shard",
    ),
    Option(
        "--shards",
        {
            INSPECT: "Forecast N pods sweeping together (--shard 0/N to N-1/N): the whole "
            "backlog, each pod's share of the ramp-up budget."
        },
        type=click.IntRange(1, MAX_SHARDS),
        default=1,
        show_default=True,
        metavar="N",
        sets="shard",
        to_setting=_pods,
    ),
    Option(
        "--ramp-up/--no-ramp-up",
        {
            SWEEP: "Respect Datastore's 500/50/5 rule: start at 500 deletes/s (divided among "
            "shards) and grow 50% every 5 minutes. Default: on, off when "
            "DATASTORE_EMULATOR_HOST is set.",
            INSPECT: "Forecast under Datastore's 500/50/5 ramp-up. Default: as the sweep's, on, "
            "off when DATASTORE_EMULATOR_HOST is set.",
        },
        default=None,
        sets="ramp_up",
        to_setting=decide_ramp_up,
    ),
    Option(
        "--max-rate",
        {
            SWEEP: "Never delete faster than this many entities per second.",
            INSPECT: "Forecast a sweep capped at this many deletes per second.",
        },
        type=FiniteFloatRange(min=0, min_open=True),
        metavar="OPS",
        sets="max_rate",
    ),
    Option(
        "--pushgateway",
        {
            SWEEP: "Also push each target's counts and last-success time to this Prometheus "
            "Pushgateway (e.g. http://pushgateway:9091). A failed push is logged as a warning "
            "and does not change the exit code."
        },
        type=PushgatewayUrl(),
        metavar="URL",
    ),
    Option(
        "--pushgateway-user",
        {SWEEP: "User name for a Pushgateway behind HTTP basic auth (with the password file)."},
        metavar="NAME",
    ),
    Option(
        "--pushgateway-password-file",
        {
            SWEEP: "File holding that user's password (e.g. a mounted Secret); read before the "
            "run starts, never logged."
        },
        type=click.Path(dir_okay=False),
        metavar="PATH",
    ),
    Option(
        "--max-fraction",
        {
            SWEEP: "Refuse a run that would delete more than this share of the entities "
            "carrying the property (a wrong --property or --grace looks like that). 1 turns "
            "the guard off, e.g. for a first run over a large backlog.",
            INSPECT: "Forecast a sweep with this --max-fraction: below 1 its guard counts "
            "first, and the forecast says whether the guard would refuse the run.",
        },
        type=FiniteFloatRange(0, 1, min_open=True),
        default=DEFAULT_MAX_FRACTION,
        show_default=True,
        metavar="SHARE",
        sets="max_fraction",
        toml=TOML_NUMBER,
        key_order=10,
    ),
    Option(
        "--yes",
        {
            SWEEP: "On a terminal, delete without showing the plan and asking first. Without a "
            "terminal (a CronJob, CI) nothing asks."
        },
        is_flag=True,
    ),
    Option(
        "--max-deletes",
        {SWEEP: "Stop cleanly after this many deletes; the next run resumes."},
        type=click.IntRange(min=1),
        sets="max_deletes",
        toml=TOML_INT,
        key_order=7,
    ),
    Option(
        "--max-runtime",
        {SWEEP: "Stop cleanly after this long (e.g. 10m); the next run resumes."},
        type=DURATION,
        sets="max_runtime",
        toml=TOML_DURATION,
        key_order=8,
    ),
    Option(
        "--give-up-after",
        every(
            "How long to ride out a database that stopped answering (every call failing or "
            "hanging) before the run fails with exit 1; retries back off meanwhile."
        ),
        type=DURATION,
        default="60s",
        show_default=True,
    ),
    # What `inspect` looks at, and how it reports.
    Option(
        "--sample-size",
        {INSPECT: "Entities looked up to count the encodings present (one read each)."},
        type=click.IntRange(1, 1000),
        default=200,
        show_default=True,
    ),
    Option(
        "--count-limit",
        {INSPECT: "Where aggregation COUNT is unavailable, stop counting keys here."},
        type=click.IntRange(min=1),
        default=100_000,
        show_default=True,
    ),
    Option(
        "--output",
        {INSPECT: "Default: a table on a terminal, JSON otherwise."},
        type=click.Choice(["table", "json"]),
        default=None,
    ),
    # Logs.
    Option(
        "--log-format",
        every(
            "json: one object per line with severity (Cloud Logging). "
            "Default: console on a terminal, json otherwise."
        ),
        type=click.Choice(["json", "console"]),
        default=None,
    ),
    Option(
        "--log-level",
        every("Least severe event to log."),
        type=click.Choice(LOG_LEVELS),
        default="info",
        show_default=True,
    ),
)


def options_of(command: str) -> tuple[Option, ...]:
    """The options ``command`` takes, in the order its ``--help`` lists them."""
    taken = [o for o in OPTIONS if command in o.help]
    ordered = [o for o in taken if command not in o.follows]
    for moved in (o for o in taken if command in o.follows):
        (anchor,) = [o for o in ordered if o.flag == moved.follows[command]]
        ordered.insert(ordered.index(anchor) + 1, moved)
    return tuple(ordered)


def command_options(command: str) -> Callable[[F], F]:
    """Decorate ``command``'s function with its click options, in ``--help`` order."""

    def apply(fn: F) -> F:
        for option in reversed(options_of(command)):
            fn = option.click_option(command)(fn)
        return fn

    return apply


class OptionsCommand(click.Command):
    """A command whose options come from :data:`OPTIONS`: it also checks their variables.

    The check runs once the arguments are parsed (which touches nothing, and lets ``--help``
    answer first) and before the command's function: no Datastore call precedes it.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.resilient_parsing:  # shell completion: nothing will run
            return super().parse_args(ctx, args)
        try:
            rest = super().parse_args(ctx, args)
        except click.UsageError:
            # A blank variable may be why parsing failed (" " is no number): name it instead.
            check_environment(str(self.name))
            raise
        check_environment(str(self.name))
        return rest


def check_environment(command: str) -> None:
    """Refuse a ``SWEEPER_*`` variable of ``command``'s options that is set but blank.

    click reads an empty variable as unset and falls back to the default, so ``SWEEPER_KIND=``
    (a value a manifest or a template lost) would sweep the default kind. Blank is never a
    value, whether or not the command line gives the option too. Only an option's own variable
    is checked: its fallbacks (``DATASTORE_PROJECT_ID``, ``GOOGLE_CLOUD_PROJECT``) belong to
    the Google client's conventions, where empty means unset.
    """
    blank = [o.envvar for o in options_of(command) if _is_blank(os.environ.get(o.envvar))]
    if len(blank) == 1:
        raise click.UsageError(f"{blank[0]} is set but empty: unset it or give a value")
    if blank:
        raise click.UsageError(
            f"{', '.join(blank)} are set but empty: unset them or give them values"
        )


def _is_blank(value: str | None) -> bool:
    """Set, but to nothing a value could be read from."""
    return value is not None and not value.strip()


def settings_fields(command: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`SweepSettings` fields that ``command``'s parsed options set."""
    return {
        o.sets: o.to_setting(values[o.param]) for o in options_of(command) if o.sets is not None
    }


def file_options() -> tuple[Option, ...]:
    """The options a ``--config`` target may set, in the order their keys are listed."""
    keyed = [o for o in OPTIONS if o.toml is not None]
    return tuple(sorted(keyed, key=lambda o: len(OPTIONS) if o.key_order is None else o.key_order))


def run_wide_options() -> tuple[Option, ...]:
    """The options a ``--config`` file is told apply to the whole run."""
    return tuple(o for o in OPTIONS if o.run_wide)


# --- docs/options.md (generated: `make cog`) -------------------------------------------------


def reference(command: click.Command) -> str:
    """``command``'s options as a markdown table: flag, variables, default, help."""
    ctx = click.Context(command, info_name=command.name)
    rows = ["| option | env var | default | description |", "|---|---|---|---|"]
    for param in command.params:
        record = param.get_help_record(ctx)
        if not isinstance(param, click.Option) or record is None:
            continue
        envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
        description = param.help or ""
        if isinstance(param.type, click.IntRange | click.FloatRange):
            description += f" Range: `{_describe_range(param.type)}`."
        rows.append(
            _row(
                f"`{record[0]}`",
                ", ".join(f"`{v}`" for v in envvars if v),
                _default(param),
                description,
            )
        )
    return "\n".join(rows) + "\n"


def config_reference() -> str:
    """The keys of a ``--config`` file as a markdown table, then those it refuses."""
    rows = [
        "| key | holds | option | the option given on the command line (or its variable) too |",
        "|---|---|---|---|",
    ]
    for option in file_options():
        key = f"`{option.key}`" + (" (required in every target)" if option.required else "")
        if option.overrides:
            rule = "wins over every target's value, logged as `option_overridden`"
            if option.safe is not None:
                rule += f"; but `{json.dumps(option.safe)}` wins, whoever sets it"
        else:
            rule = "a usage error"
        holds = option.toml.doc if option.toml else ""
        rows.append(_row(key, holds, f"`{option.primary}`", rule))
    run_wide = " and ".join(f"`{o.key}`" for o in run_wide_options())
    return (
        "\n".join(rows)
        + f"\n\n{run_wide} apply to the whole run: a file that sets one is refused. The other "
        "options of `sweep` are not keys either; like those, they come from the command line "
        "or the environment and apply to every target.\n"
    )


def _default(param: click.Option) -> str:
    if param.is_flag and param.default is True:
        return "on"
    if param.show_default and param.default not in (None, ""):
        return f"`{param.default}`"
    if param.is_flag and not param.secondary_opts:
        return "off"
    return "—"  # none, or decided at run time: the description says


def _describe_range(bounds: click.IntRange | click.FloatRange) -> str:
    """As ``--help`` shows it: ``1<=x<=500``, ``x>0``."""
    if bounds.max is None:
        return f"x{'>' if bounds.min_open else '>='}{bounds.min}"
    high = f"{'<' if bounds.max_open else '<='}{bounds.max}"
    if bounds.min is None:
        return f"x{high}"
    return f"{bounds.min}{'<' if bounds.min_open else '<='}x{high}"


def _row(*cells: str) -> str:
    """A markdown table row; a ``|`` inside a cell (``[json|console]``) is escaped."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
