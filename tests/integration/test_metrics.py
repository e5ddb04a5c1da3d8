"""``push_summary`` against a real Prometheus Pushgateway, started here on a free loopback port.

The point these tests prove is one the unit tests cannot: that the Pushgateway's POST
(``pushadd``) keeps a group's ``sweeper_last_success_timestamp_seconds`` when a later, failed
run pushes without it, and that each target keeps its own group.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sweeper.metrics import BasicAuth, MetricsError, push_summary
from tests.support.emulator import free_port

pytestmark = pytest.mark.integration

BINARY = "/usr/bin/prometheus-pushgateway"  # Debian's prometheus-pushgateway; .ci/run installs it
T_OK, T_FAIL = 1_717_243_200.0, 1_717_246_800.0


@dataclass
class Pushgateway:
    """One Pushgateway in its own process group, metrics in memory only, stopped by its pid."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path
    auth: tuple[str, str] | None = None  # basic auth, when started with a web config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str, timeout: float) -> Any:
        request = urllib.request.Request(f"{self.url}{path}")
        if self.auth is not None:
            token = base64.b64encode(":".join(self.auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return urllib.request.urlopen(request, timeout=timeout)

    def healthy(self) -> bool:
        try:
            with self._get("/-/healthy", 1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every series of ``name`` the gateway exposes, as (labels, value)."""
        with self._get("/metrics", 5) as response:
            text = response.read().decode()
        return [
            (dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The one series of ``name`` whose labels include ``labels``, or None if none does."""
        found = [v for got, v in self.samples(name) if labels.items() <= got.items()]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
        return found[0] if found else None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_pushgateway(
    workdir: Path,
    binary: str = BINARY,
    timeout_s: float = 10.0,
    auth: tuple[str, str] | None = None,
) -> Pushgateway:
    """With ``auth``, behind HTTP basic auth for that user (its web config, bcrypt-hashed)."""
    port, log = free_port(), workdir / "pushgateway.log"
    web: list[str] = []
    if auth is not None:
        hashed = bcrypt.hashpw(auth[1].encode(), bcrypt.gensalt(rounds=4)).decode()
        config = workdir / "web.yml"
        config.write_text(f"basic_auth_users:\n  {auth[0]}: '{hashed}'\n")
        web = [f"--web.config.file={config}"]
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--web.listen-address=127.0.0.1:{port}",
                "--persistence.file=",  # in memory: Debian's default writes under /var/lib
                *web,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=workdir,
        )
    gateway = Pushgateway(port, process, log, auth)
    deadline = time.monotonic() + timeout_s
    while not gateway.healthy():
        if process.poll() is not None or time.monotonic() > deadline:
            gateway.stop()
            tail = " | ".join(log.read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(f"Pushgateway did not start on port {port}: {tail}")
        time.sleep(0.05)
    return gateway


def pushgateway_binary() -> str | None:
    """Debian's binary, else one on PATH (a release tarball's is called ``pushgateway``)."""
    for candidate in (BINARY, shutil.which("prometheus-pushgateway"), shutil.which("pushgateway")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def under_ci() -> bool:
    """CI services set CI (``true``, ``1``); ``CI=false`` or an empty CI is a developer's run."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def pushgateway() -> Iterator[Pushgateway]:
    binary = pushgateway_binary()
    if binary is None:
        reason = (
            f"Pushgateway NOT TESTED: no {BINARY} and no pushgateway on PATH, so --pushgateway "
            "is not checked against a real gateway (apt-get install prometheus-pushgateway)"
        )
        if under_ci():
            pytest.fail(f"{reason}; CI must have it, and .ci/run installs it", pytrace=False)
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="sweeper-pgw-"))
    gateway = start_pushgateway(workdir, binary)
    try:
        yield gateway
    finally:
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def summary(kind: str = "eq-session", **overrides: Any) -> dict[str, Any]:
    """A ``sweep_finished`` summary as the engine logs it (default namespace and database)."""
    fields: dict[str, Any] = {
        "project": "eq-prod",
        "kind": kind,
        "namespace": None,
        "database": None,
        "property": "expires_at",
        "shard": "0/1",
        "format": "epoch-seconds",
        "cutoff": "2024-06-01T09:00:00Z",
        "dry_run": False,
        "verify": False,
        "matched": 1200,
        "deleted": 1200,
        "skipped": 0,
        "failed": 0,
        "retries": 2,
        "batches": 3,
        "duration_s": 4.25,
        "stopped_reason": "complete",
    }
    return {**fields, **overrides}


def failure(kind: str = "eq-session") -> dict[str, Any]:
    return summary(
        kind, deleted=700, failed=500, stopped_reason="error", error="deleting a batch failed"
    )


def target(kind: str = "eq-session") -> dict[str, str]:
    return {
        "job": "sweeper",
        "project": "eq-prod",
        "kind": kind,
        "namespace": "(default)",
        "database": "(default)",
        "property": "expires_at",
        "shard": "0/1",
    }


def test_the_shards_of_one_target_keep_their_own_figures(pushgateway: Pushgateway) -> None:
    for index, deleted in enumerate((100, 200, 300)):
        data = summary(shard=f"{index}/3", deleted=deleted)
        push_summary(pushgateway.url, data, now=lambda: T_OK)
    for index, deleted in enumerate((100, 200, 300)):
        labels = {**target(), "shard": f"{index}/3"}
        assert pushgateway.value("sweeper_deleted", **labels) == float(deleted)


def test_a_success_shows_every_gauge_under_the_targets_labels(pushgateway: Pushgateway) -> None:
    push_summary(pushgateway.url, summary(), now=lambda: T_OK)
    expected = {
        "sweeper_last_run_timestamp_seconds": T_OK,
        "sweeper_last_success_timestamp_seconds": T_OK,
        "sweeper_last_run_success": 1.0,
        "sweeper_dry_run": 0.0,
        "sweeper_matched": 1200.0,
        "sweeper_deleted": 1200.0,
        "sweeper_skipped": 0.0,
        "sweeper_failed": 0.0,
        "sweeper_retries": 2.0,
        "sweeper_batches": 3.0,
        "sweeper_duration_seconds": 4.25,
    }
    for name, value in expected.items():
        # The gateway adds instance="" to a group that has no instance label.
        assert pushgateway.samples(name) == [({**target(), "instance": ""}, value)], name
    assert pushgateway.samples("sweeper_stopped_reason") == [
        ({**target(), "instance": "", "reason": "complete"}, 1.0)
    ]


def test_a_failed_run_keeps_the_last_success_time(pushgateway: Pushgateway) -> None:
    push_summary(pushgateway.url, summary(), now=lambda: T_OK)
    push_summary(pushgateway.url, failure(), now=lambda: T_FAIL)

    assert pushgateway.value("sweeper_last_success_timestamp_seconds", **target()) == T_OK
    assert pushgateway.value("sweeper_last_run_timestamp_seconds", **target()) == T_FAIL
    assert pushgateway.value("sweeper_last_run_success", **target()) == 0.0
    assert pushgateway.value("sweeper_failed", **target()) == 500.0
    assert pushgateway.value("sweeper_deleted", **target()) == 700.0
    # The whole family is replaced: the old reason="complete" series is gone.
    reasons = [labels["reason"] for labels, _ in pushgateway.samples("sweeper_stopped_reason")]
    assert reasons == ["error"]


def test_a_success_after_a_failure_moves_the_success_time(pushgateway: Pushgateway) -> None:
    push_summary(pushgateway.url, failure(), now=lambda: T_OK)
    assert pushgateway.samples("sweeper_last_success_timestamp_seconds") == []
    push_summary(pushgateway.url, summary(), now=lambda: T_FAIL)
    assert pushgateway.value("sweeper_last_success_timestamp_seconds", **target()) == T_FAIL
    assert pushgateway.value("sweeper_last_run_success", **target()) == 1.0
    assert pushgateway.value("sweeper_failed", **target()) == 0.0


def test_a_dry_run_keeps_the_last_success_time(pushgateway: Pushgateway) -> None:
    push_summary(pushgateway.url, summary(), now=lambda: T_OK)
    push_summary(pushgateway.url, summary(dry_run=True, deleted=0), now=lambda: T_FAIL)

    # A dry run deleted nothing: alerts on the time since the last success still see T_OK.
    assert pushgateway.value("sweeper_last_success_timestamp_seconds", **target()) == T_OK
    assert pushgateway.value("sweeper_last_run_timestamp_seconds", **target()) == T_FAIL
    assert pushgateway.value("sweeper_dry_run", **target()) == 1.0


def test_one_kind_in_two_projects_keeps_two_groups(pushgateway: Pushgateway) -> None:
    push_summary(pushgateway.url, summary(), now=lambda: T_OK)
    push_summary(pushgateway.url, failure() | {"project": "eq-staging"}, now=lambda: T_FAIL)

    staging = target() | {"project": "eq-staging"}
    assert pushgateway.value("sweeper_last_run_success", **target()) == 1.0
    assert pushgateway.value("sweeper_last_run_success", **staging) == 0.0
    assert pushgateway.value("sweeper_last_success_timestamp_seconds", **target()) == T_OK


def test_two_targets_keep_separate_groups(pushgateway: Pushgateway) -> None:
    push_summary(pushgateway.url, summary("eq-session"), now=lambda: T_OK)
    push_summary(pushgateway.url, summary("questionnaire-state", deleted=5), now=lambda: T_OK)
    push_summary(pushgateway.url, failure("questionnaire-state"), now=lambda: T_FAIL)

    session, state = target("eq-session"), target("questionnaire-state")
    assert pushgateway.value("sweeper_deleted", **session) == 1200.0
    assert pushgateway.value("sweeper_last_run_success", **session) == 1.0
    assert pushgateway.value("sweeper_last_run_timestamp_seconds", **session) == T_OK
    assert pushgateway.value("sweeper_deleted", **state) == 700.0
    assert pushgateway.value("sweeper_last_run_success", **state) == 0.0
    assert pushgateway.value("sweeper_last_success_timestamp_seconds", **state) == T_OK
    assert len(pushgateway.samples("sweeper_failed")) == 2


def test_named_targets_and_awkward_kind_names_round_trip(pushgateway: Pushgateway) -> None:
    data = summary("dev eq/session", namespace="prod", database="sessions-db")
    push_summary(pushgateway.url, data, job="sweeper-dev", now=lambda: T_OK)
    labels = {
        "job": "sweeper-dev",
        "kind": "dev eq/session",  # base64 in the push path, plain in the exposition
        "namespace": "prod",
        "database": "sessions-db",
        "property": "expires_at",
        "shard": "0/1",
    }
    assert pushgateway.value("sweeper_deleted", **labels) == 1200.0


def test_a_push_the_gateway_rejects_is_a_metrics_error(pushgateway: Pushgateway) -> None:
    # Another job already pushed sweeper_failed as a counter: a gauge of that name is
    # inconsistent, and the Pushgateway answers 400 with its reason.
    other = urllib.request.Request(
        f"{pushgateway.url}/metrics/job/other",
        data=b"# TYPE sweeper_failed counter\nsweeper_failed 1\n",
        method="POST",
    )
    urllib.request.urlopen(other, timeout=5).close()
    with pytest.raises(MetricsError) as info:
        push_summary(pushgateway.url, summary())
    message = info.value.message
    assert message.startswith(f"Pushgateway {pushgateway.url} refused the push: HTTP 400: ")
    assert "\n" not in message
    assert pushgateway.samples("sweeper_deleted") == []  # nothing of the push was kept


def test_a_stopped_gateway_is_a_metrics_error(pushgateway: Pushgateway) -> None:
    pushgateway.stop()
    with pytest.raises(
        MetricsError, match=f"^could not push metrics to Pushgateway {pushgateway.url}"
    ):
        push_summary(pushgateway.url, summary(), timeout_s=2.0)


def test_a_gateway_behind_basic_auth_takes_the_push_with_the_password(tmp_path: Path) -> None:
    binary = pushgateway_binary()
    if binary is None:
        pytest.skip("no Pushgateway binary: see the fixture above")
    gateway = start_pushgateway(tmp_path, binary, auth=("sweeper", "s3cret"))
    try:
        with pytest.raises(MetricsError, match="HTTP 401"):
            push_summary(gateway.url, summary(), now=lambda: T_OK)
        with pytest.raises(MetricsError, match="HTTP 401"):
            push_summary(gateway.url, summary(), handler=BasicAuth("sweeper", "wrong").handler)

        push_summary(
            gateway.url, summary(), now=lambda: T_OK, handler=BasicAuth("sweeper", "s3cret").handler
        )

        assert gateway.value("sweeper_last_success_timestamp_seconds", **target()) == T_OK
    finally:
        gateway.stop()
