"""Shared click options: each settable as ``SWEEPER_<NAME>``, declared once, shown in --help."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

import click

from sweeper.errors import SweeperError
from sweeper.logs import LOG_LEVELS
from sweeper.settings import (
    DEFAULT_GRACE,
    DEFAULT_KIND,
    DEFAULT_MAX_FRACTION,
    DEFAULT_PROPERTY,
    DEFAULT_WORKERS,
    FORMAT_CHOICES,
    MAX_BATCH_SIZE,
    MAX_WORKERS,
    parse_duration,
)

F = TypeVar("F", bound=Callable[..., Any])


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


def option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """A click option that can also be set as ``SWEEPER_<NAME>``, shown in ``--help``."""
    name = next(d for d in decls if d.startswith("--"))[2:].split("/")[0]
    attrs.setdefault("envvar", "SWEEPER_" + name.upper().replace("-", "_"))
    return click.option(*decls, show_envvar=True, **attrs)


def stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Apply options in the order listed (the order ``--help`` shows them)."""

    def apply(fn: F) -> F:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


# Where to sweep. Shared by every command that reads or deletes.
target_options = stack(
    option(
        "--project",
        envvar=["SWEEPER_PROJECT", "DATASTORE_PROJECT_ID", "GOOGLE_CLOUD_PROJECT"],
        help="Google Cloud project. Default: the client's (ADC) project.",
    ),
    option("--database", help="Named database. Default: the (default) database."),
    option("--namespace", help="Namespace. Default: the default namespace."),
    option("--kind", default=DEFAULT_KIND, show_default=True, help="Kind to sweep."),
    option(
        "--property",
        "prop",
        default=DEFAULT_PROPERTY,
        show_default=True,
        help="Indexed property that holds the expiry.",
    ),
    option(
        "--format",
        "fmt",
        type=click.Choice(FORMAT_CHOICES),
        default="auto",
        show_default=True,
        help="How the expiry is stored. 'auto' reads the stored values and refuses if it "
        "finds more than one encoding or values it cannot read; an explicit format leaves "
        "values of every other encoding alone.",
    ),
)

log_options = stack(
    option(
        "--log-format",
        type=click.Choice(["json", "console"]),
        default=None,
        help="json: one object per line with severity (Cloud Logging). "
        "Default: console on a terminal, json otherwise.",
    ),
    option(
        "--log-level",
        type=click.Choice(LOG_LEVELS),
        default="info",
        show_default=True,
        help="Least severe event to log.",
    ),
)

# How a sweep runs: `sweep` takes these, and `inspect` takes them to forecast a sweep. One
# spec each (type, default, metavar); each command words its own help.
RUN_OPTIONS: dict[str, dict[str, Any]] = {
    "--batch-size": {
        "type": click.IntRange(1, MAX_BATCH_SIZE),
        "default": MAX_BATCH_SIZE,
        "show_default": True,
    },
    "--verify/--no-verify": {"default": None},
    "--workers": {
        "type": click.IntRange(1, MAX_WORKERS),
        "default": DEFAULT_WORKERS,
        "show_default": True,
    },
    "--ramp-up/--no-ramp-up": {"default": None},
    "--max-rate": {"type": click.FloatRange(min=0, min_open=True), "metavar": "OPS"},
    "--max-fraction": {
        "type": click.FloatRange(0, 1, min_open=True),
        "default": DEFAULT_MAX_FRACTION,
        "show_default": True,
        "metavar": "SHARE",
    },
}


def run_option(decl: str, help: str) -> Callable[[F], F]:
    return option(decl, help=help, **RUN_OPTIONS[decl])


