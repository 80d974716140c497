"""Training, shared by everything that trains a PS-U-Net: the Ray Train workers (jobs/), the benchmarks'
in-process training and the tests' tiny models.

`Trainer` owns a run's model, EMA, optimizer and schedules and takes one optimizer step over micro-batches
(loss, clipped gradients, AdamW, EMA); beside it the learning-rate schedule (linear warm-up, cosine decay), the
optimizer (fused AdamW), the precision choice and how a global batch is shared out over ranks and
micro-batches. Pure PyTorch: configured by psunet.config's OptimConfig and DiffusionConfig.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from psunet.config import DiffusionConfig, OptimConfig
from psunet.diffusion import LossOutput, NoiseSchedule, diffusion_loss
from psunet.ema import EMA, unwrap


def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr. Stateless: the step is the whole state."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
    floor = optim.min_lr_ratio
    return optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and GPU): one pass over all parameters, 3x faster than the per-tensor loop."""
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                             fused=True)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX (elsewhere a bf16 step is emulated, and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, query, lambda: False)()
                   for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def uses_bf16(optim: OptimConfig, device: torch.device) -> bool:
    """optim.precision: auto = bf16 autocast on GPU and fp32 on CPU; bf16 = bf16 autocast where the device has it
    in hardware (native_bf16), else fp32 with a warning, since emulated bf16 would only be slower."""
    if optim.precision == "bf16" and not native_bf16(device):
        warnings.warn(f"optim.precision=bf16: this {device.type} has no native bf16 matrix multiply "
                      "(AVX512-BF16 or AMX on a CPU), so training runs in fp32, which is faster here", stacklevel=2)
        return False
    return optim.precision == "bf16" or (optim.precision == "auto" and device.type == "cuda")


class Trainer:
    """One training run's state and its step: the model, its EMA, the optimizer, the lr schedule (lr_at) and
    the noise schedule, for `optim` and `diffusion` on `device`.

        trainer = Trainer(PSUNet(cfg.model), cfg.optim, cfg.diffusion, device)
        for step in range(cfg.optim.steps):
            trainer.step(step, [next(batches)])
        trainer.ema.model  # what samples

    `model` owns the parameters; `wrap(fn)` puts a wrapper (DDP, torch.compile) around it for the forward.
    With a time range, times are drawn from that interval only (an expert's branch). `vocabulary`, the data's word
    vectors (TextCodec.table), is needed by diffusion.rounding_loss_weight.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, diffusion: DiffusionConfig,
                 device: torch.device, *, time_range: tuple[int, int] | None = None,
                 vocabulary: torch.Tensor | None = None):
        self.optim, self.diffusion, self.device, self.time_range = optim, diffusion, device, time_range
        self.vocabulary = None if vocabulary is None else vocabulary.to(device)
        self.model = model.to(device)
        self.net = self.model
        self.optimizer = make_optimizer(self.model, optim)
        self.ema = EMA(self.model, optim.ema_decay)
        self.schedule = NoiseSchedule(diffusion)
        self.use_bf16 = uses_bf16(optim, device)

    def wrap(self, parallel=None) -> None:
        """`parallel(model)` (e.g. Ray Train's prepare_model: DDP) becomes the model; optim.compile compiles the
        forward."""
        if parallel is not None:
            self.model = parallel(self.model)
        self.net = torch.compile(self.model) if self.optim.compile else self.model

    def step(self, step: int, batches: list[dict], *, global_batch: int | None = None, world: int = 1):
        """Optimizer step number `step` (0-based; it sets the lr) over micro-batches: loss (bf16 autocast if
        asked), gradients clipped to optim.grad_clip, AdamW, EMA.

        Each micro-batch's mean loss is weighted by its share of the global batch (all ranks' samples of this
        step; default: this rank's), so the gradient is the mean over the global batch however it is split over
        workers and micro-batches; DDP synchronises on the last micro-batch only. Returns (loss output, grad
        norm, lr); the loss output's values are the sample-weighted means over this rank's micro-batches.
        """
        lr = lr_at(step, self.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sizes = [len(batch["latent"]) for batch in batches]
        global_batch = global_batch or sum(sizes)
        self.optimizer.zero_grad(set_to_none=True)
        totals, kept = None, []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with (contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()), \
                    torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                out = diffusion_loss(self.net, self.schedule, self.diffusion, batch["latent"].to(self.device),
                                     batch["text"].to(self.device), time_range=self.time_range,
                                     vocabulary=self.vocabulary)
                (out.loss * (sizes[i] * world / global_batch)).backward()
            weight = sizes[i] / sum(sizes)
            parts = [out.loss, out.loss_image, out.loss_text] + ([out.loss_rounding] if out.loss_rounding is not None
                                                                  else [])
            parts = [part.detach() * weight for part in parts]
            totals = parts if totals is None else [a + b for a, b in zip(totals, parts)]
            kept.append((out.kept_image, out.kept_text))
        grad_norm = torch.nn.utils.clip_grad_norm_(unwrap(self.model).parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        masks = [torch.cat(masks) for masks in zip(*kept)]
        return LossOutput(*totals[:3], *masks, *totals[3:]), grad_norm, lr


def rank_split(global_batch: int, world: int, rank: int, micro_batch: int) -> list[int]:
    """This rank's micro-batch sizes for one step: the global batch shared out over `world` ranks (the first
    global_batch % world ranks take one more), each share cut into as many near-equal micro-batches of at
    most `micro_batch` as the largest share needs (empty ones dropped; every rank still synchronises once)."""
    share = global_batch // world + (rank < global_batch % world)
    count = math.ceil(math.ceil(global_batch / world) / micro_batch)
    return [size for i in range(count) if (size := share // count + (i < share % count))]
