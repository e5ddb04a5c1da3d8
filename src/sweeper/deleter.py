"""Batched deletes: at most 500 keys per commit, each commit under the retry policy.

Datastore refuses more than 500 mutations per commit and ``delete_multi`` sends all its keys in
one commit, so callers hand over batches already cut to size. A retried batch is
re-sent whole; that is safe because deleting a key that no longer exists is a silent no-op.

:class:`VerifyingDeleter` closes the refresh race: a session refreshed between
the query and the delete would be lost by a blind delete, so it looks each entity up inside a
transaction and deletes only those still expired. A concurrent write to one of them aborts the
commit, and the retry re-reads it.

With ``--with-descendants`` each session goes with the entities under it in its entity group
(:class:`Pending`): the whole group in one commit where it fits, descendants before the session
where it does not, and never a descendant of a session that is not deleted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Protocol, TypeVar

import structlog
from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.concurrency import Degradation
from sweeper.encodings import Encoding, is_expired
from sweeper.retry import NO_CLIENT_RETRY, Retrier
from sweeper.settings import MAX_BATCH_SIZE
from sweeper.stopping import Stopped

T = TypeVar("T")

# The legacy Datastore emulator (and Datastore before Firestore) lets one transaction touch at
# most 25 entity groups; Firestore in Datastore mode takes a whole 500-key batch.
LEGACY_LIMIT = 25

# What one commit should take, and the fewest keys worth a round trip (Beam's floor too).
TARGET_COMMIT_S = 2.0
MIN_COMMIT_KEYS = 5


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class BatchFailed(Exception):
    """A batch whose delete failed for good (or was stopped), after ``deleted`` of its keys."""

    def __init__(self, deleted: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.deleted = deleted
        self.cause = cause


class BatchSizer:
    """Keys per commit, sized to what the database answers in.

    A fixed 500 keys fails on a database that takes longer than the call deadline to delete
    them (a legacy emulator holding half a million entities takes over 20 s): every attempt
    times out and the run fails having deleted nothing. As Apache Beam's Datastore connector
    does, the size follows the recent time per key so that a commit takes about
    ``target_s``; a commit that times out proves at least ``elapsed / keys`` per key, which
    cuts the size at once, and the retry sends the smaller commit. Sweeper aims lower than
    Beam's 6 s so that a commit in flight when the run must stop lands within the stop budget.
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
        self._smallest = maximum
        self._reductions = 0
        self._reduced_since: float | None = None
        self._reduced_s = 0.0

    def observe(self, seconds: float, keys: int) -> None:
        """A commit of ``keys`` keys answered in ``seconds``."""
        with self._lock:
            sample = seconds / max(keys, 1)
            previous = self._per_key
            self._per_key = sample if previous is None else 0.5 * previous + 0.5 * sample
            # A commit answered within the target is no reason to send smaller ones: a first
            # call that also sets up the connection, or a small batch that is mostly round
            # trip, overstates the time per key.
            self._resize(shrink=seconds > self._target_s)

    def measure(self, keys: int, commit: Callable[[], T]) -> T:
        """Run one commit of ``keys`` keys and learn from how long it took, or that it timed out."""
        started = self._clock()
        try:
            value = commit()
        except gexc.DeadlineExceeded:
            self.timed_out(self._clock() - started, keys)
            raise
        self.observe(self._clock() - started, keys)
        return value

    def timed_out(self, seconds: float, keys: int) -> None:
        """A commit of ``keys`` keys was still unanswered after ``seconds``."""
        with self._lock:
            self._per_key = max(self._per_key or 0.0, seconds / max(keys, 1))
            self._resize()

    def _resize(self, shrink: bool = True) -> None:
        assert self._per_key is not None
        fits = int(self._target_s / self._per_key) if self._per_key > 0 else self.maximum
        size = max(self._minimum, min(self.maximum, fits))
        if not shrink:
            size = max(size, self.size)
        now = self._clock()
        if size < self.size:
            self._reductions += 1
            self._smallest = min(self._smallest, size)
        if size < self.maximum and self._reduced_since is None:
            self._reduced_since = now
        if size == self.maximum and self._reduced_since is not None:
            self._reduced_s += now - self._reduced_since
            self._reduced_since = None
        self.size = size

    def degradation(self) -> Degradation:
        with self._lock:
            ongoing = 0.0 if self._reduced_since is None else self._clock() - self._reduced_since
            return Degradation(
                self.maximum, self._smallest, self._reductions, self._reduced_s + ongoing
            )


