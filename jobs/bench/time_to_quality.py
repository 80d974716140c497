"""Time to quality: the training steps (and seconds) each recipe needs to reach fixed quality thresholds.

    python jobs/benchmark.py time-to-quality --config configs/demo.yaml --recipes configs/studies/objective.yaml \
        --seeds 3 --steps 1000 --eval-at 250,500,750,1000 --samples 128

A recipe is a named set of config overrides (a YAML mapping: name -> [section.field=value, ...]). Every recipe is
trained from the same seeds, data order and steps with the training job's own step, and its EMA model is evaluated
at each --eval-at step on the same held-out samples as jobs/evaluate.py evaluates a model: text->image and
image->text attribute accuracy at each direction's best guidance scale of the sweep (95 % Wilson intervals),
caption infilling, the colour coherence of joint pairs, FID with the autoencoder's features at the best
text->image scale, and the validation loss. The result: per recipe the step (and training seconds) at which each
threshold is first reached (interpolated between evaluations; "never" within the steps), and the final values,
each as mean, spread and min-max over seeds; a Markdown table and curves (PNG) of every metric against steps.
Each (recipe, seed) run is kept as JSON under --out-dir, keyed by all that decides it, so a rerun only trains
what is new.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from dataprep.shapes import ATTRIBUTES
from jobs.bench.common import (add_command, add_config, add_device, add_guidance_scales, add_sample_steps, add_seed,
                               cached_curve, count, device_of, first_reach, name_list, pyplot, save_figure, spread,
                               train_for)
from jobs.config import load_config
from jobs.quality import demo_sweep
from jobs.training_run import Validator
from psunet.model import PSUNet
from psunet.settings import SamplerSettings

# metric: (threshold, higher is better); the targets of the demo at its 1500 steps
THRESHOLDS = {"t2i_colour": (0.90, True), "t2i_all": (0.55, True), "i2t_colour": (0.90, True),
              "infill_colour": (0.80, True), "fid": (12.0, False)}
CURVES = ("t2i_colour", "t2i_shape", "t2i_all", "i2t_colour", "i2t_shape", "i2t_position", "i2t_well_formed",
          "infill_colour", "joint_colour", "fid", "val_loss")
LOWER_IS_BETTER = {"fid", "val_loss"}


def load_recipes(path: str, only: list[str] | None = None) -> dict[str, list[str]]:
    """The recipes of a YAML file ({name: [section.field=value, ...]}), or the named ones among them."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--recipes: file not found: {path}")
    recipes = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(recipes, dict) or not recipes:
        raise ValueError(f"--recipes {path}: expected a mapping of recipe names to lists of overrides")
    for name, overrides in recipes.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ValueError(f"--recipes {path}: recipe {name!r} must be a list of section.field=value overrides")
    if only:
        unknown = [name for name in only if name not in recipes]
        if unknown:
            raise ValueError(f"--only: no recipe {', '.join(map(repr, unknown))} in {path}; it has "
                             f"{', '.join(recipes)}")
        recipes = {name: recipes[name] for name in only}
    return {str(name): overrides for name, overrides in recipes.items()}


class Evaluation:
    """One model evaluated as jobs/evaluate.py does, at every guidance scale of the sweep, reduced to flat metrics at
    each direction's best scale (with their 95 % intervals as <metric>_low / _high)."""

    def __init__(self, cfg, samples: int, scales: list[float], sample_steps: int, device: torch.device):
        if not cfg.data.val:
            raise ValueError("time-to-quality: the config needs data.val (held-out samples to evaluate on)")
        self.cfg, self.samples, self.device = cfg, samples, device
        self.settings = [SamplerSettings(steps=sample_steps, guidance_scale=scale) for scale in scales]
        self.validator = Validator(cfg, device)

    def __call__(self, model) -> dict[str, float]:
        pipe = self.validator.make_pipeline(model.eval())
        rows, best, fid = demo_sweep(pipe, self.cfg.data.val, self.samples, self.settings, batch_size=128)
        point = {**self.validator.loss(model), "fid": fid}
        for task, modality, keys in (("t2i", "image", (*ATTRIBUTES, "all")),
                                     ("i2t", "text", (*ATTRIBUTES, "all", "well_formed")),
                                     ("infill", "text", ("colour",)), ("joint", "image", ("colour", "all"))):
            scale = best["i2t" if modality == "text" else "t2i"][f"guidance_scale_{modality}"]
            row = next(r for r in rows if r[f"guidance_scale_{modality}"] == scale)
            for key in keys:
                name = f"{task}_{key}"
                point[name] = row["metrics"][name]
                point[f"{name}_low"], point[f"{name}_high"] = row["intervals"][name]
            point[f"{task}_guidance"] = scale
        return point


