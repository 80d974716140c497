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
vectors are scaled by `text_scale` before noising. The DDPM process's noise schedule comes from diffusers.

The process is DDPM's (the data scaled by sqrt(a_t), the noise by sqrt(1 - a_t)) or, with `prediction: flow`,
rectified flow (SD3, SiT): x_t = (1 - s) x0 + s eps at s = t / num_train_timesteps, the heads predicting the
velocity eps - x0, the training times drawn logit-normal, and the text optionally noisier than the image at the
same time (`text_shift`, SD3's shift per modality).

What a head predicts (`DiffusionConfig.target`: epsilon, v, the clean sample or the flow velocity) and how its
error is weighted are separate choices. NoiseSchedule converts between the targets, the one place the loss, the
conditional gaps and the sampler do it. Every weight is stated on the clean-data error ||x0_hat - x0||^2: an
epsilon error is SNR times it, a v error (SNR + 1) times it, a velocity error (1 + sqrt(SNR))^2 = 1 / s^2 times
it, so a recipe's weight means the same whatever its target. The weight is clamp(base, snr_floor, min_snr_gamma)
with base SNR (a plain epsilon loss), SNR + 1 (a plain v loss) or (1 + sqrt(SNR))^2 (a plain velocity loss): the
cap is min-SNR-gamma, the floor keeps the high-noise times, where one modality has to read the other, from
counting for almost nothing.

With `rounding_loss_weight` the text also gets Diffusion-LM's rounding term: the cross-entropy of the true words
given the clean-text estimate, read as logits -||x0_hat - e_w||^2 / 2 over the vocabulary's vectors, so that the
estimate singles out one word where the squared error alone is content with a blend of the likely ones.

A self-conditioned model (`ModelConfig.self_condition`, Analog Bits) also takes an estimate of the clean data: on
half the samples (drawn per sample) its own first estimate from a gradient-free pass, on the rest zeros; in both,
the data itself where a modality is given clean and zeros where it is dropped, as the sampler gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from psunet.config import DiffusionConfig
from psunet.ema import unwrap
from psunet.model import PSUNet

DDPM_SCHEDULERS = {
    "dpmsolver++": lambda kw: DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2),
    "ddim": lambda kw: DDIMScheduler(**kw, set_alpha_to_one=False, clip_sample=False),
    "ddpm": lambda kw: DDPMScheduler(**kw, clip_sample=False),
}
# flow models: (number of training times, shift) -> scheduler
FLOW_SCHEDULERS = {
    "dpmsolver++": lambda times, shift: DPMSolverMultistepScheduler(
        num_train_timesteps=times, use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
        algorithm_type="dpmsolver++", solver_order=2),
    "euler": lambda times, shift: FlowMatchEulerDiscreteScheduler(num_train_timesteps=times, shift=shift),
}
SCHEDULERS = tuple(dict.fromkeys([*DDPM_SCHEDULERS, *FLOW_SCHEDULERS]))


Target = Literal["epsilon", "v", "sample", "flow"]
SCHEDULER_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}  # a sample prediction steps as epsilon


def schedulers_for(config: DiffusionConfig) -> tuple[str, ...]:
    """The scheduler names that can sample a model trained with `config`."""
    return tuple(FLOW_SCHEDULERS if config.flow else DDPM_SCHEDULERS)


