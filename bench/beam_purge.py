# mypy: untyped-calls-exclude=apache_beam, disable-error-code="import-not-found"
"""The incumbent, for reference: the Apache Beam pipeline the Dataflow bulk-delete template runs.

Google's "Datastore Bulk Delete" template reads whole entities with a GQL query
(``SELECT * FROM eq-session WHERE expires_at < N``), takes their keys and deletes them in
batches. This is the same pipeline in Beam's Python SDK (``apache_beam.io.gcp.datastore.v1new``):
``ReadFromDatastore(query)``, a ``Map`` to the keys, ``DeleteFromDatastore(project)``, run with
the DirectRunner. The query matches only int epoch seconds (``10**9 <= expires_at < cutoff``),
as the eQ runner writes them.

Prints one JSON line: ``{"deleted": keys deleted (a Beam counter in the Map step), "elapsed":
seconds around pipeline.run().wait_until_finish(), "commits": commits made}``. (Not the
connector's ``cumulativeThrottlingSeconds``: it adds each ramp-up wait cut to whole seconds,
and a first wait is 0.5 to 1 s, so it reads near 0 however long the deletes were held back.)

Runs in its own venv, never the project's (Beam's gcp extra pins its own google-cloud-* and
protobuf versions), and imports nothing from ``sweeper``. Create it once, from the repo root::

    python3 -m venv .venv-beam && .venv-beam/bin/pip install -r bench/beam_requirements.txt

Against a local emulator, set ``DATASTORE_EMULATOR_HOST`` (google-cloud-datastore, which the
connector uses, then talks plain gRPC to it with anonymous credentials; Beam keeps its own
batch endpoint out of the way when the variable is set)::

    DATASTORE_EMULATOR_HOST=127.0.0.1:8081 .venv-beam/bin/python bench/beam_purge.py \\
        --project sweeper-test --kind eq-session --cutoff "$(date +%s)"

Ramp-up throttling: ``DeleteFromDatastore`` throttles every DoFn instance to
``500 / hint_num_workers`` keys a second for its first 5 minutes (then x1.5 every 5 minutes),
and the template passes its ``datastoreHintNumWorkers``, 500 by default: on Dataflow that is
500 keys/s shared by 500 workers. The DirectRunner here has one instance standing for the
whole job, so ``--hint-num-workers`` defaults to 1: the whole 500 keys/s budget. Pass 500 for
the template's literal per-worker figure (1 key a second), or ``--no-rampup`` for none.

Any other arguments go to Beam's ``PipelineOptions`` (e.g. ``--direct_num_workers=2``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence

from apache_beam.io.gcp.datastore.v1new.datastoreio import DeleteFromDatastore, ReadFromDatastore
from apache_beam.io.gcp.datastore.v1new.types import Entity, Key, Query
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import Pipeline
from apache_beam.runners.runner import PipelineResult
from apache_beam.transforms.core import Map

# The smallest int epoch seconds taken for an expiry (2001-09-09): the range starts there, so
# the query matches only int epoch seconds, not smaller ints in other units.
MIN_EPOCH_SECONDS = 10**9
NAMESPACE = "beam_purge"
DELETED = "deleted"


def to_key(entity: Entity) -> Key:
    """The template's step from entity to key, counting each one."""
    Metrics.counter(NAMESPACE, DELETED).inc()
    return entity.key


def expired_query(project: str, kind: str, cutoff: int, prop: str = "expires_at") -> Query:
    return Query(
        kind=kind,
        project=project,
        filters=[(prop, ">=", MIN_EPOCH_SECONDS), (prop, "<", cutoff)],
    )


def build(
    pipeline: Pipeline,
    project: str,
    kind: str,
    cutoff: int,
    *,
    throttle_rampup: bool = True,
    hint_num_workers: int = 1,
) -> None:
    # An inequality filter means no split: ReadFromDatastore runs the query as one, on one
    # worker, without the __Stat_*__ statistics it would otherwise read to size the splits.
    _ = (
        pipeline
        | "Read" >> ReadFromDatastore(expired_query(project, kind, cutoff))
        | "ToKey" >> Map(to_key)
        | "Delete"
        >> DeleteFromDatastore(
            project, throttle_rampup=throttle_rampup, hint_num_workers=hint_num_workers
        )
    )


def counter(result: PipelineResult, name: str, namespace: str | None = None) -> int:
    """A counter's total over every step, committed where the runner keeps it."""
    query = MetricsFilter().with_name(name)
    if namespace is not None:
        query = query.with_namespace(namespace)
    total = 0
    for metric in result.metrics().query(query)["counters"]:
        value = metric.committed if metric.committed is not None else metric.attempted
        total += int(value or 0)
    return total


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--kind", required=True)
    parser.add_argument("--cutoff", type=int, required=True, help="epoch seconds")
    parser.add_argument("--hint-num-workers", type=int, default=1)
    parser.add_argument("--no-rampup", action="store_true", help="no ramp-up throttling")
    args, beam_args = parser.parse_known_args(argv)
    # Beam's Query hands its filters to google-cloud-datastore as tuples, which warns on each.
    warnings.filterwarnings("ignore", message="Detected filter using positional arguments")

    options = PipelineOptions(["--runner=DirectRunner", *beam_args])
    pipeline = Pipeline(options=options)
    build(
        pipeline,
        args.project,
        args.kind,
        args.cutoff,
        throttle_rampup=not args.no_rampup,
        hint_num_workers=args.hint_num_workers,
    )
    started = time.perf_counter()
    result = pipeline.run()
    result.wait_until_finish()
    elapsed = time.perf_counter() - started
    report = {
        "deleted": counter(result, DELETED, NAMESPACE),
        "elapsed": round(elapsed, 3),
        "commits": counter(result, "datastoreRpcSuccesses"),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
