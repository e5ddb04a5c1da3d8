"""Bad input against a real database full of expired sessions: one line, exit code, no deletes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import pytest
from google.cloud import datastore

from sweeper.cli import main
from sweeper.encodings import Encoding
from sweeper.settings import DEFAULT_KIND
from tests.integration.helpers import (
    ago,
    group_names,
    make_client,
    plain_lines,
    remaining,
    run_cli,
    seed,
    stored,
)
from tests.support.emulator import Emulator, free_port
from tests.unit.test_cli import BAD_ARGS

S = Encoding.EPOCH_SECONDS


@dataclass
class Doomed:
    """Sessions expired a day ago, which sweeper's default settings sweep, in three places.

    The command under test names a private namespace and a kind of its own. Were a bad option
    dropped, that command would sweep the first set; were a bad ``--kind`` or ``--namespace``
    replaced by its default, the run would sweep the default kind in that namespace, or the
    kind in the default namespace: a set waits in each. (A reserved kind such as ``__x__``
    cannot hold entities, so a sweep of it, had it been allowed, could not delete anything.)
    """

    kind: str
    namespace: str
    places: dict[str, tuple[datastore.Client, str]]

    @property
    def command(self) -> list[str]:
        """What the tests run: only the target, every other setting at its default."""
        return ["sweep", "--namespace", self.namespace, "--kind", self.kind]

    def seed(self) -> None:
        for client, kind in self.places.values():
            seed(client, kind, GROUPS)

    def left(self) -> dict[str, int]:
        """How many of each place's sessions are still there."""
        return {
            place: len(remaining(client, kind, NAMES))
            for place, (client, kind) in self.places.items()
        }


GROUPS = {"expired": stored(ago(days=1), S, 50)}
NAMES = group_names(GROUPS, "expired")
ALL = {"target": 50, "default kind": 50, "default namespace": 50}


@pytest.fixture
def doomed(emulator: Emulator, client: datastore.Client, kind: str) -> Doomed:
    namespace = f"bad-input-{uuid.uuid4().hex[:10]}"
    private = make_client(emulator, namespace=namespace)
    places = {
        "target": (private, kind),
        "default kind": (private, DEFAULT_KIND),
        "default namespace": (client, kind),
    }
    found = Doomed(kind, namespace, places)
    found.seed()
    return found


def point_at(monkeypatch: pytest.MonkeyPatch, host: str, project: str) -> None:
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", host)
    monkeypatch.setenv("DATASTORE_PROJECT_ID", project)
    monkeypatch.setenv("SWEEPER_LOG_FORMAT", "json")
    # The doomed sets are all expired: the fraction guard (test_guards.py) would refuse them
    # and take the data out of harm's way, which is not what these tests are about.
    monkeypatch.setenv("SWEEPER_MAX_FRACTION", "1")


def the_error(err: str) -> str:
    assert "Traceback" not in err
    lines = plain_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("sweeper: error: ")
    return lines[0]


