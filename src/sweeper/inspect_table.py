"""``sweeper inspect`` as a person reads it: an aligned table ending in what a sweep would do."""

from __future__ import annotations

import datetime as dt

from sweeper.encodings import QueryValue
from sweeper.inspect import ExpiredCount, InspectReport, Oldest, iso, json_value, sweep_would
from sweeper.settings import format_duration

_INDEXED_NOTES = {
    "yes": "",
    "no": " (the sample holds values, but a range query cannot see them; a scan would)",
    "unknown": " (no value in the sample or the index)",
}


def render_table(report: InspectReport) -> str:
    """An aligned summary for a terminal, ending with the ``sweep would: ...`` line."""
    rows = _rows(report)
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}".rstrip() for label, value in rows]
    return "\n".join([*lines, f"sweep would: {sweep_would(report)}"])


def _rows(r: InspectReport) -> list[tuple[str, str]]:
    sample = r.sample
    digits = max(len(str(n)) for n in sample.counts.values())
    examples = ", ".join(sample.unsupported_examples)
    rows = [
        ("target", f"{r.kind}.{r.prop}"),
        ("namespace", r.namespace or "(default)"),
        ("database", r.database or "(default)"),
        ("format asked", r.format_asked),
        ("grace", format_duration(r.grace)),
        ("cutoff", f"{iso(r.cutoff)} (now {iso(r.now)} - grace)"),
        ("sample", f"first {sample.size} entities in key order (at most {sample.asked})"),
        *((f"  {name}", f"{n:>{digits}}") for name, n in sample.counts.items()),
        *([("  e.g.", examples)] if examples else []),
        ("indexed", r.indexed + _INDEXED_NOTES[r.indexed]),
        ("format", _format_row(r)),
    ]
    if r.bounds is not None:
        rows.append(("range", f"{_show(r.bounds[0])} <= {r.prop} < {_show(r.bounds[1])}"))
    if r.expired is not None:
        label = "past cutoff" if r.action != "scan" else "past cutoff (indexed)"
        rows.append((label, _count_row(r.expired)))
    if r.encoding is not None:
        rows.append(("oldest expiry", _oldest_row(r.oldest)))
    return rows


def _format_row(r: InspectReport) -> str:
    if r.encoding is not None:
        return r.encoding.value + (" (detected)" if r.format_asked == "auto" else "")
    return "refused" if r.action == "refuse" else "none (no indexed value)"


def _count_row(expired: ExpiredCount) -> str:
    if expired.method == "empty_range":
        return "0 (the cutoff lies before the encoding's band)"
    if expired.method == "aggregation":
        return f"{expired.n} (aggregation)"
    shown = f"≥ {expired.n}" if expired.lower_bound else str(expired.n)
    return f"{shown} (keys-only count, bounded at {expired.limit})"


def _oldest_row(oldest: Oldest | None) -> str:
    if oldest is None:
        return "none stored"
    stored = "" if isinstance(oldest.value, dt.datetime) else f"{oldest.value} = "
    return stored + iso(oldest.instant)


def _show(value: QueryValue) -> str:
    return str(json_value(value))
