"""A bad network slows a sweep down; it does not end it.

One gRPC channel carries every call of a client, so a dropped connection fails every call in
flight at once. Here a loopback proxy drops every connection at a fixed interval while the real
CLI, with its default settings, sweeps a backlog far larger than a page.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.encodings import Encoding
from sweeper.result import Runtime
from sweeper.retry import NO_CLIENT_RETRY, RetryPolicy
from tests.integration.helpers import ago, log_events, make_client, sweep
from tests.support.emulator import Emulator
from tests.support.proxy import TcpProxy
from tests.support.seed import Session, encode, names, put_sessions

S = Encoding.EPOCH_SECONDS
# Every key looked up in its transaction (three calls per commit: of 25 entity groups on the
# legacy emulator, 500 on Firestore) through a link cut again and again: twelve pages, which
# outlast several cuts (more pages on Firestore made the run take 80 to 200 s).
BACKLOG = {"datastore": 6_000, "firestore": 12_000}
# As many live sessions again and 300 more: a steady state, where a run deletes less than half
# of what carries the property, so the default fraction guard (0.5) lets the default run through.
EXTRA_LIVE = 300
# A drop every 0.8 s on both. The Firestore emulator sweeps faster since the run's start was
# cut: 6,000 sessions went in under two drops of a second apart, hence its larger backlog.
CUT_EVERY_S = {"datastore": 0.8, "firestore": 0.8}


def seed_backlog(client: datastore.Client, kind: str, backlog: int) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = [
        Session(f"expired-{i}", encode(now - dt.timedelta(hours=1, seconds=i), S))
        for i in range(backlog)
    ]
    live = [
        Session(f"live-{i}", encode(now + dt.timedelta(hours=1), S))
        for i in range(backlog + EXTRA_LIVE)
    ]
    put_sessions(client, kind, expired + live)


def sweep_through(proxy: TcpProxy, emulator: Emulator, kind: str) -> tuple[int, dict[str, Any]]:
    """The real CLI with its defaults (only the kind and the log format given)."""
    done = subprocess.run(
        [sys.executable, "-m", "sweeper", "sweep", "--kind", kind, "--log-format", "json"],
        env={**os.environ, **emulator.env, "DATASTORE_EMULATOR_HOST": proxy.host},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert "Traceback" not in done.stderr
    summary = log_events(done.stderr)[-1]
    assert summary["event"] == "sweep_finished"
    return done.returncode, summary


def test_a_backlog_is_swept_with_default_settings_while_every_connection_drops_again_and_again(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    backlog = BACKLOG[emulator.flavour]
    seed_backlog(client, kind, backlog)
    every = CUT_EVERY_S[emulator.flavour]

    with TcpProxy(("127.0.0.1", emulator.port), cut_every_s=(every, every)) as proxy:
        code, summary = sweep_through(proxy, emulator, kind)

    assert proxy.cuts >= 3  # the run outlasted several drops of every connection
    assert (code, summary["stopped_reason"], summary["failed"]) == (0, "complete", 0), summary.get(
        "error"
    )
    assert summary["matched"] == backlog
    # A commit whose answer a drop cut off is found applied by its repeat: counted as deleted
    # where the database shows the deleting write's version (Firestore), else unattributed.
    assert summary["deleted"] + summary["unattributed"] == backlog
    if emulator.flavour == "firestore":
        assert summary["unattributed"] == 0
    assert summary["retries"] > 0
    # The degradation is reported: calls in flight were cut back, for a measured time.
    assert summary["concurrency_reductions"] > 0
    assert summary["concurrency_min"] < summary["concurrency_max"]
    assert summary["concurrency_reduced_s"] > 0
    assert names(client, kind) == {f"live-{i}" for i in range(backlog + EXTRA_LIVE)}


def test_commits_shrink_to_what_a_slow_database_answers_within_the_call_deadline(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    """A commit of 500 keys takes longer than the deadline here; smaller ones do not.

    The link toward the emulator carries 8 kB/s, so a request takes time in proportion to its
    size, as a slow database's commit does; the call deadline is 3 s instead of 20 s to keep
    the test short. A fixed batch of 500 would time out on every attempt.
    """
    expired = [Session(f"expired-{i}", encode(ago(hours=1), S)) for i in range(800)]
    put_sessions(client, kind, expired)
    policy = RetryPolicy(call_timeout_s=3.0)

    with TcpProxy(("127.0.0.1", emulator.port), upload_bytes_per_s=8_000) as proxy:
        slow = make_client(Emulator(emulator.flavour, project=emulator.project, port=proxy.port))
        keys = [client.key(kind, f"expired-{i}") for i in range(500)]
        with pytest.raises(gexc.DeadlineExceeded):  # the fixed-size commit: never in time
            slow.delete_multi(keys, timeout=policy.call_timeout_s, retry=NO_CLIENT_RETRY)
        result = sweep(slow, kind, S, runtime=Runtime(retry_policy=policy), verify=False)

    assert (result.exit_code, result.failed) == (0, 0)
    assert names(client, kind) == set()
    assert result.commit_size is not None
    assert result.commit_size.reductions >= 1
    assert result.commit_size.minimum < 500
