"""Speed, measured side by side in one run: each subcommand prints one JSON object (targets beside figures).

    python jobs/benchmark.py train --preset demo              # samples/s, FLOPs, measured matmul peak, MFU, memory
    python jobs/benchmark.py overhead --preset demo           # bare PyTorch loop vs TorchTrainer(1 worker), A/B/A/B
    python jobs/benchmark.py loader --data data/demo/train    # shard reader vs training speed, ingest wait; RSS 1x, 10x
    python jobs/benchmark.py sampling --preset demo --model runs/<run>/model
    python jobs/benchmark.py convergence --config configs/demo.yaml --steps 1000 --seeds 3 --accuracy-every 500
    python jobs/benchmark.py convergence --against ode --steps 1000 model.shared_depth=7 model.ode_solver=midpoint
    python jobs/benchmark.py convergence --against experts --experts 2 --steps 1500 --branch-at 1000
    python jobs/benchmark.py time-to-quality --steps 1000 --seeds 3  # steps to quality thresholds per recipe
    python jobs/benchmark.py paint --model runs/<run>/model   # paint-with-words: objects landing in the region
    python jobs/benchmark.py serve --model runs/<run>/model   # Serve text-to-image, batching on vs off
    python jobs/benchmark.py checkpoints --steps 200          # checkpoint stall sync vs async, validation beside
    python jobs/benchmark.py gpu                              # one CUDA GPU, under 8 minutes: coco256 bf16 MFU and
                                                              # sampling, eager and compiled; Ray Train GPU resume

Figures are logged to MLflow (experiment psunet-benchmark): --tracking-uri, else $MLFLOW_TRACKING_URI, else
the local store runs/mlflow.db. No figure here is a test: tests only check that every field is present and positive.
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from jobs import tracking  # noqa: E402
from jobs.model_ref import MODEL_HELP  # noqa: E402
from jobs.tracking import tracking_uri  # noqa: E402
from psunet.config import DiffusionConfig, ModelConfig, baseline_of, preset  # noqa: E402
from psunet.model import PSUNet, forward_flops  # noqa: E402
from psunet.paint import box_region  # noqa: E402
from psunet.progress import progress  # noqa: E402
from psunet.settings import SamplerSettings, parse_guidance  # noqa: E402

PROMPT = "a small red circle on the left"  # sampling and serve requests
TARGETS = {
    "cpu": {"mfu": 0.60, "overhead_ratio_max": 1.05, "loader_headroom": 20.0, "guidance_batching_speedup": 1.6,
            "serve_batching_speedup_16_clients": 3.0},
    "cuda": {"mfu": 0.45, "overhead_ratio_max": 1.05, "loader_headroom": 20.0, "guidance_batching_speedup": 1.6,
             "serve_batching_speedup_16_clients": 3.0},
}


def device_of(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def matmul_peak(device: torch.device, seconds: float = 2.0) -> float:
    """Measured FLOP/s of a large square matmul in the training dtype (the denominator of MFU)."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=training_dtype(device))
    b = torch.randn(size, size, device=device, dtype=training_dtype(device))
    for _ in range(3):
        a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            a @ b
        count += 4
        sync(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


class StepTimer:
    """The training job's own step (psunet.training.Trainer: loss, clipping, AdamW, EMA) with `cfg`, on one fixed
    synthetic batch of cfg.optim.batch_size (the data path is measured by `loader`)."""

    def __init__(self, cfg, device: torch.device, parallel=None):
        from psunet.training import Trainer

        torch.manual_seed(cfg.optim.seed)
        self.trainer = Trainer(PSUNet(cfg.model), cfg.optim, cfg.diffusion, device, time_range=cfg.branch.time_range)
        self.trainer.wrap(parallel)
        self.steps = 0
        batch, c = cfg.optim.batch_size, cfg.model
        self.batch = {"latent": torch.randn(batch, *c.latent_shape, device=device),
                      "text": torch.randn(batch, c.text_len, c.word_dim, device=device)}

    def step(self, batch: dict | None = None) -> None:
        """One training step on `batch` (a loader's batch), by default on the fixed synthetic one."""
        self.trainer.step(self.steps, [self.batch if batch is None else batch])
        self.steps += 1

    def seconds_per_step(self, steps: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            self.step()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return (time.perf_counter() - start) / steps


def timed_config(args):
    """What train, overhead and loader time: the job's config (--config) with the --preset model and --batch-size."""
    from jobs.config import load_config

    cfg = load_config(args.config, [f"optim.batch_size={args.batch_size}"])
    return cfg.model_copy(update={"model": preset(args.preset)})


def bench_train(args) -> dict:
    device = device_of(args.device)
    cfg = timed_config(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"compile": args.compile})}), device)
    seconds = timer.seconds_per_step(args.steps)
    forward = forward_flops(PSUNet(cfg.model))
    samples_per_s = args.batch_size / seconds
    achieved = samples_per_s * 3 * forward
    peak = matmul_peak(device)
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"preset": args.preset, "batch_size": args.batch_size, "device": str(device), "compiled": args.compile,
            "dtype": str(training_dtype(device)).removeprefix("torch."), "threads": torch.get_num_threads(),
            "samples_per_s": samples_per_s, "step_ms": seconds * 1000, "forward_flops_per_sample": forward,
            "train_flops_per_sample": 3 * forward, "achieved_flops": achieved, "matmul_peak_flops": peak,
            "mfu": achieved / peak, "peak_memory_mb": memory, "target_mfu": TARGETS[device.type]["mfu"]}


def _bare_loop(config: dict, device: str, steps: int) -> float:
    """In a fresh process, as a Train worker is: seconds per step of the bare loop."""
    from jobs.config import TrainJobConfig

    return StepTimer(TrainJobConfig.model_validate(config), torch.device(device)).seconds_per_step(steps)


def _trainer_loop(config: dict) -> None:
    """One TorchTrainer worker: the same StepTimer, its model prepared by Ray Train."""
    import ray.train
    import ray.train.torch

    from jobs.config import TrainJobConfig

    timer = StepTimer(TrainJobConfig.model_validate(config["config"]), ray.train.torch.get_device(),
                      parallel=ray.train.torch.prepare_model)
    seconds = timer.seconds_per_step(config["steps"])
    with tempfile.TemporaryDirectory() as folder:  # Train V2 keeps the metrics of reports with a checkpoint
        ray.train.report({"seconds_per_step": seconds}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def bench_overhead(args) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    device = device_of(args.device)
    config = timed_config(args).model_dump(mode="json")
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="psunet-bench-")
    bare, trainer = [], []
    context = multiprocessing.get_context("spawn")
    for round_ in range(args.rounds):  # A/B/A/B: drift hits both sides alike
        with context.Pool(1) as pool:  # not in this process, whose Ray driver threads the worker does not have
            bare.append(pool.apply(_bare_loop, (config, str(device), args.steps)))
        result = TorchTrainer(
            _trainer_loop, train_loop_config={"config": config, "steps": args.steps},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=device.type == "cuda",
                                         resources_per_worker={"CPU": max(1, os.cpu_count() or 1)}),
            run_config=RunConfig(name=f"overhead-{round_}", storage_path=storage)).fit()
        trainer.append(result.metrics["seconds_per_step"])
    ratios = [b / a for a, b in zip(bare, trainer)]  # each round's pair is measured back to back
    return {"preset": args.preset, "batch_size": args.batch_size, "device": str(device), "rounds": args.rounds,
            "bare_step_ms": statistics.median(bare) * 1000, "trainer_step_ms": statistics.median(trainer) * 1000,
            "ratio": statistics.median(ratios), "round_ratios": ratios,
            "target_ratio_max": TARGETS[device.type]["overhead_ratio_max"]}


