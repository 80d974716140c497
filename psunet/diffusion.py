"""The training objective: joint epsilon-prediction on image latents and word vectors.

One diffusion time per sample, shared by both modalities (the model learns the joint
distribution). To train the unconditional branch that masked classifier-free guidance needs,
each modality of each sample is, with probability p_drop, replaced by pure Gaussian noise and its
loss term masked out. Word vectors are scaled by `text_scale` before noising (an SNR shift for text).
The noise schedule and add_noise come from a diffusers scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from psunet.config import DiffusionConfig
from psunet.model import PSUNet

SCHEDULERS = {
    "dpmsolver++": lambda kw: DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2),
    "ddim": lambda kw: DDIMScheduler(**kw, set_alpha_to_one=False, clip_sample=False),
    "ddpm": lambda kw: DDPMScheduler(**kw, clip_sample=False),
}


def make_scheduler(name: str, config: DiffusionConfig):
    """A fresh diffusers scheduler, by name, over the training noise schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown name {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type="epsilon",
    ))


class NoiseSchedule:
    """The forward process q(x_t | x_0) of a diffusers DDPMScheduler, on the data's device."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.scheduler = make_scheduler("ddpm", config)
        self.alphas_cumprod = self.scheduler.alphas_cumprod

    @property
    def num_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, timesteps.long())

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return alpha_bar / (1 - alpha_bar)


@dataclass
class LossOutput:
    loss: torch.Tensor
    loss_image: torch.Tensor
    loss_text: torch.Tensor
    kept_image: torch.Tensor  # (B,) 1 where the image was kept, 0 where dropped
    kept_text: torch.Tensor


def _masked_mean(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (per_sample * keep).sum() / keep.sum().clamp(min=1)


def diffusion_loss(model: PSUNet, schedule: NoiseSchedule, config: DiffusionConfig,
                   image_latents: torch.Tensor, text_vectors: torch.Tensor,
                   generator: torch.Generator | None = None, time_range: tuple[int, int] | None = None) -> LossOutput:
    """Epsilon-prediction MSE on both modalities with per-modality noise-replacement dropout.

    time_range [start, end): draw the diffusion times from that interval only (an expert's branch training).
    """
    batch, device = image_latents.shape[0], image_latents.device
    text_vectors = text_vectors * config.text_scale
    start, end = time_range or (0, schedule.num_timesteps)

    def draw_times() -> torch.Tensor:
        return torch.randint(start, end, (batch,), device=device, generator=generator)

    t_image = draw_times()
    t_text = draw_times() if config.independent_timesteps else t_image
    noise_image = torch.randn(image_latents.shape, device=device, generator=generator)
    noise_text = torch.randn(text_vectors.shape, device=device, generator=generator)
    keep_image = (torch.rand(batch, device=device, generator=generator) >= config.p_drop_image).float()
    keep_text = (torch.rand(batch, device=device, generator=generator) >= config.p_drop_text).float()

    noisy_image = schedule.add_noise(image_latents, noise_image, t_image)
    noisy_text = schedule.add_noise(text_vectors, noise_text, t_text)
    # a dropped modality is pure noise, independent of its data and of the time
    noisy_image = torch.where(keep_image.view(-1, 1, 1, 1).bool(), noisy_image,
                              torch.randn(image_latents.shape, device=device, generator=generator))
    noisy_text = torch.where(keep_text.view(-1, 1, 1).bool(), noisy_text,
                             torch.randn(text_vectors.shape, device=device, generator=generator))

    times = torch.stack([t_image, t_text]) if config.independent_timesteps else t_image
    out = model(noisy_image, noisy_text, times)
    err_image = (out.eps_image.float() - noise_image).pow(2).flatten(1).mean(1)
    err_text = (out.eps_text.float() - noise_text).pow(2).flatten(1).mean(1)
    if config.min_snr_gamma is not None:
        err_image = err_image * _min_snr_weight(schedule, t_image, config.min_snr_gamma)
        err_text = err_text * _min_snr_weight(schedule, t_text, config.min_snr_gamma)

    loss_image = _masked_mean(err_image, keep_image)
    loss_text = _masked_mean(err_text, keep_text)
    return LossOutput(
        loss=loss_image + config.text_loss_weight * loss_text,
        loss_image=loss_image, loss_text=loss_text, kept_image=keep_image, kept_text=keep_text,
    )


def _min_snr_weight(schedule: NoiseSchedule, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR: the min-SNR-gamma weight for epsilon prediction (Hang et al. 2023)."""
    snr = schedule.snr(timesteps)
    return torch.clamp(snr, max=gamma) / snr
