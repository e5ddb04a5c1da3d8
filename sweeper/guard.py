"""Guards on the blast radius: before the first batch the run's share of what carries the
property is counted, a run above ``--max-fraction`` is refused, and on a terminal the operator
is asked. Why, and what the counts cost: docs/design.md, "Guards on the blast radius".
"""

from __future__ import annotations

import math
import os
import select
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.cloud import datastore

from sweeper.encodings import Encoding, ExpiredRange, Rule, expired_range
from sweeper.gate import decide
from sweeper.logs import RefusedError
from sweeper.result import Exposure, Plan, SweepResult
from sweeper.retry import Stopped, StopReason
from sweeper.rpc import Count
from sweeper.settings import SweepSettings
from sweeper.target import Target
from sweeper.throttle import Allowance

# Counts stop here (as a COUNT, 10,000 billed reads); a due count past it is a backlog.
COUNT_LIMIT = 10_000_000
# How often the question looks at the stop flag while it waits for an answer.
_ANSWER_POLL_S = 0.1
# Sessions sampled each side of the cutoff to estimate what each takes with it (descendants).
DESCENDANT_SAMPLE = 20


def measure(
    target: Target, window: ExpiredRange, share: float, under: Descendants | None = None
) -> Exposure:
    """Count the run's range, then what carries the property only as far as the guard needs
    (with ``due`` exact, ``due / share`` of them): the cost follows the deletes, not the kind."""
    due = target.count(target.within(window), COUNT_LIMIT)
    if due.lower_bound or share >= 1:
        enough = COUNT_LIMIT
    elif under is not None:  # in entities: sessions with what lies under them
        enough = min(COUNT_LIMIT, under.sessions_needed(due.n, share))
    else:
        enough = math.ceil(due.n / share)
    return Exposure(due, target.count(target.carrying(), max(1, enough)))


def scan_exposure(
    target: Target, rule: Rule, on_read: Callable[[int], None]
) -> tuple[Exposure, list[datastore.Key], list[datastore.Key]]:
    """A scan's exposure, read whole before anything is deleted (an unindexed property has no
    COUNT); and up to ``DESCENDANT_SAMPLE`` keys due and live, for :func:`sample_descendants`."""
    due = carrying = 0
    due_keys: list[datastore.Key] = []
    live_keys: list[datastore.Key] = []
    for page in target.scan_pages():
        on_read(len(page))
        for seen in page:
            if seen.value is None:
                continue
            carrying += 1
            side = due_keys if rule.due(seen.value) else live_keys
            due += side is due_keys
            if len(side) < DESCENDANT_SAMPLE:
                side.append(seen.key)
    return Exposure(Count(due, "scan", None), Count(carrying, "scan", None)), due_keys, live_keys


@dataclass(frozen=True)
class Descendants:
    """Entities under each session, on average over a sample of due and of live sessions:
    under a due one, only what would go with it (a live session under it keeps its own)."""

    per_due: float
    per_live: float
    sampled: int = 0

    def sessions_needed(self, due: int, share: float) -> int:
        """Carrying sessions to count so that ``due`` sessions' share is settled in entities,
        each carrying session beyond the due ones weighing ``1 + per_live``."""
        due_entities = due * (1 + self.per_due)
        return math.ceil(due + due_entities * (1 / share - 1) / (1 + self.per_live))

    def exposure(self, sessions: Exposure) -> Exposure:
        """The exposure in entities: each session counted with what lies under it."""
        due, carrying = sessions.due, sessions.carrying
        due_n = round(due.n * (1 + self.per_due))
        carrying_n = due_n + round(max(0, carrying.n - due.n) * (1 + self.per_live))
        return Exposure(
            Count(due_n, due.method, due_n if due.lower_bound else None),
            Count(carrying_n, carrying.method, carrying_n if carrying.lower_bound else None),
        )


def sample_descendants(
    target: Target, rule: Rule, due: list[datastore.Key], live: list[datastore.Key]
) -> Descendants:
    """One ancestor query per sampled session (at most ``2 * DESCENDANT_SAMPLE``)."""

    def mean(counts: list[int]) -> float:
        return sum(counts) / len(counts) if counts else 0.0

    going = going_with(target, rule, due)
    return Descendants(
        mean(going), mean([len(target.descendants(k)) for k in live]), len(due) + len(live)
    )


def going_with(target: Target, rule: Rule, due: list[datastore.Key]) -> list[int]:
    """For each due session that would go, the entities under it that would go with it
    (``gate.decide``): what the guard and ``inspect`` sample alike."""
    groups = [decide(rule, key, target.group(key)) for key in due]
    return [len(g.members) - 1 for g in groups if g is not None]