Descendants = Mapping[datastore.Key, Sequence[datastore.Key]]
# One part of a commit: (session, keys): the keys to delete if the session may go. The session
# itself is the last key of its group's last part.
Part = tuple[datastore.Key, list[datastore.Key]]


class Pending:
    """What is left to delete of one batch: per session, its descendants and then itself.

    A commit takes whole groups while they fit; a group larger than a commit goes over several,
    descendants first and the session last, so a run that stops in between leaves the session
    (still expired) for the next run to find its remaining descendants through.
    """

    def __init__(self, keys: Sequence[datastore.Key], descendants: Descendants | None) -> None:
        under = descendants or {}
        self._groups: deque[Part] = deque((k, [*under.get(k, ()), k]) for k in keys)

    def __bool__(self) -> bool:
        return bool(self._groups)

    def take(self, size: int, max_groups: int = MAX_BATCH_SIZE) -> list[Part]:
        """The next commit: at most ``size`` keys over at most ``max_groups`` sessions."""
        taken: list[Part] = []
        room = size
        for session, keys in self._groups:
            if len(taken) == max_groups:
                break
            if len(keys) > room:
                if not taken:  # a group larger than a commit: its first keys
                    taken.append((session, keys[:size]))
                break
            taken.append((session, keys))
            room -= len(keys)
        return taken

    def done(self, taken: list[Part], kept: frozenset[datastore.Key] = frozenset()) -> None:
        """``taken`` (from :meth:`take`) went, except the groups of sessions in ``kept``."""
        for session, keys in taken:
            rest = self._groups[0][1]
            if session in kept or len(keys) == len(rest):
                self._groups.popleft()
            else:
                del rest[: len(keys)]


def count_parts(parts: list[Part]) -> tuple[int, int]:
    """(sessions, descendants) among the keys of ``parts``."""
    sessions = sum(1 for session, keys in parts if keys[-1] is session)
    return sessions, sum(len(keys) for _s, keys in parts) - sessions


class Deleter(Protocol):
    def delete(self, keys: Sequence[datastore.Key], descendants: Descendants | None = None) -> int:
        """Delete one batch of sessions (and their ``descendants``); return sessions deleted."""
        ...


def _no_descendants(n: int) -> None:
    pass


class BatchDeleter:
    """Blind deletes: commits of ``sizer.size`` keys, one billed delete per key, no reads."""

    def __init__(
        self,
        client: datastore.Client,
        retrier: Retrier,
        sizer: BatchSizer | None = None,
        *,
        on_descendants: Callable[[int], None] = _no_descendants,
    ) -> None:
        self._client = client
        self._retrier = retrier
        self._sizer = sizer or BatchSizer(MAX_BATCH_SIZE, time.monotonic)
        self._on_descendants = on_descendants

    def delete(self, keys: Sequence[datastore.Key], descendants: Descendants | None = None) -> int:
        """Delete one batch, retrying transient failures; raise once the policy gives up.

        Each attempt sends the keys not yet deleted, cut at the size the sizer allows *now*,
        so a commit that timed out is retried smaller.
        """
        if len(keys) > MAX_BATCH_SIZE:
            raise ValueError(f"a commit takes at most {MAX_BATCH_SIZE} mutations")
        pending, done = Pending(keys, descendants), 0
        while pending:
            try:
                done += self._retrier.call("delete", partial(self._commit, pending))
            except (Exception, Stopped) as exc:  # a stop mid-batch still counts what went
                raise BatchFailed(done, exc) from exc
        return done

    def _commit(self, pending: Pending) -> int:
        parts = pending.take(self._sizer.size)
        chunk = [key for _session, keys in parts for key in keys]
        self._sizer.measure(
            len(chunk),
            lambda: self._client.delete_multi(
                chunk, retry=NO_CLIENT_RETRY, timeout=self._retrier.timeout
            ),
        )
        pending.done(parts)
        sessions, under = count_parts(parts)
        if under:
            self._on_descendants(under)
        return sessions