def check_scheduler(name: str, config: DiffusionConfig) -> None:
    """Refuse a scheduler name that is unknown or cannot sample a model trained with `config`, naming the ones
    that can."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown name {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if name not in schedulers_for(config):
        what = "cannot sample a flow model" if config.flow else "samples flow models only"
        raise ValueError(f"scheduler: {name!r} {what} (this model's diffusion.prediction is {config.prediction}); "
                         f"choose one of {', '.join(schedulers_for(config))}")


def make_scheduler(name: str, config: DiffusionConfig, spacing: str = "trailing", prediction: str = "epsilon",
                   shift: float = 1.0):
    """A fresh diffusers scheduler, by name, over the training noise schedule; `spacing` is its timestep_spacing,
    `prediction` the target it is stepped with (epsilon or v). A flow model's scheduler steps the velocity over
    noise levels shifted by `shift` (its own spacing)."""
    check_scheduler(name, config)
    if config.flow:
        return FLOW_SCHEDULERS[name](config.num_train_timesteps, shift)
    return DDPM_SCHEDULERS[name](dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=SCHEDULER_PREDICTION[prediction],
        timestep_spacing=spacing,
        **({"rescale_betas_zero_snr": True} if config.zero_terminal_snr else {}),
    ))


def shifted(level: torch.Tensor, shift: float) -> torch.Tensor:
    """A noise level s in [0, 1] shifted as SD3 shifts by resolution: shift s / (1 + (shift - 1) s)."""
    return shift * level / (1 + (shift - 1) * level)


class NoiseSchedule:
    """The forward process q(x_t | x_0), on the data's device: a diffusers DDPMScheduler's, or rectified flow's
    (`DiffusionConfig.flow`); the times the loss draws; and the conversions between what a head predicts
    (epsilon, v, the clean sample, the flow velocity) and the noise or the clean data."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.alphas_cumprod = None if config.flow else make_scheduler("ddpm", config).alphas_cumprod

    @property
    def num_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) coefficients at `timesteps` (one, or one per sample), broadcastable to `like`: DDPM's
        (sqrt(a), sqrt(1 - a)), flow's (1 - s, s)."""
        if self.config.flow:
            level = (timesteps.to(like.device).float() / self.num_timesteps).clamp(0, 1)
            signal, noise = 1 - level, level
        else:
            alpha_bar = self.alphas_cumprod.to(like.device)[timesteps.long()]
            signal, noise = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if signal.dim():
            signal, noise = (c.view(-1, *[1] * (like.dim() - 1)) for c in (signal, noise))
        return signal, noise

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._coefficients(timesteps, x0)
        return (signal * x0 + sigma * noise).to(x0.dtype)

    def draw_times(self, batch: int, start: int, end: int, device, generator=None) -> torch.Tensor:
        """Training times in [start, end): uniform whole times (DDPM), or logit-normal noise levels (flow) mapped
        onto the interval."""
        if not self.config.flow:
            return torch.randint(start, end, (batch,), device=device, generator=generator)
        normal = torch.randn(batch, device=device, generator=generator)
        return start + (end - start) * torch.sigmoid(self.config.time_mean + self.config.time_std * normal)

    def text_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The text's time at the image's `timesteps`: shifted by `text_shift` (flow), else the same."""
        if self.config.text_shift == 1.0:
            return timesteps
        return self.num_timesteps * shifted(timesteps.float() / self.num_timesteps, self.config.text_shift)

    def target_of(self, target: Target, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                  ) -> torch.Tensor:
        """What a head with `target` should output for data `clean` noised with `noise` to `timesteps`."""
        if target == "epsilon":
            return noise
        if target == "sample":
            return clean
        if target == "flow":
            return noise - clean
        signal, sigma = self._coefficients(timesteps, clean)
        return signal * noise - sigma * clean

    def output_of(self, target: Target, clean: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
                  ) -> torch.Tensor:
        """The output a head with `target` gives when it implies clean data `clean` at this noisy input."""
        signal, sigma = self._coefficients(timesteps, noisy)
        # a flow model's clean input (s = 0) implies no noise: any finite output will do there
        return self.target_of(target, clean, (noisy - signal * clean) / sigma.clamp(min=1e-6), timesteps)

    def epsilon_of(self, target: Target, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
                   ) -> torch.Tensor:
        """A head's output as the noise prediction it implies, given its noisy input."""
        output = output.float()
        if target == "epsilon":
            return output
        signal, sigma = self._coefficients(timesteps, noisy)
        if target == "v":
            return signal * output + sigma * noisy
        if target == "flow":  # eps = x0 + velocity, x0 = noisy - s * velocity
            return noisy + signal * output
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
        if target == "flow":
            return noisy - sigma * output
        return (noisy - sigma * output) / signal

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self.config.flow:
            signal, sigma = self._coefficients(timesteps, timesteps)
            return signal ** 2 / sigma.clamp(min=1e-6) ** 2
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return alpha_bar / (1 - alpha_bar)


