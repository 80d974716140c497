"""jobs/tune.py on a real local Ray instance: refusals before any trial, an ASHA sweep of real training runs
(interrupted and continued) with nested MLflow runs and a best-config YAML that trains, and a guidance search."""

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from jobs.config import load_config
from clusters import local_cluster, summary_of
from jobs.train import main as train_main
from jobs.tune import SweepConfig, guidance_pairs, load_sweep, main as tune_main, parameter_count, trial_config

pytestmark = pytest.mark.ray


ROOT = Path(__file__).resolve().parent.parent


def sweep_file(tmp_path, demo_set, *overrides: str, **fields) -> str:
    """A sweep YAML over the tiny config on the demo shards, with these overrides too (lr 3e-3 vs 1e-7 unless
    `fields` say otherwise); its path."""
    tree = {"name": "sweep", "train_config": "configs/tiny.yaml",
            "overrides": [f"data.train={demo_set}/train", f"data.val={demo_set}/val", "run.num_workers=1",
                          "schedule.sample_every=1000", "schedule.demo_metrics=false", *overrides],
            "search": {"optim.lr": {"grid": [3.0e-3, 1.0e-7]}}, "storage_path": str(tmp_path / "runs"),
            "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def child_runs(client, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


# Not the defaults nor tests/test_cluster.py's ports, so neither is disturbed.
SWEEP_PORTS = {"RAY_PORT": "6393", "RAY_DASHBOARD_PORT": "8277", "RAY_CLIENT_PORT": "20093", "MLFLOW_PORT": "5013"}


@pytest.fixture(scope="module")
def sweep_cluster(tmp_path_factory):
    """A one-node cluster started by cluster/local.sh (2 CPUs): the environment of a driver that uses it.

    Sweeps with ASHA need the cluster's processes to know their own address: a stopped trial's Ray Train
    run is cleaned up through Ray's state API, which picks the wrong instance when several run here.
    """
    with local_cluster(tmp_path_factory.mktemp("sweep-cluster"), SWEEP_PORTS, "--workers", "0",
                       "--cpus-per-node", "2") as cluster:
        yield cluster["env"]


def run_tune(args: list[str], env: dict) -> dict:
    """jobs/tune.py as users run it: its own process, on the cluster `env` names; all it wrote (standard output,
    then standard error) and the summary it prints."""
    done = subprocess.run([sys.executable, "jobs/tune.py", *args], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr, _summary(done.stdout)


def interrupt_when_third_trial_starts(args: list[str], trials: Path, env: dict) -> subprocess.CompletedProcess:
    """Start the sweep, press Ctrl+C (SIGINT) once the third trial's training run has a folder; what it wrote
    (standard output and standard error together)."""
    sweep = subprocess.Popen([sys.executable, "jobs/tune.py", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(sweep.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 400  # a sweep that never gets there fails the test, not the suite
    while time.monotonic() < deadline and sweep.poll() is None:
        if trials.is_dir() and len(list(trials.iterdir())) >= 3:
            sweep.send_signal(signal.SIGINT)
            break
        time.sleep(0.5)
    else:
        sweep.kill()
    sweep.wait(timeout=300)
    reader.join(timeout=30)
    return subprocess.CompletedProcess(sweep.args, sweep.returncode, "".join(lines))


def test_asha_sweep_of_training_runs_is_interrupted_continued_and_writes_a_best_config_that_trains(
        tmp_path, demo_set, sweep_cluster, ray_local, capsys):
    # only lr 3e-3 learns anything in 20 steps: ASHA (grace 10) stops lr 1e-7 at step 10; the sweep is interrupted
    # during the third trial and continued (a restored ASHA starts its rungs afresh, so that trial runs to the end)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = sweep_file(tmp_path, demo_set, search={"optim.lr": {"grid": [3.0e-3, 1.0e-7, 3.0e-7]}},
                  scheduler={"type": "asha", "grace_period": 10, "reduction_factor": 2}, max_concurrent_trials=1)
    interrupted = interrupt_when_third_trial_starts(["train", "--sweep", path],
                                                  tmp_path / "runs" / "sweep" / "trials", sweep_cluster)
    assert interrupted.returncode == 130, interrupted.stdout[-6000:]
    assert "run the same command again to continue" in interrupted.stdout
    assert not (tmp_path / "runs" / "sweep" / "best.yaml").exists()

    output, summary = run_tune(["train", "--sweep", path], sweep_cluster)
    assert "continuing sweep" in output
    assert summary["trials"] == 3 and summary["errors"] == 0 and summary["stopped_early"] >= 1
    assert summary["best"] == {"optim.lr": 3.0e-3}
    table = pd.read_csv(summary["results"])
    assert sorted(table["optim.lr"]) == [1.0e-7, 3.0e-7, 3.0e-3]
    assert table.loc[table["optim.lr"] == 3.0e-3, "step"].item() == 20
    assert (table.loc[table["stopped_early"], "step"] == 10).all()
    assert table.loc[table["optim.lr"] == 3.0e-3, "val_loss"].item() < table["val_loss"].max()

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    children = child_runs(client, parent.info.run_id)
    assert len(children) == 3  # the trial interrupted mid-run kept its child run when it was continued
    assert table.loc[table["optim.lr"] == 1.0e-7, "stopped_early"].item()
    assert sorted(float(c.data.params["optim.lr"]) for c in children) == [1.0e-7, 3.0e-7, 3.0e-3]
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    assert {"results.csv", "best.yaml", "results.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    best = load_config(summary["best_yaml"])
    assert best.optim.lr == 3.0e-3
    capsys.readouterr()
    assert train_main(["--config", summary["best_yaml"], "optim.steps=6", "schedule.checkpoint_every=3",
                       f"run.storage_path={tmp_path / 'best'}", "run.name=best",
                       f"run.mlflow_tracking_uri=sqlite:///{tmp_path / 'best.db'}"]) == 0
    assert summary_of(capsys.readouterr().out)["step"] == 6  # trained in this process, on the session's Ray

    # the same sweep again continues the finished experiment (Tune restore): no new trials, no new child runs
    output, again = run_tune(["train", "--sweep", path], sweep_cluster)
    assert "continuing sweep" in output
    assert again["trials"] == 3 and again["best"] == summary["best"]
    assert len(child_runs(client, parent.info.run_id)) == 3


def _tune_here(args: list[str], capsys) -> tuple[str, dict]:
    """jobs/tune.py's main in this process, on the session's Ray instance: what it wrote and its summary."""
    assert tune_main(args) == 0
    out, err = capsys.readouterr()
    return out + err, _summary(out)


def _summary(out: str) -> dict:
    return json.loads(out.split("tune: done ", 1)[1].splitlines()[0])


@pytest.mark.parametrize("fields,message", [
    ({"search": {}}, "search space is empty"),
    ({"search": {"model.depth": {"grid": [1]}}}, "'model.depth' is not a training config field"),
    ({"search": {"optim.lr": {"grid": []}}}, "exactly one of"),
    ({"search": {"optim.lr": {"uniform": [1.0, 0.1]}}}, "low must be below high"),
    ({"search": {"model.width": {"uniform": [16, 64]}}}, "use grid, choice or randint"),
    ({"search": {"model.patch_size": {"grid": [1, 3]}}}, "not a valid model for these shards"),
    ({"search": {"model.word_dim": {"grid": [16, 24]}}}, "word_dim"),
    ({"search": {"model.shared_depth": {"grid": [1, 2]}}, "hold_parameters": True}, "derived"),
    ({"overrides": ["run.num_workers=8"]}, "the cluster has"),
    ({"search": {"eval.steps": {"grid": [0, 10]}}}, "eval.steps=0 is not a valid sampler setting"),
    ({"search": {"eval.steps": {"uniform": [1, 10]}}}, "eval.steps must list whole numbers"),
    ({"search": {"eval.guidance_scale": {"uniform": [-1, 3]}}}, "eval.guidance_scale=-1"),
    ({"evaluation": {"guidance_scales": [1, -2]}}, "guidance_scale_text"),
    ({"search": {"model.n_text+model.n_image": {"grid": [[1, 1], [2]]}}}, "needs 2 values per entry"),
    ({"search": {"model.n_text+model.depth": {"grid": [[1, 1]]}}}, "'model.depth' is not a training config field"),
    ({"search": {"model.n_text+model.shared_depth": {"grid": [[1, 1]]}}, "hold_parameters": True}, "derived"),
])
def test_a_sweep_that_cannot_work_is_refused_before_any_trial(tmp_path, demo_set, ray_local, capsys, fields, message):
    path = sweep_file(tmp_path, demo_set, **fields)
    if "overrides" in fields:  # keep the data paths
        tree = yaml.safe_load(open(path))
        tree["overrides"] = [f"data.train={demo_set}/train", f"data.val={demo_set}/val"] + fields["overrides"]
        open(path, "w").write(yaml.safe_dump(tree))
    assert tune_main(["train", "--sweep", path]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_holding_parameters_moves_layers_into_the_shared_section(demo_set):
    sweep = SweepConfig(name="hold", train_config="configs/demo.yaml", hold_parameters=True,
                        overrides=[f"data.train={demo_set}/train"], search={"model.n_text": {"grid": [0, 1, 2]}})
    base = parameter_count(load_config("configs/demo.yaml", [f"data.train={demo_set}/train"]).model)
    depths = []
    for n_text in (0, 1, 2):
        cfg = trial_config(sweep, {"model.n_text": n_text}, "t")
        depths.append(cfg.model.shared_depth)
        assert abs(parameter_count(cfg.model) - base) / base < 0.05
    assert depths[0] > depths[1] > depths[2]


def test_a_joint_dimension_sets_its_fields_together_at_constant_parameters():
    sweep = load_sweep("configs/sweeps/splits.yaml")
    splits = sweep.search["model.n_text+model.n_image"].grid
    assert [0, 0] in splits and [2, 4] in splits
    budget = parameter_count(load_config(sweep.train_config, sweep.overrides).model)
    depths = {}
    for split in splits:
        model = trial_config(sweep, {"model.n_text+model.n_image": split}, "t").model
        assert [model.n_text, model.n_image] == split
        assert parameter_count(model) == budget
        depths[tuple(split)] = model.shared_depth
    assert depths[(0, 0)] == 13 and depths[(2, 4)] == 1


def test_a_split_sweep_with_both_directions_as_objective(tmp_path, demo_set, ray_local, capsys):
    # both trials at once on the session's 2 CPUs, one checkpoint each
    path = sweep_file(tmp_path, demo_set, "run.cpus_per_worker=0.5", "schedule.checkpoint_every=20",
                      search={"model.n_text+model.n_image": {"grid": [[0, 0], [1, 1]]}},
                      hold_parameters=True, objective="accuracy",
                      evaluation={"guidance_scales": [1.0, 3.0], "steps": 2, "samples": 4})
    output, summary = _tune_here(["train", "--sweep", path], capsys)
    assert summary["trials"] == 2 and summary["errors"] == 0
    assert "sweep: 2/2 trials (100%)" in output  # not a terminal: a progress line when the last trial ends
    assert summary["best"]["model.n_text+model.n_image"] in ([0, 0], [1, 1])
    table = pd.read_csv(summary["results"])
    assert sorted(table["shared_depth"]) == [1, 5]  # tiny preset: (1, 1, 1) holds as many parameters as (0, 0, 5)
    for column in ("accuracy", "t2i_accuracy", "i2t_accuracy"):
        assert table[column].between(0, 1).all(), column
    assert (table["accuracy"] - (table["t2i_accuracy"] + table["i2t_accuracy"]) / 2).abs().max() < 1e-9
    assert set(table["t2i_guidance"]) <= {1.0, 3.0} and set(table["i2t_guidance"]) <= {1.0, 3.0}
    assert summary["best_accuracy"] == pytest.approx(table["accuracy"].max())
    assert Path(summary["plot"]).stat().st_size > 0


def test_guidance_search_needs_no_training(tiny_model, demo_set, tmp_path, ray_local, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["guidance", "--model", str(tiny_model), "--data", f"{demo_set}/val", "--guidance-scales", "1,3",
            "--steps", "2", "--schedulers", "dpmsolver++,ddim", "--samples", "8", "--storage-path",
            str(tmp_path), "--tracking-uri", uri]
    _, summary = _tune_here(args, capsys)
    table = pd.read_csv(summary["results"])
    assert len(table) == 4 and summary["metric"] == "t2i_all"
    # --guidance-scales alone: one scale for both modalities in every trial
    assert (table["guidance_scale_image"] == table["guidance_scale_text"]).all()
    assert set(zip(table["guidance_scale_image"], table["scheduler"])) == {
        (1.0, "dpmsolver++"), (3.0, "dpmsolver++"), (1.0, "ddim"), (3.0, "ddim")}
    assert table["t2i_all"].between(0, 1).all() and table["i2t_colour"].between(0, 1).all()
    assert set(summary["best"]) == {"guidance_scale_image", "guidance_scale_text", "steps", "scheduler", "t2i_all"}
    children = child_runs(mlflow.MlflowClient(uri), summary["mlflow_parent_run_id"])
    assert len(children) == 4
    assert all("t2i_all" in child.data.metrics for child in children)


def test_guidance_search_per_modality_is_a_grid_of_image_and_text_scales(tiny_model, demo_set, tmp_path, ray_local,
                                                                        capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["guidance", "--model", str(tiny_model), "--data", f"{demo_set}/val", "--guidance-scales", "2",
            "--guidance-scales-image", "1,4", "--steps", "2", "--schedulers", "ddim", "--samples", "4",
            "--storage-path", str(tmp_path), "--tracking-uri", uri]
    _, summary = _tune_here(args, capsys)
    table = pd.read_csv(summary["results"])
    # the image scales swept, the text keeps --guidance-scales
    assert sorted(zip(table["guidance_scale_image"], table["guidance_scale_text"])) == [(1.0, 2.0), (4.0, 2.0)]
    assert (summary["best"]["guidance_scale_image"], summary["best"]["guidance_scale_text"]) in {(1.0, 2.0),
                                                                                                  (4.0, 2.0)}
    params = sorted((float(c.data.params["guidance_scale_image"]), float(c.data.params["guidance_scale_text"]))
                    for c in child_runs(mlflow.MlflowClient(uri), summary["mlflow_parent_run_id"]))
    assert params == [(1.0, 2.0), (4.0, 2.0)]


def test_guidance_search_refuses_an_invalid_scale_before_loading_the_model(tmp_path, capsys):
    args = ["guidance", "--model", str(tmp_path / "nowhere"), "--data", str(tmp_path), "--guidance-scales-text",
            "1,-3", "--storage-path", str(tmp_path)]
    assert tune_main(args) == 2
    err = capsys.readouterr().err
    assert "guidance_scale_text" in err and "input_value=-3.0" in err and "guidance_scale_image" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("scales, image, text, pairs", [
    ("1,5:2", None, None, [(1.0, 1.0), (5.0, 2.0)]),
    ("2", "1,4", None, [(1.0, 2.0), (4.0, 2.0)]),
    ("1,3", "2", "1,5", [(2.0, 1.0), (2.0, 5.0)]),
])
def test_guidance_scales_take_image_text_pairs_as_evaluate_does(scales, image, text, pairs):
    args = argparse.Namespace(guidance_scales=scales, guidance_scales_image=image, guidance_scales_text=text)
    assert guidance_pairs(args) == pairs


def test_a_per_modality_guidance_sweep_refuses_pairs():
    with pytest.raises(ValueError, match="--guidance-scales-image takes one scale per value"):
        guidance_pairs(argparse.Namespace(guidance_scales="1", guidance_scales_image="3:1", guidance_scales_text=None))
