"""``--config`` files: every mistake is one clear usage error before anything runs."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from structlog.testing import capture_logs

from sweeper import cli as cli_module
from sweeper.cli import main, sweep
from sweeper.encodings import Encoding
from sweeper.logs import UsageError
from sweeper.settings import KEYS, Shard, SweepSettings, flag, load_targets

BASE: dict[str, Any] = {
    "prop": "expires_at",
    "format": "auto",
    "grace": dt.timedelta(minutes=15),
    "batch_size": 500,
    "dry_run": False,
    "verify": False,
    "scan": False,
    "max_deletes": None,
    "max_runtime": None,
    "project": "p",
    "database": None,
    "namespace": None,
}


def load(tmp_path: Path, text: str) -> list[SweepSettings]:
    path = tmp_path / "sweeper.toml"
    path.write_text(text)
    return load_targets(path, dict(BASE))


def test_targets_take_defaults_then_their_own_values(tmp_path: Path) -> None:
    targets = load(
        tmp_path,
        """
[defaults]
grace = "3h"
format = "epoch-seconds"

[[target]]
kind = "eq-session"

[[target]]
kind = "questionnaire-state"
property = "submitted_at"
format = "timestamp"
grace = "1h"
max_deletes = 1000
verify = true
""",
    )
    first, second = targets
    assert (first.kind, first.prop, first.format, first.grace) == (
        "eq-session",
        "expires_at",
        Encoding.EPOCH_SECONDS,
        dt.timedelta(hours=3),
    )
    assert (second.prop, second.format, second.grace, second.max_deletes, second.verify) == (
        "submitted_at",
        Encoding.TIMESTAMP,
        dt.timedelta(hours=1),
        1000,
        True,
    )
    assert first.project == second.project == "p"


def test_every_key_reaches_its_setting(tmp_path: Path) -> None:
    (target,) = load(
        tmp_path,
        """
