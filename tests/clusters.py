"""Helpers for the tests that start a real local Ray cluster with cluster/local.sh and submit jobs to it, and for
the S3-compatible server its checkpoints go to."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local.sh"
RAY = str(Path(sys.executable).with_name("ray"))


def attempt(args, env, timeout) -> subprocess.CompletedProcess:
    """A command run from / with the cluster's environment, its output captured, whatever its exit status."""
    return subprocess.run(args, env=env, cwd="/", capture_output=True, text=True, timeout=timeout)


def run(args, env, timeout):
    result = attempt(args, env, timeout)
    assert result.returncode == 0, f"{args} failed:\n{errors_first(result.stdout + result.stderr)}"
    return result.stdout


def errors_first(output: str) -> str:
    """A failed command's output with its error lines (and the 20 after each Traceback) first: a report that
    shows only the head and tail of a long failure still shows its cause."""
    lines = output.splitlines()
    marked = [i for i, line in enumerate(lines) if re.search(r"Traceback|\w+(Error|Exception)\b|error:", line)]
    wanted = sorted({j for i in marked for j in range(i, min(i + (20 if "Traceback" in lines[i] else 1), len(lines)))})
    return "\n".join(["--- error lines ---", *(lines[j] for j in wanted), "--- the whole output ---", output])


def cluster_processes(state: Path, temp_root: str) -> list[str]:
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
        if temp_root in cmdline or str(state) in cmdline or f"PSUNET_CLUSTER_ID={state}".encode() in environ:
            found.append(f"{proc.name}: {cmdline[:150]}")
    return found


@contextmanager
def local_cluster(state: Path, ports: dict[str, str], *start_args: str, env: dict[str, str] | None = None):
    """A running cluster/local.sh cluster: yields its state folder, the environment that reaches it
    (`local.sh env` over the ports) and those exports; stops it and checks nothing of it is left. `env`
    goes to every node (and so to every job, task and actor)."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}
    env = {**base, **(env or {}), **ports, "PSUNET_CLUSTER_DIR": str(state)}
    try:
        out = run([str(SCRIPT), "start", *start_args], env, timeout=240)
        assert "Cluster up:" in out
        exports = run([str(SCRIPT), "env"], env, timeout=30).splitlines()
        cluster_env = dict(line.removeprefix("export ").split("=", 1) for line in exports)
        yield {"state": state, "env": {**env, **cluster_env}, "exports": cluster_env, "startup": out}
    finally:
        stopped = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert cluster_processes(state, f"/tmp/psunet-ray-{ports['RAY_PORT']}") == []


def train_command(demo_set, storage: Path, name: str, *overrides: str, wait: bool = True) -> list[str]:
    """`ray job submit` of jobs/train.py with the tiny config on the test shards."""
    return [RAY, "job", "submit", *([] if wait else ["--no-wait"]), "--working-dir", str(ROOT),
            "--runtime-env", str(ROOT / "cluster/runtime_env.yaml"),
            "--", "python", "jobs/train.py", "--config", "configs/tiny.yaml",
            f"data.train={demo_set / 'train'}", f"data.val={demo_set / 'val'}",
            f"run.storage_path={storage}", f"run.name={name}", *overrides]


def summary_of(job_output: str) -> dict:
    lines = [line for line in job_output.splitlines() if line.startswith("train: done ")]
    assert len(lines) == 1, job_output[-3000:]
    return json.loads(lines[0].removeprefix("train: done "))


@contextmanager
def object_store(port: str, log_folder: Path):
    """A real S3-compatible server (moto) on 127.0.0.1 with a bucket `psunet`: storage that is not the workers'
    disk. Yields the environment variables that point AWS clients (pyarrow's S3 filesystem) at it."""
    import pyarrow.fs

    log = (log_folder / "moto.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", port],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
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
        pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="test",
                                secret_key="test", allow_bucket_creation=True).create_dir("psunet")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
