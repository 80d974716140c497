"""The system around the model: the Serve deployment under load (serve) and past its bound (overload),
checkpointing beside training (checkpoints) and one CUDA GPU end to end (gpu)."""

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from ray import serve

from dataprep.__main__ import main as dataprep_main
from jobs import tracking
from jobs.bench.common import (PROMPT, TARGETS, NothingMeasured, add_command, add_config, add_model,
                               add_sample_steps, count, needs_model)
from jobs.bench.parts import run_parts
from jobs.bench.speed import add_precision, bench_sampling, bench_train
from jobs.config import load_config
from jobs.local_ray import free_port, init_local_ray
from jobs.serve import app
from jobs.training_run import run

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/tiny.yaml for the GPU resume check


# --- serve


def _calls(url: str, clients: int, requests_total: int, body_of) -> tuple[float, list[tuple[float, int]]]:
    """`requests_total` POSTs of body_of(i) from `clients` threads: (wall seconds, [(seconds, status)])."""
    def call(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        status = requests.post(url, json=body_of(i), timeout=600).status_code
        return time.perf_counter() - start, status

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(call, range(requests_total)))
    return time.perf_counter() - start, results


def _ms(seconds: list[float], quantile: float) -> float:
    """The quantile of some latencies, in milliseconds (nearest rank)."""
    ordered = sorted(seconds)
    return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(quantile * len(ordered)) - 1))]


def _load(url: str, clients: int, requests_total: int, body_of) -> dict:
    """`requests_total` POSTs of body_of(i) from `clients` threads: requests/s, latency p50/p99 and errors (non-200)."""
    wall, results = _calls(url, clients, requests_total, body_of)
    latencies = [seconds for seconds, _ in results]
    return {"requests_per_s": requests_total / wall, "p50_ms": _ms(latencies, 0.5), "p99_ms": _ms(latencies, 0.99),
            "errors": sum(status != 200 for _, status in results)}


def _serve_port() -> int:
    """Ray and Serve started here, Serve's HTTP on a free port of 127.0.0.1."""
    init_local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


MIXED_STEPS = (10, 25, 40)


def mixed_request(i: int) -> dict:
    """The mixed load: steps 10/25/40 and image/text guidance scales from 1 to 7, a seed each."""
    return {"prompt": PROMPT, "seed": i, "steps": MIXED_STEPS[i % 3], "guidance_scale_image": 1.0 + i % 7,
            "guidance_scale_text": 1.0 + (3 * i) % 5}


def bench_serve(args) -> dict:
    """Serve text-to-image over HTTP at 1, 4 and 16 clients, batching on against off, and a mixed load.

    Requests/s and p50/p99 latency at 1, 4 and 16 concurrent clients (at least 4 requests per client),
    batching on (max_batch_size 64: step-level batching) and off (1: one request at a time); requests per
    forward (from /v1/stats); the replica's torch threads; with batching on, a mixed load of --load-requests
    requests from 16 clients (steps 10/25/40, image guidance 1-7, text guidance 1-5): requests/s, p50/p99, errors."""
    port = _serve_port()
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


def bench_overload(args) -> dict:
    """The service past its bound: --clients concurrent text-to-image requests at once against a replica that holds
    at most --bound (max_pending_requests). How fast a refused request gets its 503 (p50 and slowest), the
    admitted requests' latency p50/p99, how many of each, and the service's own count of refusals."""
    port = _serve_port()
    base = f"http://127.0.0.1:{port}"
    try:
        serve.run(app({"model": args.model, "max_pending_requests": args.bound, "max_samples": 1,
                       "max_steps": args.sample_steps, "num_cpus": args.serve_cpus}), name="bench", route_prefix="/")
        _, results = _calls(f"{base}/v1/text-to-image", args.clients, args.clients,
                            lambda i: {"prompt": PROMPT, "seed": i, "steps": args.sample_steps})
        stats = requests.get(f"{base}/v1/stats", timeout=60).json()
        healthy = requests.get(f"{base}/healthz", timeout=60).status_code == 200
    finally:
        serve.shutdown()
    admitted = [seconds for seconds, status in results if status == 200]
    refused = [seconds for seconds, status in results if status == 503]
    if not admitted or not refused:
        raise NothingMeasured(f"overload: {len(admitted)} admitted and {len(refused)} refused of {args.clients}: "
                              "give more --clients or a smaller --bound")
    return {"model": args.model, "steps": args.sample_steps, "clients": args.clients, "bound": args.bound,
            "admitted": len(admitted), "refused": len(refused), "other": len(results) - len(admitted) - len(refused),
            "refused_p50_ms": _ms(refused, 0.5), "refused_max_ms": 1000 * max(refused),
            "admitted_p50_ms": _ms(admitted, 0.5), "admitted_p99_ms": _ms(admitted, 0.99),
            "service_refused_overloaded": stats["refused_overloaded"], "healthy_after": healthy}


# --- checkpoints


def bench_checkpoints(args) -> dict:
    """Checkpoint stall of the training job, sync against async upload, and validation beside the workers.

    The training job (Ray Train, --workers workers, --config) run three times for --steps steps with a
    checkpoint every --checkpoint-every: sync upload, async upload, async upload with every checkpoint validated
    by a Ray task beside the workers. Per run, from its MLflow metrics: the training loop's stall per checkpoint
    (writing it, the report barrier, a sync upload), samples/s (median of the logged windows after the first),
    the data-wait fraction; and the validation task's seconds per checkpoint: what every worker would wait if
    validation ran inside the loop."""
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


