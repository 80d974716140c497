"""A trained model with its autoencoder and word vectors: the tasks users call, all through one sampler.

    pipe = PSUNetPipeline.from_pretrained("runs/demo/model")            # or "models:/psunet/3", a checkpoint
    out = pipe(prompt="a small red circle on the left", num_inference_steps=25, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0))
    out.images[0].save("circle.png")                                       # PIL, as diffusers pipelines give
    captions = pipe(image=Image.open("shape.png")).captions                 # image -> text
    filled = pipe(prompt="a [?] circle on the [?]", image=image, mask_image=mask)  # infill both
    pipe.save_pretrained("my-model")

Calling the pipeline follows diffusers' conventions; the task methods below it (`infill`, `text_to_image`,
`image_to_text`, `generate`) take and give numpy arrays and are what jobs and the service use. Every task is
`infill` (one sampler run, psunet.sampling) with a different known part and mask.
Image masks are per pixel, True where the image is to be generated; a latent cell is known only when
none of its pixels is to be generated, and known pixels are pasted back into the output unchanged. In
a prompt, `[?]` marks a word to fill in; the given words come back unchanged. Paint-with-words steers
where a prompt's word goes: `paint=[[("red", region)], ...]` with a (H, W) bool region per word.
A service interleaves infills: `start_infill` each, `step([...their runs])` until a run is done (one
forward for all, each run at its own step), then `finish_infill`; between steps `preview` decodes where a
run is going and `pending.keep(rows)` drops samples nobody waits for any more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffusers.utils import BaseOutput
from PIL import Image

from psunet import model_folder
from psunet.autoencoder import Autoencoder
from psunet.config import DiffusionConfig, ModelConfig
from psunet.model import PSUNet
from psunet.paint import PaintWithWords
from psunet.progress import progress
from psunet.sampling import Guidance, InfillRun, SampleOutput, run_to_end, step_together
from psunet.settings import SamplerSettings
from psunet.text import BLANK, END, TextCodec, load_vectors, tokenize

Paint = list[list[tuple[int | str, np.ndarray]]]  # per prompt: (word index or the word itself, (H, W) bool region)
ImageInput = Image.Image | list[Image.Image] | np.ndarray  # PIL image(s), or (B, H, W, 3) uint8

PRECISIONS = ("fp32", "bf16")
OUTPUT_TYPES = ("pil", "np")


@dataclass
class PSUNetPipelineOutput(BaseOutput):
    """What calling the pipeline returns: images (PIL, or (B, H, W, 3) floats in [0, 1] for output_type "np"),
    captions, and per prompt the words the model does not know."""

    images: list[Image.Image] | np.ndarray
    captions: list[str]
    unknown_words: list[list[str]]


@dataclass
class InfillResult:
    images: np.ndarray  # (B, H, W, 3) uint8
    captions: list[str]
    unknown_words: list[list[str]]  # per prompt, words not in the vocabulary (empty without prompts)
    network_evaluations: int


@dataclass
class PendingInfill:
    """An infill whose sampler run is under way (PSUNetPipeline.start_infill), with what decoding it needs."""

    run: InfillRun
    prompts: list[str] | None
    images: np.ndarray | None
    pixel_masks: np.ndarray | None
    unknown_words: list[list[str]]

    def keep(self, rows: list[int]) -> None:
        """Keep only these samples (increasing indices) from the next step on (InfillRun.keep)."""
        self.run.keep(rows)
        pick = (lambda values: None if values is None else
                values[rows] if isinstance(values, np.ndarray) else [values[i] for i in rows])
        self.prompts, self.images, self.pixel_masks = pick(self.prompts), pick(self.images), pick(self.pixel_masks)
        self.unknown_words = pick(self.unknown_words)


@dataclass
class PSUNetPipeline:
    model: PSUNet
    model_config: ModelConfig
    diffusion_config: DiffusionConfig
    codec: TextCodec
    autoencoder: Autoencoder
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    training_step: int | None = None  # the step the weights were saved at, when the folder records it
    precision: str = "fp32"  # bf16: the denoiser's weights and matmuls in bfloat16 (the sampler's state stays fp32)
    progress_bar: bool = True  # calling the pipeline shows its steps (psunet.progress) when sampling takes a while

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "PSUNetPipeline":
        """Move the model and the autoencoder (in place); returns self."""
        self.model.to(device)
        self.autoencoder.vae.to(device)
        return self

    @classmethod
    def from_pretrained(cls, reference: str | Path, weights: str = "ema", device: str = "cpu",
                        precision: str = "fp32", **source_options) -> "PSUNetPipeline":
        """Load a model folder (psunet.model_folder), a training checkpoint, or a model URI (models:/<name>/<version>,
        runs:/<run id>/model: resolved by an installed model source; `source_options` such as tracking_uri go to it).

        precision "bf16" casts the denoiser to bfloat16 (GPUs, and CPUs with native bf16 such as AVX512-BF16/AMX).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        files = model_folder.locate(model_folder.resolve(reference, **source_options), weights)
        model, model_config, diffusion_config, _ = model_folder.model_from(files, device)
        if precision == "bf16":
            model.to(torch.bfloat16)
        codec = TextCodec(load_vectors(files.word_vectors, files.word_vectors_sha256), model_config.text_len)
        if codec.dim != model_config.word_dim:
            raise ValueError(f"word vectors are {codec.dim}-d but the model's word_dim is {model_config.word_dim}")
        settings = SamplerSettings.model_validate(files.sampler) if files.sampler else SamplerSettings()
        return cls(model, model_config, diffusion_config, codec, Autoencoder.load(str(files.autoencoder), device=device),
                   settings=settings, training_step=files.step, precision=precision)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write this pipeline as a model folder (replaced if it exists): weights, configs, autoencoder, word
        vectors and the default sampler settings; `from_pretrained(folder)` gives it back."""
        config = {"model": self.model_config.model_dump(), "diffusion": self.diffusion_config.model_dump()}
        if hasattr(self.model, "intervals"):
            config["experts"] = {"intervals": [list(pair) for pair in self.model.intervals]}
        weights = {name: tensor.float() for name, tensor in self.model.state_dict().items()}
        return model_folder.write(folder, config, weights, self.autoencoder.vae, self.codec.keyed_vectors,
                                  {"step": self.training_step}, self.settings.model_dump())

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image: ImageInput | None = None,
                 mask_image: ImageInput | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | tuple[float, float] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 batch_size: int | None = None) -> PSUNetPipelineOutput:
        """Text->image (prompt), image->text (image), infilling (prompt with [?] blanks, image with mask_image),
        or unconditional pairs (batch_size), with diffusers' argument names.

        image: PIL image(s) or (B, H, W, 3) uint8 at the model's resolution; mask_image: PIL masks (white = generate,
        as diffusers' inpainting) or (B, H, W) bool (True = generate); guidance_scale: one for both modalities or an
        (image, text) pair; generator: one torch.Generator for the batch or one per sample (defaults: the
        pipeline's settings, seed included). output_type "pil" or "np" (floats in [0, 1])."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        settings = self.settings
        if num_inference_steps is not None:
            settings = SamplerSettings.model_validate({**settings.model_dump(), "steps": num_inference_steps})
        if guidance_scale is not None:
            settings = settings.with_guidance(guidance_scale)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        generators = [generator] if isinstance(generator, torch.Generator) else generator
        if batch_size is None and prompt is None and image is None:
            batch_size = 1
        pending = self.start_infill(prompts, _as_images(image), _as_masks(mask_image), batch_size, settings,
                                    generators=generators)
        steps = range(pending.run.steps)
        for _ in progress(steps, desc="sampling", unit="step") if self.progress_bar else steps:
            self.step([pending.run])
        result = self.finish_infill(pending)
        images = [Image.fromarray(array) for array in result.images] if output_type == "pil" else \
            result.images.astype(np.float32) / 255
        return PSUNetPipelineOutput(images, result.captions, result.unknown_words)

    def denoise(self, image: torch.Tensor, text: torch.Tensor, times: torch.Tensor, **options):
        """One network evaluation in the pipeline's precision (what the sampler calls)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(image, text, times, **options)

    def start(self, batch_size: int, settings: SamplerSettings | None = None, seeds: list[int] | None = None,
              guidance_scales: list[Guidance] | None = None, **known) -> InfillRun:
        """The sampler's run with these settings; `seeds` / `guidance_scales` (one per sample) override theirs;
        `known` holds the known parts, paint and generators (InfillRun's arguments)."""
        return InfillRun(self.model_config, self.diffusion_config, batch_size, settings=settings or self.settings,
                         seeds=seeds, guidance_scales=guidance_scales, device=self.device,
                         vocabulary=self.codec.table, **known)

    def step(self, runs: list[InfillRun]) -> None:
        """One forward of the denoiser for several runs, each at its own step (see sampling.step_together)."""
        step_together(self.denoise, runs)

    def sample(self, batch_size: int, settings: SamplerSettings | None = None, seeds: list[int] | None = None,
               guidance_scales: list[Guidance] | None = None, **known) -> SampleOutput:
        """joint_infill with these settings: `start(...)` taken through all its steps."""
        return run_to_end(self.denoise, self.start(batch_size, settings, seeds, guidance_scales, **known))

    @property
    def resolution(self) -> int:
        return self.model_config.latent_size * self.autoencoder.downsample

    def infill(self, prompts: list[str] | None = None, images: np.ndarray | None = None,
               image_masks: np.ndarray | None = None, count: int | None = None,
               settings: SamplerSettings | None = None, seeds: list[int] | None = None,
               guidance_scales: list[Guidance] | None = None, paint: Paint | None = None,
               paint_weight: float = 1.0, paint_fraction: float = 1.0) -> InfillResult:
        """Complete whatever is missing, all in one batch.

        prompts: captions, possibly with [?] blanks; images: (B, H, W, 3) uint8 at the model's
        resolution; image_masks: (B, H, W) bool, True = generate (no mask: the image is fully known);
        count: batch size when nothing is given (unconditional pairs); seeds / guidance_scales: one
        per sample, in place of the settings' single value (a sample then does not depend on its batch).
        paint: per prompt, (word, region) pairs: the word (its index in the prompt, or the word) is steered
        into the region ((H, W) bool at the model's resolution) with strength paint_weight during the first
        paint_fraction of the steps.
        """
        return self.finish_infill(self.start_infill(prompts, images, image_masks, count, settings, seeds,
                                                    guidance_scales, paint, paint_weight, paint_fraction))

    def start_infill(self, prompts: list[str] | None = None, images: np.ndarray | None = None,
                     image_masks: np.ndarray | None = None, count: int | None = None,
                     settings: SamplerSettings | None = None, seeds: list[int] | None = None,
                     guidance_scales: list[Guidance] | None = None, paint: Paint | None = None,
                     paint_weight: float = 1.0, paint_fraction: float = 1.0,
                     generators: list[torch.Generator] | None = None) -> PendingInfill:
        """`infill`'s first half: inputs checked and encoded, the sampler's run started (no step taken).
        generators: torch.Generators in place of seeds (one, or one per sample).

        Advance `pending.run` with `step` (with other runs or alone), then `finish_infill(pending)`."""
        batch = self._batch_size(prompts, images, image_masks, count)
        known = {} if generators is None else {"generators": generators}
        unknown_words: list[list[str]] = [[] for _ in range(batch)]
        if prompts is not None:
            encoded = self.codec.encode(self.check_prompts(prompts))
            known.update(text_known=encoded.vectors.to(self.device), text_mask=encoded.known.to(self.device))
            unknown_words = encoded.unknown
        pixel_masks = None
        if images is not None:
            images = self._checked_images(images)
            known["image_known"] = self.autoencoder.encode(images).to(self.device)
            if image_masks is not None:
                pixel_masks = self._checked_masks(image_masks, images.shape[:3])
                known["image_mask"] = self._latent_mask(pixel_masks)
        if paint is not None:
            known["paint"] = self.paint_regions(prompts, paint, paint_weight, paint_fraction)
        run = self.start(batch, settings, seeds=seeds, guidance_scales=guidance_scales, **known)
        return PendingInfill(run, prompts, images, pixel_masks, unknown_words)

    def finish_infill(self, pending: PendingInfill) -> InfillResult:
        """`infill`'s second half: the run's remaining steps, if any, then images and captions decoded."""
        return self._decoded(pending, run_to_end(self.denoise, pending.run), slice(None))

    def preview(self, pending: PendingInfill, rows: slice = slice(None)) -> InfillResult:
        """Images and captions of the run's current estimate of its clean samples (InfillRun.estimate) for these
        rows: what the samples look like so far, decoded like the final result."""
        return self._decoded(pending, pending.run.estimate(), rows)

    def _decoded(self, pending: PendingInfill, out: SampleOutput, rows: slice) -> InfillResult:
        """Sampled latents and word vectors of `rows` as images and captions, the given pixels and words kept."""
        prompts, images, pixel_masks = (None if values is None else values[rows]
                                        for values in (pending.prompts, pending.images, pending.pixel_masks))
        if images is None:
            generated = self.decode_images(out.image_latents[rows])
        elif pixel_masks is None:  # a fully known image comes back as given
            generated = images.copy()
        else:
            generated = np.where(pixel_masks[..., None], self.decode_images(out.image_latents[rows]), images)
        if prompts is not None:
            captions = self._fill_blanks(prompts, out.text_vectors[rows])
        else:
            captions = self.codec.decode(out.text_vectors[rows])
        return InfillResult(generated, captions, pending.unknown_words[rows], out.network_evaluations)

    def captions_for_latents(self, latents: torch.Tensor, settings: SamplerSettings | None = None,
                             prompts: list[str] | None = None) -> list[str]:
        """Captions for known image latents (B, C, h, w): image->text without decoding any image.

        With prompts (captions with [?] blanks) only the blanks are sampled: caption infilling."""
        known = {"image_known": latents.to(self.device)}
        if prompts is not None:
            encoded = self.codec.encode(self.check_prompts(prompts))
            known.update(text_known=encoded.vectors.to(self.device), text_mask=encoded.known.to(self.device))
        out = self.sample(len(latents), settings, **known)
        return self.codec.decode(out.text_vectors) if prompts is None else self._fill_blanks(prompts, out.text_vectors)

    def text_to_image(self, prompts: list[str], settings: SamplerSettings | None = None
                      ) -> tuple[np.ndarray, list[list[str]]]:
        """Images (B, H, W, 3) uint8 for the prompts, and the unknown words of each prompt."""
        result = self.infill(prompts=prompts, settings=settings)
        return result.images, result.unknown_words

    def image_to_text(self, images: np.ndarray, settings: SamplerSettings | None = None) -> list[str]:
        """Captions for (B, H, W, 3) uint8 images."""
        return self.captions_for_latents(self.autoencoder.encode(self._checked_images(images)), settings)

    def generate(self, count: int, settings: SamplerSettings | None = None) -> tuple[np.ndarray, list[str]]:
        """Unconditional joint (image, caption) pairs."""
        result = self.infill(count=count, settings=settings)
        return result.images, result.captions

    @staticmethod
    def _batch_size(prompts, images, image_masks, count) -> int:
        sizes = {name: len(value) for name, value in
                 (("prompts", prompts), ("images", images), ("image_masks", image_masks)) if value is not None}
        if image_masks is not None and images is None:
            raise ValueError("image_masks given without images")
        if count is not None:
            if sizes:
                raise ValueError("count is only for unconditional generation; with prompts or images "
                                 "the batch size is their number")
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"count must be an integer >= 1, got {count!r}")
            return count
        if not sizes:
            raise ValueError("nothing to do: give prompts, images or a count")
        if len(set(sizes.values())) > 1:
            raise ValueError("batch sizes differ: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
        batch = next(iter(sizes.values()))
        if batch < 1:
            raise ValueError("empty batch: " + ", ".join(sizes))
        return batch

    def paint_regions(self, prompts: list[str] | None, paint: Paint, weight: float, fraction: float) -> PaintWithWords:
        """Checked paint-with-words input: word indices inside their prompt, regions at the model's resolution."""
        if prompts is None:
            raise ValueError("paint needs prompts: it steers where a prompt's words go")
        if len(paint) != len(prompts):
            raise ValueError(f"paint: give one list of (word, region) pairs per prompt ({len(prompts)}), "
                             f"got {len(paint)}")
        size = self.resolution
        regions = []
        for i, (prompt, pairs) in enumerate(zip(prompts, paint)):
            words = tokenize(prompt)[: self.model_config.text_len - 1]
            checked = []
            for word, region in pairs:
                if isinstance(word, str):
                    if word.lower() not in words:
                        raise ValueError(f"paint: prompt {i} has no word {word!r} (words: {' '.join(words)})")
                    word = words.index(word.lower())
                if not isinstance(word, int) or isinstance(word, bool) or not 0 <= word < len(words):
                    raise ValueError(f"paint: prompt {i}: word index {word!r} is outside the caption "
                                     f"(0..{len(words) - 1}: {' '.join(words)})")
                region = np.asarray(region)
                if region.shape != (size, size) or region.dtype != bool:
                    raise ValueError(f"paint: prompt {i}, word {word}: region must be a ({size}, {size}) bool mask "
                                     f"(True = put the word here), got {region.dtype} {tuple(region.shape)}")
                checked.append((word, torch.from_numpy(region)))
            regions.append(checked)
        return PaintWithWords(regions, weight=weight, fraction=fraction)

    def check_prompts(self, prompts: list[str]) -> list[str]:
        for i, prompt in enumerate(prompts):
            words = tokenize(prompt) if isinstance(prompt, str) else []
            if not words:
                raise ValueError(f"prompt {i} is empty: {prompt!r}")
            if BLANK not in words and not any(w in self.codec.keyed_vectors.key_to_index for w in words):
                raise ValueError(f"prompt {i} has no word in the model's vocabulary: {prompt!r}")
        return prompts

    def _checked_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        size = self.resolution
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"images must be uint8 (B, {size}, {size}, 3) for this model, got "
                             f"{images.dtype} {tuple(images.shape)}")
        return images

    def _checked_masks(self, masks: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        masks = np.asarray(masks)
        if masks.shape != shape:
            raise ValueError(f"image_masks must be (B, H, W) = {shape} like the images, got {tuple(masks.shape)}")
        if masks.dtype != bool:
            raise ValueError(f"image_masks must be bool (True = generate), got {masks.dtype}")
        return masks

    def _latent_mask(self, pixel_masks: np.ndarray) -> torch.Tensor:
        """(B, 1, h, w) float, 1 where a latent cell is known: none of its pixels is to be generated."""
        generate = torch.from_numpy(pixel_masks).float()[:, None]
        factor = self.autoencoder.downsample
        return (1 - torch.nn.functional.max_pool2d(generate, factor, factor)).to(self.device)

    def _fill_blanks(self, prompts: list[str], text_vectors: torch.Tensor) -> list[str]:
        """Each prompt with its [?] blanks replaced by the sampled words (a sampled end token drops the blank)."""
        nearest = self.codec.nearest_ids(text_vectors).tolist()
        captions = []
        for prompt, ids in zip(prompts, nearest):
            words = [self.codec.vocab[index] if word == BLANK else word
                     for word, index in zip(tokenize(prompt), ids)]
            captions.append(" ".join(word for word in words if word != END))
        return captions

    def decode_images(self, latents: torch.Tensor) -> np.ndarray:
        return Autoencoder.to_uint8(self.autoencoder.decode(latents.to(self.autoencoder.device)))


def _as_images(image: ImageInput | None) -> np.ndarray | None:
    """PIL image(s) as (B, H, W, 3) uint8; arrays pass through (checked by the pipeline)."""
    if image is None or isinstance(image, np.ndarray):
        return image
    images = [image] if isinstance(image, Image.Image) else image
    return np.stack([np.asarray(picture.convert("RGB")) for picture in images])


def _as_masks(mask_image: ImageInput | None) -> np.ndarray | None:
    """PIL mask(s) (white = generate) as (B, H, W) bool; arrays pass through (checked by the pipeline)."""
    if mask_image is None or isinstance(mask_image, np.ndarray):
        return mask_image
    masks = [mask_image] if isinstance(mask_image, Image.Image) else mask_image
    return np.stack([np.asarray(mask.convert("L")) > 127 for mask in masks])
