"""The one way to a delete. Every path (range, shards, scan, text, --with-descendants) ends here.

The rules, each enforced below where it is named:

1. **Checked atomically with the delete** (:meth:`Gate.delete`). A session refreshed, or
   re-created under its old key, between the read that found it and the delete would be lost
   by a blind delete; a grace period only covers sessions refreshed *before* they expire. So
   by default each commit first looks its keys up in its own read-write transaction and
   deletes only those still expired: a writer re-saving one of them then either waits for
   the commit and re-creates the entity after it, or makes the commit abort, and the keys
   are looked up again. ``--no-verify`` (an explicit opt-out that logs a warning) deletes
   what the query returned as it is; the race above is open again.

   (A keys-only range query inside the deleting transaction would check a page without the
   lookup's billed reads, and Firestore in Datastore mode runs one; but its emulator locks the
   whole kind for such a query, so those transactions cannot overlap and a run of them is
   never faster than a blind loop. Lookups lock only their keys, and run side by side.
   docs/design.md has the measurements.)
2. **Descendants are checked too.** With ``--with-descendants`` an entity under a session that
   is of the swept kind is a session itself: it goes only if it is expired by the same rule,
   checked in the same transaction, and a live one keeps everything under it. A session under
   another one of the same batch goes with its ancestor's group, never twice.
3. **Counted in entities.** ``--max-deletes`` and the fraction guard's allowance
   (:class:`Allowance`) count every entity a commit deletes, children included, reserved
   before the commit is sent.
4. **One key once per commit**, and a commit refused as too big (Datastore's "transaction or
   write too big", which a smaller commit passes) is split; a single key still refused is
   left, counted as failed and named, and the run goes on.
5. **Counts never drift.** A commit whose answer is lost (DEADLINE_EXCEEDED, UNAVAILABLE, ...)
   may have been applied: its keys are remembered, and the retry counts those it finds gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
from google.api_core import exceptions as gexc
from google.cloud.datastore import Key

from sweeper import rpc
from sweeper.allowance import Allowance, Capped
from sweeper.concurrency import together
from sweeper.deleter import BatchSizer, Pending
from sweeper.encodings import Encoding, is_expired
from sweeper.errors import (
    DatastoreError,
    SweeperError,
    describe_exception,
    is_bug,
)
from sweeper.pipeline import Pipeline
from sweeper.result import SweepResult
from sweeper.retry import AMBIGUOUS
from sweeper.settings import MAX_BATCH_SIZE
from sweeper.stopping import Stopped
from sweeper.target import Target
from sweeper.throttle import Throttle

# The legacy Datastore emulator (and Datastore before Firestore) lets one transaction touch at
# most 25 entity groups; Firestore in Datastore mode takes a whole 500-key batch.
LEGACY_LIMIT = 25

# A transaction begun for a worker's next commit is used only this long after it was begun
# (Firestore ends a transaction left idle for about a minute); an older one is left unused.
SPARE_MAX_AGE_S = 10.0

# With --with-descendants each session costs one ancestor query: made one after the other, a
# page of 500 sessions waits 500 round trips before its commit, so they go this many at once.
DESCENDANT_QUERIES = 8


class Mode(enum.StrEnum):
    LOOKUP = "lookup"
    BLIND = "blind"


@dataclass(frozen=True)
class Rule:
    """What may be deleted: an entity of ``kind`` whose ``prop`` is expired in ``encoding``."""

    kind: str
    prop: str
    encoding: Encoding
    cutoff: dt.datetime

    def expired(self, found: dict[tuple[Any, ...], object], key: Key) -> bool:
        """Whether a lookup's ``found`` (``rpc.lookup``) shows ``key`` still expired."""
        path = key.flat_path
        return path in found and is_expired(self.encoding, found[path], self.cutoff)


@dataclass
class _Ledger:
    """What the gate reports into the run's result, under the run's lock."""

    result: SweepResult
    lock: threading.Lock
    in_flight: int = 0
    refused: list[Key] = field(default_factory=list)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self.result, name, getattr(self.result, name) + n)


@dataclass
class _Commit:
    """The keys of one commit, and what each deleted key counts as."""

    parts: list[tuple[Key, list[Key]]]
    sessions: int = 0
    descendants: int = 0
    kept: frozenset[Key] = frozenset()  # sessions whose group stays: not expired, or gone
    capped: bool = False  # --max-deletes left no room for the rest of the batch


