"""The training job's configuration: a YAML file merged over defaults, then `section.field=value` overrides.

    model:      {preset: demo, width: 256}   # a named preset plus field overrides
    diffusion:  {p_drop_text: 0.1}
    data:       {train: data/demo/train, val: data/demo/val}
    optim:      {steps: 2000, batch_size: 64, lr: 3.0e-4}
    schedule:   {checkpoint_every: 200, sample_every: 1000}   # every checkpoint is validated off the training path
    run:        {name: demo, storage_path: s3://bucket/runs, num_workers: 1-4}   # elastic: 1 to 4 workers
    branch:     {init_from: runs/demo/model, time_range: [0, 500]}   # fine-tune a trained model on some times

Everything is validated before any Ray worker starts; an error names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from jobs.tracking import tracking_uri
from psunet.config import DiffusionConfig, ModelConfig, OptimConfig, StrictModel, preset
from psunet.settings import SamplerSettings


class DataConfig(StrictModel):
    train: str = Field(description="training shard folder (with manifest.json)")
    val: str | None = Field(None, description="held-out shard folder")
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker")
    shuffle_buffer: int = Field(1000, ge=1)
    max_bad_fraction: float = Field(0.05, ge=0, lt=1, description="corrupt shards or records found while training "
                                    "are skipped and counted; past this fraction of the shards bad the run fails, "
                                    "naming them")


class ScheduleConfig(StrictModel):
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1, description="each checkpoint is validated (held-out loss) by a "
                                  "Ray validation task beside the training workers")
    keep_checkpoints: int = Field(3, ge=1)
    validate_checkpoints: bool = Field(True, description="validate every checkpoint (false: no held-out metrics "
                                       "or samples)")
    val_batches: int = Field(4, ge=1)
    sample_every: int = Field(200, ge=1, description="sample grids (and demo accuracies) with the validation of "
                              "the checkpoints at multiples of this step and the last")
    samples: int = Field(8, ge=1, description="prompts / images per sample grid")
    demo_metrics: bool = Field(False, description="attribute-reader accuracy (demo data only)")
    sample_steps: int = Field(20, ge=1)
    guidance_scale: float | None = Field(None, ge=0, description="both modalities, unless set one by one below "
                                         "(default: the sampler's, psunet.settings.SamplerSettings)")
    guidance_scale_image: float | None = Field(None, ge=0, description="text->image samples")
    guidance_scale_text: float | None = Field(None, ge=0, description="image->text samples")

    def sampler(self) -> SamplerSettings:
        """The sampler settings of the validation samples: the sampler's defaults where none is set here."""
        given = {"guidance_scale": self.guidance_scale, "guidance_scale_image": self.guidance_scale_image,
                 "guidance_scale_text": self.guidance_scale_text}
        return SamplerSettings(steps=self.sample_steps, **{key: value for key, value in given.items()
                                                           if value is not None})


