"""Sample grids and demo-data quality scores, shared by training validation and evaluation.

Text->image accuracy: the attribute reader reads each generated image and is scored against the
prompt's attributes. Image->text accuracy: each generated caption is parsed and scored against
the true caption's attributes. Positions are absolute, or relative for relation captions
(dataprep.shapes.score_image, score_caption).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dataprep import shapes
from psunet.pipeline import PSUNetPipeline
from psunet.settings import SamplerSettings


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]} if scores else {}


def text_to_image_accuracy(pipe: PSUNetPipeline, prompts: list[str], settings: SamplerSettings
                           ) -> tuple[dict[str, float], np.ndarray]:
    images, _ = pipe.text_to_image(prompts, settings)
    scores = [shapes.score_image(image, prompt) for image, prompt in zip(images, prompts)]
    return mean_scores(scores), images


def image_to_text_accuracy(pipe: PSUNetPipeline, latents, true_captions: list[str], settings: SamplerSettings
                           ) -> tuple[dict[str, float], list[str]]:
    """Captions for known image latents, scored against the true captions."""
    captions = pipe.captions_for_latents(latents, settings)
    scores = [shapes.score_caption(generated, truth) for generated, truth in zip(captions, true_captions)]
    return mean_scores(scores), captions


def grid_png(images: np.ndarray, labels: list[str], path: str | Path, scale: int = 4, columns: int = 4) -> Path:
    """A contact sheet: each (H, W, 3) uint8 image enlarged `scale` times with its label underneath."""
    count, height, width = images.shape[0], images.shape[1] * scale, images.shape[2] * scale
    label_height, cell_width = 28, max(width, 160)
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * cell_width, rows * (height + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * cell_width, (i // columns) * (height + label_height)
        sheet.paste(Image.fromarray(image).resize((width, height), Image.NEAREST), (x + (cell_width - width) // 2, y))
        words = label.split()
        lines = [" ".join(words[: len(words) // 2 + 1]), " ".join(words[len(words) // 2 + 1:])] \
            if len(label) > 26 else [label]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + height + 2 + 12 * j), line, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


@torch.no_grad()
def guidance_sweep(pipe: PSUNetPipeline, prompts: list[str], latents: torch.Tensor, scales: list[float],
                   settings: SamplerSettings, batch_size: int = 128) -> dict[str, dict]:
    """Text->image and image->text accuracy of held-out (caption, latent) pairs at every guidance scale, in
    batched sampler runs (each row its own scale and seed: prompt i has seed settings.seed + i at every scale,
    so the scale is the only difference); each direction's best scale by mean attribute accuracy.

    Returns {"t2i": {"by_scale": {scale: accuracies}, "best_scale", "best"}, "i2t": {...}}."""
    rows = [(scale, i) for scale in scales for i in range(len(prompts))]
    t2i, i2t = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seeds = [settings.seed + i for _, i in chunk]
        guidance = [scale for scale, _ in chunk]
        chunk_prompts = [prompts[i] for _, i in chunk]
        images = pipe.infill(prompts=chunk_prompts, settings=settings, seeds=seeds, guidance_scales=guidance).images
        t2i += [shapes.score_image(image, prompt) for image, prompt in zip(images, chunk_prompts)]
        out = pipe.sample(len(chunk), settings, seeds, guidance, image_known=latents[[i for _, i in chunk]].to(pipe.device))
        i2t += [shapes.score_caption(caption, prompt)
                for caption, prompt in zip(pipe.codec.decode(out.text_vectors), chunk_prompts)]
    result = {}
    for task, scores in (("t2i", t2i), ("i2t", i2t)):
        by_scale = {}
        for k, scale in enumerate(scales):
            accuracy = mean_scores(scores[k * len(prompts):(k + 1) * len(prompts)])
            by_scale[scale] = {**accuracy, "mean": float(np.mean([accuracy[a] for a in shapes.ATTRIBUTES]))}
        best = max(by_scale, key=lambda scale: by_scale[scale]["mean"])
        result[task] = {"by_scale": by_scale, "best_scale": best, "best": by_scale[best]["mean"]}
    return result
