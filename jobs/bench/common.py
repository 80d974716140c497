"""What the benchmarks share: the device and timing on it, the training job's step timed on a synthetic batch
(StepTimer) and trained in this process (train_for), sampling speed, the arithmetic over curves and seeds
(first_reach, spread), the cache of trained curves (cached_curve), what every benchmark's JSON says about the
machine (machine_figures) and its MLflow run (log_to_mlflow), and the options several commands take."""

import argparse
import hashlib
import inspect
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from jobs import tracking
from jobs.model_ref import MODEL_HELP
from psunet.data import make_loader
from psunet.model import PSUNet
from psunet.model_folder import rounding_vocabulary
from psunet.progress import progress
from psunet.sampling import joint_infill
from psunet.settings import SamplerSettings, parse_guidance
from psunet.training import Trainer

PROMPT = "a small red circle on the left"  # sampling and serve requests
TARGETS = {
    "cpu": {"mfu": 0.60, "overhead_ratio_max": 1.05, "loader_headroom": 20.0, "guidance_batching_speedup": 1.6,
            "serve_batching_speedup_16_clients": 3.0},
    "cuda": {"mfu": 0.45, "overhead_ratio_max": 1.05, "loader_headroom": 20.0, "guidance_batching_speedup": 1.6,
             "serve_batching_speedup_16_clients": 3.0},
}


class NothingMeasured(Exception):
    """A benchmark with nothing to measure on this machine; the message says why."""


# --- the device and timing on it


def device_of(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn, device: torch.device) -> float:
    """Seconds of one call, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    return statistics.median(seconds_of(fn, device) for _ in range(repeats))


class StepTimer:
    """The training job's own step (psunet.training.Trainer: loss, clipping, AdamW, EMA) with `cfg`, on one fixed
    synthetic batch of cfg.optim.batch_size (the data path is measured by `loader`)."""

    def __init__(self, cfg, device: torch.device, parallel=None):
        torch.manual_seed(cfg.optim.seed)
        self.device = device
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


def sampling_ms_per_step(model, config, diffusion, batch: int, device: torch.device, steps: int = 10) -> float:
    """ms per sampler step of joint infilling at `batch` (median of 5 runs), the text given."""
    text = torch.randn(batch, config.text_len, config.word_dim, device=device)
    with torch.no_grad():
        seconds = median_seconds(lambda: joint_infill(model, config, diffusion, batch, text_known=text, steps=steps,
                                                      device=device), 5, device)
    return seconds / steps * 1000


# --- training in this process, and the curves it gives


PROGRESS_KEYS = ("wall_seconds", "val_loss", "val_gap_image", "val_gap_text", "t2i_accuracy", "i2t_accuracy",
                 "t2i_colour", "t2i_all", "i2t_colour", "infill_colour", "joint_colour", "fid")


def train_for(cfg, model: PSUNet, steps: int, seed: int, device: torch.device, evaluate=None,
              eval_at: set[int] = frozenset(), name: str = "") -> tuple[PSUNet, list[dict]]:
    """Train `model` in this process with the training job's own step (psunet.training.Trainer) and lr schedule,
    for `steps` steps (cfg.branch.time_range limits the times); returns (EMA model, evaluation curve).

    evaluate(ema_model, step) -> dict is called after each step in `eval_at`; each curve point also has the
    wall-clock seconds spent in training steps so far."""
    optim = cfg.optim.model_copy(update={"steps": steps, "warmup_steps": min(cfg.optim.warmup_steps, steps - 1)})
    trainer = Trainer(model, optim, cfg.diffusion, device, time_range=cfg.branch.time_range,
                      vocabulary=rounding_vocabulary(cfg.data.train, cfg.model, cfg.diffusion))
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


def cached_curve(folder: Path, name: str, seed: int, key: dict, label: str, train) -> list[dict]:
    """The curve of one (name, seed) run kept as JSON in `folder` under a hash of `key` (all that decides it):
    read back when there, else `train()` and kept, so a rerun with the same settings trains nothing."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cache = folder / f"{name}-seed{seed}-{digest}.json"
    if cache.exists():
        print(f"{label}: {name} seed {seed}: reusing {cache}", file=sys.stderr, flush=True)
        return json.loads(cache.read_text())
    curve = train()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(curve))
    return curve


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


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max over seeds."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return {"mean": math.inf, "std": math.nan, "min": min(values), "max": max(values),
                "never": len(values) - len(finite)}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend). Imported here, when a study plots, not at the top:
    choosing a backend is global, and importing the benchmarks must not choose one for the program."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int) -> Path:
    """A pyplot figure laid out, written to `path` (its folder made) and closed."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path


# --- what every benchmark reports


def machine_figures() -> dict:
    """What every benchmark's JSON says about the machine it ran on."""
    return {"torch": torch.__version__, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def log_to_mlflow(uri: str, command: str, figures: dict) -> str:
    """One run in the psunet-benchmark experiment: text figures as params, finite numbers as metrics,
    convergence's curve points at their steps, the plot as an artifact. Returns its run id."""
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


# --- the command line: one parser per command, the options several of them take


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; an option's default after its help, unless it is a flag, has no default or
    its help says it."""

    def _get_help_string(self, action) -> str:
        if not action.option_strings or action.nargs == 0 or action.default is None or "default" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def add_command(subparsers, name: str, run, check=None, doc: str | None = None) -> argparse.ArgumentParser:
    """The parser of command `name`, which runs run(args) -> figures; its help is `doc`, by default run's
    docstring. check(parser, args), when given, completes and checks the parsed options (parser.error on a bad
    combination)."""
    doc = inspect.cleandoc(doc or run.__doc__)
    parser = subparsers.add_parser(name, help=doc.splitlines()[0], description=doc, formatter_class=HelpFormatter)
    parser.set_defaults(run=run, check=check)
    return parser


def count(text: str) -> int:
    """A whole number >= 1 (steps, samples, seeds, rounds, ...)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def name_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']"""
    return text.split(",")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="torch device (cpu, cuda, cuda:1, ...); default: cuda when available")


def add_seed(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--seed", type=int, default=0, help=help)


def add_config(parser: argparse.ArgumentParser, help: str, overrides: str | None = None) -> None:
    """--config, and with `overrides` (their help) section.field=value positionals that change it."""
    parser.add_argument("--config", default="configs/demo.yaml", help=help)
    if overrides:
        parser.add_argument("overrides", nargs="*", metavar="section.field=value", help=overrides)


def add_sample_steps(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--sample-steps", type=count, default=SamplerSettings.model_fields["steps"].default,
                        help=help)


def add_guidance_scales(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--guidance-scales", type=parse_guidance, default=[1.0, 2.0, 3.0, 5.0, 7.0],
                        help=help + ": comma-separated scales for both modalities, or image:text pairs")


def add_model(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--model", help=f"{help}: a {MODEL_HELP}")


def needs_model(parser: argparse.ArgumentParser, args) -> None:
    """The check of the commands that need a trained model (paint, serve)."""
    if not args.model:
        parser.error(f"{args.command} needs --model: a {MODEL_HELP}")
