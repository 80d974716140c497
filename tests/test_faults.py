"""The dull faults of long runs, each injected for real while jobs/train.py trains: the MLflow server process stopped
and started again, a shard truncated on disk, a checkpoint write the kernel refuses (each on the job's own local Ray),
and `ray job stop` on a cluster/local.sh cluster."""

import json
import os
import shutil
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest

from clusters import RAY, attempt, errors_first, local_cluster, run, summary_of, train_command

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
    down = time.monotonic()
    job.wait_for_step(stopped_at + 100)
    server.start()
    back, trained_meanwhile = time.monotonic(), job.last_step() - stopped_at
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
    sent_late = sum(int(n) for n in re.findall(r"sent the (\d+) metrics kept meanwhile", output))
    print(f"figure: tracking outage {back - down:.0f} s mid-run: {trained_meanwhile} steps trained meanwhile, "
          f"{sent_late} metrics sent when it was back; at the end: {len(kept)} spool files sent by the rerun; "
          f"loss points {len(losses)} of {steps // log_every}")


def test_a_shard_truncated_on_storage_is_skipped_counted_and_named_and_too_much_bad_data_fails_the_run(demo_set,
                                                                                                        tmp_path):
    """One of the three training shards cut to half its bytes after it was written: past data.max_bad_fraction the
    run fails naming it; allowed, it trains to the end on the other shards with the same global batch, and the
    metric, the summary and the checkpoint count it."""
    data = tmp_path / "data"
    shutil.copytree(demo_set, data, ignore=shutil.ignore_patterns(".built"))
    shard = sorted((data / "train").glob("*.tar"))[1]
    with shard.open("r+b") as tar:
        tar.truncate(shard.stat().st_size // 2)
    storage, steps = tmp_path / "runs", 60
    args = [*train_args(demo_set, storage, "bad-shard", f"optim.steps={steps}", "schedule.log_every=10",
                        "schedule.checkpoint_every=30", "run.max_failures=0",
                        f"run.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db"), f"data.train={data / 'train'}"]
    refused = Job(*args)
    assert refused.finish() == 1
    assert f"train: error: training failed: psunet.data.BadDataError: bad data: 1 of 3 shards are unreadable or hold corrupt records, more than data.max_bad_fraction=0.05 " \
           f"allows: {shard.resolve()}" in refused.output

    allowed = Job(*args, "data.max_bad_fraction=0.5")
    assert allowed.finish() == 0, allowed.output[-4000:]
    assert f"skipping corrupt data in {shard.resolve()}" in allowed.output
    summary = json.loads(allowed.output.split("train: done ", 1)[1].splitlines()[0])
    assert summary["step"] == steps and summary["bad_shards"] == 1
    state = json.loads((Path(summary["checkpoint"]) / "state.json").read_text())
    assert list(state["bad_data"]["shards"]) == [str(shard.resolve())]
    assert state["samples_seen"] == steps * 8  # the global batch kept whole
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("psunet").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "bad_shards")][-1] == 1
    print(f"figure: truncated shard: refused with exit code 1; allowed: {summary['step']} of {steps} steps, "
          f"{state['samples_seen']} samples (global batch whole), bad shards {summary['bad_shards']}")


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (its Ray: the raylet, the workers)."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_a_checkpoint_write_the_disk_refuses_is_retried_then_stops_the_run_with_the_previous_checkpoint_latest(
        demo_set, tmp_path):
    """After the first checkpoint the kernel refuses the training worker any file past 256 KiB (RLIMIT_FSIZE: what
    a full disk looks like to the writer, for root too); the next checkpoint's weights are bigger. The write is
    tried again, then the run stops naming the storage and the cause, nothing of the failed checkpoint is listed
    or left in storage, and the same command resumes from the first checkpoint."""
    storage, steps = tmp_path / "runs", 600
    args = train_args(demo_set, storage, "full-disk", f"optim.steps={steps}", "schedule.log_every=100",
                      "schedule.checkpoint_every=300", "run.max_failures=0", "run.checkpoint_retries=1",
                      f"run.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db")
    job = Job(*args)
    first = storage / "full-disk" / "checkpoint_0000300"
    deadline = time.monotonic() + 300
    while not (first / "state.json").is_file():
        assert job.process.poll() is None and time.monotonic() < deadline, job.output[-4000:]
        time.sleep(0.1)
    refused_at = time.monotonic()
    workers = [pid for pid in descendants(job.process.pid)
               if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert workers, "no training worker found"
    for pid in workers:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
    assert job.finish() == 1, job.output[-4000:]
    stopped_after = time.monotonic() - refused_at
    output = job.output
    assert "could not be written to" in output and "trying again in 2 s (1 of 1)" in output
    assert re.search(r"train: error: training failed: .*CheckpointWriteError: the checkpoint at step 600 could not "
                     rf"be written \(2 tries\) on its way to run.storage_path {storage}: OSError: .*File too large",
                     output), output[-3000:]
    assert sorted(p.name for p in (storage / "full-disk").glob("checkpoint_0*")) == ["checkpoint_0000300"]
    listed = json.loads((storage / "full-disk" / "checkpoint_manager_snapshot.json").read_text())
    assert "checkpoint_0000600" not in json.dumps(listed)

    again = Job(*args)
    assert again.finish() == 0, again.output[-4000:]
    assert f"starting at step 300/{steps}" in again.output
    assert json.loads(again.output.split("train: done ", 1)[1].splitlines()[0])["step"] == steps
    print(f"figure: checkpoint write refused: the run stopped {stopped_after:.0f} s after the refusal began; resumed "
          f"at step 300, so {steps - 300} steps (all since the last checkpoint) were trained again")


STOP_PORTS = {"RAY_PORT": "6395", "RAY_DASHBOARD_PORT": "8279", "RAY_CLIENT_PORT": "20095", "MLFLOW_PORT": "5015"}


def test_ray_job_stop_leaves_a_resumable_run_and_the_same_submit_continues_it_in_the_same_mlflow_run(demo_set,
                                                                                                     tmp_path):
    """A one-node cluster/local.sh cluster with its MLflow server: a training job stopped with `ray job stop` after
    its first checkpoint is STOPPED, its MLflow run KILLED (not FAILED), its latest checkpoint whole; the same
    submit command resumes from that checkpoint and finishes the one MLflow run with every logged step once."""
    with local_cluster(tmp_path / "cluster", STOP_PORTS, "--workers", "0", "--head-cpus", "2") as cluster:
        env, storage, steps = cluster["env"], tmp_path / "runs", 1200
        submit = train_command(demo_set, storage, "stopped", "run.num_workers=1", "run.registered_model=null",
                               f"optim.steps={steps}", "schedule.log_every=50", "schedule.checkpoint_every=400",
                               f"schedule.sample_every={steps}")
        first = f"stopped-{uuid.uuid4().hex[:8]}"
        run([*submit[:3], "--no-wait", "--submission-id", first, *submit[3:]], env, timeout=120)
        deadline = time.monotonic() + 300
        while not (storage / "stopped" / "checkpoint_0000400" / "state.json").is_file():
            assert time.monotonic() < deadline, run([RAY, "job", "logs", first], env, timeout=60)[-3000:]
            time.sleep(0.5)
        before_stop = max((int(m) for m in re.findall(r"train: step (\d+) ", run([RAY, "job", "logs", first], env,
                                                                                   timeout=60))), default=0)
        run([RAY, "job", "stop", first], env, timeout=120)
        assert "was stopped" in run([RAY, "job", "status", first], env, timeout=60)
        logs = run([RAY, "job", "logs", first], env, timeout=60)
        assert "train: stopped (SIGTERM)" in logs and "is marked KILLED" in logs, logs[-3000:]
        client = mlflow.MlflowClient(cluster["exports"]["MLFLOW_TRACKING_URI"])
        [stopped] = client.search_runs([client.get_experiment_by_name("psunet").experiment_id])
        assert stopped.info.status == "KILLED"

        def latest_listed() -> int:
            snapshot = (storage / "stopped" / "checkpoint_manager_snapshot.json").read_text()
            return max(int(step) for step in re.findall(r"checkpoint_(\d{7})", snapshot))

        latest = latest_listed()
        assert (storage / "stopped" / f"checkpoint_{latest:07d}" / "model.safetensors").is_file()

        resumed = attempt(submit, env, timeout=400)
        if resumed.returncode != 0 and "Ray Train's controller failed" in resumed.stdout + resumed.stderr:
            # Ray Train's controller, not our code, failed (seen once in CI, not reproduced): the failure must say
            # so, and the same command, run again, must resume from the checkpoint it had reached
            print(f"warning: the resumed job's Ray Train controller failed; resubmitted:\n"
                  f"{errors_first(resumed.stdout + resumed.stderr)[-6000:]}")
            latest = latest_listed()
            resumed = attempt(submit, env, timeout=400)
        assert resumed.returncode == 0, errors_first(resumed.stdout + resumed.stderr)
        resumed = resumed.stdout
        assert f"starting at step {latest}/{steps}" in resumed
        assert summary_of(resumed)["step"] == steps
        [finished] = client.search_runs([client.get_experiment_by_name("psunet").experiment_id])
        assert finished.info.run_id == stopped.info.run_id and finished.info.status == "FINISHED"
        logged = [m.step for m in client.get_metric_history(finished.info.run_id, "loss")]
        assert sorted(logged) == list(range(50, steps + 1, 50))
        print(f"figure: ray job stop at about step {before_stop}: resumed at step {latest}, "
              f"{max(0, before_stop - latest)}+ steps trained again; MLflow KILLED, then FINISHED in the same run")
