"""Quality side by side: the training objectives (objectives) and paint-with-words (paint), each on the same
held-out demo samples and seeds throughout."""

import json
import sys
import time

import torch

from dataprep import shapes
from jobs.bench.common import (add_command, add_config, add_device, add_guidance_scales, add_model,
                               add_sample_steps, add_seed, count, device_of, name_list, needs_model, train_for)
from jobs.config import load_config
from jobs.model_ref import load_pipeline
from jobs.quality import demo_sweep
from jobs.training_run import Validator
from psunet.config import DiffusionConfig
from psunet.model import PSUNet
from psunet.paint import box_region
from psunet.progress import progress
from psunet.settings import SamplerSettings

PAINT_REGIONS = {"left": (0, 8, 16, 24), "right": (16, 8, 32, 24), "top": (8, 0, 24, 16), "bottom": (8, 16, 24, 32)}


def bench_objectives(args) -> dict:
    """The training objectives (diffusion.timesteps: shared, independent, slices) trained and evaluated alike.

    Each trained from the same seed, data order and steps with the job's own step, then evaluated on the same
    held-out samples as jobs/evaluate.py does (text->image, image->text, caption infilling, joint coherence at
    each guidance scale, the best scale per direction, FID with the autoencoder's features at the best
    text->image scale), with the validation losses and conditional gaps."""
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


def bench_paint(args) -> dict:
    """Paint-with-words on demo data: the fraction of objects that land in their painted region, per weight.

    Prompts with the position left blank ("a small red circle [?] the [?]"), a box for the colour word at one
    of four positions; the fraction of samples whose object of that colour the attribute reader finds at that
    position, per paint weight (0 = no bias), same seeds throughout."""
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


def weights(text: str) -> list[float]:
    """'0,1,4' -> [0.0, 1.0, 4.0]"""
    return [float(value) for value in text.split(",")]


def add_commands(subparsers) -> None:
    objectives = add_command(subparsers, "objectives", bench_objectives)
    add_config(objectives, "training config every objective trains with (data.val: the held-out samples)",
               overrides="changes to --config (e.g. optim.batch_size=64)")
    objectives.add_argument("--objectives", type=name_list, default=["shared", "independent", "slices"],
                            help="the diffusion.timesteps settings compared, comma-separated")
    objectives.add_argument("--steps", type=count, default=20, help="training steps of each objective")
    add_seed(objectives, "seed of every objective's model and data order")
    objectives.add_argument("--samples", type=count, default=128, help="held-out samples evaluated")
    add_guidance_scales(objectives, "the evaluation's guidance scales")
    add_sample_steps(objectives, "sampler steps of the evaluation")
    add_device(objectives)

    paint = add_command(subparsers, "paint", bench_paint, check=needs_model)
    add_model(paint, "the demo model that paints (required)")
    paint.add_argument("--samples", type=count, default=128, help="samples per paint weight")
    paint.add_argument("--paint-weights", type=weights, default=[0, 1, 4],
                       help="comma-separated weights w (0 = no bias)")
    paint.add_argument("--paint-fraction", type=float, default=1.0, help="share of the sampler steps with the bias")
    add_sample_steps(paint, "sampler steps per sample")
    add_seed(paint, "the first sample's seed (sample i: --seed + i)")
    add_device(paint)
