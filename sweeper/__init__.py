"""sweeper: delete expired sessions from Google Cloud Datastore, and nothing else."""

__version__ = "0.1.0"
