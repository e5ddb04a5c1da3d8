"""The one way to a delete: every path (range, shards, scan, text, --with-descendants) ends here.

sweeper deletes a version, not a key. The rules, numbered and explained in docs/design.md ("One
gate before every delete"); ``sweeper.deleter.Committer`` sends, sizes, retries and settles each
commit (rules 3 to 5):

1. Due at the version deleted (:meth:`Gate.delete`): each delete carries the version read, so a
   commit is refused whole if anything wrote the entity since; no lock is held before it.
2. A group is decided whole (:func:`decide`); one larger than a commit goes over transactions
   that first look up the sessions above their keys (``Group.guards``).
3. Counted in entities, children included, reserved before each commit (:class:`Allowance`).
4. One key once per commit; a commit too big is split, a single key still refused is left.
5. Counted as confirmed; a commit whose answer was lost is settled, never counted twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog
from google.cloud.datastore import Key

from sweeper.concurrency import Pool
from sweeper.deleter import BatchSizer, Changed, Committer, Path, Resize, Split
from sweeper.encodings import Rule
from sweeper.result import SweepResult
from sweeper.rpc import Seen
from sweeper.settings import MAX_BATCH_SIZE
from sweeper.target import Target
from sweeper.throttle import Allowance, Capped, Throttle

# With --with-descendants each session costs an ancestor query: one after the other, a page of
# 500 sessions waits 500 round trips before its commit, so they go this many at once per worker.
DESCENDANT_QUERIES = 8

# A commit refused because its entities changed is read and decided again this many times;
# groups still changing after that (a writer re-saving them without pause) are left alone.
MAX_REREADS = 5


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
    """Rule 2: what of ``root``'s group (``seen``, as one read saw it) may go; None when the
    root is gone or not due. An entity of the swept kind that is not due keeps itself and
    everything under it; the rest go with the nearest session above them. A blind run
    (``trust_root``) takes the range query's word for the root, and checks the rest.
    """
    members = {s.key.flat_path: s for s in seen}
    top = members.get(root.flat_path)
    if top is None or not (trust_root or rule.due(top.value)):
        return None
    live = {
        p
        for p, s in members.items()
        if s.key.kind == rule.kind and p != root.flat_path and not rule.due(s.value)
    }
    depth = len(root.flat_path)
    kept = [
        s
        for p, s in members.items()
        if not any(p[:n] in live for n in range(depth + 2, len(p) + 1, 2))
    ]
    kept.sort(key=lambda s: -len(s.key.flat_path))  # deepest first: the root goes last
    return Group(root, kept)


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
        readers: int = DESCENDANT_QUERIES,
    ) -> None:
        self._target, self._rule = target, rule
        self.verify = verify
        self._dry_run, self._descend = dry_run, with_descendants
        self._readers = Pool(readers, "ancestor-queries") if with_descendants else None
        self._sizer, self.allowance = sizer, allowance
        self.committer = Committer(
            target,
            verify=verify,
            transaction_groups=transaction_groups,
            sizer=sizer,
            throttle=throttle,
            allowance=allowance,
            result=result,
        )
        self._result = result
        self._should_stop = should_stop
        self._on_batch = on_batch  # progress, after every commit
        self._log = structlog.get_logger("sweeper.gate").bind(kind=rule.kind)
        if not verify and not dry_run:
            self._log.warning(
                "verify_off",
                hint="--no-verify: a session refreshed or re-created under its key between "
                "the query and the delete is lost",
            )

    def delete(self, page: Sequence[Seen]) -> None:
        """A page of candidates, each with the version and value its query saw."""
        page = _unique(page)
        due = [s for s in page if self._rule.due(s.value)] if self.verify else page
        if len(due) < len(page):  # the query's own read shows them live (or of no encoding)
            self._result.add(skipped=len(page) - len(due))
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
            self._commit(_take(queue, size, self.committer.groups_per_commit), limit)
            self._result.add(batches=1)
            self._on_batch()

    def _count_dry(self, groups: list[Group]) -> None:
        """The commits a real run would make of this page: never more than the cap allows."""
        granted = self.allowance.reserve([len(g.members) for g in groups])
        taken = groups[:granted]
        self._matched(taken)
        entities = sum(len(g.members) for g in taken)
        self._result.add(batches=-(-entities // self._sizer.size))
        if granted < len(groups):
            raise Capped

    def _groups(self, due: list[Seen]) -> list[Group]:
        """Each due session with what goes with it (rule 2)."""
        if not self._descend:
            return [Group(s.key, [s]) for s in due]
        paths = {s.key.flat_path for s in due}
        roots = [s.key for s in due if not _has_ancestor_in(s.key, paths)]
        groups = self._read_groups(roots)
        self._result.add(skipped=len(roots) - len(groups))
        return groups

    def _matched(self, groups: Sequence[Group]) -> None:
        """Groups a commit was reserved for count as matched, once: what a capped run found
        but left for the next is not."""
        new = [g for g in groups if not g.counted]
        for g in new:
            g.counted = True
        entities = sum(len(g.members) for g in new)
        self._result.add(matched=len(new), descendants_matched=entities - len(new))

    def _read_groups(self, roots: Sequence[Key]) -> list[Group]:
        """Each root's group, read whole (an ancestor query each, on the pool) and decided."""
        assert self._readers is not None  # read only with --with-descendants
        read = zip(roots, self._readers.map(self._target.group, roots), strict=True)
        return [g for r, s in read if (g := decide(self._rule, r, s, trust_root=not self.verify))]

    def _reread(self, groups: Sequence[Group], gone: frozenset[Path], rereads: int) -> list[Group]:
        """The groups of a refused commit, read and decided again; sessions no longer due (or
        gone) are kept and counted as skipped, and so are all once refused too often."""
        if rereads > MAX_REREADS:
            self._result.add(skipped=len(groups))
            self._log.warning(
                "delete_contended",
                sessions=len(groups),
                hint="their entities kept changing while read again: left for the next run",
            )
            return []
        roots = [g.root for g in groups if g.root.flat_path not in gone]
        if self._descend:
            fresh = self._read_groups(roots)
        else:
            looked = self.committer.lookup(roots)
            fresh = [
                Group(r, [looked.found[r.flat_path]])
                for r in roots
                if r.flat_path in looked.found and self._rule.due(looked.found[r.flat_path].value)
            ]
        self._result.add(skipped=len(roots) - len(fresh))
        for g in fresh:
            g.counted = True
        return fresh

    def _commit(self, groups: list[Group], limit: list[int]) -> None:
        """Delete ``groups`` (from ``_take``), reading them again while they change; a commit
        refused as too big lowers ``limit`` for the rest of the page."""
        rereads = 0
        while groups:
            if sum(len(g.members) for g in groups) > min(limit[0], self._sizer.size):
                if len(groups) == 1:
                    self._chain(groups[0], limit)
                else:  # the sizer shrank since they were taken
                    self._repack(groups, len(groups), limit)
                return
            granted = self.allowance.reserve([len(g.members) for g in groups])
            if granted == 0:
                raise Capped
            capped, groups = granted < len(groups), groups[:granted]
            self._matched(groups)
            try:
                self.committer.send([m for g in groups for m in g.members], (), len(groups))
            except Changed as changed:
                rereads += 1
                groups = self._reread(groups, changed.gone, rereads)
                continue
            except Resize:
                continue
            except Split as split:
                limit[0] = min(limit[0], split.keys)
                if len(groups) > 1:
                    self._repack(groups, split.groups, limit)
                elif len(groups[0].members) <= 1:
                    self.committer.refuse(groups[0].members[0].key)
                else:
                    continue  # the sizer is smaller now: the group goes as a chain
                return
            self._went(groups)
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
                self.committer.send(chunk, guards)
            except Changed as changed:
                rereads += 1
                fresh = self._reread([group], changed.gone, rereads)
                if not fresh:
                    return
                group = fresh[0]
                continue
            except Resize:
                continue
            except Split as split:
                if len(chunk) <= 1:
                    self.committer.refuse(chunk[0].key)
                    group.members = group.members[1:]
                limit[0] = min(limit[0], split.keys)  # the rest goes in chunks no larger
                continue
            self._went([group], chunk)
            group.members = group.members[len(chunk) :]

    def _went(self, groups: Sequence[Group], chunk: Sequence[Seen] | None = None) -> None:
        """``chunk`` (default: every member of ``groups``) is confirmed gone."""
        roots = {g.root.flat_path for g in groups}
        keys = chunk if chunk is not None else [m for g in groups for m in g.members]
        sessions = sum(1 for s in keys if s.key.flat_path in roots)
        self._result.add(deleted=sessions, descendants_deleted=len(keys) - sessions)


def _take(queue: deque[Group], room: int, max_groups: int) -> list[Group]:
    """The next commit's groups: whole groups while they fit in ``room`` keys (at most
    ``max_groups``); a group larger than a commit alone (it goes as a chain)."""
    taken: list[Group] = []
    while queue and len(taken) < max_groups:
        members = len(queue[0].members)
        if members > room and taken:
            break
        taken.append(queue.popleft())
        room -= members
        if room <= 0:
            break
    return taken


def _unique(seen: Iterable[Seen]) -> list[Seen]:
    """Rule 4: a key once, in its first place (Datastore refuses a commit naming one twice)."""
    first: dict[Path, Seen] = {}
    for s in seen:
        first.setdefault(s.key.flat_path, s)
    return list(first.values())


def _has_ancestor_in(key: Key, paths: set[Path]) -> bool:
    return any(key.flat_path[:n] in paths for n in range(2, len(key.flat_path), 2))
