"""Validated settings for one sweep, built once at the edge (the CLI) and then frozen."""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from sweeper.encodings import Encoding
from sweeper.logs import UsageError

# Shards: one pod of several (``--shard I/N``).
_SHARD = re.compile(r"(\d+)/(\d+)")

# The most pods a run may be cut into: ``--shard I/N`` of both commands. Each
# pod starts at 1/N of the ramp-up's 500 deletes/s, 0.05/s at this limit: an N past it is a
# typo, not a plan.
MAX_SHARDS = 10_000


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based, as Kubernetes' JOB_COMPLETION_INDEX)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD.fullmatch(text.strip())
        if not match:
            raise UsageError(f"invalid shard {text!r}: use I/N, e.g. 0/4 (I from 0 to N-1)")
        try:
            index, count = int(match[1]), int(match[2])
        except ValueError:  # more digits than Python converts (4300), too many to echo back
            raise UsageError(
                f"invalid shard: I and N must be at most {MAX_SHARDS} (given thousands of digits)"
            ) from None
        if count > MAX_SHARDS:
            raise UsageError(f"invalid shard {text!r}: N must be at most {MAX_SHARDS}")
        if count < 1 or not 0 <= index < count:
            raise UsageError(f"invalid shard {text!r}: I must be between 0 and N-1, N >= 1")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


FormatChoice = Encoding | Literal["auto"]

# Default --max-fraction (see guard.py). A run every 15 minutes deletes what expired in the last
# interval: a small share of what is stored (live sessions, and those still within the grace).
# More than half of everything at once is a mistake, or a first run over a backlog.
DEFAULT_MAX_FRACTION = 0.5
FORMAT_CHOICES = ("auto", *(e.value for e in Encoding))

# Datastore refuses more than 500 mutations in one commit.
MAX_BATCH_SIZE = 500

DEFAULT_KIND = "eq-session"
# Four workers keep a query and several commits in flight: enough to hide production's
# tens-of-milliseconds round trips without crowding a small pod.
DEFAULT_WORKERS = 4
MAX_WORKERS = 32
DEFAULT_PROPERTY = "expires_at"
# Why 15 minutes: it dwarfs the runner's read-modify-write of a session (well under a second)
# and any clock skew between the runner and the sweeper, yet frees storage promptly. See
# docs/design.md.
DEFAULT_GRACE = "15m"
# Beyond this, now - grace falls before year 1 and cannot be computed; any grace over ~25 years
# already puts the cutoff before 2001, where no encoding's range holds anything.
MAX_GRACE = dt.timedelta(days=36_500)

# A duration: ``0``, or whole numbers of ASCII digits each followed by a lowercase unit (``90m``,
# ``1h30m``). Nothing else: ``\d`` and ``int()`` would take any script's digits (Arabic-Indic
# or fullwidth ones), and lowering the text read ``3M`` (meant as months) as 3 minutes.
_DURATION = re.compile(r"0|(?:[0-9]+[smhd])+", re.ASCII)
_DURATION_PART = re.compile(r"([0-9]+)([smhd])", re.ASCII)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_UNITS = "s, m, h or d (seconds, minutes, hours, days; lowercase)"
# Firestore's database ids (https://cloud.google.com/firestore/docs/manage-databases): 4 to 63
# lowercase letters, digits and hyphens, a letter first and no hyphen last; or "(default)".
DEFAULT_DATABASE = "(default)"
_DATABASE = re.compile(r"[a-z][a-z0-9-]{2,61}[a-z0-9]", re.ASCII)
# Datastore's limits on names (https://cloud.google.com/datastore/docs/concepts/limits).
_NAMESPACE = re.compile(r"[0-9A-Za-z._-]{0,100}")
_MAX_NAME_BYTES = 1500


def parse_duration(text: str) -> dt.timedelta:
    """Parse ``0``, ``90s``, ``15m``, ``3h``, ``2d`` or a sum such as ``1h30m``.

    Digits 0-9 only, and only the lowercase units: ``3M`` or ``3H`` is refused rather than
    guessed at (``M`` could mean months)."""
    raw = text.strip()
    shown = _shown(text)
    if not _DURATION.fullmatch(raw):
        raise UsageError(
            f"invalid duration {shown}: use 0 or a number (digits 0-9) followed by "
            f"{DURATION_UNITS}, e.g. 90s, 15m, 3h, 2d or 1h30m"
        )
    try:
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(raw))
        return dt.timedelta(seconds=seconds)
    except (OverflowError, ValueError):  # ValueError: more digits than int() reads
        raise UsageError(f"invalid duration {shown}: too large") from None


def _shown(text: str, limit: int = 70) -> str:
    """``text`` quoted for a message, cut short so that the rest of the message still shows."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def format_duration(delta: dt.timedelta) -> str:
    """The shortest ``parse_duration`` spelling of ``delta`` (for logs and messages)."""
    seconds = int(delta.total_seconds())
    if seconds == 0:
        return "0"
    out = []
    for unit in ("d", "h", "m", "s"):
        count, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)


def check_name(what: str, value: str) -> str:
    """Kinds and property names: non-empty, not reserved, within Datastore's size limit."""
    if not value or not value.strip():
        raise UsageError(f"{what} must not be empty")
    if value.startswith("__") and value.endswith("__"):
        raise UsageError(f"{what} {value!r} is reserved by Datastore")
    if len(value.encode()) > _MAX_NAME_BYTES:
        raise UsageError(f"{what} is longer than Datastore's {_MAX_NAME_BYTES}-byte limit")
    return value


