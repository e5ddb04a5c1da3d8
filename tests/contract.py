"""The ``sweep_finished`` fields operators alert on (docs/reference.md, the sweep_finished fields).

Stated here, apart from the code that emits them, so that dropping or renaming one fails a test.
"""

from __future__ import annotations

SWEEP_FINISHED_FIELDS = frozenset(
    {
        "project",
        "kind",
        "namespace",
        "database",
        "property",
        "format",
        "cutoff",
        "dry_run",
        "matched",
        "deleted",
        "failed",
        "retries",
        "batches",
        "duration_s",
        "stopped_reason",
    }
)
