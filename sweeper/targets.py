"""Several targets in one run (``--config``): each swept in turn, then one ``run_finished``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import structlog
from google.cloud import datastore

from sweeper.engine import Sweep
from sweeper.result import Runtime, SweepResult
from sweeper.settings import SweepSettings
from sweeper.stopping import StopReason


def sweep_targets(
    targets: Sequence[SweepSettings],
    client_for: Callable[[SweepSettings], datastore.Client],
    runtime: Runtime | None = None,
    overall: bool = False,
) -> list[SweepResult]:
    """Sweep each target in turn, each with its own ``sweep_finished``; a signal stops them all.

    A failed target does not stop the others (they are independent kinds); with ``overall``
    a final ``run_finished`` event sums the run up for the operator's alert.
    """
    rt = runtime or Runtime()
    started = rt.monotonic()
    results: list[SweepResult] = []
    for settings in targets:
        if rt.stop_requested():
            break
        results.append(Sweep(settings, partial(client_for, settings), rt).run())
    if overall:
        failed = [f"{r.settings.kind}.{r.settings.prop}" for r in results if r.error]
        log = structlog.get_logger("sweeper")
        (log.error if failed else log.info)(
            "run_finished",
            targets=len(targets),
            swept=len(results),
            failed_targets=failed,
            matched=sum(r.matched for r in results),
            deleted=sum(r.deleted for r in results),
            duration_s=round(rt.monotonic() - started, 3),
            stopped_reason=(
                StopReason.SIGNAL
                if rt.stop_requested()
                else (StopReason.ERROR if failed else StopReason.COMPLETE)
            ).value,
        )
    return results