class RunConfig(StrictModel):
    name: str = Field("psunet", pattern=r"^[A-Za-z0-9._-]+$")
    storage_path: str = "runs"
    num_workers: int | str = Field(1, description="training workers: a number (2), or a range (1-4) to train "
                                   "elastically on whatever the cluster has between the two")
    resize_interval_s: float = Field(60.0, gt=0, description="elastic: how often to look for capacity to scale up")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(2, ge=-1, description="worker group restarts (a lost node, a killed worker); -1: "
                              "without limit")
    checkpoint_retries: int = Field(2, ge=0, description="a checkpoint write the disk refuses is tried again this "
                                    "many times (2 s, 4 s, ... apart) before the run stops")
    checkpoint_upload: Literal["async", "sync"] = Field("async", description="async: training goes on while a "
                                                        "checkpoint is copied to storage_path")
    validation_resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0}, description=(
        "Ray resources of each validation task (CPU, GPU, memory or a custom resource such as a node's "
        "'validation' slot); it runs beside the training workers, never on their path"))
    mlflow_tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else a local store")
    experiment: str = "psunet"
    registered_model: str | None = Field("psunet", pattern=r"^[A-Za-z0-9._-]+$", description=(
        "MLflow Model Registry name the job's final model is registered under (a version per finished job: "
        "models:/<name>/<version>); null: not registered"))

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value: int | str) -> int | str:
        low, high = worker_range(value)
        return low if low == high else f"{low}-{high}"

    @field_validator("validation_resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        if any(amount < 0 for amount in value.values()):
            raise ValueError(f"resource amounts must be >= 0, got {value}")
        return value

    @property
    def min_workers(self) -> int:
        return worker_range(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        return worker_range(self.num_workers)[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def remote_storage(self) -> bool:
        """storage_path is a URI (s3://, gs://, ...): not a folder the driver and workers share."""
        return "://" in self.storage_path and not self.storage_path.startswith("file://")

    @property
    def local_folder(self) -> str:
        """Where the driver keeps what must be on its own disk (the default MLflow store, the final model
        folder): storage_path, or ./runs when storage_path is remote."""
        return "runs" if self.remote_storage else self.storage_path

    @property
    def spool(self) -> str:
        """Where the run's metrics wait while the tracking server is away (tracking.Outbox): beside its checkpoints."""
        return f"{self.storage_path}/{self.name}/unsent_metrics"


def worker_range(value: int | str) -> tuple[int, int]:
    """run.num_workers as (min, max): 2 -> (2, 2), "1-4" -> (1, 4)."""
    text = str(value).strip()
    low, sep, high = text.partition("-")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError(f"must be a whole number (2) or a range (1-4), got {value!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"must be >= 1, and a range's low end <= its high end, got {value!r}")
    return bounds


class BranchConfig(StrictModel):
    """Start from a trained model, and optionally train on an interval of diffusion times only (an expert)."""

    init_from: str | None = Field(None, description="model or checkpoint folder whose weights start this run")
    time_range: tuple[int, int] | None = Field(None, description="[start, end): the diffusion times trained on")


class TrainJobConfig(StrictModel):
    model: ModelConfig
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    branch: BranchConfig = Field(default_factory=BranchConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainJobConfig":
        self.schedule.sampler()  # its checks, before any worker starts
        if self.optim.warmup_steps >= self.optim.steps and self.optim.steps > 1:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be < optim.steps={self.optim.steps}")
        if self.branch.time_range is not None:
            start, end = self.branch.time_range
            if not 0 <= start < end <= self.diffusion.num_train_timesteps:
                raise ValueError(f"branch.time_range={[start, end]} must satisfy 0 <= start < end <= "
                                 f"diffusion.num_train_timesteps={self.diffusion.num_train_timesteps}")
            if self.diffusion.timesteps == "independent" or self.diffusion.text_shift != 1.0:
                raise ValueError("branch.time_range needs one noise level per sample; diffusion.timesteps must be "
                                 "shared or slices, not independent, and diffusion.text_shift 1 (experts)")
        return self

    def resolved(self) -> "TrainJobConfig":
        """Absolute paths and a concrete tracking URI, fixed on the driver so workers and restarts agree."""
        storage = str(Path(self.run.storage_path).expanduser().resolve()) if "://" not in self.run.storage_path \
            else self.run.storage_path
        uri = tracking_uri(self.run.mlflow_tracking_uri, self.run.local_folder)
        data = self.data.model_copy(update={
            "train": str(Path(self.data.train).resolve()),
            "val": str(Path(self.data.val).resolve()) if self.data.val else None,
        })
        run = self.run.model_copy(update={"storage_path": storage, "mlflow_tracking_uri": uri})
        branch = self.branch.model_copy(update={
            "init_from": str(Path(self.branch.init_from).resolve()) if self.branch.init_from else None})
        return self.model_copy(update={"data": data, "run": run, "branch": branch})


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def load_config(path: str | None, overrides: list[str] = ()) -> TrainJobConfig:
    """Read YAML, apply `a.b=value` overrides (values parsed as YAML), resolve the model preset, validate."""
    tree: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        tree = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    model = dict(tree.get("model") or {})
    if "preset" in model:
        model = {**preset(model.pop("preset")).model_dump(), **model}
    tree["model"] = model
    try:
        return TrainJobConfig.model_validate(tree)
    except ValidationError as exc:
        raise ValueError(f"invalid config{f' {path}' if path else ''}:\n{exc}") from exc


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"section.field": "value"} for MLflow params."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
