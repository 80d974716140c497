"""Paint-with-words (eDiff-I): steer where a caption word lands by biasing joint attention.

A user gives, per sample, pairs (caption word index, region mask over the image). In the shared
section of PS-U-Net, where text and image tokens attend to each other, the logits between every
image-patch token inside the region and that word's token (both directions) get
w * log(1 + sigma) * max(QK^T) during the first `fraction` of the sampling steps, sigma being the
noise level of the step (strong while the layout is decided, fading as the image sharpens).
The model applies the bias as an additive mask to its fused attention (psunet.model.PaintBias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from psunet.config import ModelConfig
from psunet.model import TEXT_OFFSET


@dataclass
class PaintWithWords:
    """regions[b] = [(word index in caption b, region (S, S) bool, True = the word goes here), ...]."""

    regions: list[list[tuple[int, torch.Tensor]]]
    weight: float = 1.0
    fraction: float = 1.0

    def check(self, config: ModelConfig, batch: int) -> None:
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"paint weight must be a finite number >= 0, got {self.weight!r}")
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"paint fraction must be in (0, 1] (the share of steps with the bias), "
                             f"got {self.fraction!r}")
        if len(self.regions) != batch:
            raise ValueError(f"paint regions: give one list per sample ({batch}), got {len(self.regions)}")
        side = config.latent_size // config.patch_size
        for b, pairs in enumerate(self.regions):
            for word, region in pairs:
                if not isinstance(word, int) or not 0 <= word < config.text_len:
                    raise ValueError(f"paint: sample {b}: word index {word!r} is outside the caption "
                                     f"(0..{config.text_len - 1})")
                shape = tuple(region.shape)
                if len(shape) != 2 or shape[0] != shape[1] or shape[0] % side:
                    raise ValueError(f"paint: sample {b}, word {word}: region must be a square (S, S) mask with S a "
                                     f"multiple of the {side}x{side} patch grid, got {shape}")

    def strength(self, sigma: float, step: int, steps: int) -> float:
        """w log(1 + sigma) during the first `fraction` of the steps, 0 after."""
        return self.weight * math.log1p(sigma) if step < math.ceil(self.fraction * steps) else 0.0


def box_region(box, size: int) -> np.ndarray:
    """[x0, y0, x1, y1] in pixels (end exclusive) -> (size, size) bool region, True inside the box. A ValueError
    says what a box outside the image or with x0 >= x1 or y0 >= y1 gets wrong."""
    if len(box) != 4 or not all(isinstance(v, (int, np.integer)) for v in box):
        raise ValueError(f"a box is 4 whole numbers x0, y0, x1, y1, got {list(box)}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ValueError(f"box {[x0, y0, x1, y1]} must lie inside the {size}x{size} image with x0 < x1 and y0 < y1")
    region = np.zeros((size, size), dtype=bool)
    region[y0:y1, x0:x1] = True
    return region


def token_region(region: torch.Tensor, side: int) -> torch.Tensor:
    """(S, S) mask -> (side * side,) bool over image tokens: a patch is in when at least half of it is."""
    coverage = F.adaptive_avg_pool2d(region.float()[None, None], side)[0, 0]
    return (coverage >= 0.5).flatten()


def paint_mask(config: ModelConfig, paint: PaintWithWords, device: torch.device) -> torch.Tensor:
    """(B, 1, T, T) float mask over the shared sequence, 1 between a painted patch token and its word token."""
    side = config.latent_size // config.patch_size
    length = TEXT_OFFSET + config.text_len + config.image_tokens
    mask = torch.zeros(len(paint.regions), 1, length, length)
    image_offset = TEXT_OFFSET + config.text_len
    for b, pairs in enumerate(paint.regions):
        for word, region in pairs:
            patches = image_offset + token_region(region.cpu(), side).nonzero().flatten()
            mask[b, 0, patches, TEXT_OFFSET + word] = 1.0
            mask[b, 0, TEXT_OFFSET + word, patches] = 1.0
    return mask.to(device)

