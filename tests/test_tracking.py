"""jobs/tracking.py against a real MLflow store (SQLite): runs found by tag or created and nested, params cut at
one limit, metrics in batches at their steps."""

import math

import numpy as np
import pytest

from jobs import tracking


def test_runs_are_found_by_tag_nested_and_logged_in_batches(tmp_path):
    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.find_or_create_run(client, "exp", tmp_path, "psunet.key", "runs/a", "a",
                                         params={"lr": 0.001, "long": "x" * 7000})
    again = tracking.find_or_create_run(client, "exp", tmp_path, "psunet.key", "runs/a", "a", params={"lr": 9})
    assert again == parent  # found by its tag: not created twice, params untouched
    params = client.get_run(parent).data.params
    assert params["lr"] == "0.001" and len(params["long"]) == tracking.MAX_PARAM_CHARS
    child = tracking.create_run(client, "exp", tmp_path, "child", params={f"p{i}": i for i in range(250)},
                                tags={"kind": "trial"}, parent=parent)
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["kind"] == "trial"
    assert len(run.data.params) == 250  # over several batches of PARAMS_PER_BATCH
    points = [("curve", i / 10, i) for i in range(2500)]  # over several batches of METRICS_PER_BATCH
    tracking.log_metrics(client, child, {"loss": 0.5, "steps": 3}, step=7, points=points)
    assert [(m.step, m.value) for m in client.get_metric_history(child, "loss")] == [(7, 0.5)]
    history = sorted(client.get_metric_history(child, "curve"), key=lambda m: m.step)
    assert len(history) == 2500 and math.isclose(history[-1].value, 249.9) and history[-1].step == 2499
    assert client.get_experiment_by_name("exp").artifact_location.endswith("mlartifacts")


def test_a_registered_model_loads_from_its_models_uri_and_samples_like_its_folder(tiny_model, tmp_path):
    from jobs.model_ref import load_pipeline
    from psunet.pipeline import PSUNetPipeline
    from psunet.settings import SamplerSettings

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id = tracking.create_run(client, "exp", tmp_path, "train")
    client.log_artifacts(run_id, str(tiny_model), "model")
    assert tracking.register_model(client, "tiny", run_id) == "models:/tiny/1"
    assert tracking.register_model(client, "tiny", run_id) == "models:/tiny/2"  # a version per registration
    settings = SamplerSettings(steps=3, seed=4)
    expected, _ = PSUNetPipeline.from_pretrained(tiny_model).text_to_image(["a small red circle on the left"], settings)
    client.set_registered_model_alias("tiny", "best", "1")
    for reference in ("models:/tiny/2", "models:/tiny/latest", "models:/tiny@best"):
        registered = load_pipeline(reference, device="cpu", tracking_uri=uri)
        images, _ = registered.text_to_image(["a small red circle on the left"], settings)
        np.testing.assert_array_equal(images, expected)
    with pytest.raises(FileNotFoundError, match="cannot download 'models:/tiny/9'"):
        load_pipeline("models:/tiny/9", tracking_uri=uri)
