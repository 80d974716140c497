"""Speed: the training step (train), its cost under Ray Train (overhead), the data path against it (loader) and
sampling (sampling); each against its target in TARGETS."""

import argparse
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs.bench.common import (PROMPT, TARGETS, StepTimer, add_command, add_config, add_device, add_model,
                               add_sample_steps, count, device_of, median_seconds, sampling_ms_per_step, seconds_of,
                               sync)
from jobs.config import TrainJobConfig, load_config
from jobs.local_ray import init_local_ray
from jobs.model_ref import load_pipeline
from psunet.config import DiffusionConfig, preset
from psunet.data import ShardStream, load_manifest, make_loader, write_manifest
from psunet.model import PSUNet, forward_flops, train_flops
from psunet.sampling import joint_infill
from psunet.settings import SamplerSettings


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_config(args):
    """What train, overhead, loader and gpu time: the job's config (--config) with the --preset model and
    --batch-size."""
    cfg = load_config(args.config, [f"optim.batch_size={args.batch_size}"])
    return cfg.model_copy(update={"model": preset(args.preset)})


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Measured FLOP/s of a large square matmul in `dtype`, the training step's (the denominator of MFU)."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            a @ b
        calls += 4
        sync(device)
    return 2 * size**3 * calls / (time.perf_counter() - start)


# --- train


def bench_train(args) -> dict:
    """Training samples/s of the job's own step on one fixed batch, FLOPs, measured matmul peak, MFU, memory.

    The step of --config (loss, clipping, fused AdamW, EMA) with the --preset model and --batch-size, after 3
    warm-up steps; FLOPs per sample from torch's FLOP counter (forward, x3 for a step); the peak of a large
    matmul in the training dtype measured in the same run; MFU = achieved / peak; peak memory (GPU: allocated,
    CPU: the process's RSS)."""
    device = device_of(args.device)
    cfg = timed_config(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"compile": args.compile})}), device)
    seconds = timer.seconds_per_step(args.steps)
    model = PSUNet(cfg.model)
    forward, train = forward_flops(model), train_flops(model)
    samples_per_s = args.batch_size / seconds
    achieved = samples_per_s * train
    dtype = torch.bfloat16 if timer.trainer.use_bf16 else torch.float32
    peak = matmul_peak(device, dtype)
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"preset": args.preset, "batch_size": args.batch_size, "device": str(device), "compiled": args.compile,
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "samples_per_s": samples_per_s, "step_ms": seconds * 1000, "forward_flops_per_sample": forward,
            "train_flops_per_sample": train, "achieved_flops": achieved, "matmul_peak_flops": peak,
            "mfu": achieved / peak, "peak_memory_mb": memory, "target_mfu": TARGETS[device.type]["mfu"]}


# --- overhead


def _bare_loop(config: dict, device: str, steps: int) -> float:
    """In a fresh process, as a Train worker is: seconds per step of the bare loop."""
    return StepTimer(TrainJobConfig.model_validate(config), torch.device(device)).seconds_per_step(steps)