def _read_shards(folder: str, limit: int) -> dict:
    """In a fresh process: read up to `limit` samples from a shard set, report speed and peak RSS."""
    from psunet.data import ShardStream

    start, count = time.perf_counter(), 0
    for _ in ShardStream(folder, training=False, rank=0, world_size=1):
        count += 1
        if count >= limit:
            break
    return {"samples": count, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def _replicated(folder: Path, times: int) -> Path:
    """A shard set listing every shard `times` times (links, no copies): 10x the shards, same bytes on disk."""
    from psunet.data import load_manifest, write_manifest

    manifest = load_manifest(folder)
    out = Path(tempfile.mkdtemp(prefix="psunet-shards-"))
    shards = []
    for copy in range(times):
        for shard in manifest.shards:
            name = f"r{copy:02d}-{Path(shard).name}"
            (out / name).symlink_to(Path(manifest.resolve(folder, shard)).resolve())
            shards.append(name)
    assets = {"word_vectors": manifest.resolve(folder, manifest.word_vectors)}
    if manifest.autoencoder_is_local:
        assets["autoencoder"] = manifest.resolve(folder, manifest.autoencoder)
    write_manifest(out, manifest.model_copy(update={"shards": shards, "samples": manifest.samples * times, **assets}))
    return out


def ingest_wait(cfg, folder: Path, device: torch.device, steps: int, workers: int, warmup: int = 3) -> dict:
    """The job's step fed by the real shard loader (make_loader with `workers` DataLoader processes and the
    config's shuffle buffer): per step, ms blocked in next(batches) and ms computing (the device synchronised
    after each step), and the fraction of the step spent waiting. Warm-up steps (loader start, shuffle buffer
    fill) are not timed."""
    from psunet.data import make_loader

    timer = StepTimer(cfg, device)
    batches = iter(make_loader(folder, cfg.optim.batch_size, cfg.model, training=True, seed=cfg.optim.seed,
                               num_workers=workers, shuffle_buffer=cfg.data.shuffle_buffer, rank=0, world_size=1))
    for _ in range(warmup):
        timer.step(next(batches))
    sync(device)
    wait = compute = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        timer.step(batch)
        sync(device)
        wait, compute = wait + fetched - started, compute + time.perf_counter() - fetched
    return {"data_wait_fraction": wait / (wait + compute), "data_wait_ms_per_step": 1000 * wait / steps,
            "compute_ms_per_step": 1000 * compute / steps}


def bench_loader(args) -> dict:
    """The shard reader alone (1x and 10x the shards, fresh processes) against the training step's speed, and
    the training loop fed by the loader: the ingest wait with the loader in the training process (the job's
    default, data.loader_workers 0; fields without suffix) and with 2 DataLoader workers (_workers2)."""
    from psunet.data import load_manifest

    folder = Path(args.data)
    manifest = load_manifest(folder)
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        one = pool.apply(_read_shards, (str(folder), manifest.samples))
    ten_folder = _replicated(folder, 10)
    with context.Pool(1) as pool:
        ten = pool.apply(_read_shards, (str(ten_folder), 10 * manifest.samples))
    cfg, device = timed_config(args), device_of(args.device)
    train_samples_per_s = args.batch_size / StepTimer(cfg, device).seconds_per_step(args.steps)
    reader = ten["samples"] / ten["seconds"]
    figures = {"data": str(folder), "preset": args.preset, "reader_samples_per_s": reader,
               "train_samples_per_s": train_samples_per_s, "headroom": reader / train_samples_per_s,
               "samples_1x": one["samples"], "samples_10x": ten["samples"], "rss_mb_1x": one["peak_rss_mb"],
               "rss_mb_10x": ten["peak_rss_mb"], "rss_ratio_10x_over_1x": ten["peak_rss_mb"] / one["peak_rss_mb"],
               "target_headroom": TARGETS["cpu"]["loader_headroom"]}
    for workers, suffix in ((0, ""), (2, "_workers2")):
        figures.update({key + suffix: value
                        for key, value in ingest_wait(cfg, folder, device, args.steps, workers).items()})
    return figures


def _seconds(fn, device: torch.device) -> float:
    """Seconds of one call, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _time(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    return statistics.median(_seconds(fn, device) for _ in range(repeats))


def _interleaved(first, second, rounds: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of two calls timed alternately (drift and noise hit both alike)."""
    first(), second()
    pairs = [(_seconds(first, device), _seconds(second, device)) for _ in range(rounds)]
    return statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)


def bf16_denoiser(model):
    """A bare model called as PSUNetPipeline.denoise calls it at precision bf16: bf16 weights under bf16 autocast,
    the sampler's state staying fp32."""
    model.to(torch.bfloat16)
    device_type = next(model.parameters()).device.type

    def denoise(*inputs, **options):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return model(*inputs, **options)

    return denoise


@torch.no_grad()
def bench_sampling(args) -> dict:
    """Sampling speed of --model, or of a randomly initialised --preset model (speed does not depend on the
    weights), at --precision, compiled with --compile: ms per step at batch 1, 16 and 64, network evaluations
    per step, the guidance batching speedup, and with --model the end-to-end latencies."""
    from psunet.sampling import joint_infill

    from jobs.model_ref import load_pipeline

    device = device_of(args.device)
    pipe = load_pipeline(args.model, device=str(device), precision=args.precision) if args.model else None
    config = pipe.model_config if pipe else preset(args.preset)
    model = pipe.model if pipe else PSUNet(config).to(device).eval()
    diffusion = pipe.diffusion_config if pipe else DiffusionConfig()
    if args.compile:
        model = torch.compile(model)
        if pipe:
            pipe.model = model
    forward = pipe.denoise if pipe else bf16_denoiser(model) if args.precision == "bf16" else model
    figures = {"preset": args.preset if not pipe else "model", "device": str(device), "compiled": args.compile,
               "precision": args.precision, "steps": args.sample_steps}
    for batch in (1, 16, 64):
        figures[f"ms_per_step_batch{batch}"] = sampling_ms_per_step(forward, config, diffusion, batch, device,
                                                                     args.sample_steps)
    text = torch.randn(1, config.text_len, config.word_dim, device=device)
    for name, scale in (("guided", 3.0), ("unguided", 1.0)):
        out = joint_infill(forward, config, diffusion, 1, text_known=text, steps=args.sample_steps,
                           guidance_scale=scale, device=device)
        figures[f"evaluations_per_step_{name}"] = out.network_evaluations / args.sample_steps
    image = torch.randn(1, *config.latent_shape, device=device)
    times = torch.full((2, 1), 500, device=device)
    pair = (torch.cat([image, image]), torch.cat([text, text]), torch.cat([times, times], dim=1))
    together, apart = _interleaved(lambda: forward(*pair),
                                   lambda: (forward(image, text, times), forward(image, text, times)), 100, device)
    figures.update({"batched_guidance_forward_ms": together * 1000, "two_forwards_ms": apart * 1000,
                    "guidance_batching_speedup": apart / together,
                    "target_guidance_batching_speedup": TARGETS[device.type]["guidance_batching_speedup"]})
    if pipe:
        settings = SamplerSettings(steps=args.sample_steps)
        figures["text_to_image_latency_ms"] = _time(
            lambda: pipe.text_to_image([PROMPT], settings), 5, device) * 1000
        figures["image_to_text_latency_ms"] = _time(
            lambda: pipe.image_to_text(pipe.decode_images(image), settings), 5, device) * 1000
    return figures


