"""One training run on Ray Train (V2 API), shared by the jobs that train (train.py, tune.py's trials,
benchmark.py): checks before any worker starts, the run's MLflow run, the TorchTrainer (the workers' loop
around psunet.training's step, checkpoints reported with async upload, each validated by a Ray task beside
the workers) and a finished run's model folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from jobs import tracking
from jobs.config import TrainJobConfig, flatten
from psunet.checkpoint import load_state, restore_training, save_checkpoint
from psunet.config import DiffusionConfig
from psunet.data import BadData, load_manifest, make_loader
from psunet.diffusion import NoiseSchedule, conditional_gaps, diffusion_loss
from psunet.ema import unwrap
from psunet.model import PSUNet
from psunet.model_folder import (ASSETS, assets_for, bundle, data_codec, load_model, locate, rounding_vocabulary,
                                 upgrade_weights)
from psunet.training import Trainer, rank_split

RUN_TAG = "psunet.run"
# Worker progress goes through logging: Ray Train shows it once per line (a print would be teed twice).
log = logging.getLogger("psunet.train")


class SampleStream:
    """Batches of any size cut from a loader's batches (a batch's remainder starts the next), the seconds spent
    waiting for the loader, and the corrupt data the loader skipped (counted in `bad`; `new_bad`: notes of the
    shards found bad since last asked)."""

    def __init__(self, batches, bad: BadData | None = None):
        self.batches, self.rest, self.wait_s, self.bad, self.new_bad = batches, None, 0.0, bad, []

    def take(self, n: int) -> dict:
        parts, have = [], 0
        while have < n:
            if self.rest is None:
                started = time.perf_counter()
                batch = next(self.batches)
                self.wait_s += time.perf_counter() - started
                notes = batch.pop("bad", [])
                if notes and self.bad is not None:
                    self.new_bad += self.bad.add(notes)
                if not len(batch["latent"]):
                    continue
                self.rest = batch
            size = len(self.rest["latent"])
            cut = min(n - have, size)
            parts.append({key: value[:cut] for key, value in self.rest.items()})
            self.rest = {key: value[cut:] for key, value in self.rest.items()} if cut < size else None
            have += cut
        if len(parts) == 1:
            return parts[0]
        return {key: torch.cat([p[key] for p in parts]) if torch.is_tensor(parts[0][key])
                else [item for p in parts for item in p[key]] for key in parts[0]}


class Validator:
    """Held-out loss, and on demo data attribute-reader accuracy and sample grids (rank 0 only)."""

    def __init__(self, cfg: TrainJobConfig, device: torch.device):
        from psunet.pipeline import PSUNetPipeline
        from psunet.autoencoder import Autoencoder

        self.cfg, self.device = cfg, device
        self.schedule = NoiseSchedule(cfg.diffusion)
        self.batches = batches = list(self._fixed_batches())
        if not batches:
            raise ValueError(f"no validation samples in {cfg.data.val or cfg.data.train}")
        folder = cfg.data.val or cfg.data.train
        codec = data_codec(folder, cfg.model.text_len)
        self.vocabulary = codec.table.to(device)
        self.autoencoder = Autoencoder.load(assets_for(folder)["autoencoder"], device=str(device))
        self.settings = cfg.schedule.sampler()
        self.make_pipeline = lambda model: PSUNetPipeline(model, cfg.model, cfg.diffusion, codec, self.autoencoder,
                                                    self.settings)
        first = batches[0]
        self.captions = first["caption"][: cfg.schedule.samples]
        self.latents = first["latent"][: cfg.schedule.samples]

    def _fixed_batches(self):
        folder = self.cfg.data.val or self.cfg.data.train
        loader = make_loader(folder, self.cfg.optim.batch_size, self.cfg.model, training=False, rank=0, world_size=1)
        for i, batch in enumerate(loader):
            if i >= self.cfg.schedule.val_batches:
                break
            yield batch

    @torch.no_grad()
    def loss(self, model) -> dict[str, float]:
        """Held-out loss per modality, and the conditional gaps (what each modality's loss gains from the other)."""
        totals = {"val_loss": 0.0, "val_loss_image": 0.0, "val_loss_text": 0.0, "val_gap_image": 0.0,
                  "val_gap_text": 0.0}
        generator = torch.Generator(device=self.device).manual_seed(1234)
        for batch in self.batches:
            latents, text = batch["latent"].to(self.device), batch["text"].to(self.device)
            out = diffusion_loss(model, self.schedule, self.cfg.diffusion, latents, text, generator,
                                 time_range=self.cfg.branch.time_range, vocabulary=self.vocabulary)
            totals["val_loss"] += out.loss.item()
            totals["val_loss_image"] += out.loss_image.item()
            totals["val_loss_text"] += out.loss_text.item()
            gaps = conditional_gaps(model, self.schedule, self.cfg.diffusion, latents, text, generator)
            totals["val_gap_image"] += gaps["gap_image"]
            totals["val_gap_text"] += gaps["gap_text"]
        return {key: value / len(self.batches) for key, value in totals.items()}

    @torch.no_grad()
    def samples(self, model, folder: Path) -> dict[str, float]:
        from jobs.quality import grid_png, image_to_text_accuracy, text_to_image_accuracy

        pipe = self.make_pipeline(model)
        t2i, images = text_to_image_accuracy(pipe, self.captions, self.settings)
        i2t, captions = image_to_text_accuracy(pipe, self.latents, self.captions, self.settings)
        grid_png(images, self.captions, folder / "text_to_image.png")
        originals = pipe.decode_images(self.latents)
        grid_png(originals, captions, folder / "image_to_text.png")
        (folder / "image_to_text.json").write_text(json.dumps(
            [{"true": t, "generated": g} for t, g in zip(self.captions, captions)], indent=2))
        metrics = {}
        if self.cfg.schedule.demo_metrics:
            metrics.update({f"t2i_acc_{k}": v for k, v in t2i.items()})
            metrics.update({f"i2t_acc_{k}": v for k, v in i2t.items()})
        return metrics


def quiet_report_logs() -> None:
    """In a Ray Train worker: drop the two INFO lines Ray Train logs per ray.train.report ("Reporting training
    result N: TrainingReport(...)", "Checkpoint successfully created at: ...") by setting just their two module
    loggers to WARNING; warnings, errors and the controller's lines still show. (RunConfig's LoggingConfig cannot:
    the report line's logger is named by its file, not under "ray.train", and its level would also hide the
    controller's INFO failure-policy messages that carry a failed worker's error.)"""
    import contextlib

    with contextlib.suppress(ImportError, AttributeError):  # another Ray version: its logs stay as they are
        from ray.train.v2._internal.execution import context, storage

        for module in (context, storage):
            module.logger.setLevel(logging.WARNING)


def train_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker: from the latest checkpoint (if any) to optim.steps, reporting a
    checkpoint every schedule.checkpoint_every steps for the validation tasks to evaluate."""
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    quiet_report_logs()
    cfg = TrainJobConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.optim.seed)
    model = PSUNet(cfg.model)
    if cfg.branch.init_from:
        weights = initial_weights(cfg.branch.init_from)
        upgrade_weights(weights, model.state_dict())
        model.load_state_dict(weights)
    trainer = Trainer(model, cfg.optim, cfg.diffusion, device, time_range=cfg.branch.time_range,
                      vocabulary=rounding_vocabulary(cfg.data.train, cfg.model, cfg.diffusion))
    step, samples_seen, bad_seen = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state, ema_state = restore_training(folder, trainer.model, trainer.optimizer)
        trainer.ema.load_state_dict(ema_state, state["ema_updates"])
        step, samples_seen, bad_seen = state["step"], state["samples_seen"], state.get("bad_data")
    tracker = StepLog(loop_config["tracking_uri"], loop_config["mlflow_run_id"], cfg.run.spool, step) \
        if rank == 0 else None
    if rank == 0:
        tracker.started(step, world)
    trainer.wrap(ray.train.torch.prepare_model)  # DDP when world > 1; weights broadcast from rank 0

    global_batch = cfg.optim.batch_size * cfg.run.max_workers
    micro = rank_split(global_batch, world, rank, cfg.optim.batch_size)
    # a new stream position per (seed, resume step): a resumed run does not replay the same samples
    data_seed = cfg.optim.seed * 1_000_003 + step
    stream = SampleStream(iter(make_loader(cfg.data.train, cfg.optim.batch_size, cfg.model, training=True,
                                           seed=data_seed, num_workers=cfg.data.loader_workers,
                                           shuffle_buffer=cfg.data.shuffle_buffer)),
                          BadData(len(load_manifest(cfg.data.train).shards), cfg.data.max_bad_fraction, bad_seen))
    if rank == 0:
        log.info(f"train: rank 0 of {world} on {device}, starting at step {step}/{cfg.optim.steps}; global batch "
                 f"{global_batch} as {len(micro)} micro-batch(es) of {micro[0]} per worker")

    if step >= cfg.optim.steps:  # resubmitted after it finished: nothing to train, report where it stands
        ray.train.report({"step": step}, checkpoint=None)
    window_start, window_steps, window_wait = time.perf_counter(), 0, stream.wait_s
    loss_sum, loss_steps, notified = 0.0, 0, False
    upload = CheckpointUploadMode.ASYNC if cfg.run.checkpoint_upload == "async" else CheckpointUploadMode.SYNC
    while step < cfg.optim.steps:
        out, grad_norm, lr = trainer.step(step, [stream.take(n) for n in micro], global_batch=global_batch,
                                          world=world)
        step += 1
        samples_seen += global_batch
        window_steps += 1
        loss_sum, loss_steps = loss_sum + out.loss.detach(), loss_steps + 1
        for note in stream.new_bad:
            log.warning(f"train: skipping corrupt data in {note['shard']}: {note['reason']} ({len(stream.bad.shards)} "
                        f"of {stream.bad.shards_total} shards bad, {len(stream.bad.records)} records)")
        stream.new_bad = []

        metrics = {}
        if step % cfg.schedule.log_every == 0 or step == cfg.optim.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {"loss": out.loss.item(), "loss_image": out.loss_image.item(), "loss_text": out.loss_text.item(),
                       **({"loss_rounding": out.loss_rounding.item()} if out.loss_rounding is not None else {}),
                       "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": window_steps * global_batch / elapsed,
                       "data_wait_fraction": (stream.wait_s - window_wait) / elapsed}
            metrics.update(stream.bad.metrics())
            window_start, window_steps, window_wait = time.perf_counter(), 0, stream.wait_s
            if rank == 0:
                tracker.log(step, metrics)
        # a node about to be preempted (a spot VM's notice; `ray drain-node`): one checkpoint now, so the restart
        # on the nodes left loses nothing. Every rank asks at the same steps (it is a barrier).
        preempt_now = False
        if step % cfg.schedule.log_every == 0:
            notice = ray.train.get_preemption_info()
            preempt_now, notified = notice is not None and not notified, notice is not None
        if preempt_now and rank == 0:
            log.info(f"train: node(s) {', '.join(notice.preempted_node_ids)} (ranks {notice.preempted_ranks}) to be "
                     f"preempted: checkpoint at step {step}")
        if step % cfg.schedule.checkpoint_every == 0 or step == cfg.optim.steps or preempt_now:
            # a placeholder until this checkpoint's validation task returns the held-out loss (the ranking of kept
            # checkpoints needs the key; a checkpoint whose validation fails ranks last)
            metrics.update(loss_mean=float(loss_sum) / loss_steps, val_loss=float("inf"))
            loss_sum, loss_steps = 0.0, 0
            if step == cfg.optim.steps and world > 1:
                metrics["ddp_param_max_abs_diff"] = _param_spread(trainer.model)
            if world > 1:  # every rank's skipped data, so the checkpoint holds all of it
                _gather_bad(stream.bad, world)
            metrics.update(stream.bad.metrics())
            state = {"step": step, "samples_seen": samples_seen, "ema_updates": trainer.ema.updates, "data_seed": data_seed,
                     "world_size": world, "mlflow_run_id": loop_config["mlflow_run_id"], "bad_data": stream.bad.state()}
            started = time.perf_counter()
            report_checkpoint(cfg, rank, {"step": step, **metrics}, trainer, state, loop_config, upload)
            if rank == 0:  # what a checkpoint costs the training loop: writing it, the barrier, a sync upload
                tracker.log(step, {"checkpoint_stall_s": time.perf_counter() - started})
    if rank == 0:
        tracker.close()


def report_checkpoint(cfg: TrainJobConfig, rank: int, metrics: dict, trainer: Trainer, state: dict,
                      loop_config: dict, upload) -> None:
    """Rank 0 writes the checkpoint; every rank reports (a barrier). The checkpoint is handed to validation,
    with sample grids at schedule.sample_every; async upload lets training go on while it is copied."""
    import ray.train
    from ray.train.v2.api.validation_config import ValidationTaskConfig

    step = state["step"]
    checkpoint = None
    if rank == 0:
        checkpoint = ray.train.Checkpoint.from_directory(write_checkpoint(cfg, trainer, state, loop_config))
    # an expert alone samples badly outside its interval: its samples come from the assembled ensemble
    samples = (step % cfg.schedule.sample_every == 0 or step == cfg.optim.steps) and cfg.branch.time_range is None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:07d}",
                     checkpoint_upload_mode=upload, delete_local_checkpoint_after_upload=checkpoint is not None,
                     validation=ValidationTaskConfig(fn_kwargs={"samples": samples})
                     if checkpoint and cfg.schedule.validate_checkpoints else False)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written, run.checkpoint_retries times over."""


def write_checkpoint(cfg: TrainJobConfig, trainer: Trainer, state: dict, loop_config: dict) -> str:
    """Rank 0's checkpoint, written whole into a fresh local folder (Ray Train copies it to run.storage_path and
    lists it only once copied). A write the disk refuses (full, no permission) is tried again
    run.checkpoint_retries times, a failed try leaving nothing behind; then CheckpointWriteError, and the run
    stops with the previous checkpoint still the latest."""
    step = state["step"]
    for attempt in range(cfg.run.checkpoint_retries + 1):
        folder = None
        try:
            folder = tempfile.mkdtemp(prefix=f"psunet-checkpoint-{step:07d}-")
            save_checkpoint(folder, unwrap(trainer.model), trainer.ema.state_dict(), trainer.optimizer, state,
                            {"model": cfg.model.model_dump(), "diffusion": cfg.diffusion.model_dump(),
                             "job": loop_config["config"]})
            (Path(folder) / ASSETS).write_text(json.dumps(assets_for(cfg.data.train), indent=2))
            return folder
        except OSError as exc:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
            where = folder or tempfile.gettempdir()
            if attempt == cfg.run.checkpoint_retries:
                # short: Ray Train keeps only the last 500 characters of a worker's error, this line included
                raise CheckpointWriteError(
                    f"the checkpoint at step {step} could not be written ({attempt + 1} tries) on its way to "
                    f"run.storage_path {cfg.run.storage_path}: {type(exc).__name__}: {exc}. The previous checkpoint "
                    "is still the latest: free space or fix the storage, then run the same command to resume") from exc
            wait = 2.0 * (attempt + 1)
            log.warning(f"train: the checkpoint at step {step} could not be written to {where} ({exc}); trying "
                        f"again in {wait:g} s ({attempt + 1} of {cfg.run.checkpoint_retries})")
            time.sleep(wait)


class StepLog:
    """Rank 0's MLflow writer, through an Outbox (metrics kept while the server is away). A restarted worker group
    replays the steps since the last checkpoint: their metrics are logged once (the first time), so every step
    appears once in the run's history."""

    def __init__(self, tracking_uri: str, run_id: str, spool: str, resume_step: int):
        self.client, self.run_id = tracking.client(tracking_uri), run_id
        self.outbox = tracking.Outbox(self.client, run_id, spool, "train", say=log.warning)
        try:
            history = self.client.get_metric_history(run_id, "loss")
            self.logged_up_to = max((m.step for m in history), default=0)
        except tracking.unreachable_errors():  # what the checkpoint covers was sent or is in the spool
            self.logged_up_to = resume_step

    def started(self, step: int, world: int) -> None:
        """Every start of the worker group (first, after a failure, after a resize): metric `workers` = its
        size at the step it resumes from; tags `restarts` (starts after the first) and `resizes`
        ("step:workers" wherever the size changed)."""
        self.write(step, {"workers": world})
        try:
            starts = [(m.step, int(m.value)) for m in
                      sorted(self.client.get_metric_history(self.run_id, "workers"), key=lambda m: m.timestamp)]
            changes = [start for i, start in enumerate(starts) if i == 0 or start[1] != starts[i - 1][1]]
            self.client.set_tag(self.run_id, "restarts", str(len(starts) - 1))
            self.client.set_tag(self.run_id, "resizes", " ".join(f"{s}:{w}" for s, w in changes))
        except tracking.unreachable_errors():
            log.warning("train: the tracking server is unreachable: the run's restarts and resizes tags are not "
                        "updated for this start")
            return
        if len(changes) > 1 and changes[-1] == starts[-1]:
            log.info(f"train: resized from {changes[-2][1]} to {world} workers, resuming at step {step}")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        log.info(f"train: step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if step > self.logged_up_to:
            self.write(step, metrics)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.outbox.log(metrics, step)

    def close(self) -> None:
        unsent = self.outbox.close()
        if unsent:
            log.warning(f"train: {unsent} metrics not sent to the tracking server yet: kept in "
                        f"{self.outbox.spool_folder}; the job sends them when it ends")


_VALIDATORS: dict[str, Validator] = {}


def validate_checkpoint(checkpoint, config: dict, run_id: str, tracking_uri: str, samples: bool = False) -> dict:
    """A Ray validation task (off the training path): the checkpoint's EMA weights on the held-out batches,
    and with `samples` the sample grids and demo accuracies, logged to the training run's MLflow run at the
    checkpoint's step (the metrics through an Outbox: kept while the server is away). The returned metrics join
    the checkpoint's (they rank the kept checkpoints)."""
    cfg = TrainJobConfig.model_validate(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # a task process validates many checkpoints (of one run, or of a sweep's trials): load the held-out data once
    key = json.dumps({k: config[k] for k in ("model", "diffusion", "data", "schedule", "branch")}
                     | {"batch_size": config["optim"]["batch_size"]}, sort_keys=True)
    if key not in _VALIDATORS:
        _VALIDATORS.clear()
        _VALIDATORS[key] = Validator(cfg, device)
    validator = _VALIDATORS[key]
    client = tracking.client(tracking_uri)
    with checkpoint.as_directory() as folder:
        model = load_model(folder, device=device)[0]
        step = load_state(folder)["step"]
    outbox = tracking.Outbox(client, run_id, cfg.run.spool, f"validation-{step:07d}")
    started = time.perf_counter()
    metrics = validator.loss(model)
    if samples:
        with tempfile.TemporaryDirectory() as out:
            metrics.update(validator.samples(model, Path(out)))
            try:
                client.log_artifacts(run_id, out, f"samples/step_{step:07d}")
            except tracking.unreachable_errors() as exc:
                print(f"validation: warning: step {step}'s sample grids are not logged, the tracking server is "
                      f"unreachable ({type(exc).__name__})", file=sys.stderr, flush=True)
    metrics["validation_s"] = time.perf_counter() - started
    outbox.log(metrics, step)
    outbox.close()
    print(f"validation: step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    return metrics


def initial_weights(folder: str) -> dict[str, torch.Tensor]:
    """The weights a branch starts from: a checkpoint's live weights, or a model folder's EMA weights."""
    from safetensors.torch import load_file

    weights = "model" if (Path(folder) / "model.safetensors").is_file() else "ema"
    return load_file(str(locate(folder, weights, assets=False).weights))


def check_base(cfg: TrainJobConfig) -> None:
    """--init-from must name a single trained model of exactly this model config."""
    folder = Path(cfg.branch.init_from)
    try:
        base = locate(folder, assets=False).config
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--init-from {folder}: not a model folder or training checkpoint ({error})") from None
    if "experts" in base:
        raise ValueError(f"--init-from {folder}: is an expert ensemble; branch from a single model")
    differ = [f"model.{k}: base {v!r}, config {getattr(cfg.model, k)!r}" for k, v in base["model"].items()
              if getattr(cfg.model, k, v) != v and k != "grad_checkpoint"]
    if differ:
        raise ValueError(f"--init-from {folder}: the base model's shape differs from this config: "
                         + "; ".join(differ))
    trained = DiffusionConfig.saved(base["diffusion"])
    targets = {modality: (trained.target(modality), cfg.diffusion.target(modality)) for modality in ("image", "text")}
    if any(was != now for was, now in targets.values()):
        raise ValueError(f"--init-from {folder}: the base model predicts {targets['image'][0]} (image) and "
                         f"{targets['text'][0]} (text), this config trains {targets['image'][1]} and "
                         f"{targets['text'][1]}; set diffusion.prediction (and diffusion.text_target) to the base's")


def _gather_bad(bad: BadData, world: int) -> None:
    """Merge every DDP rank's skipped data into `bad`."""
    import torch.distributed as dist

    states = [None] * world
    dist.all_gather_object(states, bad.state())
    for state in states:
        bad.merge(state)


def _param_spread(model) -> float:
    """Largest absolute difference of any parameter between DDP ranks (0.0 when they agree)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().flatten().float() for p in unwrap(model).parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def mlflow_run(cfg: TrainJobConfig, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
    """The MLflow run of this training run: found by tag on resubmission (and marked running again if it was
    stopped, failed or finished), created (with params and `tags`) otherwise, nested under `parent` (a sweep, or
    the branch training of experts) when given."""
    client = tracking.client(cfg.run.mlflow_tracking_uri)
    run_id = tracking.find_or_create_run(client, cfg.run.experiment, cfg.run.local_folder, RUN_TAG,
                                         f"{cfg.run.storage_path}/{cfg.run.name}", cfg.run.name,
                                         params=flatten(cfg.model_dump(mode="json")), tags=tags, parent=parent)
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    return run_id


def end_run(cfg: TrainJobConfig, run_id: str, status: str) -> None:
    """Mark the MLflow run ended (FINISHED, FAILED or KILLED), or say why it could not be."""
    try:
        tracking.client(cfg.run.mlflow_tracking_uri).set_terminated(run_id, status)
    except tracking.unreachable_errors() as exc:
        print(f"train: warning: MLflow run {run_id} could not be marked {status} ({tracking.error_line(exc)})",
              file=sys.stderr, flush=True)


def preflight(cfg: TrainJobConfig) -> None:
    """Everything that can be checked before a worker starts: shards exist and fit the model."""
    for folder in filter(None, (cfg.data.train, cfg.data.val)):
        try:
            manifest = load_manifest(folder)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc} (relative paths are taken from the job's working directory "
                                    f"{os.getcwd()}; under `ray job submit --working-dir` pass absolute paths)") from exc
        manifest.check_model(cfg.model)
    if cfg.run.remote_storage:
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(cfg.run.storage_path)
        except (ValueError, OSError) as exc:
            raise ValueError(f"run.storage_path={cfg.run.storage_path!r}: not a storage URI pyarrow can open "
                             f"(s3://, gs://, abfs://, hdfs://): {exc}") from None
    assets = assets_for(cfg.data.train)
    if not Path(assets["word_vectors"]).is_file():
        raise FileNotFoundError(f"word vectors named by the shards are missing: {assets['word_vectors']}")
    if cfg.branch.init_from:
        check_base(cfg)


def make_trainer(cfg: TrainJobConfig, run_id: str, callbacks: list | None = None):
    """The TorchTrainer of one training run (also what each Tune trial fits): elastic when run.num_workers is
    a range, every checkpoint validated by a Ray task with run.validation_resources."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

    run = cfg.run
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": run_id,
                           "tracking_uri": run.mlflow_tracking_uri},
        scaling_config=ScalingConfig(num_workers=(run.min_workers, run.max_workers) if run.elastic else run.max_workers,
                                     use_gpu=run.use_gpu, resources_per_worker={"CPU": run.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=run.resize_interval_s),
        validation_config=ValidationConfig(
            fn=validate_checkpoint,
            task_config=ValidationTaskConfig(fn_kwargs={"config": cfg.model_dump(mode="json"), "run_id": run_id,
                                                        "tracking_uri": run.mlflow_tracking_uri}),
            # DEFAULT: not inside the placement group of whatever started the run (a Tune trial's)
            ray_remote_kwargs={**task_resources(run.validation_resources), "scheduling_strategy": "DEFAULT"})
        if cfg.schedule.validate_checkpoints else None,
        run_config=RunConfig(
            name=run.name, storage_path=run.storage_path, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=run.max_failures),
            # the keep_checkpoints best by validation loss; Ray always keeps the latest as well (for resume)
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.schedule.keep_checkpoints,
                                               checkpoint_score_attribute="val_loss", checkpoint_score_order="min"),
        ),
    )


def task_resources(resources: dict[str, float]) -> dict:
    """run.validation_resources as ray.remote() options: CPU, GPU and memory by name, the rest custom."""
    named = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}
    options = {"num_cpus": 0, **{named[k]: v for k, v in resources.items() if k in named}}
    custom = {k: v for k, v in resources.items() if k not in named}
    return {**options, "resources": custom} if custom else options