class Gate:
    """Deletes what may be deleted, and nothing else; one per run, shared by every worker."""

    def __init__(
        self,
        target: Target,
        rule: Rule,
        *,
        verify: bool,
        transaction_groups: int = MAX_BATCH_SIZE,
        dry_run: bool,
        with_descendants: bool,
        sizer: BatchSizer,
        allowance: Allowance,
        throttle: Throttle,
        result: SweepResult,
        lock: threading.Lock,
        should_stop: Callable[[], bool],
        on_batch: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target, self._rule = target, rule
        self._client, self._retrier = target.client, target.retrier
        self.mode = Mode.LOOKUP if verify else Mode.BLIND
        self._dry_run, self._descend = dry_run, with_descendants
        self._sizer, self.allowance, self._throttle = sizer, allowance, throttle
        self.ledger = _Ledger(result, lock)
        self._should_stop = should_stop
        self._on_batch = on_batch  # progress, after every commit
        # Entity groups per checked transaction: 25 where the database is known to take no
        # more (``LEGACY_LIMIT``); a refusal cuts it to that anyway (``_shrink_groups``).
        self._groups_per_txn = transaction_groups if verify else MAX_BATCH_SIZE
        self._lock = threading.Lock()
        self._clock = clock
        self._local = threading.local()  # each delete worker's transaction begun in advance
        self._log = structlog.get_logger("sweeper.gate").bind(kind=rule.kind)
        if not verify and not dry_run:
            self._log.warning(
                "verify_off",
                hint="--no-verify: a session refreshed or re-created under its key between "
                "the query and the delete is lost",
            )

    # -- entry points ---------------------------------------------------------------------

    def delete(self, keys: Sequence[Key]) -> None:
        """A page of candidates, read outside any transaction: each re-checked as it goes."""
        keys = _unique(keys)
        left = self.allowance.left()
        if left is not None and len(keys) > left:  # a session is at least one entity
            keys = keys[:left]
            self.allowance.capped = True
        if not keys:
            if left == 0:
                raise Capped
            return
        groups, found = self._with_descendants(keys)
        if self._dry_run:  # the commits a real run would make of this page
            granted = self.allowance.reserve([len(g) for _s, g in groups])
            entities = sum(len(g) for _s, g in groups[:granted])
            self.ledger.add(
                batches=-(-entities // self._sizer.size),
                matched=entities - found,
                descendants_matched=found,
            )
            if granted < len(groups):
                raise Capped
            return
        self.ledger.add(matched=len(keys), descendants_matched=found)
        pending = Pending([s for s, _g in groups], {s: g[:-1] for s, g in groups})
        size = self._sizer.size
        gone: dict[tuple[Any, ...], bool] = {}  # keys of commits whose answer was lost
        try:
            while pending and not self._should_stop():
                size = self._commit_next(pending, size, gone)
                self.ledger.add(batches=1)
                self._on_batch()
        except Capped:
            # --max-deletes left no room for the rest: another worker's page may have taken
            # it after this one was counted, so only what was dealt with counts as matched.
            self.ledger.add(matched=-len(pending))
            raise

    # -- checked commits ------------------------------------------------------------------

    def _commit_next(self, pending: Pending, size: int, gone: dict[tuple[Any, ...], bool]) -> int:
        """One commit of what ``pending`` holds next; the commit size to go on with.

        Each attempt takes its keys anew at the size the sizer allows then, so a commit that
        timed out is retried smaller.
        """
        taken: list[list[tuple[Key, list[Key]]]] = [[]]
        paid = [0]  # keys the throttle let through for this commit (once, not per attempt)
        what = "verify" if self.mode is not Mode.BLIND else "delete"
        try:
            commit = self._retrier.call(
                what, partial(self._checked_attempt, pending, size, gone, taken, paid)
            )
        except gexc.InvalidArgument as exc:
            self._throttle.refund(paid[0])  # refused outright: nothing went
            parts = taken[0]
            keys = sum(len(k) for _s, k in parts)
            # Judged by the refused commit's own size: another worker may have shrunk already.
            if "entity groups" in str(exc) and len(parts) > LEGACY_LIMIT:
                self._shrink_groups()
                return size
            if not _too_big(exc):
                self.ledger.add(failed=sum(1 for s, ks in parts if ks[-1] is s))
                raise self._failed(exc) from exc
            if keys <= 1:
                self._refuse(_keys(parts))
                pending.done(parts, frozenset(s for s, _k in parts))
                return self._sizer.size
            return self._shrink_for_too_big(keys)
        except (Stopped, Capped, SweeperError):
            raise
        except Exception as exc:
            self.ledger.add(failed=sum(1 for s, ks in taken[0] if ks[-1] is s))
            if is_bug(exc):  # not the database's failure: the engine logs its traceback
                raise
            raise self._failed(exc) from exc
        self.ledger.add(
            deleted=commit.sessions,
            descendants_deleted=commit.descendants,
            skipped=len(commit.kept),
        )
        self._log.debug("batch_deleted", keys=len(_keys(taken[0])), deleted=commit.sessions)
        if commit.capped:
            raise Capped
        return min(size, self._sizer.size)

    def _checked_attempt(
        self,
        pending: Pending,
        size: int,
        gone: dict[tuple[Any, ...], bool],
        taken: list[list[tuple[Key, list[Key]]]],
        paid: list[int],
    ) -> _Commit:
        """Take the next commit's groups, re-check and delete them in one transaction (blind:
        one plain commit); reserve them in the allowance for as long as they may have gone."""
        parts = pending.take(min(size, self._sizer.size), self._groups_per_txn)
        granted = self.allowance.reserve([len(k) for _s, k in parts])
        if granted == 0:
            raise Capped
        capped, parts = granted < len(parts), parts[:granted]
        taken[0] = parts
        keys = sum(len(k) for _s, k in parts)
        if not paid[0]:
            self._wait(keys)
            paid[0] = keys
        try:
            with self._in_flight(keys):
                commit = self._delete_checked(parts, gone)
        except BaseException:
            # Also after a lost answer: the retry reserves its keys again, those found gone
            # included (they count as deleted by it).
            self.allowance.release(keys)
            raise
        self.allowance.release(keys - commit.sessions - commit.descendants)
        pending.done(parts, commit.kept)
        commit.capped = capped
        return commit

    def _delete_checked(
        self, parts: list[tuple[Key, list[Key]]], gone: dict[tuple[Any, ...], bool]
    ) -> _Commit:
        timeout = self._retrier.timeout
        if self.mode is Mode.BLIND:
            keys = _keys(parts)
            self._send(len(keys), partial(rpc.commit, self._client, None, keys, timeout))
            return _counted(parts)
        # Begun by its own call: a lookup that begins its transaction (``new_transaction``)
        # left the Firestore emulator holding locks no later call could take.
        txn: bytes | None = None
        try:
            txn = self._spare() or rpc.begin(self._client, timeout)
            wanted = _to_check(parts, self._rule.kind)
            lost = [k for k in _keys(parts) if k.flat_path in gone]
            # The next commit's transaction is begun while this one looks its keys up.
            found, self._local.spare = together(
                partial(self._lookup, _unique([*wanted, *lost]), txn), self._begin_spare
            )
            commit, already = self._decide(parts, found, gone, wanted)
            if not commit.parts:
                rpc.end_transaction(self._client, txn, timeout)
                _forget(gone, parts)
                return _merge(commit, already)
            keys = _keys(commit.parts)
            sent = {k.flat_path: k is s for s, ks in commit.parts for k in ks}
            try:
                self._send(len(sent), partial(rpc.commit, self._client, txn, keys, timeout))
            except AMBIGUOUS:
                gone.update(sent)
                raise
        except BaseException:
            if txn is not None:
                rpc.end_transaction(self._client, txn, timeout)
            raise
        _forget(gone, parts)
        return _merge(commit, already)

    def _decide(
        self,
        parts: list[tuple[Key, list[Key]]],
        found: dict[tuple[Any, ...], object],
        gone: dict[tuple[Any, ...], bool],
        checked: list[Key],
    ) -> tuple[_Commit, _Commit]:
        """The keys that may go now, and those an earlier, unanswered commit deleted (rule 5).

        A session no longer expired (or gone) keeps its whole group; a key of the swept kind
        under it that is not expired keeps itself and everything under it (rule 2).
        """
        here = {k.flat_path for k in _keys(parts)}
        lost = {p for p in gone if p in here and p not in found}
        already = _Commit([])
        already.sessions = sum(1 for p in lost if gone[p])
        already.descendants = len(lost) - already.sessions
        blocked = {k.flat_path for k in checked if not self._rule.expired(found, k)}
        commit = _Commit([])
        for session, keys in parts:
            if session.flat_path in blocked:
                continue
            kept = [
                k
                for k in keys
                if k.flat_path not in lost and not _under_blocked(k, session, blocked)
            ]
            if kept:
                commit.parts.append((session, kept))
        counted = _counted(commit.parts)
        counted.kept = frozenset(s for s, _k in parts if s.flat_path in blocked - lost)
        return counted, already

    def _spare(self) -> bytes | None:
        """The transaction this worker began for its next commit, if it is fresh enough.

        Begun, it has read nothing and locks nothing. Its lookup sees every write made before
        the lookup, those since the begin included (both emulators, measured: a session
        re-saved live between begin and lookup is read live, and kept), so what it deletes is
        decided by the lookup, as in a transaction begun just before; a write after the lookup
        waits for the commit or aborts it, as ever (rule 1). Begun in advance, it takes a round
        trip off every commit's chain (begin, lookup, commit). One left idle for longer than
        ``SPARE_MAX_AGE_S`` (a throttle wait) is left to expire, unused.
        """
        spare: tuple[bytes, float] | None = getattr(self._local, "spare", None)
        self._local.spare = None
        if spare is None or self._clock() - spare[1] > SPARE_MAX_AGE_S:
            return None
        return spare[0]

    def _begin_spare(self) -> tuple[bytes, float] | None:
        """A transaction for the next commit; None if it could not be begun (the next commit
        begins its own, under the retry policy)."""
        try:
            return rpc.begin(self._client, self._retrier.timeout), self._clock()
        except Exception:
            return None

    def _lookup(self, keys: list[Key], transaction: bytes | None) -> dict[tuple[Any, ...], object]:
        """The rule's property of each key that has an entity (``rpc.lookup``)."""
        if not keys:
            return {}
        found = rpc.lookup(self._client, transaction, keys, self._rule.prop, self._retrier.timeout)
        self.ledger.add(entities_read=len(keys))
        return found

    # -- descendants ------------------------------------------------------------------------

    def _with_descendants(self, sessions: Sequence[Key]) -> tuple[list[tuple[Key, list[Key]]], int]:
        """Each session with the keys to delete for it (descendants first, the session last),
        and how many entities were found under the sessions that are not sessions of the batch.

        A session under another of the same batch goes with its ancestor's group (rule 2).
        Descendants of the swept kind are checked by each commit's lookup; a blind run and a
        dry run look them up here (a blind run too: a live child is no race to opt out of).
        """
        if not self._descend:
            return [(s, [s]) for s in sessions], 0
        paths = {s.flat_path for s in sessions}
        roots = [s for s in sessions if not _has_ancestor_in(s, paths)]
        under = self._find_descendants(roots)
        groups = [(s, [*_unique(under[s]), s]) for s in roots]
        found = sum(len(g) - 1 for _s, g in groups) - (len(sessions) - len(roots))
        same_kind = [k for _s, ks in groups for k in ks[:-1] if k.kind == self._rule.kind]
        if not same_kind or (self.mode is Mode.LOOKUP and not self._dry_run):
            return groups, found
        found_now = self._lookup(same_kind, None)
        blocked = {k.flat_path for k in same_kind if not self._rule.expired(found_now, k)}
        return [
            (s, [k for k in ks if not _under_blocked(k, s, blocked)]) for s, ks in groups
        ], found

    def _find_descendants(self, sessions: Sequence[Key]) -> dict[Key, list[Key]]:
        """One ancestor query per session, ``DESCENDANT_QUERIES`` at a time; all or nothing."""
        found: dict[Key, list[Key]] = {}

        def look_under(key: Key) -> None:
            found[key] = self._target.descendants(key)

        Pipeline(DESCENDANT_QUERIES, look_under, lambda: False).run([sessions])
        return {key: found[key] for key in sessions}

    # -- shared mechanics -------------------------------------------------------------------

    def _send(self, keys: int, commit: Callable[[], object]) -> None:
        self._sizer.measure(keys, commit)
        self._throttle.record(accepted=True)

    @contextlib.contextmanager
    def _in_flight(self, keys: int) -> Iterator[None]:
        """Keys a transaction (or a blind commit) is working on: if the run must stop before
        it answers, they may or may not be gone (``unconfirmed``)."""
        with self.ledger.lock:
            self.ledger.in_flight += keys
        try:
            yield
        finally:
            with self.ledger.lock:
                self.ledger.in_flight -= keys

    def _wait(self, keys: int) -> None:
        waited = self._throttle.acquire(keys)
        with self.ledger.lock:
            self.ledger.result.throttle_wait_s += waited

    def _shrink_for_too_big(self, keys: int) -> int:
        smaller = max(1, keys // 2)
        self._sizer.refused(smaller)
        self._log.info(
            "commit_split", keys=keys, now=smaller, reason="transaction or write too big"
        )
        return smaller

    def _shrink_groups(self) -> None:
        with self._lock:  # several workers may be refused at once: shrink and say so once
            if self._groups_per_txn == LEGACY_LIMIT:
                return
            self._groups_per_txn = LEGACY_LIMIT
        self._log.info(
            "transaction_size_reduced",
            keys=LEGACY_LIMIT,
            reason="too many entity groups in one transaction",
        )

    def _refuse(self, keys: Sequence[Key]) -> None:
        with self.ledger.lock:
            self.ledger.refused.extend(keys)
            self.ledger.result.failed += len(keys)
        for key in keys:
            self._log.error(
                "delete_refused",
                key=str(key.flat_path),
                reason="transaction or write too big, even alone: left in place",
            )

    def _failed(self, exc: BaseException) -> DatastoreError:
        return DatastoreError(f"deleting a batch failed after retries: {describe_exception(exc)}")


def refused_error(refused: Sequence[Key]) -> str | None:
    """The run's error when the database would not delete some keys even one at a time."""
    if not refused:
        return None
    return (
        f"Datastore refused to delete {len(refused)} entities even one per commit "
        f"(transaction or write too big), first {refused[0].flat_path}; they were left, "
        "everything else due was deleted"
    )


def _too_big(exc: BaseException) -> bool:
    return "too big" in str(exc).lower()


def _unique(keys: Iterable[Key]) -> list[Key]:
    """Rule 4: a key once, in its first place (Datastore refuses a commit naming one twice)."""
    seen: dict[tuple[Any, ...], Key] = {}
    for key in keys:
        seen.setdefault(key.flat_path, key)
    return list(seen.values())


def _has_ancestor_in(key: Key, paths: set[tuple[Any, ...]]) -> bool:
    path = key.flat_path
    return any(path[:n] in paths for n in range(2, len(path), 2))


def _under_blocked(key: Key, session: Key, blocked: set[tuple[Any, ...]]) -> bool:
    """Whether ``key`` is, or lies under, a blocked (live) entity below ``session``."""
    path, top = key.flat_path, len(session.flat_path)
    return any(path[:n] in blocked for n in range(top + 2, len(path) + 1, 2))


def _to_check(parts: list[tuple[Key, list[Key]]], kind: str) -> list[Key]:
    """The keys a commit must look up: its sessions and every key of the swept kind."""
    return _unique([s for s, _ks in parts] + [k for _s, ks in parts for k in ks if k.kind == kind])


def _counted(parts: list[tuple[Key, list[Key]]]) -> _Commit:
    sessions = sum(1 for s, ks in parts if ks and ks[-1] is s)
    return _Commit(parts, sessions, sum(len(ks) for _s, ks in parts) - sessions)


def _forget(gone: dict[tuple[Any, ...], bool], parts: list[tuple[Key, list[Key]]]) -> None:
    """The keys of ``parts`` are settled: counted by the commit that just succeeded."""
    for key in _keys(parts):
        gone.pop(key.flat_path, None)


def _keys(parts: list[tuple[Key, list[Key]]]) -> list[Key]:
    return [k for _s, ks in parts for k in ks]


def _merge(commit: _Commit, already: _Commit) -> _Commit:
    return _Commit(
        commit.parts,
        commit.sessions + already.sessions,
        commit.descendants + already.descendants,
        commit.kept,
    )
