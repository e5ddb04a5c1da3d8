"""The ``sweeper`` command line: parse, build settings, call the engine, map to exit codes.

The options are in sweeper/options.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
import structlog
from click.core import ParameterSource
from google.auth import exceptions as auth_exc
from google.cloud import datastore

from sweeper import __version__
from sweeper import options as opts
from sweeper.engine import each_namespace, sweep_targets
from sweeper.guard import ask_before_deleting
from sweeper.inspect.report import InspectReport, inspect_target
from sweeper.inspect.table import forecast_dict, render_table, report_dict
from sweeper.logs import (
    EXIT_FAILURE,
    EXIT_SIGINT,
    EXIT_USAGE,
    DatastoreError,
    LogFormat,
    SweeperError,
    UsageError,
    configure,
    describe_exception,
    one_line,
    report_bug,
)
from sweeper.metrics import BasicAuth, MetricsError, push_summary, transport
from sweeper.result import Runtime, SweepResult, terminal_summary
from sweeper.retry import Retrier, RetryCounter, RetryPolicy, StopOnSignal, Stopped, StopReason
from sweeper.settings import KEYS, SweepSettings, flag, load_targets

T = TypeVar("T")


class Command(click.Command):
    """A command that also refuses a ``SWEEPER_*`` variable of its options set but blank: click
    reads it as unset, so ``SWEEPER_KIND=`` (a value a template lost) would sweep the default
    kind. The fallbacks (``DATASTORE_PROJECT_ID``, ...) keep the Google client's convention:
    empty means unset. Checked after parsing, so ``--help`` answers first."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.resilient_parsing:  # shell completion: nothing will run
            return super().parse_args(ctx, args)
        try:
            rest = super().parse_args(ctx, args)
        except click.UsageError:
            self._check_environment()  # a blank variable may be why (" " is no number)
            raise
        self._check_environment()
        return rest

    def _check_environment(self) -> None:
        own = [p.envvar[0] for p in self.params if isinstance(p, click.Option) and p.envvar]
        blank = [name for name in own if (os.environ.get(name, "x")).strip() == ""]
        if len(blank) == 1:
            raise click.UsageError(f"{blank[0]} is set but empty: unset it or give a value")
        if blank:
            raise click.UsageError(
                f"{', '.join(blank)} are set but empty: unset them or give them values"
            )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sweeper")
def cli() -> None:
    """Delete expired sessions from Google Cloud Datastore, and nothing else.

    Datastore's TTL policies honour only Timestamp values and lag up to a day; sweeper finds
    entities whose expiry lies in the past with paged keys-only range queries and deletes them
    in batches with retries. Point it at an emulator with DATASTORE_EMULATOR_HOST.
    """


@cli.command(cls=Command)
@opts.with_options(opts.SWEEP)
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
    auth = _pushgateway_auth(options)
    log_format = _log_format(options, sys.stderr)  # the logs are sweep's output
    person = log_format == "console" and sys.stderr.isatty()
    line = ProgressLine(sys.stderr) if person and not options["quiet"] else None
    level: str = options["log_level"]
    if options["quiet"]:
        level = "error"
    elif person and ctx.get_parameter_source("log_level") is ParameterSource.DEFAULT:
        level = "warning"  # the plan, the progress line and the summary say the rest
    configure(
        log_format, level, sys.stderr, person=person, before_each=line.clear if line else None
    )
    targets = _targets(ctx, options)
    person = person and not options["quiet"]
    # A person may be there whenever stdin is a terminal, whatever the output is piped to.
    asks = not options["yes"] and not options["dry_run"] and sys.stdin.isatty()
    with StopOnSignal() as stop:
        runtime = Runtime(
            retry_policy=_retry_policy(options),
            stop=stop.event,
            on_progress=line.show if line else None,
            confirm=partial(ask_before_deleting, stopping=stop.event.is_set) if asks else None,
        )
        results = sweep_targets(targets, client_for, runtime, overall=options["config"] is not None)
        # The handlers stay: a signal from here on ends the forecast or the push at once.
        if options["dry_run"]:
            with suppress(Stopped), stop.event.interrupting():
                _log_forecasts(results)
        if person and results:
            click.echo(terminal_summary(results, stop.name), err=True)
        if options["pushgateway"]:
            with suppress(Stopped), stop.event.interrupting(stopped_already=False):
                _push_metrics(options["pushgateway"], results, auth)
    if stop.event.is_set() or any(r.stopped_reason == "signal" for r in results):
        raise click.exceptions.Exit(stop.exit_code)
    failed = [r for r in results if r.error is not None]
    if not failed and any(r.stopped_reason == StopReason.DECLINED for r in results):
        if not person:  # else the summary said so
            click.echo("sweeper: not confirmed at the prompt; nothing was deleted", err=True)
        raise click.exceptions.Exit(EXIT_FAILURE)
    if len(failed) == 1 and len(results) == 1:
        raise SweeperError(failed[0].error or "")
    if failed:
        raise SweeperError(
            f"{len(failed)} of {len(results)} sweeps failed; first: "
            f"{failed[0].settings.label}: {failed[0].error}"
        )