def check_cluster(cfg: TrainJobConfig) -> None:
    """Warn (the cluster may still grow) when no node offers what a validation task or a worker needs."""
    import ray

    total = ray.cluster_resources()
    wanted = {**cfg.run.validation_resources}
    missing = [f"{k}={v:g}" for k, v in wanted.items() if v > 0 and total.get(k, 0) < v]
    if missing:
        print(f"train: warning: no node offers run.validation_resources {', '.join(missing)} (the cluster has "
              f"{ {k: v for k, v in total.items() if not k.startswith('node:')} }); checkpoints are validated "
              "when such a node joins", file=sys.stderr, flush=True)
    if total.get("CPU", 0) < cfg.run.min_workers * cfg.run.cpus_per_worker:
        print(f"train: warning: run.num_workers={cfg.run.num_workers} needs {cfg.run.min_workers} x "
              f"{cfg.run.cpus_per_worker:g} CPUs, the cluster has {total.get('CPU', 0):g}; waiting for capacity",
              file=sys.stderr, flush=True)


def run(cfg: TrainJobConfig):
    """One training run to cfg.optim.steps (resumed when run.name and run.storage_path hold one): checked, fitted
    on the cluster, its model folder bundled and logged to its MLflow run. Returns (Ray Train result, MLflow run
    id, model folder, the last step's sample grids folder or None, None or what the MLflow run lacks)."""
    import ray

    cfg = cfg.resolved()
    preflight(cfg)
    if not cfg.run.remote_storage:
        Path(cfg.run.storage_path).mkdir(parents=True, exist_ok=True)
    try:
        run_id = mlflow_run(cfg)
    except tracking.unreachable_errors() as exc:
        raise ValueError(f"run.mlflow_tracking_uri={cfg.run.mlflow_tracking_uri}: cannot open the run's MLflow run "
                         f"({tracking.error_line(exc)}); start the tracking server or point at a "
                         "reachable one") from None
    ray.init(ignore_reinit_error=True)
    stop_on_sigterm(cfg, run_id)  # after ray.init, which sets a handler of its own
    check_cluster(cfg)
    trainer = make_trainer(cfg, run_id)
    print(f"train: run {cfg.run.name!r} -> {cfg.run.storage_path}/{cfg.run.name} with {cfg.run.num_workers} "
          f"worker(s); MLflow {cfg.run.mlflow_tracking_uri} run {run_id}", flush=True)
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train's error: the workers' tracebacks, the cause on the last line of each
        end_run(cfg, run_id, "FAILED")
        raise TrainingFailed(f"training failed: {cause(exc)} (the tracebacks are above; the same command "
                             "resumes from the latest checkpoint)") from exc
    run_folder = Path(cfg.run.local_folder).resolve() / cfg.run.name
    with result.checkpoint.as_directory() as checkpoint_folder:
        model_folder = bundle(checkpoint_folder, run_folder / "model")
    samples_folder, incomplete = finish_tracking(cfg, run_id, model_folder, result.metrics["step"],
                                                 run_folder / "samples")
    return result, run_id, model_folder, samples_folder, incomplete


