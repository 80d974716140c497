"""Ray Tune sweeps: where should the layers go, and at which guidance. Trials are real training runs.

    python jobs/tune.py train --sweep configs/sweeps/depths.yaml [--restart]
    python jobs/tune.py train --sweep configs/sweeps/splits.yaml     # (n_text, n_image) pairs, both directions
    python jobs/tune.py guidance --model MODEL --data data/demo/val --guidance-scales 1,2,3,5 \
        --steps 10,25 --schedulers dpmsolver++,ddim
    python jobs/tune.py guidance --model MODEL --data data/demo/val --guidance-scales-image 1,3,5 \
        --guidance-scales-text 1,3                               # a grid of image x text scales

`train`: each trial runs a driver function that builds and fits a TorchTrainer from jobs/training_run.py
(the Ray Train V2 pattern), so a trial may use several DDP workers; metrics reach Tune through
TuneReportCallback at every checkpoint. ASHA stops trials early on the mean training loss since the previous
checkpoint (held-out metrics come from validation tasks, after the report); `fifo` runs
the grid / random search to the end. The objective is the validation loss or, on demo data, text->image
and/or image->text accuracy, each direction at the trial's best guidance scale. A search key "a+b" is one
dimension setting fields a and b together (a grid of pairs, not their product). Running the same sweep name again
continues an interrupted sweep (Tune's restore); --restart starts it over.
`guidance`: no training, every (guidance scales, steps, scheduler) is a trial of the evaluation.
--guidance-scales gives each trial one scale for both modalities or an image:text pair (1,3,5:2);
--guidance-scales-image / --guidance-scales-text replace it for their modality and make the sweep a grid of
image x text scales.
MLflow: one parent run per sweep, a nested child run per trial; the results table (CSV), a plot
(PNG) and the best configuration as a training YAML go to the parent run and next to the sweep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from pydantic import Field, ValidationError, model_validator  # noqa: E402
from ray.tune import Callback  # noqa: E402

from jobs.config import TrainJobConfig, load_config  # noqa: E402
from jobs import tracking  # noqa: E402
from jobs.tracking import tracking_uri  # noqa: E402
from psunet.config import StrictModel  # noqa: E402
from psunet.progress import progress  # noqa: E402
from psunet.settings import SamplerSettings, parse_guidance  # noqa: E402

EVAL_KEYS = {"eval.guidance_scale": "guidance_scale", "eval.steps": "steps"}  # searched SamplerSettings fields
SWEEP_TAG = "psunet.sweep"
# a trial's driver only waits on its TorchTrainer; Tune refuses an empty resource request, so it asks for a sliver
DRIVER_CPU = 0.01
ENDED = ("TERMINATED", "ERROR")  # the statuses of a trial that will not run again


class ParamSpec(StrictModel):
    """One search dimension: exactly one of the fields."""

    grid: list | None = None
    choice: list | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="integers in [low, high], both included")

    @model_validator(mode="after")
    def _one(self) -> "ParamSpec":
        given = [name for name in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform, randint (non-empty)")
        for name in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, name)
            if bounds and not bounds[0] < bounds[1] + (name == "randint"):
                raise ValueError(f"{name}: low must be below high, got {list(bounds)}")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform: bounds must be > 0")
        return self

    def values(self) -> list | None:
        """Every value this dimension can take, when that is a finite list."""
        if self.grid or self.choice:
            return list(self.grid or self.choice)
        if self.randint:
            return list(range(self.randint[0], self.randint[1] + 1))
        return None

    def tune_domain(self):
        from ray import tune

        if self.grid:
            return tune.grid_search(self.grid)
        if self.choice:
            return tune.choice(self.choice)
        if self.uniform:
            return tune.uniform(*self.uniform)
        if self.loguniform:
            return tune.loguniform(*self.loguniform)
        return tune.randint(self.randint[0], self.randint[1] + 1)


class SchedulerSpec(StrictModel):
    type: Literal["asha", "fifo"] = "fifo"
    grace_period: int = Field(10, ge=1, description="steps every trial runs before ASHA may stop it")
    reduction_factor: float = Field(2, gt=1)


class EvaluationSpec(StrictModel):
    guidance_scales: list[float] = Field(default_factory=lambda: [1.0, 3.0], min_length=1)
    steps: int = Field(10, description="sampler steps")
    samples: int = Field(32, ge=1, description="held-out prompts per guidance scale")

    @model_validator(mode="after")
    def _sampler_settings(self) -> "EvaluationSpec":
        """Every evaluation setting must be valid SamplerSettings."""
        for scale in self.guidance_scales:
            SamplerSettings(guidance_scale=scale, steps=self.steps)
        return self


class SweepConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    train_config: str = Field(description="training YAML every trial starts from")
    overrides: list[str] = Field(default_factory=list, description="section.field=value for every trial")
    search: dict[str, ParamSpec]
    num_samples: int = Field(1, ge=1, description="repeats of the grid / random draws")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    objective: Literal["val_loss", "t2i_accuracy", "i2t_accuracy", "accuracy"] = Field(
        "val_loss", description="demo data: t2i_accuracy / i2t_accuracy (each direction at its best guidance "
        "scale) or accuracy (their mean)")
    hold_parameters: bool = Field(False, description="pick model.shared_depth so every trial has about the "
                                                     "base config's parameter count")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster fits")
    storage_path: str = "runs"
    experiment: str = "psunet-tune"
    mlflow_tracking_uri: str | None = None

    @model_validator(mode="after")
    def _search(self) -> "SweepConfig":
        if not self.search:
            raise ValueError("search: the search space is empty")
        if self.hold_parameters and "model.shared_depth" in searched_fields(self.search):
            raise ValueError("search: model.shared_depth cannot be searched with hold_parameters (it is derived)")
        return self


def searched_fields(search: dict) -> list[str]:
    """Every config field a search space sets: a key "a+b" is one dimension setting fields a and b together."""
    return [field for key in search for field in key.split("+")]


def field_values(values: dict) -> dict:
    """A trial's values per field: a joint dimension's value (a list) spread over its fields."""
    spread = {}
    for key, value in values.items():
        fields = key.split("+")
        if len(fields) == 1:
            spread[key] = value
        elif not isinstance(value, (list, tuple)) or len(value) != len(fields):
            raise ValueError(f"search: {key} needs {len(fields)} values per entry, got {value!r}")
        else:
            spread.update(zip(fields, value))
    return spread


def load_sweep(path: str) -> SweepConfig:
    if not Path(path).is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    tree = yaml.safe_load(Path(path).read_text())
    if not isinstance(tree, dict):
        raise ValueError(f"sweep file {path} must hold a mapping")
    try:
        return SweepConfig.model_validate(tree)
    except ValidationError as exc:
        raise ValueError(f"invalid sweep {path}:\n{exc}") from exc


def parameter_count(model_config) -> int:
    import torch

    from psunet.model import PSUNet

    with torch.device("meta"):
        return sum(p.numel() for p in PSUNet(model_config).parameters())


def trial_config(sweep: SweepConfig, values: dict, run_name: str) -> TrainJobConfig:
    """The training config of one trial: base YAML, sweep overrides, the trial's values (eval.* left out)."""
    overrides = list(sweep.overrides) + [f"{key}={json.dumps(value)}" for key, value in field_values(values).items()
                                         if key not in EVAL_KEYS]
    cfg = load_config(sweep.train_config, overrides + [f"run.name={run_name}"])
    if sweep.hold_parameters:
        target = parameter_count(load_config(sweep.train_config, sweep.overrides).model)
        best = min(range(1, 4 * cfg.model.shared_depth + 9, 2),  # odd: in-blocks + mid + out-blocks
                   key=lambda depth: abs(parameter_count(cfg.model.model_copy(update={"shared_depth": depth}))
                                         - target))
        cfg = load_config(sweep.train_config, overrides + [f"run.name={run_name}", f"model.shared_depth={best}"])
    return cfg