def check_namespace(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not _NAMESPACE.fullmatch(value) or (value.startswith("__") and value.endswith("__")):
        raise UsageError(
            f"invalid namespace {value!r}: use up to 100 letters, digits, '.', '_' or '-'"
        )
    return value


def check_database(value: str | None) -> str | None:
    """A Firestore database id, or None for the default database (also ``""`` and
    ``"(default)"``). Checked before any call: a bad id otherwise fails only at Datastore."""
    if value is None or value in ("", DEFAULT_DATABASE):
        return None
    if not _DATABASE.fullmatch(value):
        raise UsageError(
            f"invalid database id {_shown(value)}: use 4 to 63 lowercase letters, digits or "
            f"hyphens, starting with a letter and not ending with a hyphen, or {DEFAULT_DATABASE}"
        )
    return value


def parse_format(text: str) -> FormatChoice:
    if text == "auto":
        return "auto"
    try:
        return Encoding(text)
    except ValueError:
        raise UsageError(
            f"invalid format {text!r}: choose one of {', '.join(FORMAT_CHOICES)}"
        ) from None


def decide_ramp_up(choice: bool | None) -> bool:
    """``--ramp-up``/``--no-ramp-up`` when given; else on against production (Datastore's
    500/50/5 rule), off against an emulator (DATASTORE_EMULATOR_HOST set), which has no key
    ranges to split."""
    return choice if choice is not None else not os.environ.get("DATASTORE_EMULATOR_HOST")


@dataclass(frozen=True)
class SweepSettings:
    """What one sweep does; an impossible value raises :class:`UsageError` on construction."""

    kind: str
    prop: str
    format: FormatChoice
    grace: dt.timedelta
    batch_size: int = MAX_BATCH_SIZE
    dry_run: bool = False
    # Delete each entity at the version its read saw, all or nothing: on by default everywhere,
    # since a session refreshed between the query and the delete is otherwise lost.
    verify: bool = True
    scan: bool = False
    # Delete workers, and as many query streams over slices of the expired range.
    workers: int = DEFAULT_WORKERS
    shard: Shard = field(default_factory=Shard)
    # Datastore's 500/50/5 ramp-up: on against production, off against an emulator (the
    # command line's default: decide_ramp_up).
    ramp_up: bool = False
    max_rate: float | None = None
    max_deletes: int | None = None
    max_runtime: dt.timedelta | None = None
    # Delete each session's descendants (its entity group below it) with it.
    with_descendants: bool = False
    # Refuse a run that would delete more than this share of what carries the property.
    max_fraction: float = DEFAULT_MAX_FRACTION
    project: str | None = None
    database: str | None = None
    namespace: str | None = None
    # Sweep the kind in every namespace of the database, one after another (``targets``).
    all_namespaces: bool = False
    # Succeed when nothing at all carries the property; else that fails the run (a misspelt
    # kind, property or namespace looks like it, and would "succeed" on every schedule).
    allow_empty: bool = False

    def __post_init__(self) -> None:
        check_name("kind", self.kind)
        check_name("property", self.prop)
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise UsageError(f"batch size must be between 1 and {MAX_BATCH_SIZE}")
        if self.grace < dt.timedelta(0):
            raise UsageError("grace must not be negative")
        if self.grace > MAX_GRACE:
            raise UsageError(f"grace must be at most {MAX_GRACE.days}d")
        if self.max_deletes is not None and self.max_deletes < 1:
            raise UsageError("max deletes must be at least 1")
        if self.max_runtime is not None and self.max_runtime <= dt.timedelta(0):
            raise UsageError("max runtime must be greater than 0")
        check_namespace(self.namespace)
        if self.all_namespaces and self.namespace is not None:
            raise UsageError(
                "--all-namespaces sweeps every namespace: it cannot be combined with --namespace"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise UsageError(f"workers must be between 1 and {MAX_WORKERS}")
        if self.max_rate is not None and not (math.isfinite(self.max_rate) and self.max_rate > 0):
            raise UsageError("max rate must be a finite number greater than 0")
        if not 0 < self.max_fraction <= 1:
            raise UsageError("max fraction must be greater than 0 and at most 1 (1: no limit)")
        if self.scan and self.format == "auto":
            raise UsageError("--scan needs an explicit --format: a scan reads values one by one")
        if self.scan and self.shard.count > 1:
            # A scan has no expiry range to cut into shards: every pod would read, and delete
            # from, the whole kind.
            raise UsageError(
                "--scan cannot be combined with --shard: every shard would read the whole kind; "
                "run one scan (it deletes in parallel with --workers)"
            )

    @property
    def format_label(self) -> str:
        return str(self.format)

    @property
    def where(self) -> str:
        """The namespace and database, as messages name them."""
        namespace = f"namespace {self.namespace}" if self.namespace else "the default namespace"
        return namespace + (f" of database {self.database}" if self.database else "")

    @property
    def label(self) -> str:
        """How a run's messages name one sweep: ``kind.property``, and its namespace if any."""
        label = f"{self.kind}.{self.prop}"
        return label if self.namespace is None else f"{label} in namespace {self.namespace}"

    def starts_at_detected_end(self, encoding: Encoding) -> bool:
        """Whether the query streams start at the smallest value ``--format auto`` read (an
        end of the index, ``checks.read_ends``) instead of querying for one: the sweep and its
        forecast both ask here. Not for text, whose stored forms are not ordinals, and not for
        an explicit format, which reads no ends."""
        return not isinstance(self.format, Encoding) and not encoding.needs_values
