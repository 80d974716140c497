"""Joint infilling with masked classifier-free guidance: one sampler for every task.

Known data comes with a mask per modality (1 = known; text per token, image per latent pixel).
At each step with time t:
  1. the known part is re-noised to t with fresh noise: x_in = m * noised(x0_known) + (1 - m) * x_t;
  2. conditional input x_in and unconditional input m * (pure noise) + (1 - m) * x_t go through the
     network in ONE batched forward (2 evaluations per step, however many modalities are known);
  3. out = out_unc + w * (out_cond - out_unc) on the heads' outputs (epsilon, v or the flow velocity,
     DiffusionConfig.prediction); a diffusers scheduler configured for that target steps x_t.
Each modality has its own scheduler: a flow model's text steps through noise levels shifted by `text_shift`
(as it was trained), so at each step the two modalities may be at different times.
At the end the known part is pasted back exactly. Text->image, image->text, unconditional joint
generation and partial infilling are the same call with different masks.

Each modality has its own guidance scale (SamplerSettings.guidance_scale_image / _text), applied at the steps whose
noise level lies in SamplerSettings.guidance_interval (all of them by default).

On a flow model the generated text takes fresh noise at each step (SamplerSettings.text_eta, DDIM's eta; 1 by
default): its clean estimate is noised to the next level with that share of the noise drawn fresh and the rest the
noise the estimate implies, so the words are decided afresh at every step rather than drifting apart from a
blend of the sentences they could still become; 0 steps it with the scheduler, as the image always is.

With SamplerSettings.clamp_text (Diffusion-LM's clamping trick) each step's clean-text estimate of the unknown
words is snapped to the nearest vocabulary vector, and the text is stepped with the output that implies it: the
text stays on words throughout, so the words settle together rather than drifting apart.

A model trained with timestep slices or independent times (DiffusionConfig.timesteps) has learned a
modality given clean, so a fully known modality is given to it clean at time 0 instead of re-noised
(and as pure noise at the last time in the unconditional pass): still 2 evaluations per step. A partly
known modality is always re-noised (it stays on the diagonal). Which is which is decided per sample,
so a sample does not depend on its batch mates.

A self-conditioned model (ModelConfig.self_condition) also takes the previous step's clean estimate (`estimates`:
zeros at the first step; the known part as given on the conditional rows, zeros on the unconditional ones).

Between steps a run can show its current estimate of the clean data (`estimate`, for previews) and drop
samples (`keep`, for cancelled requests) without changing the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from psunet.config import DiffusionConfig, ModelConfig
from psunet.diffusion import NoiseSchedule, make_scheduler
from psunet.model import PaintBias
from psunet.paint import PaintWithWords, paint_mask
from psunet.settings import SamplerSettings
from psunet.text import nearest_ids

Guidance = float | tuple[float, float]  # one scale for both modalities, or (image, text)

@dataclass
class SampleOutput:
    image_latents: torch.Tensor  # (B, C, H, W)
    text_vectors: torch.Tensor  # (B, L, E)
    network_evaluations: int  # samples x passes, summed over steps, per batch element


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


def _per_sample(name: str, values, batch: int) -> list:
    """A setting given once for the batch or once per sample, as a list (length 1 or `batch`)."""
    values = list(values)
    if len(values) not in (1, batch):
        raise ValueError(f"{name}: give one value or one per sample ({batch}), got {len(values)}")
    return values


def _generators(seeds: Sequence[int] | None, generators: Sequence[torch.Generator] | None, seed: int, batch: int,
                device: torch.device) -> list[torch.Generator]:
    """The run's random generators (one, or one per sample): the caller's, or seeded ones on `device`."""
    if generators is not None:
        if seeds is not None:
            raise ValueError("give seeds or generators, not both")
        return _per_sample("generators", generators, batch)
    seeds = _per_sample("seeds", [seed] if seeds is None else seeds, batch)
    return [torch.Generator(device=device).manual_seed(int(value)) for value in seeds]


def _randn(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (a CPU generator also drives a GPU run), on `device`."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def stepped_as(target: str, flow: bool = False) -> str:
    """The target a head's output is stepped with: its own, except a clean-sample prediction, stepped as the
    noise it implies (as the velocity it implies, in a flow model)."""
    if target != "sample":
        return target
    return "flow" if flow else "epsilon"


def run_settings(settings: SamplerSettings | None, options: dict) -> SamplerSettings:
    """The settings object, or one built from SamplerSettings fields given as keywords (not both)."""
    if settings is not None and options:
        raise ValueError(f"give settings or the fields {', '.join(options)}, not both")
    return settings if settings is not None else SamplerSettings(**options)


class InfillRun:
    """One batch of samples going through the sampler's steps together: joint_infill, one step at a time.

    `inputs()` gives this step's model inputs (the conditional and, when guided, the unconditional rows),
    `advance(out_image, out_text)` takes the model's outputs for them and steps the schedulers; `done`
    after `steps` steps, then `result()`. `step_together` puts several runs, at any of their steps, through
    one forward (times are per sample), which is how a service lets requests join a batch mid-way.
    Arguments as for joint_infill.
    """

    def __init__(self, model_config: ModelConfig, diffusion_config: DiffusionConfig, batch_size: int,
                 image_known: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                 text_known: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                 settings: SamplerSettings | None = None, seeds: Sequence[int] | None = None,
                 guidance_scales: Sequence[Guidance] | None = None, device: torch.device | str = "cpu",
                 paint: PaintWithWords | None = None, generators: Sequence[torch.Generator] | None = None,
                 vocabulary: torch.Tensor | None = None, **options):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        c, b = model_config, batch_size
        settings = run_settings(settings, options).check_for(diffusion_config.num_train_timesteps)
        scales = [settings.guidance] if guidance_scales is None else \
            [settings.with_guidance(scale).guidance for scale in guidance_scales]
        scales = _per_sample("guidance_scales", scales, b)
        self.device = device = torch.device(device)
        self.batch_size, self.steps, self.diffusion_config, self.paint = b, settings.steps, diffusion_config, paint
        self.self_condition = c.self_condition
        self.settings = settings
        self.image_shape = (b, *c.latent_shape)
        self.image_known, self.image_mask = _known_and_mask(
            "image", image_known, image_mask, self.image_shape, (b, 1, c.latent_size, c.latent_size), device)
        text_known, text_mask = _known_and_mask(
            "text", text_known, text_mask, (b, c.text_len, c.word_dim), (b, c.text_len), device)
        self.text_mask = text_mask[..., None]
        if paint is not None:
            paint.check(c, b)
        self.text_given, self.text_known = text_known, text_known * diffusion_config.text_scale

        if settings.clamp_text and vocabulary is None:
            raise ValueError("clamp_text needs the vocabulary's word vectors (vocabulary=, as the pipeline gives)")
        # the words as the model sees them (scaled like the text it denoises), and as directions, when clamping
        self.vocabulary = vocabulary.to(device).float() * diffusion_config.text_scale if settings.clamp_text else None
        self.unit_vocabulary = None if self.vocabulary is None else torch.nn.functional.normalize(self.vocabulary,
                                                                                                   dim=-1)
        self.generators = _generators(seeds, generators, settings.seed, b, device)
        self.schedule = NoiseSchedule(diffusion_config)
        self.image_target, self.text_target = diffusion_config.target("image"), diffusion_config.target("text")
        self.image_stepped = stepped_as(self.image_target, diffusion_config.flow)
        self.text_stepped = stepped_as(self.text_target, diffusion_config.flow)
        self.image_scheduler = make_scheduler(settings.scheduler, diffusion_config, settings.spacing,
                                              self.image_stepped)
        self.text_scheduler = make_scheduler(settings.scheduler, diffusion_config, settings.spacing,
                                             self.text_stepped, diffusion_config.text_shift)
        self.text_eta = settings.text_eta if diffusion_config.flow else 0.0
        self.image_scheduler.set_timesteps(settings.steps, device=device)
        self.text_scheduler.set_timesteps(settings.steps, device=device)

        self.image = self._noise(self.image_shape) * getattr(self.image_scheduler, "init_noise_sigma", 1.0)
        self.text = self._noise(self.text_known.shape) * getattr(self.text_scheduler, "init_noise_sigma", 1.0)
        anything_known = bool(self.image_mask.any() or self.text_mask.any())
        self.guided = anything_known and any(scale != 1.0 for pair in scales for scale in pair)
        weight = torch.tensor(scales, device=device, dtype=torch.float32)
        self.weight_image, self.weight_text = weight[:, 0].view(-1, 1, 1, 1), weight[:, 1].view(-1, 1, 1)
        self.clean_image = self._fully_known(self.image_mask)
        self.clean_text = self._fully_known(self.text_mask)
        self.passes = 2 if self.guided else 1
        self.painted = None if paint is None else paint_mask(c, paint, device).repeat(self.passes, 1, 1, 1)
        self.estimate_image, self.estimate_text = self.image, self.text
        self.index, self.network_evaluations = 0, 0

    @property
    def rows(self) -> int:
        """Rows this run puts into a forward: its samples, twice when guided."""
        return self.passes * self.batch_size

    @property
    def done(self) -> bool:
        return self.index >= self.steps

    def _fully_known(self, mask: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples whose modality is fully known and given clean (models that learned it)."""
        known = mask.flatten(1).bool().all(1)
        return known if self.diffusion_config.conditions_clean else torch.zeros_like(known)

    def _noise(self, shape, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Standard normal noise; with `rows` ((B,) bool) drawn only for those samples (zeros for the others),
        so each sample's generator advances by what that sample uses."""
        if len(self.generators) == 1:
            if rows is not None and not bool(rows.any()):
                return torch.zeros(shape, device=self.device)
            return _randn(shape, self.generators[0], self.device)
        draws = [_randn((1, *shape[1:]), g, self.device)
                 if rows is None or rows[i] else torch.zeros((1, *shape[1:]), device=self.device)
                 for i, g in enumerate(self.generators)]
        return torch.cat(draws)

    def _pair(self, time_image, time_text) -> torch.Tensor:
        return torch.stack([torch.as_tensor(time_image, device=self.device).expand(self.batch_size),
                            torch.as_tensor(time_text, device=self.device).expand(self.batch_size)])

    @staticmethod
    def _per_row(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return flags.view(-1, *[1] * (like.dim() - 1))

    def _conditional_input(self, known, mask, current, clean: torch.Tensor, times) -> torch.Tensor:
        """One modality's conditional input: the known part clean (rows in `clean`) or re-noised to `times`, the rest
        as sampled."""
        noised = self.schedule.add_noise(known, self._noise(known.shape, ~clean), times)
        renoised = mask * noised + (1 - mask) * current
        return torch.where(self._per_row(clean, known), known, renoised)

    def _paint_bias(self, t) -> PaintBias | None:
        """The bias at this step, on the conditional pass (the first batch_size rows)."""
        if self.paint is None:
            return None
        strength = self.paint.strength(float(self.schedule.snr(t.view(1))) ** -0.5, self.index, self.steps)
        if strength == 0:  # sigma = 1 / sqrt(SNR) above
            return None
        strengths = torch.zeros(self.rows, device=self.device)
        strengths[:self.batch_size] = strength
        return PaintBias(mask=self.painted, strength=strengths)

    def _times(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's (image time, text time)."""
        return self.image_scheduler.timesteps[self.index], self.text_scheduler.timesteps[self.index]

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PaintBias | None]:
        """(image, text, times (2, rows), paint bias or None): this step's model inputs, `rows` of them."""
        if self.done:
            raise RuntimeError("this run has done all its steps")
        t_image, t_text = self._times()
        self._image_in = self._conditional_input(self.image_known, self.image_mask, self.image, self.clean_image,
                                                 t_image.expand(self.batch_size))
        self._text_in = self._conditional_input(self.text_known, self.text_mask, self.text, self.clean_text,
                                                t_text.expand(self.batch_size))
        times_cond = self._pair(torch.where(self.clean_image, 0, t_image), torch.where(self.clean_text, 0, t_text))
        last_time = self.diffusion_config.num_train_timesteps - 1
        image_unc = self.image_mask * self._noise(self.image_shape) + (1 - self.image_mask) * self.image
        text_unc = self.text_mask * self._noise(self.text.shape) + (1 - self.text_mask) * self.text
        paint = self._paint_bias(t_image)
        if not self.guided:  # the unconditional noise is drawn all the same, so a sample's noise stream
            self._text_rows = self._text_in, times_cond[1]  # does not depend on its batch mates
            return self._image_in, self._text_in, times_cond, paint
        times_unc = self._pair(torch.where(self.clean_image, last_time, t_image),
                               torch.where(self.clean_text, last_time, t_text))
        text, times = torch.cat([self._text_in, text_unc]), torch.cat([times_cond, times_unc], dim=1)
        self._text_rows = text, times[1]
        return torch.cat([self._image_in, image_unc]), text, times, paint

    def estimates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) for this step's rows that a self-conditioned model takes beside `inputs()`: the last step's
        clean estimate (zeros before the first step), the known part as given on the conditional rows and zeros on
        the unconditional ones, as training gives a dropped modality."""
        image, text = (torch.zeros_like(self.image), torch.zeros_like(self.text)) if self.index == 0 else \
            (self.estimate_image, self.estimate_text)
        image, text = (1 - self.image_mask) * image, (1 - self.text_mask) * text
        image_cond, text_cond = image + self.image_mask * self.image_known, text + self.text_mask * self.text_known
        if not self.guided:
            return image_cond, text_cond
        return torch.cat([image_cond, image]), torch.cat([text_cond, text])

    def advance(self, out_image: torch.Tensor, out_text: torch.Tensor) -> None:
        """Step the schedulers with the model's outputs for this run's rows of `inputs()`.

        Guidance combines the outputs in the target the scheduler steps with (epsilon, v or the velocity: each is
        affine in the noise at a given input, so the guided sample is the same); a clean-sample text head is
        stepped as the noise (or velocity) it implies."""
        out_image = out_image.float()
        out_text = out_text.float()
        if self.text_target == "sample":
            text_rows, text_times = self._text_rows
            out_text = self.schedule.output_of(self.text_stepped, out_text, text_rows, text_times)
        t_image, t_text = self._times()
        if self.guided:
            cond_image, unc_image = out_image.chunk(2)
            cond_text, unc_text = out_text.chunk(2)
            total = self.diffusion_config.num_train_timesteps
            out_image = unc_image + self._weight(self.weight_image, t_image / total) * (cond_image - unc_image)
            out_text = unc_text + self._weight(self.weight_text, t_text / total) * (cond_text - unc_text)
        generator = self.generators[0] if len(self.generators) == 1 else self.generators
        image_in = torch.where(self._per_row(self.clean_image, self.image), self.image, self._image_in)
        text_in = torch.where(self._per_row(self.clean_text, self.text), self.text, self._text_in)
        self.estimate_image = self.schedule.clean_of(self.image_stepped, out_image, image_in, t_image)
        self.estimate_text = self.schedule.clean_of(self.text_stepped, out_text, text_in, t_text)
        if self.vocabulary is not None:
            words = self.vocabulary[nearest_ids(self.estimate_text, self.unit_vocabulary)]
            self.estimate_text = self.text_mask * self.estimate_text + (1 - self.text_mask) * words
            out_text = self.schedule.output_of(self.text_stepped, self.estimate_text, text_in, t_text)
        self.image = self.image_scheduler.step(out_image, t_image, image_in, generator=generator).prev_sample
        if self.text_eta:
            self.text = self._text_renoised(text_in)
        else:
            self.text = self.text_scheduler.step(out_text, t_text, text_in, generator=generator).prev_sample
        self.network_evaluations += self.passes
        self.index += 1
        if self.vocabulary is not None and self.done:  # end on the words (a last step to t=0 keeps a little noise)
            self.text = self.estimate_text

    def _text_renoised(self, text_in: torch.Tensor) -> torch.Tensor:
        """The text at the next step: its clean estimate noised to the scheduler's next noise level with
        n = sqrt(1 - eta^2) * (the noise the estimate implies at this level) + eta * (fresh noise), drawn only for
        the rows whose text is generated."""
        now, after = self.text_scheduler.sigmas[self.index:self.index + 2] * self.schedule.num_timesteps  # as times
        implied = self.schedule.epsilon_of("sample", self.estimate_text, text_in, now)
        fresh = self._noise(text_in.shape, ~self.clean_text)
        noise = (1 - self.text_eta ** 2) ** 0.5 * implied + self.text_eta * fresh
        return self.schedule.add_noise(self.estimate_text, noise, after)

    def _weight(self, weight: torch.Tensor, level: torch.Tensor) -> torch.Tensor | float:
        """The guidance scales at this noise level: the run's, or 1 (the conditional prediction) outside the
        settings' guidance interval."""
        return weight if self.settings.guides_at(float(level)) else 1.0

    def _pasted(self, image: torch.Tensor, text: torch.Tensor) -> SampleOutput:
        """Sampled (image, scaled text) with the known parts pasted back exactly."""
        image = self.image_mask * self.image_known + (1 - self.image_mask) * image
        text = self.text_mask * self.text_given + (1 - self.text_mask) * text / self.diffusion_config.text_scale
        return SampleOutput(image_latents=image, text_vectors=text, network_evaluations=self.network_evaluations)

    def result(self) -> SampleOutput:
        """The samples, the known parts pasted back exactly."""
        return self._pasted(self.image, self.text)

    def estimate(self) -> SampleOutput:
        """The current estimate of the clean samples (x0 from the last step's noise prediction; before the first
        step, the initial noise), the known parts pasted back: a preview of where the run is going."""
        return self._pasted(self.estimate_image, self.estimate_text)

    PER_SAMPLE = ("image_known", "image_mask", "text_given", "text_known", "text_mask", "image", "text",
                  "weight_image", "weight_text", "clean_image", "clean_text", "estimate_image", "estimate_text")

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these samples (indices into the batch, in order) from the next step on; the samples kept
        come out as they would have with the others. Needs a seed per sample (each sample its own noise)."""
        rows = list(rows)
        if not rows or sorted(set(rows)) != rows or rows[0] < 0 or rows[-1] >= self.batch_size:
            raise ValueError(f"keep: give increasing sample indices in 0..{self.batch_size - 1}, got {rows}")
        if len(self.generators) != self.batch_size:
            raise ValueError("keep: the run shares one generator between its samples; give a seed per sample")
        index = torch.tensor(rows, device=self.device)
        for name in self.PER_SAMPLE:
            setattr(self, name, getattr(self, name)[index])
        self.generators = [self.generators[i] for i in rows]
        if self.painted is not None:  # passes blocks of batch_size rows
            blocks = self.painted.view(self.passes, self.batch_size, *self.painted.shape[1:])
            self.painted = blocks[:, index].flatten(0, 1)
        for scheduler in (self.image_scheduler, self.text_scheduler):  # DPM-Solver's history of model outputs
            if getattr(scheduler, "model_outputs", None) is not None:
                scheduler.model_outputs = [None if out is None else out[index] for out in scheduler.model_outputs]
        self.batch_size = len(rows)
        self.image_shape = (self.batch_size, *self.image_shape[1:])


@torch.no_grad()
def step_together(model, runs: list[InfillRun]) -> None:
    """One forward for several runs, each at its own step: every run advances one step.

    A run with a paint bias at this step gets its bias; the others' rows get none (zero strength)."""
    inputs = [run.inputs() for run in runs]
    image, text = torch.cat([i[0] for i in inputs]), torch.cat([i[1] for i in inputs])
    times = torch.cat([i[2] for i in inputs], dim=1)
    options = {}
    biases = [i[3] for i in inputs]
    if any(bias is not None for bias in biases):
        tokens = next(bias.mask.shape[-1] for bias in biases if bias is not None)  # one model: one token count
        masks, strengths = [], []
        for run, bias in zip(runs, biases):
            if bias is None:
                masks.append(torch.zeros(run.rows, 1, tokens, tokens, device=run.device))
                strengths.append(torch.zeros(run.rows, device=run.device))
            else:
                masks.append(bias.mask)
                strengths.append(bias.strength)
        options["paint"] = PaintBias(mask=torch.cat(masks), strength=torch.cat(strengths))
    if runs[0].self_condition:  # one model: every run or none
        estimates = [run.estimates() for run in runs]
        options["estimate"] = tuple(torch.cat(parts) for parts in zip(*estimates))
    out = model(image, text, times, **options)
    start = 0
    for run in runs:
        rows = slice(start, start + run.rows)
        run.advance(out.eps_image[rows], out.eps_text[rows])
        start += run.rows


def run_to_end(model, run: InfillRun) -> SampleOutput:
    """The run's remaining steps, alone, then its result."""
    while not run.done:
        step_together(model, [run])
    return run.result()


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
    settings: SamplerSettings | None = None,
    seeds: Sequence[int] | None = None,
    guidance_scales: Sequence[Guidance] | None = None,
    device: torch.device | str = "cpu",
    paint: PaintWithWords | None = None,
    generators: Sequence[torch.Generator] | None = None,
    vocabulary: torch.Tensor | None = None,
    **options,
) -> SampleOutput:
    """Sample both modalities given any known parts.

    image_known (B, C, H, W) with image_mask (B, 1, H, W) or (B, H, W); text_known (B, L, E) with
    text_mask (B, L). A known modality without a mask is fully known. `model(image, text, t)`
    returns eps for both modalities (a PSUNet or anything with the same call).
    settings: a SamplerSettings, or its fields as keywords (steps=25, scheduler="ddim", guidance_scale=3, ...).
    seeds / guidance_scales: one per sample in place of the settings' single value (a scale is one number for
    both modalities or an (image, text) pair); with a seed per sample each sample's noise comes from its own
    generator, so it does not depend on its batch mates. generators: torch.Generators in place of seeds (one, or
    one per sample), as diffusers pipelines take them; they advance as the run draws noise. vocabulary: (V, E)
    the word vectors, in the data's scale, that settings.clamp_text snaps the text to (required with it).
    paint: paint-with-words regions for caption words (psunet.paint); the bias goes on the conditional pass.
    """
    return run_to_end(model, InfillRun(model_config, diffusion_config, batch_size, image_known, image_mask,
                                       text_known, text_mask, settings, seeds, guidance_scales, device, paint,
                                       generators, vocabulary, **options))
