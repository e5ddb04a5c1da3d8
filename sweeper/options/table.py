"""The table: every option of ``sweeper sweep`` and ``sweeper inspect``, each declared once.

Data, and the two small conversions it names: some 15 lines an option, most of them the help
each command shows.
"""

from __future__ import annotations

import click

from sweeper.logs import LOG_LEVELS
from sweeper.options.option import INSPECT, SWEEP, Option, every
from sweeper.options.types import (
    DATABASE,
    DURATION,
    SHARD,
    TOML_BOOL,
    TOML_DATABASE,
    TOML_DURATION,
    TOML_FORMAT,
    TOML_INT,
    TOML_NUMBER,
    TOML_STR,
    FiniteFloatRange,
    PushgatewayUrl,
)
from sweeper.settings import (
    DEFAULT_GRACE,
    DEFAULT_KIND,
    DEFAULT_MAX_FRACTION,
    DEFAULT_PROPERTY,
    DEFAULT_WORKERS,
    FORMAT_CHOICES,
    MAX_BATCH_SIZE,
    MAX_SHARDS,
    MAX_WORKERS,
    Shard,
    check_database,
    decide_ramp_up,
    parse_format,
)


def _none_if_empty(value: str | None) -> str | None:
    return value or None


def _pods(count: int) -> Shard:
    """``inspect --shards N``: forecast the first of N pods sweeping together."""
    return Shard(0, count)


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
        every("Named database id (4-63 of a-z, 0-9, -; a letter first). Default: (default)."),
        type=DATABASE,
        metavar="ID",
        sets="database",
        to_setting=check_database,
        toml=TOML_DATABASE,
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
            SWEEP: "Delete only entities expired longer ago than this: 0, or a number followed "
            "by s, m, h or d (seconds, minutes, hours, days; lowercase), e.g. 90s, 15m, 3h, "
            "2d, 1h30m.",
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
            SWEEP: "Delete an entity only at the version at which its read saw it expired, all "
            "or nothing a commit, so a session refreshed or re-created under its key while the "
            "run holds it is never lost. On by default on every database. --no-verify deletes "
            "blindly what a keys-only query returned (fewer billed reads): a session refreshed, "
            "or re-created under an old key, in between is lost; it logs a warning.",
            INSPECT: "Forecast a sweep with or without the check (on by default, as the sweep).",
        },
        # On everywhere: even a strongly consistent query is stale by the time its keys are
        # deleted, so only a delete conditioned on the version read is safe.
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
            "a delete worker: overlaps round trips to Datastore.",
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
        {
            SWEEP: "Stop cleanly after this long (a duration as --grace takes, e.g. 10m); the next "
            "run resumes."
        },
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
        every("json: one object a line, with severity. Default: console on a terminal, else json."),
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