def clean_data_weight(config: DiffusionConfig, snr: torch.Tensor) -> torch.Tensor:
    """The loss weight on the clean-data error at signal-to-noise ratio `snr`: clamp(base, snr_floor,
    min_snr_gamma), base SNR, SNR + 1 or (1 + sqrt(SNR))^2."""
    base = {"snr": snr, "snr+1": snr + 1, "flow": (1 + snr.sqrt()) ** 2}[config.weight_base]
    if config.snr_floor is None and config.min_snr_gamma is None:
        return base
    return torch.clamp(base, min=config.snr_floor, max=config.min_snr_gamma)


def loss_weight(config: DiffusionConfig, target: Target, snr: torch.Tensor) -> torch.Tensor:
    """The weight of a head's squared error in its own target's terms, so that the clean-data error gets
    `clean_data_weight`: an epsilon error is SNR times the clean-data error, a v error SNR + 1 times, a flow
    velocity error 1 / s^2 = (1 + sqrt(SNR))^2 times."""
    per_clean_error = {"epsilon": snr, "v": snr + 1, "sample": torch.ones_like(snr), "flow": (1 + snr.sqrt()) ** 2
                       }[target]
    return clean_data_weight(config, snr) / per_clean_error


@dataclass
class LossOutput:
    loss: torch.Tensor
    loss_image: torch.Tensor
    loss_text: torch.Tensor
    kept_image: torch.Tensor  # (B,) 1 where the image's loss counts: neither dropped nor given clean
    kept_text: torch.Tensor
    loss_rounding: torch.Tensor | None = None  # with diffusion.rounding_loss_weight > 0


