"""No emulator outlives the process that started it, however that process ends.

A suite stopped by a CI time limit (SIGTERM) or killed outright (SIGKILL) runs no fixture
teardown; the emulator's watchdog (``tests/support/emulator.py``) must end it all the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.emulator import Emulator, Flavour

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for the test suite: starts an emulator, says where, and waits to be killed.
STARTER = """
import sys, time
from tests.support.emulator import Emulator
emulator = Emulator(sys.argv[1]).start()
assert emulator.process is not None
print(emulator.process.pid, emulator.port, flush=True)
time.sleep(600)
"""


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("flavour", "sig"), [("datastore", signal.SIGTERM), ("firestore", signal.SIGKILL)]
)
def test_an_emulator_ends_with_the_process_that_started_it(
    flavour: Flavour, sig: signal.Signals
) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, flavour], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert starter.stdout is not None
        group, port = map(int, starter.stdout.readline().split())
        emulator = Emulator(flavour, port=port)
        assert emulator.ready()
        assert group_alive(group)

        starter.send_signal(sig)
        starter.wait(timeout=10)

        deadline = time.monotonic() + 30
        while group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(group), f"the {flavour} emulator outlived its starter"
        assert not emulator.ready()
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()


@pytest.mark.parametrize(
    ("flavour", "on_disk"), [("datastore", True), ("datastore", False), ("firestore", False)]
)
def test_a_stopped_emulator_leaves_no_process_behind(
    flavour: Flavour, on_disk: bool, tmp_path: Path
) -> None:
    # gcloud's wrapper can exit before the JVM under it (one was found running 45 minutes
    # after its test): stop() waits for the whole process group, not the wrapper alone.
    emulator = Emulator(flavour, store_on_disk=on_disk, data_dir=tmp_path if on_disk else None)
    emulator.start()
    assert emulator.process is not None
    group = emulator.process.pid

    emulator.stop()

    assert not group_alive(group)