@cli.command(cls=Command)
@opts.with_options(opts.INSPECT)
def inspect(**options: Any) -> None:
    """Show what is stored in a target and what `sweep` would do with it. Deletes nothing.

    Reports the encodings present in the property (counted over a sample), whether it looks
    indexed, how many entities carry it, how many lie past the cutoff (an aggregation COUNT
    where the database has one, else a bounded keys-only count) and how old they are (by hour
    or by day), the oldest expiry, the sweep's decision, and a forecast of that sweep: its
    Datastore calls, their price at list prices, and its time under the ramp-up rule (with
    --workers, --verify, --shard, ... as it would run). Logs go to stderr, the report to
    stdout.

    \b
    Examples:
      sweeper inspect --kind eq-session --grace 3h
      sweeper inspect --kind eq-session --grace 3h --shard 0/16 --max-fraction 1
      sweeper inspect --kind used-jti-claim --format epoch-seconds --log-format json
    """
    settings = SweepSettings(**opts.settings_of(options))
    # The report (on stdout) and the logs (on stderr) share a format, by default the report's.
    log_format = _log_format(options, sys.stdout)
    output = "table" if log_format == "console" else "json"
    configure(log_format, options["log_level"], sys.stderr)

    def report(one: SweepSettings) -> InspectReport:
        return inspect_target(
            one,
            client_for(one),
            dt.datetime.now(dt.UTC),
            sample_size=options["sample_size"],
            count_limit=options["count_limit"],
            retrier=Retrier(_retry_policy(options), RetryCounter()),
        )

    with StopOnSignal() as stop:
        targets = [settings]
        if settings.all_namespaces:
            retrier = Retrier(_retry_policy(options), RetryCounter())
            targets = run_until_signal(
                stop, lambda: list(each_namespace(settings, client_for, retrier))
            )
        # One report per target, each printed as it is made: a table each, or JSON lines.
        for each in targets:
            one = run_until_signal(stop, partial(report, each))
            click.echo(render_table(one) if output == "table" else json.dumps(report_dict(one)))


class ProgressLine:
    """A live line on an interactive terminal: deleted so far, rate, elapsed. It is taken off
    before each log line (``clear``), which would otherwise be printed into it, and at the end,
    where the summary says the same."""

    def __init__(self, stream: TextIO, every_s: float = 0.5) -> None:
        self._stream, self._every_s, self._last = stream, every_s, 0.0
        self._width = 0  # of the line on the terminal; 0: none
        # Delete workers draw it, any thread's log line takes it off.
        self._lock = threading.RLock()

    def show(self, result: SweepResult, elapsed_s: float, finished: bool) -> None:
        s = result.settings
        with self._lock:
            if finished:
                self.clear()
                self._last = 0.0  # the next target starts afresh
            elif elapsed_s - self._last >= self._every_s:
                done = result.matched if s.dry_run else result.deleted
                verb = "would delete" if s.dry_run else "deleted"
                rate = done / elapsed_s if elapsed_s > 0 else 0.0
                text = f"{s.kind}: {verb} {done} ({rate:.0f}/s), {elapsed_s:.0f}s elapsed"
                self._stream.write("\r" + text.ljust(self._width))
                self._stream.flush()
                self._width, self._last = len(text), elapsed_s

    def clear(self) -> None:
        with self._lock:
            if self._width:
                self._stream.write("\r" + " " * self._width + "\r")
                self._stream.flush()
                self._width = 0


def run_until_signal(stop: StopOnSignal, fn: Callable[[], T]) -> T:
    """``inspect``'s ``fn``, ended at once (one line, exit 143/130) by SIGTERM/SIGINT whatever
    call it waits for: read-only, it has nothing to drain and no summary of its own."""
    try:
        with stop.event.interrupting():
            return fn()
    except Stopped:
        stopped = SweeperError(f"inspect stopped by {stop.name}; nothing was changed")
        stopped.exit_code = stop.exit_code
        raise stopped from None


