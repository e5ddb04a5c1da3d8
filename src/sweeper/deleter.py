"""Batched deletes: at most 500 keys per commit, each commit under the retry policy.

Datastore refuses more than 500 mutations per commit and ``delete_multi`` sends all its keys in
one commit (CONTEXT trap 3), so callers hand over batches already cut to size. A retried batch is
re-sent whole; that is safe because deleting a key that no longer exists is a silent no-op.

:class:`VerifyingDeleter` closes the refresh race (CONTEXT trap 4): a session refreshed between
the query and the delete would be lost by a blind delete, so it looks each entity up inside a
transaction and deletes only those still expired. A concurrent write to one of them aborts the
commit, and the retry re-reads it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Protocol, TypeVar

import structlog
from google.api_core import exceptions as gexc
from google.cloud import datastore

from sweeper.encodings import Encoding, is_expired
from sweeper.retry import CALL_TIMEOUT_S, NO_CLIENT_RETRY, Retrier
from sweeper.settings import MAX_BATCH_SIZE

T = TypeVar("T")

# The legacy Datastore emulator (and Datastore before Firestore) lets one transaction touch at
# most 25 entity groups; Firestore in Datastore mode takes a whole 500-key batch (CONTEXT trap 5).
LEGACY_TRANSACTION_LIMIT = 25


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class BatchFailed(Exception):
    """A batch whose delete failed for good, after ``deleted`` of its keys were deleted."""

    def __init__(self, deleted: int, cause: Exception) -> None:
        super().__init__(str(cause))
        self.deleted = deleted
        self.cause = cause


class Deleter(Protocol):
    def delete(self, keys: Sequence[datastore.Key]) -> int:
        """Delete one batch; return how many keys were deleted."""
        ...


class BatchDeleter:
    """Blind deletes: one commit per batch, one billed delete per key, no reads."""

    def __init__(self, client: datastore.Client, retrier: Retrier) -> None:
        self._client = client
        self._retrier = retrier

    def delete(self, keys: Sequence[datastore.Key]) -> int:
        """Delete one batch, retrying transient failures; raise once the policy gives up."""
        if len(keys) > MAX_BATCH_SIZE:
            raise ValueError(f"a commit takes at most {MAX_BATCH_SIZE} mutations")
        batch = list(keys)
        try:
            self._retrier.call(
                "delete",
                lambda: self._client.delete_multi(
                    batch, retry=NO_CLIENT_RETRY, timeout=CALL_TIMEOUT_S
                ),
            )
        except Exception as exc:
            raise BatchFailed(0, exc) from exc
        return len(batch)


class VerifyingDeleter:
    """Re-checks each key in a transaction and deletes only entities still expired.

    Costs one entity read per key on top of the delete. Transactions start at the batch size
    and shrink to 25 keys, for the rest of the run, the first time the database refuses a
    transaction over too many entity groups.
    """

    def __init__(
        self,
        client: datastore.Client,
        retrier: Retrier,
        encoding: Encoding,
        prop: str,
        cutoff: dt.datetime,
    ) -> None:
        self._client = client
        self._retrier = retrier
        self._encoding = encoding
        self._prop = prop
        self._cutoff = cutoff
        self.transaction_size = MAX_BATCH_SIZE
        self._lock = threading.Lock()
        self._log = structlog.get_logger("sweeper.verify")

    def delete(self, keys: Sequence[datastore.Key]) -> int:
        deleted = 0
        for chunk in chunks(keys, self.transaction_size):
            try:
                deleted += self._delete_chunk(chunk)
            except BatchFailed as exc:
                raise BatchFailed(deleted + exc.deleted, exc.cause) from exc.cause
            except Exception as exc:
                raise BatchFailed(deleted, exc) from exc
        return deleted

    def _delete_chunk(self, keys: Sequence[datastore.Key]) -> int:
        try:
            return self._retrier.call("verify", partial(self._transaction, list(keys)))
        except gexc.InvalidArgument as exc:
            if "entity groups" not in str(exc) or len(keys) <= LEGACY_TRANSACTION_LIMIT:
                raise
            self._shrink()
            return self.delete(keys)

    def _shrink(self) -> None:
        with self._lock:  # several workers may be refused at once: shrink and say so once
            if self.transaction_size == LEGACY_TRANSACTION_LIMIT:
                return
            self.transaction_size = LEGACY_TRANSACTION_LIMIT
        self._log.info(
            "transaction_size_reduced",
            keys=LEGACY_TRANSACTION_LIMIT,
            reason="too many entity groups in one transaction",
        )

    def _transaction(self, keys: list[datastore.Key]) -> int:
        """Look up, keep what is still expired, delete it; all or nothing."""
        transaction = self._client.transaction()
        transaction.begin(retry=NO_CLIENT_RETRY, timeout=CALL_TIMEOUT_S)
        try:
            entities = self._client.get_multi(
                keys, transaction=transaction, retry=NO_CLIENT_RETRY, timeout=CALL_TIMEOUT_S
            )
            doomed = [
                entity.key
                for entity in entities
                if is_expired(self._encoding, entity.get(self._prop), self._cutoff)
            ]
            for key in doomed:
                transaction.delete(key)
            transaction.commit(retry=NO_CLIENT_RETRY, timeout=CALL_TIMEOUT_S)
        except BaseException:
            _rollback(transaction)
            raise
        return len(doomed)


def _rollback(transaction: datastore.Transaction) -> None:
    """Best effort: a failed transaction expires on its own; never mask the real error."""
    with contextlib.suppress(Exception):
        transaction.rollback(retry=NO_CLIENT_RETRY, timeout=CALL_TIMEOUT_S)