def check_sweep(sweep: SweepConfig, cluster: dict) -> TrainJobConfig:
    """Refuse, before any trial starts, a search space that cannot work; return the base config."""
    from psunet.data import load_manifest

    base = load_config(sweep.train_config, sweep.overrides).resolved()
    known = set(TrainJobConfig.model_json_schema()["properties"])
    for key, spec in sweep.search.items():
        for name in key.split("+"):
            section, _, field = name.partition(".")
            if name in EVAL_KEYS:
                continue
            if section not in known or field not in type(getattr(base, section)).model_fields:
                raise ValueError(f"search: {name!r} is not a training config field (nor {' or '.join(EVAL_KEYS)})")
            if section == "model" and spec.values() is None:
                raise ValueError(f"search: {key} is a model shape; use grid, choice or randint, not a continuous range")
        if "+" in key:
            for value in spec.values() or []:
                field_values({key: value})
    check_evaluation_search(sweep)
    structural = {key: spec.values() for key, spec in sweep.search.items() if key.startswith("model.")}
    manifest = load_manifest(base.data.train)
    for combination in itertools.product(*structural.values()):
        values = dict(zip(structural, combination))
        try:
            cfg = trial_config(sweep, values, "check")
            manifest.check_model(cfg.model)
        except ValueError as exc:
            raise ValueError(f"search: the trial {values} is not a valid model for these shards: {exc}") from None
    wanted_cpus = base.run.max_workers * base.run.cpus_per_worker + DRIVER_CPU
    if wanted_cpus > cluster.get("CPU", 0):
        raise ValueError(f"run.num_workers={base.run.num_workers} x cpus_per_worker={base.run.cpus_per_worker} "
                         f"needs {wanted_cpus:g} CPUs per trial (with its driver); the cluster has {cluster.get('CPU', 0):g}")
    if base.run.use_gpu and base.run.max_workers > cluster.get("GPU", 0):
        raise ValueError(f"run.num_workers={base.run.num_workers} GPU workers per trial; the cluster has "
                         f"{cluster.get('GPU', 0):g} GPUs")
    return base