class VerifyingDeleter:
    """Re-checks each session in a transaction and deletes only those still expired.

    Costs one entity read per session on top of the deletes. Transactions take the sizer's
    size, and shrink to 25 sessions (entity groups), for the rest of the run, the first time
    the database refuses a transaction over too many entity groups. A session's descendants
    go in the transaction that re-checks it.
    """

    def __init__(
        self,
        client: datastore.Client,
        retrier: Retrier,
        encoding: Encoding,
        prop: str,
        cutoff: dt.datetime,
        *,
        sizer: BatchSizer | None = None,
        on_descendants: Callable[[int], None] = _no_descendants,
    ) -> None:
        self._client = client
        self._retrier = retrier
        self._encoding = encoding
        self._prop = prop
        self._cutoff = cutoff
        self._sizer = sizer or BatchSizer(MAX_BATCH_SIZE, time.monotonic)
        self._on_descendants = on_descendants
        # Sessions (entity groups) per transaction.
        self.transaction_size = MAX_BATCH_SIZE
        self._lock = threading.Lock()
        self._log = structlog.get_logger("sweeper.verify")

    def delete(self, keys: Sequence[datastore.Key], descendants: Descendants | None = None) -> int:
        pending, deleted = Pending(keys, descendants), 0
        tried: list[int] = []  # the groups in each transaction sent, to tell why one was refused
        while pending:
            try:
                deleted += self._retrier.call("verify", partial(self._next, pending, tried))
            except gexc.InvalidArgument as exc:
                if "entity groups" not in str(exc) or tried[-1] <= LEGACY_LIMIT:
                    raise BatchFailed(deleted, exc) from exc
                self._shrink()
                continue
            except (Exception, Stopped) as exc:  # a stop mid-batch still counts what went
                raise BatchFailed(deleted, exc) from exc
        return deleted

    def _next(self, pending: Pending, tried: list[int]) -> int:
        """One transaction over the next groups: the sessions it deleted."""
        parts = pending.take(self._sizer.size, self.transaction_size)
        tried.append(len(parts))
        keys = sum(len(k) for _s, k in parts)
        kept = self._sizer.measure(keys, partial(self._transaction, parts))
        pending.done(parts, kept)
        sessions, under = count_parts([p for p in parts if p[0] not in kept])
        if under:
            self._on_descendants(under)
        return sessions

    def _shrink(self) -> None:
        with self._lock:  # several workers may be refused at once: shrink and say so once
            if self.transaction_size == LEGACY_LIMIT:
                return
            self.transaction_size = LEGACY_LIMIT
        self._log.info(
            "transaction_size_reduced",
            keys=LEGACY_LIMIT,
            reason="too many entity groups in one transaction",
        )

    def _transaction(self, parts: list[Part]) -> frozenset[datastore.Key]:
        """Look the sessions up, delete the parts of those still expired; all or nothing.

        Returns the sessions kept (not expired any more, or gone).
        """
        timeout = self._retrier.timeout
        sessions = list({session.flat_path: session for session, _keys in parts}.values())
        transaction = self._client.transaction()
        transaction.begin(retry=NO_CLIENT_RETRY, timeout=timeout)
        try:
            entities = self._client.get_multi(
                sessions, transaction=transaction, retry=NO_CLIENT_RETRY, timeout=timeout
            )
            expired = {
                entity.key.flat_path
                for entity in entities
                if is_expired(self._encoding, entity.get(self._prop), self._cutoff)
            }
            kept = frozenset(s for s in sessions if s.flat_path not in expired)
            for session, keys in parts:
                if session not in kept:
                    for key in keys:
                        transaction.delete(key)
            transaction.commit(retry=NO_CLIENT_RETRY, timeout=timeout)
        except BaseException:
            _rollback(transaction, timeout)
            raise
        return kept


def _rollback(transaction: datastore.Transaction, timeout: float) -> None:
    """Best effort: a failed transaction expires on its own; never mask the real error."""
    with contextlib.suppress(Exception):
        transaction.rollback(retry=NO_CLIENT_RETRY, timeout=timeout)
