"""The shipped manifests' deadlines cover the worst case of what they run (no cluster needed).

Kubernetes kills a Job at ``activeDeadlineSeconds``; sweeper must always stop itself first, so
that every target logs its ``sweep_finished`` with ``stopped_reason: max_runtime`` instead of
dying mid-batch without a summary. Per target the worst case is its ``max_runtime`` (checked
before each batch) + one call stuck until its deadline (``CALL_TIMEOUT_S``) + the time to stop
and log (``STOP_BUDGET_S``); targets run one after another, so they add up. (That the embedded
``sweeper.toml`` equals ``deploy/sweeper.toml`` is checked in ``test_config.py``.)
"""

from __future__ import annotations

import configparser
import datetime as dt
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement

from sweeper.retry import CALL_TIMEOUT_S, STOP_BUDGET_S
from sweeper.settings import (
    DEFAULT_GRACE,
    DEFAULT_PROPERTY,
    SweepSettings,
    load_targets,
    parse_duration,
)

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


def test_the_backlog_job_deadline_covers_every_target_of_the_config(tmp_path: Path) -> None:
    """The Job sweeps the CronJob's own targets (its ConfigMap), each at the Job's
    --max-runtime, which wins over the file's; they run one after another in each pod."""
    (job,) = documents("backlog/job.yaml")
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"][1:])
    assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == ["sweeper-config"]
    config_map = next(d for d in documents("cronjob.yaml") if d["kind"] == "ConfigMap")
    mount = container["volumeMounts"][0]["mountPath"]
    assert config_map["data"]["SWEEPER_CONFIG"] == f"{mount}/sweeper.toml"
    embedded = tmp_path / "sweeper.toml"
    embedded.write_text(config_map["data"]["sweeper.toml"])
    max_runtime = parse_duration(args["max-runtime"])
    targets = load_targets(embedded, dict(BASE), {"max_runtime": max_runtime})
    assert {t.max_runtime for t in targets} == {max_runtime}
    assert {(t.kind, t.prop) for t in targets} >= {
        ("eq-session", "expires_at"),
        ("questionnaire-state", "expires_at"),
        ("questionnaire-state", "submitted_at"),
    }
    assert args["max-fraction"] == "1"
    assert args["shard"] == f"$(JOB_COMPLETION_INDEX)/{job['spec']['completions']}"

    assert worst_case_s(targets) <= job["spec"]["activeDeadlineSeconds"]


def rendered(path: str) -> list[dict[str, Any]]:
    """What `kubectl apply -k` applies: the manifests with deploy/site's values."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / path)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_the_site_sets_project_image_schedule_and_namespace_in_one_place() -> None:
    """Operators replaced PROJECT_ID by hand in three files; now one file holds their values."""
    site = yaml.safe_load((DEPLOY / "site" / "kustomization.yaml").read_text())
    (image,) = site["images"]
    want = f"{image['newName']}:{image['newTag']}"
    cron = {d["kind"]: d for d in rendered(".")}
    (job,) = rendered("backlog")
    project = cron["ConfigMap"]["data"]["SWEEPER_PROJECT"]
    assert project != "PROJECT_ID"
    annotation = cron["ServiceAccount"]["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert annotation == f"sweeper@{project}.iam.gserviceaccount.com"
    pods = [cron["CronJob"]["spec"]["jobTemplate"]["spec"]["template"], job["spec"]["template"]]
    assert [p["spec"]["containers"][0]["image"] for p in pods] == [want, want]
    everything = [*cron.values(), job]
    assert {d["metadata"]["namespace"] for d in everything} == {site["namespace"]}
    assert "PROJECT_ID" not in yaml.safe_dump_all(everything)
    assert cron["CronJob"]["spec"]["schedule"] == "*/15 * * * *"


# --- What the deployment grants and what the image is built from ---------------------------

ROOT = DEPLOY.parent


def test_no_pod_mounts_a_kubernetes_api_token() -> None:
    # sweeper never calls the Kubernetes API; Workload Identity does not need the token.
    cron = {d["kind"]: d for d in documents("cronjob.yaml")}
    (job,) = documents("backlog/job.yaml")
    assert cron["ServiceAccount"]["automountServiceAccountToken"] is False
    pods = [cron["CronJob"]["spec"]["jobTemplate"]["spec"]["template"], job["spec"]["template"]]
    assert [p["spec"]["automountServiceAccountToken"] for p in pods] == [False, False]


def test_the_role_binding_is_held_to_the_swept_database() -> None:
    readme = (DEPLOY / "README.md").read_text()
    binding = readme[readme.index("gcloud projects add-iam-policy-binding") :]
    binding = binding[: binding.index("```")]
    assert "--condition=None" not in binding
    assert re.search(
        r"--condition='expression=resource\.name == \"projects/PROJECT_ID/databases/\(default\)\"",
        binding,
    ), binding
    assert "What the condition limits" in readme


def test_the_role_grants_what_all_namespaces_lists_with() -> None:
    for name in ("sweeper-role.yaml", "sweeper-readonly-role.yaml"):
        role = yaml.safe_load((DEPLOY / "iam" / name).read_text())
        assert "datastore.databases.getMetadata" in role["includedPermissions"], name


def locked() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: each pinned name with its version and hashes."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec, *options = line.split("--hash=")
        name, version = spec.strip().split("==")
        entries[name.lower()] = (version, [o.strip() for o in options])
    return entries


def test_every_dependency_is_locked_with_its_hashes() -> None:
    entries = locked()
    assert all(
        hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes)
        for _version, hashes in entries.values()
    ), entries
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    for line in parser["options"]["install_requires"].split("\n"):
        if not line.strip():
            continue
        wanted = Requirement(line)
        assert wanted.name.lower() in entries, f"{wanted.name} is not in requirements.lock"
        version = entries[wanted.name.lower()][0]
        assert wanted.specifier.contains(version), f"{wanted.name} {version} is not {wanted}"


def test_the_image_installs_only_the_lock_on_a_base_pinned_by_digest() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:[\w.-]+@sha256:[0-9a-f]{64}", base.group(1))
    run = " ".join(dockerfile.replace("\\\n", " ").split())
    assert "pip download --require-hashes --no-deps --only-binary :all:" in run
    assert "-r requirements.lock" in run
    assert "--no-build-isolation" in run  # the base's setuptools: nothing unpinned fetched
    assert "pip install --no-index --no-deps" in run
    # Whatever the Dockerfile copies, the build context lets in.
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = re.findall(r"^COPY (?!--)(.+) \S+$", dockerfile, re.MULTILINE)
    sources = {name for line in copied for name in line.split()}
    assert sources <= allowed, sources - allowed


def test_the_package_installs_under_a_name_of_its_own_with_its_license() -> None:
    """`pip install sweeper` installs an unrelated 2014 package ("Find duplicate files")."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    metadata = parser["metadata"]
    assert metadata["name"] == "datastore-sweeper"
    assert "sweeper = sweeper.__main__:main" in parser["options.entry_points"]["console_scripts"]
    assert metadata["license"] == "Apache-2.0"
    assert metadata["license_files"] == "LICENSE"
    assert (
        "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
    )
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog
    assert f"## {metadata['version']} - " in changelog
