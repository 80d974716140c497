"""Losing a whole node, for real: a local cluster (cluster/local.sh) of a head with no CPU for training and two
one-CPU worker nodes, an elastic training job (run.num_workers=1-2) submitted with `ray job submit`, one worker
node killed (its raylet and every process it started, SIGKILL) at 40 % of the steps and started again later.

The job must carry on with the worker left (no spare CPU for a replacement), scale back to two workers when the
node returns, and finish with the exact step count, every step counted once, one MLflow run holding the resizes.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusters import SCRIPT, local_cluster, summary_of, train_command

PORTS = {"RAY_PORT": "6395", "RAY_DASHBOARD_PORT": "8279", "RAY_CLIENT_PORT": "20095", "MLFLOW_PORT": "5015"}
# Ray's autoscaling coordinator looks at the cluster every 20 s: the one-worker stretch (from 40 % of the
# steps to the end, about 80 s here on 2 cores) must last well over that for the job to grow back before it ends
STEPS, CHECKPOINT_EVERY, LOG_EVERY, BATCH, MAX_WORKERS = 300, 30, 10, 128, 2

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="local.sh finds its processes in /proc"),
]


def wait_for(condition, job, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert job.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds:.0f} s"
        time.sleep(0.5)


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in folder.glob("checkpoint_*") if (p / "state.json").is_file())


def test_losing_a_node_shrinks_the_job_and_its_return_grows_it_back(demo_set, tmp_path_factory, tmp_path):
    import mlflow

    storage, log_path = tmp_path / "runs", tmp_path / "job.log"
    with local_cluster(tmp_path_factory.mktemp("elastic"), PORTS, "--workers", "2", "--cpus-per-node", "1",
                       "--head-cpus", "0") as cluster:
        assert "Cluster up: 3 Ray nodes" in cluster["startup"]
        env = cluster["env"]
        command = train_command(demo_set, storage, "elastic", f"optim.steps={STEPS}", "optim.warmup_steps=10",
                                f"optim.batch_size={BATCH}", f"run.num_workers=1-{MAX_WORKERS}", "run.max_failures=3",
                                "run.resize_interval_s=5", "run.validation_resources={validation: 1}",
                                f"schedule.checkpoint_every={CHECKPOINT_EVERY}", f"schedule.log_every={LOG_EVERY}",
                                f"schedule.sample_every={STEPS}")
        with log_path.open("w") as sink:
            job = subprocess.Popen(command, env=env, cwd="/", stdout=sink, stderr=subprocess.STDOUT)
        try:
            run_folder = storage / "elastic"
            wait_for(lambda: any(s >= 0.4 * STEPS for s in checkpoint_steps(run_folder)), job, 400,
                     "checkpoint at 40 % of the steps")
            subprocess.run([str(SCRIPT), "node", "stop", "2"], env=env, check=True, timeout=60)
            lost_at = max(checkpoint_steps(run_folder))

            # training goes on with the one worker left; the node comes back while it trains
            wait_for(lambda: "rank 0 of 1" in log_path.read_text(), job, 300, "restart on one worker")
            shrunk_at = int(log_path.read_text().split("rank 0 of 1 on cpu, starting at step ")[1].split("/")[0])
            subprocess.run([str(SCRIPT), "node", "start", "2"], env=env, check=True, timeout=120)
            job.wait(timeout=600)
        finally:
            job.kill()
        logs = log_path.read_text()
        assert job.returncode == 0 and "succeeded" in logs, logs[-4000:]

        summary = summary_of(logs)
        assert summary["step"] == STEPS
        state = json.loads((Path(summary["checkpoint"]) / "state.json").read_text())
        # the global batch stays BATCH x MAX_WORKERS on one worker too (gradient accumulation): samples are
        # counted once per step, however often a step was replayed after a restart
        assert state["step"] == STEPS and state["samples_seen"] == STEPS * BATCH * MAX_WORKERS
        assert f"global batch {BATCH * MAX_WORKERS} as {MAX_WORKERS} micro-batch(es) of {BATCH} per worker" in logs
        assert "resized from 2 to 1 workers" in logs and "resized from 1 to 2 workers" in logs

        client = mlflow.MlflowClient(cluster["exports"]["MLFLOW_TRACKING_URI"])
        tracked = client.get_run(summary["run_id"])
        same_run = client.search_runs([tracked.info.experiment_id],
                                      filter_string=f"tags.`psunet.run` = '{run_folder}'")
        assert [r.info.run_id for r in same_run] == [summary["run_id"]]
        assert tracked.info.status == "FINISHED"

        loss_steps = [m.step for m in client.get_metric_history(summary["run_id"], "loss")]
        assert sorted(loss_steps) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), "a step logged twice or missing"
        starts = [(m.step, int(m.value)) for m in sorted(client.get_metric_history(summary["run_id"], "workers"),
                                                         key=lambda m: m.timestamp)]
        sizes = [size for _, size in starts]
        assert starts[0] == (0, 2) and sizes[-1] == 2 and 1 in sizes, starts
        one_worker = [step for step, size in starts if size == 1]
        # resumed from the last checkpoint committed before the node died (one being uploaded may be lost)
        assert one_worker[0] == shrunk_at and lost_at - CHECKPOINT_EVERY <= shrunk_at <= lost_at
        # the one worker trained and checkpointed before the group grew back
        regrown_at = starts[-1][0]
        assert shrunk_at < regrown_at < STEPS and regrown_at % CHECKPOINT_EVERY == 0
        resizes = tracked.data.tags["resizes"].split()
        assert resizes[0] == "0:2" and f"{shrunk_at}:1" in resizes and resizes[-1].endswith(":2")
        assert int(tracked.data.tags["restarts"]) == len(starts) - 1 >= 2
        # validation ran off the training path on the head's validation slot, for the final checkpoint too
        assert {m.step for m in client.get_metric_history(summary["run_id"], "val_loss")} >= {STEPS}
        assert "val_loss" in summary and summary["val_loss"] < float("inf")
