"""Joint infilling with masked classifier-free guidance: one sampler for every task.

Known data comes with a mask per modality (1 = known; text per token, image per latent pixel).
At each step with time t:
  1. the known part is re-noised to t with fresh noise: x_in = m * noised(x0_known) + (1 - m) * x_t;
  2. conditional input x_in and unconditional input m * (pure noise) + (1 - m) * x_t go through the
     network in ONE batched forward (2 evaluations per step, however many modalities are known);
  3. eps = eps_unc + w * (eps_cond - eps_unc); a diffusers scheduler steps x_t.
At the end the known part is pasted back exactly. Text->image, image->text, unconditional joint
generation and partial infilling are the same call with different masks.

A model trained with independent per-modality times (DiffusionConfig.independent_timesteps, the
UniDiffuser-style option) has learned every pair of times, so a fully known modality is given to it
clean at time 0 instead of re-noised (and as pure noise at the last time in the unconditional pass).
A partly known modality is always re-noised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from psunet.config import DiffusionConfig, ModelConfig
from psunet.diffusion import NoiseSchedule, make_scheduler
from psunet.model import PaintBias
from psunet.paint import PaintWithWords, paint_mask

MAX_STEPS = 1000


@dataclass
class SampleOutput:
    image_latents: torch.Tensor  # (B, C, H, W)
    text_vectors: torch.Tensor  # (B, L, E)
    network_evaluations: int  # samples x passes, summed over steps, per batch element


def validate_settings(steps: int, guidance_scale: float, scheduler: str, num_train_timesteps: int) -> None:
    """Refuse sampler settings that cannot work, naming the field and the value."""
    from psunet.diffusion import SCHEDULERS

    if not isinstance(steps, int) or steps < 1 or steps > min(MAX_STEPS, num_train_timesteps):
        raise ValueError(f"steps must be an integer in [1, {min(MAX_STEPS, num_train_timesteps)}], got {steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown name {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")


def _known_and_mask(name: str, known, mask, shape: tuple[int, ...], mask_shape: tuple[int, ...], device):
    """Known data and a {0,1} float mask broadcastable to `shape`; an absent modality is fully unknown."""
    if known is None:
        if mask is not None and bool(mask.any()):
            raise ValueError(f"{name}_mask marks known {name} data but {name}_known is missing")
        return torch.zeros(shape, device=device), torch.zeros(mask_shape, device=device)
    if tuple(known.shape) != shape:
        raise ValueError(f"{name}_known: expected shape {shape}, got {tuple(known.shape)}")
    if mask is None:
        mask = torch.ones(mask_shape, device=device)
    mask = mask.to(device=device, dtype=torch.float32)
    if name == "image" and mask.dim() == 3:
        mask = mask[:, None]
    if tuple(mask.shape) != mask_shape:
        raise ValueError(f"{name}_mask: expected shape {mask_shape}, got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name}_mask must contain only 0 and 1")
    return known.to(device=device, dtype=torch.float32), mask


def _per_sample(name: str, value, batch: int) -> list:
    """A setting given once for the batch or once per sample, as a list (length 1 or `batch`)."""
    values = list(value) if isinstance(value, Sequence) else [value]
    if len(values) not in (1, batch):
        raise ValueError(f"{name}: give one value or one per sample ({batch}), got {len(values)}")
    return values


@torch.no_grad()
def joint_infill(
    model,
    model_config: ModelConfig,
    diffusion_config: DiffusionConfig,
    batch_size: int,
    image_known: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    text_known: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    guidance_scale: float | Sequence[float] = 3.0,
    steps: int = 25,
    scheduler: str = "dpmsolver++",
    seed: int | Sequence[int] = 0,
    device: torch.device | str = "cpu",
    paint: PaintWithWords | None = None,
) -> SampleOutput:
    """Sample both modalities given any known parts.

    image_known (B, C, H, W) with image_mask (B, 1, H, W) or (B, H, W); text_known (B, L, E) with
    text_mask (B, L). A known modality without a mask is fully known. `model(image, text, t)`
    returns eps for both modalities (a PSUNet or anything with the same call).
    guidance_scale and seed are one value for the batch or one per sample; with a seed per sample,
    each sample's noise comes from its own generator, so it does not depend on its batch mates.
    paint: paint-with-words regions for caption words (psunet.paint); the bias goes on the conditional pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    c, b = model_config, batch_size
    scales = _per_sample("guidance_scale", guidance_scale, b)
    seeds = _per_sample("seed", seed, b)
    for scale in scales:
        validate_settings(steps, scale, scheduler, diffusion_config.num_train_timesteps)
    device = torch.device(device)
    image_shape = (b, *c.latent_shape)
    image_known, image_mask = _known_and_mask(
        "image", image_known, image_mask, image_shape, (b, 1, c.latent_size, c.latent_size), device)
    text_known, text_mask = _known_and_mask(
        "text", text_known, text_mask, (b, c.text_len, c.word_dim), (b, c.text_len), device)
    text_mask = text_mask[..., None]
    if paint is not None:
        paint.check(c, b)
        painted = paint_mask(c, paint, device)
    text_given, text_known = text_known, text_known * diffusion_config.text_scale

    generators = [torch.Generator(device=device).manual_seed(int(value)) for value in seeds]
    generator = generators[0] if len(generators) == 1 else generators
    schedule = NoiseSchedule(diffusion_config)
    image_scheduler = make_scheduler(scheduler, diffusion_config)
    text_scheduler = make_scheduler(scheduler, diffusion_config)
    image_scheduler.set_timesteps(steps, device=device)
    text_scheduler.set_timesteps(steps, device=device)

    def noise(shape):
        if len(generators) == 1:
            return torch.randn(shape, device=device, generator=generators[0])
        return torch.cat([torch.randn((1, *shape[1:]), device=device, generator=g) for g in generators])

    image = noise(image_shape) * image_scheduler.init_noise_sigma
    text = noise(text_known.shape) * text_scheduler.init_noise_sigma
    anything_known = bool(image_mask.any() or text_mask.any())
    guided = anything_known and any(scale != 1.0 for scale in scales)
    weight = torch.tensor(scales, device=device, dtype=torch.float32)
    weight_image, weight_text = weight.view(-1, 1, 1, 1), weight.view(-1, 1, 1)
    clean_image = diffusion_config.independent_timesteps and bool(image_mask.all())
    clean_text = diffusion_config.independent_timesteps and bool(text_mask.all())
    last_time = diffusion_config.num_train_timesteps - 1
    evaluations = 0

    def pair(time_image, time_text) -> torch.Tensor:
        return torch.stack([torch.as_tensor(time_image, device=device).expand(b),
                            torch.as_tensor(time_text, device=device).expand(b)])

    def conditional_input(known, mask, current, clean: bool, times) -> torch.Tensor:
        """One modality's conditional input: the known part clean or re-noised to `times`, the rest as sampled."""
        if clean:
            return known
        return mask * schedule.add_noise(known, noise(known.shape), times) + (1 - mask) * current

    passes = 2 if guided else 1
    if paint is not None:
        painted = painted.repeat(passes, 1, 1, 1)

    def paint_at(index: int, t) -> dict:
        """The model's paint argument at this step: the bias on the conditional pass (the first b rows)."""
        if paint is None:
            return {}
        strength = paint.strength(float(schedule.snr(t.view(1))) ** -0.5, index, steps)  # sigma = 1 / sqrt(SNR)
        if strength == 0:
            return {}
        strengths = torch.zeros(passes * b, device=device)
        strengths[:b] = strength
        return {"paint": PaintBias(mask=painted, strength=strengths)}

    for index, t in enumerate(image_scheduler.timesteps):
        times = t.expand(b)
        image_in = conditional_input(image_known, image_mask, image, clean_image, times)
        text_in = conditional_input(text_known, text_mask, text, clean_text, times)
        times_cond = pair(0 if clean_image else t, 0 if clean_text else t)
        if guided:
            image_unc = image_mask * noise(image_shape) + (1 - image_mask) * image
            text_unc = text_mask * noise(text.shape) + (1 - text_mask) * text
            times_unc = pair(last_time if clean_image else t, last_time if clean_text else t)
            out = model(torch.cat([image_in, image_unc]), torch.cat([text_in, text_unc]),
                        torch.cat([times_cond, times_unc], dim=1), **paint_at(index, t))
            cond_image, unc_image = out.eps_image.float().chunk(2)
            cond_text, unc_text = out.eps_text.float().chunk(2)
            eps_image = unc_image + weight_image * (cond_image - unc_image)
            eps_text = unc_text + weight_text * (cond_text - unc_text)
            evaluations += 2
        else:
            # draw what the guided pass draws, so a sample's noise stream does not depend on its batch mates
            noise(image_shape), noise(text.shape)
            out = model(image_in, text_in, times_cond, **paint_at(index, t))
            eps_image, eps_text = out.eps_image.float(), out.eps_text.float()
            evaluations += 1
        image = image_scheduler.step(eps_image, t, image if clean_image else image_in, generator=generator).prev_sample
        text = text_scheduler.step(eps_text, t, text if clean_text else text_in, generator=generator).prev_sample

    image = image_mask * image_known + (1 - image_mask) * image
    text = text_mask * text_given + (1 - text_mask) * text / diffusion_config.text_scale
    return SampleOutput(image_latents=image, text_vectors=text, network_evaluations=evaluations)
