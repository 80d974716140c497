"""MLflow for the jobs, in one place: the default tracking store, experiments created on first use, runs found by
tag or created (nested under a parent), params and metrics logged in batches, models registered, and the outbox
that keeps training's metrics while the tracking server is away."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value: longer values are cut
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000  # MLflow's limits per log_batch call
# MLflow's HTTP client retries an unreachable server for minutes (7 retries, doubling back-off): where an Outbox
# keeps what could not be sent, a call fails at once instead and the outbox tries again later.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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
    send(client, run_id, items + [Metric(key, float(value), stamp, at) for key, value, at in points])


def send(client, run_id: str, metrics: list) -> None:
    """MLflow Metric objects, in batches of MLflow's limit."""
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + METRICS_PER_BATCH])


def register_model(client, name: str, run_id: str, artifact_path: str = "model") -> str:
    """A new version of the registered model `name` (created on first use) from the run's artifact folder; its URI,
    models:/<name>/<version>, loads wherever a model is accepted."""
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id)
    return f"models:/{name}/{version.version}"


def fail_fast() -> None:
    """This process's MLflow calls fail at once on an unreachable server (FAIL_FAST, unless set otherwise)."""
    for name, value in FAIL_FAST.items():
        os.environ.setdefault(name, value)


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What a tracking call raises when the server is down, restarting or refusing."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, OSError


def _filesystem(path: str):
    """(pyarrow filesystem, path on it) of a folder or a storage URI (s3://, gs://, ...)."""
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


class Outbox:
    """One writer's metrics for one MLflow run, kept while the tracking server is away. Each metric is stamped when
    logged and sent at once; what cannot be sent stays in memory and in a JSON-lines file of its own under `spool`
    (a folder or a storage URI: where the run's checkpoints go), and is sent with the first log after `retry_s`.
    Training never waits on the server: calls fail fast (FAIL_FAST). Sending a metric twice is harmless: MLflow
    keeps one copy of a metric with the same key, value, step and time."""

    def __init__(self, client, run_id: str, spool: str, writer: str, retry_s: float = 10.0,
                 say: Callable[[str], None] | None = None):
        fail_fast()
        self.client, self.run_id, self.retry_s = client, run_id, retry_s
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.fs, folder = _filesystem(spool)
        self.spool_folder, self.spool = spool, f"{folder}/{writer}-{uuid.uuid4().hex[:8]}.jsonl"
        self.pending: list = []
        self.down_since: float | None = None
        self.retry_at = 0.0

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        if time.monotonic() >= self.retry_at:
            self.flush()
        else:
            self._keep()

    def flush(self) -> bool:
        """Send everything kept; False (and all of it kept) when the server cannot be reached."""
        if not self.pending:
            return True
        try:
            send(self.client, self.run_id, self.pending)
        except unreachable_errors() as exc:
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.say(f"tracking: warning: MLflow at {self.client.tracking_uri} is unreachable "
                         f"({error_line(exc)}); training goes on, its metrics are kept in {self.spool_folder} and "
                         "sent when the server is back")
            self.retry_at = time.monotonic() + self.retry_s
            self._keep()
            return False
        if self.down_since is not None:
            self.say(f"tracking: MLflow is back after {time.monotonic() - self.down_since:.0f} s: sent the "
                     f"{len(self.pending)} metrics kept meanwhile")
            self.down_since = None
            self.fs.delete_file(self.spool)
        self.pending = []
        return True

    def close(self) -> int:
        """A last try to send: the count of metrics left unsent (they stay in the spool folder)."""
        self.flush()
        return len(self.pending)

    def _keep(self) -> None:
        lines = [json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step})
                 for m in self.pending]
        self.fs.create_dir(self.spool.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.spool) as out:
            out.write(("\n".join(lines) + "\n").encode())


def send_spooled(client, run_id: str, spool: str) -> int:
    """Send the metrics every Outbox of the run left in `spool`, deleting each file once sent; the count of
    metrics still unsent (the server unreachable: they stay where they are)."""
    import pyarrow.fs
    from mlflow.entities import Metric

    fail_fast()
    fs, folder = _filesystem(spool)
    unsent = 0
    for info in fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True)):
        if not info.path.endswith(".jsonl"):
            continue
        with fs.open_input_stream(info.path) as stream:
            metrics = [Metric(**json.loads(line)) for line in stream.read().decode().splitlines() if line]
        try:
            send(client, run_id, metrics)
        except unreachable_errors():
            unsent += len(metrics)
            continue
        fs.delete_file(info.path)
    return unsent


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
