"""End to end on one real local Ray cluster (cluster/local.sh: a head with no CPU for training, two one-CPU worker
nodes) with its MLflow server, and checkpoints on an S3-compatible server on this machine.

One scenario, in steps: a probe job reaches every node and the tracking server; jobs/train.py, submitted with
`ray job submit` as an elastic job (run.num_workers=1-2, 2 DDP workers over 3 shards), has a worker killed with
SIGKILL after its first checkpoint is in the bucket (it restarts from the bucket), then loses a whole node at 40 %
of the steps (it carries on with the worker left) and gets it back (it grows back to two workers); it finishes with
the exact step count, every step counted and logged once, one MLflow run holding the restarts and resizes, and a
registered model that samples. The same command with more steps resumes from the bucket in the same run.
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

import mlflow
import numpy as np
import pytest

from clusters import RAY, ROOT, SCRIPT, local_cluster, object_store, run, summary_of, train_command

# Ray's autoscaling coordinator looks at the cluster every 20 s: the one-worker stretch (from 40 % of the steps to
# the end) must last well over that for the job to grow back before it ends
STEPS, CHECKPOINT_EVERY, LOG_EVERY, BATCH, MAX_WORKERS = 200, 20, 10, 96, 2

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


# Not the defaults, so a cluster started by hand keeps running beside the tests.
CLUSTER_PORTS = {"RAY_PORT": "6391", "RAY_DASHBOARD_PORT": "8275", "RAY_CLIENT_PORT": "20091", "MLFLOW_PORT": "5011"}
S3_PORT = "5091"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 with a bucket `psunet` (tests/clusters.py): the environment that
    points AWS clients at it."""
    with object_store(S3_PORT, tmp_path_factory.mktemp("s3")) as env:
        yield env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """The one local cluster of the tests (cluster/local.sh: a head with no CPU for training and two one-CPU worker
    nodes, MLflow beside them) whose nodes reach the object store: its state folder, the environment that reaches
    it (`local.sh env`) and those exports."""
    with local_cluster(tmp_path_factory.mktemp("cluster"), CLUSTER_PORTS, "--workers", "2", "--cpus-per-node", "1",
                       "--head-cpus", "0", env=s3) as running:
        assert "Cluster up: 3 Ray nodes" in running["startup"]
        yield running