def check_evaluation_search(sweep: SweepConfig) -> None:
    """Refuse searched evaluation settings the sampler cannot use: every listed value (or range bound) must
    make valid SamplerSettings, and eval.steps must list its values."""
    if "eval.steps" in sweep.search and sweep.search["eval.steps"].values() is None:
        raise ValueError("search: eval.steps must list whole numbers (grid, choice or randint)")
    for key, field in EVAL_KEYS.items():
        spec = sweep.search.get(key)
        for value in (spec.values() or [*(spec.uniform or spec.loguniform)]) if spec else []:
            try:
                SamplerSettings(**{field: value})
            except ValidationError as exc:
                raise ValueError(f"search: {key}={value!r} is not a valid sampler setting:\n{exc}") from None


def concurrent_trials(sweep: SweepConfig, base: TrainJobConfig, cluster: dict) -> int:
    per_trial = base.run.max_workers * base.run.cpus_per_worker + DRIVER_CPU
    fits = int(cluster.get("CPU", 0) // per_trial)
    if base.run.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0) // base.run.max_workers))
    return max(1, min(sweep.max_concurrent_trials or fits, fits))


def demo_accuracy(model_folder: str, val: str, evaluation: EvaluationSpec, guidance_scales: list[float],
                  steps: int) -> dict:
    """Text->image and image->text accuracy (mean over the attributes) of held-out pairs at each guidance
    scale, each direction at its best scale, and the mean of the two bests ("accuracy")."""
    from jobs.quality import guidance_sweep, held_out_pairs, sweep_metrics
    from psunet.pipeline import PSUNetPipeline

    prompts, latents = held_out_pairs(val, evaluation.samples)
    sweep = guidance_sweep(PSUNetPipeline.from_pretrained(model_folder), prompts, latents, guidance_scales,
                           SamplerSettings(steps=steps))
    return {"accuracy": (sweep["t2i"]["best"] + sweep["i2t"]["best"]) / 2, **sweep_metrics(sweep)}