class TrainingFailed(RuntimeError):
    """The workers failed past run.max_failures."""


def stop_on_sigterm(cfg: TrainJobConfig, run_id: str) -> None:
    """On SIGTERM (`ray job stop`, a scheduler's stop) the driver marks its MLflow run KILLED and says how to resume
    before it goes. The checkpoints in storage stay whole: Ray Train lists one as the latest only once copied."""
    def stop(signum: int, frame) -> None:
        end_run(cfg, run_id, "KILLED")
        print(f"train: stopped (SIGTERM): MLflow run {run_id} is marked KILLED and the latest complete checkpoint in "
              f"{cfg.run.storage_path}/{cfg.run.name} is kept; the same command resumes from it in the same MLflow "
              "run", file=sys.stderr, flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def cause(exc: BaseException) -> str:
    """The innermost error named in an exception's text (a worker's `SomeError: message` line), else its first
    line; for Ray Train's ControllerError, the controller's own error by its type (its text may be empty)."""
    failure = getattr(exc, "controller_failure", None)
    if isinstance(failure, BaseException):
        return f"Ray Train's controller failed: {type(failure).__name__}" + (f": {cause(failure)}"
                                                                            if str(failure).strip() else "")
    lines = [line for line in str(exc).splitlines() if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return lines[-1] if lines else tracking.error_line(exc)


def finish_tracking(cfg: TrainJobConfig, run_id: str, model_folder: Path, step: int,
                    samples: Path) -> tuple[Path | None, str | None]:
    """The end of a run in MLflow: the metrics the outboxes kept sent, the model folder logged, the last step's
    sample grids fetched, the run ended. A tracking server still away does not fail the finished training: a
    warning says what is missing and where the unsent metrics are (the same command, run again, sends them).
    Returns (the sample grids' folder or None, None or what the MLflow run lacks)."""
    client = tracking.client(cfg.run.mlflow_tracking_uri)
    try:
        unsent = tracking.send_spooled(client, run_id, cfg.run.spool)
        if not unsent:
            client.log_artifacts(run_id, str(model_folder), "model")
            client.set_terminated(run_id, "FINISHED")
            return fetch_final_samples(client, run_id, step, samples) if cfg.schedule.validate_checkpoints \
                else None, None
    except tracking.unreachable_errors():
        unsent = None
    incomplete = (f"the tracking server {cfg.run.mlflow_tracking_uri} is unreachable: MLflow run {run_id} lacks "
                  + (f"{unsent} metrics (kept in {cfg.run.spool}), " if unsent else "")
                  + "the model artifact and its end; run the same command again once the server is back")
    print(f"train: warning: training finished (model folder {model_folder}), but {incomplete}", file=sys.stderr,
          flush=True)
    return None, incomplete


def fetch_final_samples(client, run_id: str, step: int, out: Path) -> Path | None:
    """Copy the last step's sample grids from MLflow next to the checkpoints (works with any tracking store); None
    when MLflow lacks them (the tracking server was away when they were made)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        return Path(client.download_artifacts(run_id, f"samples/step_{step:07d}", str(out)))
    except tracking.unreachable_errors() as exc:
        print(f"train: warning: the last step's sample grids are not in MLflow ({tracking.error_line(exc)})",
              file=sys.stderr, flush=True)
        return None
