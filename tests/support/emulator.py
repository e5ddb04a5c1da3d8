"""Start and stop a local Datastore emulator on a free loopback port.

Both emulators ship with gcloud: the legacy Datastore emulator and the Firestore emulator in
Datastore mode. Each runs in its own process group with a private data dir, and is stopped by
its own id only, never by name.

However the process that started one ends (a fixture that failed, Ctrl-C, a CI time limit's
SIGTERM, even SIGKILL), the emulator goes with it: a watchdog process holds the read end of a
pipe whose only write end is the starter's, and when that end closes (the starter exited, by
any means) the watchdog ends the emulator's process group. A Java emulator left behind keeps
gigabytes of memory and a port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Flavour = Literal["datastore", "firestore"]
FLAVOURS: tuple[Flavour, ...] = ("datastore", "firestore")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Emulator:
    """A running emulator; ``env`` holds the variables a client needs to reach it."""

    flavour: Flavour
    project: str = "sweeper-test"
    consistency: float = 1.0
    port: int = field(default_factory=free_port)
    data_dir: Path | None = None
    store_on_disk: bool = False
    process: subprocess.Popen[bytes] | None = None
    _own_dir: bool = False
    _watchdog: subprocess.Popen[bytes] | None = None
    _lifeline: int | None = None  # the pipe's write end: closed when this process ends

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"DATASTORE_EMULATOR_HOST": self.host, "DATASTORE_PROJECT_ID": self.project}

    def command(self) -> list[str]:
        if self.flavour == "firestore":
            return [
                "gcloud",
                "emulators",
                "firestore",
                "start",
                "--database-mode=datastore-mode",
                f"--host-port={self.host}",
            ]
        assert self.data_dir is not None
        disk = "--store-on-disk" if self.store_on_disk else "--no-store-on-disk"
        return [
            "gcloud",
            "beta",
            "emulators",
            "datastore",
            "start",
            disk,
            f"--data-dir={self.data_dir}",
            f"--consistency={self.consistency}",
            f"--project={self.project}",
            f"--host-port={self.host}",
        ]

    def start(self, timeout_s: float = 90.0, attempts: int = 3) -> Emulator:
        """Start and wait until it answers; a start that fails is tried again on a new port."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except RuntimeError:
                if attempt == attempts:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> Emulator:
        if shutil.which("gcloud") is None:
            raise RuntimeError("gcloud is not installed: the emulators come with the Cloud SDK")
        if self.data_dir is None:
            self.data_dir, self._own_dir = Path(tempfile.mkdtemp(prefix="sweeper-emu-")), True
        log = open(self.data_dir / "emulator.log", "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
        )
        log.close()
        self._watch(self.process.pid)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_tail = self.log_tail()
                self.stop(keep_dir=True)
                raise RuntimeError(
                    f"{self.flavour} emulator did not start on {self.host}: {log_tail}"
                )
            time.sleep(0.2)
        return self

    def _watch(self, group: int) -> None:
        """Start the watchdog that ends process group ``group`` once this process is gone."""
        read_end, self._lifeline = os.pipe()  # not inherited by anything but the watchdog
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(group)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the suite's group is the suite's, not its
        )
        os.close(read_end)

    def _unwatch(self) -> None:
        """The emulator is stopped: end the watchdog first (so it never signals a process
        group that is no longer ours), then let go of the pipe."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None

    def log_tail(self, lines: int = 5) -> str:
        assert self.data_dir is not None
        try:
            text = (self.data_dir / "emulator.log").read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return " | ".join(text.strip().splitlines()[-lines:])

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as response:
                return bool(response.read().strip() == b"Ok")
        except (OSError, urllib.error.URLError):
            return False

    def reset(self) -> None:
        """Drop all data (the emulators' /reset endpoint)."""
        request = urllib.request.Request(f"http://{self.host}/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass

    def stop(self, keep_dir: bool = False) -> None:
        """Ask the emulator to shut down, then end its process group (ours alone)."""
        process, self.process = self.process, None
        if process is None:
            self._unwatch()
            return
        group = process.pid  # started in a session of its own: the group is gcloud's and java's
        if process.poll() is None:
            try:
                request = urllib.request.Request(f"http://{self.host}/shutdown", method="POST")
                urllib.request.urlopen(request, timeout=5).close()
            except OSError:
                pass
        # gcloud's wrapper may exit before the JVM under it has written its data and gone (a
        # JVM seen outliving it by 45 minutes): wait for the whole group, not the wrapper.
        # One that keeps its data writes it all out now: give it time on a busy machine.
        if not _group_gone(process, 60 if self.store_on_disk else 10):
            for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sig)
                if _group_gone(process, wait_s):
                    break
        process.wait()
        self._unwatch()
        if self._own_dir and self.data_dir is not None and not keep_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir, self._own_dir = None, False


def _group_gone(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Whether ``process``'s group (its session) has no process left, waiting up to
    ``timeout_s``. ``process`` itself is reaped as it ends: a zombie would count as there."""
    group = process.pid
    deadline = time.monotonic() + timeout_s
    while True:
        process.poll()
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a member that is not ours: treat the group as still there
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


# Waits for EOF on stdin (the starter is gone), then ends the emulator's process group: politely,
# then for good. Kept free of imports from this repository: it outlives everything else.
_WATCHDOG = """
import os, signal, sys, time
group = int(sys.argv[1])
sys.stdin.buffer.read()
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    for _ in range(50):
        time.sleep(0.2)
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            sys.exit(0)
"""


@contextmanager
def running(flavour: Flavour, **kwargs: object) -> Iterator[Emulator]:
    emulator = Emulator(flavour, **kwargs)  # type: ignore[arg-type]
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()
