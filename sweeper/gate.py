"""The one way to a delete. Every path (range, shards, scan, text, --with-descendants) ends here.

**sweeper deletes a version, not a key.** Every delete carries the version at which a read
(the page query, the scan, the ancestor query, a lookup) saw the entity due to go, and every
commit is all or nothing: if anything wrote one of its entities since (a refresh, a
re-creation under the old key, a delete), Datastore refuses the whole commit, and its groups
are read again and decided again. The rules, each enforced below where it is named:

1. **Due at the version deleted** (:meth:`Gate.delete`). A query result is deleted only if
   its own value, read with its version, is expired by the rule (the type-tight comparison
   of ``encodings.is_expired``); the commit's ``base_version`` (``rpc.commit``) makes the
   delete of any later version fail. No lock is held and no transaction is open between the
   read and the commit, so writers never wait on a sweep.
2. **A group is decided whole** (:func:`decide`). With ``--with-descendants`` an entity under
   a session that is of the swept kind is a session itself: a live one keeps itself and
   everything under it, whichever commit its keys would have fallen in. A group that fits a
   commit goes in one; a group larger than a commit goes over several transactions, each of
   which looks up the group's sessions above its keys (the guards) and deletes only if
   they are still at the versions decided, so no descendant goes once its session lives.
3. **Counted in entities.** ``--max-deletes`` and the fraction guard's allowance
   (:class:`Allowance`) count every entity a commit deletes, children included, reserved
   before it is sent; a commit that may have been applied keeps its reservation.
4. **One key once per commit**, and a commit refused as too big (Datastore's "transaction or
   write too big", which a smaller commit passes) is split; a single key still refused is
   left, counted as failed and named, and the run goes on.
5. **Counted as confirmed.** ``deleted`` counts what the database confirmed. A commit whose
   answer was lost (DEADLINE_EXCEEDED, UNAVAILABLE, ...) is sent again at the same versions:
   if it had been applied, the database refuses the repeat, and a lookup settles it: where
   the database reports the deleting write's version for a missing key (the Firestore
   emulator), every key gone at one version that no other commit of this run wrote is the
   lost commit's own; where it reports the version of the snapshot read (as the API
   documents, and the legacy emulator does), the keys found gone are ``unattributed``: never
   in ``deleted``, always against ``--max-deletes`` (``_settle``).

``--no-verify`` is the opt-out: keys-only pages (no billed read per key) and plain commits
without versions; a session re-saved between the query and the delete is then lost. A live
session under an expired one is kept all the same (its value is read with the group).
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from google.api_core import exceptions as gexc
from google.cloud.datastore import Key

from sweeper import rpc
from sweeper.concurrency import Pipeline
from sweeper.deleter import BatchSizer
from sweeper.encodings import Encoding, is_expired
from sweeper.errors import DatastoreError, SweeperError, describe_exception, is_bug
from sweeper.retry import AMBIGUOUS
from sweeper.rpc import Seen
from sweeper.settings import MAX_BATCH_SIZE
from sweeper.stopping import Allowance, Capped, Stopped
from sweeper.target import Target
from sweeper.throttle import Throttle

if TYPE_CHECKING:  # the result names the guard's plan, which names the gate's rule
    from sweeper.result import SweepResult

# The legacy Datastore emulator (and Datastore before Firestore) lets one transaction touch at
# most 25 entity groups; Firestore in Datastore mode takes a whole 500-key batch.
LEGACY_LIMIT = 25

# With --with-descendants each session costs one ancestor query: made one after the other, a
# page of 500 sessions waits 500 round trips before its commit, so they go this many at once.
DESCENDANT_QUERIES = 8

# The name prefix of the key a lost commit's settling lookup asks for as never written (rule 5).
NEVER_WRITTEN = "__sweeper_never_written__"

# A commit refused because its entities changed is read and decided again this many times;
# groups still changing after that (a writer re-saving them without pause) are left alone.
MAX_REREADS = 5

Path = tuple[Any, ...]


@dataclass(frozen=True)
class Rule:
    """What may be deleted: an entity of ``kind`` whose ``prop`` is expired in ``encoding``."""

    kind: str
    prop: str
    encoding: Encoding
    cutoff: dt.datetime

    def due(self, seen: Seen) -> bool:
        return is_expired(self.encoding, seen.value, self.cutoff)


@dataclass
class Group:
    """A session and what goes with it: ``members`` deepest first, the session last."""

    root: Key
    members: list[Seen]
    counted: bool = False  # in ``matched``: once its first commit was reserved

    def guards(self, kind: str, chunk: Sequence[Seen]) -> list[Seen]:
        """The group's sessions (the root, and entities of the swept kind) above any key of
        ``chunk`` and not in it: what must still be as decided for ``chunk`` to go."""
        inside = {s.key.flat_path for s in chunk}
        above = {p[:n] for s in chunk for p in [s.key.flat_path] for n in range(2, len(p), 2)}
        return [
            m
            for m in self.members
            if m.key.flat_path not in inside
            and m.key.flat_path in above
            and (m.key.kind == kind or m.key == self.root)
        ]


def decide(
    rule: Rule, root: Key, seen: Iterable[Seen], *, trust_root: bool = False
) -> Group | None:
    """Rule 2: what of ``root``'s group (``seen``: the root and everything under it, as one
    read saw them) may go; None when the root is gone or not due.

    Every entity of the swept kind must be due; one that is not keeps itself and everything
    under it. The rest (events, pages) go with the nearest session above them. A blind run
    (``trust_root``) takes the range query's word for the root, and checks the rest.
    """
    members = {s.key.flat_path: s for s in seen}
    top = members.get(root.flat_path)
    if top is None or not (trust_root or rule.due(top)):
        return None
    live = {
        p
        for p, s in members.items()
        if s.key.kind == rule.kind and p != root.flat_path and not rule.due(s)
    }
    depth = len(root.flat_path)
    kept = [
        s
        for p, s in members.items()
        if not any(p[:n] in live for n in range(depth + 2, len(p) + 1, 2))
    ]
    kept.sort(key=lambda s: -len(s.key.flat_path))  # deepest first: the root goes last
    return Group(root, kept)


@dataclass
class _Ledger:
    """What the gate keeps beside the run's counts, under the same lock (the result's)."""

    result: SweepResult
    in_flight: int = 0
    refused: list[Key] = field(default_factory=list)
    versions: set[int] = field(default_factory=set)  # what this run's commits wrote

    @property
    def lock(self) -> threading.RLock:
        return self.result.lock

    def add(self, **counts: int) -> None:
        self.result.add(**counts)

    def went(self, groups: Sequence[Group], chunk: Sequence[Seen] | None = None) -> None:
        """``chunk`` (default: every member of ``groups``) is confirmed gone."""
        roots = {g.root.flat_path for g in groups}
        keys = chunk if chunk is not None else [m for g in groups for m in g.members]
        sessions = sum(1 for s in keys if s.key.flat_path in roots)
        self.add(deleted=sessions, descendants_deleted=len(keys) - sessions)


class _Changed(Exception):
    """A commit was refused because one of its entities (or a guard) changed since it was
    read; ``gone`` are its keys a lookup found missing afterwards, already accounted for."""

    def __init__(self, gone: frozenset[Path] = frozenset()) -> None:
        super().__init__("changed since read")
        self.gone = gone


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
        should_stop: Callable[[], bool],
        on_batch: Callable[[], None] = lambda: None,
    ) -> None:
        self._target, self._rule = target, rule
        self._client, self._retrier = target.client, target.retrier
        self.verify = verify
        self._dry_run, self._descend = dry_run, with_descendants
        self._sizer, self.allowance, self._throttle = sizer, allowance, throttle
        self.ledger = _Ledger(result)
        self._should_stop = should_stop
        self._on_batch = on_batch  # progress, after every commit
        # Entity groups per all-or-nothing commit: 25 where the database is known to take no
        # more (``LEGACY_LIMIT``); a refusal cuts it to that anyway (``_shrink_groups``).
        self._groups_per_commit = transaction_groups if verify else MAX_BATCH_SIZE
        self._lock = threading.Lock()
        self._log = structlog.get_logger("sweeper.gate").bind(kind=rule.kind)
        if not verify and not dry_run:
            self._log.warning(
                "verify_off",
                hint="--no-verify: a session refreshed or re-created under its key between "
                "the query and the delete is lost",
            )

    # -- entry point ------------------------------------------------------------------------

    def delete(self, page: Sequence[Seen]) -> None:
        """A page of candidates, each with the version and value its query saw."""
        page = _unique(page)
        due = [s for s in page if self._rule.due(s)] if self.verify else page
        if len(due) < len(page):  # the query's own read shows them live (or of no encoding)
            self.ledger.add(skipped=len(page) - len(due))
        left = self.allowance.left()
        if left is not None and len(due) > left:  # a session is at least one entity
            due = due[:left]
            self.allowance.capped = True
        if not due:
            if left == 0:
                raise Capped
            return
        groups = self._groups(due)
        if self._dry_run:
            self._count_dry(groups)
            return
        queue = deque(groups)
        limit = [MAX_BATCH_SIZE]  # keys per commit since one of this page's was too big
        while queue and not self._should_stop():
            size = min(limit[0], self._sizer.size)
            self._commit(_take(queue, size, self._groups_per_commit), limit)
            self.ledger.add(batches=1)
            self._on_batch()

    def _count_dry(self, groups: list[Group]) -> None:
        """The commits a real run would make of this page: never more than the cap allows."""
        granted = self.allowance.reserve([len(g.members) for g in groups])
        taken = groups[:granted]
        entities = sum(len(g.members) for g in taken)
        self.ledger.add(
            batches=-(-entities // self._sizer.size),
            matched=len(taken),
            descendants_matched=entities - len(taken),
        )
        if granted < len(groups):
            raise Capped

    # -- groups -----------------------------------------------------------------------------

    def _groups(self, due: list[Seen]) -> list[Group]:
        """Each due session with what goes with it (rule 2); counted as matched."""
        if not self._descend:
            groups = [Group(s.key, [s]) for s in due]
        else:
            paths = {s.key.flat_path for s in due}
            roots = [s for s in due if not _has_ancestor_in(s.key, paths)]
            groups = self._read_groups([s.key for s in roots])
            self.ledger.add(skipped=len(roots) - len(groups))
        return groups

    def _matched(self, groups: Sequence[Group]) -> None:
        """Groups a commit was reserved for count as matched, once: what a capped run found
        but left for the next is not."""
        new = [g for g in groups if not g.counted]
        for g in new:
            g.counted = True
        entities = sum(len(g.members) for g in new)
        self.ledger.add(matched=len(new), descendants_matched=entities - len(new))

    def _read_groups(self, roots: Sequence[Key]) -> list[Group]:
        """Each root's group, read whole (one ancestor query each, ``DESCENDANT_QUERIES`` at
        a time) and decided (rule 2)."""
        found: dict[Key, list[Seen]] = {}

        def read(key: Key) -> None:
            found[key] = self._target.group(key)

        Pipeline(DESCENDANT_QUERIES, read, lambda: False).run([roots])
        groups = []
        for root in roots:
            group = decide(self._rule, root, found[root], trust_root=not self.verify)
            if group is not None:
                groups.append(group)
        return groups

    def _reread(self, groups: Sequence[Group], gone: frozenset[Path]) -> list[Group]:
        """The groups of a refused commit, read and decided again; sessions no longer due (or
        gone) are kept and counted as skipped."""
        roots = [g.root for g in groups if g.root.flat_path not in gone]
        if self._descend:
            fresh = self._read_groups(roots)
        else:
            looked = self._lookup(roots)
            fresh = [
                Group(r, [looked.found[r.flat_path]])
                for r in roots
                if r.flat_path in looked.found and self._rule.due(looked.found[r.flat_path])
            ]
        self.ledger.add(skipped=len(roots) - len(fresh))
        for g in fresh:
            g.counted = True
        return fresh

    # -- commits ----------------------------------------------------------------------------

    def _commit(self, groups: list[Group], limit: list[int]) -> None:
        """Delete ``groups`` (from ``_take``), reading them again while they change; a commit
        refused as too big lowers ``limit`` for the rest of the page."""
        rereads = 0
        while groups:
            size = min(limit[0], self._sizer.size)
            if len(groups) == 1 and len(groups[0].members) > size:
                self._chain(groups[0], limit)
                return
            if len(groups) > 1 and sum(len(g.members) for g in groups) > size:
                self._repack(groups, len(groups), limit)  # the sizer shrank since they were taken
                return
            granted = self.allowance.reserve([len(g.members) for g in groups])
            if granted == 0:
                raise Capped
            capped, groups = granted < len(groups), groups[:granted]
            self._matched(groups)
            try:
                self._send(groups, [m for g in groups for m in g.members])
            except _Changed as changed:
                rereads += 1
                if rereads > MAX_REREADS:
                    self._contended(groups)
                    return
                groups = self._reread(groups, changed.gone)
                continue
            except _Resize:
                continue
            except _Split as split:
                limit[0] = min(limit[0], split.keys)
                if len(groups) > 1:
                    self._repack(groups, split.groups, limit)
                elif len(groups[0].members) <= 1:
                    self._refuse([groups[0].members[0].key])
                else:
                    continue  # the sizer is smaller now: the group goes as a chain
                return
            self.ledger.went(groups)
            if capped:
                raise Capped
            return

    def _repack(self, groups: list[Group], per_commit: int, limit: list[int]) -> None:
        """``groups`` again, in commits of the size allowed now."""
        queue = deque(groups)
        while queue:
            self._commit(_take(queue, min(limit[0], self._sizer.size), per_commit), limit)

    def _chain(self, group: Group, limit: list[int]) -> None:
        """Rule 2: a group larger than a commit, a commit at a time, each in a transaction
        that first looks up the sessions above its keys; the root goes last."""
        rereads = 0
        while group.members:
            chunk = group.members[: min(limit[0], self._sizer.size)]
            left = self.allowance.left()
            if left is not None and left < len(chunk):  # descendants first: the root waits
                chunk = chunk[:left]
            if not chunk or self.allowance.reserve([len(chunk)]) == 0:
                self.allowance.capped = True
                raise Capped
            self._matched([group])
            try:
                guards = group.guards(self._rule.kind, chunk) if self.verify else []
                self._send([group], chunk, guards)
            except _Changed as changed:
                rereads += 1
                if rereads > MAX_REREADS:
                    self._contended([group])
                    return
                fresh = self._reread([group], changed.gone)
                if not fresh:
                    return
                group = fresh[0]
                continue
            except _Resize:
                continue
            except _Split as split:
                if len(chunk) <= 1:
                    self._refuse([chunk[0].key])
                    group.members = group.members[1:]
                limit[0] = min(limit[0], split.keys)  # the rest goes in chunks no larger
                continue
            self.ledger.went([group], chunk)
            group.members = group.members[len(chunk) :]

    def _send(self, groups: list[Group], chunk: list[Seen], guards: Sequence[Seen] = ()) -> None:
        """One all-or-nothing commit of ``chunk`` (reserved by the caller), throttled, retried.

        Raises :class:`_Changed` when it was refused because something changed (its
        reservation given back, except for keys that may have gone), :class:`_Split` when it
        was refused as too big or as touching too many entity groups, ``Capped`` when the
        allowance has no room for it.
        """
        n = len(chunk)  # reserved by the caller
        self._wait(n)
        maybe_applied = [False]
        try:
            with self._in_flight(n):
                version = self._retrier.call(
                    "delete" if not self.verify else "verify",
                    lambda: self._attempt(chunk, guards, maybe_applied),
                )
        except (_Changed, _Resize) as exc:
            if not self.verify:  # blind deletes are sent again as they are: nothing to settle
                self.allowance.release(n)
                raise
            settled = self._settle(chunk, maybe_applied[0])
            if settled is not None:
                self.allowance.release(n - len(settled))
                if isinstance(exc, _Resize) and not settled:
                    raise  # not applied: sent again smaller
                raise _Changed(settled) from None
            version = None  # rule 5: the lost commit was applied; it counts as confirmed
        except gexc.InvalidArgument as exc:
            self.allowance.release(n)
            self._throttle.refund(n)
            raise self._refused(exc, groups, n) from exc
        except (Stopped, Capped, SweeperError):
            raise
        except Exception as exc:
            if maybe_applied[0]:
                self.ledger.add(unconfirmed=n)
            else:
                self.allowance.release(n)
            self.ledger.add(failed=len(groups))
            if is_bug(exc):  # not the database's failure: the engine logs its traceback
                raise
            raise DatastoreError(
                f"deleting a batch failed after retries: {describe_exception(exc)}"
            ) from exc
        if version is not None:
            with self.ledger.lock:
                self.ledger.versions.add(version)
        self._throttle.record(accepted=True)
        self._log.debug("batch_deleted", keys=n, sessions=len(groups))

    def _attempt(self, chunk: list[Seen], guards: Sequence[Seen], maybe: list[bool]) -> int | None:
        """One try: a single-use transaction, or (guards) one that looks them up first."""
        timeout = self._retrier.timeout
        deletes = [(s.key, s.version if self.verify else None) for s in chunk]
        txn = rpc.begin(self._client, timeout) if guards else None
        try:
            if txn is not None:
                looked = rpc.lookup(
                    self._client, txn, [g.key for g in guards], self._rule.prop, timeout
                )
                self.ledger.add(entities_read=len(guards))
                if any(looked.found.get(g.key.flat_path) != g for g in guards):
                    raise _Changed
            return self._sizer.measure(
                len(deletes),
                lambda: rpc.commit(self._client, txn, deletes, timeout, atomic=self.verify),
            )
        except gexc.FailedPrecondition:
            txn = None  # a refused commit ends its transaction
            raise _Changed from None
        except AMBIGUOUS as exc:
            maybe[0] = True
            if isinstance(exc, gexc.DeadlineExceeded) and self._sizer.size < len(deletes):
                # Timed out, and the sizer now wants smaller commits: settled, then sent smaller
                # (the same commit again would time out again).
                raise _Resize from exc
            raise
        finally:
            if txn is not None:
                rpc.end_transaction(self._client, txn, timeout)

    def _settle(self, chunk: list[Seen], maybe_applied: bool) -> frozenset[Path] | None:
        """Rule 5, after a refusal: None when an earlier attempt whose answer was lost is
        shown to have deleted all of ``chunk``; else the keys of ``chunk`` that may have gone
        with it (counted as ``unattributed``), for the re-read to leave out.

        The lookup also asks for a key that was never written. Where a missing key's version
        is the version of the snapshot read (the API's documented behaviour, and the legacy
        emulator's), that key has the same version as the gone ones and nothing is shown;
        where it is the version of the write that deleted the key (the Firestore emulator),
        the never-written key's differs, and keys all gone at one version no other commit of
        this run wrote were deleted by this one.
        """
        if not maybe_applied:
            return frozenset()
        first = chunk[0].key  # the never-written key in the same partition
        never = Key(
            self._rule.kind,
            f"{NEVER_WRITTEN}{uuid.uuid4().hex}",
            project=first.project,
            namespace=first.namespace,
            database=first.database,
        )
        looked = self._lookup([*(s.key for s in chunk), never])
        gone = frozenset(s.key.flat_path for s in chunk if s.key.flat_path not in looked.found)
        versions = {looked.missing.get(p) for p in gone}
        with self.ledger.lock:
            ours = (
                len(gone) == len(chunk)
                and len(versions) == 1
                and looked.missing.get(never.flat_path) not in versions
                and not versions & self.ledger.versions
            )
            if ours:
                self.ledger.versions.update(v for v in versions if v is not None)
        if ours:
            return None
        self.ledger.add(unattributed=len(gone))
        return gone

    def _lookup(self, keys: Sequence[Key]) -> rpc.Looked:
        looked: rpc.Looked = self._retrier.call(
            "lookup",
            lambda: rpc.lookup(self._client, None, keys, self._rule.prop, self._retrier.timeout),
        )
        self.ledger.add(entities_read=len(keys))
        return looked

    # -- refusals ---------------------------------------------------------------------------

    def _refused(self, exc: gexc.InvalidArgument, groups: list[Group], keys: int) -> Exception:
        if "entity groups" in str(exc) and len(groups) > LEGACY_LIMIT:
            self._shrink_groups()
            return _Split(keys, LEGACY_LIMIT)
        if _too_big(exc):
            if keys > 1:
                smaller = max(1, keys // 2)
                self._sizer.refused(smaller)
                self._log.info(
                    "commit_split", keys=keys, now=smaller, reason="transaction or write too big"
                )
                return _Split(smaller, max(1, len(groups) // 2))
            return _Split(1, 1)
        self.ledger.add(failed=len(groups))
        return DatastoreError(f"deleting a batch failed after retries: {describe_exception(exc)}")

    def _contended(self, groups: Sequence[Group]) -> None:
        self.ledger.add(skipped=len(groups))
        self._log.warning(
            "delete_contended",
            sessions=len(groups),
            hint="their entities kept changing while read again: left for the next run",
        )

    def _in_flight(self, keys: int) -> _InFlight:
        return _InFlight(self.ledger, keys)

    def _wait(self, keys: int) -> None:
        self.ledger.result.add(throttle_wait_s=self._throttle.acquire(keys))

    def _shrink_groups(self) -> None:
        with self._lock:  # several workers may be refused at once: shrink and say so once
            if self._groups_per_commit == LEGACY_LIMIT:
                return
            self._groups_per_commit = LEGACY_LIMIT
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


class _Resize(Exception):
    """A commit timed out and the sizer wants smaller ones: it was not applied (a lookup
    showed its keys at the versions sent), so its groups go again in smaller commits."""


class _Split(Exception):
    """A commit refused as too big, or as touching too many entity groups: send what it
    held at most ``keys`` keys and ``groups`` groups a commit."""

    def __init__(self, keys: int, groups: int) -> None:
        super().__init__("split")
        self.keys, self.groups = keys, groups


class _InFlight:
    """Keys a commit is working on: if the run must stop before it answers, they may or may
    not be gone (the summary's ``unconfirmed``)."""

    def __init__(self, ledger: _Ledger, keys: int) -> None:
        self._ledger, self._keys = ledger, keys

    def __enter__(self) -> None:
        with self._ledger.lock:
            self._ledger.in_flight += self._keys

    def __exit__(self, *_exc: object) -> None:
        with self._ledger.lock:
            self._ledger.in_flight -= self._keys


def refused_error(refused: Sequence[Key]) -> str | None:
    """The run's error when the database would not delete some keys even one at a time."""
    if not refused:
        return None
    return (
        f"Datastore refused to delete {len(refused)} entities even one per commit "
        f"(transaction or write too big), first {refused[0].flat_path}; they were left, "
        "everything else due was deleted"
    )


def _take(queue: deque[Group], size: int, max_groups: int) -> list[Group]:
    """The next commit's groups: whole groups while they fit in ``size`` keys (at most
    ``max_groups``); a group larger than a commit alone (it goes as a chain)."""
    taken: list[Group] = []
    room = size
    while queue and len(taken) < max_groups:
        members = len(queue[0].members)
        if members > room and taken:
            break
        taken.append(queue.popleft())
        room -= members
        if room <= 0:
            break
    return taken


def _too_big(exc: BaseException) -> bool:
    return "too big" in str(exc).lower()


def _unique(seen: Iterable[Seen]) -> list[Seen]:
    """Rule 4: a key once, in its first place (Datastore refuses a commit naming one twice)."""
    first: dict[Path, Seen] = {}
    for s in seen:
        first.setdefault(s.key.flat_path, s)
    return list(first.values())


def _has_ancestor_in(key: Key, paths: set[Path]) -> bool:
    path = key.flat_path
    return any(path[:n] in paths for n in range(2, len(path), 2))
