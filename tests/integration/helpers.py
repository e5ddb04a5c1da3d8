"""Helpers shared by the integration tests: seeding, sweeping, and reading what is left."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.engine import Runtime, Sweep, SweepResult
from sweeper.settings import FormatChoice, SweepSettings
from sweeper.testing.emulator import Emulator
from sweeper.testing.seed import Session, encode, put_sessions


@contextmanager
def emulator_env(env: dict[str, str]) -> Iterator[None]:
    """The client reads DATASTORE_EMULATOR_HOST when it is built; point it at one emulator."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_client(emu: Emulator, namespace: str | None = None) -> datastore.Client:
    with emulator_env(emu.env):
        return datastore.Client(project=emu.project, namespace=namespace)


def ago(**delta: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(**delta)


def ahead(**delta: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(**delta)


def stored(instant: dt.datetime, encoding: Encoding, count: int) -> list[object]:
    """``count`` copies of ``instant`` as ``encoding`` stores it."""
    return [encode(instant, encoding)] * count


def settings(kind: str, fmt: FormatChoice = "auto", **overrides: Any) -> SweepSettings:
    values: dict[str, Any] = {
        "kind": kind,
        "prop": "expires_at",
        "format": fmt,
        "grace": dt.timedelta(minutes=15),
    }
    values.update(overrides)
    return SweepSettings(**values)


def sweep(
    client: datastore.Client,
    kind: str,
    fmt: FormatChoice = "auto",
    runtime: Runtime | None = None,
    **overrides: Any,
) -> SweepResult:
    return Sweep(settings(kind, fmt, **overrides), client, runtime).run()


def seed(client: datastore.Client, kind: str, groups: Mapping[str, Sequence[object]]) -> None:
    """Write sessions named ``<group>-<i>`` with the given expiry values."""
    put_sessions(
        client,
        kind,
        [
            Session(f"{group}-{i}", expiry)
            for group, expiries in groups.items()
            for i, expiry in enumerate(expiries)
        ],
    )


def remaining(client: datastore.Client, kind: str, names: Sequence[str]) -> set[str]:
    """Which of ``names`` still exist, by key lookup (strongly consistent, unlike queries)."""
    found: set[str] = set()
    for start in range(0, len(names), 1000):
        keys = [client.key(kind, name) for name in names[start : start + 1000]]
        found.update(entity.key.name for entity in client.get_multi(keys))
    return found


def group_names(groups: Mapping[str, Sequence[object]], *wanted: str) -> list[str]:
    return [f"{g}-{i}" for g in wanted for i in range(len(groups[g]))]


def start_slow_sweep(emu: Emulator, kind: str, *args: str) -> subprocess.Popen[str]:
    """A real ``sweeper sweep`` process deleting one key per commit (long enough to interrupt),
    returned once it has started deleting."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweeper",
            "sweep",
            "--kind",
            kind,
            "--batch-size",
            "1",
            "--log-format",
            "json",
            *args,
        ],
        env={**os.environ, **emu.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "query_range":
            break
    return proc


def run_cli(emulator: Emulator, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sweeper", "sweep", *args],
        env={**os.environ, **emulator.env, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
