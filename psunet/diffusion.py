"""The training objective: epsilon-prediction on image latents and word vectors, over timestep slices.

`DiffusionConfig.timesteps` decides which pairs of times (t_image, t_text) the model learns:
  * shared: one time per sample for both (the paper's joint-only training). Sampling must then re-noise a
    known modality at every step, so it only steers the other where it is itself still readable;
  * independent: one time per modality, drawn independently (UniDiffuser);
  * slices: per sample one of joint (t, t), text->image (t, 0: the text clean), image->text (0, t: the
    image clean) or independent, with `slice_weights`: it trains exactly the conditionals the sampler
    uses (a fully known modality is given clean at time 0) at no extra cost per step.
To train the unconditional branch that masked classifier-free guidance needs, each modality of each
sample is, with probability p_drop, replaced by pure Gaussian noise (labelled the last time, as the
sampler labels it, unless times are shared); a dropped or clean modality has no loss term. Word
vectors are scaled by `text_scale` before noising. The noise schedule and add_noise come from diffusers.
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


def make_scheduler(name: str, config: DiffusionConfig, spacing: str = "trailing"):
    """A fresh diffusers scheduler, by name, over the training noise schedule; `spacing` is its timestep_spacing."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown name {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type="epsilon",
        timestep_spacing=spacing,
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

    def epsilon_of_text(self, config: DiffusionConfig, prediction: torch.Tensor, noisy: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
        """The text head's output as a noise prediction (text_target "sample": from the predicted clean vectors)."""
        if config.text_target == "epsilon":
            return prediction.float()
        alpha_bar = self.alphas_cumprod.to(noisy.device)[timesteps.long()].view(-1, 1, 1)
        return (noisy - alpha_bar.sqrt() * prediction.float()) / (1 - alpha_bar).sqrt()

    def clean_of_epsilon(self, noisy: torch.Tensor, epsilon: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The clean data a noise prediction implies at one timestep: (x_t - sqrt(1 - a) eps) / sqrt(a)."""
        alpha_bar = self.alphas_cumprod.to(noisy.device)[timestep.long()]
        return (noisy - (1 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return alpha_bar / (1 - alpha_bar)


@dataclass
class LossOutput:
    loss: torch.Tensor
    loss_image: torch.Tensor
    loss_text: torch.Tensor
    kept_image: torch.Tensor  # (B,) 1 where the image's loss counts: neither dropped nor given clean
    kept_text: torch.Tensor


def _masked_mean(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (per_sample * keep).sum() / keep.sum().clamp(min=1)


def draw_slices(config: DiffusionConfig, batch: int, start: int, end: int, device, generator=None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample (t_image, t_text, image clean, text clean) for the configured timesteps; times in [start, end)."""
    def draw_times() -> torch.Tensor:
        return torch.randint(start, end, (batch,), device=device, generator=generator)

    t_image = draw_times()
    no = torch.zeros(batch, dtype=torch.bool, device=device)
    if config.timesteps == "shared":
        return t_image, t_image, no, no
    t_other = draw_times()
    if config.timesteps == "independent":
        return t_image, t_other, no, no
    w = config.slice_weights
    probabilities = torch.tensor([w.joint, w.text_to_image, w.image_to_text, w.independent], device=device)
    kind = torch.multinomial(probabilities / w.total(), batch, replacement=True, generator=generator)
    clean_text, clean_image = kind == 1, kind == 2
    t_text = torch.where(kind == 3, t_other, t_image)
    zero = torch.zeros_like(t_image)
    return torch.where(clean_image, zero, t_image), torch.where(clean_text, zero, t_text), clean_image, clean_text


def diffusion_loss(model: PSUNet, schedule: NoiseSchedule, config: DiffusionConfig,
                   image_latents: torch.Tensor, text_vectors: torch.Tensor,
                   generator: torch.Generator | None = None, time_range: tuple[int, int] | None = None) -> LossOutput:
    """Epsilon-prediction MSE on both modalities over the configured timestep slices, with noise-replacement
    dropout per modality.

    time_range [start, end): draw the diffusion times from that interval only (an expert's branch training).
    """
    batch, device = image_latents.shape[0], image_latents.device
    text_vectors = text_vectors * config.text_scale
    start, end = time_range or (0, schedule.num_timesteps)
    t_image, t_text, clean_image, clean_text = draw_slices(config, batch, start, end, device, generator)
    noise_image = torch.randn(image_latents.shape, device=device, generator=generator)
    noise_text = torch.randn(text_vectors.shape, device=device, generator=generator)
    keep_image = torch.rand(batch, device=device, generator=generator) >= config.p_drop_image
    keep_text = torch.rand(batch, device=device, generator=generator) >= config.p_drop_text

    noisy_image = torch.where(clean_image.view(-1, 1, 1, 1), image_latents,
                              schedule.add_noise(image_latents, noise_image, t_image))
    noisy_text = torch.where(clean_text.view(-1, 1, 1), text_vectors,
                             schedule.add_noise(text_vectors, noise_text, t_text))
    # a dropped modality is pure noise, independent of its data and of the time
    noisy_image = torch.where(keep_image.view(-1, 1, 1, 1), noisy_image,
                              torch.randn(image_latents.shape, device=device, generator=generator))
    noisy_text = torch.where(keep_text.view(-1, 1, 1), noisy_text,
                             torch.randn(text_vectors.shape, device=device, generator=generator))
    if config.conditions_clean:  # the sampler labels a pure-noise modality with the last time
        last = torch.full_like(t_image, schedule.num_timesteps - 1)
        times = torch.stack([torch.where(keep_image, t_image, last), torch.where(keep_text, t_text, last)])
    else:
        times = t_image

    out = model(noisy_image, noisy_text, times)
    err_image = (out.eps_image.float() - noise_image).pow(2).flatten(1).mean(1)
    eps_text = schedule.epsilon_of_text(config, out.eps_text, noisy_text, t_text)
    err_text = (eps_text - noise_text).pow(2).flatten(1).mean(1)
    if config.min_snr_gamma is not None:
        err_image = err_image * min_snr_weight(schedule.snr(t_image), config.min_snr_gamma)
        # scaling the data by s multiplies its signal-to-noise ratio by s^2
        err_text = err_text * min_snr_weight(schedule.snr(t_text) * config.text_scale ** 2, config.min_snr_gamma)

    learn_image = (keep_image & ~clean_image).float()
    learn_text = (keep_text & ~clean_text).float()
    loss_image = _masked_mean(err_image, learn_image)
    loss_text = _masked_mean(err_text, learn_text)
    return LossOutput(
        loss=loss_image + config.text_loss_weight * loss_text,
        loss_image=loss_image, loss_text=loss_text, kept_image=learn_image, kept_text=learn_text,
    )


@torch.no_grad()
def conditional_gaps(model, schedule: NoiseSchedule, config: DiffusionConfig, image_latents: torch.Tensor,
                     text_vectors: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
    """What conditioning buys: each modality's noise-prediction MSE with the other modality dropped minus with it
    given, on the same data, times and noise (> 0: the model uses the other modality; ~0: it ignores it).

    The given modality is presented as the sampler presents it: clean at time 0 to a model trained with clean
    conditioning (slices, independent), re-noised to the same time otherwise; dropped, it is pure noise.
    """
    batch, device = image_latents.shape[0], image_latents.device
    text_vectors = text_vectors * config.text_scale
    t = torch.randint(0, schedule.num_timesteps, (batch,), device=device, generator=generator)
    noise_image = torch.randn(image_latents.shape, device=device, generator=generator)
    noise_text = torch.randn(text_vectors.shape, device=device, generator=generator)
    noisy_image = schedule.add_noise(image_latents, noise_image, t)
    noisy_text = schedule.add_noise(text_vectors, noise_text, t)
    dropped_image = torch.randn(image_latents.shape, device=device, generator=generator)
    dropped_text = torch.randn(text_vectors.shape, device=device, generator=generator)
    clean = config.conditions_clean
    given_time = torch.zeros_like(t) if clean else t
    dropped_time = torch.full_like(t, schedule.num_timesteps - 1) if clean else t

    def error(out_field: str, target: torch.Tensor, image, text, times) -> float:
        out = getattr(model(image, text, times), out_field)
        if out_field == "eps_text":
            out = schedule.epsilon_of_text(config, out, text, times[1])
        return (out.float() - target).pow(2).mean().item()

    image_given = error("eps_image", noise_image, noisy_image, text_vectors if clean else noisy_text,
                        torch.stack([t, given_time]))
    image_alone = error("eps_image", noise_image, noisy_image, dropped_text, torch.stack([t, dropped_time]))
    text_given = error("eps_text", noise_text, image_latents if clean else noisy_image, noisy_text,
                       torch.stack([given_time, t]))
    text_alone = error("eps_text", noise_text, dropped_image, noisy_text, torch.stack([dropped_time, t]))
    return {"gap_image": image_alone - image_given, "gap_text": text_alone - text_given}


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR: the min-SNR-gamma weight for epsilon prediction (Hang et al. 2023)."""
    return torch.clamp(snr, max=gamma) / snr
