"""Bad input against a real database full of expired sessions: one line, exit code, no deletes."""

from __future__ import annotations

import pytest
from google.cloud import datastore

from sweeper.cli import main
from sweeper.encodings import Encoding
from sweeper.testing.emulator import Emulator, free_port
from tests.integration.helpers import ago, group_names, remaining, seed, stored
from tests.unit.test_cli import BAD_ARGS

S = Encoding.EPOCH_SECONDS


@pytest.fixture
def doomed(client: datastore.Client, kind: str) -> list[str]:
    """Expired sessions that any sweep that got as far as deleting would remove."""
    groups = {"expired": stored(ago(days=1), S, 50)}
    seed(client, kind, groups)
    return group_names(groups, "expired")


def point_at(monkeypatch: pytest.MonkeyPatch, host: str, project: str) -> None:
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", host)
    monkeypatch.setenv("DATASTORE_PROJECT_ID", project)
    monkeypatch.setenv("SWEEPER_LOG_FORMAT", "json")


def the_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sweeper: error: ")
    return lines[0]


@pytest.mark.parametrize(("args", "mentions"), BAD_ARGS)
def test_a_bad_option_deletes_nothing(
    emulator: Emulator,
    client: datastore.Client,
    kind: str,
    doomed: list[str],
    args: list[str],
    mentions: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, emulator.host, emulator.project)

    assert main(["sweep", "--kind", kind, "--grace", "0", *args]) == 2

    assert mentions in the_error(capsys.readouterr().err)
    assert remaining(client, kind, doomed) == set(doomed)


def test_an_unreachable_host_is_exit_1_with_one_line(
    emulator: Emulator,
    client: datastore.Client,
    kind: str,
    doomed: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, f"127.0.0.1:{free_port()}", emulator.project)

    assert main(["sweep", "--kind", kind]) == 1

    assert "ServiceUnavailable" in the_error(capsys.readouterr().err)
    assert remaining(client, kind, doomed) == set(doomed)


def test_another_project_never_touches_this_one(
    emulator: Emulator,
    client: datastore.Client,
    kind: str,
    doomed: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, emulator.host, emulator.project)

    # An emulator serves any project id; production answers PermissionDenied (exit 1) instead.
    code = main(["sweep", "--kind", kind, "--project", "some-other-project"])

    assert code == 0
    assert '"deleted": 0' in capsys.readouterr().out
    assert remaining(client, kind, doomed) == set(doomed)
