"""How each commit the gate (``sweeper.gate``) decides is sent: all or nothing, at the versions
read, throttled, retried, and settled by a lookup when its answer was lost (the gate's rule 5).
:class:`BatchSizer` sizes commits to what the database answers in.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import structlog
from google.api_core import exceptions as gexc
from google.cloud.datastore import Key

from sweeper import rpc
from sweeper.concurrency import Degradation, DegradationLog
from sweeper.logs import DatastoreError, SweeperError, describe_exception, is_bug
from sweeper.result import SweepResult
from sweeper.retry import AMBIGUOUS, Stopped
from sweeper.rpc import Seen
from sweeper.settings import MAX_BATCH_SIZE
from sweeper.target import Target
from sweeper.throttle import Allowance, Capped, Throttle

Path = tuple[Any, ...]

# The legacy Datastore emulator (and Datastore before Firestore) lets one transaction touch at
# most 25 entity groups; Firestore in Datastore mode takes a whole 500-key batch.
LEGACY_LIMIT = 25

# The name prefix of the key a lost commit's settling lookup asks for as never written (rule 5).
NEVER_WRITTEN = "__sweeper_never_written__"

# What one commit should take (Beam aims at 6 s; lower, so that a commit in flight when the run
# must stop lands within the stop budget), and the fewest keys worth a round trip (as Beam's).
TARGET_COMMIT_S = 2.0
MIN_COMMIT_KEYS = 5


class BatchSizer:
    """Keys per commit, following the recent time per key so that a commit takes about
    ``target_s`` (docs/design.md: a fixed 500 keys fails for good on a database slower than the
    call deadline). A commit that times out proves at least ``elapsed / keys`` per key: the
    size is cut at once and the retry sends the smaller commit.
    """

    def __init__(
        self,
        maximum: int,
        clock: Callable[[], float],
        target_s: float = TARGET_COMMIT_S,
        minimum: int = MIN_COMMIT_KEYS,
    ) -> None:
        self.maximum = maximum
        self._minimum = min(minimum, maximum)
        self._clock = clock
        self._target_s = target_s
        self._per_key: float | None = None  # smoothed seconds per key
        self._lock = threading.Lock()
        self.size = maximum
        self._log = DegradationLog(maximum, clock)

    def observe(self, seconds: float, keys: int) -> None:
        with self._lock:
            sample = seconds / max(keys, 1)
            self._per_key = sample if self._per_key is None else 0.5 * self._per_key + 0.5 * sample
            # Within the target is no reason to shrink: a first call that also sets up the
            # connection, or a small batch that is mostly round trip, overstates the time per key.
            self._resize(shrink=seconds > self._target_s)

    @contextmanager
    def timing(self, keys: int) -> Iterator[None]:
        """Around one commit: learn from how long it took, or that it timed out."""
        started = self._clock()
        try:
            yield
        except gexc.DeadlineExceeded:
            self.timed_out(self._clock() - started, keys)
            raise
        self.observe(self._clock() - started, keys)

    def timed_out(self, seconds: float, keys: int) -> None:
        with self._lock:
            self._per_key = max(self._per_key or 0.0, seconds / max(keys, 1))
            self._resize()

    def refused(self, keys: int) -> None:
        """A larger commit was refused as too big: at most ``keys`` for now (fast commits grow
        the size back, so one heavy entity does not slow the rest of the run)."""
        with self._lock:
            if keys < self.size:
                self._per_key = max(self._per_key or 0.0, self._target_s / max(keys, 1))
                self._resize()

    def _resize(self, shrink: bool = True) -> None:
        assert self._per_key is not None
        fits = int(self._target_s / self._per_key) if self._per_key > 0 else self.maximum
        size = max(self._minimum, min(self.maximum, fits))
        if not shrink:
            size = max(size, self.size)
        self._log.record(size)
        self.size = size

    def degradation(self) -> Degradation:
        with self._lock:
            return self._log.degradation()


class Changed(Exception):
    """A commit was refused because one of its entities (or a guard) changed since it was
    read; ``gone`` are its keys a lookup found missing afterwards, already accounted for."""

    def __init__(self, gone: frozenset[Path] = frozenset()) -> None:
        super().__init__("changed since read")
        self.gone = gone


class Committer:
    """Sends the gate's commits; one per run, shared by every worker."""

    def __init__(
        self,
        target: Target,
        *,
        verify: bool,
        transaction_groups: int,
        sizer: BatchSizer,
        throttle: Throttle,
        allowance: Allowance,
        result: SweepResult,
    ) -> None:
        self._client, self._retrier = target.client, target.retrier
        self._kind, self._prop, self.verify = target.kind, target.prop, verify
        self._sizer, self._throttle, self.allowance = sizer, throttle, allowance
        # Under the result's lock: keys sent, not yet answered (``unconfirmed`` if the run must
        # stop first); keys refused even alone; the versions this run's commits wrote (rule 5).
        self.result = result
        self.in_flight = 0
        self.refused: list[Key] = []
        self._versions: set[int] = set()
        # Entity groups per all-or-nothing commit; a refusal cuts it to ``LEGACY_LIMIT``.
        self.groups_per_commit = transaction_groups if verify else MAX_BATCH_SIZE
        self._lock = threading.Lock()
        self._log = structlog.get_logger("sweeper.gate").bind(kind=target.kind)

    def send(self, chunk: list[Seen], guards: Sequence[Seen] = (), sessions: int = 1) -> None:
        """One all-or-nothing commit of ``chunk`` (reserved by the caller), throttled, retried.
        Raises :class:`Changed` (the reservation given back, but for keys that may have gone),
        :class:`Resize`, :class:`Split` or ``Capped``."""
        n = len(chunk)
        self.result.add(throttle_wait_s=self._throttle.acquire(n))
        maybe_applied = [False]
        try:
            with self._in_flight(n):
                version = self._retrier.call(
                    "delete" if not self.verify else "verify",
                    partial(self._attempt, chunk, guards, maybe_applied),
                )
        except (Changed, Resize) as exc:
            if not self.verify:  # blind deletes are sent again as they are: nothing to settle
                self.allowance.release(n)
                raise
            settled = self._settle(chunk, maybe_applied[0])
            if settled is not None:
                self.allowance.release(n - len(settled))
                if isinstance(exc, Resize) and not settled:
                    raise  # not applied: sent again smaller
                raise Changed(settled) from None
            version = None  # rule 5: the lost commit was applied; it counts as confirmed
        except gexc.InvalidArgument as exc:
            self.allowance.release(n)
            self._throttle.refund(n)
            raise self._refused(exc, sessions, n) from exc
        except (Stopped, Capped, SweeperError):
            raise
        except Exception as exc:
            if maybe_applied[0]:
                self.result.add(unconfirmed=n)
            else:
                self.allowance.release(n)
            self.result.add(failed=sessions)
            if is_bug(exc):  # not the database's failure: the engine logs its traceback
                raise
            raise DatastoreError(
                f"deleting a batch failed after retries: {describe_exception(exc)}"
            ) from exc
        if version is not None:
            with self.result.lock:
                self._versions.add(version)
        self._throttle.record(accepted=True)
        self._log.debug("batch_deleted", keys=n, sessions=sessions)

    def _attempt(self, chunk: list[Seen], guards: Sequence[Seen], maybe: list[bool]) -> int | None:
        """One try: a single-use transaction, or (guards) one that looks them up first."""
        timeout = self._retrier.delete_timeout
        deletes = [(s.key, s.version if self.verify else None) for s in chunk]
        txn = rpc.begin(self._client, timeout) if guards else None
        try:
            if txn is not None:
                looked = rpc.lookup(self._client, txn, [g.key for g in guards], self._prop, timeout)
                self.result.add(entities_read=len(guards))
                if any(looked.found.get(g.key.flat_path) != g for g in guards):
                    raise Changed
            with self._sizer.timing(len(deletes)):
                return rpc.commit(self._client, txn, deletes, timeout, atomic=self.verify)
        except gexc.FailedPrecondition:
            txn = None  # a refused commit ends its transaction
            raise Changed from None
        except AMBIGUOUS as exc:
            maybe[0] = True
            if isinstance(exc, gexc.DeadlineExceeded) and self._sizer.size < len(deletes):
                # The same commit would time out again: settled, then sent smaller.
                raise Resize from exc
            raise
        finally:
            if txn is not None:
                rpc.end_transaction(self._client, txn, timeout)

    def _settle(self, chunk: list[Seen], maybe_applied: bool) -> frozenset[Path] | None:
        """Rule 5, after a refusal: None when an earlier attempt whose answer was lost is
        shown to have deleted all of ``chunk``; else its keys that may have gone (counted as
        ``unattributed``), for the re-read to leave out. The lookup also asks for a key never
        written: where a missing key's version is the deleting write's (the Firestore
        emulator), keys all gone at one version, not the never-written key's nor any other
        commit's of this run, went with this one; where it is the snapshot's (the API as
        documented, the legacy emulator), all versions match and nothing is shown.
        """
        if not maybe_applied:
            return frozenset()
        first = chunk[0].key  # the never-written key in the same partition
        never = Key(
            self._kind,
            f"{NEVER_WRITTEN}{uuid.uuid4().hex}",
            project=first.project,
            namespace=first.namespace,
            database=first.database,
        )
        looked = self.lookup([*(s.key for s in chunk), never])
        gone = frozenset(s.key.flat_path for s in chunk if s.key.flat_path not in looked.found)
        versions = {looked.missing.get(p) for p in gone}
        with self.result.lock:
            ours = (
                len(gone) == len(chunk)
                and len(versions) == 1
                and looked.missing.get(never.flat_path) not in versions
                and not versions & self._versions
            )
            if ours:
                self._versions.update(v for v in versions if v is not None)
        if ours:
            return None
        self.result.add(unattributed=len(gone))
        return gone

    def lookup(self, keys: Sequence[Key]) -> rpc.Looked:
        looked: rpc.Looked = self._retrier.call(
            "lookup",
            lambda: rpc.lookup(self._client, None, keys, self._prop, self._retrier.timeout),
        )
        self.result.add(entities_read=len(keys))
        return looked

    def _refused(self, exc: gexc.InvalidArgument, sessions: int, keys: int) -> Exception:
        if "entity groups" in str(exc) and sessions > LEGACY_LIMIT:
            with self._lock:  # several workers may be refused at once: shrink and say so once
                shrunk = self.groups_per_commit != LEGACY_LIMIT
                self.groups_per_commit = LEGACY_LIMIT
            if shrunk:
                self._log.info(
                    "transaction_size_reduced",
                    keys=LEGACY_LIMIT,
                    reason="too many entity groups in one transaction",
                )
            return Split(keys, LEGACY_LIMIT)
        if "too big" in str(exc).lower():
            if keys > 1:
                smaller = max(1, keys // 2)
                self._sizer.refused(smaller)
                self._log.info(
                    "commit_split", keys=keys, now=smaller, reason="transaction or write too big"
                )
                return Split(smaller, max(1, sessions // 2))
            return Split(1, 1)
        self.result.add(failed=sessions)
        return DatastoreError(f"deleting a batch failed after retries: {describe_exception(exc)}")

    @contextmanager
    def _in_flight(self, keys: int) -> Iterator[None]:
        with self.result.lock:
            self.in_flight += keys
        try:
            yield
        finally:
            with self.result.lock:
                self.in_flight -= keys

    def refuse(self, key: Key) -> None:
        with self.result.lock:
            self.refused.append(key)
            self.result.add(failed=1)
        self._log.error(
            "delete_refused",
            key=str(key.flat_path),
            reason="transaction or write too big, even alone: left in place",
        )


class Resize(Exception):
    """A commit timed out and the sizer wants smaller ones: it was not applied (a lookup
    showed its keys at the versions sent), so its groups go again in smaller commits."""


class Split(Exception):
    """A commit refused as too big, or as touching too many entity groups: send what it
    held at most ``keys`` keys and ``groups`` groups a commit."""

    def __init__(self, keys: int, groups: int) -> None:
        super().__init__("split")
        self.keys, self.groups = keys, groups


def refused_error(refused: Sequence[Key]) -> str | None:
    """The run's error when the database would not delete some keys even one at a time."""
    if not refused:
        return None
    return (
        f"Datastore refused to delete {len(refused)} entities even one per commit "
        f"(transaction or write too big), first {refused[0].flat_path}; they were left, "
        "everything else due was deleted"
    )