[[target]]
kind = "k"
property = "p"
format = "timestamp"
grace = "1h30m"
namespace = "n"
database = "sessions"
max_deletes = 5
max_runtime = "2m"
batch_size = 100
max_fraction = 1
verify = true
scan = true
""",
    )
    assert target == SweepSettings(
        kind="k",
        prop="p",
        format=Encoding.TIMESTAMP,
        grace=dt.timedelta(hours=1, minutes=30),
        namespace="n",
        database="sessions",
        max_deletes=5,
        max_runtime=dt.timedelta(minutes=2),
        batch_size=100,
        max_fraction=1.0,
        verify=True,
        scan=True,
        project="p",
    )


def test_a_target_may_sweep_every_namespace_but_not_name_one_too(tmp_path: Path) -> None:
    every, named = load(
        tmp_path,
        '[[target]]\nkind = "a"\nall_namespaces = true\n[[target]]\nkind = "b"\nnamespace = "n"\n',
    )
    assert (every.all_namespaces, every.namespace) == (True, None)
    assert (named.all_namespaces, named.namespace) == (False, "n")
    with pytest.raises(UsageError, match="cannot be combined with --namespace"):
        load(tmp_path, '[[target]]\nkind = "a"\nnamespace = "n"\nall_namespaces = true\n')


def test_base_values_reach_every_target_but_its_kind_does_not(tmp_path: Path) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text('[[target]]\nkind = "a"\n[[target]]\nproperty = "x"\n')
    base = {**BASE, "kind": "from-the-command-line", "workers": 2, "shard": Shard(1, 3)}
    with pytest.raises(UsageError, match="target 2: kind is required"):
        load_targets(path, base)
    path.write_text('[[target]]\nkind = "a"\n')
    (target,) = load_targets(path, base)
    assert (target.kind, target.workers, target.shard) == ("a", 2, Shard(1, 3))


def test_the_shipped_example_config_loads() -> None:
    """The runner stores every one of these properties as int epoch seconds (its marshmallow
    ``Timestamp`` field), submitted_at included; tests/integration/test_runner_data.py sweeps
    runner-shaped data with this very file."""
    example = Path(__file__).parents[2] / "deploy" / "sweeper.toml"
    targets = load_targets(example, dict(BASE))
    assert [(t.kind, t.prop, t.format, t.grace) for t in targets] == [
        ("eq-session", "expires_at", Encoding.EPOCH_SECONDS, dt.timedelta(hours=3)),
        ("questionnaire-state", "expires_at", Encoding.EPOCH_SECONDS, dt.timedelta(hours=3)),
        ("questionnaire-state", "submitted_at", Encoding.EPOCH_SECONDS, dt.timedelta(hours=1)),
    ]


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ('[[target]]\nkidn = "x"\n', "unknown key 'kidn'"),
        ('[[target]]\nproperty = "x"\n', "target 1: kind is required"),
        ("[defaults]\ngrace = '3h'\n", "no [[target]]"),
        ('[[target]]\nkind = "x"\n[extra]\na = 1\n', "unknown table(s) extra"),
        ('[[target]]\nkind = "x"\ngrace = "soon"\n', "target 1: invalid duration"),
        ('[[target]]\nkind = "x"\ngrace = "3M"\n', "target 1: invalid duration '3M'"),
        ('[defaults]\nmax_runtime = "\uff11\uff15m"\n[[target]]\nkind = "x"\n', "invalid duration"),
        ('[[target]]\nkind = "x"\ndatabase = "Ab"\n', "target 1: invalid database id 'Ab'"),
        ('[[target]]\nkind = "x"\ngrace = 3\n', "grace must be a str"),
        ('[[target]]\nkind = "x"\nmax_deletes = "10"\n', "max_deletes must be a int"),
        ('[[target]]\nkind = "x"\nverify = "yes"\n', "verify must be a bool"),
        ('[[target]]\nkind = "x"\nformat = "weird"\n', "invalid format"),
        ('[[target]]\nkind = "x"\nbatch_size = 501\n', "batch size"),
        ('[[target]]\nkind = "x"\nscan = true\n', "--scan needs an explicit --format"),
        ('[[target]]\nkind = "x"\nproject = "other"\n', "project applies to the whole run"),
        ('[[target]]\nkind = "x"\n[[target]]\nkind = ""\n', "target 2: kind must not be empty"),
        ("[[target]\nkind = 1", "invalid TOML"),
        ('[[target]]\nkind = "x"\ndry_run = true\n', "dry_run applies to the whole run"),
        ('[[target]]\nkind = "x"\nworkers = 2\n', "unknown key 'workers'"),
        ("[[target]]\nkind = 1\n", "kind must be a str, not 1"),
        ('[[target]]\nkind = "x"\nbatch_size = true\n', "batch_size must be a int, not True"),
        ('[[target]]\nkind = "x"\nmax_fraction = "1"\n', "max_fraction must be a number"),
        ('[[target]]\nkind = "x"\nmax_runtime = 60\n', "max_runtime must be a string, not 60"),
    ],
)
def test_a_bad_config_is_one_usage_error(tmp_path: Path, text: str, mentions: str) -> None:
    with pytest.raises(UsageError) as raised:
        load(tmp_path, text)
    assert mentions in raised.value.message
    assert "\n" not in raised.value.message


def test_an_unknown_key_is_told_the_known_ones_in_order(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as raised:
        load(tmp_path, '[[target]]\nkind = "x"\nkidn = "y"\n')
    assert (
        "unknown key 'kidn' (known: kind, property, format, grace, namespace, database, "
        "max_deletes, max_runtime, batch_size, max_fraction, verify, scan"
    ) in raised.value.message
    assert list(KEYS)[:3] == ["kind", "property", "format"]


def test_a_missing_file_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--config", "/nonexistent/sweeper.toml"]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_per_target_options_clash_with_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text('[[target]]\nkind = "x"\n')
    assert main(["sweep", "--config", str(path), "--grace", "1h"]) == 2
    assert "--grace cannot be combined with --config" in capsys.readouterr().err
    monkeypatch.setenv("SWEEPER_KIND", "eq-session")
    assert main(["sweep", "--config", str(path)]) == 2
    assert "--kind cannot be combined" in capsys.readouterr().err
    # All of them at once: named in the order of the file's keys.
    assert main(["sweep", "--config", str(path), "--scan", "--namespace", "n"]) == 2
    assert "--kind, --namespace, --scan cannot be combined" in capsys.readouterr().err


# A value for each per-target option that takes one (its default, where it has one).
SAMPLE = {"namespace": "n", "database": "sessions", "max_deletes": "5", "max_runtime": "1m"}


@pytest.mark.parametrize("name", [n for n, k in KEYS.items() if not k.overrides])
def test_every_per_target_option_clashes_with_config(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text('[[target]]\nkind = "x"\n')
    key = KEYS[name]
    (param,) = [p for p in sweep.params if p.name == key.field]
    assert isinstance(param, click.Option)
    value = [] if param.is_flag else [SAMPLE.get(name, str(param.default))]
    assert main(["sweep", "--config", str(path), flag(name), *value]) == 2
    assert f"{flag(name)} cannot be combined with --config" in capsys.readouterr().err


def test_the_cronjob_carries_the_same_targets_as_the_example(tmp_path: Path) -> None:
    deploy = Path(__file__).parents[2] / "deploy"
    documents = list(yaml.safe_load_all((deploy / "cronjob.yaml").read_text()))
    config_map = next(d for d in documents if d and d["kind"] == "ConfigMap")
    embedded = tmp_path / "embedded.toml"
    embedded.write_text(config_map["data"]["sweeper.toml"])
    assert load_targets(embedded, dict(BASE)) == load_targets(deploy / "sweeper.toml", dict(BASE))
    assert "SWEEPER_KIND" not in config_map["data"]  # would clash with --config
    # ... and the CronJob mounts that very key where SWEEPER_CONFIG points.
    cronjob = next(d for d in documents if d and d["kind"] == "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["configMap"]["name"] == "sweeper-config"]
    (item,) = volume["configMap"]["items"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert item["key"] == "sweeper.toml"
    assert config_map["data"]["SWEEPER_CONFIG"] == f"{mount['mountPath']}/{item['path']}"


# --- precedence: command line, then the target, then [defaults] ------------------------

PRECEDENCE = """
[defaults]
batch_size = 200

