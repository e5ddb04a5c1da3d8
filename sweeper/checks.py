"""What a run checks around its deletes, in this order: the stored values (:func:`read_stored`,
while :func:`read_clock` reads the clock) and so the encoding (:func:`choose_encoding`); after a
whole scan, what it read (:func:`scan_census`); what is left afterwards (:func:`retention`). A
step that finds the run unsafe raises :class:`RefusedError`. Why each: docs/design.md, "How
sweeper decides what to delete".
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from sweeper.concurrency import together
from sweeper.encodings import (
    Encoding,
    band_range,
    classify,
    describe_value,
    expired_range,
    from_micros,
)
from sweeper.logs import RefusedError
from sweeper.result import RETENTION_COUNT_LIMIT, Retention, SweepResult
from sweeper.rpc import Count, Seen
from sweeper.settings import SweepSettings
from sweeper.target import FIRST_VALUE_PROBE, Target


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
    """What the stored values are, read before the cutoff is known: reads only, no log."""
    if not isinstance(settings.format, Encoding):
        return Stored(ends=read_ends(target))
    if settings.scan:
        return Stored()
    return Stored(others=check_explicit(target, settings.format))


def choose_encoding(
    settings: SweepSettings, stored: Stored, result: SweepResult, log: Any
) -> Encoding | None:
    """The encoding to sweep; None when the property holds no value at all."""
    if not isinstance(settings.format, Encoding):
        encoding = decide_encoding(stored.ends, settings.kind, settings.prop, log)
        if encoding is None:
            log.warning("no_expiry_values", property=settings.prop, hint="nothing to sweep")
        return encoding
    _note_others(result, stored.others, settings.prop, log)
    return settings.format


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
    ``scanned``: after a scan, the non-null values it read, in place of the index's counts."""
    if scanned is not None:
        kept = Retention(scanned, scanned=True)
    else:
        kept = measure_retention(target, encoding=encoding, cutoff=result.cutoff)
    result.retention = kept
    if result.held_nothing and not settings.allow_empty:
        raise RefusedError(empty_target(settings))
    if kept.empty:
        log.warning(
            "target_empty",
            property=settings.prop,
            hint="no entity carries this property: check the kind, namespace and property",
        )


def empty_target(s: SweepSettings, every_namespace: bool = False) -> str:
    """Why a run over a target that holds nothing to sweep fails (exit 1)."""
    where = "any namespace" if every_namespace else s.where
    return (
        f"nothing to sweep: no {s.kind} entity in {where} carries {s.prop}. A misspelt --kind, "
        "--property or --namespace looks like this. If the target may be empty, pass "
        "--allow-empty (allow_empty = true in a --config target); nothing was deleted"
    )


def _note_others(result: SweepResult, others: tuple[str, ...], prop: str, log: Any) -> None:
    """Values of other encodings are left alone, but an operator should know they exist."""
    result.other_encodings = others
    if others:
        log.warning(
            "other_encodings_present", property=prop, swept=result.format, left_alone=list(others)
        )


# -- The cutoff's clock --------------------------------------------------------------------------
# The cutoff is "now minus grace": a sweeper whose clock runs ahead deletes every live session
# expiring before its wrong now. So the database's clock, which the runner's writes were checked
# against, is used where it reports one (Firestore in Datastore mode: ``Target.read_time``); the
# legacy emulator reports none, and there the local clock is used.


ClockSource = Literal["server", "local"]

# A skew beyond this is logged as a warning: NTP keeps healthy hosts within milliseconds.
SKEW_WARNING_S = 5.0


@dataclass(frozen=True)
class ClockReading:
    """The instant the cutoff is computed from, where it came from, and the local clock's error:
    ``skew_s``, local minus server (positive: ahead; None when the database reports none)."""

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


# -- --format auto: the encoding, from the values stored ---------------------------------------
# Each encoding owns one contiguous band of a property's index order (docs/design.md): if the
# smallest and largest non-null values lie in one band, every value does, so two limit-1 queries
# decide it exactly. They return whole entities: the index cannot show a type (a Timestamp and
# an int of epoch microseconds sort alike). More than one encoding, or a value sweeper cannot
# interpret, is refused: guessing would delete live sessions.
def read_ends(target: Target) -> list[object] | None:
    """The stored values of the smallest and the largest indexed value, in that order; None
    when no index entry holds a value (refused if entities carry one all the same)."""
    ends: list[object] = []
    for _attempt in range(_PROBES):
        smallest, largest = together(partial(_smallest_indexed, target), partial(_largest, target))
        if not smallest:
            _refuse_if_carried(target)
            return None
        ends = [seen.value for seen in smallest + largest]
        if len(ends) != 1:
            break
        # The largest went between the two queries (another sweep, the app): look again.
    return ends


