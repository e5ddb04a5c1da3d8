"""Every tenant in one run (``--all-namespaces``), and named databases, on the real emulators.

Only the legacy emulator answers a ``__namespace__`` query, as production does; the Firestore
emulator in Datastore mode refuses it ("Namespace queries are not supported in the Datastore
Mode emulator"), so there the listing is shown to fail cleanly, and several namespaces of a
named database are swept as ``--config`` targets.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from google.cloud import datastore
from structlog.testing import capture_logs

from sweeper.encodings import Encoding
from sweeper.engine import sweep_targets
from sweeper.result import Runtime
from sweeper.retry import Retrier, RetryCounter, RetryPolicy
from sweeper.settings import SweepSettings
from sweeper.target import namespaces
from tests.integration.helpers import (
    ago,
    ahead,
    emulator_env,
    log_events,
    plain_lines,
    run_cli,
    seed,
    settings,
    stored,
    survivors,
)
from tests.support.emulator import Emulator

S = Encoding.EPOCH_SECONDS
TENANTS = [None, "tenant-a", "tenant.b", "t_3"]


def tenant_client(
    emulator: Emulator, namespace: str | None, database: str | None = None
) -> datastore.Client:
    with emulator_env(emulator.env):
        return datastore.Client(project=emulator.project, namespace=namespace, database=database)


def groups(n: int) -> dict[str, list[object]]:
    return {"expired": stored(ago(hours=2), S, n), "live": stored(ahead(hours=2), S, 5)}


def legacy_only(emulator: Emulator) -> None:
    if emulator.flavour == "firestore":
        pytest.skip("the Firestore emulator refuses namespace queries: see the test below")


def client_for(emulator: Emulator) -> Callable[[SweepSettings], datastore.Client]:
    def build(s: SweepSettings) -> datastore.Client:
        return tenant_client(emulator, s.namespace, s.database)

    return build


def test_every_namespace_loses_its_expired_sessions_and_keeps_its_live_ones(
    emulator: Emulator, kind: str
) -> None:
    legacy_only(emulator)
    seeded = {ns: groups(10 + i) for i, ns in enumerate(TENANTS)}
    for ns, g in seeded.items():
        seed(tenant_client(emulator, ns), kind, g)
    other = tenant_client(emulator, "no-such-kind-here")
    seed(other, f"{kind}-other", groups(3))  # a namespace without the kind: nothing to do

    with capture_logs() as logs:
        results = sweep_targets(
            [settings(kind, all_namespaces=True)], client_for(emulator), Runtime()
        )

    assert {r.settings.namespace: r.deleted for r in results} == {
        None: 10,
        "tenant-a": 11,
        "tenant.b": 12,
        "t_3": 13,
        "no-such-kind-here": 0,
    }
    for ns, g in seeded.items():
        assert survivors(tenant_client(emulator, ns), kind, g) == {"live"}, ns
    finished = [e for e in logs if e["event"] == "sweep_finished"]
    assert sorted(str(e["namespace"]) for e in finished) == sorted(
        str(ns) for ns in [*TENANTS, "no-such-kind-here"]
    )
    (run,) = [e for e in logs if e["event"] == "run_finished"]
    assert (run["swept"], run["namespaces"], run["deleted"], run["matched"]) == (5, 5, 46, 46)
    assert (run["stopped_reason"], run["failed_targets"]) == ("complete", [])


def test_all_namespaces_fails_when_no_namespace_holds_the_kind(
    emulator: Emulator, kind: str
) -> None:
    """One tenant without the kind is normal; none with it is a misspelt kind, not a success."""
    legacy_only(emulator)
    seed(tenant_client(emulator, "tenant-a"), f"{kind}-other", groups(3))

    done = run_cli(emulator, "--kind", kind, "--all-namespaces", "--log-format", "json")

    assert done.returncode == 1, done.stderr
    (line,) = plain_lines(done.stderr)
    assert f"nothing to sweep: no {kind} entity in any namespace carries expires_at" in line
    events = log_events(done.stderr)
    (run,) = [e for e in events if e["event"] == "run_finished"]
    assert run["stopped_reason"] == "error"
    assert all(e["stopped_reason"] == "complete" for e in events if e["event"] == "sweep_finished")

    allowed = run_cli(emulator, "--kind", kind, "--all-namespaces", "--allow-empty")
    assert allowed.returncode == 0, allowed.stderr


def test_the_namespaces_are_listed_page_by_page(emulator: Emulator, kind: str) -> None:
    legacy_only(emulator)
    client = tenant_client(emulator, None)
    names = [f"tenant-{i:04d}" for i in range(620)]  # more than a page of 500
    for start in range(0, len(names), 500):
        client.put_multi(
            [
                datastore.Entity(client.key(kind, "x", namespace=ns))
                for ns in names[start : start + 500]
            ]
        )
    counter = RetryCounter()

    pages = list(namespaces(client, Retrier(RetryPolicy(), counter)))

    # Pages of at most 500 (the legacy emulator answers 300 at a time), each one call.
    assert len(pages) > 1
    assert all(len(p) <= 500 for p in pages)
    assert sorted(n for p in pages for n in p if n is not None) == names
    assert counter.calls["query"] in (len(pages), len(pages) + 1)  # + an empty last answer


def test_the_run_stops_at_its_deadline_in_whichever_namespace_it_is(
    emulator: Emulator, kind: str
) -> None:
    legacy_only(emulator)
    for ns in ("a", "b", "c"):
        seed(tenant_client(emulator, ns), kind, groups(20))
    # Time passes as a namespace's sweep connects: 60 s for "b". The first namespace is swept
    # whole, "b" starts past the 50 s deadline and stops at once, and "c" is never started.
    offset = [0.0]
    build = client_for(emulator)

    def slow_for(s: SweepSettings) -> datastore.Client:
        if s.namespace == "b":
            offset[0] += 60
        return build(s)

    rt = Runtime(monotonic=lambda: time.monotonic() + offset[0])
    with capture_logs() as logs:
        results = sweep_targets(
            [settings(kind, all_namespaces=True, max_runtime=dt.timedelta(seconds=50))],
            slow_for,
            rt,
        )

    assert [(r.settings.namespace, r.deleted, r.stopped_reason) for r in results] == [
        ("a", 20, "complete"),
        ("b", 0, "max_runtime"),
    ]
    assert survivors(tenant_client(emulator, "c"), kind, groups(20)) == {"expired", "live"}
    (run,) = [e for e in logs if e["event"] == "run_finished"]
    assert (run["swept"], run["stopped_reason"]) == (2, "max_runtime")


def test_all_namespaces_through_the_cli(emulator: Emulator, kind: str) -> None:
    """On the legacy emulator the run sweeps each tenant; on the Firestore emulator, which
    refuses to list namespaces, it fails with one line and deletes nothing."""
    for ns in ("x", "y"):
        seed(tenant_client(emulator, ns), kind, groups(8))

    done = run_cli(emulator, "--kind", kind, "--all-namespaces", "--log-format", "json")

    events = log_events(done.stderr)
    if emulator.flavour == "firestore":
        assert done.returncode == 1, done.stderr
        assert "listing the namespaces failed" in done.stderr
        assert "Traceback" not in done.stderr
        assert len(plain_lines(done.stderr)) == 1
        assert [e["event"] for e in events if e["event"].endswith("_failed")] == [
            "namespaces_failed"
        ]
        expected = {"expired", "live"}
    else:
        assert done.returncode == 0, done.stderr
        expected = {"live"}
    for ns in ("x", "y"):
        assert survivors(tenant_client(emulator, ns), kind, groups(8)) == expected


def test_all_namespaces_with_a_namespace_is_a_usage_error(emulator: Emulator, kind: str) -> None:
    seed(tenant_client(emulator, "x"), kind, groups(3))

    done = run_cli(emulator, "--kind", kind, "--all-namespaces", "--namespace", "x")

    assert done.returncode == 2
    assert "cannot be combined with --namespace" in done.stderr
    assert survivors(tenant_client(emulator, "x"), kind, groups(3)) == {"expired", "live"}


def test_namespaces_of_a_named_database_as_config_targets(
    emulator: Emulator, kind: str, tmp_path: Path
) -> None:
    if emulator.flavour == "datastore":
        pytest.skip("the legacy emulator has no named databases")
    seeded = {ns: groups(6) for ns in ("t1", "t2")}
    for ns, g in seeded.items():
        seed(tenant_client(emulator, ns, "sessions"), kind, g)
    # The same kind and namespaces in the default database: not the target, left whole.
    for ns in seeded:
        seed(tenant_client(emulator, ns), kind, groups(6))
    config = tmp_path / "sweeper.toml"
    config.write_text(
        f'[defaults]\ndatabase = "sessions"\nmax_fraction = 1\n'
        f'[[target]]\nkind = "{kind}"\nnamespace = "t1"\n'
        f'[[target]]\nkind = "{kind}"\nnamespace = "t2"\n'
    )

    done = run_cli(emulator, "--config", str(config), "--log-format", "json")

    assert done.returncode == 0, done.stderr
    for ns, g in seeded.items():
        assert survivors(tenant_client(emulator, ns, "sessions"), kind, g) == {"live"}
        assert survivors(tenant_client(emulator, ns), kind, groups(6)) == {"expired", "live"}
    (run,) = [e for e in log_events(done.stderr) if e["event"] == "run_finished"]
    assert (run["swept"], run["namespaces"], run["deleted"]) == (2, 2, 12)


def test_a_dry_run_and_inspect_report_each_namespace(emulator: Emulator, kind: str) -> None:
    legacy_only(emulator)
    for ns, n in (("x", 4), ("y", 9)):
        seed(tenant_client(emulator, ns), kind, groups(n))

    dry = run_cli(emulator, "--kind", kind, "--all-namespaces", "--dry-run", "--log-format", "json")
    inspected = run_cli(emulator, "--kind", kind, "--all-namespaces", command="inspect")

    assert dry.returncode == 0, dry.stderr
    events = log_events(dry.stderr)
    # A forecast per namespace, of what its own sweep would delete.
    forecasts = [e["operations"]["deleted"] for e in events if e["event"] == "forecast"]
    assert sorted(forecasts) == [4, 9]
    assert inspected.returncode == 0, inspected.stderr
    reports = [json.loads(line) for line in inspected.stdout.splitlines()]
    assert {r["namespace"]: r["expired_count"] for r in reports} == {"x": 4, "y": 9}
    for ns, n in (("x", 4), ("y", 9)):
        assert survivors(tenant_client(emulator, ns), kind, groups(n)) == {"expired", "live"}