def first_reach(points: list[tuple[float, float]], target: float, higher_is_better: bool = False) -> float:
    """First x at which an (x, value) curve reaches `target` (at or below it; at or above it when higher is
    better), linearly interpolated from the previous point; inf when it never does."""
    sign = -1 if higher_is_better else 1
    previous = None
    for x, value in points:
        if sign * value <= sign * target:
            if previous is None:
                return float(x)
            fraction = (previous[1] - target) / (previous[1] - value)
            return previous[0] + fraction * (x - previous[0])
        previous = (x, value)
    return math.inf


PROGRESS_KEYS = ("wall_seconds", "val_loss", "val_gap_image", "val_gap_text", "t2i_accuracy", "i2t_accuracy",
                 "t2i_colour", "t2i_all", "i2t_colour", "infill_colour", "joint_colour", "fid")


def train_for(cfg, model: PSUNet, steps: int, seed: int, device: torch.device, evaluate=None,
              eval_at: set[int] = frozenset(), name: str = "") -> tuple[PSUNet, list[dict]]:
    """Train `model` in this process with the training job's own step (psunet.training.Trainer) and lr schedule,
    for `steps` steps (cfg.branch.time_range limits the times); returns (EMA model, evaluation curve).

    evaluate(ema_model, step) -> dict is called after each step in `eval_at`; each curve point also has the
    wall-clock seconds spent in training steps so far."""
    from psunet.data import make_loader
    from psunet.training import Trainer

    optim = cfg.optim.model_copy(update={"steps": steps, "warmup_steps": min(cfg.optim.warmup_steps, steps - 1)})
    trainer = Trainer(model, optim, cfg.diffusion, device, time_range=cfg.branch.time_range)
    batches = iter(make_loader(cfg.data.train, cfg.optim.batch_size, cfg.model, training=True, seed=seed,
                               rank=0, world_size=1))
    curve, training_seconds = [], 0.0
    bar = progress(range(steps), desc=f"train {name}" if name else "train", unit="steps")
    for step in bar:
        started = time.perf_counter()
        trainer.step(step, [next(batches)])
        training_seconds += time.perf_counter() - started
        if evaluate and step + 1 in eval_at:
            curve.append({"step": step + 1, "wall_seconds": training_seconds, **evaluate(trainer.ema.model, step + 1)})
            bar.write(f"convergence: {name} step {step + 1} " + " ".join(
                f"{k}={v:.4g}" for k, v in curve[-1].items() if k in PROGRESS_KEYS), file=sys.stderr)
    return trainer.ema.model, curve


