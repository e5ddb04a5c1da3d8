"""The ``sweeper`` command line: parse, build settings, call the engine, map to exit codes.

No logic lives here beyond that; every option can also be set as ``SWEEPER_<OPTION>``.
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeVar

import click
import structlog
from click.core import ParameterSource
from google.cloud import datastore

from sweeper import __version__
from sweeper.config import load_targets
from sweeper.connect import make_client
from sweeper.engine import Runtime, SweepResult, sweep_targets
from sweeper.errors import (
    EXIT_FAILURE,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    SweeperError,
    UsageError,
    describe_exception,
    one_line,
)
from sweeper.logs import LOG_LEVELS, LogFormat, configure
from sweeper.metrics import MetricsError, push_summary
from sweeper.settings import (
    DEFAULT_GRACE,
    DEFAULT_KIND,
    DEFAULT_PROPERTY,
    FORMAT_CHOICES,
    MAX_BATCH_SIZE,
    SweepSettings,
    parse_duration,
    parse_format,
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
    name = next(d for d in decls if d.startswith("--"))[2:]
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sweeper")
def cli() -> None:
    """Delete expired sessions from Google Cloud Datastore, and nothing else.

    Datastore's TTL policies honour only Timestamp values and lag up to a day; sweeper finds
    entities whose expiry lies in the past with paged keys-only range queries and deletes them
    in batches with retries. Point it at an emulator with DATASTORE_EMULATOR_HOST.
    """


@cli.command()
@target_options
@stack(
    option(
        "--grace",
        type=DURATION,
        default=DEFAULT_GRACE,
        show_default=True,
        help="Delete only entities expired longer ago than this (0, 90s, 15m, 3h, 2d).",
    ),
    option(
        "--batch-size",
        type=click.IntRange(1, MAX_BATCH_SIZE),
        default=MAX_BATCH_SIZE,
        show_default=True,
        help="Keys per delete commit (Datastore allows at most 500).",
    ),
    option(
        "--dry-run",
        is_flag=True,
        help="Run the same queries, delete nothing, report what would go.",
    ),
    option(
        "--verify",
        is_flag=True,
        help="Re-read each batch in a transaction and delete only entities still expired, so "
        "a session refreshed mid-run is never lost. Costs one entity read per key.",
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
    option(
        "--pushgateway",
        metavar="URL",
        help="Also push each target's counts and last-success time to this Prometheus "
        "Pushgateway (e.g. http://pushgateway:9091). A failed push is logged as a warning and "
        "does not change the exit code.",
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
@log_options
def sweep(**options: Any) -> None:
    """Delete the entities of one kind whose expiry lies before now minus --grace.

    The cutoff is computed once per run and logged. The query range is bounded on both sides
    inside the chosen encoding, so null, missing and differently-encoded expiries are never
    matched. Exit codes: 0 done (also when nothing was due), 1 failure or refusal,
    2 bad usage, 130/143 stopped by SIGINT/SIGTERM.

    \b
    Examples:
      # What would go from the runner's session store, with its 3 h grace:
      sweeper sweep --kind eq-session --grace 3h --dry-run
      # Delete, at most 100000 entities or 10 minutes per run:
      sweeper sweep --kind eq-session --grace 3h --max-deletes 100000 --max-runtime 10m
      # Against a local emulator:
      DATASTORE_EMULATOR_HOST=127.0.0.1:8081 sweeper sweep --project demo --format epoch-seconds
    """
    ctx = click.get_current_context()
    targets = _targets(ctx, options)
    log_format: LogFormat = options["log_format"] or ("console" if sys.stdout.isatty() else "json")
    configure(log_format, options["log_level"])
    line = _ProgressLine(sys.stderr) if log_format == "console" and sys.stderr.isatty() else None
    with _StopOnSignal() as stop:
        runtime = Runtime(stop_requested=stop.is_set, on_progress=line.show if line else None)
        results = sweep_targets(
            targets, _client_for, runtime, overall=options["config"] is not None
        )
    if options["pushgateway"]:
        _push_metrics(options["pushgateway"], results)
    if any(r.stopped_reason == "signal" for r in results):
        raise click.exceptions.Exit(stop.exit_code)
    failed = [r for r in results if r.error is not None]
    if len(failed) == 1 and len(results) == 1:
        raise SweeperError(failed[0].error or "")
    if failed:
        raise SweeperError(
            f"{len(failed)} of {len(results)} targets failed; first: "
            f"{failed[0].settings.kind}.{failed[0].settings.prop}: {failed[0].error}"
        )


# Options that describe one target: with --config they belong in the file.
_PER_TARGET = {
    "kind": "--kind",
    "prop": "--property",
    "fmt": "--format",
    "grace": "--grace",
    "namespace": "--namespace",
    "database": "--database",
    "max_deletes": "--max-deletes",
    "max_runtime": "--max-runtime",
    "scan": "--scan",
}


def _targets(ctx: click.Context, options: dict[str, Any]) -> list[SweepSettings]:
    values: dict[str, Any] = {
        "kind": options["kind"],
        "prop": options["prop"],
        "format": parse_format(options["fmt"]),
        "grace": options["grace"],
        "batch_size": options["batch_size"],
        "dry_run": options["dry_run"],
        "verify": options["verify"],
        "scan": options["scan"],
        "max_deletes": options["max_deletes"],
        "max_runtime": options["max_runtime"],
        "project": options["project"] or None,
        "database": options["database"] or None,
        "namespace": options["namespace"] or None,
    }
    if options["config"] is None:
        return [SweepSettings(**values)]
    explicit = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    clashing = [
        flag for name, flag in _PER_TARGET.items() if ctx.get_parameter_source(name) in explicit
    ]
    if clashing:
        raise UsageError(
            f"{', '.join(clashing)} cannot be combined with --config: "
            "set it in the file, per target or under [defaults]"
        )
    values.pop("kind")
    return load_targets(Path(options["config"]), values)


def _push_metrics(url: str, results: list[SweepResult]) -> None:
    for result in results:
        try:
            push_summary(url, result.summary())
        except MetricsError as exc:
            structlog.get_logger("sweeper").warning("metrics_push_failed", error=exc.message)


def _client_for(settings: SweepSettings) -> datastore.Client:
    return make_client(settings.project, settings.database, settings.namespace)


class _ProgressLine:
    """A live line on an interactive terminal: deleted so far, rate, elapsed."""

    def __init__(self, stream: TextIO, every_s: float = 0.5) -> None:
        self._stream, self._every_s, self._last = stream, every_s, 0.0
        self._shown = False

    def show(self, result: SweepResult, elapsed_s: float, finished: bool) -> None:
        if not finished and elapsed_s - self._last < self._every_s:
            return
        self._last = elapsed_s
        if finished and not self._shown:
            return  # a run too short for a live line needs none
        done = result.matched if result.settings.dry_run else result.deleted
        verb = "would delete" if result.settings.dry_run else "deleted"
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        end = "\n" if finished else ""
        self._stream.write(
            f"\r{result.settings.kind}: {verb} {done} ({rate:.0f}/s), "
            f"{elapsed_s:.0f}s elapsed {end}"
        )
        self._stream.flush()
        self._shown = not finished
        self._last = 0.0 if finished else self._last


class _StopOnSignal:
    """SIGTERM (pod eviction, job deadline) and SIGINT stop the run before its next batch."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.exit_code = EXIT_SIGTERM
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        self._event.set()

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; every failure is one line on stderr and an exit code, never a traceback."""
    try:
        # Without standalone mode click *returns* the code of a raised Exit (e.g. 143 after
        # SIGTERM) instead of raising it.
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="sweeper",
            standalone_mode=False,
        )
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `sweeper`: teach, don't squash
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
        return EXIT_USAGE
    except click.ClickException as exc:
        _error(exc.format_message())
        return EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Abort:
        _error("aborted")
        return EXIT_SIGINT
    except SweeperError as exc:
        _error(exc.message)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, and a code a scheduler acts on
        _error(f"internal error: {describe_exception(exc)}")
        return EXIT_FAILURE
    return code if isinstance(code, int) else 0


def _error(message: str) -> None:
    click.echo(f"sweeper: error: {one_line(message)}", err=True)


def console_main() -> None:
    sys.exit(main())