def test_local_cluster_runs_a_job_and_tracks_to_mlflow(cluster, tmp_path):

    state, env = cluster["state"], cluster["env"]
    status = run([str(SCRIPT), "status"], env, timeout=60)
    assert "3 alive node(s)" in status and "MLflow: healthy" in status
    assert cluster["exports"] == {
        "RAY_ADDRESS": f"127.0.0.1:{CLUSTER_PORTS['RAY_PORT']}",
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{CLUSTER_PORTS['RAY_DASHBOARD_PORT']}",
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{CLUSTER_PORTS['MLFLOW_PORT']}",
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

    job_out = run([RAY, "job", "submit", "--working-dir", str(ROOT), "--runtime-env",
                   str(ROOT / "cluster/runtime_env.yaml"), "--", "python", "-c", JOB], env, timeout=180)
    assert "ALIVE_NODES 3" in job_out
    nodes = [line.split()[1:] for line in job_out.splitlines() if line.startswith("NODE ")]
    assert len(nodes) == 3
    for module_file, node_tracking_uri in nodes:
        assert "working_dir_files" in module_file and module_file.endswith("psunet/config.py")
        assert node_tracking_uri == tracking_uri


def train_workers(env) -> list[int]:
    listed = subprocess.run([RAY, "list", "actors", "--address", env["RAY_API_SERVER_ADDRESS"], "--format", "json",
                             "--filter", "class_name=RayTrainWorker", "--filter", "state=ALIVE"],
                            env=env, capture_output=True, text=True, timeout=60)
    return [actor["pid"] for actor in json.loads(listed.stdout or "[]")] if listed.returncode == 0 else []


def wait_for(condition, job, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert job.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds:.0f} s"
        time.sleep(0.3)


def test_an_elastic_job_survives_a_killed_worker_and_a_lost_node_and_resumes_from_object_storage(
        cluster, s3, demo_set, tmp_path):
    import pyarrow.fs

    from jobs.model_ref import load_pipeline
    from psunet.pipeline import PSUNetPipeline
    from psunet.settings import SamplerSettings

    env, storage, log_path = cluster["env"], "s3://psunet/runs", tmp_path / "job.log"
    bucket = pyarrow.fs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"].removeprefix("http://"),
                                 scheme="http", access_key="test", secret_key="test")

    def stored() -> set[str]:
        return {info.path for info in bucket.get_file_info(pyarrow.fs.FileSelector("psunet/runs/elastic", recursive=True,
                                                                               allow_not_found=True))}

    def checkpoint_steps() -> list[int]:
        return sorted(int(path.split("/checkpoint_")[1].split("/")[0]) for path in stored()
                      if path.endswith("/state.json"))

    def started_at(logs: str) -> list[int]:
        return [int(line.split("starting at step ")[1].split("/")[0]) for line in logs.splitlines()
                if "starting at step " in line]

    command = train_command(demo_set, storage, "elastic", f"optim.steps={STEPS}", "optim.warmup_steps=10",
                            f"optim.batch_size={BATCH}", f"run.num_workers=1-{MAX_WORKERS}", "run.max_failures=3",
                            "run.resize_interval_s=5", "run.validation_resources={validation: 1}",
                            f"schedule.checkpoint_every={CHECKPOINT_EVERY}", f"schedule.log_every={LOG_EVERY}",
                            f"schedule.sample_every={STEPS}")
    with log_path.open("w") as sink:
        job = subprocess.Popen(command, env=env, cwd="/", stdout=sink, stderr=subprocess.STDOUT)
    try:
        # a worker killed once the first checkpoint is in the bucket: the group restarts from the bucket
        wait_for(lambda: checkpoint_steps(), job, 300, "checkpoint in the bucket")
        pids = train_workers(env)
        assert len(pids) == 2
        os.kill(pids[-1], signal.SIGKILL)
        wait_for(lambda: len(started_at(log_path.read_text())) == 2, job, 300, "restart after the killed worker")
        restarted_at = started_at(log_path.read_text())[1]

        # a whole node lost at 40 % of the steps: training goes on with the one worker left (no spare CPU for a
        # replacement); the node comes back while it trains
        wait_for(lambda: any(s >= 0.4 * STEPS for s in checkpoint_steps()), job, 400, "checkpoint at 40 % of the steps")
        one_worker_starts = log_path.read_text().count("rank 0 of 1 ")
        subprocess.run([str(SCRIPT), "node", "stop", "2"], env=env, check=True, timeout=60)
        lost_at = max(checkpoint_steps())
        wait_for(lambda: log_path.read_text().count("rank 0 of 1 ") > one_worker_starts, job, 300,
                 "restart on one worker")
        shrunk_at = int(log_path.read_text().split("rank 0 of 1 on cpu, starting at step ")[-1].split("/")[0])
        subprocess.run([str(SCRIPT), "node", "start", "2"], env=env, check=True, timeout=120)
        job.wait(timeout=600)
    finally:
        job.kill()
    logs = log_path.read_text()
    assert job.returncode == 0 and "succeeded" in logs, logs[-4000:]
    # the job's own line per log step; Ray Train's per-report lines are quieted in the workers
    assert f"train: step {STEPS} " in logs and "Reporting training result" not in logs

    summary = summary_of(logs)
    checkpoint = f"s3://psunet/runs/elastic/checkpoint_{STEPS:07d}"
    assert summary["step"] == STEPS and summary["checkpoint"] == checkpoint
    # three shards over two DDP workers: no hang, and the replicas agree bit for bit
    assert summary["ddp_param_max_abs_diff"] == 0.0
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json", "assets.json"):
        assert f"{checkpoint.removeprefix('s3://')}/{name}" in stored()
    with bucket.open_input_stream(f"{checkpoint.removeprefix('s3://')}/state.json") as f:
        state = json.loads(f.read())
    # the global batch stays BATCH x MAX_WORKERS on one worker too (gradient accumulation): samples are counted
    # once per step, however often a step was replayed after a restart
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * BATCH * MAX_WORKERS
    assert f"global batch {BATCH * MAX_WORKERS} as {MAX_WORKERS} micro-batch(es) of {BATCH} per worker" in logs
    assert "resized from 2 to 1 workers" in logs and "resized from 1 to 2 workers" in logs
    assert 0 < restarted_at < 0.4 * STEPS and restarted_at % CHECKPOINT_EVERY == 0

    pipe = PSUNetPipeline.from_pretrained(summary["model"])
    images, unknown = pipe.text_to_image(["a small red circle on the left"], SamplerSettings(steps=4))
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8 and unknown == [[]]
    assert (Path(summary["samples"]) / "text_to_image.png").is_file()

    client = mlflow.MlflowClient(cluster["exports"]["MLFLOW_TRACKING_URI"])
    tracked = client.get_run(summary["run_id"])
    same_run = client.search_runs([tracked.info.experiment_id],
                                  filter_string=f"tags.`psunet.run` = '{storage}/elastic'")
    assert [r.info.run_id for r in same_run] == [summary["run_id"]]
    assert tracked.info.status == "FINISHED"
    assert "model/model_index.json" in {a.path for a in client.list_artifacts(summary["run_id"], "model")}
    assert tracked.data.params["model.word_dim"] == "16" and tracked.data.params["optim.steps"] == str(STEPS)
    for metric in ("loss", "loss_image", "loss_text", "lr", "samples_per_s", "data_wait_fraction",
                   "checkpoint_stall_s", "val_loss", "val_gap_text", "t2i_acc_shape", "i2t_acc_shape", "workers"):
        assert metric in tracked.data.metrics, metric
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], f"samples/step_{STEPS:07d}")}
    assert {f"samples/step_{STEPS:07d}/text_to_image.png", f"samples/step_{STEPS:07d}/image_to_text.json"} <= artifacts
    # validation ran off the training path on the head's validation slot, for the final checkpoint too
    assert {m.step for m in client.get_metric_history(summary["run_id"], "val_loss")} >= {STEPS}
    assert tracked.data.metrics["val_loss"] == summary["val_loss"] < float("inf")

    loss_steps = [m.step for m in client.get_metric_history(summary["run_id"], "loss")]
    assert sorted(loss_steps) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), "a step logged twice or missing"
    starts = [(m.step, int(m.value)) for m in sorted(client.get_metric_history(summary["run_id"], "workers"),
                                                     key=lambda m: m.timestamp)]
    sizes = [size for _, size in starts]
    assert starts[0] == (0, 2) and starts[1][0] == restarted_at and sizes[-1] == 2 and 1 in sizes, starts
    # resumed from the last checkpoint committed before the node died (one being uploaded may be lost)
    assert (shrunk_at, 1) in starts and lost_at - CHECKPOINT_EVERY <= shrunk_at <= lost_at
    # the one worker trained and checkpointed before the group grew back
    regrown_at = starts[-1][0]
    assert shrunk_at < regrown_at < STEPS and regrown_at % CHECKPOINT_EVERY == 0
    resizes = tracked.data.tags["resizes"].split()
    assert resizes[0] == "0:2" and f"{shrunk_at}:1" in resizes and resizes[-1].endswith(":2")
    assert int(tracked.data.tags["restarts"]) == len(starts) - 1 >= 3

    # the same command with more steps resumes from the bucket, in the same MLflow run; the workers' local
    # copies of the checkpoints are deleted once uploaded
    leftovers = set(Path(tempfile.gettempdir()).glob("psunet-checkpoint-*"))
    more = [arg.replace(f"optim.steps={STEPS}", f"optim.steps={STEPS + 10}") for arg in command]
    again = run(more, env, timeout=420)
    assert f"starting at step {STEPS}/{STEPS + 10}" in again
    resumed = summary_of(again)
    assert resumed["step"] == STEPS + 10 and resumed["run_id"] == summary["run_id"]
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
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "loss")]
    assert sorted(steps) == list(range(LOG_EVERY, STEPS + 11, LOG_EVERY)), "a step logged twice or missing"
