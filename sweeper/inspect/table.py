"""``sweeper inspect`` as it is read: an aligned table for a person, a JSON object for a script."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from sweeper.encodings import QueryValue
from sweeper.inspect.forecast import Forecast, Histogram
from sweeper.inspect.report import InspectReport, Oldest
from sweeper.rpc import Count
from sweeper.settings import format_duration

_INDEXED_NOTES = {
    "yes": "",
    "no": " (the sample holds values, but a range query cannot see them; a scan would)",
    "unknown": " (no value in the sample or the index)",
}
_BAR_WIDTH = 30


def report_dict(r: InspectReport) -> dict[str, Any]:
    """The JSON contract: stable snake_case keys, every instant ISO 8601 UTC with a ``Z``."""
    lower, upper = r.bounds or (None, None)
    expired, oldest, carrying = r.expired, r.oldest, r.carrying
    oldest_expired, d = r.oldest_expired, r.descendants
    return {
        "kind": r.kind,
        "namespace": r.namespace,
        "database": r.database,
        "property": r.prop,
        "format_asked": r.format_asked,
        "grace_s": r.grace.total_seconds(),
        "now": iso(r.now),
        "cutoff": iso(r.cutoff),
        "clock_source": r.clock_source,
        "sample_size": r.sample.asked,
        "sampled": r.sample.size,
        "sample_counts": {k.replace("-", "_"): v for k, v in r.sample.counts.items()},
        "unsupported_examples": list(r.sample.unsupported_examples),
        "indexed": r.indexed,
        "action": r.action,
        "format": r.encoding.value if r.encoding else None,
        "refusal": r.refusal,
        "range_lower": json_value(lower),
        "range_upper": json_value(upper),
        "expired_count": expired.n if expired else None,
        "expired_count_is_lower_bound": bool(expired and expired.lower_bound),
        "count_method": expired.method if expired else None,
        "count_limit": expired.limit if expired else None,
        # The names sweep_finished reports after a run, for the same figures before it.
        "expired_left": expired.n if expired else None,
        "expired_left_is_lower_bound": bool(expired and expired.lower_bound),
        "oldest_expired": iso(oldest_expired.instant) if oldest_expired else None,
        "carrying": carrying.n if carrying else None,
        "carrying_is_lower_bound": bool(carrying and carrying.lower_bound),
        "empty": r.empty,
        "oldest_value": json_value(oldest.value) if oldest else None,
        "oldest_expiry": iso(oldest.instant) if oldest else None,
        "kind_size": r.kind_size.n if r.kind_size else None,
        "descendants_sampled": d.sampled if d else None,
        "descendants_mean": round(d.mean, 2) if d else None,
        "descendants_max": d.most if d else None,
        "histogram": _histogram_dict(r.histogram) if r.histogram else None,
        "forecast": forecast_dict(r.forecast) if r.forecast else None,
        "sweep_would": sweep_would(r),
    }


def _histogram_dict(h: Histogram) -> dict[str, Any]:
    return {
        "unit": h.unit,
        "total": h.total,
        "total_is_lower_bound": h.lower_bound,
        "buckets": [
            {
                "start": iso(b.start) if b.start else None,
                "end": iso(b.end),
                "count": b.count,
                "count_is_lower_bound": b.lower_bound,
            }
            for b in h.buckets
        ],
    }


def forecast_dict(f: Forecast) -> dict[str, Any]:
    run, s = f.run, f.run.sweep
    return {
        "settings": {
            **{k: getattr(s, k) for k in ("workers", "batch_size", "verify", "scan", "ramp_up")},
            **{k: getattr(s, k) for k in ("max_rate", "max_fraction", "with_descendants")},
            "shards": s.shard.count,
            "reports_read_time": run.reports_read_time,
            "aggregation": run.aggregation,
            "descendants_per_session": run.descendants_per_session,
        },
        "guard_refuses": f.guard_refuses,
        "operations": asdict(f.operations),
        "cost_usd": round(f.cost_usd, 6),
        "reads_usd": round(f.reads_usd, 6),
        "deletes_usd": round(f.deletes_usd, 6),
        "prices": asdict(f.prices),
        "duration_s": None if f.duration_s is None else round(f.duration_s, 1),
        "final_rate": None if f.final_rate is None else round(f.final_rate, 1),
        "estimated": f.estimated,
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
    empty = f"YES: no {r.kind} entity carries {r.prop}; check --kind, --property, --namespace"
    encoding = "refused" if r.action == "refuse" else "none (no indexed value)"
    if r.encoding is not None:
        encoding = r.encoding.value + (" (detected)" if r.format_asked == "auto" else "")
    rows = [
        ("target", f"{r.kind}.{r.prop}"),
        *([("EMPTY", empty)] if r.empty else []),
        ("namespace", r.namespace or "(default)"),
        ("database", r.database or "(default)"),
        ("format asked", r.format_asked),
        ("grace", format_duration(r.grace)),
        ("cutoff", f"{iso(r.cutoff)} (now {iso(r.now)} - grace)"),
        ("sample", f"first {sample.size} entities in key order (at most {sample.asked})"),
        *((f"  {name}", f"{n:>{digits}}") for name, n in sample.counts.items()),
        *([("  e.g.", examples)] if examples else []),
        ("indexed", r.indexed + _INDEXED_NOTES[r.indexed]),
        ("format", encoding),
    ]
    if r.carrying is not None:
        rows.append(("carrying", _count_row(r.carrying)))
    if r.bounds is not None:
        lo, hi = map(json_value, r.bounds)
        rows.append(("range", f"{lo} <= {r.prop} < {hi}"))
    if r.expired is not None:
        label = "past cutoff" if r.action != "scan" else "past cutoff (indexed)"
        rows.append((label, _count_row(r.expired)))
    if r.encoding is not None:
        rows.append(("oldest expiry", _oldest_row(r.oldest)))
        rows.append(("oldest expired", _oldest_row(r.oldest_expired)))
    if r.kind_size is not None:
        rows.append(("kind size", _count_row(r.kind_size) + " (a scan reads each)"))
    d = r.descendants
    if d is not None and d.sampled:
        going = f"{d.mean:.1f} per expired session, at most {d.most}"
        rows.append(
            ("descendants", f"{going} ({d.sampled} sampled; --with-descendants deletes them)")
        )
    if r.histogram is not None and r.histogram.buckets:
        rows += _histogram_rows(r.histogram)
    if r.forecast is not None:
        rows += _forecast_rows(r.forecast)
    return rows


def _histogram_rows(h: Histogram) -> list[tuple[str, str]]:
    most = max(b.count for b in h.buckets) or 1
    digits = len(str(most))
    rows = [(f"expired by {h.unit}", f"{len(h.buckets)} buckets of expiry time, UTC")]
    start_format = "%Y-%m-%dT%H:%MZ" if h.unit == "hour" else "%Y-%m-%d"
    for b in h.buckets:
        label = f"  {b.start:{start_format}}" if b.start else f"  before {b.end:%Y-%m-%d}"
        bar = "#" * round(_BAR_WIDTH * b.count / most)
        count = f"{'≥' if b.lower_bound else ''}{b.count:>{digits}}"
        rows.append((label, f"{count} {bar}".rstrip()))
    return rows


def _forecast_rows(f: Forecast) -> list[tuple[str, str]]:
    s, ops, p = f.run.sweep, f.operations, f.prices
    workers = f"{s.workers} worker{'s' if s.workers > 1 else ''}"
    pods = f"{s.shard.count} pod{'s' if s.shard.count > 1 else ''}"
    run = (
        f"a sweep with {workers} on {pods}, batches of {s.batch_size}, "
        f"verify {'on' if s.verify else 'off'}, ramp-up {'on' if s.ramp_up else 'off'}"
        + (f", at most {s.max_rate:g}/s" if s.max_rate else "")
        + (" (estimated)" if f.estimated else "")
    )
    guard = [("  guard", "--max-fraction would refuse this run; forecast with 1")]
    time = "not limited by sweeper (no ramp-up, no --max-rate): as fast as the database"
    if f.duration_s is not None and f.final_rate is not None:
        rule = "the ramp-up rule" if s.ramp_up else "--max-rate"
        time = (
            f"{_duration(f.duration_s)} of deletes under {rule}, "
            f"ending at {f.final_rate:,.0f} deletes/s in all"
        )
    return [
        ("forecast", run),
        *(guard if f.guard_refuses else []),
        ("  queries", str(ops.queries)),
        ("  commits", str(ops.commits)),
        ("  entities read", f"{ops.entities_read} (billed reads in all: {ops.billed_reads})"),
        ("  deletes", str(ops.deleted)),
        ("  cost", f"${f.cost_usd:.4f} (reads ${f.reads_usd:.4f}, deletes ${f.deletes_usd:.4f})"),
        (
            "  prices",
            f"${p.reads_per_100k:g} per 100,000 reads, ${p.deletes_per_100k:g} per 100,000 "
            f"deletes ({p.location}, list prices of {p.as_of}; check {p.source})",
        ),
        ("  time", time),
    ]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _count_row(counted: Count) -> str:
    if counted.method == "empty_range":
        return "0 (the cutoff lies before the encoding's band)"
    if counted.method == "aggregation":
        return f"{counted.n} (aggregation)"
    shown = f"≥ {counted.n}" if counted.lower_bound else str(counted.n)
    return f"{shown} (keys-only count, bounded at {counted.limit})"


def _oldest_row(oldest: Oldest | None) -> str:
    if oldest is None:
        return "none stored"
    stored = "" if isinstance(oldest.value, dt.datetime) else f"{oldest.value} = "
    return stored + iso(oldest.instant)


def sweep_would(r: InspectReport) -> str:
    """One line an operator can act on: what ``sweep`` with these settings would do now."""
    note = "" if r.indexed != "no" else f"; {r.prop} looks unindexed: a scan would be needed"
    if r.action == "refuse":
        return f"refuse: {r.refusal}"
    if r.encoding is None:
        empty = "; a sweep fails (exit 1) unless --allow-empty" if r.empty else ""
        return f"nothing to sweep: {r.prop} holds no indexed value{note}{empty}"
    which = f"whose {r.prop} ({r.encoding.value}) is before {iso(r.cutoff)}"
    if r.action == "scan":
        return f"scan every {r.kind} entity (one billed read each) and delete those {which}"
    which += note
    if r.expired is None or r.expired.n == 0:
        return f"delete nothing: no {r.kind} entity {which}"
    amount = f"at least {r.expired.n}" if r.expired.lower_bound else str(r.expired.n)
    if r.forecast is not None and r.forecast.guard_refuses:
        return (
            f"refuse: {amount} {r.kind} entities {which} are more than --max-fraction "
            "allows; with --max-fraction 1 (a first run over a backlog) it would delete them"
        )
    return f"delete {amount} {r.kind} entities {which}"


def json_value(value: QueryValue | None) -> int | float | str | None:
    return iso(value) if isinstance(value, dt.datetime) else value


def iso(instant: dt.datetime) -> str:
    """ISO 8601 UTC with a ``Z``, as ``sweep_finished`` writes its cutoff."""
    aware = instant if instant.tzinfo else instant.replace(tzinfo=dt.UTC)
    return aware.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