def train_trial(config: dict, sweep: dict, parent_run_id: str) -> None:
    """One Tune trial: a full training run (TorchTrainer.fit) logged as a nested MLflow run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.training_run import make_trainer, mlflow_run

    sweep = SweepConfig.model_validate(sweep)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(sweep, config, f"{sweep.name}-{trial_id}")
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={
        "storage_path": str(Path(sweep.storage_path) / sweep.name / "trials"),
        "mlflow_tracking_uri": tracking_uri(sweep.mlflow_tracking_uri, sweep.storage_path),
        "experiment": sweep.experiment})}).resolved()
    run_id = mlflow_run(cfg, parent=parent_run_id, tags={"psunet.trial": trial_id})
    result = make_trainer(cfg, run_id, callbacks=[TuneReportCallback()]).fit()
    final = {"step": result.metrics["step"], "parameters": parameter_count(cfg.model),
             "shared_depth": cfg.model.shared_depth, "val_loss": result.metrics.get("val_loss"),
             "loss_mean": result.metrics.get("loss_mean")}
    wants_accuracy = sweep.objective != "val_loss" or any(key in config for key in EVAL_KEYS)
    if wants_accuracy:
        from psunet.model_folder import bundle

        folder = bundle(result.checkpoint.path, Path(cfg.run.storage_path) / cfg.run.name / "model")
        scales = [config["eval.guidance_scale"]] if "eval.guidance_scale" in config \
            else sweep.evaluation.guidance_scales
        final.update(demo_accuracy(str(folder), cfg.data.val or cfg.data.train, sweep.evaluation, scales,
                                   int(config.get("eval.steps", sweep.evaluation.steps))))
    client = tracking.client(cfg.run.mlflow_tracking_uri)
    tracking.log_metrics(client, run_id, {k: v for k, v in final.items() if isinstance(v, (int, float))},
                         final["step"])
    client.set_terminated(run_id)
    ray.tune.report(final)


def parent_run(name: str, storage_path: str, experiment_name: str, uri: str, kind: str, params: dict) -> str:
    """The sweep's MLflow parent run: found by tag when the sweep is resumed, created otherwise."""
    return tracking.find_or_create_run(tracking.client(uri), experiment_name, storage_path, SWEEP_TAG,
                                       f"{Path(storage_path).resolve()}/{name}", name, params=params,
                                       tags={"psunet.kind": kind})


def results_table(grid, columns: list[str]):
    """One row per trial: its searched values and its last reported metrics."""
    import pandas as pd

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        row = {"trial_id": metrics.get("trial_id", Path(result.path).name if result.path else None),
               **{key: value for key, value in (result.config or {}).items()},
               **{key: metrics.get(key) for key in columns},
               "error": type(result.error).__name__ if result.error else None}
        rows.append(row)
    return pd.DataFrame(rows)