def recipe_run(cfg, name: str, seed: int, args, device: torch.device) -> list[dict]:
    """One recipe trained from `seed`, evaluated at every --eval-at step; cached as JSON in --out-dir."""
    def train() -> list[dict]:
        evaluation = Evaluation(cfg, args.samples, args.guidance_scales, args.sample_steps, device)
        torch.manual_seed(seed)
        return train_for(cfg, PSUNet(cfg.model).to(device), args.steps, seed, device,
                         lambda model, step: evaluation(model), eval_at=set(args.eval_at),
                         name=f"{name} seed {seed}")[1]

    key = {"config": cfg.model_dump(mode="json"), "seed": seed, "steps": args.steps, "eval_at": args.eval_at,
           "samples": args.samples, "scales": args.guidance_scales,
           "sampler": SamplerSettings(steps=args.sample_steps).model_dump(mode="json")}  # its defaults too
    return cached_curve(Path(args.out_dir) / "time_to_quality", name, seed, key, "time-to-quality", train)


def reached(curve: list[dict], metric: str, axis: str) -> float:
    """Where (on `axis`: step or wall_seconds) a curve first reaches the metric's threshold; inf if never."""
    target, higher = THRESHOLDS[metric]
    return first_reach([(point[axis], point[metric]) for point in curve], target, higher)


def over_seeds(values: list[float]) -> dict:
    """The per-seed values with their mean, spread and range (inf: never reached)."""
    return {"values": values, **spread(values)}


def summarise(curves: dict[str, list[list[dict]]]) -> dict:
    """Per recipe: steps and seconds to every threshold, and the final value of every curve metric, over seeds."""
    return {name: {
        "steps_to": {metric: over_seeds([reached(curve, metric, "step") for curve in seeds]) for metric in THRESHOLDS},
        "seconds_to": {metric: over_seeds([reached(curve, metric, "wall_seconds") for curve in seeds])
                       for metric in THRESHOLDS},
        "final": {metric: over_seeds([curve[-1][metric] for curve in seeds]) for metric in CURVES},
    } for name, seeds in curves.items()}


def _cell(entry: dict, digits: int, scale: float = 1) -> str:
    """mean ± standard deviation of the finite values, and how many seeds never got there."""
    finite = [value * scale for value in entry["values"] if math.isfinite(value)]
    if not finite:
        return "never"
    text = f"{statistics.fmean(finite):.{digits}f} ± {statistics.stdev(finite) if len(finite) > 1 else 0:.{digits}f}"
    never = len(entry["values"]) - len(finite)
    return text + (f" ({never}/{len(entry['values'])} never)" if never else "")


def markdown_table(summary: dict) -> str:
    """Steps to each threshold and the final values (%), mean ± standard deviation over seeds."""
    def bound(metric: str) -> str:
        target, higher = THRESHOLDS[metric]
        return f"{metric} {'≥' if higher else '≤'} {f'{target:.0%}' if higher else target}"

    header = ["recipe"] + [f"steps to {bound(m)}" for m in THRESHOLDS] + [f"final {m}" for m in CURVES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary.items():
        cells = [name] + [_cell(entry["steps_to"][m], 0) for m in THRESHOLDS] + [
            _cell(entry["final"][m], 4 if m == "val_loss" else 1, 1 if m in LOWER_IS_BETTER else 100) for m in CURVES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[list[dict]]], path: Path) -> Path:
    """One panel per metric against steps: each recipe's mean over seeds, its min-max band shaded, the threshold
    dashed."""
    plt = pyplot()
    columns = 4
    rows = -(-len(CURVES) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for panel, metric in zip(axes.flat, CURVES):
        for name, seeds in curves.items():
            steps = [p["step"] for p in seeds[0]]
            values = np.array([[p[metric] for p in seed] for seed in seeds])
            panel.plot(steps, values.mean(axis=0), marker="o", markersize=3, label=name)
            if len(seeds) > 1:
                panel.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.15)
        if metric in THRESHOLDS:
            panel.axhline(THRESHOLDS[metric][0], linestyle="--", color="grey", linewidth=1)
        panel.set_xlabel("training step")
        panel.set_ylabel(metric)
    for panel in list(axes.flat)[len(CURVES):]:
        panel.axis("off")
    axes[0][0].legend(fontsize=7)
    return save_figure(figure, path, dpi=90)


