"""The dull faults of long runs, each injected for real while jobs/train.py trains on its own local Ray: the MLflow
server process stopped and started again, a shard truncated on disk, a checkpoint write the kernel refuses."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
MLFLOW_PORT = "5031"
STEP = re.compile(r"train: step (\d+) ")

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the faults are injected through Linux")]


class Server:
    """A real MLflow tracking server on 127.0.0.1 with its store in `state`: started, stopped, started again."""

    def __init__(self, state: Path, port: str = MLFLOW_PORT):
        self.state, self.port, self.process = state, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", self.port, "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.state}/mlflow.db", "--serve-artifacts",
             "--artifacts-destination", str(self.state / "mlartifacts")],
            stdout=(self.state / "server.log").open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, f"the MLflow server exited: {(self.state / 'server.log').read_text()}"
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)


@pytest.fixture
def server(tmp_path):
    """A tracking server of the test's own, stopped at the end whatever happened."""
    running = Server(tmp_path / "mlflow")
    yield running
    running.stop()


class Job:
    """jobs/train.py in a process of its own, its output read as it comes."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        self.process = subprocess.Popen([sys.executable, "jobs/train.py", *args], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def last_step(self) -> int:
        return max((int(m.group(1)) for line in list(self.lines) for m in [STEP.search(line)] if m), default=0)

    def wait_for_step(self, step: int, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.last_step() < step:
            assert self.process.poll() is None, f"the job ended before step {step}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no step {step} within {timeout} s:\n{self.output[-4000:]}"
            time.sleep(0.2)
        return self.last_step()

    def finish(self, timeout: float = 400) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code


def train_args(demo_set: Path, storage: Path, name: str, *overrides: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"data.train={demo_set / 'train'}", f"data.val={demo_set / 'val'}",
            f"run.storage_path={storage}", f"run.name={name}", "run.num_workers=1", "run.registered_model=null",
            *overrides]


def test_training_goes_on_while_the_tracking_server_is_down_and_no_metric_is_lost(server, demo_set, tmp_path):
    """The server stopped for a stretch mid-run and again before the end (and not back when the job ends): the
    job finishes anyway, says so, keeps the metrics beside the checkpoints; the same command run once the server
    is back completes the one MLflow run with every step's metrics once."""
    storage = tmp_path / "runs"
    steps, log_every = 2000, 20
    args = train_args(demo_set, storage, "outage", f"run.mlflow_tracking_uri={server.uri}", f"optim.steps={steps}",
                      f"schedule.log_every={log_every}", "schedule.checkpoint_every=500",
                      f"schedule.sample_every={steps}")
    server.start()
    job = Job(*args)
    stopped_at = job.wait_for_step(log_every)
    server.stop()  # mid-run, while training takes 100 more steps and the server takes to start again
    job.wait_for_step(stopped_at + 100)
    server.start()
    job.wait_for_step(steps - 300)  # before the end, and not back until the job has ended
    server.stop()
    assert job.finish() == 0, job.output[-4000:]
    output = job.output
    assert "MLflow at http://127.0.0.1:5031 is unreachable" in output
    assert "MLflow is back after" in output
    assert "tracking_incomplete" in output and str(storage / "outage" / "unsent_metrics") in output
    kept = list((storage / "outage" / "unsent_metrics").glob("*.jsonl"))
    assert kept, "the metrics logged while the server was away are not kept beside the checkpoints"

    server.start()
    again = Job(*args)
    assert again.finish() == 0, again.output[-4000:]
    client = mlflow.MlflowClient(server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("psunet").experiment_id])
    assert run.info.status == "FINISHED"
    losses = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(losses) == list(range(log_every, steps + 1, log_every))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == [500, 1000, 1500, 2000]
    assert list((storage / "outage" / "unsent_metrics").glob("*.jsonl")) == []
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
