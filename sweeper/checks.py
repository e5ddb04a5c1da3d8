"""What a run checks around its deletes: which encoding, how much, who agreed, what is left.

Each step is a few small reads, made once per run: the encoding of the stored values (auto
detection, or the check that an explicit ``--format`` can match anything), the guards on the
blast radius before the first batch (``sweeper.guard``), and what is left afterwards
(``sweeper.retention``). A step that finds the run unsafe raises :class:`RefusedError`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.cloud import datastore

from sweeper.detect import check_explicit, decide, read_ends
from sweeper.encodings import Encoding, ExpiredRange, expired_range, is_expired
from sweeper.errors import RefusedError
from sweeper.guard import (
    Exposure,
    Plan,
    check_fraction,
    measure,
    range_samples,
    sample_descendants,
    scan_exposure,
)
from sweeper.result import SweepResult
from sweeper.retention import Retention, measure_retention
from sweeper.settings import SweepSettings
from sweeper.target import Count, Target


@dataclass(frozen=True)
class Stored:
    """What :meth:`Checks.read` found of the stored values."""

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


class Checks:
    """The checks of one run over one target."""

    def __init__(self, target: Target, settings: SweepSettings, log: Any) -> None:
        self._target, self.settings, self._log = target, settings, log
        self._scanned = 0  # non-null values a scan read
        # The entities the guard lets the run delete, and how to say so when it would pass it.
        self.allowance: tuple[int | None, str] = (None, "")

    def read(self) -> Stored:
        """What the stored values are, read before the cutoff is known: reads only, no log.

        ``--format auto`` reads the values at both ends of the index; an explicit format,
        which other encodings the property holds (and refuses a format it holds none of).
        """
        s = self.settings
        if not isinstance(s.format, Encoding):
            return Stored(ends=read_ends(self._target))
        if s.scan:
            return Stored()
        return Stored(others=check_explicit(self._target, s.format))

    def encoding(self, result: SweepResult, stored: Stored) -> Encoding | None:
        """The encoding to sweep; None when the property holds no value at all."""
        s = self.settings
        if not isinstance(s.format, Encoding):
            encoding = decide(stored.ends, s.kind, s.prop)
            if encoding is None:
                self._log.warning("no_expiry_values", property=s.prop, hint="nothing to sweep")
            return encoding
        self._note_others(result, stored.others)
        return s.format

    def guard(
        self, encoding: Encoding, result: SweepResult, confirm: Callable[[Plan], bool] | None
    ) -> None:
        """Before the first batch: refuse a run over --max-fraction; on a terminal, ask.

        Counted in entities: with --with-descendants each session with what lies under it
        (estimated from a sample). What passes sets the run's allowance (``self.allowance``),
        which the gate holds every commit to, so an estimate that was too low stops the run
        at the share instead of passing it.
        """
        s = self.settings
        window = expired_range(encoding, result.cutoff)
        if s.dry_run or (window.empty and not s.scan) or (s.max_fraction >= 1 and confirm is None):
            return
        share = s.max_fraction if confirm is None else 1.0  # a person sees the whole count
        exposure, samples = self._exposure(encoding, window, result, share)
        sessions = exposure
        if s.with_descendants:
            under = sample_descendants(self._target, *samples)
            exposure = under.exposure(sessions)
            self._log.info(
                "descendants_sampled",
                per_due_session=round(under.per_due, 2),
                per_live_session=round(under.per_live, 2),
                sampled=sum(map(len, samples)),
            )
        result.due_fraction = exposure.fraction
        self._log.info(
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
        if s.max_fraction < 1:
            self.allowance = (
                math.floor(s.max_fraction * exposure.carrying.n),
                f" ({s.max_fraction:g} of the {exposure.carrying.n} entities carrying {s.prop})",
            )
        if exposure.due.n == 0 or confirm is None:
            return
        self._confirm(encoding, result, exposure, confirm)

    def _exposure(
        self, encoding: Encoding, window: ExpiredRange, result: SweepResult, share: float
    ) -> tuple[Exposure, tuple[list[datastore.Key], list[datastore.Key]]]:
        s = self.settings
        if s.scan:
            exposure, due, live = scan_exposure(
                self._target,
                expired=lambda v: is_expired(encoding, v, result.cutoff),
                on_read=lambda n: setattr(result, "entities_read", result.entities_read + n),
            )
            return exposure, (due, live)
        exposure = measure(self._target, window, share)
        if not s.with_descendants:
            return exposure, ([], [])
        return exposure, range_samples(self._target, window)

    def _confirm(
        self,
        encoding: Encoding,
        result: SweepResult,
        exposure: Exposure,
        confirm: Callable[[Plan], bool],
    ) -> None:
        s, client = self.settings, self._target.client
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

    def retention(self, encoding: Encoding | None, result: SweepResult) -> None:
        """After the run: what is left past the cutoff; whether anything carries the property."""
        s = self.settings
        retention = (
            Retention(Count(self._scanned, "scan", self._scanned + 1), scanned=True)
            if s.scan
            else measure_retention(self._target, encoding=encoding, cutoff=result.cutoff)
        )
        result.retention = retention
        if retention.empty:
            self._log.warning(
                "target_empty",
                property=s.prop,
                hint="no entity carries this property: check the kind, namespace and property",
            )

    def scan_census(self, encoding: Encoding, seen: Counter[str], result: SweepResult) -> None:
        """After a whole scan: the other encodings read, or a refusal if none was ``encoding``."""
        s = self.settings
        self._scanned = sum(seen.values())
        others = tuple(sorted(name for name in seen if name != encoding.value))
        if seen and not seen[encoding.value]:
            held = ", ".join(f"{seen[name]} {name}" for name in others)
            raise RefusedError(
                f"--scan --format {encoding.value} of {s.kind}.{s.prop} could never delete "
                f"anything: of the {sum(seen.values())} values it read, none is "
                f"{encoding.value} ({held}). Nothing was deleted; choose the --format they hold."
            )
        self._note_others(result, others)

    def _note_others(self, result: SweepResult, others: tuple[str, ...]) -> None:
        """Values of other encodings are left alone, but an operator should know they exist."""
        result.other_encodings = others
        if others:
            self._log.warning(
                "other_encodings_present",
                property=self.settings.prop,
                swept=result.format,
                left_alone=list(others),
            )