def _trainer_loop(config: dict) -> None:
    """One TorchTrainer worker: the same StepTimer, its model prepared by Ray Train."""
    timer = StepTimer(TrainJobConfig.model_validate(config["config"]), ray.train.torch.get_device(),
                      parallel=ray.train.torch.prepare_model)
    seconds = timer.seconds_per_step(config["steps"])
    with tempfile.TemporaryDirectory() as folder:  # Train V2 keeps the metrics of reports with a checkpoint
        ray.train.report({"seconds_per_step": seconds}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def bench_overhead(args) -> dict:
    """The job's step in a bare loop against the same step in a 1-worker TorchTrainer, interleaved A/B/A/B.

    The bare loop runs in a fresh process, as a Train worker does; each round times both back to back, and the
    figure is the median of the rounds' step-time ratios (trainer / bare)."""
    device = device_of(args.device)
    config = timed_config(args).model_dump(mode="json")
    init_local_ray()
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


# --- loader


def _read_shards(folder: str, limit: int) -> dict:
    """In a fresh process: read up to `limit` samples from a shard set, report speed and peak RSS."""
    start, samples = time.perf_counter(), 0
    for _ in ShardStream(folder, training=False, rank=0, world_size=1):
        samples += 1
        if samples >= limit:
            break
    return {"samples": samples, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def replicated(folder: Path, times: int) -> Path:
    """A shard set listing every shard `times` times (links, no copies): 10x the shards, same bytes on disk."""
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
    """The shard reader against the training step's speed, its memory at 1x and 10x the shards, the ingest wait.

    The shard reader alone (1x and 10x the shards, fresh processes: samples/s and peak RSS) against the training
    step's samples/s, and the training loop fed by the loader: the ingest wait with the loader in the training
    process (the job's default, data.loader_workers 0; fields without suffix) and with 2 DataLoader workers
    (_workers2)."""
    folder = Path(args.data)
    manifest = load_manifest(folder)
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        one = pool.apply(_read_shards, (str(folder), manifest.samples))
    ten_folder = replicated(folder, 10)
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


def check_loader(parser, args) -> None:
    if not args.data:
        parser.error("loader needs --data <shard folder>")


# --- sampling


def interleaved(first, second, rounds: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of two calls timed alternately (drift and noise hit both alike)."""
    first(), second()
    pairs = [(seconds_of(first, device), seconds_of(second, device)) for _ in range(rounds)]
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
    """Sampling speed: ms per sampler step at batch 1, 16, 64, guidance batching, end-to-end latency.

    Of --model, or of a randomly initialised --preset model (speed does not depend on the weights), at
    --precision, compiled with --compile: ms per step at batch 1, 16 and 64 (median of 5 runs), network
    evaluations per step with guidance on and off, one batched cond+uncond forward against two forwards at
    batch 1 (medians of 100 alternating pairs), and with --model the end-to-end text->image and image->text
    latencies (autoencoder and caption decoding included)."""
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
    together, apart = interleaved(lambda: forward(*pair),
                                  lambda: (forward(image, text, times), forward(image, text, times)), 100, device)
    figures.update({"batched_guidance_forward_ms": together * 1000, "two_forwards_ms": apart * 1000,
                    "guidance_batching_speedup": apart / together,
                    "target_guidance_batching_speedup": TARGETS[device.type]["guidance_batching_speedup"]})
    if pipe:
        settings = SamplerSettings(steps=args.sample_steps)
        figures["text_to_image_latency_ms"] = median_seconds(
            lambda: pipe.text_to_image([PROMPT], settings), 5, device) * 1000
        figures["image_to_text_latency_ms"] = median_seconds(
            lambda: pipe.image_to_text(pipe.decode_images(image), settings), 5, device) * 1000
    return figures


def add_timed_model(parser: argparse.ArgumentParser, steps_help: str) -> None:
    """The options of the training-step timings (train, overhead, loader): the model, batch, steps, config."""
    parser.add_argument("--preset", default="demo", help="model preset whose training step is timed")
    parser.add_argument("--batch-size", type=count, default=32, help="samples per training step")
    parser.add_argument("--steps", type=count, default=20, help=steps_help)
    add_config(parser, "training config whose step is timed (its optimizer, diffusion and precision settings; "
                       "the model is --preset's)")
    add_device(parser)


def add_precision(parser, help: str) -> None:
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help=help)


def add_commands(subparsers) -> None:
    train = add_command(subparsers, "train", bench_train)
    add_timed_model(train, "timed training steps (after 3 warm-up steps)")
    train.add_argument("--compile", action="store_true", help="torch.compile the model's forward")

    overhead = add_command(subparsers, "overhead", bench_overhead)
    add_timed_model(overhead, "timed training steps of each side in each round (after 3 warm-up steps)")
    overhead.add_argument("--rounds", type=count, default=3, help="A/B rounds (bare loop, then TorchTrainer)")

    loader = add_command(subparsers, "loader", bench_loader, check=check_loader)
    add_timed_model(loader, "timed training steps: on the synthetic batch, and fed by the loader (each after 3 "
                            "warm-up steps)")
    loader.add_argument("--data", help="a shard folder (required), e.g. data/demo/train")

    sampling = add_command(subparsers, "sampling", bench_sampling)
    sampling.add_argument("--preset", default="demo", help="model preset timed without --model (random weights)")
    add_model(sampling, "time this model instead of a --preset one, with its end-to-end latencies")
    add_sample_steps(sampling, "sampler steps of every timed sample")
    add_precision(sampling, "the denoiser's precision (bf16: GPUs, CPUs with native bf16)")
    sampling.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_device(sampling)