def _targets(ctx: click.Context, options: dict[str, Any]) -> list[SweepSettings]:
    """The run's settings: one, or with --config one per target (``KEYS`` says which options a
    target sets, and which of them the command line may override)."""
    values = opts.settings_of(options)
    if options["config"] is None:
        return [SweepSettings(**values)]
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    explicit = {n: k for n, k in KEYS.items() if ctx.get_parameter_source(k.field) in given}
    clashing = [flag(name) for name, k in explicit.items() if not k.overrides]
    if clashing:
        raise UsageError(
            f"{', '.join(clashing)} cannot be combined with --config: "
            "set it in the file, per target or under [defaults]"
        )
    overriding = {k.field: values[k.field] for k in explicit.values() if k.overrides}
    return load_targets(Path(options["config"]), values, overriding)


def client_for(settings: SweepSettings) -> datastore.Client:
    """The client of one target; a setup failure is one line. ``DATASTORE_EMULATOR_HOST`` (read
    by the client itself) points it at an emulator, else it uses Application Default Credentials."""
    s = settings
    try:
        return datastore.Client(project=s.project, database=s.database, namespace=s.namespace)
    except auth_exc.DefaultCredentialsError:
        if os.environ.get("DATASTORE_EMULATOR_HOST"):  # the client then looks for a project
            raise DatastoreError(
                "no project: DATASTORE_EMULATOR_HOST is set, and an emulator needs a project id "
                "too: pass --project or set DATASTORE_PROJECT_ID (any id, e.g. demo)"
            ) from None
        raise DatastoreError(
            "no Google Cloud credentials found: run under Workload Identity or a service "
            "account, use 'gcloud auth application-default login', or set "
            "DATASTORE_EMULATOR_HOST for an emulator"
        ) from None
    except OSError as exc:
        if "project" in str(exc).lower():
            raise DatastoreError(
                "no project: pass --project or set SWEEPER_PROJECT / DATASTORE_PROJECT_ID"
            ) from None
        raise DatastoreError(f"cannot create a Datastore client: {exc}") from None


def _retry_policy(options: dict[str, Any]) -> RetryPolicy:
    """Retries as the defaults have them, giving up after ``--give-up-after`` without progress
    (and never retrying past twice that in all)."""
    stall = max(options["give_up_after"].total_seconds(), 1.0)
    return RetryPolicy(stall_s=stall, max_delay_s=max(2 * stall, RetryPolicy().max_delay_s))


def _log_format(options: dict[str, Any], stream: TextIO) -> LogFormat:
    """The asked format, else console when the command's main output (``stream``) goes to a
    terminal and JSON when it goes to a machine."""
    chosen: LogFormat | None = options["log_format"]
    return chosen or ("console" if stream.isatty() else "json")


def _log_forecasts(results: list[SweepResult]) -> None:
    """After a dry run, one ``forecast`` event per target: what the real run would cost, from
    the same reads ``inspect`` makes (a sample lookup and a few COUNTs)."""
    log = structlog.get_logger("sweeper")
    for settings in (r.settings for r in results if r.error is None):
        try:
            report = inspect_target(
                replace(settings, dry_run=False), client_for(settings), dt.datetime.now(dt.UTC)
            )
        except Exception as exc:  # a forecast is extra: it never fails the dry run
            log.warning("forecast_failed", kind=settings.kind, error=describe_exception(exc))
            continue
        if report.forecast is not None:
            log.info("forecast", kind=settings.kind, **forecast_dict(report.forecast))


def _pushgateway_auth(options: dict[str, Any]) -> BasicAuth | None:
    """Checked before anything is read or deleted: both or neither, and a readable password."""
    user, path = options["pushgateway_user"], options["pushgateway_password_file"]
    if (user is None) != (path is None):
        raise UsageError(
            "--pushgateway-user and --pushgateway-password-file go together: give both or neither"
        )
    if user is None:
        return None
    if not options["pushgateway"]:
        raise UsageError("--pushgateway-user needs --pushgateway: there is nothing to push to")
    return BasicAuth.from_file(user, path)


def _push_metrics(url: str, results: list[SweepResult], auth: BasicAuth | None) -> None:
    handler = transport(auth)
    for result in results:
        try:
            push_summary(url, result.summary(), handler=handler)
        except MetricsError as exc:
            structlog.get_logger("sweeper").warning("metrics_push_failed", error=exc.message)


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
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C before the run's handlers
        click.echo("\nsweeper: stopped by SIGINT; nothing was done", err=True)
        return EXIT_SIGINT
    except SweeperError as exc:
        _error(exc.message)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, and a code a scheduler acts on
        _error(report_bug(structlog.get_logger("sweeper"), exc))
        return EXIT_FAILURE
    return code if isinstance(code, int) else 0


def _error(message: str) -> None:
    click.echo(f"sweeper: error: {one_line(message)}", err=True)


def console_main() -> None:
    sys.exit(main())
