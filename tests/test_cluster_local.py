"""End to end on a real two-node Ray cluster and MLflow server (cluster/local.sh) on this machine.

The cluster comes up once for the module: a probe job, then jobs/train.py submitted with `ray job submit`
(2 DDP workers over 3 shards) with its checkpoints on an S3-compatible server, a worker killed with SIGKILL
mid-run, and a resubmission that resumes from the bucket.
Nothing of the cluster is left running after `stop`.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from clusters import RAY, ROOT, SCRIPT, local_cluster, run, summary_of, train_command

# Not the defaults, so a cluster started by hand keeps running beside the test.
PORTS = {"RAY_PORT": "6391", "RAY_DASHBOARD_PORT": "8275", "RAY_CLIENT_PORT": "20091", "MLFLOW_PORT": "5011"}
S3_PORT = "5091"

# Runs one task on every alive node; each reports where it imported psunet from and its tracking URI.
JOB = """
import os, ray, psunet.config
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
ray.init()
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
probe = ray.remote(num_cpus=0)(lambda: (__import__("psunet.config").config.__file__, os.environ["MLFLOW_TRACKING_URI"]))
print("ALIVE_NODES", len(nodes))
for node in nodes:
    print("NODE", *ray.get(probe.options(scheduling_strategy=On(node, soft=False)).remote()))
"""

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="local.sh finds its processes in /proc"),
]


@pytest.fixture(scope="module")
def object_store(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1 with a bucket `psunet`: storage that is not the workers'
    disk. Yields the environment variables that point AWS clients (pyarrow's S3 filesystem) at it."""
    import pyarrow.fs

    log = (tmp_path_factory.mktemp("s3") / "moto.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", S3_PORT],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the S3 server did not start"
                time.sleep(0.3)
        pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{S3_PORT}", scheme="http", access_key="test",
                                secret_key="test", allow_bucket_creation=True).create_dir("psunet")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, object_store):
    """The running cluster (head + 1 worker node, 1 CPU each) whose nodes can reach the object store: its state
    folder and the environment that reaches it (`local.sh env`)."""
    with local_cluster(tmp_path_factory.mktemp("cluster"), PORTS, "--workers", "1", "--cpus-per-node", "1",
                       env=object_store) as c:
        assert "Cluster up: 2 Ray nodes" in c["startup"]
        yield c


def test_local_cluster_runs_a_job_and_tracks_to_mlflow(cluster, tmp_path):
    import mlflow

    state, env = cluster["state"], cluster["env"]
    status = run([str(SCRIPT), "status"], env, timeout=60)
    assert "2 alive node(s)" in status and "MLflow: healthy" in status
    assert cluster["exports"] == {
        "RAY_ADDRESS": "127.0.0.1:6391",
        "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8275",
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5011",
    }
    tracking_uri = cluster["exports"]["MLFLOW_TRACKING_URI"]

    with urllib.request.urlopen(f"{tracking_uri}/health", timeout=10) as response:
        assert response.status == 200
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment(f"cluster-test-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, "loss", 0.5)
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    client.log_artifact(run_id, str(artifact))
    assert client.get_run(run_id).data.metrics == {"loss": 0.5}
    assert list((state / "mlartifacts").rglob("note.txt")), "artifact not proxied into the state folder"

    job_out = run([RAY, "job", "submit", "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster/runtime_env.yaml"),
                   "--", "python", "-c", JOB], env, timeout=180)
    assert "ALIVE_NODES 2" in job_out
    nodes = [line.split()[1:] for line in job_out.splitlines() if line.startswith("NODE ")]
    assert len(nodes) == 2
    for module_file, node_tracking_uri in nodes:
        assert "working_dir_files" in module_file and module_file.endswith("psunet/config.py")
        assert node_tracking_uri == tracking_uri


def train_workers(env) -> list[int]:
    listed = subprocess.run([RAY, "list", "actors", "--address", env["RAY_API_SERVER_ADDRESS"], "--format", "json",
                             "--filter", "class_name=RayTrainWorker", "--filter", "state=ALIVE"],
                            env=env, capture_output=True, text=True, timeout=60)
    return [actor["pid"] for actor in json.loads(listed.stdout or "[]")] if listed.returncode == 0 else []