def test_the_doomed_sessions_are_what_the_defaults_sweep(
    emulator: Emulator,
    doomed: Doomed,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: each set is swept by a run that falls back to the defaults, so the tests
    below, which find every set intact after a bad option or variable, prove a refusal."""
    point_at(monkeypatch, emulator.host, emulator.project)

    assert main(["sweep", "--namespace", doomed.namespace]) == 0
    assert doomed.left() == {**ALL, "default kind": 0}
    assert main(["sweep", "--kind", doomed.kind]) == 0
    assert doomed.left() == {**ALL, "default kind": 0, "default namespace": 0}
    assert main(doomed.command) == 0
    assert doomed.left() == {"target": 0, "default kind": 0, "default namespace": 0}


@pytest.mark.parametrize(("args", "mentions"), BAD_ARGS)
def test_a_bad_option_deletes_nothing(
    emulator: Emulator,
    doomed: Doomed,
    args: list[str],
    mentions: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, emulator.host, emulator.project)

    assert main([*doomed.command, *args]) == 2

    assert mentions in the_error(capsys.readouterr().err)
    # Without the bad option the same command deletes the target set (the control above).
    assert doomed.left() == ALL


# A variable that is set but empty (or blank) was read by click as unset, so the run fell back
# to the option's default: each case names the set of sessions that default would have swept.
BAD_VARIABLES = [
    pytest.param("SWEEPER_KIND", "", "default kind", "set but empty", id="kind-empty"),
    pytest.param("SWEEPER_KIND", "  ", "default kind", "set but empty", id="kind-blank"),
    pytest.param(
        "SWEEPER_NAMESPACE", "", "default namespace", "set but empty", id="namespace-empty"
    ),
    pytest.param("SWEEPER_GRACE", "", "target", "set but empty", id="grace-empty"),
    pytest.param("SWEEPER_GRACE", " ", "target", "set but empty", id="grace-blank"),
    pytest.param("SWEEPER_MAX_RATE", "inf", "target", "finite number", id="max-rate-inf"),
    pytest.param("SWEEPER_PUSHGATEWAY", "not a url", "target", "Pushgateway", id="pushgateway"),
    pytest.param("SWEEPER_SHARD", "0/1000000000", "target", "at most 10000", id="shard-too-many"),
]


@pytest.mark.parametrize(("name", "value", "place", "mentions"), BAD_VARIABLES)
def test_a_bad_variable_deletes_nothing(
    emulator: Emulator, doomed: Doomed, name: str, value: str, place: str, mentions: str
) -> None:
    """The real CLI in its own process, so the variable reaches it as a shell would set it."""
    # Without the variable's option on the command line: the run takes its value from the
    # variable, or (as click read an empty one) from the option's default.
    args = {
        "SWEEPER_KIND": ["--namespace", doomed.namespace],
        "SWEEPER_NAMESPACE": ["--kind", doomed.kind],
    }.get(name, doomed.command[1:])

    proc = run_cli(emulator, *args, **{name: value})

    assert proc.returncode == 2, proc.stderr
    line = the_error(proc.stderr)
    assert name in line
    assert mentions in line
    assert proc.stderr.count("\n") == 1  # not even sweep_started: nothing was read
    # Without the variable the same command deletes ``place`` (the control above).
    assert doomed.left() == ALL


def test_an_unreachable_host_is_exit_1_with_one_line(
    emulator: Emulator,
    doomed: Doomed,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # First the same command in this process against the real host deletes the target set: it
    # was at risk, and anything the process keeps from a run (a cached client, a host read once)
    # is now pointing at the data.
    point_at(monkeypatch, emulator.host, emulator.project)
    assert main(doomed.command) == 0
    assert doomed.left() == {**ALL, "target": 0}
    doomed.seed()
    capsys.readouterr()

    # Nothing listens there: before any call succeeded, that is a mistake, told at once (it
    # took 66 s of retries with the default --give-up-after), with the address.
    host = f"127.0.0.1:{free_port()}"
    point_at(monkeypatch, host, emulator.project)
    started = time.monotonic()
    assert main(doomed.command) == 1

    assert time.monotonic() - started < 10
    assert the_error(capsys.readouterr().err) == (
        f"sweeper: error: cannot reach the Datastore emulator at {host} "
        "(DATASTORE_EMULATOR_HOST): connection refused. Is it running, and are the host and "
        "port right?"
    )
    assert doomed.left() == ALL


def test_an_emulator_without_a_project_is_told_so(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "no Google Cloud credentials found ... or set DATASTORE_EMULATOR_HOST", set."""
    point_at(monkeypatch, emulator.host, emulator.project)
    for name in ("DATASTORE_PROJECT_ID", "GOOGLE_CLOUD_PROJECT", "SWEEPER_PROJECT"):
        monkeypatch.delenv(name, raising=False)

    assert main(["sweep", "--kind", "eq-session"]) == 1

    line = the_error(capsys.readouterr().err)
    assert line.startswith("sweeper: error: no project: DATASTORE_EMULATOR_HOST is set")
    assert "--project" in line


def test_another_project_never_touches_this_one(
    emulator: Emulator,
    doomed: Doomed,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at(monkeypatch, emulator.host, emulator.project)

    # An emulator serves any project id, where the kind holds nothing: a failure (exit 1) that
    # names the target, as production's PermissionDenied would be.
    code = main([*doomed.command, "--project", "some-other-project"])

    assert code == 1
    err = capsys.readouterr().err
    assert '"deleted": 0' in err
    assert "nothing to sweep" in the_error(err)
    assert doomed.left() == ALL