[[target]]
kind = "a"

[[target]]
kind = "b"
batch_size = 50
verify = false

[[target]]
kind = "c"
verify = true
"""


def test_a_target_beats_defaults_and_defaults_beat_the_built_in_values(tmp_path: Path) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text(PRECEDENCE)
    a, b, c = load_targets(path, dict(BASE))
    assert (a.batch_size, b.batch_size, c.batch_size) == (200, 50, 200)
    assert (a.verify, b.verify, c.verify) == (False, False, True)


def test_an_explicit_command_line_value_beats_the_file_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text(PRECEDENCE)
    with capture_logs() as logs:
        a, b, c = load_targets(path, dict(BASE), {"batch_size": 100, "verify": True})
    assert (a.batch_size, b.batch_size, c.batch_size) == (100, 100, 100)
    assert (a.verify, b.verify, c.verify) == (True, True, True)  # --verify is never dropped
    overridden = {(e["target"], e["option"]) for e in logs if e["event"] == "option_overridden"}
    assert overridden == {
        ("target 1", "batch_size"),
        ("target 2", "batch_size"),
        ("target 2", "verify"),
        ("target 3", "batch_size"),
    }


def test_the_command_line_cannot_switch_off_a_targets_verify(tmp_path: Path) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text(PRECEDENCE)
    with capture_logs() as logs:
        _a, _b, c = load_targets(path, dict(BASE), {"verify": False})
    assert c.verify is True
    (event,) = [e for e in logs if e["event"] == "option_overridden"]
    assert (event["option"], event["file"], event["command_line"], event["used"]) == (
        "verify",
        True,
        False,
        True,
    )


def test_verify_on_the_command_line_reaches_every_target_of_a_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text(PRECEDENCE)
    seen: list[SweepSettings] = []

    def record(targets: list[SweepSettings], *_args: Any, **_kwargs: Any) -> list[Any]:
        seen.extend(targets)
        return []

    monkeypatch.setattr(cli_module, "sweep_targets", record)
    assert main(["sweep", "--config", str(path), "--verify", "--log-format", "json"]) == 0
    assert [t.verify for t in seen] == [True, True, True]


def test_a_batch_size_variable_overrides_every_targets_but_not_a_targets_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sweeper.toml"
    path.write_text(PRECEDENCE)
    seen: list[SweepSettings] = []

    def record(targets: list[SweepSettings], *_args: Any, **_kwargs: Any) -> list[Any]:
        seen.extend(targets)
        return []

    monkeypatch.setattr(cli_module, "sweep_targets", record)
    monkeypatch.setenv("SWEEPER_BATCH_SIZE", "7")
    monkeypatch.setenv("SWEEPER_VERIFY", "false")
    assert main(["sweep", "--config", str(path), "--log-format", "json"]) == 0
    assert [(t.kind, t.batch_size, t.verify) for t in seen] == [
        ("a", 7, False),
        ("b", 7, False),
        ("c", 7, True),
    ]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--max-fraction", "1", "--max-runtime", "30m", "--max-deletes", "9"], {}),
        (
            [],
            {"SWEEPER_MAX_FRACTION": "1", "SWEEPER_MAX_RUNTIME": "30m", "SWEEPER_MAX_DELETES": "9"},
        ),
    ],
    ids=["command-line", "variables"],
)
def test_the_first_runs_limits_combine_with_config(
    args: list[str],
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The runbook's first run is the CronJob's file with --max-fraction 1: it was a usage
    error. The command line's value wins over the file's for every target, and says so."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "sweeper.toml"
    defaults = '[defaults]\nmax_runtime = "4m"\n\n'
    path.write_text(
        f'{defaults}[[target]]\nkind = "a"\n\n[[target]]\nkind = "b"\nmax_fraction = 0.2\n'
    )
    seen: list[list[SweepSettings]] = []

    def sweep_targets(targets: list[SweepSettings], *_args: Any, **_kwargs: Any) -> list[Any]:
        seen.append(targets)
        return []

    monkeypatch.setattr(cli_module, "sweep_targets", sweep_targets)

    assert main(["sweep", "--config", str(path), "--log-format", "json", *args]) == 0
    logs = [json.loads(line) for line in capsys.readouterr().err.splitlines()]

    (targets,) = seen
    assert [(t.max_fraction, t.max_runtime, t.max_deletes) for t in targets] == [
        (1.0, dt.timedelta(minutes=30), 9)
    ] * 2
    overridden = {(e["target"], e["option"]) for e in logs if e["event"] == "option_overridden"}
    assert overridden == {
        ("target 1", "max_runtime"),
        ("target 2", "max_runtime"),
        ("target 2", "max_fraction"),
    }
