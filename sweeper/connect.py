"""Build the Datastore client, turning setup failures into one-line errors."""

from __future__ import annotations

from google.auth import exceptions as auth_exc
from google.cloud import datastore

from sweeper.errors import DatastoreError
from sweeper.settings import SweepSettings


def make_client(
    project: str | None, database: str | None, namespace: str | None
) -> datastore.Client:
    """A client for one project/database/namespace.

    ``DATASTORE_EMULATOR_HOST`` (read by the client itself) points it at an emulator with
    anonymous credentials; otherwise it uses Application Default Credentials (Workload Identity
    on GKE).
    """
    try:
        return datastore.Client(project=project, database=database, namespace=namespace)
    except auth_exc.DefaultCredentialsError:
        raise DatastoreError(
            "no Google Cloud credentials found: run under Workload Identity or a service "
            "account, use 'gcloud auth application-default login', or set "
            "DATASTORE_EMULATOR_HOST for an emulator"
        ) from None
    except OSError as exc:
        if "project" in str(exc).lower():
            raise DatastoreError(
                "no project: pass --project or set SWEEPER_PROJECT / DATASTORE_PROJECT_ID"
            ) from None
        raise DatastoreError(f"cannot create a Datastore client: {exc}") from None


def client_for(settings: SweepSettings) -> datastore.Client:
    """The client of one target: its project, database and namespace."""
    return make_client(settings.project, settings.database, settings.namespace)
