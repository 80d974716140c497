"""MLflow for the jobs, in one place: the default tracking store, experiments created on first use, runs found by
tag or created (nested under a parent), params and metrics logged in batches, models registered."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value: longer values are cut
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000  # MLflow's limits per log_batch call


def tracking_uri(given: str | None, storage_path: str | Path = "runs") -> str:
    """The given URI, else $MLFLOW_TRACKING_URI, else the embedded default: a SQLite store in storage_path."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(storage_path).expanduser().resolve() / 'mlflow.db'}"


def client(uri: str):
    """A client of the tracking store `uri` and of its model registry."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str, storage_path: str | Path) -> str:
    """The experiment's id, creating it (artifacts beside a SQLite store, under storage_path) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if client.tracking_uri.startswith("sqlite:"):
        artifacts = (Path(storage_path).expanduser() / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def create_run(client, experiment: str, storage_path: str | Path, run_name: str, params: dict | None = None,
               tags: dict[str, str] | None = None, parent: str | None = None) -> str:
    """A new run in the experiment (created if needed) with these params and tags, nested under `parent`."""
    tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
    run_id = client.create_run(experiment_id(client, experiment, storage_path), run_name=run_name,
                               tags=tags).info.run_id
    log_params(client, run_id, params or {})
    return run_id


def find_or_create_run(client, experiment: str, storage_path: str | Path, tag: str, value: str, run_name: str,
                       params: dict | None = None, tags: dict[str, str] | None = None,
                       parent: str | None = None) -> str:
    """The run whose `tag` is `value` (a job resubmitted or resumed finds its run again), else create_run with that
    tag added; params, tags and parent only go on a new run."""
    found = client.search_runs([experiment_id(client, experiment, storage_path)],
                               filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
    if found:
        return found[0].info.run_id
    return create_run(client, experiment, storage_path, run_name, params, {tag: value, **(tags or {})}, parent)


def log_params(client, run_id: str, params: dict) -> None:
    """Params as strings, each cut at MAX_PARAM_CHARS, in batches."""
    from mlflow.entities import Param

    items = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + PARAMS_PER_BATCH])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0,
                points: Iterable[tuple[str, float, int]] = ()) -> None:
    """`metrics` at `step` and any (key, value, step) `points`, stamped now, in batches."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    items = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
    items += [Metric(key, float(value), stamp, at) for key, value, at in points]
    for start in range(0, len(items), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[start:start + METRICS_PER_BATCH])


def register_model(client, name: str, run_id: str, artifact_path: str = "model") -> str:
    """A new version of the registered model `name` (created on first use) from the run's artifact folder; its URI,
    models:/<name>/<version>, loads wherever a model is accepted."""
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id)
    return f"models:/{name}/{version.version}"
