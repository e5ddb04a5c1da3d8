"""Whose clock the cutoff comes from: the database's where it reports one, else the pod's.

The cutoff is "now minus grace", and every live session expiring between the true now and a
wrong one is deleted by a sweeper whose clock runs ahead: a pod a day ahead deletes every
session of the next day. A pod's clock can be wrong; the database's is what the runner's
writes were checked against. Firestore in Datastore mode (production, and the Firestore
emulator) reports its own time on every query result (``read_time`` on the result batch); the
legacy emulator reports none, and there the local clock is the only one.

The reading is one keys-only, limit-1 query on the target's kind (``Target.read_time``: one
billed read).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sweeper.target import Target

ClockSource = Literal["server", "local"]

# A skew beyond this is logged as a warning: NTP keeps healthy hosts within milliseconds.
SKEW_WARNING_S = 5.0


@dataclass(frozen=True)
class ClockReading:
    """The instant the cutoff is computed from, where it came from, and the local clock's error.

    ``skew_s`` is local minus server (positive: the pod's clock runs ahead); None when the
    database reports no time.
    """

    now: dt.datetime
    source: ClockSource
    skew_s: float | None


def read_clock(target: Target, local_now: Callable[[], dt.datetime]) -> ClockReading:
    """The database's time where it reports one, else the local clock (and say so)."""
    before, server, after = target.read_time(local_now)
    if server is None:
        return ClockReading(after, "local", None)
    # The server's instant lies between the two local readings: compare with their midpoint.
    local = before + (after - before) / 2
    return ClockReading(server, "server", (local - server).total_seconds())