# What `sweep` does with a target, and how it runs.
sweep_options = stack(
    option(
        "--grace",
        type=DURATION,
        default=DEFAULT_GRACE,
        show_default=True,
        help="Delete only entities expired longer ago than this (0, 90s, 15m, 3h, 2d).",
    ),
    run_option(
        "--batch-size",
        help="Keys per delete commit (Datastore allows at most 500).",
    ),
    option(
        "--dry-run",
        is_flag=True,
        help="Run the same queries, delete nothing, report what would go.",
    ),
    run_option(
        "--verify/--no-verify",
        help="Re-read each batch in a transaction and delete only entities still expired, so "
        "a session refreshed mid-run is never lost. Costs one entity read per key. Default: "
        "on where the database does not report its time (the legacy Datastore emulator, "
        "whose queries are eventually consistent), off on Firestore in Datastore mode.",
    ),
    option(
        "--scan",
        is_flag=True,
        help="For an expiry excluded from indexes, which no range query can see: read every "
        "entity of the kind and delete those expired. Costs one billed read per entity; needs "
        "an explicit --format.",
    ),
    option(
        "--config",
        type=click.Path(dir_okay=False),
        help="TOML file listing several targets to sweep one after another ([[target]] "
        "tables; see the README). Per-target options then go in the file.",
    ),
    run_option(
        "--workers",
        help="Delete workers, and as many query streams over disjoint slices of the expired "
        "range: overlaps round trips to Datastore.",
    ),
    option(
        "--shard",
        metavar="I/N",
        default="0/1",
        show_default=True,
        help="Sweep only shard I of N (0-based) of the expired range, for N pods clearing a "
        "backlog together (e.g. an Indexed Job's $(JOB_COMPLETION_INDEX)/N). Shards never "
        "overlap; the ramp-up budget is split N ways.",
    ),
    run_option(
        "--ramp-up/--no-ramp-up",
        help="Respect Datastore's 500/50/5 rule: start at 500 deletes/s (divided among shards) "
        "and grow 50% every 5 minutes. Default: on, off when DATASTORE_EMULATOR_HOST is set.",
    ),
    run_option(
        "--max-rate",
        help="Never delete faster than this many entities per second.",
    ),
    option(
        "--pushgateway",
        metavar="URL",
        help="Also push each target's counts and last-success time to this Prometheus "
        "Pushgateway (e.g. http://pushgateway:9091). A failed push is logged as a warning and "
        "does not change the exit code.",
    ),
    run_option(
        "--max-fraction",
        help="Refuse a run that would delete more than this share of the entities carrying the "
        "property (a wrong --property or --grace looks like that). 1 turns the guard off, e.g. "
        "for a first run over a large backlog.",
    ),
    option(
        "--yes",
        is_flag=True,
        help="On a terminal, delete without showing the plan and asking first. Without a "
        "terminal (a CronJob, CI) nothing asks.",
    ),
    option(
        "--max-deletes",
        type=click.IntRange(min=1),
        help="Stop cleanly after this many deletes; the next run resumes.",
    ),
    option(
        "--max-runtime",
        type=DURATION,
        help="Stop cleanly after this long (e.g. 10m); the next run resumes.",
    ),
)

# What `inspect` looks at.
inspect_options = stack(
    option(
        "--grace",
        type=DURATION,
        default=DEFAULT_GRACE,
        show_default=True,
        help="The same grace as the sweep you plan, so the count matches it.",
    ),
    option("--scan", is_flag=True, help="Report as for a sweep with --scan."),
    # How the forecast sweep runs: the same options (and variables) as `sweep`'s.
    run_option(
        "--workers",
        help="Forecast a sweep with this many --workers.",
    ),
    run_option(
        "--batch-size",
        help="Forecast a sweep with this --batch-size.",
    ),
    run_option(
        "--verify/--no-verify",
        help="Forecast a sweep with or without --verify. Default: as the sweep decides, on "
        "where the database reports no read time (the legacy Datastore emulator).",
    ),
    option(
        "--shards",
        type=click.IntRange(1, 10_000),
        default=1,
        show_default=True,
        metavar="N",
        help="Forecast N pods sweeping together (--shard 0/N to N-1/N): the whole backlog, "
        "each pod's share of the ramp-up budget.",
    ),
    run_option(
        "--ramp-up/--no-ramp-up",
        help="Forecast under Datastore's 500/50/5 ramp-up. Default: as the sweep's, on, off "
        "when DATASTORE_EMULATOR_HOST is set.",
    ),
    run_option(
        "--max-rate",
        help="Forecast a sweep capped at this many deletes per second.",
    ),
    run_option(
        "--max-fraction",
        help="Forecast a sweep with this --max-fraction: below 1 its guard counts first, and "
        "the forecast says whether the guard would refuse the run.",
    ),
    option(
        "--sample-size",
        type=click.IntRange(1, 1000),
        default=200,
        show_default=True,
        help="Entities looked up to count the encodings present (one read each).",
    ),
    option(
        "--count-limit",
        type=click.IntRange(min=1),
        default=100_000,
        show_default=True,
        help="Where aggregation COUNT is unavailable, stop counting keys here.",
    ),
    option(
        "--output",
        type=click.Choice(["table", "json"]),
        default=None,
        help="Default: a table on a terminal, JSON otherwise.",
    ),
)
