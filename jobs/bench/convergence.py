"""The convergence study: backbones compared on the same data, seeds, data order, steps and evaluation, every
curve against steps, training FLOPs and seconds, with each model's costs counted from the model itself (--against
baseline or ode); and K experts branched from one base against one model fine-tuned alike (--against experts)."""

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from jobs.bench.common import (StepTimer, add_command, add_config, add_device, add_guidance_scales,
                               add_sample_steps, add_seed, cached_curve, count, device_of, first_reach, name_list,
                               pyplot, save_figure, sampling_ms_per_step, spread, train_for)
from jobs.config import load_config
from jobs.quality import guidance_sweep, held_out_pairs, sweep_metrics
from jobs.training_run import Validator
from psunet.config import ModelConfig, baseline_of
from psunet.experts import ExpertEnsemble, binary_split
from psunet.model import PSUNet, forward_flops, parameter_counts, train_flops
from psunet.settings import SamplerSettings

CURVE_METRICS = {"val_loss": False, "t2i_accuracy": True, "i2t_accuracy": True}  # name: higher is better
AXES = ("step", "train_flops", "seconds")
AXIS_LABELS = {"step": "step", "train_flops": "training FLOPs", "seconds": "seconds (this machine)"}


# --- what each compared model costs


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
    model = PSUNet(cfg.model).to(device)
    forward = forward_flops(model)
    costs = {"parameters": parameter_counts(model)["total"], "batch_size": cfg.optim.batch_size,
             "forward_flops_per_sample": forward, "train_flops_per_sample": train_flops(model),
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


# --- evaluation, and who gets where first


class HeldOut:
    """The evaluation every compared model gets: the validation losses and conditional gaps (jobs.training_run's
    Validator, on the same fixed batches for every model), and at accuracy points text->image and
    image->text attribute accuracy of held-out pairs at each direction's best guidance scale of a sweep."""

    def __init__(self, base, samples: int, scales: list[float], settings: SamplerSettings, device: torch.device):
        self.base, self.scales, self.settings, self.device = base, scales, settings, device
        self.prompts, self.latents = held_out_pairs(base.data.val or base.data.train, samples)
        self.validators = {}  # per model config: its batches, autoencoder and codec are loaded once

    def __call__(self, model, model_config, accuracy: bool) -> dict:
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


def axes_at(step: int, costs: dict) -> dict:
    """Where a model is after `step` steps: samples seen, training FLOPs, seconds at its measured step time."""
    samples = step * costs["batch_size"]
    return {"samples": samples, "train_flops": samples * costs["train_flops_per_sample"],
            "seconds": step * costs["seconds_per_step"]}


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


def plot_curves(curves: dict[str, list[list[dict]]], path: Path) -> Path:
    """One panel per (metric, axis): each model's mean over seeds, its min-max band shaded."""
    plt = pyplot()
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
            panel.set_xlabel(AXIS_LABELS[axis])
            panel.set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    return save_figure(figure, path, dpi=100)


# --- the study


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
    device = device_of(args.device)
    base = load_config(args.config, args.overrides).resolved()
    settings = SamplerSettings(steps=args.sample_steps, seed=args.seed)
    held_out = HeldOut(base, args.samples, args.guidance_scales, settings, device)
    if args.against == "experts":
        return experts_against_one(args, base, device, lambda model: held_out(model, base.model, args.accuracy))
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
            entry[f"ratio_{axis}"] = {name: spread([reach[seed][metric][axis][name]
                                                    / reach[seed][metric][axis]["psunet"] for seed in seeds])
                                      for name in names if name != "psunet"}
        summary[metric] = entry
        figures.update({f"final_{metric}_{name}": value["mean"] for name, value in finals.items()})
        figures.update({f"{metric}_{axis}_ratio_{name}": value["mean"] for axis in AXES
                        for name, value in entry[f"ratio_{axis}"].items()})
    figures["summary"] = summary
    figures["curves"] = {name: [runs[seed][name] for seed in seeds] for name in names}
    figures["plot"] = str(plot_curves(figures["curves"], Path(args.out_dir) / f"convergence_{args.against}.png"))
    return figures


def experts_against_one(args, base, device: torch.device, evaluate) -> dict:
    """Base to --branch-at steps; then K = 1 (one model) and K = --experts branches, each fine-tuned for the
    remaining steps from the base's EMA weights on its interval; both sample at one model's cost per step."""
    torch.manual_seed(args.seed)
    base_model, _ = train_for(base, PSUNet(base.model).to(device), args.branch_at, args.seed, device)
    base_weights = {k: v.clone() for k, v in base_model.state_dict().items()}
    figures = {"config": args.config, "against": "experts", "steps": args.steps, "branch_at": args.branch_at,
               "seed": args.seed, **{f"base_{k}": v for k, v in evaluate(base_model).items()}}
    tuned = args.steps - args.branch_at
    for k in (1, args.experts):
        intervals = binary_split(base.diffusion.num_train_timesteps, k)
        ensemble = ExpertEnsemble(base.model, intervals).to(device)
        for i, interval in enumerate(intervals):
            cfg = base.model_copy(update={"branch": base.branch.model_copy(update={"time_range": interval})})
            expert = PSUNet(base.model).to(device)
            expert.load_state_dict(base_weights)
            ema_model, _ = train_for(cfg, expert, tuned, args.seed + 1 + i, device)
            ensemble.experts[i].load_state_dict(ema_model.state_dict())
        point = evaluate(ensemble.eval())
        name = "one_model" if k == 1 else f"experts{k}"
        result = {"intervals": intervals, "training_steps": args.branch_at + k * tuned,
                  "sampling_ms_per_step_batch1": sampling_ms_per_step(ensemble, base.model, base.diffusion, 1, device),
                  **point}
        figures.update({f"{name}_{k}": v for k, v in result.items()})
        print(f"convergence: {name} " + json.dumps(result), file=sys.stderr, flush=True)
    return figures


# --- the command line


def check_convergence(parser, args) -> None:
    """--accuracy-every defaults to --eval-every, --branch-at to 2/3 of --steps (and must lie inside them)."""
    if args.accuracy_every is None:
        args.accuracy_every = args.eval_every
    if args.branch_at is None:
        args.branch_at = 2 * args.steps // 3
    if args.against == "experts" and not 0 < args.branch_at < args.steps:
        parser.error(f"--branch-at must be in (0, --steps={args.steps}), got {args.branch_at}")


def add_commands(subparsers) -> None:
    parser = add_command(subparsers, "convergence", bench_convergence, check=check_convergence)
    add_config(parser, "training config every compared model trains with (data, batch, optimizer, diffusion)",
               overrides="changes to --config (e.g. model.shared_depth=7 data.train=...)")
    parser.add_argument("--against", choices=("baseline", "ode", "experts"), default="baseline",
                        help="what PS-U-Net is compared with: the U-ViT-multi baseline, neural-ODE shared blocks, "
                        "or K experts")
    parser.add_argument("--models", type=name_list, help="compared models, comma-separated (psunet, baseline, "
                        "baseline_flops, psunet_memory, ode); default: by --against")
    parser.add_argument("--steps", type=count, default=20, help="training steps of each model and seed")
    parser.add_argument("--seeds", type=count, default=1, help="seeds --seed, --seed+1, ...; figures give mean and "
                        "spread over them")
    add_seed(parser, "the first seed (of the model, the data order and the sampler)")
    parser.add_argument("--eval-every", type=count, default=250, help="validation losses every N steps (and at the "
                        "last)")
    parser.add_argument("--accuracy-every", type=count, help="the accuracy sweep every N steps (default: "
                        "--eval-every; always at the last step)")
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                        help="skip text->image and image->text accuracy (non-demo data)")
    parser.add_argument("--samples", type=count, default=128, help="held-out pairs of the accuracy sweep")
    add_guidance_scales(parser, "the accuracy sweep's guidance scales")
    add_sample_steps(parser, "sampler steps of the accuracy sweep")
    parser.add_argument("--timing-steps", type=count, default=10, help="steps per model per round of the "
                        "interleaved step timing")
    parser.add_argument("--experts", type=count, default=2, help="--against experts: K")
    parser.add_argument("--branch-at", type=int, help="--against experts: the base's steps before branching "
                        "(default: 2/3 of --steps)")
    parser.add_argument("--out-dir", default="runs/benchmark", help="where the curves PNG and the cached runs go")
    add_device(parser)