def time_to_quality(args) -> dict:
    """The study: every recipe x every seed, evaluated at --eval-at; the summary, the table and the curves."""
    device = device_of(args.device)
    if any(step < 1 or step > args.steps for step in args.eval_at):
        raise ValueError(f"--eval-at: every step must be in 1..--steps ({args.steps}), got {args.eval_at}")
    args.eval_at = sorted(set(args.eval_at) | {args.steps})
    recipes = load_recipes(args.recipes, args.only)
    configs = {name: load_config(args.config, [*overrides, *args.overrides]).resolved()
               for name, overrides in recipes.items()}
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {(name, seed): recipe_run(cfg, name, seed, args, device)  # seed by seed: every recipe's first seed first
            for seed in seeds for name, cfg in configs.items()}
    curves = {name: [runs[name, seed] for seed in seeds] for name in configs}
    summary = summarise(curves)
    table = markdown_table(summary)
    print(table, file=sys.stderr, flush=True)
    figures = {"config": args.config, "recipes_file": args.recipes, "recipes": recipes, "seeds": seeds,
               "steps": args.steps, "eval_at": args.eval_at, "samples": args.samples,
               "guidance_scales": args.guidance_scales, "sample_steps": args.sample_steps,
               "thresholds": {metric: target for metric, (target, _) in THRESHOLDS.items()},
               "summary": summary, "table": table, "curves": curves}
    for name, entry in summary.items():
        figures.update({f"{name}_steps_to_{metric}": value["mean"] for metric, value in entry["steps_to"].items()})
        figures.update({f"{name}_final_{metric}": value["mean"] for metric, value in entry["final"].items()})
    figures["plot"] = str(plot(curves, Path(args.out_dir) / "time_to_quality.png"))
    return figures


def steps_list(text: str) -> list[int]:
    """'250,500' -> [250, 500]"""
    return [int(value) for value in text.split(",")]


def add_commands(subparsers) -> None:
    parser = add_command(subparsers, "time-to-quality", time_to_quality, doc=__doc__)
    add_config(parser, "training config every recipe starts from (data.val: the held-out samples)",
               overrides="changes to --config for every recipe (e.g. optim.batch_size=64)")
    parser.add_argument("--recipes", default="configs/studies/objective.yaml",
                        help="a YAML file of recipes (name: [section.field=value, ...])")
    parser.add_argument("--only", type=name_list, help="these recipes only, comma-separated")
    parser.add_argument("--steps", type=count, default=20, help="training steps of each recipe and seed")
    parser.add_argument("--eval-at", type=steps_list, default=[250, 500, 750, 1000],
                        help="the steps at which each run is evaluated, comma-separated, each in 1..--steps (the "
                        "last step always)")
    parser.add_argument("--seeds", type=count, default=1, help="seeds --seed, --seed+1, ...; figures give mean and "
                        "spread over them")
    add_seed(parser, "the first seed (of the model and the data order)")
    parser.add_argument("--samples", type=count, default=128, help="held-out samples evaluated at each --eval-at step")
    add_guidance_scales(parser, "the evaluation's guidance scales")
    add_sample_steps(parser, "sampler steps of the evaluation")
    parser.add_argument("--out-dir", default="runs/benchmark", help="where the curves PNG and the cached runs go")
    add_device(parser)
