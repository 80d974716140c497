"""Models by MLflow URI: the model source that lets PSUNetPipeline.from_pretrained take MLflow URIs.

    PSUNetPipeline.from_pretrained("runs:/<run id>/model")          # the model artifact of a training run
    PSUNetPipeline.from_pretrained("models:/psunet/3")              # a version in the MLflow Model Registry (or
                                                                    # models:/psunet/latest, models:/psunet@<alias>)
    PSUNetPipeline.from_pretrained("mlflow-artifacts:/.../model")   # any URI MLflow can download

Installed as the entry point `mlflow` of group psunet.model_sources (pyproject.toml), so psunet itself
imports no MLflow. URIs are downloaded (tracking URI: the argument, else MLFLOW_TRACKING_URI, else the
local store in runs/ that training uses by default) into a temporary folder; the model artifact bundles
its word vectors and autoencoder, so nothing else is needed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from jobs import tracking
from jobs.tracking import tracking_uri as default_tracking_uri
from psunet.pipeline import PSUNetPipeline

MODEL_HELP = "checkpoint or model folder, or an MLflow URI: runs:/<run id>/model or models:/<name>/<version>"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_model_folder(reference: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding the model behind an MLflow URI: the artifact, downloaded."""
    import mlflow

    target = tempfile.mkdtemp(prefix="psunet-model-")
    uri = default_tracking_uri(tracking_uri)
    try:
        source = registered_source(reference, uri) if reference.startswith("models:/") else reference
        path = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=target, tracking_uri=uri)
    except Exception as exc:  # MLflow raises several unrelated types for a missing run or artifact
        raise FileNotFoundError(f"model: cannot download {reference!r} from MLflow: {exc}") from exc
    return Path(path)


def registered_source(reference: str, uri: str) -> str:
    """The artifact URI behind models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias> in the
    registry of tracking store `uri` (MLflow's own resolution reads only the process-wide registry URI)."""
    client = tracking.client(uri)
    name, at, alias = reference.removeprefix("models:/").partition("@")
    if at:
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = name.partition("/")
        if version == "latest":
            version = str(max(int(found.version) for found in client.search_model_versions(f"name = '{name}'")))
    return client.get_model_version_download_uri(name, version)


def load_pipeline(reference: str, weights: str = "ema", device: str | None = None,
                  tracking_uri: str | None = None, precision: str = "fp32") -> PSUNetPipeline:
    """PSUNetPipeline.from_pretrained on this machine's default device, with the jobs' tracking store."""
    return PSUNetPipeline.from_pretrained(reference, weights=weights, device=device or default_device(),
                                          precision=precision, tracking_uri=tracking_uri)
