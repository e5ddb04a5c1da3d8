"""``--format auto``: find out how the expiry is stored, from the values actually stored.

Every probe is a keys-only range query bounded on both sides, so each answers exactly whether
*any* value lies in that part of the index, however rare (a sample of entities could miss a
handful of odd values among millions). The index cannot tell a Timestamp from an integer of
epoch microseconds, nor show a value's type, so the keys found are looked up to read each value's
true type (CONTEXT trap 1). More than one encoding, or any value sweeper cannot interpret, is a
refusal: guessing wrong would delete live sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
from google.cloud import datastore

from sweeper.encodings import Encoding, classify, describe_value
from sweeper.errors import RefusedError
from sweeper.query import RangeQuery, fetch_keys, lookup
from sweeper.retry import Retrier

# Keys looked up per probe and per end of a band (a few reads in all).
SAMPLE = 3


def _other_ranges(kind: str, prop: str) -> list[RangeQuery]:
    """Index ranges that hold no supported encoding: numbers below 2001 in seconds, the gaps
    between bands, and everything that sorts above numbers (booleans, strings, floats, ...)."""
    seconds = Encoding.EPOCH_SECONDS.band
    millis = Encoding.EPOCH_MILLIS.band
    stamps = Encoding.TIMESTAMP.band
    return [
        RangeQuery(kind, prop, ((">", None), ("<", seconds.lo))),
        RangeQuery(kind, prop, ((">=", seconds.hi), ("<", millis.lo))),
        RangeQuery(kind, prop, ((">=", millis.hi), ("<", stamps.lo))),
        RangeQuery(kind, prop, ((">=", stamps.hi),)),
    ]


@dataclass
class Findings:
    """What the probes saw: examples of each supported encoding, and of anything else."""

    encodings: dict[Encoding, list[object]] = field(default_factory=dict)
    others: list[object] = field(default_factory=list)

    def add(self, value: object) -> None:
        encoding = classify(value)
        if encoding is None:
            self.others.append(value)
        else:
            self.encodings.setdefault(encoding, []).append(value)

    def describe(self) -> str:
        parts = [
            f"{encoding.value} (e.g. {describe_value(values[0])})"
            for encoding, values in self.encodings.items()
        ]
        if self.others:
            examples = ", ".join(describe_value(v) for v in self.others[:2])
            parts.append(f"values of no supported encoding (e.g. {examples})")
        return "; ".join(parts)


def detect_encoding(
    client: datastore.Client, retrier: Retrier, kind: str, prop: str
) -> Encoding | None:
    """The single encoding stored in ``kind.prop``; None when no indexed value exists at all."""
    findings = Findings()
    for encoding in Encoding:
        probe = RangeQuery(kind, prop, ((">=", encoding.band.lo), ("<", encoding.band.hi)))
        _sample(client, retrier, probe, findings, both_ends=True)
    for probe in _other_ranges(kind, prop):
        _sample(client, retrier, probe, findings, both_ends=False)
    structlog.get_logger("sweeper.detect").info(
        "format_detected",
        found=sorted(e.value for e in findings.encodings),
        unsupported_examples=[describe_value(v) for v in findings.others[:SAMPLE]],
    )
    if len(findings.encodings) == 1 and not findings.others:
        return next(iter(findings.encodings))
    if not findings.encodings and not findings.others:
        return None
    reason = "more than one encoding" if len(findings.encodings) > 1 else "unsupported values"
    raise RefusedError(
        f"refusing --format auto on {kind}.{prop}: it holds {reason}: {findings.describe()}. "
        "Nothing was deleted. Sweep one encoding with --format "
        f"{'|'.join(e.value for e in Encoding)}; values of other encodings are left alone."
    )


def _sample(
    client: datastore.Client,
    retrier: Retrier,
    probe: RangeQuery,
    findings: Findings,
    both_ends: bool,
) -> None:
    keys = fetch_keys(client, retrier, probe, SAMPLE)
    if both_ends and len(keys) == SAMPLE:
        # The lowest and highest values of a band: the likeliest place for a stray encoding.
        keys += fetch_keys(client, retrier, probe, SAMPLE, descending=True)
    unique = list({key.flat_path: key for key in keys}.values())
    for entity in lookup(client, retrier, unique):
        value = entity.get(probe.prop)
        if value is not None:
            findings.add(value)