def decide_encoding(
    ends: list[object] | None, kind: str, prop: str, log: Any = None
) -> Encoding | None:
    """The encoding that ``read_ends``'s values prove every stored value to be in; logged as
    ``format_detected`` to ``log`` (the sweep's, not the forecast's after a dry run: once)."""
    if ends is None:
        return None
    found = [classify(value) for value in ends]
    if log is not None:
        log.info(
            "format_detected",
            smallest=describe_value(ends[0]),
            largest=describe_value(ends[-1]),
            encodings=sorted({e.value if e else "unsupported" for e in found}),
        )
    single = _single(ends, found)
    if single is not None:
        return single
    if len(ends) == 1:
        raise RefusedError(
            f"refusing --format auto on {kind}.{prop}: an end of its values was deleted "
            f"during detection {_PROBES} times in a row, so the stored encoding could not be "
            "read. Nothing was deleted; run again, or pass --format."
        )
    what = "values of no supported encoding" if None in found else "more than one encoding"
    raise RefusedError(
        f"refusing --format auto on {kind}.{prop}: its values run from "
        f"{_describe(ends[0])} to {_describe(ends[-1])}, so it holds "
        f"{what}. Nothing was deleted. Sweep one encoding with --format "
        f"{'|'.join(e.value for e in Encoding)}; values of other encodings are left alone."
    )


# Rounds of end probes before detection gives up on a property that keeps changing under it.
_PROBES = 3


def _single(ends: list[object], found: list[Encoding | None]) -> Encoding | None:
    """The one encoding both ends agree on, if they do. With both ends text, every value
    between them is text too, of which the canonical ISO-8601 values are swept and the rest
    left alone (and counted): so one canonical end is enough to name the encoding."""
    if len(ends) != 2:
        return None
    if found[0] is not None and found[0] is found[1]:
        return found[0]
    if all(isinstance(v, str | bytes) for v in ends) and Encoding.ISO_8601 in found:
        return Encoding.ISO_8601
    return None


def _describe(value: object) -> str:
    encoding = classify(value)
    return f"{describe_value(value)}, {encoding.value if encoding else 'no supported encoding'}"


def check_explicit(target: Target, encoding: Encoding) -> tuple[str, ...]:
    """Before an explicit ``--format`` sweep: the other encodings the property holds. Refuses
    when the chosen band holds no value while the property holds others (or values no index
    holds): such a sweep could never match anything, and would report success forever."""
    ends = read_ends(target)
    if ends is None:
        return ()
    found = {classify(value) for value in ends}
    if found <= {encoding}:
        return ()
    # Values between the ends may be of a third encoding: ask each band in turn.
    found |= {e for e in Encoding if e not in found and _in_band(target, e)}
    others = tuple(sorted(e.value if e else "unsupported" for e in found if e is not encoding))
    if encoding in found:
        return others
    known = [e for e in found if e is not None]
    suggest = "no single --format matches them all: see `sweeper inspect`."
    if len(found) == 1 and known:
        suggest = f"--format {known[0].value} would match them."
    raise RefusedError(
        f"refusing --format {encoding.value} on {target.kind}.{target.prop}: it holds no "
        f"{encoding.value} value at all, so this sweep could never delete anything. Its "
        f"values run from {_describe(ends[0])} to {_describe(ends[-1])}; {suggest} "
        "Nothing was deleted."
    )


def _in_band(target: Target, encoding: Encoding) -> bool:
    """Whether ``encoding``'s band holds a value of it (whole entities: their true types)."""
    # Text of other forms may come first in a text band: look a little further there.
    limit = FIRST_VALUE_PROBE if encoding.needs_values else 1
    inside = target.fetch(target.within(band_range(encoding), keys_only=False), limit)
    return any(classify(seen.value) is encoding for seen in inside)


# Entities read to tell "no values" from "values no index holds".
UNINDEXED_SAMPLE = 20


def check_indexed(target: Target) -> None:
    """Refuse when entities carry ``prop`` but no index entry holds a value of it: a property
    excluded from indexes (the runner's used-JWT-id kind) is invisible to every range query,
    and a sweep would report nothing to do forever. Only a scan reads such values."""
    if not _smallest_indexed(target):
        _refuse_if_carried(target)


def _smallest_indexed(target: Target) -> list[Seen]:
    """The entity holding the smallest non-null indexed value, if any value is indexed at all."""
    return target.fetch(target.carrying(keys_only=False), 1)


def _largest(target: Target) -> list[Seen]:
    """The entity holding the largest indexed value (nulls sort first)."""
    return target.fetch(target.query(keys_only=False), 1, descending=True)


def _refuse_if_carried(target: Target) -> None:
    """No index entry holds a value: refuse if sampled entities carry one all the same."""
    sample = target.fetch(target.query(keys_only=False), UNINDEXED_SAMPLE)
    carrying = [seen.value for seen in sample if seen.value is not None]
    if carrying:
        raise RefusedError(
            f"{target.kind}.{target.prop} looks unindexed: {len(carrying)} of {len(sample)} "
            f"sampled entities have a value (e.g. {describe_value(carrying[0])}) but no index "
            "entry holds one, so no range query can find them. Use --scan (one billed read per "
            "entity) or index the property."
        )


def measure_retention(
    target: Target, *, encoding: Encoding | None, cutoff: dt.datetime
) -> Retention:
    """Two bounded COUNTs (at once) and one limit-1 projection query."""
    carried = partial(target.count, target.carrying(), RETENTION_COUNT_LIMIT)
    if encoding is None:
        return Retention(carried())
    query = target.within(expired_range(encoding, cutoff))
    left, carrying = together(partial(target.count, query, RETENTION_COUNT_LIMIT), carried)
    first = target.first_value(query, encoding, strict=True) if left.n else None
    oldest = None if first is None else from_micros(first * encoding.unit_us)
    return Retention(carrying, left, oldest)
