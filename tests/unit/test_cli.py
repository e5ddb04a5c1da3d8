"""The command line: help, option and env var validation, exit codes, one-line errors."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import structlog
from click.testing import CliRunner

from sweeper import cli as cli_module
from sweeper import engine as run_module
from sweeper.cli import ProgressLine, cli, inspect, main, sweep
from sweeper.encodings import Encoding
from sweeper.logs import SweeperError, configure
from sweeper.options import FiniteFloatRange
from sweeper.result import Runtime, SweepResult
from sweeper.retry import StopReason
from sweeper.settings import KEYS, MAX_SHARDS, Shard, SweepSettings

NOW = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
COMMANDS = ("sweep", "inspect")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No configuration from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("SWEEPER_", "DATASTORE_")) or name == "GOOGLE_CLOUD_PROJECT":
            monkeypatch.delenv(name)


def one_error_line(err: str) -> str:
    """The one line on stderr that is not a JSON log line (the logs go there too)."""
    lines = [line for line in err.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, err
    assert lines[0].startswith("sweeper: error: ")
    assert "Traceback" not in err
    return lines[0]


# --- help -------------------------------------------------------------------------------


def test_group_help() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "Delete expired sessions" in result.output
    assert "sweep" in result.output


def test_sweep_help_shows_examples_and_env_vars() -> None:
    result = CliRunner().invoke(cli, ["sweep", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output
    assert "sweeper sweep --kind eq-session --grace 3h --dry-run" in result.output
    for name in ("SWEEPER_KIND", "SWEEPER_GRACE", "SWEEPER_BATCH_SIZE", "SWEEPER_FORMAT"):
        assert name in result.output


def test_main_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "-h"]) == 0
    out, err = capsys.readouterr()
    assert "--max-deletes" in out
    assert err == ""


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "sweeper, version 0.1.0"


# Every option --help listed when the option table was made, in that order: options added
# since may come anywhere, but these keep their places (and none goes missing).
SWEEP_ORDER = [
    "--project",
    "--database",
    "--namespace",
    "--kind",
    "--property",
    "--format",
    "--grace",
    "--batch-size",
    "--dry-run",
    "--verify",
    "--scan",
    "--config",
    "--workers",
    "--shard",
    "--ramp-up",
    "--max-rate",
    "--pushgateway",
    "--max-fraction",
    "--yes",
    "--max-deletes",
    "--max-runtime",
    "--log-format",
    "--log-level",
]
INSPECT_ORDER = [
    "--project",
    "--database",
    "--namespace",
    "--kind",
    "--property",
    "--format",
    "--grace",
    "--scan",
    "--workers",
    "--batch-size",
    "--verify",
    "--shard",
    "--ramp-up",
    "--max-rate",
    "--max-fraction",
    "--sample-size",
    "--count-limit",
    "--log-format",
    "--log-level",
]


@pytest.mark.parametrize(
    ("command", "order"), [(sweep, SWEEP_ORDER), (inspect, INSPECT_ORDER)], ids=COMMANDS
)
def test_help_keeps_every_option_in_its_place(command: click.Command, order: list[str]) -> None:
    listed = [p.opts[0] for p in command.params if isinstance(p, click.Option)]
    assert [flag for flag in listed if flag in order] == order
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize("command", [sweep, inspect], ids=COMMANDS)
def test_every_option_has_a_variable_named_after_it(command: click.Command) -> None:
    for param in command.params:
        assert isinstance(param, click.Option)
        envvars = param.envvar if isinstance(param.envvar, list) else [param.envvar]
        assert envvars[0] == "SWEEPER_" + param.opts[0][2:].upper().replace("-", "_")
        extra = ["DATASTORE_PROJECT_ID", "GOOGLE_CLOUD_PROJECT"] if param.name == "project" else []
        assert envvars[1:] == extra
        assert param.show_envvar


def test_what_a_config_file_sets_is_a_setting_of_sweep() -> None:
    """A key's field is the keyword of the sweep option that sets it, and a SweepSettings field."""
    names = {p.name for p in sweep.params}
    for name, key in KEYS.items():
        assert key.field in names, name
        assert key.field in SweepSettings.__dataclass_fields__, name
        assert key.safe is None or key.overrides, name


# --- bad usage --------------------------------------------------------------------------

