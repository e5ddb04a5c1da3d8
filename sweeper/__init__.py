"""sweeper: delete expired sessions from Google Cloud Datastore, and nothing else."""

from __future__ import annotations

__version__ = "0.1.0"
