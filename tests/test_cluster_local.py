"""cluster/local.sh: a real two-node Ray cluster and MLflow server on this machine, a job submitted to
it with cluster/runtime_env.yaml, and nothing left running after `stop`."""

import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

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


def test_local_cluster_runs_a_job_and_tracks_to_mlflow(tmp_path):
    import mlflow

    state = tmp_path / "cluster"
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}
    env = {**base, **PORTS, "PSUNET_CLUSTER_DIR": str(state)}
    try:
        out = run([str(SCRIPT), "start", "--workers", "1", "--cpus-per-node", "1"], env, timeout=240)
        assert "Cluster up: 2 Ray nodes" in out

        status = run([str(SCRIPT), "status"], env, timeout=60)
        assert "2 alive node(s)" in status and "MLflow: healthy" in status

        exports = run([str(SCRIPT), "env"], env, timeout=30).splitlines()
        cluster_env = dict(line.removeprefix("export ").split("=", 1) for line in exports)
        assert cluster_env == {
            "RAY_ADDRESS": "127.0.0.1:6391",
            "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8275",
            "RAY_AUTH_MODE": "token",
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:5011",
        }
        tracking_uri = cluster_env["MLFLOW_TRACKING_URI"]

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

        job_out = run(
            [str(Path(sys.executable).with_name("ray")), "job", "submit", "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster/runtime_env.yaml"),
             "--", "python", "-c", JOB],
            {**env, **cluster_env},
            timeout=180,
        )
        assert "ALIVE_NODES 2" in job_out
        nodes = [line.split()[1:] for line in job_out.splitlines() if line.startswith("NODE ")]
        assert len(nodes) == 2
        for module_file, node_tracking_uri in nodes:
            assert "working_dir_files" in module_file and module_file.endswith("psunet/config.py")
            assert node_tracking_uri == tracking_uri
    finally:
        stopped = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert cluster_processes(state) == []
