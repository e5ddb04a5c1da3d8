"""Network cuts and a database that dies mid-run, against the real emulator."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from google.cloud import datastore

from sweeper.encodings import Encoding
from tests.integration.helpers import (
    ago,
    ahead,
    group_names,
    log_events,
    make_client,
    plain_lines,
    remaining,
    seed,
    start_slow_sweep,
    stored,
    survivors,
    sweep,
    wait_until_deleted,
)
from tests.support.emulator import Emulator
from tests.support.proxy import TcpProxy

S = Encoding.EPOCH_SECONDS


def test_a_sweep_survives_connections_cut_every_one_to_two_seconds(
    emulator: Emulator, client: datastore.Client, kind: str
) -> None:
    groups = {"expired": stored(ago(hours=1), S, 4000), "live": stored(ahead(hours=1), S, 300)}
    seed(client, kind, groups)

    # 20 ms each way keeps a call in flight most of the time, so most cuts land mid-call. The
    # cap of 1,000 deletes a second makes the run last at least 4 s however fast the machine is,
    # so it spans at least two cuts (uncapped, a fast run could end before the first).
    with TcpProxy(("127.0.0.1", emulator.port), delay_s=0.02, cut_every_s=(1.0, 2.0)) as proxy:
        flaky = make_client(Emulator(emulator.flavour, project=emulator.project, port=proxy.port))
        result = sweep(flaky, kind, S, batch_size=25, max_rate=1000.0)

    assert proxy.cuts >= 2
    assert result.retries > 0
    assert (result.exit_code, result.failed) == (0, 0)
    assert survivors(client, kind, groups) == {"live"}


@pytest.fixture
def durable_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """A legacy emulator that keeps its data on disk, so it can die and come back with it."""
    emu = Emulator("datastore", store_on_disk=True, data_dir=tmp_path_factory.mktemp("durable"))
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def test_when_the_database_dies_mid_run_the_sweep_fails_cleanly_and_a_rerun_finishes(
    durable_emulator: Emulator, kind: str
) -> None:
    emu = durable_emulator
    client = make_client(emu)
    groups = {"expired": stored(ago(hours=1), S, 3000), "live": stored(ahead(hours=1), S, 100)}
    seed(client, kind, groups)
    # It gives up 5 s after the last call that worked (the default is 60 s).
    proc = start_slow_sweep(emu, kind, "--format", "epoch-seconds", "--give-up-after", "5s")
    # Eight delete workers (two per stream here) commit one key each at a time: with 20 gone,
    # at least 12 are confirmed.
    wait_until_deleted(client, kind, group_names(groups, "expired"), at_least=20)
    # The database goes away mid-run. (A graceful shutdown: the legacy emulator writes its data
    # dir only then, and the test needs that data back for the rerun.)
    emu.stop()
    died = time.monotonic()
    out, err = proc.communicate(timeout=150)

    assert proc.returncode == 1
    # 5 s without a working call, plus at most one call hanging to its 20 s deadline.
    assert time.monotonic() - died < 5 + 20 + 15
    assert "Traceback" not in out + err
    assert out == ""
    (line,) = plain_lines(err)
    assert line.startswith("sweeper: error: ")
    summary = log_events(err)[-1]
    assert (summary["event"], summary["stopped_reason"]) == ("sweep_finished", "error")
    assert summary["deleted"] > 0

    emu.start()  # same port, same data dir
    # The emulator came back with its data (else the rerun below would prove nothing).
    live = group_names(groups, "live")
    back = remaining(make_client(emu), kind, live)
    assert back == set(live), f"{len(back)} of {len(live)} back; emulator log: {emu.log_tail(20)}"
    rerun = sweep(make_client(emu), kind, S)
    assert rerun.exit_code == 0
    assert survivors(make_client(emu), kind, groups) == {"live"}