# --- gpu


GPU_PLAN_SECONDS = 430  # the gpu parts together; with start-up, the last part's stop and logging, under 8 minutes


def bench_gpu(args) -> dict:
    """One CUDA GPU in under 8 minutes: coco256 bf16 MFU and sampling, eager and compiled; Ray Train GPU resume.

    The coco256 preset's bf16 training MFU and sampling speed (batch 1, 16, 64; guidance batching), eager and
    compiled, and a Ray Train run on the GPU that checkpoints and resumes. Each part runs in its own process
    within its time budget; one that fails or overruns leaves <part>_error and the others still run. Every
    figure is prefixed with its part's name. Without a GPU it says so, measures nothing and succeeds."""
    if not torch.cuda.is_available():
        raise NothingMeasured("no GPU: torch.cuda.is_available() is false; nothing measured")
    return run_parts(gpu_parts(args), GPU_PLAN_SECONDS)


def gpu_parts(args) -> list[tuple[str, float, object, tuple]]:
    """The gpu plan as (name, weight, function, arguments): the cheap parts first, so a slow compile cannot
    starve them; train and sampling take the command line's --config, --batch-size, --steps and --sample-steps."""
    def coco256(**changes):
        return argparse.Namespace(preset="coco256", device="cuda", model=None, config=args.config,
                                  batch_size=args.batch_size, steps=args.steps, sample_steps=args.sample_steps,
                                  **changes)

    return [("train_eager", 1, bench_train, (coco256(compile=False),)),
            ("sampling_eager", 1, bench_sampling, (coco256(compile=False, precision="bf16"),)),
            ("resume", 3, train_resume_check, ()),
            ("train_compiled", 2.5, bench_train, (coco256(compile=True),)),
            ("sampling_compiled", 2.5, bench_sampling, (coco256(compile=True, precision="bf16"),))]


def train_resume_check(first_steps: int = 20, then_steps: int = 30) -> dict:
    """Ray Train V2 on the GPU through the training job's own run (jobs.training_run.run): a tiny shard
    set made by dataprep in a temporary folder, one run to first_steps, then the same run (name and storage)
    again to then_steps. Resumed: the second run ends at then_steps and wrote no checkpoint at or before the
    first's final step, so it started from the first's final checkpoint rather than from step 0."""
    if not 0 < first_steps < then_steps:
        raise ValueError(f"need 0 < first_steps < then_steps, got {first_steps} and {then_steps}")
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
    with contextlib.redirect_stdout(sys.stderr):
        result = run(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides))[0]
    return result.metrics["step"]


def checkpoint_steps(storage: Path) -> dict[tuple[str, int], int]:
    """Every training checkpoint under storage (a state.json beside model.safetensors): (path, time written)
    -> its step, so a checkpoint written again at the same path counts as new."""
    return {(str(state), state.stat().st_mtime_ns): json.loads(state.read_text())["step"]
            for state in storage.rglob("state.json") if (state.parent / "model.safetensors").is_file()}


# --- the command line


def add_commands(subparsers) -> None:
    serving = add_command(subparsers, "serve", bench_serve, check=needs_model)
    add_model(serving, "the model served (required)")
    add_sample_steps(serving, "sampler steps of each request of the 1/4/16-client loads")
    serving.add_argument("--requests", type=count, default=32, help="requests per client count (at least 4 per "
                        "client)")
    serving.add_argument("--load-requests", type=int, default=200,
                        help="requests of the mixed load (16 clients, steps 10/25/40, image guidance 1-7, text 1-5)")
    serving.add_argument("--serve-cpus", type=float, help="CPUs (= torch threads) of the model replica; default: the "
                        "service's (all of the node's on CPU)")
    add_precision(serving, "the replica's denoiser precision (bf16: GPUs, CPUs with native bf16)")

    overload = add_command(subparsers, "overload", bench_overload, check=needs_model)
    add_model(overload, "the model served (required)")
    add_sample_steps(overload, "sampler steps of each request")
    overload.add_argument("--clients", type=count, default=64, help="requests sent at once, one per client")
    overload.add_argument("--bound", type=count, default=8, help="the replica's max_pending_requests")
    overload.add_argument("--serve-cpus", type=float, help="CPUs (= torch threads) of the model replica; default: "
                          "the service's")

    checkpoints = add_command(subparsers, "checkpoints", bench_checkpoints)
    add_config(checkpoints, "the training job's config", overrides="changes to --config (e.g. schedule.samples=32)")
    checkpoints.add_argument("--steps", type=count, default=20, help="training steps of each of the three runs")
    checkpoints.add_argument("--checkpoint-every", type=count, default=25, help="steps between checkpoints")
    checkpoints.add_argument("--workers", type=count, default=1, help="training workers")
    checkpoints.add_argument("--storage-path", help="where checkpoints go (a folder or a storage URI); default: a "
                             "temporary folder")

    gpu = add_command(subparsers, "gpu", bench_gpu)
    add_config(gpu, "training config whose step the train parts time (with the coco256 model)")
    gpu.add_argument("--batch-size", type=count, default=32, help="samples per training step of the train parts")
    gpu.add_argument("--steps", type=count, default=20, help="timed training steps of the train parts")
    add_sample_steps(gpu, "sampler steps of the sampling parts")