def rounding_loss(clean_estimate: torch.Tensor, clean: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
    """(B,) Diffusion-LM's rounding term: per sample the mean cross-entropy of the true words of `clean` (B, L, E)
    under logits -||x0_hat - e_w||^2 / 2 over the vocabulary's vectors (V, E), x0_hat = `clean_estimate`. All
    three in the same scale; every clean vector is a vocabulary row, so its word is the nearest one."""
    with torch.autocast(clean.device.type, enabled=False):
        words = vocabulary.to(clean.device).float()
        half_norms = words.pow(2).sum(-1) / 2  # -||x - e||^2 / 2 = x.e - ||e||^2 / 2 - (a constant per token)
        targets = (clean.float() @ words.T - half_norms).argmax(-1)
        logits = clean_estimate.float() @ words.T - half_norms
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


def _masked_mean(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (per_sample * keep).sum() / keep.sum().clamp(min=1)


def draw_slices(schedule: NoiseSchedule, batch: int, start: int, end: int, device, generator=None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample (t_image, t_text, image clean, text clean) for the configured timesteps; times in [start, end)
    before the text's shift."""
    config = schedule.config

    def draw_times() -> torch.Tensor:
        return schedule.draw_times(batch, start, end, device, generator)

    t_image = draw_times()
    no = torch.zeros(batch, dtype=torch.bool, device=device)
    if config.timesteps == "shared":
        return t_image, schedule.text_time(t_image), no, no
    t_other = draw_times()
    if config.timesteps == "independent":
        return t_image, schedule.text_time(t_other), no, no
    w = config.slice_weights
    probabilities = torch.tensor([w.joint, w.text_to_image, w.image_to_text, w.independent], device=device)
    kind = torch.multinomial(probabilities / w.total(), batch, replacement=True, generator=generator)
    clean_text, clean_image = kind == 1, kind == 2
    t_text = schedule.text_time(torch.where(kind == 3, t_other, t_image))
    zero = torch.zeros_like(t_image)
    return torch.where(clean_image, zero, t_image), torch.where(clean_text, zero, t_text), clean_image, clean_text


def self_conditioned(model) -> bool:
    """Whether `model` (behind any wrapper) takes an estimate: a self-conditioned PSUNet or ensemble; anything else
    with their call does not."""
    return bool(getattr(getattr(unwrap(model), "config", None), "self_condition", False))


def diffusion_loss(model: PSUNet, schedule: NoiseSchedule, config: DiffusionConfig,
                   image_latents: torch.Tensor, text_vectors: torch.Tensor,
                   generator: torch.Generator | None = None, time_range: tuple[int, int] | None = None,
                   vocabulary: torch.Tensor | None = None) -> LossOutput:
    """The weighted denoising error of both heads (each on its own target) over the configured timestep slices,
    with noise-replacement dropout per modality, and with config.rounding_loss_weight the rounding term.

    time_range [start, end): draw the diffusion times from that interval only (an expert's branch training).
    vocabulary: the word vectors (V, E) in the data's scale (TextCodec.table), which the rounding term needs.
    """
    if config.rounding_loss_weight and vocabulary is None:
        raise ValueError("diffusion.rounding_loss_weight needs the vocabulary's word vectors (vocabulary=)")
    batch, device = image_latents.shape[0], image_latents.device
    text_vectors = text_vectors * config.text_scale
    start, end = time_range or (0, schedule.num_timesteps)
    t_image, t_text, clean_image, clean_text = draw_slices(schedule, batch, start, end, device, generator)
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
        times = torch.stack([t_image, t_text])

    image_target, text_target = config.target("image"), config.target("text")
    options = {}
    if self_conditioned(model):
        first = torch.rand(batch, device=device, generator=generator) < 0.5
        estimate_image, estimate_text = torch.zeros_like(noisy_image), torch.zeros_like(noisy_text)
        rows = first.nonzero().flatten()
        if len(rows):
            with torch.no_grad():
                guess = unwrap(model)(noisy_image[rows], noisy_text[rows], times[:, rows])
            estimate_image[rows] = schedule.clean_of(image_target, guess.eps_image, noisy_image[rows], t_image[rows])
            estimate_text[rows] = schedule.clean_of(text_target, guess.eps_text, noisy_text[rows], t_text[rows])
        estimate_image = torch.where(clean_image.view(-1, 1, 1, 1), image_latents, estimate_image)
        estimate_text = torch.where(clean_text.view(-1, 1, 1), text_vectors, estimate_text)
        options["estimate"] = (estimate_image * keep_image.view(-1, 1, 1, 1), estimate_text * keep_text.view(-1, 1, 1))
    out = model(noisy_image, noisy_text, times, **options)
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
    loss = loss_image + config.text_loss_weight * loss_text
    loss_rounding = None
    if config.rounding_loss_weight:
        scale = config.text_scale
        estimate = schedule.clean_of(text_target, out.eps_text, noisy_text, t_text)
        loss_rounding = _masked_mean(rounding_loss(estimate / scale, text_vectors / scale, vocabulary), learn_text)
        loss = loss + config.rounding_loss_weight * loss_rounding
    return LossOutput(loss=loss, loss_image=loss_image, loss_text=loss_text, kept_image=learn_image,
                      kept_text=learn_text, loss_rounding=loss_rounding)


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
    t_text = schedule.text_time(t)
    noise_image = torch.randn(image_latents.shape, device=device, generator=generator)
    noise_text = torch.randn(text_vectors.shape, device=device, generator=generator)
    noisy_image = schedule.add_noise(image_latents, noise_image, t)
    noisy_text = schedule.add_noise(text_vectors, noise_text, t_text)
    dropped_image = torch.randn(image_latents.shape, device=device, generator=generator)
    dropped_text = torch.randn(text_vectors.shape, device=device, generator=generator)
    clean = config.conditions_clean
    last = torch.full_like(t, schedule.num_timesteps - 1)
    given_image, given_text = (torch.zeros_like(t), torch.zeros_like(t)) if clean else (t, t_text)
    dropped_image_time, dropped_text_time = (last, last) if clean else (t, t_text)

    def error(out_field: str, target: torch.Tensor, image, text, times) -> float:
        out = model(image, text, times)
        if out_field == "eps_text":
            eps = schedule.epsilon_of(config.target("text"), out.eps_text, text, times[1])
        else:
            eps = schedule.epsilon_of(config.target("image"), out.eps_image, image, times[0])
        return (eps - target).pow(2).mean().item()

    image_given = error("eps_image", noise_image, noisy_image, text_vectors if clean else noisy_text,
                        torch.stack([t, given_text]))
    image_alone = error("eps_image", noise_image, noisy_image, dropped_text, torch.stack([t, dropped_text_time]))
    text_given = error("eps_text", noise_text, image_latents if clean else noisy_image, noisy_text,
                       torch.stack([given_image, t_text]))
    text_alone = error("eps_text", noise_text, dropped_image, noisy_text, torch.stack([dropped_image_time, t_text]))
    return {"gap_image": image_alone - image_given, "gap_text": text_alone - text_given}
