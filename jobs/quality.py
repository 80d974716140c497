"""Sample grids and demo-data quality scores, shared by training validation and evaluation.

Text->image accuracy: the attribute reader reads each generated image and is scored against the
prompt's attributes. Image->text accuracy: each generated caption is parsed and scored against
the true caption's attributes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dataprep import shapes
from psunet.pipeline import Pipeline
from psunet.settings import SamplerSettings


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]} if scores else {}


def text_to_image_accuracy(pipe: Pipeline, prompts: list[str], settings: SamplerSettings
                           ) -> tuple[dict[str, float], np.ndarray]:
    images, _ = pipe.text_to_image(prompts, settings)
    scores = [shapes.score(shapes.read_attributes(image), shapes.parse_caption(prompt))
              for image, prompt in zip(images, prompts)]
    return mean_scores(scores), images


def image_to_text_accuracy(pipe: Pipeline, latents, true_captions: list[str], settings: SamplerSettings
                           ) -> tuple[dict[str, float], list[str]]:
    """Captions for known image latents, scored against the true captions."""
    captions = pipe.captions_for_latents(latents, settings)
    scores = [shapes.score(shapes.parse_caption(generated), shapes.parse_caption(truth))
              for generated, truth in zip(captions, true_captions)]
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