def plot_results(table, x_keys: list[str], metric: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_keys = [key for key in x_keys if key in table.columns and table[key].notna().any()]
    if not x_keys or metric not in table.columns or table[metric].isna().all():
        return None
    figure, axes = plt.subplots(1, len(x_keys), figsize=(4.5 * len(x_keys), 4), squeeze=False)
    for axis, key in zip(axes[0], x_keys):
        numeric = all(isinstance(value, (int, float)) for value in table[key].dropna())
        axis.scatter(table[key] if numeric else table[key].map(str), table[metric])  # joint dimensions: labels
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_best_yaml(sweep: SweepConfig, best_values: dict, path: Path) -> Path:
    """The best trial's training config as a YAML that jobs/train.py accepts."""
    cfg = trial_config(sweep, best_values, f"{sweep.name}-best")
    tree = cfg.model_dump(mode="json")
    path.write_text(f"# best trial of sweep {sweep.name} ({', '.join(f'{k}={v}' for k, v in best_values.items())})\n"
                    + yaml.safe_dump(tree, sort_keys=False))
    return path


def run_train_sweep(sweep: SweepConfig, restart: bool = False) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    ray.init(ignore_reinit_error=True)
    cluster = ray.cluster_resources()
    base = check_sweep(sweep, cluster)
    uri = tracking_uri(sweep.mlflow_tracking_uri, sweep.storage_path)
    data = [f"data.train={base.data.train}"] + ([f"data.val={base.data.val}"] if base.data.val else [])
    sweep = sweep.model_copy(update={"mlflow_tracking_uri": uri,  # trials run in their own folders: absolute paths
                                     "storage_path": str(Path(sweep.storage_path).expanduser().resolve()),
                                     "train_config": str(Path(sweep.train_config).resolve()),
                                     "overrides": [*sweep.overrides, *data]})
    folder = Path(sweep.storage_path) / sweep.name
    if restart and folder.exists():
        import shutil

        shutil.rmtree(folder)
    parent = parent_run(sweep.name, sweep.storage_path, sweep.experiment, uri, "train",
                        {"sweep": sweep.model_dump_json()})
    trainable = tune.with_resources(tune.with_parameters(train_trial, sweep=sweep.model_dump(mode="json"),
                                                         parent_run_id=parent), {"CPU": DRIVER_CPU})
    steps = base.optim.steps
    # max_t past the last step: ASHA stops a trial that reaches max_t at once, which would kill its driver
    # before the final evaluation and report
    scheduler = ASHAScheduler(time_attr="step", metric="loss_mean", mode="min", max_t=steps + 1,
                              grace_period=min(sweep.scheduler.grace_period, steps),
                              reduction_factor=sweep.scheduler.reduction_factor) \
        if sweep.scheduler.type == "asha" else FIFOScheduler()
    tuner_path = str(folder / "tune")
    if tune.Tuner.can_restore(tuner_path):
        print(f"tune: continuing sweep {sweep.name!r} from {tuner_path}", flush=True)
        tuner = tune.Tuner.restore(tuner_path, trainable=trainable, resume_errored=True)
    else:
        concurrency = concurrent_trials(sweep, base, cluster)
        print(f"tune: sweep {sweep.name!r}: {len(sweep.search)} searched field(s), up to {concurrency} trial(s) at "
              f"once, {sweep.scheduler.type}; MLflow {uri} parent run {parent}", flush=True)
        tuner = tune.Tuner(
            trainable, param_space={key: spec.tune_domain() for key, spec in sweep.search.items()},
            tune_config=tune.TuneConfig(num_samples=sweep.num_samples, scheduler=scheduler,
                                        max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name="tune", storage_path=str(folder), callbacks=[TrialProgress("sweep")]))
    grid = check_complete(tuner.fit(), sweep.num_samples * math.prod(
        len(spec.grid) for spec in sweep.search.values() if spec.grid is not None))
    return finish(sweep, grid, parent, uri, folder, steps)


class TrialProgress(Callback):
    """The sweep's trials ended so far, as a bar on a terminal or a line now and then (psunet.progress), with
    the running and errored counts beside it. Trials a restored sweep had already ended count from the start."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __getstate__(self) -> dict:  # Tune saves its callbacks with the sweep; the bar stays in this process
        return {"desc": self.desc, "bar": None}

    def setup(self, total_num_samples: int | None = None, **info) -> None:
        self.bar = progress(total=total_num_samples, desc=self.desc, unit="trials")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.bar is not None:
            self.count(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        if self.bar is not None:
            self.count(trials)
            self.bar.close()

    def count(self, trials: list) -> None:
        statuses = [trial.status for trial in trials]
        ended = sum(status in ENDED for status in statuses)
        self.bar.note(f"{statuses.count('RUNNING')} running, {statuses.count('ERROR')} errored")
        if ended > self.bar.done:
            self.bar.update(ended - self.bar.done)


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended (Ctrl+C / SIGINT); its state is saved for a restart."""


def check_complete(grid, expected_trials: int):
    """The finished sweep's results, or SweepInterrupted when some trials never ran to their end.

    After Ctrl+C Tune marks the trial it stopped as terminated in memory, but the experiment state it saved
    (what a restart continues from) still lists it as pending: that saved state is the one to trust.
    """
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(grid.experiment_path).trials
    ended = sum(trial.status in ENDED for trial in saved)
    if ended < expected_trials:
        raise SweepInterrupted(f"interrupted with {ended} of {expected_trials} trials ended; run the same command "
                               "again to continue (finished trials are kept, the others start again, a training "
                               "run from its last checkpoint)")
    return grid


def finish(sweep: SweepConfig, grid, parent: str, uri: str, folder: Path, steps: int) -> dict:
    metric, mode = (sweep.objective, "min" if sweep.objective == "val_loss" else "max")
    columns = ["step", "val_loss", "parameters", "shared_depth", "accuracy", "t2i_accuracy", "t2i_guidance",
               "i2t_accuracy", "i2t_guidance"]
    table = results_table(grid, columns)
    table["stopped_early"] = table["step"].fillna(0) < steps
    table_path = folder / "results.csv"
    table.to_csv(table_path, index=False)
    plot = plot_results(table, list(sweep.search), metric, folder / "results.png")
    finished = table[table["error"].isna() & table[metric].notna()]
    if finished.empty:
        raise RuntimeError(f"sweep {sweep.name}: no trial reported {metric}")
    best_row = finished.sort_values(metric, ascending=mode == "min").iloc[0]
    best_values = {key: _plain(best_row[key]) for key in sweep.search}
    best_yaml = write_best_yaml(sweep, best_values, folder / "best.yaml")
    client = tracking.client(uri)
    experiment = client.get_run(parent).info.experiment_id
    for child in client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        if child.info.status == "RUNNING":  # stopped by ASHA (or failed): its driver never closed the run
            client.set_terminated(child.info.run_id, status="KILLED")
    for path in (table_path, plot, best_yaml):
        if path:
            client.log_artifact(parent, str(path))
    tracking.log_metrics(client, parent, {f"best_{metric}": float(best_row[metric])})
    client.set_terminated(parent)
    summary = {"sweep": sweep.name, "trials": len(table), "stopped_early": int(table["stopped_early"].sum()),
               "errors": int(table["error"].notna().sum()), "best": best_values, f"best_{metric}": float(best_row[metric]),
               "best_yaml": str(best_yaml), "results": str(table_path), "plot": str(plot) if plot else None,
               "mlflow_parent_run_id": parent}
    return summary


def _plain(value):
    """numpy scalars from the results table -> Python numbers (for YAML and JSON)."""
    return value.item() if hasattr(value, "item") else value


def guidance_pairs(args) -> list[tuple[float, float]]:
    """The sweep's (image, text) guidance scales: --guidance-scales (one scale for both modalities, or image:text
    pairs) or, with --guidance-scales-image / --guidance-scales-text, the grid of image x text scales, the
    modality not given keeping --guidance-scales."""
    both = [scale if isinstance(scale, tuple) else (scale, scale) for scale in parse_guidance(args.guidance_scales)]
    if args.guidance_scales_image is None and args.guidance_scales_text is None:
        return both
    axes = []
    for index, modality in enumerate(("image", "text")):
        given = getattr(args, f"guidance_scales_{modality}")
        scales = [pair[index] for pair in both] if given is None else parse_guidance(given)
        if any(isinstance(scale, tuple) for scale in scales):
            raise ValueError(f"--guidance-scales-{modality} takes one scale per value, got {given!r}")
        axes.append(list(dict.fromkeys(scales)))
    return list(itertools.product(*axes))


def trial_settings(config: dict) -> dict:
    """A guidance trial's config as SamplerSettings fields."""
    image, text = config["guidance"]
    return {"guidance_scale_image": image, "guidance_scale_text": text, "steps": config["steps"],
            "scheduler": config["scheduler"]}


def guidance_space(args) -> tuple[dict, int]:
    """Tune's grid for the guidance sweep and its number of trials; every setting is checked first."""
    from ray import tune

    from jobs.sampler_options import int_list

    pairs = guidance_pairs(args)
    steps, schedulers = int_list(args.steps), [s for s in args.schedulers.split(",") if s]
    if not pairs or not steps or not schedulers:
        raise ValueError("guidance search: the guidance scales, --steps and --schedulers each need a value")
    for pair, count, scheduler in itertools.product(pairs, steps, schedulers):
        SamplerSettings(**trial_settings({"guidance": pair, "steps": count, "scheduler": scheduler}))
    space = {"guidance": tune.grid_search(pairs), "steps": tune.grid_search(steps),
             "scheduler": tune.grid_search(schedulers)}
    return space, len(pairs) * len(steps) * len(schedulers)


def guidance_trial(config: dict, pipe, data: str, samples: int, demo: bool, parent_run_id: str, uri: str,
                   experiment: str, storage: str) -> None:
    """One sampler setting (guidance scales, steps, scheduler) of a trained model, evaluated on held-out samples."""
    import ray.tune

    from jobs.quality import combine, evaluate_group

    fields = trial_settings(config)
    setting = SamplerSettings.model_validate(fields)
    group = evaluate_group(pipe, data, 0, 1, samples, [setting], demo=demo, want_images=False, batch_size=64)
    metrics = combine([group], [setting], demo, None)[0]["metrics"]
    client = tracking.client(uri)
    run_id = tracking.create_run(client, experiment, storage,
                                 f"image{setting.guidance_scale_image:g}-text{setting.guidance_scale_text:g}-"
                                 f"steps{setting.steps}-{setting.scheduler}", params=fields, parent=parent_run_id)
    tracking.log_metrics(client, run_id, metrics)
    client.set_terminated(run_id)
    ray.tune.report(metrics)


def run_guidance_sweep(args) -> dict:
    import ray
    from ray import tune

    from jobs.model_ref import load_pipeline
    from jobs.quality import held_out_captions, is_demo_data
    from psunet.data import load_manifest

    space, trials = guidance_space(args)
    pipe = load_pipeline(args.model, device="cpu", tracking_uri=args.tracking_uri)
    load_manifest(args.data).check_model(pipe.model_config)
    uri = tracking_uri(args.tracking_uri, args.storage_path)
    folder = Path(args.storage_path).resolve() / args.name
    parent = parent_run(args.name, args.storage_path, args.experiment, uri, "guidance",
                        {"model": args.model, "data": args.data})
    ray.init(ignore_reinit_error=True)
    trainable = tune.with_parameters(guidance_trial, pipe=pipe, data=str(Path(args.data).resolve()),
                                     samples=args.samples, demo=is_demo_data(held_out_captions(args.data, 64)), parent_run_id=parent, uri=uri,
                                     experiment=args.experiment, storage=str(Path(args.storage_path).resolve()))
    tuner_path = str(folder / "tune")
    if tune.Tuner.can_restore(tuner_path):
        tuner = tune.Tuner.restore(tuner_path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=space, run_config=tune.RunConfig(
            name="tune", storage_path=str(folder), callbacks=[TrialProgress("guidance sweep")]))
    grid = check_complete(tuner.fit(), trials)
    metric = "t2i_all" if any((r.metrics or {}).get("t2i_all") is not None for r in grid) else "bleu4"
    import pandas as pd

    table = pd.DataFrame([{**trial_settings(r.config), **{k: v for k, v in (r.metrics or {}).items()
                                          if k.startswith(("t2i_", "i2t_", "joint_", "bleu", "rouge"))}}
                          for r in grid if not r.error])
    table_path = folder / "results.csv"
    table.to_csv(table_path, index=False)
    plot = plot_results(table, ["guidance_scale_image", "guidance_scale_text", "steps"], metric,
                        folder / "results.png")
    best = table.sort_values(metric, ascending=False).iloc[0]
    client = tracking.client(uri)
    for path in (table_path, plot):
        if path:
            client.log_artifact(parent, str(path))
    client.set_terminated(parent)
    return {"sweep": args.name, "trials": len(table), "metric": metric,
            "best": {**{key: _plain(best[key]) for key in trial_settings(grid[0].config)},
                     metric: float(best[metric])},
            "results": str(table_path), "plot": str(plot) if plot else None, "mlflow_parent_run_id": parent}


def build_parser() -> argparse.ArgumentParser:
    """The command line: its options and their help."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="a sweep of training runs")
    train.add_argument("--sweep", required=True, help="sweep YAML (see configs/sweeps/)")
    train.add_argument("--restart", action="store_true", help="start the sweep over instead of continuing it")
    guidance = commands.add_parser("guidance", help="guidance scales x steps x scheduler for a trained model")
    guidance.add_argument("--model", required=True)
    guidance.add_argument("--data", required=True, help="held-out shard folder")
    guidance.add_argument("--name", default="guidance")
    guidance.add_argument("--guidance-scales", default="1,2,3,5",
                          help="per trial one scale for both modalities, or image:text (e.g. 1,3,5:2)")
    for modality in ("image", "text"):
        guidance.add_argument(f"--guidance-scales-{modality}",
                              help=f"{modality} scales in place of --guidance-scales: a grid of image x text scales")
    guidance.add_argument("--steps", default="10,25")
    guidance.add_argument("--schedulers", default=SamplerSettings.model_fields["scheduler"].default)
    guidance.add_argument("--samples", type=int, default=64)
    guidance.add_argument("--storage-path", default="runs")
    guidance.add_argument("--experiment", default="psunet-tune")
    guidance.add_argument("--tracking-uri")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        summary = run_train_sweep(load_sweep(args.sweep), args.restart) if args.command == "train" \
            else run_guidance_sweep(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2
    except SweepInterrupted as exc:
        print(f"tune: {exc}", file=sys.stderr)
        return 130
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print("tune: done " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    # run from the imported module, so that Tune pickles the trial functions by reference, not from __main__
    from jobs.tune import main as module_main

    sys.exit(module_main())
