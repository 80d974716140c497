"""Train PS-U-Net on Ray Train (V2 API): DDP workers stream shards; checkpoints, resume, MLflow.

    python jobs/train.py --config configs/demo.yaml [section.field=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml
    python jobs/train.py --config configs/demo.yaml --init-from runs/demo/model --experts 2 optim.steps=500

--init-from starts from a trained model's weights (fine-tuning). With --experts K (or --intervals
0:300,300:1000) the base is copied into K experts (eDiff-I), each fine-tuned on its interval of
diffusion times only, as K concurrent Ray Train runs; the finished experts are assembled into one
model folder that sampling, evaluation and serving load like any other.

Re-running the same command (same run.name and run.storage_path) resumes from the latest
checkpoint and logs into the same MLflow run. A worker that dies is restarted from the last
checkpoint (run.max_failures times). With run.num_workers=2-8 the run is elastic: it goes on with
the workers left when a node is lost and grows back when capacity returns, the global batch kept by
gradient accumulation. Checkpoints upload in the background to run.storage_path (a folder or a
storage URI) and are validated by Ray tasks beside the workers (run.validation_resources).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from jobs.config import TrainJobConfig, load_config  # noqa: E402
from jobs import tracking  # noqa: E402
from jobs.training_run import TrainingFailed, Validator, make_trainer, mlflow_run, preflight, run  # noqa: E402
from psunet.experts import binary_split, check_intervals, parse_intervals  # noqa: E402
from psunet.model_folder import assemble_experts, load_model  # noqa: E402


def expert_configs(cfg: TrainJobConfig, intervals: list[tuple[int, int]]) -> list[TrainJobConfig]:
    """One branch run per expert: named <run>-expert<i>, trained on its interval only."""
    return [cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"name": f"{cfg.run.name}-expert{i}"}),
        "branch": cfg.branch.model_copy(update={"time_range": tuple(interval)})})
        for i, interval in enumerate(intervals)]


def _fit_expert(config: dict, run_id: str) -> tuple[str, dict]:
    """A Ray task: one expert's TorchTrainer, fitted; returns (final checkpoint path, last metrics)."""
    result = make_trainer(TrainJobConfig.model_validate(config), run_id).fit()
    if result.error:
        raise result.error
    return result.checkpoint.path, result.metrics


def run_experts(cfg: TrainJobConfig, intervals: list[tuple[int, int]]):
    """Branch training: K concurrent Ray Train runs (one MLflow child run each), then one assembled model."""
    import ray

    cfg = cfg.resolved()
    preflight(cfg)
    intervals = check_intervals(intervals, cfg.diffusion.num_train_timesteps)
    Path(cfg.run.storage_path).mkdir(parents=True, exist_ok=True)
    parent = mlflow_run(cfg)
    client = tracking.client(cfg.run.mlflow_tracking_uri)
    tracking.log_params(client, parent, {"experts.intervals": json.dumps(intervals)})
    branches = expert_configs(cfg, intervals)
    ray.init(ignore_reinit_error=True)
    fit = ray.remote(num_cpus=0)(_fit_expert)
    print(f"train: {len(branches)} experts from {cfg.branch.init_from}, intervals {intervals}, "
          f"{cfg.optim.steps} steps each -> {cfg.run.storage_path}/{cfg.run.name}-expert<i>; "
          f"MLflow {cfg.run.mlflow_tracking_uri} run {parent}", flush=True)
    pending = {fit.remote(branch.model_dump(mode="json"),
                          mlflow_run(branch, parent=parent)): i
               for i, branch in enumerate(branches)}
    finished: dict[int, tuple[str, dict]] = {}
    while pending:
        [done], _ = ray.wait(list(pending))
        i = pending.pop(done)
        finished[i] = ray.get(done)
        print(f"train: expert {i} {list(intervals[i])} done at step {finished[i][1].get('step')}, "
              f"val_loss={finished[i][1].get('val_loss', float('nan')):.4g}", flush=True)
    model_folder = assemble_experts([finished[i][0] for i in range(len(branches))], intervals,
                                    Path(cfg.run.storage_path) / cfg.run.name / "model")
    metrics = evaluate_ensemble(cfg, model_folder, client, parent)
    client.log_artifacts(parent, str(model_folder), "model")
    client.set_terminated(parent)
    return finished, parent, model_folder, metrics


