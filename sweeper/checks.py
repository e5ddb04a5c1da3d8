"""What a run checks around its deletes: whose clock, which encoding, how much, who agreed,
what is left.

Each step is a function of the target, made once per run, in this order: what the stored
values are (:func:`read_stored`, while the clock is read) and so which encoding to sweep
(:func:`choose_encoding`: auto detection, or the check that an explicit ``--format`` can match
anything); the guards on the blast radius before the first batch (:func:`guard`, which returns
the run's :class:`Allowance`); after a whole scan, what it read (:func:`scan_census`); and what
is left afterwards (:func:`retention`). A step that finds the run unsafe raises
:class:`RefusedError`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sweeper.detect import check_explicit, decide, read_ends
from sweeper.encodings import Encoding, ExpiredRange, expired_range, is_expired
from sweeper.errors import RefusedError
from sweeper.gate import Rule
from sweeper.guard import (
    Descendants,
    Exposure,
    Plan,
    check_fraction,
    measure,
    range_samples,
    sample_descendants,
    scan_exposure,
)
from sweeper.result import Retention, SweepResult, measure_retention
from sweeper.settings import SweepSettings
from sweeper.stopping import Allowance
from sweeper.target import Count, Target


@dataclass(frozen=True)
class Stored:
    """What :func:`read_stored` found of the stored values."""

    # --format auto: the values at the two ends of the index (None: no value is indexed).
    ends: list[object] | None = None
    # An explicit --format: the other encodings the property holds.
    others: tuple[str, ...] = ()

    def smallest(self, settings: SweepSettings, encoding: Encoding) -> int | None:
        """The smallest stored value's ordinal, where the streams start their slices without
        a query of their own (``SweepSettings.starts_at_detected_end``)."""
        if self.ends is None or len(self.ends) != 2:
            return None
        return encoding.ordinal(self.ends[0]) if settings.starts_at_detected_end(encoding) else None


def read_stored(target: Target, settings: SweepSettings) -> Stored:
    """What the stored values are, read before the cutoff is known: reads only, no log.

    ``--format auto`` reads the values at both ends of the index; an explicit format, which
    other encodings the property holds (and refuses a format it holds none of).
    """
    s = settings
    if not isinstance(s.format, Encoding):
        return Stored(ends=read_ends(target))
    if s.scan:
        return Stored()
    return Stored(others=check_explicit(target, s.format))


def choose_encoding(
    settings: SweepSettings, stored: Stored, result: SweepResult, log: Any
) -> Encoding | None:
    """The encoding to sweep; None when the property holds no value at all."""
    s = settings
    if not isinstance(s.format, Encoding):
        encoding = decide(stored.ends, s.kind, s.prop)
        if encoding is None:
            log.warning("no_expiry_values", property=s.prop, hint="nothing to sweep")
        return encoding
    _note_others(result, stored.others, s.prop, log)
    return s.format


def guard(
    target: Target,
    settings: SweepSettings,
    encoding: Encoding,
    result: SweepResult,
    *,
    confirm: Callable[[Plan], bool] | None,
    log: Any,
) -> Allowance:
    """Before the first batch: refuse a run over --max-fraction; on a terminal, ask.

    Counted in entities: with --with-descendants each session with what lies under it
    (estimated from a sample). What passes is the run's allowance, which the gate holds every
    commit to, so an estimate that was too low stops the run at the share instead of passing
    it.
    """
    s = settings
    window = expired_range(encoding, result.cutoff)
    if s.dry_run or (window.empty and not s.scan) or (s.max_fraction >= 1 and confirm is None):
        return Allowance(s.max_deletes)
    share = s.max_fraction if confirm is None else 1.0  # a person sees the whole count
    rule = Rule(s.kind, s.prop, encoding, result.cutoff)
    exposure, under = _exposure(target, s, rule, window, result, share=share)
    if under is not None:
        exposure = under.exposure(exposure)
        log.info(
            "descendants_sampled",
            per_due_session=round(under.per_due, 2),
            per_live_session=round(under.per_live, 2),
            sampled=under.sampled,
        )
    result.due_fraction = exposure.fraction
    log.info(
        "exposure_counted",
        due=exposure.due.n,
        carrying=exposure.carrying.n,
        # Counted only as far as the guard needed: "at least" this many.
        carrying_is_lower_bound=exposure.carrying.lower_bound,
        fraction=exposure.fraction,
        max_fraction=s.max_fraction,
        counted="entities" if s.with_descendants else "sessions",
    )
    check_fraction(exposure, s.max_fraction, s.kind, s.prop)
    if exposure.due.n > 0 and confirm is not None:
        _confirm(target, s, encoding, result, exposure=exposure, confirm=confirm)
    if s.max_fraction >= 1:
        return Allowance(s.max_deletes)
    carrying = exposure.carrying.n
    return Allowance(
        s.max_deletes,
        math.floor(s.max_fraction * carrying),
        f" ({s.max_fraction:g} of the {carrying} entities carrying {s.prop})",
    )


def _exposure(
    target: Target,
    s: SweepSettings,
    rule: Rule,
    window: ExpiredRange,
    result: SweepResult,
    *,
    share: float,
) -> tuple[Exposure, Descendants | None]:
    """What the run would delete, in sessions, and (``--with-descendants``) what a sample
    says lies under each: sampled first, so the count of what carries the property goes as
    far as the share needs in entities."""
    if s.scan:
        exposure, due, live = scan_exposure(
            target,
            expired=lambda v: is_expired(rule.encoding, v, result.cutoff),
            on_read=lambda n: result.add(entities_read=n),
        )
        under = sample_descendants(target, rule, due, live) if s.with_descendants else None
        return exposure, under
    if not s.with_descendants:
        return measure(target, window, share), None
    under = sample_descendants(target, rule, *range_samples(target, window))
    return measure(target, window, share, under), under


def _confirm(
    target: Target,
    s: SweepSettings,
    encoding: Encoding,
    result: SweepResult,
    *,
    exposure: Exposure,
    confirm: Callable[[Plan], bool],
) -> None:
    client = target.client
    plan = Plan(
        client.project,
        client.database or None,
        client.namespace or None,
        s.kind,
        s.prop,
        encoding,
        result.cutoff,
        exposure,
    )
    if not confirm(plan):
        raise RefusedError("not confirmed at the prompt; nothing was deleted")


def scan_census(
    settings: SweepSettings, encoding: Encoding, seen: Counter[str], result: SweepResult, log: Any
) -> None:
    """After a whole scan: the other encodings read, or a refusal if none was ``encoding``."""
    s = settings
    others = tuple(sorted(name for name in seen if name != encoding.value))
    if seen and not seen[encoding.value]:
        held = ", ".join(f"{seen[name]} {name}" for name in others)
        raise RefusedError(
            f"--scan --format {encoding.value} of {s.kind}.{s.prop} could never delete "
            f"anything: of the {sum(seen.values())} values it read, none is "
            f"{encoding.value} ({held}). Nothing was deleted; choose the --format they hold."
        )
    _note_others(result, others, s.prop, log)


def retention(
    target: Target,
    settings: SweepSettings,
    encoding: Encoding | None,
    result: SweepResult,
    log: Any,
    *,
    scanned: Count | None = None,
) -> None:
    """After the run: what is left past the cutoff; whether anything carries the property.

    ``scanned``: after a scan, the non-null values it read (no index holds them, so that is
    all that is known of what carries the property).
    """
    kept = (
        Retention(scanned, scanned=True)
        if scanned is not None
        else measure_retention(target, encoding=encoding, cutoff=result.cutoff)
    )
    result.retention = kept
    if kept.empty:
        log.warning(
            "target_empty",
            property=settings.prop,
            hint="no entity carries this property: check the kind, namespace and property",
        )


def _note_others(result: SweepResult, others: tuple[str, ...], prop: str, log: Any) -> None:
    """Values of other encodings are left alone, but an operator should know they exist."""
    result.other_encodings = others
    if others:
        log.warning(
            "other_encodings_present", property=prop, swept=result.format, left_alone=list(others)
        )


# -- The cutoff's clock --------------------------------------------------------------------------
# Whose clock the cutoff comes from: the database's where it reports one, else the pod's.
#
# The cutoff is "now minus grace", and every live session expiring between the true now and a
# wrong one is deleted by a sweeper whose clock runs ahead: a pod a day ahead deletes every
# session of the next day. A pod's clock can be wrong; the database's is what the runner's
# writes were checked against. Firestore in Datastore mode (production, and the Firestore
# emulator) reports its own time on every query result (``read_time`` on the result batch); the
# legacy emulator reports none, and there the local clock is the only one.
#
# The reading is one keys-only, limit-1 query on the target's kind (``Target.read_time``: one
# billed read).


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