BAD_ARGS = [
    pytest.param(["--batch-size", "0"], "--batch-size", id="batch-size-0"),
    pytest.param(["--batch-size", "501"], "--batch-size", id="batch-size-501"),
    pytest.param(["--batch-size", "abc"], "--batch-size", id="batch-size-abc"),
    pytest.param(["--batch-size"], "--batch-size", id="batch-size-missing"),
    pytest.param(["--grace", "soon"], "--grace", id="grace-soon"),
    pytest.param(["--grace=-1m"], "--grace", id="grace-negative"),
    pytest.param(["--grace", "99999999999d"], "--grace", id="grace-overflow"),
    pytest.param(["--grace", "3000000d"], "grace", id="grace-too-large"),
    pytest.param(["--format", "weird"], "--format", id="format-weird"),
    pytest.param(["--max-deletes", "0"], "--max-deletes", id="max-deletes-0"),
    pytest.param(["--max-runtime", "0"], "max runtime", id="max-runtime-0"),
    pytest.param(["--max-runtime", "x"], "--max-runtime", id="max-runtime-x"),
    pytest.param(["--kind", ""], "kind", id="kind-empty"),
    pytest.param(["--kind", "__x__"], "reserved", id="kind-reserved"),
    pytest.param(["--property", ""], "property", id="property-empty"),
    pytest.param(["--namespace", "bad ns"], "namespace", id="namespace-bad"),
    pytest.param(["--log-level", "loud"], "--log-level", id="log-level-loud"),
    pytest.param(["--log-format", "xml"], "--log-format", id="log-format-xml"),
    pytest.param(["--workers", "0"], "--workers", id="workers-0"),
    pytest.param(["--workers", "33"], "--workers", id="workers-33"),
    pytest.param(["--shard", "4/4"], "shard", id="shard-out-of-range"),
    pytest.param(["--shard", "x"], "shard", id="shard-garbage"),
    pytest.param(["--max-rate", "0"], "--max-rate", id="max-rate-0"),
    pytest.param(["--max-rate", "inf"], "--max-rate", id="max-rate-inf"),
    pytest.param(["--max-rate", "nan"], "--max-rate", id="max-rate-nan"),
    pytest.param(["--max-fraction", "nan"], "--max-fraction", id="max-fraction-nan"),
    pytest.param(["--max-fraction", "inf"], "--max-fraction", id="max-fraction-inf"),
    pytest.param(["--pushgateway", "not a url"], "--pushgateway", id="pushgateway-not-a-url"),
    pytest.param(["--pushgateway", "ftp://gw:9091"], "--pushgateway", id="pushgateway-ftp"),
    pytest.param(["--pushgateway", "http://"], "--pushgateway", id="pushgateway-no-host"),
    pytest.param(["--shard", "0/1000000000"], "at most 10000", id="shard-too-many"),
    pytest.param(["--scan"], "--scan needs an explicit --format", id="scan-auto"),
    pytest.param(["--no-such-option"], "--no-such-option", id="unknown-option"),
]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the CLI set in motion: a sweep, an inspection, a Datastore client (by name)."""
    made: list[str] = []

    def recorder(name: str) -> Callable[..., None]:
        def record(*_args: Any, **_kwargs: Any) -> None:
            made.append(name)

        return record

    for name in ("sweep_targets", "inspect_target"):
        monkeypatch.setattr(cli_module, name, recorder(name))
    monkeypatch.setattr(cli_module, "client_for", recorder("client_for"))
    return made


@pytest.mark.parametrize(("args", "mentions"), BAD_ARGS)
def test_bad_option_is_one_line_usage_error(
    args: list[str], mentions: str, started: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sweep", *args]) == 2
    out, err = capsys.readouterr()
    assert mentions in one_error_line(err)
    assert out == ""
    assert started == []


@pytest.mark.parametrize(
    "args",
    [
        ["--max-rate", "inf"],
        ["--max-rate", "nan"],
        ["--max-fraction", "nan"],
        ["--shard", f"0/{MAX_SHARDS + 1}"],
    ],
    ids=["max-rate-inf", "max-rate-nan", "max-fraction-nan", "shards-too-many"],
)
def test_bad_inspect_option_is_one_line_usage_error(
    args: list[str], started: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", *args]) == 2
    assert args[0] in one_error_line(capsys.readouterr().err)
    assert started == []


def test_every_float_option_refuses_nan_and_inf() -> None:
    """click's FloatRange lets nan past every bound and inf past an open top."""
    floats = [p for c in (sweep, inspect) for p in c.params if isinstance(p.type, click.FloatRange)]
    assert floats, "no float option left: drop this test"
    for param in floats:
        assert isinstance(param.type, FiniteFloatRange), param.name


