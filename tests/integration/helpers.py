"""Helpers shared by the integration tests: seeding, sweeping, and reading what is left."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from google.cloud import datastore
from google.cloud.datastore.helpers import key_from_protobuf
from google.cloud.datastore_v1.types import datastore as datastore_pb2

from sweeper.encodings import Encoding
from sweeper.engine import Sweep
from sweeper.result import Runtime, SweepResult
from sweeper.settings import FormatChoice, SweepSettings
from tests.support.emulator import Emulator
from tests.support.faults import FaultInjector
from tests.support.seed import Session, encode, put_sessions

# The repository: where the CLI runs as a person runs it (relative paths like deploy/).
ROOT = Path(__file__).parents[2]


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


def client_via(injector: FaultInjector, emulator: Emulator) -> datastore.Client:
    """A client whose every call goes through ``injector``. (The client refuses explicit
    credentials while DATASTORE_EMULATOR_HOST is set: it uses anonymous ones itself.)"""
    env = {**emulator.env, "DATASTORE_EMULATOR_HOST": injector.host}
    with emulator_env(env):
        return datastore.Client(project=emulator.project)


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
        # These specs are about what a run deletes, often from a kind that holds little else:
        # the fraction guard has a suite of its own (test_guards.py) and is off here.
        "max_fraction": 1.0,
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


def survivors(
    client: datastore.Client, kind: str, groups: Mapping[str, Sequence[object]]
) -> set[str]:
    """The groups ``seed`` wrote to ``kind`` that are still stored whole, by key lookup: so
    ``survivors(client, kind, groups) == {"live", "null"}`` says that exactly the sessions of
    those two groups are left.

    A group partly left is named ``"<group>: <k> of <n> left"``, which no expected set holds, so
    such an assertion fails and says how much is left. An empty group cannot tell whether it
    survived: it fails here.
    """
    left = remaining(client, kind, group_names(groups, *groups))
    found: set[str] = set()
    for group, sessions in groups.items():
        assert sessions, f"group {group!r} has no sessions"
        kept = sum(name in left for name in group_names(groups, group))
        if kept == len(sessions):
            found.add(group)
        elif kept:
            found.add(f"{group}: {kept} of {len(sessions)} left")
    return found


def wait_until_deleted(
    client: datastore.Client, kind: str, names: Sequence[str], at_least: int, timeout: float = 60
) -> None:
    """Return once ``at_least`` of ``names`` are gone: a fixed sleep is no measure of how far
    a process on a busy machine has got."""
    deadline = time.monotonic() + timeout
    while len(names) - len(remaining(client, kind, names)) < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} deleted in {timeout} s"
        time.sleep(0.1)


def start_slow_sweep(emu: Emulator, kind: str, *args: str) -> subprocess.Popen[str]:
    """A real ``sweeper sweep`` process deleting one key per commit, at most 200 a second (long
    enough to interrupt on however fast a machine), returned once it has started deleting."""
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
            "--max-rate",
            "200",
            "--log-format",
            "json",
            *args,
        ],
        # The fraction guard is off (test_guards.py has it): these kinds hold expired sessions.
        env={**os.environ, **emu.env, "SWEEPER_MAX_FRACTION": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{") and json.loads(line)["event"] == "query_range":
            break
    return proc


def log_events(stderr: str) -> list[dict[str, Any]]:
    """A command's JSON log lines: both commands log to stderr, beside the one-line error."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def plain_lines(stderr: str) -> list[str]:
    """What a command wrote to stderr besides its JSON logs: its one-line error, if any."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def run_cli(
    emulator: Emulator, *args: str, command: str = "sweep", **env: str
) -> subprocess.CompletedProcess[str]:
    """The real CLI; the fraction guard is off (test_guards.py has it) unless a test sets it,
    or passes --config, whose targets carry their own."""
    guard = {} if "--config" in args else {"SWEEPER_MAX_FRACTION": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sweeper", command, *args],
        env={**os.environ, **emulator.env, **guard, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- What sweeper hands over for deletion, and sessions the runner refreshes ---------------


_REQUESTS: dict[str, Any] = {
    "lookup": datastore_pb2.LookupRequest,
    "commit": datastore_pb2.CommitRequest,
    "begin_transaction": datastore_pb2.BeginTransactionRequest,
    "rollback": datastore_pb2.RollbackRequest,
    "run_query": datastore_pb2.RunQueryRequest,
}


class HookedApi:
    """A client's Datastore API object that runs a hook before each call it names.

    A hook gets the request as a raw protobuf (however the caller built it: sweeper's gate
    sends raw messages, the client's own methods dicts); it may raise, as a failing call does,
    or answer in the call's place by returning a response (``None``: the call goes on).
    """

    def __init__(self, api: Any, hooks: Mapping[str, Callable[[Any], Any]]) -> None:
        self._api, self._hooks = api, hooks

    def __getattr__(self, name: str) -> Any:
        call, hook = getattr(self._api, name), self._hooks.get(name)
        if hook is None:
            return call

        def hooked(*, request: Any, **kwargs: Any) -> Any:
            kind = _REQUESTS[name]
            raw = kind.pb(request if isinstance(request, kind) else kind(request))
            answer = hook(raw)
            return call(request=request, **kwargs) if answer is None else answer

        return hooked


def hook_api(client: datastore.Client, **hooks: Callable[[Any], Any]) -> None:
    """Run ``hooks`` (by call name: ``lookup``, ``commit``, ...) before ``client``'s calls."""
    client._datastore_api_internal = HookedApi(client._datastore_api, hooks)


def deleted_keys(commit: Any) -> list[datastore.Key]:
    """The keys a raw ``CommitRequest`` deletes."""
    return [key_from_protobuf(m.delete) for m in commit.mutations if m.HasField("delete")]


def transactional(request: Any) -> bool:
    return bool(request.transaction)


class RecordingClient(datastore.Client):
    """A real client that records the names of the keys sweeper hands over for deletion.

    It records the keys of every blind commit and of every lookup made inside a transaction
    (the gate's re-check). With ``delete=False`` nothing is deleted: a blind commit is recorded
    and not sent, a transaction is rolled back instead of committed, so a run reports what it
    would have deleted while the data stays in place: runs made one after another, or at once,
    each show the whole set of keys they match.
    """

    def __init__(self, *args: Any, delete: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.sends_deletes = delete
        self.handed_over: list[str] = []
        self._recording = threading.Lock()
        hook_api(self, lookup=self._on_lookup, commit=self._on_commit)

    def _record(self, keys: Sequence[datastore.Key]) -> None:
        with self._recording:
            self.handed_over.extend(str(key.name) for key in keys)

    def _on_lookup(self, request: Any) -> None:
        if request.read_options.transaction:
            self._record([key_from_protobuf(k) for k in request.keys])

    def _on_commit(self, request: Any) -> Any:
        if not transactional(request):
            self._record(deleted_keys(request))
        if self.sends_deletes:
            return None
        if transactional(request):
            self._datastore_api.rollback(
                request={"project_id": self.project, "transaction": request.transaction}
            )
        return datastore_pb2.CommitResponse()


def recording_client(
    emu: Emulator, delete: bool = True, namespace: str | None = None
) -> RecordingClient:
    with emulator_env(emu.env):
        return RecordingClient(project=emu.project, namespace=namespace, delete=delete)


def refresh(client: datastore.Client, kind: str, names: Sequence[str], expiry: object) -> None:
    """Refresh sessions as the runner does: read each whole entity, set a new expiry, write it
    back (in commits of 500)."""
    for start in range(0, len(names), 500):
        keys = [client.key(kind, name) for name in names[start : start + 500]]
        entities = client.get_multi(keys)
        now = dt.datetime.now(dt.UTC)
        for entity in entities:
            entity["expires_at"] = expiry
            entity["updated_at"] = now
        client.put_multi(entities)


def run_on_a_terminal(
    emulator: Emulator,
    answer: str | None,
    *args: str,
    think_s: float = 0.0,
    interrupt_at: str | None = None,
    stderr: IO[bytes] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """The CLI on a real pseudo-terminal, its controlling terminal, as a shell starts it:
    stdin and stdout on it, and stderr too unless ``stderr`` (a file) is given. ``answer`` is
    typed ``think_s`` after each question appears, as a person would (None: never). Once the
    terminal shows ``interrupt_at``, Ctrl-C is typed: the terminal driver sends SIGINT to the
    process, as it does for a person. Returns the exit code and all the terminal showed."""
    leader, follower = pty.openpty()
    # setsid -c (util-linux): a session of its own, the terminal on stdin its controlling one.
    # Not a preexec_fn: that forks this process, gRPC threads and all, and gRPC's fork handler
    # sometimes aborted the child (exit -6, "epoll_wait error: Bad file descriptor").
    proc = subprocess.Popen(
        ["setsid", "--ctty", sys.executable, "-m", "sweeper", "sweep", *args],
        env={**os.environ, **emulator.env, "TERM": "dumb", **(env or {})},
        cwd=ROOT,
        stdin=follower,
        stdout=follower,
        stderr=follower if stderr is None else stderr,
        close_fds=True,
    )
    os.close(follower)
    shown, answered, interrupted = b"", 0, interrupt_at is None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the process closed the terminal
                break
            shown += chunk
        if answer is not None and answered < shown.count(b"[y/N]"):
            time.sleep(think_s)
            os.write(leader, answer.encode() + b"\n")
            answered += 1
        if not interrupted and interrupt_at is not None and interrupt_at.encode() in shown:
            os.write(leader, b"\x03")
            interrupted = True
        if proc.poll() is not None and not ready:
            break
    os.close(leader)
    return proc.wait(timeout=30), shown.decode(errors="replace")
