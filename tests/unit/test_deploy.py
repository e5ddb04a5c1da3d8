"""The shipped manifests' deadlines cover the worst case of what they run (no cluster needed).

Kubernetes kills a Job at ``activeDeadlineSeconds``; sweeper must always stop itself first, so
that every target logs its ``sweep_finished`` with ``stopped_reason: max_runtime`` instead of
dying mid-batch without a summary. Per target the worst case is its ``max_runtime`` (checked
before each batch) + one call stuck until its deadline (``CALL_TIMEOUT_S``) + the time to stop
and log (``STOP_BUDGET_S``); targets run one after another, so they add up. (That the embedded
``sweeper.toml`` equals ``deploy/sweeper.toml`` is checked in ``test_config.py``.)
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import yaml

from sweeper.config import load_targets
from sweeper.retry import CALL_TIMEOUT_S, STOP_BUDGET_S
from sweeper.settings import DEFAULT_GRACE, DEFAULT_PROPERTY, SweepSettings, parse_duration

DEPLOY = Path(__file__).parents[2] / "deploy"
# The command-line defaults load_targets starts from, as `sweeper sweep --config` passes them.
BASE: dict[str, Any] = {
    "prop": DEFAULT_PROPERTY,
    "format": "auto",
    "grace": parse_duration(DEFAULT_GRACE),
    "project": "p",
}


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def worst_case_s(targets: list[SweepSettings]) -> float:
    total = 0.0
    for target in targets:
        assert target.max_runtime is not None, f"{target.kind}.{target.prop}: no max_runtime"
        total += target.max_runtime.total_seconds() + CALL_TIMEOUT_S + STOP_BUDGET_S
    return total


def test_the_retry_constants_are_the_ones_the_manifests_assume() -> None:
    # The manifests' comments spell these figures out; change them together.
    assert (CALL_TIMEOUT_S, STOP_BUDGET_S) == (20.0, 10.0)


def test_the_cronjob_deadline_covers_every_target_of_its_config(tmp_path: Path) -> None:
    docs = documents("cronjob.yaml")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    cronjob = next(d for d in docs if d["kind"] == "CronJob")
    assert "SWEEPER_MAX_RUNTIME" not in config_map["data"]  # would be every target's default
    embedded = tmp_path / "sweeper.toml"
    embedded.write_text(config_map["data"]["sweeper.toml"])
    targets = load_targets(embedded, dict(BASE))
    deadline = cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]

    assert worst_case_s(targets) <= deadline, (
        f"{len(targets)} targets x (max_runtime + {CALL_TIMEOUT_S:g} s + {STOP_BUDGET_S:g} s) "
        f"= {worst_case_s(targets):g} s exceed activeDeadlineSeconds {deadline}"
    )
    # With concurrencyPolicy Forbid, a run longer than the interval would skip the next slot.
    assert cronjob["spec"]["schedule"] == "*/15 * * * *"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert deadline <= dt.timedelta(minutes=15).total_seconds()


def test_the_backlog_job_deadline_covers_its_one_target() -> None:
    (job,) = documents("backlog-job.yaml")
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"][1:])
    assert "config" not in args  # one target, from the command line
    env = {e["name"] for e in container.get("env", [])} | {
        ref["configMapRef"]["name"] for ref in container.get("envFrom", [])
    }
    assert "SWEEPER_CONFIG" not in env
    assert "sweeper-config" not in env  # the CronJob's ConfigMap would bring SWEEPER_CONFIG
    max_runtime = parse_duration(args["max-runtime"]).total_seconds()

    worst = max_runtime + CALL_TIMEOUT_S + STOP_BUDGET_S
    assert worst <= job["spec"]["activeDeadlineSeconds"]
