"""Several sweeps in one run: the targets of ``--config``, and each namespace of a target with
``--all-namespaces``. Each is swept in turn with its own ``sweep_finished``; then one
``run_finished`` sums the run up for the operator's alert."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial

import structlog
from google.cloud import datastore

from sweeper.engine import Budget, Sweep
from sweeper.logs import describe_exception, is_bug, report_bug
from sweeper.result import Runtime, SweepResult
from sweeper.retry import Retrier, RetryCounter, Stopped, StopReason
from sweeper.settings import SweepSettings
from sweeper.target import namespaces

ClientFor = Callable[[SweepSettings], datastore.Client]


def sweep_targets(
    targets: Sequence[SweepSettings],
    client_for: ClientFor,
    runtime: Runtime | None = None,
    overall: bool = False,
) -> list[SweepResult]:
    """Sweep each target in turn (every namespace of one with ``all_namespaces``); a signal
    stops them all.

    A failed target or namespace does not stop the others (they are independent); with
    ``overall``, or any target over all namespaces, a final ``run_finished`` sums the run up.
    """
    rt = runtime or Runtime()
    started = rt.monotonic()
    results: list[SweepResult] = []
    for settings in targets:
        if rt.stop_requested():
            break
        if settings.all_namespaces:
            results.extend(_every_namespace(settings, client_for, rt))
        else:
            results.append(Sweep(settings, partial(client_for, settings), rt).run())
    if overall or any(t.all_namespaces for t in targets):
        _run_finished(targets, results, rt, started)
    return results


def sweep_label(settings: SweepSettings) -> str:
    """How a run's messages name one sweep: ``kind.property``, and its namespace if any."""
    label = f"{settings.kind}.{settings.prop}"
    return label if settings.namespace is None else f"{label} in namespace {settings.namespace}"


def each_namespace(
    settings: SweepSettings, client_for: ClientFor, retrier: Retrier
) -> Iterator[SweepSettings]:
    """``settings`` once per namespace of its database, as they are listed (a page of 500
    at a time: a project with thousands of tenants is never held in memory at once)."""
    client = client_for(settings)
    for page in namespaces(client, retrier):
        for namespace in page:
            yield replace(settings, namespace=namespace, all_namespaces=False)


def _every_namespace(
    settings: SweepSettings, client_for: ClientFor, rt: Runtime
) -> list[SweepResult]:
    """One sweep per namespace, under one budget: ``--max-runtime`` ends the whole run, and
    the ramp-up goes on from namespace to namespace (see ``engine.Budget``)."""
    limit = settings.max_runtime
    deadline = None if limit is None else rt.monotonic() + limit.total_seconds()
    budget = Budget.start(settings, rt, deadline)
    retrier = Retrier(rt.retry_policy, RetryCounter(), clock=rt.monotonic, stopper=budget.stopper)
    results: list[SweepResult] = []
    log = structlog.get_logger("sweeper")
    why: str | None = None
    try:
        for one in each_namespace(settings, client_for, retrier):
            if budget.stopper.reason() is not None:  # the run's deadline, or a signal
                break
            results.append(Sweep(one, partial(client_for, one), rt, budget).run())
    except Stopped:
        pass
    except Exception as exc:  # the listing failed, after its retries (or a bug)
        why = report_bug(log, exc) if is_bug(exc) else describe_exception(exc)
    if why is not None:
        failed = SweepResult(settings, rt.now() - settings.grace, settings.format_label)
        failed.stopped_reason = StopReason.ERROR
        failed.error = (
            f"listing the namespaces failed: {why}. Nothing more was swept; name the "
            "namespaces with --namespace, or one --config target each"
        )
        log.error("namespaces_failed", kind=settings.kind, error=failed.error)
        results.append(failed)
    return results


def _run_finished(
    targets: Sequence[SweepSettings], results: list[SweepResult], rt: Runtime, started: float
) -> None:
    failed = [sweep_label(r.settings) for r in results if r.error]
    if rt.stop_requested():
        reason = StopReason.SIGNAL
    elif failed:
        reason = StopReason.ERROR
    elif any(r.stopped_reason == StopReason.MAX_RUNTIME for r in results):
        reason = StopReason.MAX_RUNTIME
    else:
        reason = StopReason.COMPLETE
    log = structlog.get_logger("sweeper")
    (log.error if failed else log.info)(
        "run_finished",
        targets=len(targets),
        swept=len(results),
        namespaces=len({(r.settings.database, r.settings.namespace) for r in results}),
        failed_targets=failed,
        matched=sum(r.matched for r in results),
        deleted=sum(r.deleted for r in results),
        descendants_deleted=sum(r.descendants_deleted for r in results),
        skipped=sum(r.skipped for r in results),
        duration_s=round(rt.monotonic() - started, 3),
        stopped_reason=reason.value,
    )
