"""MLflow plumbing shared by the jobs: the default tracking store and experiments created on first use."""

from __future__ import annotations

import os
from pathlib import Path


def tracking_uri(given: str | None, storage_path: str | Path = "runs") -> str:
    """The given URI, else $MLFLOW_TRACKING_URI, else the embedded default: a SQLite store in storage_path."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(storage_path).expanduser().resolve() / 'mlflow.db'}"


def experiment_id(client, name: str, storage_path: str | Path) -> str:
    """The experiment's id, creating it (artifacts beside a SQLite store, under storage_path) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if client.tracking_uri.startswith("sqlite:"):
        artifacts = (Path(storage_path).expanduser() / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)