def evaluate_ensemble(cfg: TrainJobConfig, model_folder: Path, client, run_id: str) -> dict[str, float]:
    """Validation loss over all times and sample grids of the assembled ensemble, logged to the parent run."""
    ensemble = load_model(model_folder)[0]
    validator = Validator(cfg.model_copy(update={"branch": cfg.branch.model_copy(update={"time_range": None})}),
                          torch.device("cpu"))
    metrics = validator.loss(ensemble)
    with tempfile.TemporaryDirectory() as folder:
        metrics.update(validator.samples(ensemble, Path(folder)))
        client.log_artifacts(run_id, folder, "samples/ensemble")
    tracking.log_metrics(client, run_id, metrics)
    return metrics


def location(cfg: TrainJobConfig, checkpoint) -> str:
    """Where a checkpoint is: a folder, or a URI on remote storage (Ray keeps the filesystem's path only)."""
    scheme = cfg.run.storage_path.split("://")[0]
    return f"{scheme}://{checkpoint.path}" if cfg.run.remote_storage else checkpoint.path


def register(cfg: TrainJobConfig, run_id: str) -> str | None:
    """The job's final model (the run's `model` artifact) as a new version in the MLflow Model Registry."""
    if cfg.run.registered_model is None:
        return None
    store = cfg.resolved().run.mlflow_tracking_uri
    uri = tracking.register_model(tracking.client(store), cfg.run.registered_model, run_id)
    print(f"train: registered the model as {uri}", flush=True)
    return uri


def build_parser() -> argparse.ArgumentParser:
    """The command line: its options and their help."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--init-from", help="start from this trained model or checkpoint folder")
    parser.add_argument("--experts", type=int, help="with --init-from: K experts over a binary split of the times")
    parser.add_argument("--intervals", help="with --init-from: the experts' intervals, e.g. 0:300,300:1000")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. optim.steps=500")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = args.overrides + ([f"branch.init_from={args.init_from}"] if args.init_from else [])
        cfg = load_config(args.config, overrides)
        if args.experts is not None or args.intervals:
            return main_experts(cfg, args)
        result, run_id, model_folder, samples_folder, incomplete = run(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    best = result.get_best_checkpoint("val_loss", "min")
    summary = {"run_id": run_id, "step": result.metrics.get("step"), "checkpoint": location(cfg, result.checkpoint),
               "best_checkpoint": location(cfg, best) if best else None, "model": str(model_folder),
               "registered_model": None if incomplete else register(cfg, run_id),
               "samples": str(samples_folder) if samples_folder else None,
               **({"tracking_incomplete": incomplete} if incomplete else {}),
               **{k: v for k, v in result.metrics.items() if k.startswith(("val_", "t2i", "i2t", "ddp_", "bad_"))}}
    print("train: done " + json.dumps(summary), flush=True)
    return 0


def main_experts(cfg: TrainJobConfig, args) -> int:
    if not args.init_from:
        raise ValueError("--experts / --intervals branch a trained model: give --init-from <model folder>")
    if args.experts is not None and args.intervals:
        raise ValueError("give --experts K or --intervals, not both")
    times = cfg.diffusion.num_train_timesteps
    intervals = check_intervals(parse_intervals(args.intervals), times) if args.intervals else \
        binary_split(times, args.experts)
    finished, run_id, model_folder, metrics = run_experts(cfg, intervals)
    summary = {"run_id": run_id, "model": str(model_folder), "registered_model": register(cfg, run_id),
               "experts": [{"interval": list(intervals[i]), "checkpoint": path, "step": m.get("step"),
                            "val_loss": m.get("val_loss")} for i, (path, m) in sorted(finished.items())], **metrics}
    print("train: done " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