def test_both_commands_take_the_same_shard_option(stub: StubSweep) -> None:
    """`sweep --shard I/N` but `inspect --shards N`: one option now, the same type and limit."""
    (of_sweep,) = [p for p in sweep.params if p.name == "shard"]
    (of_inspect,) = [p for p in inspect.params if p.name == "shard"]
    assert (of_sweep.opts, of_sweep.type) == (of_inspect.opts, of_inspect.type)
    assert main(["sweep", "--log-format", "json", "--shard", f"0/{MAX_SHARDS}"]) == 0
    assert stub.calls[0][0].shard == Shard(0, MAX_SHARDS)
    assert main(["sweep", "--shard", f"0/{MAX_SHARDS + 1}"]) == 2


def test_a_good_pushgateway_url_is_pushed_to(
    stub: StubSweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed: list[str] = []
    monkeypatch.setattr(
        cli_module, "push_summary", lambda url, _summary, handler: pushed.append(url)
    )
    url = "https://pushgateway.example:9091"
    assert main(["sweep", "--log-format", "json", "--pushgateway", url]) == 0
    assert pushed == [url]


@pytest.mark.parametrize(
    ("extra", "mentions"),
    [
        (["--pushgateway-user", "u"], "go together"),
        (["--pushgateway-password-file", "/nonexistent"], "go together"),
        (["--pushgateway-user", "u", "--pushgateway-password-file", "/nonexistent"], "cannot read"),
    ],
)
def test_pushgateway_credentials_are_checked_before_the_run(
    stub: StubSweep, capsys: pytest.CaptureFixture[str], extra: list[str], mentions: str
) -> None:
    args = ["sweep", "--log-format", "json", "--pushgateway", "https://pgw.example:9091", *extra]
    assert main(args) == 2
    assert mentions in one_error_line(capsys.readouterr().err)
    assert stub.calls == []  # nothing was swept


def test_the_pushgateway_password_comes_from_its_file_and_is_never_shown(
    stub: StubSweep, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")  # as a Secret mounted from a file ending in a newline
    used: list[Any] = []
    monkeypatch.setattr(
        cli_module, "push_summary", lambda _url, _summary, handler: used.append(handler.__self__)
    )  # the handler is the credentials' own (BasicAuth.handler)
    args = ["sweep", "--log-format", "json", "--pushgateway", "https://pgw.example:9091"]
    args += ["--pushgateway-user", "sweeper", "--pushgateway-password-file", str(secret)]
    assert main(args) == 0
    (auth,) = used
    assert (auth.username, auth.password) == ("sweeper", "s3cret")
    assert "s3cret" not in repr(auth)


def test_bare_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: sweeper")
    assert "sweep" in err


def test_unknown_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["purge"]) == 2
    assert "purge" in one_error_line(capsys.readouterr().err)


def test_cli_runner_reports_bad_option_with_exit_2() -> None:
    result = CliRunner().invoke(cli, ["sweep", "--batch-size", "0"])
    assert result.exit_code == 2
    assert "--batch-size" in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "mentions"),
    [
        ("SWEEPER_BATCH_SIZE", "0", "--batch-size"),
        ("SWEEPER_GRACE", "soon", "--grace"),
        ("SWEEPER_FORMAT", "weird", "--format"),
        ("SWEEPER_MAX_DELETES", "0", "--max-deletes"),
        ("SWEEPER_KIND", "__kind__", "reserved"),
        ("SWEEPER_LOG_LEVEL", "loud", "--log-level"),
    ],
)
def test_bad_env_var_is_one_line_usage_error(
    name: str,
    value: str,
    mentions: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, value)
    assert main(["sweep"]) == 2
    assert mentions in one_error_line(capsys.readouterr().err)


# --- a variable set but empty ------------------------------------------------------------


