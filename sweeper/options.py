"""The options of ``sweeper sweep`` and ``sweeper inspect``, each also ``SWEEPER_<NAME>``. An
option's keyword is the :class:`SweepSettings` field it sets, if any (:func:`settings_of`), its
value converted. docs/options.md is their ``--help``."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import click

from sweeper.logs import LOG_LEVELS, SweeperError
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
    Shard,
    SweepSettings,
    check_database,
    parse_duration,
    parse_format,
)

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]


class Parsed(click.ParamType):  # type: ignore[type-arg]
    """A value read by one of sweeper's parsers, whose refusal click reports with the option."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name, self.parse = name, parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # a default already converted
            return value
        try:
            return self.parse(value)
        except SweeperError as exc:
            self.fail(exc.message, param, ctx)


DURATION = Parsed("duration", parse_duration)


class FiniteFloatRange(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` (which passes every bound) and
    ``inf`` (which passes a range open at the top): the run would refuse them only once started."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number in the range {self._describe_range()}.")
        return number


def _option(
    *decls: str, fallbacks: Sequence[str] = (), show_default: bool = True, **attrs: Any
) -> Decorator[Any]:
    """``click.option``, read from ``SWEEPER_<NAME>`` too (then ``fallbacks``), default shown."""
    envvar = ["SWEEPER_" + decls[0].split("/")[0][2:].upper().replace("-", "_"), *fallbacks]
    return click.option(*decls, envvar=envvar, show_envvar=True, show_default=show_default, **attrs)


def _then(convert: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    return lambda ctx, param, value: convert(value)  # a callback: the value into the setting


_none_if_empty = _then(lambda value: value or None)  # "" is no project, no namespace


def decide_ramp_up(choice: bool | None) -> bool:
    """``--ramp-up``/``--no-ramp-up`` when given; else on against production, off against an
    emulator (DATASTORE_EMULATOR_HOST set), which has no key ranges to split."""
    return choice if choice is not None else not os.environ.get("DATASTORE_EMULATOR_HOST")


# -- shared by both commands ----------------------------------------------------------------

PROJECT = _option(
    "--project",
    fallbacks=("DATASTORE_PROJECT_ID", "GOOGLE_CLOUD_PROJECT"),
    callback=_none_if_empty,
    help="Google Cloud project. Default: the client's (ADC) project.",
)
DATABASE = _option(
    "--database",
    type=Parsed("database", check_database),
    metavar="ID",
    help="Named database id (4-63 of a-z, 0-9, -; a letter first). Default: (default).",
)
NAMESPACE = _option(
    "--namespace", callback=_none_if_empty, help="Namespace. Default: the default namespace."
)
KIND = _option("--kind", default=DEFAULT_KIND, help="Kind to sweep.")
PROPERTY = _option(
    "--property", "prop", default=DEFAULT_PROPERTY, help="Indexed property that holds the expiry."
)
FORMAT = _option(
    "--format",
    type=click.Choice(FORMAT_CHOICES),
    default="auto",
    callback=_then(parse_format),
    help="How the expiry is stored. 'auto' reads the stored values and refuses if it finds more "
    "than one encoding or values it cannot read; an explicit format leaves values of every other "
    "encoding alone.",
)
GIVE_UP_AFTER = _option(
    "--give-up-after",
    type=DURATION,
    default="60s",
    help="How long to ride out a database that stopped answering (every call failing or "
    "hanging) before the run fails with exit 1; retries back off meanwhile. Before any call "
    "has succeeded, a refused connection or an unknown host fails at once.",
)
LOG_LEVEL = _option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    help="Least severe event to log. Default: info; for a person at a terminal, warning (the "
    "plan, the progress line and the summary say the rest).",
)

# Shared, with each command's own help.
_log_format = partial(_option, "--log-format", type=click.Choice(["json", "console"]))
_all_namespaces = partial(_option, "--all-namespaces", is_flag=True)
_grace = partial(_option, "--grace", type=DURATION, default=DEFAULT_GRACE)
_batch_size = partial(
    _option, "--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=MAX_BATCH_SIZE
)
# On everywhere: a query is stale by the time its keys go; deleting at the version read is safe
_verify = partial(_option, "--verify/--no-verify", default=True, show_default=False)
_scan = partial(_option, "--scan", is_flag=True)
_with_descendants = partial(_option, "--with-descendants", is_flag=True)
_workers = partial(
    _option, "--workers", type=click.IntRange(1, MAX_WORKERS), default=DEFAULT_WORKERS
)
_ramp_up = partial(_option, "--ramp-up/--no-ramp-up", default=None, callback=_then(decide_ramp_up))
_shard = partial(
    _option, "--shard", type=Parsed("shard", Shard.parse), metavar="I/N", default="0/1"
)
_max_rate = partial(
    _option, "--max-rate", type=FiniteFloatRange(min=0, min_open=True), metavar="OPS"
)
_max_fraction = partial(
    _option,
    "--max-fraction",
    type=FiniteFloatRange(0, 1, min_open=True),
    default=DEFAULT_MAX_FRACTION,
    metavar="SHARE",
)

# -- each command's, in its --help order ----------------------------------------------------

SWEEP: tuple[Decorator[Any], ...] = (
    PROJECT,
    DATABASE,
    NAMESPACE,
    _all_namespaces(
        help="Sweep the kind in every namespace of the database (the default one too), one "
        "after another: one sweep_finished each, then one run_finished with the totals. Guards "
        "and caps apply per namespace; --max-runtime to the whole run."
    ),
    KIND,
    PROPERTY,
    FORMAT,
    _grace(
        help="Delete only entities expired longer ago than this: 0, or a number followed by s, "
        "m, h or d (seconds, minutes, hours, days; lowercase), e.g. 90s, 15m, 3h, 2d, 1h30m."
    ),
    _batch_size(help="Keys per delete commit (Datastore allows at most 500)."),
    _option(
        "--dry-run",
        is_flag=True,
        help="Run the same queries, delete nothing, report what would go.",
    ),
    _verify(
        help="Delete an entity only at the version at which its read saw it expired, all or "
        "nothing a commit, so a session refreshed or re-created under its key while the run "
        "holds it is never lost. On by default on every database. --no-verify deletes blindly "
        "what a keys-only query returned (fewer billed reads): a session refreshed, or "
        "re-created under an old key, in between is lost; it logs a warning."
    ),
    _scan(
        help="For an expiry excluded from indexes, which no range query can see: read every "
        "entity of the kind and delete those expired. Costs one billed read per entity; needs "
        "an explicit --format."
    ),
    _with_descendants(
        help="Delete each expired session together with the entities under its key (its entity "
        "group: events, messages, state pages), in the same commit where they fit; never those "
        "of a session that is not deleted. Costs one ancestor query per session."
    ),
    _option(
        "--config",
        type=click.Path(dir_okay=False),
        help="TOML file listing several targets to sweep one after another ([[target]] tables; "
        "see docs/reference.md). Per-target options then go in the file.",
    ),
    _workers(
        help="Query streams over disjoint slices of the expired range, each feeding a delete "
        "worker: overlaps round trips to Datastore."
    ),
    _shard(
        help="Sweep only shard I of N (0-based) of the expired range, for N pods clearing a "
        "backlog together (e.g. an Indexed Job's $(JOB_COMPLETION_INDEX)/N). Shards never "
        "overlap; the ramp-up budget is split N ways."
    ),
    _ramp_up(
        help="Respect Datastore's 500/50/5 rule: start at 500 deletes/s (divided among shards) "
        "and grow 50% every 5 minutes. Default: on, off when DATASTORE_EMULATOR_HOST is set."
    ),
    _max_rate(help="Never delete faster than this many entities per second, from the first batch."),
    _option(
        "--pushgateway",
        type=Parsed("url", check_url),  # else a bad URL would fail only after the deletes
        metavar="URL",
        help="Also push each target's counts and last-success time to this Prometheus "
        "Pushgateway (e.g. http://pushgateway:9091). A failed push is logged as a warning and "
        "does not change the exit code.",
    ),
    _option(
        "--pushgateway-user",
        metavar="NAME",
        help="User name for a Pushgateway behind HTTP basic auth (with the password file).",
    ),
    _option(
        "--pushgateway-password-file",
        type=click.Path(dir_okay=False),
        metavar="PATH",
        help="File holding that user's password (e.g. a mounted Secret); read before the run "
        "starts, never logged.",
    ),
    _max_fraction(
        help="Refuse a run that would delete more than this share of the entities carrying the "
        "property (a wrong --property or --grace looks like that). 1 turns the guard off, e.g. "
        "for a first run over a large backlog."
    ),
    _option(
        "--allow-empty",
        is_flag=True,
        help="Succeed when nothing carries the property (with --all-namespaces: in any "
        "namespace). Else that fails (exit 1): a misspelt --kind or --property looks like it.",
    ),
    _option(
        "--yes",
        is_flag=True,
        help="Delete without showing the plan and asking first, which a run does whenever stdin "
        "is a terminal. Without a terminal (a CronJob, CI) nothing asks.",
    ),
    _option(
        "--max-deletes",
        type=click.IntRange(min=1),
        help="Stop cleanly after this many deletes; the next run resumes.",
    ),
    _option(
        "--max-runtime",
        type=DURATION,
        help="Stop cleanly after this long (a duration as --grace takes, e.g. 10m); the next run "
        "resumes.",
    ),
    GIVE_UP_AFTER,
    _log_format(
        help="json: one object a line on stderr, with severity. Default: console when stderr is a "
        "terminal, else json."
    ),
    LOG_LEVEL,
    _option(
        "--quiet",
        "-q",
        is_flag=True,
        help="Errors only: no progress line, no summary, no log below error (the question "
        "before deleting is still asked on a terminal, unless --yes).",
    ),
)

INSPECT: tuple[Decorator[Any], ...] = (
    PROJECT,
    DATABASE,
    NAMESPACE,
    _all_namespaces(help="Report on the kind in every namespace of the database, one report each."),
    KIND,
    PROPERTY,
    FORMAT,
    _grace(help="The same grace as the sweep you plan, so the count matches it."),
    _scan(help="Report as for a sweep with --scan."),
    _workers(help="Forecast a sweep with this many --workers."),
    _batch_size(help="Forecast a sweep with this --batch-size."),
    _verify(help="Forecast a sweep with or without the check (on by default, as the sweep)."),
    _shard(
        help="Forecast the N pods of sweep --shard I/N together (I/N as any of them takes it): "
        "the whole backlog, each pod's share of the ramp-up budget."
    ),
    _ramp_up(
        help="Forecast under Datastore's 500/50/5 ramp-up. Default: as the sweep's, on, off when "
        "DATASTORE_EMULATOR_HOST is set."
    ),
    _max_rate(help="Forecast a sweep capped at this many deletes per second."),
    _max_fraction(
        help="Forecast a sweep with this --max-fraction: below 1 its guard counts first, and the "
        "forecast says whether the guard would refuse the run."
    ),
    _with_descendants(
        help="Forecast a sweep with --with-descendants (the descendants of expired sessions are "
        "sampled either way)."
    ),
    GIVE_UP_AFTER,
    _option(
        "--sample-size",
        type=click.IntRange(1, 1000),
        default=200,
        help="Entities looked up to count the encodings present (one read each), spread across "
        "the key space by Datastore's __scatter__ where the database keeps it.",
    ),
    _option(
        "--count-limit",
        type=click.IntRange(min=1),
        default=100_000,
        help="Where aggregation COUNT is unavailable, stop counting keys here.",
    ),
    _log_format(
        help="json: the report as one JSON object on stdout, the logs as JSON lines on stderr; "
        "console: a table and console logs. Default: console when stdout is a terminal, else json.",
    ),
    LOG_LEVEL,
)


def with_options(options: Sequence[Decorator[Any]]) -> Decorator[Any]:
    """Decorate a command's function with ``options``, listed in ``--help`` in that order."""

    def apply(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


_SETTINGS = {f.name for f in dataclasses.fields(SweepSettings)}


def settings_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`SweepSettings` fields among a command's parsed values."""
    return {name: value for name, value in values.items() if name in _SETTINGS}