def test_a_killed_worker_resumes_from_checkpoints_uploaded_in_the_background_to_object_storage(
        cluster, object_store, demo_set, tmp_path):
    """Storage that is not the workers' disk: checkpoints go to the S3 server while training goes on, a worker
    killed with SIGKILL after the first one is restarted from the bucket, the job tracks to MLflow and leaves a
    model that samples, and a resubmission resumes from the bucket."""
    import mlflow
    import pyarrow.fs

    from jobs.model_ref import load_pipeline
    from psunet.pipeline import PSUNetPipeline
    from psunet.settings import SamplerSettings

    env, storage, output = cluster["env"], "s3://psunet/runs", tmp_path / "job.log"
    s3 = pyarrow.fs.S3FileSystem(endpoint_override=object_store["AWS_ENDPOINT_URL"].removeprefix("http://"),
                                 scheme="http", access_key="test", secret_key="test")

    def stored() -> set[str]:
        return {info.path for info in s3.get_file_info(pyarrow.fs.FileSelector("psunet/runs/s3", recursive=True,
                                                                               allow_not_found=True))}

    with output.open("w") as sink:
        job = subprocess.Popen(train_command(demo_set, storage, "s3", "optim.steps=60"), env=env, cwd="/",
                               stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not any(path.endswith("/state.json") for path in stored()):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or uploaded no checkpoint"
            time.sleep(0.3)
        pids = train_workers(env)
        assert len(pids) == 2
        os.kill(pids[-1], signal.SIGKILL)
        job.wait(timeout=420)
    finally:
        job.kill()
    logs = output.read_text()
    assert job.returncode == 0 and "succeeded" in logs, logs[-3000:]
    # the job's own line per log step; Ray Train's per-report lines are quieted in the workers
    assert "train: step 60 " in logs and "Reporting training result" not in logs
    summary = summary_of(logs)
    assert summary["step"] == 60 and summary["checkpoint"] == "s3://psunet/runs/s3/checkpoint_0000060"
    # three shards over two DDP workers: no hang, and the replicas agree bit for bit
    assert summary["ddp_param_max_abs_diff"] == 0.0
    pipe = PSUNetPipeline.from_pretrained(summary["model"])
    images, unknown = pipe.text_to_image(["a small red circle on the left"], SamplerSettings(steps=4))
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8 and unknown == [[]]
    assert (Path(summary["samples"]) / "text_to_image.png").is_file()
    started_at = sorted({int(line.split("starting at step ")[1].split("/")[0]) for line in logs.splitlines()
                         if "starting at step " in line})
    assert len(started_at) == 2 and started_at[0] == 0 and started_at[1] > 0 and started_at[1] % 10 == 0
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json", "assets.json"):
        assert f"psunet/runs/s3/checkpoint_0000060/{name}" in stored()
    with s3.open_input_stream("psunet/runs/s3/checkpoint_0000060/state.json") as f:
        assert json.loads(f.read())["samples_seen"] == 60 * 8 * 2

    client = mlflow.MlflowClient(cluster["exports"]["MLFLOW_TRACKING_URI"])
    tracked = client.get_run(summary["run_id"])
    assert tracked.data.tags["restarts"] == "1"
    same_run = client.search_runs([tracked.info.experiment_id], filter_string=f"tags.`psunet.run` = '{storage}/s3'")
    assert [r.info.run_id for r in same_run] == [summary["run_id"]]
    assert "model/model_index.json" in {a.path for a in client.list_artifacts(summary["run_id"], "model")}
    assert tracked.data.metrics["val_loss"] == summary["val_loss"]
    assert tracked.data.params["model.word_dim"] == "16" and tracked.data.params["optim.steps"] == "60"
    for metric in ("loss", "loss_image", "loss_text", "lr", "samples_per_s", "data_wait_fraction",
                   "checkpoint_stall_s", "val_loss", "val_gap_text", "t2i_acc_shape", "i2t_acc_shape", "workers"):
        assert metric in tracked.data.metrics, metric
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "samples/step_0000060")}
    assert {"samples/step_0000060/text_to_image.png", "samples/step_0000060/image_to_text.json"} <= artifacts

    # the same command with more steps resumes from the bucket, in the same MLflow run; the workers' local
    # copies of the checkpoints are deleted once uploaded
    leftovers = set(Path(tempfile.gettempdir()).glob("psunet-checkpoint-*"))
    again = run(train_command(demo_set, storage, "s3", "optim.steps=70"), cluster["env"], timeout=420)
    assert "starting at step 60/70" in again
    resumed = summary_of(again)
    assert resumed["step"] == 70 and resumed["run_id"] == summary["run_id"]
    # each finished job registers its model: a new version, loadable by its models:/ URI, the model it bundled
    name, version = summary["registered_model"].removeprefix("models:/").split("/")
    assert name == "psunet" and resumed["registered_model"] == f"models:/psunet/{int(version) + 1}"
    registered = load_pipeline(resumed["registered_model"], device="cpu",
                               tracking_uri=cluster["exports"]["MLFLOW_TRACKING_URI"])
    settings = SamplerSettings(steps=3, seed=2)
    np.testing.assert_array_equal(registered.text_to_image(["a small red circle on the left"], settings)[0],
                                  PSUNetPipeline.from_pretrained(resumed["model"]).text_to_image(
                                      ["a small red circle on the left"], settings)[0])
    assert set(Path(tempfile.gettempdir()).glob("psunet-checkpoint-*")) == leftovers
    assert [m.step for m in client.get_metric_history(summary["run_id"], "workers")] == [0, started_at[1], 60]
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "loss")]
    assert sorted(steps) == list(range(5, 71, 5)), "a step logged twice or missing"