def blank_message(*names: str) -> str:
    if len(names) == 1:
        return f"sweeper: error: {names[0]} is set but empty: unset it or give a value"
    return f"sweeper: error: {', '.join(names)} are set but empty: unset them or give them values"


@pytest.mark.parametrize("value", ["", "  ", "\t"], ids=["empty", "spaces", "tab"])
@pytest.mark.parametrize(
    ("command", "name"),
    [(c.name, p.envvar[0]) for c in (sweep, inspect) for p in c.params if p.envvar],
    ids=str,
)
def test_a_blank_variable_is_a_usage_error_before_anything_runs(
    command: str,
    name: str,
    value: str,
    started: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """click would read it as unset and use the default: SWEEPER_KIND= swept the default kind."""
    monkeypatch.setenv(name, value)
    assert main([command]) == 2
    out, err = capsys.readouterr()
    assert one_error_line(err) == blank_message(name)
    assert out == ""
    assert started == []


def test_a_blank_variable_is_refused_even_where_the_command_line_sets_the_option(
    started: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blank variable is a broken configuration (a value a template lost), whoever wins."""
    monkeypatch.setenv("SWEEPER_GRACE", "")
    assert main(["sweep", "--grace", "3h"]) == 2
    assert one_error_line(capsys.readouterr().err) == blank_message("SWEEPER_GRACE")
    assert started == []


def test_every_blank_variable_is_named_at_once(
    started: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWEEPER_KIND", "")
    monkeypatch.setenv("SWEEPER_GRACE", " ")
    monkeypatch.setenv("SWEEPER_BATCH_SIZE", "x")  # no number: still the blank ones are named
    assert main(["inspect"]) == 2
    assert one_error_line(capsys.readouterr().err) == blank_message("SWEEPER_KIND", "SWEEPER_GRACE")
    assert started == []


def test_a_blank_variable_of_another_commands_option_is_ignored(
    stub: StubSweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One environment may serve both commands: only what the command reads must make sense."""
    monkeypatch.setenv("SWEEPER_COUNT_LIMIT", "")  # inspect's
    monkeypatch.setenv("SWEEPER_SAMPLE_SIZE", "")  # inspect's
    assert main(["sweep", "--log-format", "json"]) == 0
    assert len(stub.calls) == 1


def test_the_projects_fallback_variables_keep_reading_empty_as_unset(
    stub: StubSweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATASTORE_PROJECT_ID and GOOGLE_CLOUD_PROJECT are the Google client's conventions."""
    monkeypatch.setenv("DATASTORE_PROJECT_ID", "")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "from-google")
    assert main(["sweep", "--log-format", "json"]) == 0
    assert stub.calls[0][0].project == "from-google"
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "")
    assert main(["sweep", "--log-format", "json"]) == 0
    assert stub.calls[1][0].project is None  # the client's (ADC) project, as before


def test_help_answers_despite_a_blank_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEPER_KIND", "")
    for command in COMMANDS:
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "SWEEPER_KIND" in result.output


def test_cli_runner_reports_a_blank_variable_with_exit_2(
    started: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWEEPER_KIND", "")
    result = CliRunner().invoke(cli, ["sweep"])
    assert result.exit_code == 2
    assert "SWEEPER_KIND is set but empty" in result.stderr
    assert started == []


# --- wiring to the engine (engine and client replaced) ------------------------------------


@dataclass
class StubSweep:
    """Stands in for ``sweeper.engine.Sweep``: records what the CLI built, returns a set result."""

    on_run: Callable[[Runtime], None] = lambda _rt: None
    stopped_reason: StopReason = StopReason.COMPLETE
    error: str | None = None
    calls: list[tuple[SweepSettings, object, Runtime]] = field(default_factory=list)

    def __call__(self, settings: SweepSettings, client: object, runtime: Runtime) -> StubSweep:
        self.calls.append((settings, client, runtime))
        return self

    def run(self) -> SweepResult:
        settings, _client, runtime = self.calls[-1]
        self.on_run(runtime)
        return SweepResult(
            settings, NOW, "epoch-seconds", stopped_reason=self.stopped_reason, error=self.error
        )


CLIENT = object()


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> StubSweep:
    sweep = StubSweep()
    made: list[tuple[Any, ...]] = []

    def make_client(*args: Any) -> object:
        made.append(args)
        return CLIENT

    monkeypatch.setattr(run_module, "Sweep", sweep)
    monkeypatch.setattr(cli_module, "client_for", make_client)
    return sweep


def test_defaults_reach_settings(stub: StubSweep, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATASTORE_EMULATOR_HOST", raising=False)
    assert main(["sweep", "--log-format", "json"]) == 0
    settings, connect, _rt = stub.calls[0]
    assert callable(connect)  # the client is built inside the run, which owes a summary
    assert connect() is CLIENT
    assert settings == SweepSettings(
        kind="eq-session",
        prop="expires_at",
        format="auto",
        grace=dt.timedelta(minutes=15),
        batch_size=500,
        workers=4,
        ramp_up=True,  # against production, Datastore's 500/50/5 rule applies
    )
    assert settings.verify is True  # on by default, on every database


def test_an_emulator_needs_no_ramp_up(stub: StubSweep, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", "127.0.0.1:8081")
    assert main(["sweep", "--log-format", "json"]) == 0
    assert stub.calls[0][0].ramp_up is False
    assert main(["sweep", "--log-format", "json", "--ramp-up"]) == 0
    assert stub.calls[1][0].ramp_up is True


def test_env_vars_configure_the_sweep(stub: StubSweep, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "SWEEPER_KIND": "dev-eq-session",
        "SWEEPER_PROPERTY": "valid_until",
        "SWEEPER_FORMAT": "epoch-millis",
        "SWEEPER_GRACE": "3h",
        "SWEEPER_BATCH_SIZE": "250",
        "SWEEPER_DRY_RUN": "true",
        "SWEEPER_MAX_DELETES": "1000",
        "SWEEPER_MAX_RUNTIME": "10m",
        "SWEEPER_NAMESPACE": "tenant-a",
        "SWEEPER_DATABASE": "sessions",
        "DATASTORE_PROJECT_ID": "proj",
        "SWEEPER_LOG_FORMAT": "json",
        "SWEEPER_WORKERS": "8",
        "SWEEPER_SHARD": "2/5",
        "SWEEPER_RAMP_UP": "false",
        "SWEEPER_MAX_RATE": "250",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["sweep"]) == 0
    settings = stub.calls[0][0]
    assert settings == SweepSettings(
        kind="dev-eq-session",
        prop="valid_until",
        format=Encoding.EPOCH_MILLIS,
        grace=dt.timedelta(hours=3),
        batch_size=250,
        dry_run=True,
        max_deletes=1000,
        max_runtime=dt.timedelta(minutes=10),
        project="proj",
        database="sessions",
        namespace="tenant-a",
        workers=8,
        shard=Shard(2, 5),
        ramp_up=False,
        max_rate=250.0,
    )


class InspectStopped(SweeperError):
    pass


def test_inspect_builds_its_settings_from_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[SweepSettings, dict[str, Any]]] = []

    def inspect_target(settings: SweepSettings, *_args: Any, **kwargs: Any) -> None:
        seen.append((settings, kwargs))
        raise InspectStopped("stub")

    monkeypatch.setattr(cli_module, "inspect_target", inspect_target)
    monkeypatch.setattr(cli_module, "client_for", lambda *_args: CLIENT)
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", "127.0.0.1:8081")
    monkeypatch.setenv("SWEEPER_SAMPLE_SIZE", "50")
    args = ["--log-format", "json", "--kind", "k", "--property", "p", "--format", "timestamp"]
    args += ["--grace", "1h", "--namespace", "n", "--database", "", "--project", "pr"]
    args += ["--workers", "2", "--batch-size", "100", "--no-verify", "--shard", "1/3"]
    args += ["--max-rate", "20", "--max-fraction", "1", "--count-limit", "9"]
    args += ["--give-up-after", "7s"]
    assert main(["inspect", *args]) == 1
    (settings, kwargs) = seen[0]
    assert kwargs.pop("retrier").policy.stall_s == 7.0
    assert settings == SweepSettings(
        kind="k",
        prop="p",
        format=Encoding.TIMESTAMP,
        grace=dt.timedelta(hours=1),
        namespace="n",
        database=None,
        project="pr",
        workers=2,
        batch_size=100,
        verify=False,
        shard=Shard(1, 3),  # the forecast is of all three pods
        ramp_up=False,  # an emulator: no ramp-up unless asked for
        max_rate=20.0,
        max_fraction=1.0,
    )
    assert kwargs == {"sample_size": 50, "count_limit": 9}
    assert (
        main(["inspect", "--log-format", "json", "--ramp-up", "--scan", "--format", "timestamp"])
        == 1
    )
    assert seen[1][0] == SweepSettings(
        kind="eq-session",
        prop="expires_at",
        format=Encoding.TIMESTAMP,
        grace=dt.timedelta(minutes=15),
        scan=True,
        ramp_up=True,
    )
    assert seen[1][0].verify is True


@pytest.mark.parametrize("command", COMMANDS)
def test_verify_is_on_by_default_and_off_only_when_asked(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[SweepSettings] = []

    def record_sweep(targets: list[SweepSettings], *_args: Any, **_kwargs: Any) -> list[Any]:
        seen.extend(targets)
        return []

    def record_inspect(settings: SweepSettings, *_args: Any, **_kwargs: Any) -> None:
        seen.append(settings)
        raise InspectStopped("stub")

    monkeypatch.setattr(cli_module, "sweep_targets", record_sweep)
    monkeypatch.setattr(cli_module, "inspect_target", record_inspect)
    monkeypatch.setattr(cli_module, "client_for", lambda *_args: CLIENT)
    run = [command, "--log-format", "json"]
    main(run)
    main([*run, "--no-verify"])
    monkeypatch.setenv("SWEEPER_VERIFY", "false")
    main(run)
    main([*run, "--verify"])
    assert [s.verify for s in seen] == [True, False, False, True]


def test_the_verify_help_says_it_is_on_everywhere() -> None:
    (sweep_verify,) = [p for p in sweep.params if p.name == "verify"]
    (inspect_verify,) = [p for p in inspect.params if p.name == "verify"]
    assert sweep_verify.default is True
    assert inspect_verify.default is True
    assert "On by default on every database" in str(getattr(sweep_verify, "help", ""))
    assert "--no-verify deletes blindly" in str(getattr(sweep_verify, "help", ""))
    assert "on by default, as the sweep" in str(getattr(inspect_verify, "help", ""))


def test_option_overrides_env_var(stub: StubSweep, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEPER_KIND", "from-env")
    assert main(["sweep", "--kind", "from-flag", "--log-format", "json"]) == 0
    assert stub.calls[0][0].kind == "from-flag"


def test_sweep_error_is_exit_1_with_one_line(
    stub: StubSweep, capsys: pytest.CaptureFixture[str]
) -> None:
    stub.stopped_reason, stub.error = StopReason.ERROR, "Datastore call failed: Aborted: busy"
    assert main(["sweep", "--log-format", "json"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == "sweeper: error: Datastore call failed: Aborted: busy"


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_signal_stops_with_its_exit_code(
    signum: signal.Signals, code: int, stub: StubSweep, capsys: pytest.CaptureFixture[str]
) -> None:
    before = signal.getsignal(signum)

    def receive_signal(runtime: Runtime) -> None:
        assert not runtime.stop.is_set()
        signal.raise_signal(signum)
        assert runtime.stop.is_set()

    stub.on_run, stub.stopped_reason = receive_signal, StopReason.SIGNAL
    assert main(["sweep", "--log-format", "json"]) == code
    assert capsys.readouterr().err == ""
    assert signal.getsignal(signum) == before


# --- durations and database ids: strict, refused before anything runs --------------------

# An uppercase unit was once lowered (3M: 3 minutes, to someone who meant 3 months) and any
# script's digits were read (Arabic-Indic 3, U+0663; fullwidth 15, U+FF11 U+FF15).
MISREAD_DURATIONS = ["3M", "3H", "\u0663h", "\uff11\uff15m", "3 months", ""]
DURATION_OPTIONS = ["--grace", "--max-runtime", "--give-up-after"]


@pytest.mark.parametrize("option", DURATION_OPTIONS)
@pytest.mark.parametrize("value", MISREAD_DURATIONS)
def test_a_misread_duration_is_a_one_line_usage_error(
    option: str,
    value: str,
    started: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sweep", option, value]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert option in line
    assert f"invalid duration {value!r}" in line
    assert "s, m, h or d (seconds, minutes, hours, days; lowercase)" in line
    assert out == ""
    assert started == []


@pytest.mark.parametrize("value", MISREAD_DURATIONS)
def test_inspect_refuses_a_misread_grace(
    value: str, started: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "--grace", value]) == 2
    assert "--grace" in one_error_line(capsys.readouterr().err)
    assert started == []


@pytest.mark.parametrize("value", ["3M", "3H", "\u0663h", "\uff11\uff15m", "3 months"])
def test_a_misread_grace_variable_is_a_one_line_usage_error(
    value: str,
    started: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SWEEPER_GRACE", value)
    assert main(["sweep"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "SWEEPER_GRACE" in line
    assert f"invalid duration {value!r}" in line
    assert started == []


def test_a_misread_grace_in_a_config_file_is_a_one_line_usage_error(
    tmp_path: Path, started: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text('[[target]]\nkind = "x"\ngrace = "3M"\n')
    assert main(["sweep", "--config", str(path)]) == 2
    assert "target 1: invalid duration '3M'" in one_error_line(capsys.readouterr().err)
    assert started == []


@pytest.mark.parametrize("value", ["3M", "\u0663h", "\uff11\uff15m", ""])
def test_cli_runner_reports_a_misread_grace_with_exit_2(value: str) -> None:
    result = CliRunner().invoke(cli, ["sweep", "--grace", value])
    assert result.exit_code == 2
    assert "invalid duration" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("value", "delta"),
    [
        ("90m", dt.timedelta(minutes=90)),
        ("3h", dt.timedelta(hours=3)),
        ("14d", dt.timedelta(days=14)),
        ("1h30m", dt.timedelta(minutes=90)),
    ],
)
def test_a_lowercase_duration_still_works(
    value: str, delta: dt.timedelta, stub: StubSweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = ["sweep", "--log-format", "json"]
    assert main([*run, "--grace", value]) == 0
    assert main([*run, "--max-runtime", value, "--give-up-after", value]) == 0
    monkeypatch.setenv("SWEEPER_GRACE", value)
    assert main(run) == 0
    graces = [settings.grace for settings, _client, _rt in stub.calls]
    assert graces == [delta, dt.timedelta(minutes=15), delta]
    assert stub.calls[1][0].max_runtime == delta


@pytest.mark.parametrize(
    "value", ["Bad Name!", "Ab", "-abc", "abc", "abc-", "1abc", "Sessions", "a" * 64, "ses_s"]
)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_database_id_is_a_one_line_usage_error_before_any_call(
    command: str, value: str, started: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--database", value]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert "--database" in line
    assert "invalid database id" in line
    assert "4 to 63 lowercase letters, digits or hyphens" in line
    assert out == ""
    assert started == []  # no client made, no Datastore call


def test_a_bad_database_variable_or_config_key_is_a_usage_error(
    tmp_path: Path,
    started: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text('[[target]]\nkind = "x"\ndatabase = "Bad Name!"\n')
    assert main(["sweep", "--config", str(path)]) == 2
    assert "target 1: invalid database id 'Bad Name!'" in one_error_line(capsys.readouterr().err)
    monkeypatch.setenv("SWEEPER_DATABASE", "Bad Name!")
    assert main(["sweep"]) == 2
    assert "SWEEPER_DATABASE" in one_error_line(capsys.readouterr().err)
    assert started == []


def test_cli_runner_reports_a_bad_database_with_exit_2() -> None:
    result = CliRunner().invoke(cli, ["sweep", "--database", "Bad Name!"])
    assert result.exit_code == 2
    assert "invalid database id" in result.stderr


@pytest.mark.parametrize(
    ("value", "database"),
    [("sessions", "sessions"), ("eq-sessions-2", "eq-sessions-2"), ("(default)", None)],
)
def test_a_good_database_id_is_accepted(
    value: str, database: str | None, stub: StubSweep, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sweep", "--log-format", "json", "--database", value]) == 0
    assert stub.calls[0][0].database == database  # "(default)": the default database
    assert "error" not in capsys.readouterr().err


# --- a database that is not there -------------------------------------------------------


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_a_closed_port_fails_at_once_naming_the_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Really backs off (a second or two): before any call has succeeded a refused connection
    is a mistake, not an outage, whatever --give-up-after says. Riding out an outage after a
    first success is tested against the emulators (test_outages.py, test_network.py)."""
    host = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", host)
    monkeypatch.setenv("DATASTORE_PROJECT_ID", "p")
    started = time.monotonic()
    args = ["sweep", "--format", "epoch-seconds", "--log-format", "json", "--give-up-after", "60s"]
    assert main(args) == 1
    assert time.monotonic() - started < 10
    out, err = capsys.readouterr()
    assert out == ""
    assert one_error_line(err).startswith(
        f"sweeper: error: cannot reach the Datastore emulator at {host} "
        "(DATASTORE_EMULATOR_HOST): connection refused."
    )
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    finished = [e for e in events if e["event"] == "sweep_finished"]
    assert len(finished) == 1
    assert finished[0]["stopped_reason"] == "error"
    assert finished[0]["severity"] == "ERROR"
    assert finished[0]["retries"] >= 2
    assert sum(e["event"] == "call_retrying" for e in events) == finished[0]["retries"]


def test_the_live_progress_line_is_throttled_and_taken_off_at_the_end() -> None:
    stream = io.StringIO()
    line = ProgressLine(stream, every_s=0.5)
    settings = SweepSettings(kind="k", prop="p", format="auto", grace=dt.timedelta(0))
    result = SweepResult(settings, NOW, "epoch-seconds", deleted=100)

    line.show(result, 0.1, False)  # too soon: nothing yet
    assert stream.getvalue() == ""
    line.show(result, 1.0, False)
    shown = "k: deleted 100 (100/s), 1s elapsed"
    assert stream.getvalue() == "\r" + shown
    line.clear()  # before a log line: the line is blanked, the cursor at its start
    assert stream.getvalue() == "\r" + shown + "\r" + " " * len(shown) + "\r"
    result.deleted = 300
    line.show(result, 2.0, False)
    assert stream.getvalue().endswith("\rk: deleted 300 (150/s), 2s elapsed")
    line.show(result, 2.5, True)  # the summary says the same: nothing is left of the line
    assert stream.getvalue().endswith("\r" + " " * len(shown) + "\r")


def test_a_short_run_draws_no_progress_line() -> None:
    stream = io.StringIO()
    line = ProgressLine(stream)
    settings = SweepSettings(kind="k", prop="p", format="auto", grace=dt.timedelta(0))
    line.show(SweepResult(settings, NOW, "auto"), 0.2, True)
    assert stream.getvalue() == ""


def test_a_log_line_never_lands_inside_the_live_progress_line() -> None:
    """ "…10s elapsed 2026-12-06T04:14:44Z [info] sweep_progress" on one line: the live line is
    taken off the terminal before each log line is printed."""
    terminal = io.StringIO()
    line = ProgressLine(terminal)
    settings = SweepSettings(kind="k", prop="p", format="auto", grace=dt.timedelta(0))
    line.show(SweepResult(settings, NOW, "epoch-seconds", deleted=5), 1.0, False)
    configure("console", "info", terminal, person=True, before_each=line.clear)
    try:
        structlog.get_logger("sweeper").info("sweep_progress", deleted=5)
    finally:
        configure("json", "info")
    pieces = re.split(r"[\r\n]", terminal.getvalue())
    assert any("sweep_progress" in piece for piece in pieces)
    assert not [piece for piece in pieces if "elapsed" in piece and "sweep_progress" in piece]


def test_ctrl_c_while_starting_is_130_and_one_line() -> None:
    """The first half second is imports (the Google client, gRPC): Ctrl-C there printed a
    KeyboardInterrupt traceback and the process died of the signal. The signal is sent once
    gRPC's library is loaded, which only the CLI's imports do: inside them, whatever the load.
    (Before the interpreter runs sweeper's first line, nothing can catch it.)"""
    env = {**os.environ, "DATASTORE_EMULATOR_HOST": f"127.0.0.1:{closed_port()}"}
    # Started as a shell starts a command in the foreground: SIGINT at its default. A parent
    # that ignores it (a background job of a script, `nohup`) passes that on, and Python then
    # ignores Ctrl-C until sweeper's own handlers are in place.
    command = [sys.executable, "-m", "sweeper", "sweep", "--project", "p"]
    foreground = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", foreground, *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 30
    while "cygrpc" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 1, err