def check_fraction(exposure: Exposure, share: float, kind: str, prop: str) -> None:
    """Refuse a run that would delete more than ``share`` of what carries ``prop``."""
    if exposure.within(share):
        return
    due, carrying = exposure.due, exposure.carrying
    fraction = exposure.fraction
    if fraction is not None:
        how_much = f"{due.n} of the {carrying.n} {kind} entities that carry {prop} ({fraction:.0%})"
    elif due.lower_bound:
        how_much = f"at least {due.n} {kind} entities (more than could be counted, {COUNT_LIMIT})"
    else:
        how_much = (
            f"{due.n} {kind} entities, of at least {carrying.n} that carry {prop} "
            f"(at most {due.n / carrying.n:.0%})"
        )
    raise RefusedError(
        f"refusing: this run would delete {how_much}, more than --max-fraction {share:g}. "
        "A wrong --property, --kind or --grace looks like this. So does the first run over a "
        "large backlog: if that is what this is, run it once with --max-fraction 1. Nothing "
        "was deleted."
    )


def allowance(
    target: Target,
    settings: SweepSettings,
    encoding: Encoding,
    result: SweepResult,
    *,
    confirm: Callable[[Plan], bool] | None,
    log: Any,
) -> Allowance:
    """Before the first batch: refuse a run over --max-fraction; on a terminal, ask. What passes
    is the run's allowance, which the gate holds every commit to: a descendants estimate that
    was too low stops the run at the share instead of passing it."""
    s = settings
    window = expired_range(encoding, result.cutoff)
    if s.dry_run or (window.empty and not s.scan) or (s.max_fraction >= 1 and confirm is None):
        return Allowance(s.max_deletes)
    share = s.max_fraction if confirm is None else 1.0  # a person sees the whole count
    rule = Rule(s.kind, s.prop, encoding, result.cutoff)
    if s.scan:
        exposure, due, live = scan_exposure(target, rule, lambda n: result.add(entities_read=n))
        under = sample_descendants(target, rule, due, live) if s.with_descendants else None
    elif s.with_descendants:
        # Sampled first, so that what carries the property is counted as far as the share needs.
        unexpired = ExpiredRange(window.encoding, window.hi, window.encoding.band.hi)
        due = target.keys(target.within(window), DESCENDANT_SAMPLE)
        live = target.keys(target.within(unexpired), DESCENDANT_SAMPLE)
        under = sample_descendants(target, rule, due, live)
        exposure = measure(target, window, share, under)
    else:
        exposure, under = measure(target, window, share), None
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
        client = target.client
        plan = Plan(
            client.project, client.database or None, client.namespace or None, rule, exposure
        )
        if not confirm(plan):
            raise Stopped(StopReason.DECLINED)
    if s.max_fraction >= 1:
        return Allowance(s.max_deletes)
    carrying = exposure.carrying.n
    return Allowance(
        s.max_deletes,
        math.floor(s.max_fraction * carrying),
        f" ({s.max_fraction:g} of the {carrying} entities carrying {s.prop})",
    )


def describe(plan: Plan) -> str:
    """The lines shown before the question on a terminal."""
    exposure, rule = plan.exposure, plan.rule
    amount = f"{'at least ' if exposure.due.lower_bound else ''}{exposure.due.n}"
    carrying = f"{'at least ' if exposure.carrying.lower_bound else ''}{exposure.carrying.n}"
    share = "" if exposure.fraction is None else f" ({exposure.fraction:.0%})"
    return "\n".join(
        [
            f"  project    {plan.project}",
            f"  database   {plan.database or '(default)'}",
            f"  namespace  {plan.namespace or '(default)'}",
            f"  kind       {rule.kind}",
            f"  property   {rule.prop} ({rule.encoding.value})",
            f"  cutoff     {rule.cutoff.isoformat().replace('+00:00', 'Z')}",
            f"  matches    {amount} of {carrying} entities carrying it{share}",
        ]
    )


def ask_before_deleting(plan: Plan, stopping: Callable[[], bool]) -> bool:
    """Show the person at stdin's terminal what the sweep is about to delete, and ask (default
    and end of input: no). The question goes to the terminal itself, whatever stdout and stderr
    are piped to; the answer is read unbuffered while the stop flag is watched, so Ctrl-C stops
    the run (exit 130): a thread left blocked in stdin's buffered reader would crash the
    interpreter at exit ("could not acquire lock for <stdin>")."""
    fd = os.open(os.ttyname(sys.stdin.fileno()), os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, f"sweeper is about to delete:\n{describe(plan)}\n".encode())
        while True:
            os.write(fd, f"Delete these {plan.exposure.due.n:,} entities? [y/N]: ".encode())
            answer = _read_line(fd, stopping)
            if answer is None:  # end of input
                os.write(fd, b"\n")
                return False
            if answer.strip().lower() in ("", "n", "no", "y", "yes"):
                return answer.strip().lower() in ("y", "yes")
            os.write(fd, b"Please answer y or n.\n")
    except Stopped:  # Ctrl-C: the terminal has echoed ``^C``; end its line
        os.write(fd, b"\n")
        raise
    finally:
        os.close(fd)


def _read_line(fd: int, stopping: Callable[[], bool]) -> str | None:
    """A line typed at ``fd`` (None at end of input); :class:`Stopped` once the run must stop."""
    typed = b""
    while not typed.endswith(b"\n"):
        if stopping():
            raise Stopped(StopReason.SIGNAL)
        if select.select([fd], [], [], _ANSWER_POLL_S)[0]:
            chunk = os.read(fd, 1024)
            if not chunk:
                return None
            typed += chunk
    return typed.decode(errors="replace")
