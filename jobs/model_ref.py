"""Find a trained model by reference: a checkpoint or model folder, or an MLflow artifact URI.

    load_pipeline("runs/demo-.../model")                    # folder written by jobs/train.py
    load_pipeline("runs:/<run id>/model")                   # the model artifact of a training run
    load_pipeline("mlflow-artifacts:/.../model")            # any URI MLflow can download

MLflow URIs are downloaded (tracking URI: the argument, else MLFLOW_TRACKING_URI, else the local
store in runs/ that training uses by default) into a temporary folder first; the model artifact
bundles its word vectors and autoencoder, so nothing else is needed.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from jobs.tracking import tracking_uri as default_tracking_uri
from psunet.pipeline import Pipeline

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_model_folder(reference: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding the model: the folder itself, or an MLflow artifact downloaded."""
    folder = Path(reference)
    if folder.is_dir():
        return folder
    if not _URI.match(reference):
        raise FileNotFoundError(f"model: {reference!r} is neither a folder nor an MLflow URI (runs:/<id>/model)")
    import mlflow

    target = tempfile.mkdtemp(prefix="psunet-model-")
    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=reference, dst_path=target,
            tracking_uri=default_tracking_uri(tracking_uri))
    except Exception as exc:  # MLflow raises several unrelated types for a missing run or artifact
        raise FileNotFoundError(f"model: cannot download {reference!r} from MLflow: {exc}") from exc
    return Path(path)


def load_pipeline(reference: str, weights: str = "ema", device: str | None = None,
                  tracking_uri: str | None = None, precision: str = "fp32") -> Pipeline:
    return Pipeline.from_checkpoint(local_model_folder(reference, tracking_uri), weights=weights,
                                    device=device or default_device(), precision=precision)
