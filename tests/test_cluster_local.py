"""End to end on a real two-node Ray cluster and MLflow server (cluster/local.sh) on this machine.

The cluster comes up once for the module: a probe job, then jobs/train.py submitted with `ray job submit`
(2 DDP workers over 3 shards), a resubmission that resumes, and a worker killed with SIGKILL mid-run.
Nothing of the cluster is left running after `stop`.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local.sh"
# Not the defaults, so a cluster started by hand keeps running beside the test.
PORTS = {"RAY_PORT": "6391", "RAY_DASHBOARD_PORT": "8275", "RAY_CLIENT_PORT": "20091", "MLFLOW_PORT": "5011"}
RAY_TEMP_ROOT = "/tmp/psunet-ray-6391"

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


def run(args, env, timeout):
    result = subprocess.run(args, env=env, cwd="/", capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


RAY = str(Path(sys.executable).with_name("ray"))


def cluster_processes(state: Path) -> list[str]:
    """Live processes that belong to the cluster: by command line, or by local.sh's marker variable."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if RAY_TEMP_ROOT in cmdline or str(state) in cmdline or f"PSUNET_CLUSTER_ID={state}".encode() in environ:
            found.append(f"{proc.name}: {cmdline[:150]}")
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The running cluster: its state folder and the environment that reaches it (`local.sh env`)."""
    state = tmp_path_factory.mktemp("cluster")
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}
    env = {**base, **PORTS, "PSUNET_CLUSTER_DIR": str(state)}
    try:
        out = run([str(SCRIPT), "start", "--workers", "1", "--cpus-per-node", "1"], env, timeout=240)
        assert "Cluster up: 2 Ray nodes" in out
        exports = run([str(SCRIPT), "env"], env, timeout=30).splitlines()
        cluster_env = dict(line.removeprefix("export ").split("=", 1) for line in exports)
        yield {"state": state, "env": {**env, **cluster_env}, "exports": cluster_env}
    finally:
        stopped = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert cluster_processes(state) == []


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


def train_command(demo_set, storage: Path, name: str, *overrides: str, wait: bool = True) -> list[str]:
    return [RAY, "job", "submit", *([] if wait else ["--no-wait"]), "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster/runtime_env.yaml"),
            "--", "python", "jobs/train.py", "--config", "configs/tiny.yaml",
            f"data.train={demo_set / 'train'}", f"data.val={demo_set / 'val'}",
            f"run.storage_path={storage}", f"run.name={name}", *overrides]


def summary_of(job_output: str) -> dict:
    lines = [line for line in job_output.splitlines() if line.startswith("train: done ")]
    assert len(lines) == 1, job_output[-3000:]
    return json.loads(lines[0].removeprefix("train: done "))


def test_training_job_checkpoints_tracks_and_resumes(cluster, demo_set, tmp_path):
    import mlflow

    from psunet.checkpoint import load_model
    from psunet.pipeline import Pipeline
    from psunet.settings import SamplerSettings

    storage = tmp_path / "runs"
    out = run(train_command(demo_set, storage, "e2e"), cluster["env"], timeout=420)
    assert "starting at step 0/20" in out
    summary = summary_of(out)
    assert summary["step"] == 20
    # three shards over two DDP workers: no hang, and the replicas agree bit for bit
    assert summary["ddp_param_max_abs_diff"] == 0.0

    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.parent == storage / "e2e" and checkpoint.name.startswith("checkpoint_")
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
                 "config.json", "assets.json"):
        assert (checkpoint / name).is_file(), name
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 20 and state["samples_seen"] == 20 * 8 * 2
    model, model_config, _, _ = load_model(checkpoint)
    assert model_config.word_dim == 16 and model_config.text_len == 16

    pipe = Pipeline.from_checkpoint(summary["model"])
    images, unknown = pipe.text_to_image(["a small red circle on the left"], SamplerSettings(steps=4))
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8 and unknown == [[]]
    assert (Path(summary["samples"]) / "text_to_image.png").is_file()

    client = mlflow.MlflowClient(cluster["exports"]["MLFLOW_TRACKING_URI"])
    tracked = client.get_run(summary["run_id"])
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["model.word_dim"] == "16" and tracked.data.params["optim.steps"] == "20"
    for metric in ("loss", "loss_image", "loss_text", "lr", "samples_per_s", "val_loss", "t2i_acc_shape",
                   "i2t_acc_shape"):
        assert metric in tracked.data.metrics, metric
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "samples/step_0000020")}
    assert {"samples/step_0000020/text_to_image.png", "samples/step_0000020/image_to_text.json"} <= artifacts
    assert "model/ema.safetensors" in {a.path for a in client.list_artifacts(summary["run_id"], "model")}

    again = run(train_command(demo_set, storage, "e2e", "optim.steps=30"), cluster["env"], timeout=420)
    assert "starting at step 20/30" in again
    resumed = summary_of(again)
    assert resumed["step"] == 30 and resumed["run_id"] == summary["run_id"]
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "loss")]
    assert max(steps) == 30 and steps.count(20) == 1


def train_workers(env) -> list[int]:
    listed = subprocess.run([RAY, "list", "actors", "--address", env["RAY_API_SERVER_ADDRESS"], "--format", "json",
                             "--filter", "class_name=RayTrainWorker", "--filter", "state=ALIVE"],
                            env=env, capture_output=True, text=True, timeout=60)
    return [actor["pid"] for actor in json.loads(listed.stdout or "[]")] if listed.returncode == 0 else []


def test_a_killed_worker_resumes_from_the_last_checkpoint(cluster, demo_set, tmp_path):
    import mlflow

    storage, env = tmp_path / "runs", cluster["env"]
    output = tmp_path / "job.log"
    with output.open("w") as sink:
        job = subprocess.Popen(train_command(demo_set, storage, "fault", "optim.steps=60"), env=env, cwd="/",
                               stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list((storage / "fault").glob("checkpoint_*")):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or wrote no checkpoint"
            time.sleep(0.2)
        pids = train_workers(env)
        assert len(pids) == 2
        os.kill(pids[-1], signal.SIGKILL)
        job.wait(timeout=420)
    finally:
        job.kill()
    logs = output.read_text()
    assert job.returncode == 0 and "succeeded" in logs, logs[-3000:]
    summary = summary_of(logs)
    assert summary["step"] == 60
    started_at = sorted({int(line.split("starting at step ")[1].split("/")[0]) for line in logs.splitlines()
                         if "starting at step " in line})
    assert len(started_at) == 2 and started_at[0] == 0 and started_at[1] > 0 and started_at[1] % 10 == 0

    client = mlflow.MlflowClient(cluster["exports"]["MLFLOW_TRACKING_URI"])
    tracked = client.get_run(summary["run_id"])
    assert tracked.data.tags["restarts"] == "1"
    same_run = client.search_runs([tracked.info.experiment_id],
                                  filter_string=f"tags.`psunet.run` = '{storage / 'fault'}'")
    assert [r.info.run_id for r in same_run] == [summary["run_id"]]
    assert max(m.step for m in client.get_metric_history(summary["run_id"], "loss")) == 60
