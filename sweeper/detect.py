"""``--format auto``: find out how the expiry is stored, from the values actually stored.

Datastore keeps one index order for all values of a property: nulls, then integers and
timestamps together by magnitude, then booleans, strings, floats and the rest.
Each encoding owns one contiguous band of that order, so if the smallest and the largest
non-null values both lie in the same band, *every* value does: two limit-1 queries (sent at
once) decide it exactly, however rare a stray value is among millions, and however slow a full
scan would be.

The index cannot show a value's type (a Timestamp and an integer of epoch microseconds sort as
the same number), so those queries return whole entities, whose values carry their true type.
More than one encoding, or any value sweeper cannot interpret, is a refusal: guessing would
delete live sessions.
"""

from __future__ import annotations

from functools import partial

import structlog
from google.cloud import datastore

from sweeper.concurrency import together
from sweeper.encodings import Encoding, band_range, classify, describe_value
from sweeper.errors import RefusedError
from sweeper.target import FIRST_VALUE_PROBE, Target


def detect_encoding(target: Target) -> Encoding | None:
    """The single encoding stored in the target's property; None when it holds no value at all.

    Refuses when entities carry values that no index holds (see :func:`check_indexed`).
    """
    return decide(read_ends(target), target.kind, target.prop)


def read_ends(target: Target) -> list[object] | None:
    """The stored values of the smallest and the largest indexed value, in that order.

    None when no index entry holds a value (refused if entities carry one all the same). Reads
    only, and logs nothing: a sweep makes these reads while it reads the database's clock.
    """
    ends: list[object] = []
    for _attempt in range(_PROBES):
        # Both ends at once, each as a whole entity (its value's true type): one round trip.
        smallest, largest = together(partial(_smallest_indexed, target), partial(_largest, target))
        if not smallest:
            _refuse_if_carried(target)
            return None
        ends = [e.get(target.prop) for e in smallest + largest]
        if len(ends) != 1:
            break
        # The largest was deleted between the two queries (another sweep, the app): look
        # again rather than judge from a single value.
    return ends


def decide(ends: list[object] | None, kind: str, prop: str) -> Encoding | None:
    """The encoding that ``read_ends``'s values prove every stored value to be in."""
    if ends is None:
        return None
    found = [classify(value) for value in ends]
    structlog.get_logger("sweeper.detect").info(
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
    raise RefusedError(
        f"refusing --format auto on {kind}.{prop}: its values run from "
        f"{_describe(ends[0])} to {_describe(ends[-1])}, so it holds "
        f"{_what(found)}. Nothing was deleted. Sweep one encoding with --format "
        f"{'|'.join(e.value for e in Encoding)}; values of other encodings are left alone."
    )


# Rounds of end probes before detection gives up on a property that keeps changing under it.
_PROBES = 3


def _single(ends: list[object], found: list[Encoding | None]) -> Encoding | None:
    """The one encoding both ends agree on, if they do.

    Text owns one part of the order: with both ends text, every value between them is text
    too. The canonical ISO-8601 values among them are swept, and text in any other form is
    left alone (and counted), so one canonical end is enough to name the encoding.
    """
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


def _what(found: list[Encoding | None]) -> str:
    if None in found:
        return "values of no supported encoding"
    return "more than one encoding"


def check_explicit(target: Target, encoding: Encoding) -> tuple[str, ...]:
    """Before an explicit ``--format`` sweep: the other encodings the property holds.

    Refuses when the chosen encoding's band holds no value at all while the property holds
    values of another encoding (or values no index holds): such a sweep could never match
    anything, and would report success forever. Costs two limit-1 queries (at once); when the
    ends are not both of ``encoding``, one more small query per other band.
    """
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
    raise RefusedError(
        f"refusing --format {encoding.value} on {target.kind}.{target.prop}: it holds no "
        f"{encoding.value} value at all, so this sweep could never delete anything. Its "
        f"values run from {_describe(ends[0])} to {_describe(ends[-1])}; {_suggest(found)} "
        "Nothing was deleted."
    )


def _in_band(target: Target, encoding: Encoding) -> bool:
    """Whether ``encoding``'s band holds a value of it (one small query of whole entities:
    the index cannot tell a Timestamp from an int of microseconds)."""
    # Text of other forms may come first in a text band: look a little further there.
    limit = FIRST_VALUE_PROBE if encoding.needs_values else 1
    inside = target.fetch(target.within(band_range(encoding), keys_only=False), limit)
    return any(classify(e.get(target.prop)) is encoding for e in inside)


def _suggest(found: set[Encoding | None]) -> str:
    if len(found) == 1 and None not in found:
        (only,) = found
        assert only is not None
        return f"--format {only.value} would match them."
    return "no single --format matches them all: see `sweeper inspect`."


# Entities read to tell "no values" from "values no index holds".
UNINDEXED_SAMPLE = 20


def check_indexed(target: Target) -> None:
    """Refuse when entities carry ``prop`` but no index entry holds a value of it.

    A property excluded from indexes (the runner's used-JWT-id kind) is invisible to every range
    query: a sweep would report nothing to do forever. Only a scan reads such values.
    """
    if not _smallest_indexed(target):
        _refuse_if_carried(target)


def _smallest_indexed(target: Target) -> list[datastore.Entity]:
    """The entity holding the smallest non-null indexed value, if any value is indexed at all."""
    return target.fetch(target.carrying(keys_only=False), 1)


def _largest(target: Target) -> list[datastore.Entity]:
    """The entity holding the largest indexed value (nulls sort first)."""
    return target.fetch(target.query(keys_only=False), 1, descending=True)


def _refuse_if_carried(target: Target) -> None:
    """No index entry holds a value: refuse if sampled entities carry one all the same."""
    prop = target.prop
    sample = target.fetch(target.query(keys_only=False), UNINDEXED_SAMPLE)
    carrying = [e for e in sample if e.get(prop) is not None]
    if carrying:
        raise RefusedError(
            f"{target.kind}.{prop} looks unindexed: {len(carrying)} of {len(sample)} sampled "
            f"entities have a value (e.g. {describe_value(carrying[0].get(prop))}) but no index "
            "entry holds one, so no range query can find them. Use --scan (one billed read per "
            "entity) or index the property."
        )