def activation_mb(model: PSUNet, batch_size: int, device: torch.device) -> float:
    """MB of tensors saved for backward in one training forward, the weights themselves left out: the
    activation memory of a step, any device."""
    c = model.config
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = 0

    def pack(tensor):
        nonlocal saved
        if tensor.untyped_storage().data_ptr() not in weights:
            saved += tensor.numel() * tensor.element_size()
        return tensor

    latents = torch.randn(batch_size, *c.latent_shape, device=device)
    text = torch.randn(batch_size, c.text_len, c.word_dim, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(latents, text, torch.randint(0, 1000, (batch_size,), device=device))
    out.eps_image.sum().backward()
    model.zero_grad(set_to_none=True)
    return saved / 2**20


def sampling_ms_per_step(model, config, diffusion, batch: int, device: torch.device, steps: int = 10) -> float:
    from psunet.sampling import joint_infill

    text = torch.randn(batch, config.text_len, config.word_dim, device=device)
    with torch.no_grad():
        seconds = _time(lambda: joint_infill(model, config, diffusion, batch, text_known=text, steps=steps,
                                             device=device), 5, device)
    return seconds / steps * 1000


def training_memory_mb(model: PSUNet, batch_size: int, device: torch.device) -> dict[str, float]:
    """A training step's memory, counted from the model: activations saved for backward, plus the state of
    weights, gradients, AdamW's two moments and the EMA copy (5 x the parameters, fp32)."""
    state = 5 * 4 * sum(p.numel() for p in model.parameters()) / 2**20
    activations = activation_mb(model, batch_size, device)
    return {"activation_mb": activations, "state_mb": state, "training_memory_mb": activations + state}


def equal_flops_baseline(config: ModelConfig) -> ModelConfig:
    """The U-ViT-multi baseline of `config` at PS-U-Net's FLOPs per sample instead of its parameters: the same
    depth, narrowed (in steps of the head count) to the width whose forward FLOPs come closest."""
    target = forward_flops(PSUNet(config))
    wide = baseline_of(config)
    widths = range(config.heads * max(1, 8 // config.heads), wide.width + 1, config.heads)
    return min((wide.model_copy(update={"width": width}) for width in widths),
               key=lambda c: abs(forward_flops(PSUNet(c)) - target))


def backbone_configs(base, names: list[str]) -> dict:
    """Training config per compared model, all from `base`: psunet (its model), baseline (U-ViT-multi at equal
    parameters), baseline_flops (U-ViT-multi at equal training FLOPs per sample), psunet_memory (PS-U-Net at
    the batch size whose activations fill the baseline's at base's batch), ode (neural-ODE shared blocks)."""
    def with_model(model, batch=None):
        optim = base.optim.model_copy(update={"batch_size": batch}) if batch else base.optim
        return base.model_copy(update={"model": model, "optim": optim})

    def memory_batch() -> int:
        batch = base.optim.batch_size
        per_sample = {name: activation_mb(PSUNet(model), batch, torch.device("cpu")) / batch
                      for name, model in (("psunet", base.model), ("baseline", baseline_of(base.model)))}
        return max(1, round(batch * per_sample["baseline"] / per_sample["psunet"]))

    builders = {"psunet": lambda: with_model(base.model),
                "baseline": lambda: with_model(baseline_of(base.model)),
                "baseline_flops": lambda: with_model(equal_flops_baseline(base.model)),
                "psunet_memory": lambda: with_model(base.model, memory_batch()),
                "ode": lambda: with_model(base.model.model_copy(update={"block_type": "ode"}))}
    unknown = [name for name in names if name not in builders]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {', '.join(builders)}")
    return {name: builders[name]() for name in names}


def model_costs(cfg, seconds_per_step: float, device: torch.device) -> dict:
    """What one compared model costs, from the model itself: parameters, FLOPs, memory, the measured training
    step time, and sampling ms per step at batch 1 and 16 (speed does not depend on the weights)."""
    from psunet.model import parameter_counts

    model = PSUNet(cfg.model).to(device)
    forward = forward_flops(model)
    costs = {"parameters": parameter_counts(model)["total"], "batch_size": cfg.optim.batch_size,
             "forward_flops_per_sample": forward, "train_flops_per_sample": 3 * forward,
             **training_memory_mb(model, cfg.optim.batch_size, device), "seconds_per_step": seconds_per_step,
             "samples_per_s": cfg.optim.batch_size / seconds_per_step}
    model.eval()
    for batch in (1, 16):
        costs[f"sampling_ms_per_step_batch{batch}"] = sampling_ms_per_step(model, cfg.model, cfg.diffusion, batch,
                                                                           device)
    return costs


def interleaved_step_seconds(configs: dict, device: torch.device, steps: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds per training step of each config (the job's step, synthetic batch), timed in turn
    round after round so drift and other load on the machine hit every model alike."""
    timers = {name: StepTimer(cfg, device) for name, cfg in configs.items()}
    times = {name: [] for name in configs}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.seconds_per_step(steps, warmup=1))
    return {name: statistics.median(values) for name, values in times.items()}


class HeldOut:
    """The evaluation every compared model gets: the validation losses and conditional gaps (jobs.training_run's
    Validator, on the same fixed batches for every model), and at accuracy points text->image and
    image->text attribute accuracy of held-out pairs at each direction's best guidance scale of a sweep."""

    def __init__(self, base, samples: int, scales: list[float], settings: SamplerSettings, device: torch.device):
        from jobs.quality import held_out_pairs

        self.base, self.scales, self.settings, self.device = base, scales, settings, device
        self.prompts, self.latents = held_out_pairs(base.data.val or base.data.train, samples)
        self.validators = {}  # per model config: its batches, autoencoder and codec are loaded once

    def __call__(self, model, model_config, accuracy: bool) -> dict:
        from jobs.quality import guidance_sweep, sweep_metrics
        from jobs.training_run import Validator

        key = model_config.model_dump_json()
        if key not in self.validators:
            self.validators[key] = Validator(self.base.model_copy(update={"model": model_config}), self.device)
        validator = self.validators[key]
        point = validator.loss(model)
        if accuracy:
            sweep = guidance_sweep(validator.make_pipeline(model), self.prompts, self.latents, self.scales,
                                   self.settings)
            point.update(sweep_metrics(sweep))
        return point


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max over seeds."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return {"mean": math.inf, "std": math.nan, "min": min(values), "max": max(values), "never": len(values) - len(finite)}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def axes_at(step: int, costs: dict) -> dict:
    """Where a model is after `step` steps: samples seen, training FLOPs, seconds at its measured step time."""
    samples = step * costs["batch_size"]
    return {"samples": samples, "train_flops": samples * costs["train_flops_per_sample"],
            "seconds": step * costs["seconds_per_step"]}


CURVE_METRICS = {"val_loss": False, "t2i_accuracy": True, "i2t_accuracy": True}  # name: higher is better
AXES = ("step", "train_flops", "seconds")


def reach_table(runs: dict[str, list[dict]]) -> dict:
    """For one seed's curves {model: points}: per metric, the target every model reaches (the worst final
    value among them) and where each model first reaches it on each axis (steps, training FLOPs, seconds)."""
    table = {}
    for metric, higher in CURVE_METRICS.items():
        curves = {name: [p for p in points if metric in p] for name, points in runs.items()}
        if not all(curves.values()):
            continue
        finals = [curve[-1][metric] for curve in curves.values()]
        target = min(finals) if higher else max(finals)
        table[metric] = {"target": target, **{axis: {name: first_reach([(p[axis], p[metric]) for p in curve], target,
                                                                        higher)
                                                      for name, curve in curves.items()} for axis in AXES}}
    return table


def cached_curve(folder: Path, name: str, seed: int, key: dict, label: str, train) -> list[dict]:
    """The curve of one (name, seed) run kept as JSON in `folder` under a hash of `key` (all that decides it):
    read back when there, else `train()` and kept, so a rerun with the same settings trains nothing."""
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cache = folder / f"{name}-seed{seed}-{digest}.json"
    if cache.exists():
        print(f"{label}: {name} seed {seed}: reusing {cache}", file=sys.stderr, flush=True)
        return json.loads(cache.read_text())
    curve = train()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(curve))
    return curve


def convergence_run(cfg, name: str, seed: int, steps: int, held_out: HeldOut, args, device: torch.device
                    ) -> list[dict]:
    """One model trained from `seed` for `steps`, evaluated every --eval-every steps (accuracy every
    --accuracy-every). Kept as JSON in --out-dir, so a rerun with the same settings reuses it (and only
    measures the step times again)."""
    def evaluate(model, step: int) -> dict:
        return held_out(model, cfg.model, args.accuracy and (step % args.accuracy_every == 0 or step == steps))

    def train() -> list[dict]:
        torch.manual_seed(seed)
        eval_at = {*range(args.eval_every, steps + 1, args.eval_every), steps}
        return train_for(cfg, PSUNet(cfg.model).to(device), steps, seed, device, evaluate, eval_at,
                         f"{name} seed {seed}")[1]

    key = {"config": cfg.model_dump(mode="json"), "seed": seed, "steps": steps,
           "eval": [args.eval_every, args.accuracy_every, args.samples, held_out.scales,
                    held_out.settings.model_dump(mode="json")]}
    return cached_curve(Path(args.out_dir) / "runs", name, seed, key, "convergence", train)


def bench_convergence(args) -> dict:
    """Backbones compared on the same data, seeds, data order, steps and evaluation, --seeds times.

    --against baseline (default models psunet, baseline, baseline_flops, psunet_memory): PS-U-Net against
    U-ViT-multi at equal parameters, at equal training FLOPs per sample, and PS-U-Net at the baseline's memory;
    ode: the same model with neural-ODE shared blocks; experts: K experts branched from a base trained to
    --branch-at, against one model fine-tuned from the same base for the same steps (the K = 1 control).
    Every curve is reported against steps, training FLOPs and seconds (the step time each model measured in
    an interleaved timing run on this machine), with each model's parameters, FLOPs and training memory.
    """
    from jobs.config import load_config

    device = device_of(args.device)
    base = load_config(args.config, args.overrides).resolved()
    settings = SamplerSettings(steps=args.sample_steps, seed=args.seed)
    held_out = HeldOut(base, args.samples, args.guidance_scales, settings, device)
    if args.against == "experts":
        return _experts_against_one(args, base, device, lambda model: held_out(model, base.model, args.accuracy))
    names = args.models or (["psunet", "ode"] if args.against == "ode" else
                            ["psunet", "baseline", "baseline_flops", "psunet_memory"])
    configs = backbone_configs(base, names)
    step_seconds = interleaved_step_seconds(configs, device, args.timing_steps)
    costs = {name: model_costs(cfg, step_seconds[name], device) for name, cfg in configs.items()}
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {seed: {name: [{**point, **axes_at(point["step"], costs[name])}
                          for point in convergence_run(cfg, name, seed, args.steps, held_out, args, device)]
                   for name, cfg in configs.items()} for seed in seeds}
    reach = {seed: reach_table(runs[seed]) for seed in seeds}
    figures = {"config": args.config, "against": args.against, "models": names, "steps": args.steps, "seeds": seeds,
               "samples": args.samples, "guidance_scales": args.guidance_scales, "sample_steps": args.sample_steps,
               "objective": base.diffusion.timesteps, "costs": costs}
    for name, cost in costs.items():
        figures.update({f"{key}_{name}": value for key, value in cost.items()})
    summary = {}
    for metric in CURVE_METRICS:
        if metric not in reach[seeds[0]]:
            continue
        finals = {name: spread([runs[seed][name][-1][metric] for seed in seeds]) for name in names}
        entry = {"final": finals, "target": spread([reach[seed][metric]["target"] for seed in seeds])}
        for axis in AXES:
            entry[f"reach_{axis}"] = {name: spread([reach[seed][metric][axis][name] for seed in seeds])
                                      for name in names}
            # > 1: PS-U-Net reaches the target first; per seed, then spread over seeds
            entry[f"ratio_{axis}"] = {name: spread([reach[seed][metric][axis][name] / reach[seed][metric][axis]["psunet"]
                                                    for seed in seeds]) for name in names if name != "psunet"}
        summary[metric] = entry
        figures.update({f"final_{metric}_{name}": value["mean"] for name, value in finals.items()})
        figures.update({f"{metric}_{axis}_ratio_{name}": value["mean"] for axis in AXES
                        for name, value in entry[f"ratio_{axis}"].items()})
    figures["summary"] = summary
    figures["curves"] = {name: [runs[seed][name] for seed in seeds] for name in names}
    figures["plot"] = str(plot_curves(figures["curves"], Path(args.out_dir) / f"convergence_{args.against}.png"))
    return figures


def _experts_against_one(args, base, device: torch.device, evaluate) -> dict:
    """Base to --branch-at steps; then K = 1 (one model) and K = --experts branches, each fine-tuned for the
    remaining steps from the base's EMA weights on its interval; both sample at one model's cost per step."""
    from psunet.experts import ExpertEnsemble, binary_split

    if not 0 < args.branch_at < args.steps:
        raise ValueError(f"--branch-at must be in (0, --steps={args.steps}), got {args.branch_at}")
    torch.manual_seed(args.seed)
    base_model, _ = train_for(base, PSUNet(base.model).to(device), args.branch_at, args.seed, device)
    base_weights = {k: v.clone() for k, v in base_model.state_dict().items()}
    figures = {"config": args.config, "against": "experts", "steps": args.steps, "branch_at": args.branch_at,
               "seed": args.seed, **{f"base_{k}": v for k, v in evaluate(base_model).items()}}
    tuned = args.steps - args.branch_at
    for count in (1, args.experts):
        intervals = binary_split(base.diffusion.num_train_timesteps, count)
        ensemble = ExpertEnsemble(base.model, intervals).to(device)
        for i, interval in enumerate(intervals):
            cfg = base.model_copy(update={"branch": base.branch.model_copy(update={"time_range": interval})})
            expert = PSUNet(base.model).to(device)
            expert.load_state_dict(base_weights)
            ema_model, _ = train_for(cfg, expert, tuned, args.seed + 1 + i, device)
            ensemble.experts[i].load_state_dict(ema_model.state_dict())
        point = evaluate(ensemble.eval())
        name = "one_model" if count == 1 else f"experts{count}"
        result = {"intervals": intervals, "training_steps": args.branch_at + count * tuned,
                  "sampling_ms_per_step_batch1": sampling_ms_per_step(ensemble, base.model, base.diffusion, 1, device),
                  **point}
        figures.update({f"{name}_{k}": v for k, v in result.items()})
        print(f"convergence: {name} " + json.dumps(result), file=sys.stderr, flush=True)
    return figures


def bench_objectives(args) -> dict:
    """The training objectives side by side (`diffusion.timesteps`: shared, independent, slices): each trained
    from the same seed, data order and steps with the job's own step, then evaluated on the same held-out
    samples as jobs/evaluate.py does (text->image, image->text, caption infilling, joint coherence at each
    guidance scale, the best scale per direction, FID with the autoencoder's features at the best
    text->image scale), with the validation losses and conditional gaps."""
    from jobs.config import load_config
    from jobs.quality import demo_sweep
    from jobs.training_run import Validator
    from psunet.config import DiffusionConfig

    device = device_of(args.device)
    base = load_config(args.config, args.overrides).resolved()
    if not base.data.val:
        raise ValueError("objectives: the config needs data.val (held-out samples to evaluate on)")
    settings = [SamplerSettings(steps=args.sample_steps, guidance_scale=scale) for scale in args.guidance_scales]
    figures = {"config": args.config, "steps": args.steps, "seed": args.seed, "samples": args.samples,
               "guidance_scales": args.guidance_scales}
    for objective in args.objectives:
        diffusion = DiffusionConfig.model_validate({**base.diffusion.model_dump(), "timesteps": objective})
        cfg = base.model_copy(update={"diffusion": diffusion})
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        model, _ = train_for(cfg, PSUNet(cfg.model).to(device), args.steps, args.seed, device, name=objective)
        seconds = time.perf_counter() - started
        validator = Validator(cfg, device)
        pipe = validator.make_pipeline(model.eval())
        rows, best, fid = demo_sweep(pipe, cfg.data.val, args.samples, settings, batch_size=64)
        metrics = {"train_seconds": seconds, **validator.loss(model), "fid_autoencoder_at_best_t2i": fid,
                   "best": best, "by_guidance": {row["guidance_scale_image"]: row["metrics"] for row in rows}}
        figures[objective] = metrics
        figures.update({f"{objective}_t2i_mean_accuracy": best["t2i"]["mean_accuracy"],
                        f"{objective}_i2t_mean_accuracy": best["i2t"]["mean_accuracy"],
                        f"{objective}_val_loss": metrics["val_loss"], f"{objective}_fid": fid})
        print(f"objectives: {objective} " + json.dumps({k: v for k, v in metrics.items() if k != "by_guidance"}),
              file=sys.stderr, flush=True)
    return figures


PAINT_REGIONS = {"left": (0, 8, 16, 24), "right": (16, 8, 32, 24), "top": (8, 0, 24, 16), "bottom": (8, 16, 24, 32)}


def bench_paint(args) -> dict:
    """Paint-with-words on demo data: prompts with the position left blank ("a small red circle [?] the [?]"),
    a box for the colour word at one of four positions; the fraction of samples whose object of that colour
    the attribute reader finds at that position, per paint weight (0 = no bias), same seeds throughout."""
    from dataprep import shapes
    from jobs.model_ref import load_pipeline

    device = device_of(args.device)
    pipe = load_pipeline(args.model, device=str(device))
    size = pipe.resolution
    prompts, places = [], []
    for i in range(args.samples):
        colour = shapes.COLOURS[i % len(shapes.COLOURS)]
        shape = shapes.SHAPES[(i // len(shapes.COLOURS)) % len(shapes.SHAPES)]
        prompts.append(f"a small {colour} {shape} [?] the [?]")
        places.append(list(PAINT_REGIONS)[i % len(PAINT_REGIONS)])
    paint = []
    for place in places:
        paint.append([(2, box_region([v * size // 32 for v in PAINT_REGIONS[place]], size))])
    settings = SamplerSettings(steps=args.sample_steps, seed=args.seed)
    seeds = [args.seed + i for i in range(args.samples)]
    figures = {"model": args.model, "samples": args.samples, "steps": args.sample_steps,
               "paint_fraction": args.paint_fraction}
    with progress(total=len(args.paint_weights) * args.samples, desc="paint", unit="samples") as bar:
        for weight in args.paint_weights:
            hits = 0
            for start in range(0, args.samples, 64):
                rows = slice(start, start + 64)
                result = pipe.infill(prompts=prompts[rows], settings=settings, seeds=seeds[rows],
                                     paint=paint[rows] if weight > 0 else None, paint_weight=weight,
                                     paint_fraction=args.paint_fraction)
                for image, prompt, place in zip(result.images, prompts[rows], places[rows]):
                    colour = prompt.split()[2]
                    hits += any(o.colour == colour and o.position == place for o in shapes.read_attributes(image))
                bar.update(len(result.images))
            figures[f"in_region_weight_{weight:g}"] = hits / args.samples
            bar.write(f"paint: weight {weight:g}: {hits}/{args.samples} objects in their region", file=sys.stderr)
    return figures


def plot_curves(curves: dict[str, list[list[dict]]], path: Path) -> Path:
    """One panel per (metric, axis): each model's mean over seeds, its min-max band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    first = next(iter(curves.values()))[0]
    metrics = [m for m in CURVE_METRICS if any(m in p for p in first)]
    figure, axes = plt.subplots(len(metrics), len(AXES), figsize=(4.5 * len(AXES), 3.2 * len(metrics)),
                                squeeze=False)
    for row, metric in enumerate(metrics):
        for column, axis in enumerate(AXES):
            panel = axes[row][column]
            for name, seeds in curves.items():
                points = [[p for p in seed if metric in p] for seed in seeds]
                x = np.mean([[p[axis] for p in seed] for seed in points], axis=0)
                values = np.array([[p[metric] for p in seed] for seed in points])
                panel.plot(x, values.mean(axis=0), marker="o", markersize=3, label=name)
                if len(seeds) > 1:
                    panel.fill_between(x, values.min(axis=0), values.max(axis=0), alpha=0.2)
            panel.set_xlabel({"step": "step", "train_flops": "training FLOPs", "seconds": "seconds (this machine)"}[axis])
            panel.set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _load(url: str, clients: int, requests_total: int, body_of) -> dict:
    """`requests_total` POSTs of body_of(i) from `clients` threads: requests/s, latency p50/p99 and errors (non-200)."""
    import requests
    from concurrent.futures import ThreadPoolExecutor

    def call(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        status = requests.post(url, json=body_of(i), timeout=600).status_code
        return time.perf_counter() - start, status

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(call, range(requests_total)))
    wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in results)
    return {"requests_per_s": requests_total / wall, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)],
            "errors": sum(status != 200 for _, status in results)}


MIXED_STEPS = (10, 25, 40)


def mixed_request(i: int) -> dict:
    """The mixed load: steps 10/25/40 and image/text guidance scales from 1 to 7, a seed each."""
    return {"prompt": PROMPT, "seed": i, "steps": MIXED_STEPS[i % 3], "guidance_scale_image": 1.0 + i % 7,
            "guidance_scale_text": 1.0 + (3 * i) % 5}


def bench_serve(args) -> dict:
    import socket

    import ray
    import requests
    from ray import serve

    from jobs.serve import app

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    figures = {"model": args.model, "steps": args.sample_steps, "precision": args.precision}
    try:
        for mode, batch in (("batching", 64), ("no_batching", 1)):
            serve.run(app({"model": args.model, "max_batch_size": batch, "max_samples": 1, "num_cpus": args.serve_cpus,
                           "precision": args.precision}), name="bench", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            figures["replica_threads"] = requests.get(f"{base}/v1/model", timeout=60).json()["threads"]
            for clients in (1, 4, 16):
                before = requests.get(f"{base}/v1/stats", timeout=60).json()
                result = _load(f"{base}/v1/text-to-image", clients, max(args.requests, 4 * clients),
                               lambda i: {"prompt": PROMPT, "seed": i, "steps": args.sample_steps})
                after = requests.get(f"{base}/v1/stats", timeout=60).json()
                result["requests_per_forward"] = ((after["request_forwards"] - before["request_forwards"])
                                                  / (after["forwards"] - before["forwards"]))
                figures.update({f"{mode}_{clients}c_{key}": value for key, value in result.items()})
            if mode == "batching":
                mixed = _load(f"{base}/v1/text-to-image", 16, args.load_requests, mixed_request)
                figures.update({f"mixed_16c_{key}": value for key, value in mixed.items()})
            serve.delete("bench")
    finally:
        serve.shutdown()
    figures["batching_speedup_16_clients"] = (figures["batching_16c_requests_per_s"]
                                              / figures["no_batching_16c_requests_per_s"])
    figures["target_batching_speedup_16_clients"] = TARGETS["cpu"]["serve_batching_speedup_16_clients"]
    return figures


class NothingMeasured(Exception):
    """A benchmark with nothing to measure on this machine; the message says why."""


GPU_PLAN_SECONDS = 430  # the gpu parts together; with start-up, the last part's stop and logging, under 8 minutes


def bench_gpu(args) -> dict:
    """One CUDA GPU in under 8 minutes: the coco256 preset's bf16 training MFU and sampling speed (batch 1, 16,
    64; guidance batching), eager and compiled, and a Ray Train run on the GPU that checkpoints and resumes.
    Each part runs in its own process within its time budget; one that fails or overruns leaves
    <part>_error and the others still run. Every figure is prefixed with its part's name."""
    if not torch.cuda.is_available():
        raise NothingMeasured("no GPU: torch.cuda.is_available() is false; nothing measured")
    return run_parts(gpu_parts(args), GPU_PLAN_SECONDS)


def gpu_parts(args) -> list[tuple[str, float, object, tuple]]:
    """The gpu plan as (name, weight, function, arguments): the cheap parts first, so a slow compile cannot
    starve them; train and sampling take the command line's --batch-size, --steps and --sample-steps."""
    def coco256(**changes) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(args), "preset": "coco256", "device": "cuda", "model": None,
                                     **changes})

    return [("train_eager", 1, bench_train, (coco256(compile=False),)),
            ("sampling_eager", 1, bench_sampling, (coco256(compile=False, precision="bf16"),)),
            ("resume", 3, train_resume_check, ()),
            ("train_compiled", 2.5, bench_train, (coco256(compile=True),)),
            ("sampling_compiled", 2.5, bench_sampling, (coco256(compile=True, precision="bf16"),))]


def run_parts(parts: list[tuple[str, float, object, tuple]], total_s: float) -> dict:
    """Each part in turn through timed_part, with its weight's share of the time still left (what a part
    leaves unused goes to those after it): its figures prefixed with its name, its budget and seconds."""
    if total_s <= 0 or any(weight <= 0 for _, weight, _, _ in parts):
        raise ValueError(f"run_parts needs total_s > 0 and every weight > 0, got {total_s} and "
                         f"{[weight for _, weight, _, _ in parts]}")
    deadline, figures = time.perf_counter() + total_s, {}
    for index, (name, weight, function, arguments) in enumerate(parts):
        budget = (deadline - time.perf_counter()) * weight / sum(part[1] for part in parts[index:])
        result = {"budget_s": budget, **timed_part(function, arguments, budget)}
        figures.update({f"{name}_{key}": value for key, value in result.items()})
        print(f"gpu: {name} " + json.dumps(result), file=sys.stderr, flush=True)
    return figures


def timed_part(function, arguments: tuple, budget_s: float) -> dict:
    """function(*arguments) in a fresh process (its own CUDA context and compile caches), stopped after
    budget_s: its figures and the seconds taken, or {"error": why, "seconds": ...} when it raised, died or
    overran. A budget of 0 or less starts nothing."""
    if budget_s <= 0:
        return {"error": "not started: no time left", "seconds": 0.0}
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_part_process, args=(sender, function, arguments))
    started = time.perf_counter()
    child.start()
    sender.close()  # the child holds the only sending end: its death is an EOF here
    finished, outcome = receiver.poll(budget_s), None
    if finished:
        with contextlib.suppress(EOFError):
            outcome = receiver.recv()
    seconds = time.perf_counter() - started
    _stop(child, grace_s=10 if finished else 0)
    if outcome is None:
        outcome = {"error": f"its process ended (exit code {child.exitcode}) without a result" if finished
                   else f"overran its budget of {budget_s:.0f} s"}
    return {**outcome, "seconds": seconds}


def _part_process(sender, function, arguments: tuple) -> None:
    """A part's process: its stdout goes to stderr (the benchmark's stdout is one JSON object), its figures
    or its error back through `sender`."""
    os.dup2(2, 1)
    try:
        outcome = function(*arguments)
    except Exception as exc:  # a part's failure is a figure of the plan, not a crash of it
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    sender.send(outcome)


def _stop(process, grace_s: float) -> None:
    """Wait up to grace_s for a part's process to finish (Ray and the like shut down), then end it."""
    process.join(grace_s)
    if process.is_alive():
        process.terminate()
        process.join(10)
    if process.is_alive():
        process.kill()
        process.join()


def train_resume_check(first_steps: int = 20, then_steps: int = 30) -> dict:
    """Ray Train V2 on the GPU through the training job's own run (jobs.training_run.run): a tiny shard
    set made by dataprep in a temporary folder, one run to first_steps, then the same run (name and storage)
    again to then_steps. Resumed: the second run ends at then_steps and wrote no checkpoint at or before the
    first's final step, so it started from the first's final checkpoint rather than from step 0."""
    if not 0 < first_steps < then_steps:
        raise ValueError(f"need 0 < first_steps < then_steps, got {first_steps} and {then_steps}")
    from dataprep.__main__ import main as dataprep_main

    with tempfile.TemporaryDirectory(prefix="psunet-gpu-check-") as folder:
        data, storage = Path(folder) / "data", Path(folder) / "runs"
        if dataprep_main(["demo", "--out", str(data), "--samples", "300", "--vae-steps", "200",
                          "--samples-per-shard", "100", "--val-fraction", "0.2", "--word-dim", "16"]) != 0:
            raise RuntimeError("dataprep demo failed (its error is on stderr)")
        overrides = [f"data.train={data}/train", f"data.val={data}/val", f"run.storage_path={storage}",
                     "run.name=gpu-check", "run.use_gpu=true", "run.num_workers=1"]
        started = time.perf_counter()
        first = trained_steps(overrides + [f"optim.steps={first_steps}"])
        between = time.perf_counter()
        before = checkpoint_steps(storage)
        second = trained_steps(overrides + [f"optim.steps={then_steps}"])
        written = sorted(step for key, step in checkpoint_steps(storage).items() if key not in before)
    return {"first_final_step": first, "second_final_step": second,
            "second_checkpoint_steps": written, "first_run_s": between - started,
            "second_run_s": time.perf_counter() - between,
            "resumed": second == then_steps and bool(written) and min(written) > first}


def trained_steps(overrides: list[str]) -> int:
    """A training run of configs/tiny.yaml with `overrides` (jobs.training_run.run, what jobs/train.py runs), its
    prints passed on to stderr; its final step."""
    from jobs.config import load_config
    from jobs.training_run import run

    with contextlib.redirect_stdout(sys.stderr):
        result = run(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides))[0]
    return result.metrics["step"]


def checkpoint_steps(storage: Path) -> dict[tuple[str, int], int]:
    """Every training checkpoint under storage (a state.json beside model.safetensors): (path, time written)
    -> its step, so a checkpoint written again at the same path counts as new."""
    return {(str(state), state.stat().st_mtime_ns): json.loads(state.read_text())["step"]
            for state in storage.rglob("state.json") if (state.parent / "model.safetensors").is_file()}


def log_to_mlflow(uri: str, command: str, figures: dict) -> str:
    client = tracking.client(uri)
    run_id = tracking.create_run(client, "psunet-benchmark", "runs", command, tags={"psunet.benchmark": command},
                                 params={key: value for key, value in figures.items() if isinstance(value, str)})
    metrics = {key: value for key, value in figures.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
    points = [(f"{name}_seed{seed}_{key}", value, point["step"])  # convergence: every point at its step
              for name, seeds in (figures.get("curves") or {}).items()
              for seed, curve in zip(figures["seeds"], seeds) for point in curve
              for key, value in point.items() if key != "step" and math.isfinite(value)]
    tracking.log_metrics(client, run_id, metrics, points=points)
    if figures.get("plot"):
        client.log_artifact(run_id, figures["plot"])
    client.set_terminated(run_id)
    return run_id


def bench_checkpoints(args) -> dict:
    """The training job (Ray Train, --workers workers, --config) run three times for --steps steps with a
    checkpoint every --checkpoint-every: sync upload, async upload, async upload with every checkpoint validated
    by a Ray task beside the workers. Per run, from its MLflow metrics: the training loop's stall per checkpoint
    (writing it, the report barrier, a sync upload), samples/s (median of the logged windows after the first),
    the data-wait fraction; and the validation task's seconds per checkpoint: what every worker would wait if
    validation ran inside the loop."""
    from jobs.config import load_config
    from jobs.training_run import run

    variants = {"sync": ["run.checkpoint_upload=sync", "schedule.validate_checkpoints=false"],
                "async": ["run.checkpoint_upload=async", "schedule.validate_checkpoints=false"],
                "async_validated": ["run.checkpoint_upload=async", "schedule.validate_checkpoints=true"]}
    figures = {"workers": args.workers, "steps": args.steps, "checkpoint_every": args.checkpoint_every}
    stamp = time.strftime("%Y%m%d-%H%M%S")  # new runs, also in a --storage-path that holds earlier ones
    with tempfile.TemporaryDirectory() as storage:
        for name, overrides in variants.items():
            cfg = load_config(args.config, [*args.overrides, f"optim.steps={args.steps}",
                                            f"schedule.checkpoint_every={args.checkpoint_every}",
                                            f"schedule.sample_every={args.steps}", f"run.num_workers={args.workers}",
                                            f"run.name=checkpoints-{name}-{stamp}",
                                            f"run.storage_path={args.storage_path or storage}",
                                            f"run.mlflow_tracking_uri=sqlite:///{storage}/mlflow.db", *overrides])
            print(f"benchmark: checkpoints: {name} ({args.steps} steps)", file=sys.stderr, flush=True)
            run_id = run(cfg)[1]
            client = tracking.client(f"sqlite:///{storage}/mlflow.db")
            history = {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
                       for key in ("checkpoint_stall_s", "samples_per_s", "data_wait_fraction", "validation_s")}
            figures.update({f"{name}_checkpoint_stall_ms": 1000 * statistics.median(history["checkpoint_stall_s"]),
                            f"{name}_checkpoint_stall_ms_max": 1000 * max(history["checkpoint_stall_s"]),
                            f"{name}_samples_per_s": statistics.median(history["samples_per_s"][1:]),
                            f"{name}_data_wait_fraction": statistics.median(history["data_wait_fraction"][1:])})
            if history["validation_s"]:  # the largest: the last checkpoint's, with sample grids and accuracies
                figures.update(validation_s_median=statistics.median(history["validation_s"]),
                               validation_s_max=max(history["validation_s"]))
    figures["async_stall_ratio"] = figures["async_checkpoint_stall_ms"] / figures["sync_checkpoint_stall_ms"]
    figures["validation_slowdown"] = figures["async_samples_per_s"] / figures["async_validated_samples_per_s"]
    return figures


def bench_time_to_quality(args) -> dict:
    from jobs.time_to_quality import time_to_quality

    return time_to_quality(args)


COMMANDS = {"train": bench_train, "overhead": bench_overhead, "loader": bench_loader, "sampling": bench_sampling,
            "convergence": bench_convergence, "objectives": bench_objectives, "serve": bench_serve,
            "paint": bench_paint, "gpu": bench_gpu, "checkpoints": bench_checkpoints,
            "time-to-quality": bench_time_to_quality}


def machine_figures() -> dict:
    """What every benchmark's JSON says about the machine it ran on."""
    return {"torch": torch.__version__, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--preset", default="demo", help="model preset (train, overhead, loader, sampling)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps; convergence: training steps")
    parser.add_argument("--rounds", type=int, default=3, help="overhead: A/B rounds")
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--data", help="loader: a shard folder")
    parser.add_argument("--model", help="sampling (end-to-end latency), serve: model folder or MLflow URI")
    parser.add_argument("--sample-steps", type=int, default=SamplerSettings.model_fields["steps"].default)
    parser.add_argument("--compile", action="store_true", help="train, sampling: torch.compile the model")
    parser.add_argument("--requests", type=int, default=32, help="serve: requests per client count")
    parser.add_argument("--load-requests", type=int, default=200,
                        help="serve: requests of the mixed load (16 clients, steps 10/25/40, guidance 1-7)")
    parser.add_argument("--serve-cpus", type=float, help="serve: CPUs (= torch threads) of the model replica; "
                        "default: the service's (all of the node's on CPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="sampling, serve: the denoiser's precision (bf16: GPUs, CPUs with native bf16)")
    parser.add_argument("--config", default="configs/demo.yaml",
                        help="training config: convergence trains with it; train, overhead, loader time its step")
    parser.add_argument("--eval-every", type=int, default=250, help="convergence: validation losses every N steps")
    parser.add_argument("--accuracy-every", type=int, help="convergence: the accuracy sweep every N steps "
                        "(default: --eval-every; always at the last step)")
    parser.add_argument("--seeds", type=int, default=1, help="convergence: seeds --seed, --seed+1, ...; figures "
                        "give mean and spread over them")
    parser.add_argument("--models", type=lambda text: text.split(","),
                        help="convergence: compared models (psunet, baseline, baseline_flops, psunet_memory, ode); "
                        "default: by --against")
    parser.add_argument("--timing-steps", type=int, default=10, help="convergence: steps per model per round of "
                        "the interleaved step timing")
    parser.add_argument("--against", choices=("baseline", "ode", "experts"), default="baseline",
                        help="convergence: the U-ViT-multi baseline, neural-ODE shared blocks, or K experts")
    parser.add_argument("--experts", type=int, default=2, help="convergence --against experts: K")
    parser.add_argument("--branch-at", type=int, help="convergence --against experts: base steps (default 2/3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                        help="convergence: skip text->image accuracy (non-demo data)")
    parser.add_argument("--samples", type=int, default=128, help="paint: samples per weight; objectives, "
                        "convergence: held-out samples evaluated")
    parser.add_argument("--objectives", type=lambda text: text.split(","), default=["shared", "independent", "slices"],
                        help="objectives: the diffusion.timesteps settings compared")
    parser.add_argument("--guidance-scales", type=parse_guidance,
                        default=[1.0, 2.0, 3.0, 5.0, 7.0], help="objectives, convergence: the guidance sweep "
                        "(both modalities)")
    parser.add_argument("--paint-weights", type=lambda text: [float(v) for v in text.split(",")], default=[0, 1, 4],
                        help="paint: comma-separated weights w (0 = no bias)")
    parser.add_argument("--paint-fraction", type=float, default=1.0, help="paint: share of steps with the bias")
    parser.add_argument("--out-dir", default="runs/benchmark", help="convergence, time-to-quality: where the curves "
                        "PNG and the cached runs go")
    parser.add_argument("--recipes", default="configs/studies/objective.yaml",
                        help="time-to-quality: a YAML file of recipes (name: [section.field=value, ...])")
    parser.add_argument("--only", type=lambda text: text.split(","), help="time-to-quality: these recipes only")
    parser.add_argument("--eval-at", type=lambda text: [int(v) for v in text.split(",")], default=[250, 500, 750, 1000],
                        help="time-to-quality: the steps at which each run is evaluated (the last step always)")
    parser.add_argument("--workers", type=int, default=1, help="checkpoints: training workers")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="checkpoints: steps between checkpoints")
    parser.add_argument("--storage-path", help="checkpoints: where checkpoints go (a folder or a storage URI); "
                        "default: a temporary folder")
    parser.add_argument("--tracking-uri", help="MLflow store; default: $MLFLOW_TRACKING_URI, else runs/mlflow.db")
    parser.add_argument("overrides", nargs="*", help="convergence: section.field=value for the config")
    args = parser.parse_intermixed_args(argv)
    if args.accuracy_every is None:
        args.accuracy_every = args.eval_every
    if args.branch_at is None:
        args.branch_at = 2 * args.steps // 3
    for name in ("batch_size", "steps", "rounds", "sample_steps", "requests", "eval_every", "samples", "experts",
                 "accuracy_every", "seeds", "timing_steps", "workers", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.command == "loader" and not args.data:
        parser.error("loader needs --data <shard folder>")
    if args.command in ("serve", "paint") and not args.model:
        parser.error(f"{args.command} needs --model: a {MODEL_HELP}")
    try:
        figures = {"benchmark": args.command, **COMMANDS[args.command](args), **machine_figures()}
    except NothingMeasured as exc:  # nothing to log: say why, and that is a success
        print(json.dumps({"benchmark": args.command, **machine_figures(), "message": str(exc)}), flush=True)
        return 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    figures["mlflow_run_id"] = log_to_mlflow(tracking_uri(args.tracking_uri), args.command, figures)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
