"""How many entities a run may still delete: ``--max-deletes``, and the fraction guard's share.

Counted in entities, children included (the gate's rule 3): a commit reserves what it would
delete before it is sent, and gives back what did not go.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from sweeper.errors import RefusedError


class Capped(Exception):
    """--max-deletes is reached: what is left waits for the next run."""


class Allowance:
    """Entities a run may still delete: ``--max-deletes``, and the fraction guard's share.

    A commit reserves its entities before it is sent (rule 3) and gives back what did not go.
    Reaching ``--max-deletes`` ends the run quietly; passing the guard's share refuses it.
    """

    def __init__(self, cap: int | None, guard: int | None = None, guard_note: str = "") -> None:
        self._cap, self._guard, self._note = cap, guard, guard_note
        self._used = 0
        self._lock = threading.Lock()
        self.capped = False

    def left(self) -> int | None:
        """Entities left under --max-deletes (None: no cap); the guard's share is no cap."""
        with self._lock:
            return None if self._cap is None else max(0, self._cap - self._used)

    def reserve(self, sizes: Sequence[int]) -> int:
        """How many of the groups of ``sizes`` (in order) may go; reserves their entities."""
        with self._lock:
            taken, used = 0, self._used
            for size in sizes:
                if self._guard is not None and used + size > self._guard:
                    raise RefusedError(
                        f"refusing to go on: this run has deleted {self._used} entities, and "
                        f"the next commit would pass --max-fraction's share of {self._guard} "
                        f"entities{self._note}. Nothing more was deleted."
                    )
                if self._cap is not None and used + size > self._cap:
                    self.capped = True
                    break
                used += size
                taken += 1
            self._used = used
            return taken

    def release(self, entities: int) -> None:
        with self._lock:
            self._used -= entities
