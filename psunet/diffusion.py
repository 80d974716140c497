"""The training objective: denoising on image latents and word vectors, over timestep slices.

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

What a head predicts (`DiffusionConfig.target`: epsilon, v or the clean sample) and how its error is weighted are
separate choices. NoiseSchedule converts between the targets, the one place the loss, the conditional gaps and
the sampler do it. Every weight is stated on the clean-data error ||x0_hat - x0||^2: an epsilon error is SNR times
it, a v error (SNR + 1) times it, so a recipe's weight means the same whatever its target. The weight is
clamp(base, snr_floor, min_snr_gamma) with base SNR (a plain epsilon loss) or SNR + 1 (a plain v loss): the cap
is min-SNR-gamma, the floor keeps the high-noise times, where one modality has to read the other, from counting
for almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from psunet.config import DiffusionConfig
from psunet.model import PSUNet

SCHEDULERS = {
    "dpmsolver++": lambda kw: DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2),
    "ddim": lambda kw: DDIMScheduler(**kw, set_alpha_to_one=False, clip_sample=False),
    "ddpm": lambda kw: DDPMScheduler(**kw, clip_sample=False),
}


Target = Literal["epsilon", "v", "sample"]
SCHEDULER_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}  # a sample prediction steps as epsilon


def make_scheduler(name: str, config: DiffusionConfig, spacing: str = "trailing", prediction: str = "epsilon"):
    """A fresh diffusers scheduler, by name, over the training noise schedule; `spacing` is its timestep_spacing,
    `prediction` the target it is stepped with (epsilon or v)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown name {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=SCHEDULER_PREDICTION[prediction],
        timestep_spacing=spacing,
        **({"rescale_betas_zero_snr": True} if config.zero_terminal_snr else {}),
    ))


class NoiseSchedule:
    """The forward process q(x_t | x_0) of a diffusers DDPMScheduler, on the data's device, and the conversions
    between what a head predicts (epsilon, v, the clean sample) and the noise or the clean data."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.scheduler = make_scheduler("ddpm", config)
        self.alphas_cumprod = self.scheduler.alphas_cumprod

    @property
    def num_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, timesteps.long())

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a), sqrt(1 - a)) at `timesteps` (one, or one per sample), broadcastable to `like`."""
        alpha_bar = self.alphas_cumprod.to(like.device)[timesteps.long()]
        alpha_bar = alpha_bar.view(-1, *[1] * (like.dim() - 1)) if alpha_bar.dim() else alpha_bar
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def target_of(self, target: Target, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                  ) -> torch.Tensor:
        """What a head with `target` should output for data `clean` noised with `noise` to `timesteps`."""
        if target == "epsilon":
            return noise
        if target == "sample":
            return clean
        signal, sigma = self._coefficients(timesteps, clean)
        return signal * noise - sigma * clean

    def output_of(self, target: Target, clean: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
                  ) -> torch.Tensor:
        """The output a head with `target` gives when it implies clean data `clean` at this noisy input."""
        signal, sigma = self._coefficients(timesteps, noisy)
        return self.target_of(target, clean, (noisy - signal * clean) / sigma, timesteps)

    def epsilon_of(self, target: Target, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
                   ) -> torch.Tensor:
        """A head's output as the noise prediction it implies, given its noisy input."""
        output = output.float()
        if target == "epsilon":
            return output
        signal, sigma = self._coefficients(timesteps, noisy)
        if target == "v":
            return signal * output + sigma * noisy
        return (noisy - signal * output) / sigma

    def clean_of(self, target: Target, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
                 ) -> torch.Tensor:
        """A head's output as the clean data it implies, given its noisy input."""
        output = output.float()
        if target == "sample":
            return output
        signal, sigma = self._coefficients(timesteps, noisy)
        if target == "v":
            return signal * noisy - sigma * output
        return (noisy - sigma * output) / signal

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return alpha_bar / (1 - alpha_bar)


def clean_data_weight(config: DiffusionConfig, snr: torch.Tensor) -> torch.Tensor:
    """The loss weight on the clean-data error at signal-to-noise ratio `snr`: clamp(base, snr_floor,
    min_snr_gamma), base SNR or SNR + 1."""
    base = snr + 1 if config.weight_base == "snr+1" else snr
    if config.snr_floor is None and config.min_snr_gamma is None:
        return base
    return torch.clamp(base, min=config.snr_floor, max=config.min_snr_gamma)


def loss_weight(config: DiffusionConfig, target: Target, snr: torch.Tensor) -> torch.Tensor:
    """The weight of a head's squared error in its own target's terms, so that the clean-data error gets
    `clean_data_weight`: an epsilon error is SNR times the clean-data error, a v error SNR + 1 times."""
    per_clean_error = {"epsilon": snr, "v": snr + 1, "sample": torch.ones_like(snr)}[target]
    return clean_data_weight(config, snr) / per_clean_error


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
    """The weighted denoising error of both heads (each on its own target) over the configured timestep slices,
    with noise-replacement dropout per modality.

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
    image_target, text_target = config.target("image"), config.target("text")
    err_image = (out.eps_image.float() - schedule.target_of(image_target, image_latents, noise_image, t_image)
                 ).pow(2).flatten(1).mean(1)
    err_text = (out.eps_text.float() - schedule.target_of(text_target, text_vectors, noise_text, t_text)
                ).pow(2).flatten(1).mean(1)
    err_image = err_image * loss_weight(config, image_target, schedule.snr(t_image))
    # scaling the data by s multiplies its signal-to-noise ratio by s^2
    err_text = err_text * loss_weight(config, text_target, schedule.snr(t_text) * config.text_scale ** 2)

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
        out = model(image, text, times)
        if out_field == "eps_text":
            eps = schedule.epsilon_of(config.target("text"), out.eps_text, text, times[1])
        else:
            eps = schedule.epsilon_of(config.target("image"), out.eps_image, image, times[0])
        return (eps - target).pow(2).mean().item()

    image_given = error("eps_image", noise_image, noisy_image, text_vectors if clean else noisy_text,
                        torch.stack([t, given_time]))
    image_alone = error("eps_image", noise_image, noisy_image, dropped_text, torch.stack([t, dropped_time]))
    text_given = error("eps_text", noise_text, image_latents if clean else noisy_image, noisy_text,
                       torch.stack([given_time, t]))
    text_alone = error("eps_text", noise_text, dropped_image, noisy_text, torch.stack([dropped_time, t]))
    return {"gap_image": image_alone - image_given, "gap_text": text_alone - text_given}
