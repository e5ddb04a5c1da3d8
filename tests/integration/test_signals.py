"""A real process stopped by SIGTERM mid-run (pod eviction, the Job's deadline)."""

from __future__ import annotations

import json
import signal
import time

from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.testing.emulator import Emulator
from tests.integration.helpers import ago, group_names, remaining, seed, start_slow_sweep, stored


def test_sigterm_stops_before_the_next_batch_with_a_summary(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(hours=1), Encoding.EPOCH_SECONDS, 3000)}
    seed(client, kind, groups)
    proc = start_slow_sweep(emulator, kind)
    time.sleep(0.5)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)

    assert proc.returncode == 143
    assert time.monotonic() - signalled < 20
    assert "Traceback" not in err
    summary = json.loads(out.splitlines()[-1])
    assert (summary["event"], summary["stopped_reason"]) == ("sweep_finished", "signal")
    left = remaining(client, kind, group_names(groups, "expired"))
    assert 0 < summary["deleted"] < 3000
    assert len(left) == 3000 - summary["deleted"]
