"""Batched deletes: at most 500 keys per commit, each commit under the retry policy.

Datastore refuses more than 500 mutations per commit and ``delete_multi`` sends all its keys in
one commit (CONTEXT trap 3), so callers hand over batches already cut to size. A retried batch is
re-sent whole; that is safe because deleting a key that no longer exists is a silent no-op.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from google.cloud import datastore

from sweeper.retry import CALL_TIMEOUT_S, NO_CLIENT_RETRY, Retrier
from sweeper.settings import MAX_BATCH_SIZE

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class BatchDeleter:
    def __init__(self, client: datastore.Client, retrier: Retrier) -> None:
        self._client = client
        self._retrier = retrier

    def delete(self, keys: Sequence[datastore.Key]) -> None:
        """Delete one batch, retrying transient failures; raise once the policy gives up."""
        if len(keys) > MAX_BATCH_SIZE:
            raise ValueError(f"a commit takes at most {MAX_BATCH_SIZE} mutations")
        batch = list(keys)
        self._retrier.call(
            "delete",
            lambda: self._client.delete_multi(batch, retry=NO_CLIENT_RETRY, timeout=CALL_TIMEOUT_S),
        )
